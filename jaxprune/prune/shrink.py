"""Physical removal of pruned units: a smaller model with the same function as the masked one.

LoRA is merged first (``W + s·A@B``, i.e. the matching LoRA rows / columns go with their
weights), then per layer: q/k/v/gate/up keep their kept output columns, o/down their
kept input rows. KV heads whose query heads are all pruned go too. Layers may end up
with different widths (``ModelConfig.layer_*``).
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError, field_ref
from ..model import DECODER_LINEARS, LlamaForCausalLM
from ..weights import merged_arrays, model_from_arrays, weight_mask_paths
from .groups import UNIT_AXIS


def kept_indices(head_mask: np.ndarray, num_kv_heads: int):
    """(kept query heads, kept KV heads) of one layer; every kept KV group must keep the same count."""
    H = len(head_mask)
    G = H // num_kv_heads
    groups = head_mask.reshape(num_kv_heads, G)
    kv_kept = np.flatnonzero(groups.any(1))
    counts = {int(groups[j].sum()) for j in kv_kept}
    if len(counts) > 1:
        raise UserError(f"cannot shrink: KV groups keep different numbers of query heads {sorted(counts)} "
                        f"(prune with {field_ref('attn_unit')} q_head or kv_group)")
    return np.flatnonzero(head_mask), kv_kept


def _cols(idx_units: np.ndarray, width: int) -> np.ndarray:
    return (idx_units[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def _take(arrays: dict, key: tuple, idx: np.ndarray, axis: int) -> None:
    if key in arrays:
        arrays[key] = np.take(arrays[key], idx, axis=axis)


def shrink(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The masked model with its pruned heads and channels removed (LoRA merged)."""
    cfg = model.config
    D = cfg.head_dim
    arrays = {p: np.asarray(v) for p, v in merged_arrays(model).items()}
    heads, kvs, widths = [], [], []
    for i in range(cfg.num_layers):
        L = ("layers", i)
        hm = np.asarray(arrays.pop(L + ("self_attn", "head_mask")))
        q_heads, kv_heads = kept_indices(hm, cfg.kv_heads(i)) if len(hm) else (np.zeros(0, int),) * 2
        q_cols, kv_cols = _cols(q_heads, D), _cols(kv_heads, D)
        ch = np.flatnonzero(np.asarray(arrays.pop(L + ("mlp", "channel_mask"))))
        kept = {"q_proj": q_cols, "k_proj": kv_cols, "v_proj": kv_cols, "o_proj": q_cols,
                "gate_proj": ch, "up_proj": ch, "down_proj": ch}
        for block, name in DECODER_LINEARS:  # units are output columns (axis 1) or input rows (axis 0)
            idx, axis = kept[name], UNIT_AXIS[name]
            for leaf in ("kernel", "weight_mask"):
                _take(arrays, L + (block, name, leaf), idx, axis)
            if axis == 1:
                _take(arrays, L + (block, name, "bias"), idx, 0)
        heads.append(len(q_heads))
        kvs.append(len(kv_heads))
        widths.append(len(ch))
    new_cfg = cfg.with_layer_widths(heads, kvs, widths)
    return model_from_arrays(new_cfg, arrays, dtype=model.dtype, weight_masks=weight_mask_paths(model),
                             source="shrink")


def describe_widths(model: LlamaForCausalLM) -> list[dict]:
    cfg = model.config
    return [{"layer": i, "heads": cfg.heads(i), "kv_heads": cfg.kv_heads(i), "mlp": cfg.mlp_width(i)}
            for i in range(cfg.num_layers)]


