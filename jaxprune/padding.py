"""Zero-padding of decoder layers to wider head / MLP counts (exact: the padded units contribute 0).

Formats that cannot describe every layer's widths (a stock HF config: one global width; vLLM's
DeciLM config: one global query-head count, MLP widths in multiples of 256) receive the model
padded to the nearest layout they can describe. A padded query head has zero q rows and zero
o_proj columns, so whatever it attends to, o_proj ignores it; a padded KV head has zero k and v;
a padded MLP channel has zero gate / up rows, so silu(0)·0 = 0 feeds zero down_proj columns.

Arrays are jaxprune's ``path -> array`` dicts, kernels ``[in, out]``.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import UserError


def _scatter_heads(a: np.ndarray, axis: int, n_kv: int, group: int, kv_to: int, group_to: int, D: int) -> np.ndarray:
    """[.., n_kv·group·D, ..] -> [.., kv_to·group_to·D, ..] along ``axis``; head (j, g) keeps its place."""
    a = np.moveaxis(a, axis, 0)
    src = a.reshape((n_kv, group, D) + a.shape[1:])
    dst = np.zeros((kv_to, group_to, D) + a.shape[1:], a.dtype)
    dst[:n_kv, :group] = src
    return np.moveaxis(dst.reshape((kv_to * group_to * D,) + a.shape[1:]), 0, axis)


def _pad_axis(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Zeros appended along ``axis`` up to ``size``."""
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(a, widths)


def pad_to_layout(arrays: dict[tuple, np.ndarray], cfg: ModelConfig, target: ModelConfig) -> dict[tuple, np.ndarray]:
    """``arrays`` of a model of ``cfg`` zero-padded to ``target``'s per-layer widths (same function).

    Layer i goes from (heads h, KV heads kv, MLP m) to (h', kv', m') with kv' ≥ kv, h'/kv' ≥ h/kv
    and m' ≥ m; the real query heads of KV group j stay in group j.
    """
    D = cfg.head_dim
    out = dict(arrays)
    for i in range(cfg.num_layers):
        kv, kv2 = cfg.kv_heads(i), target.kv_heads(i)
        g, g2 = cfg.heads(i) // max(kv, 1), target.heads(i) // max(kv2, 1)
        m, m2 = cfg.mlp_width(i), target.mlp_width(i)
        if kv2 < kv or g2 < g or m2 < m:
            raise UserError(f"layer {i}: cannot pad ({cfg.heads(i)} heads, {kv} KV, MLP {m}) to "
                            f"({target.heads(i)}, {kv2}, {m2})")
        L = ("layers", i)

        def heads(a, axis):
            return _scatter_heads(a, axis, kv, g, kv2, g2, D)

        def kv_heads(a, axis):
            return _pad_axis(a, axis, kv2 * D)

        def mlp(a, axis):
            return _pad_axis(a, axis, m2)

        for block, name, fn, axis in (("self_attn", "q_proj", heads, 1), ("self_attn", "k_proj", kv_heads, 1),
                                      ("self_attn", "v_proj", kv_heads, 1), ("self_attn", "o_proj", heads, 0),
                                      ("mlp", "gate_proj", mlp, 1), ("mlp", "up_proj", mlp, 1),
                                      ("mlp", "down_proj", mlp, 0)):
            out[L + (block, name, "kernel")] = fn(arrays[L + (block, name, "kernel")], axis)
            if axis == 1 and (b := L + (block, name, "bias")) in arrays:
                out[b] = fn(arrays[b], 0)
    return out


def padded_fraction(cfg: ModelConfig, target: ModelConfig) -> float:
    """Extra parameters of the padded layout, as a fraction of the model's own count."""
    return target.num_params() / cfg.num_params() - 1.0
