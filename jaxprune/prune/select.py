"""Element-wise mask selection (True = keep): unstructured, per output, or N:M; one entry for every
element-wise method (magnitude, Wanda, SparseGPT), in the spirit of jaxpruner's ``mask_calculator``.

Layout: our kernels are ``W [in, out]``; the papers' "row" (one output) is our column.
``unstructured`` at sparsity ``s`` prunes ``floor(s·in·out)`` entries of a layer (or ``floor(s·in)`` of
each column when compared per output); ``N:M`` keeps at most ``N`` of every ``M`` consecutive inputs
of each output (sparsity ``1 - N/M``); ``block:BKxBN`` scores each ``BK x BN`` block of ``W`` by the sum
of its elements' scores and prunes ``floor(s·blocks)`` whole blocks (of the layer, or of each column of
blocks when compared per output), so the block-sparse kernel can skip them. Counts are exact; ties are
broken by index (the lower index is pruned first, as a stable sort).

Selection runs on the host in numpy: ``np.partition`` finds a threshold in O(n), where an XLA sort of a
1536×576 kernel takes ~0.5 s on CPU. The ``*_jnp`` variants run inside jit (SparseGPT's masks depend
on weights updated inside its sweep).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from typing import NamedTuple

from ..errors import UserError, field_ref
from ..ops.nm import nm_keep_mask
from .registry import register_elementwise


class Block(NamedTuple):
    """The ``block:BKxBN`` pattern: whole ``bk x bn`` blocks of ``W [in, out]`` kept or pruned."""
    bk: int
    bn: int

    def __str__(self) -> str:
        return f"block:{self.bk}x{self.bn}"


def floor_count(x: float) -> int:
    """floor with a guard against 0.3·10 = 2.9999999999999996."""
    return int(math.floor(x + 1e-9))


def parse_pattern(pattern: str | None) -> tuple[int, int] | Block | None:
    """'unstructured' / None -> None; 'N:M' -> (N, M) with 0 < N < M; 'block:BKxBN' -> Block(BK, BN)."""
    if pattern in (None, "unstructured"):
        return None
    if str(pattern).startswith("block:"):
        m = re.fullmatch(r"block:(\d+)x(\d+)", str(pattern).strip())
        if not m or min(int(m.group(1)), int(m.group(2))) < 1:
            raise UserError("expected block:BKxBN with positive sizes (e.g. block:32x32)", field="pattern",
                            value=pattern)
        return Block(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        hint = " (YAML 1.1 reads an unquoted 2:4 as the number 124: quote it)" if isinstance(pattern, int) else ""
        raise UserError(f"expected 'unstructured', N:M with 0 < N < M (e.g. 2:4) or block:BKxBN{hint}",
                        field="pattern", value=pattern)
    return int(m.group(1)), int(m.group(2))


def resolve_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """The sparsity a (--sparsity, --pattern) pair means; N:M fixes it to 1 - N/M."""
    if nm is not None and not isinstance(nm, Block):
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise UserError(f"contradicts {field_ref('pattern')} {nm[0]}:{nm[1]} (which means sparsity "
                            f"{implied:g}); drop {field_ref('sparsity')} or make them agree", field="sparsity",
                            value=sparsity)
        return implied
    if sparsity is None:
        raise UserError(f"required for {'block' if nm else 'unstructured'} pruning", field="sparsity")
    if not 0.0 <= sparsity < 1.0:
        raise UserError("must be in [0, 1)", field="sparsity", value=sparsity)
    return float(sparsity)


def keep_not_lowest(scores: np.ndarray, k: int, axis: int | None) -> np.ndarray:
    """Keep-mask pruning exactly the ``k`` lowest scores, over the whole array (axis None) or per column."""
    x = np.asarray(scores, np.float32)
    if axis is None:
        return keep_not_lowest(x.reshape(-1, 1), k, 0).reshape(x.shape)
    if k <= 0:
        return np.ones(x.shape, bool)
    if k >= x.shape[0]:
        return np.zeros(x.shape, bool)
    t = np.partition(x, k - 1, axis=0)[k - 1]              # k-th smallest per column
    below, ties = x < t, x == t
    need = k - below.sum(axis=0)                           # how many of the ties go, first ones first
    return ~(below | (ties & (np.cumsum(ties, axis=0) <= need)))


def pattern_name(nm) -> str:
    """'unstructured', 'N:M' or 'block:BKxBN'."""
    return "unstructured" if nm is None else str(nm) if isinstance(nm, Block) else f"{nm[0]}:{nm[1]}"


def check_nm(shape, nm) -> None:
    if nm is not None and not isinstance(nm, Block) and shape[0] % nm[1]:
        raise UserError(f"pattern {nm[0]}:{nm[1]}: input width {shape[0]} is not a multiple of {nm[1]}")


def select_mask(scores, sparsity: float, nm: tuple[int, int] | None, *, per_output: bool) -> np.ndarray:
    """Keep-mask from scores [in, out]: N:M per group, else the ``sparsity`` lowest per layer
    (``floor(s·in·out)``) or per output column (``floor(s·in)`` each)."""
    x = np.asarray(scores, np.float32)
    check_nm(x.shape, nm)
    if isinstance(nm, Block):
        return block_keep_mask(x, sparsity, nm, per_output=per_output)
    if nm is not None:
        return nm_keep_mask(x, *nm, axis=0, keep_ties="later")  # of equal scores the earlier input goes
    if per_output:
        return keep_not_lowest(x, floor_count(sparsity * x.shape[0]), 0)
    return keep_not_lowest(x, floor_count(sparsity * x.size), None)


def block_scores(scores: np.ndarray, block: Block) -> np.ndarray:
    """[in, out] element scores -> [ceil(in/bk), ceil(out/bn)] block sums (edge blocks sum what they hold)."""
    x = np.asarray(scores, np.float64)
    gk, gn = -(-x.shape[0] // block.bk), -(-x.shape[1] // block.bn)
    padded = np.zeros((gk * block.bk, gn * block.bn))
    padded[: x.shape[0], : x.shape[1]] = x
    return padded.reshape(gk, block.bk, gn, block.bn).sum(axis=(1, 3))


def block_keep_mask(scores: np.ndarray, sparsity: float, block: Block, *, per_output: bool) -> np.ndarray:
    """Keep-mask [in, out] of whole blocks: the ``floor(s·blocks)`` lowest block sums of the layer go (or
    ``floor(s·rows of blocks)`` of each column of blocks with ``per_output``)."""
    sums = block_scores(scores, block)
    if per_output:
        keep = keep_not_lowest(sums, floor_count(sparsity * sums.shape[0]), 0)
    else:
        keep = keep_not_lowest(sums, floor_count(sparsity * sums.size), None)
    full = np.repeat(np.repeat(keep, block.bk, axis=0), block.bn, axis=1)
    return full[: np.shape(scores)[0], : np.shape(scores)[1]]


def magnitude_mask(w, sparsity: float, nm=None) -> np.ndarray:
    """Keep-mask from ``|W|``, compared over the whole layer (or per N:M group)."""
    return select_mask(np.abs(np.asarray(w, np.float32)), sparsity, nm, per_output=False)


@register_elementwise("magnitude", summary="|W_ij| compared over the whole layer (per N:M group), no data",
                      citation="Han et al. 2015, arXiv 1506.02626; the baseline of Wanda and SparseGPT")
def magnitude_select(w, _stat, sparsity: float, nm=None) -> np.ndarray:
    return magnitude_mask(w, sparsity, nm)


def keep_not_lowest_jnp(x: jax.Array, k) -> jax.Array:
    """jnp version of ``keep_not_lowest`` along axis 0 (same stable tie order); k may be traced."""
    srt = jnp.sort(x, axis=0)
    t = jnp.take(srt, jnp.clip(k - 1, 0, x.shape[0] - 1), axis=0)
    below, ties = x < t, x == t
    need = k - below.sum(axis=0)
    prune = (below | (ties & (jnp.cumsum(ties, axis=0) <= need))) & (k > 0)
    return ~prune


def rank_jnp(x: jax.Array, axis: int) -> jax.Array:
    return jnp.argsort(jnp.argsort(x, axis=axis, stable=True), axis=axis, stable=True)
