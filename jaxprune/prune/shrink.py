"""Physical removal of pruned units: a smaller model with the same function as the masked one.

LoRA is merged first (``W + s·A@B``, i.e. the matching LoRA rows / columns go with their
weights), then per layer: q/k/v/gate/up keep their kept output columns, o/down their
kept input rows. KV heads whose query heads are all pruned go too. Layers may end up
with different widths (``ModelConfig.layer_*``).
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..model import LlamaForCausalLM
from ..weights import linears, model_arrays, model_from_arrays, weight_mask_paths


def kept_indices(head_mask: np.ndarray, num_kv_heads: int):
    """(kept query heads, kept KV heads) of one layer; every kept KV group must keep the same count."""
    H = len(head_mask)
    G = H // num_kv_heads
    groups = head_mask.reshape(num_kv_heads, G)
    kv_kept = np.flatnonzero(groups.any(1))
    counts = {int(groups[j].sum()) for j in kv_kept}
    if len(counts) > 1:
        raise UserError(f"cannot shrink: KV groups keep different numbers of query heads {sorted(counts)} "
                        "(prune with --attn-unit q_head or kv_group)")
    return np.flatnonzero(head_mask), kv_kept


def _cols(idx_units: np.ndarray, width: int) -> np.ndarray:
    return (idx_units[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def shrink(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The masked model with its pruned heads and channels removed (LoRA merged)."""
    cfg = model.config
    D = cfg.head_dim
    arrays = {p: np.asarray(v) for p, v in model_arrays(model).items()
              if p[-1] not in ("lora_a", "lora_b")}
    for path, lin in linears(model):
        arrays[path + ("kernel",)] = np.asarray(lin.merged_kernel())
    heads, kvs, widths = [], [], []
    for i, layer in enumerate(model.layers):
        L = ("layers", i)
        attn = L + ("self_attn",)
        hm = np.asarray(arrays.pop(attn + ("head_mask",)))
        q_heads, kv_heads = kept_indices(hm, cfg.kv_heads(i)) if len(hm) else (np.zeros(0, int),) * 2
        q_cols, kv_cols = _cols(q_heads, D), _cols(kv_heads, D)
        for name, cols in (("q_proj", q_cols), ("k_proj", kv_cols), ("v_proj", kv_cols)):
            for leaf in ("kernel", "weight_mask"):
                if (k := attn + (name, leaf)) in arrays:
                    arrays[k] = arrays[k][:, cols]
            if (k := attn + (name, "bias")) in arrays:
                arrays[k] = arrays[k][cols]
        for leaf in ("kernel", "weight_mask"):
            if (k := attn + ("o_proj", leaf)) in arrays:
                arrays[k] = arrays[k][q_cols, :]
        mlp = L + ("mlp",)
        ch = np.flatnonzero(np.asarray(arrays.pop(mlp + ("channel_mask",))))
        for name in ("gate_proj", "up_proj"):
            for leaf in ("kernel", "weight_mask"):
                if (k := mlp + (name, leaf)) in arrays:
                    arrays[k] = arrays[k][:, ch]
            if (k := mlp + (name, "bias")) in arrays:
                arrays[k] = arrays[k][ch]
        for leaf in ("kernel", "weight_mask"):
            if (k := mlp + ("down_proj", leaf)) in arrays:
                arrays[k] = arrays[k][ch, :]
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


