"""Setting structured masks from unit scores: lowest score first, pruned sets only grow.

Runs on the host between steps (the arrays are a few thousand booleans). ``ratio`` is the
per-layer fraction of units removed, ``int(ratio · n)`` as in LoRAPrune's code; with the
``q_head`` unit it applies inside each KV group (same count in every group).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig
from .groups import AttnUnit, head_mask_from_units, units_from_head_mask


def grow_pruned(scores: np.ndarray, pruned: np.ndarray, n_prune: int) -> np.ndarray:
    """Pruned set of size max(n_prune, |pruned|): the old one plus the lowest-scored kept units."""
    pruned = pruned.copy()
    extra = n_prune - int(pruned.sum())
    if extra > 0:
        s = np.where(pruned, np.inf, np.nan_to_num(np.asarray(scores, np.float64), nan=np.inf))
        order = np.argsort(s, kind="stable")
        pruned[order[:extra]] = True
    return pruned


def prune_attention_units(scores: np.ndarray, head_mask: np.ndarray, ratio: float, H: int, KV: int,
                          unit: AttnUnit) -> np.ndarray:
    """New head keep-mask [H] for one layer."""
    kept_units = np.asarray(units_from_head_mask(head_mask, H, KV, unit))
    if unit == "kv_group":
        pruned = grow_pruned(scores, ~kept_units, int(ratio * KV))
    else:  # q_head: same number of query heads pruned in every KV group
        G = H // KV
        s, p = np.asarray(scores).reshape(KV, G), (~kept_units).reshape(KV, G)
        pruned = np.stack([grow_pruned(s[j], p[j], int(ratio * G)) for j in range(KV)]).reshape(H)
    return np.asarray(head_mask_from_units(~pruned, H, KV, unit))


def masks_replaced(masks: nnx.State, d) -> nnx.State:
    """A copy of the ``masks`` state holding the (host or device) arrays of the pure dict ``d``."""
    new = nnx.clone(masks)
    nnx.replace_by_pure_dict(new, jax.tree.map(jnp.asarray, d))
    return new


def update_structured_masks(masks: nnx.State, scores, ratio: float, cfg: ModelConfig, unit: AttnUnit,
                            layers: Sequence[int]) -> nnx.State:
    """A new masks pytree with each listed layer pruned to ``ratio`` (existing pruning kept)."""
    attn_scores, mlp_scores = scores
    d = nnx.to_pure_dict(masks)
    for i in layers:
        H, KV = cfg.heads(i), cfg.kv_heads(i)
        attn = d["layers"][i]["self_attn"]
        if H:
            attn["head_mask"] = prune_attention_units(np.asarray(attn_scores[i]), np.asarray(attn["head_mask"]),
                                                      ratio, H, KV, unit)
        mlp = d["layers"][i]["mlp"]
        m = np.asarray(mlp["channel_mask"])
        mlp["channel_mask"] = ~grow_pruned(np.asarray(mlp_scores[i]), ~m, int(ratio * len(m)))
    return masks_replaced(masks, d)


def incremental_ratios(ratio: float, n: int, top: float = 1.25) -> np.ndarray:
    """SlimGPT's Incremental Pruning Ratio (arXiv 2412.18110; their ``log_increase``): per-layer ratios [n] for the
    k-th of n pruned layers ``r_k = r_0 + (r_max − r_0)·ln(1 + k)/ln(n)`` with ``r_max = top·ratio`` (capped at
    0.95) and ``r_0`` set so that the mean is ``ratio`` (their LLaMA-7B 20% run: 0.0625 … 0.25, i.e. top 1.25)."""
    if n <= 1:
        return np.full(n, ratio)
    shape = np.log1p(np.arange(n)) / np.log(n)
    c = shape.mean()
    r_max = min(top * ratio, 0.95)
    r_0 = (ratio - r_max * c) / (1 - c)
    return np.clip(r_0 + (r_max - r_0) * shape, 0.0, 0.95)


def layer_ratios(widths: str, ratio: float, layers: Sequence[int]) -> dict[int, float]:
    """{layer: fraction of its units removed}: ``ratio`` everywhere, or rising with depth for ``incremental``."""
    if widths == "incremental":
        return dict(zip(layers, (float(r) for r in incremental_ratios(ratio, len(layers)))))
    return {i: ratio for i in layers}


def structured_sparsity(masks: nnx.State, cfg: ModelConfig, layers: Sequence[int] | None = None) -> dict:
    """Fractions of query heads and MLP channels pruned (over ``layers``, default all)."""
    d = nnx.to_pure_dict(masks)
    layers = range(cfg.num_layers) if layers is None else layers
    heads = [np.asarray(d["layers"][i]["self_attn"]["head_mask"]) for i in layers]
    chans = [np.asarray(d["layers"][i]["mlp"]["channel_mask"]) for i in layers]
    h = np.concatenate(heads) if heads else np.ones(1, bool)
    c = np.concatenate(chans) if chans else np.ones(1, bool)
    return {"heads_pruned": float(1 - h.mean()), "channels_pruned": float(1 - c.mean())}


def unit_costs(cfg: ModelConfig, layer: int, unit: AttnUnit) -> tuple[float, float]:
    """Decoder-linear parameters one attention unit / one MLP channel of ``layer`` holds, in MLP channels
    (``3·hidden``): q_head ``2·D·hidden`` (q rows, o columns), kv_group ``(2G + 2)·D·hidden`` (+ k, v rows).
    FLAP's ``512 / 3`` for a LLaMA-7B head (``4·128·hidden``, multi-head) is the kv_group case with G = 1."""
    D, G = cfg.head_dim, cfg.heads(layer) // max(cfg.kv_heads(layer), 1)
    attn = (2 * D) if unit == "q_head" else (2 * G * D + 2 * D)
    return attn / 3.0, 1.0


def standardise(v: np.ndarray) -> np.ndarray:
    """``(v − mean) / std`` with torch's unbiased std (FLAP's ``standarlization``); a constant vector -> 0."""
    v = np.asarray(v, np.float64)
    if v.size < 2:
        return np.zeros_like(v)
    sd = v.std(ddof=1)
    return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)


def global_structured_masks(masks: nnx.State, scores, ratio: float, cfg: ModelConfig, unit: AttnUnit,
                            layers: Sequence[int], *, normalised: bool = False) -> nnx.State:
    """Masks with one threshold across ``layers`` and both modules (FLAP's AL-AM, arXiv 2312.11983 ``prune_flap``):
    scores z-scored within each layer and module (unless ``normalised``: the criterion did it), sorted
    descending, each unit weighted by its parameter cost (:func:`unit_costs`); the threshold is the score where
    the kept weight comes closest to ``(1 − ratio)`` of the total, and units scoring above it are kept. Widths
    follow per layer (a layer may lose every head or channel)."""
    attn_scores, mlp_scores = scores
    entries = []  # (layer, kind, scores, cost)
    for i in layers:
        a_cost, m_cost = unit_costs(cfg, i, unit)
        if cfg.heads(i):
            a = np.asarray(attn_scores[i], np.float64)
            entries.append((i, "attn", a if normalised else standardise(a), a_cost))
        if cfg.mlp_width(i):
            m = np.asarray(mlp_scores[i], np.float64)
            entries.append((i, "mlp", m if normalised else standardise(m), m_cost))
    if not entries:
        return masks
    values = np.concatenate([e[2] for e in entries])
    costs = np.concatenate([np.full(len(e[2]), e[3]) for e in entries])
    order = np.argsort(-values, kind="stable")
    kept_weight = np.cumsum(costs[order])
    threshold = values[order][np.argmin(np.abs(kept_weight - costs.sum() * (1.0 - ratio)))]
    d = nnx.to_pure_dict(masks)
    for i, kind, v, _ in entries:
        keep = v > threshold
        if kind == "mlp":
            d["layers"][i]["mlp"]["channel_mask"] = np.asarray(d["layers"][i]["mlp"]["channel_mask"]) & keep
        else:
            attn = d["layers"][i]["self_attn"]
            H, KV = cfg.heads(i), cfg.kv_heads(i)
            old = np.asarray(units_from_head_mask(np.asarray(attn["head_mask"]), H, KV, unit))
            attn["head_mask"] = np.asarray(head_mask_from_units(old & keep, H, KV, unit))
    return masks_replaced(masks, d)
