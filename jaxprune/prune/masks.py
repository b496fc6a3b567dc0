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
    new = nnx.clone(masks)
    nnx.replace_by_pure_dict(new, jax.tree.map(jnp.asarray, d))
    return new


def structured_sparsity(masks: nnx.State, cfg: ModelConfig, layers: Sequence[int] | None = None) -> dict:
    """Fractions of query heads and MLP channels pruned (over ``layers``, default all)."""
    d = nnx.to_pure_dict(masks)
    layers = range(cfg.num_layers) if layers is None else layers
    heads = [np.asarray(d["layers"][i]["self_attn"]["head_mask"]) for i in layers]
    chans = [np.asarray(d["layers"][i]["mlp"]["channel_mask"]) for i in layers]
    h = np.concatenate(heads) if heads else np.ones(1, bool)
    c = np.concatenate(chans) if chans else np.ones(1, bool)
    return {"heads_pruned": float(1 - h.mean()), "channels_pruned": float(1 - c.mean())}
