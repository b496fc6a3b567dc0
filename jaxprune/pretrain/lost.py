"""LOST (Li et al. 2025, arXiv 2508.02668, "LOST: Low-rank and Sparse Pre-training for LLMs"):
a low-rank part on the dominant singular directions of the random init, and a channel-wise sparse part
built from the remaining (complementary) singular directions.

In our ``[in, out]`` layout, from the layer's random init ``W₀ = U Σ Vᵀ`` (singular values descending)::

    A = U[:, :r] · Σ[:r]^½   [in, r]          B = Σ[:r]^½ · V[:, :r]ᵀ   [r, out]     (A @ B: the top-r SVD)
    W_c = U[:, r:] · Σ[r:] · V[:, r:]ᵀ                                              (the complement, W₀ − A@B)
    idx = the k input channels (rows of W_c) of largest ‖W_c[i, :]‖₂, k = ⌈ρ · d_in⌉, sorted, fixed
    S = W_c[idx, :]   [k, out]
    W = A @ B + scatter_rows(S at idx)        y = (x @ A) @ B + x[..., idx] @ S + b

A, B and S train (``nnx.LoRAParam``); ``idx`` is frozen (saved with the run's ``support/``). At init W
equals W₀ on the selected channels and its top-r approximation elsewhere; with ``ρ = 1`` it is W₀.
Parameters per layer: ``r (d_in + d_out) + k · d_out`` (:func:`lost_param_count`); ρ = δ gives SLTrain's
sparse budget. The official code was not reachable from here: "channel" is read as an input channel
(a column of torch's ``[out, in]`` weight) and the channel score as the complement's L2 norm, as the
paper's method section describes; the low-rank and sparse parts are summed with no extra scale.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ..layers import Linear, with_axes
from ..errors import UserError
from .registry import PRETRAIN, PretrainMethod
from .sltrain import SparseValues


class ChannelIndex(nnx.Variable):
    """LOST's sparse channels: sorted int32 input-channel indices [k]; frozen, never trained."""


def channel_count(d_in: int, ratio: float) -> int:
    """k = ⌈ρ · d_in⌉ (at least one channel, at most all)."""
    return min(d_in, max(1, math.ceil(ratio * d_in - 1e-9)))


def lost_param_count(d_in: int, d_out: int, rank: int, ratio: float) -> int:
    """Trainable scalars of one LOST layer: ``r (d_in + d_out) + k · d_out``."""
    return rank * (d_in + d_out) + channel_count(d_in, ratio) * d_out


def svd_split(w: jax.Array, rank: int, ratio: float):
    """-> A [in, r], B [r, out], idx [k] int32, S [k, out]: the LOST init of ``w`` [in, out] (module doc)."""
    u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[:rank])
    a, b = u[:, :rank] * root, root[:, None] * vt[:rank]
    comp = (u[:, rank:] * s[rank:]) @ vt[rank:]
    k = channel_count(w.shape[0], ratio)
    idx = jnp.sort(jnp.argsort(-jnp.linalg.norm(comp, axis=1), stable=True)[:k]).astype(jnp.int32)
    return a.astype(w.dtype), b.astype(w.dtype), idx, comp[idx].astype(w.dtype)


class LOSTLinear(Linear):
    """``y = (x @ A) @ B + x[..., idx] @ S + b``. Shapes: ``lora_a`` [in, r], ``lora_b`` [r, out],
    ``sparse_values`` S [k, out], ``channel_index`` [k] int32; ``merged_kernel()`` is the dense [in, out]."""

    def __init__(self, base: Linear, *, rank: int, ratio: float):
        w = base.kernel[...]
        super().__init__(base.in_features, base.out_features, axes=base.axes, use_bias=base.bias is not None,
                         bias=None if base.bias is None else base.bias[...], dtype=w.dtype, with_kernel=False)
        a, b, idx, s = svd_split(w, rank, ratio)
        self.set_lora(a, b, 1.0)
        self.channel_index = ChannelIndex(idx)
        self.sparse_values = with_axes(SparseValues, s, (None, self.axes[1]))

    def merged_kernel(self) -> jax.Array:
        """``A @ B`` with S added on the rows ``idx``. [in, out]"""
        w = self.lora_a[...] @ self.lora_b[...]
        return w.at[self.channel_index[...]].add(self.sparse_values[...].astype(w.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        a, b, s = (v[...].astype(x.dtype) for v in (self.lora_a, self.lora_b, self.sparse_values))
        y = (x @ a) @ b + jnp.take(x, self.channel_index[...], axis=-1) @ s
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def _build_lost(old: Linear, mc, rngs: nnx.Rngs, dtype) -> LOSTLinear:
    if mc.rank > min(old.in_features, old.out_features):
        raise UserError(f"exceeds min(in, out) = {min(old.in_features, old.out_features)} of a "
                        f"{old.in_features}x{old.out_features} layer (lost)", field="MethodConfig.rank", value=mc.rank)
    return LOSTLinear(old, rank=mc.rank, ratio=mc.channel_ratio)


def _check_lost(mc) -> None:
    if not 0.0 < mc.channel_ratio <= 1.0:
        raise UserError("must be in (0, 1]", field="MethodConfig.channel_ratio", value=mc.channel_ratio)


PRETRAIN.register(PretrainMethod("lost", "W = A@B from the init's top-r SVD + sparse input channels of the rest",
                                 _build_lost, uses_rank=True, check=_check_lost))
