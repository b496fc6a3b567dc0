"""Structured units and how element scores reduce to them.

Per decoder layer there are two groups of coupled modules:

* attention: q, k, v, o. Unit = ``kv_group`` (a KV head with its query heads and their
  o_proj columns) or ``q_head`` (one query head with its o_proj columns; every KV group
  keeps the same number of query heads so the layer stays valid GQA).
* MLP: gate, up, down. Unit = one intermediate channel.

Layout reminder (ours, [in, out]): q/k/v/gate/up units are output *columns*; o/down units
are input *rows*. (In HF's [out, in] layout these are rows and columns respectively.)
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp

from ..errors import UserError, field_ref
from ..model import ATTN_LINEARS, MLP_LINEARS

AttnUnit = Literal["kv_group", "q_head"]
ATTN_MODULES = ATTN_LINEARS  # q, k, v, o
MLP_MODULES = MLP_LINEARS  # gate, up, down
#: where a unit sits in each module's [in, out] kernel: 1 = output columns, 0 = input rows
UNIT_AXIS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 0, "gate_proj": 1, "up_proj": 1, "down_proj": 0}


def reduce_attention(module: str, scores: jnp.ndarray, num_heads: int, num_kv_heads: int, head_dim: int,
                     unit: AttnUnit) -> jnp.ndarray | None:
    """Element scores of one attention module [in, out] -> per-unit vector, or None if the module
    does not score this unit type (k/v for ``q_head``: shared by the heads of a group).

    Returns [num_kv_heads] for ``kv_group`` and [num_heads] for ``q_head``.
    """
    if module in ("q_proj", "o_proj"):
        per_col = scores.sum(axis=0) if module == "q_proj" else scores.sum(axis=1)  # [H*D]
        per_head = per_col.reshape(num_heads, head_dim).sum(-1)
        if unit == "q_head":
            return per_head
        return per_head.reshape(num_kv_heads, num_heads // num_kv_heads).sum(-1)
    if unit == "q_head":
        return None
    return scores.sum(axis=0).reshape(num_kv_heads, head_dim).sum(-1)  # k_proj, v_proj


ATTN_UNITS = ("auto", "kv_group", "q_head")


def resolve_attn_unit(unit: str, kv_heads: list[int]) -> AttnUnit:
    """``auto``: ``kv_group`` where every pruned layer has more than one KV head (GQA, MHA), else ``q_head`` (MQA:
    Gemma 3 270M, where a KV group is the whole attention block). ``kv_heads``: per pruned layer."""
    if unit not in ATTN_UNITS:
        raise UserError(f"attn_unit {unit!r}: expected one of {', '.join(ATTN_UNITS)}")
    if unit != "auto":
        return unit
    return "kv_group" if all(k > 1 for k in kv_heads) else "q_head"


def check_attn_unit(kv_heads: list[int], unit: AttnUnit, ratio: float) -> None:
    """``kv_group`` on a layer with a single KV head (MQA: Gemma 3 270M) could only remove the whole attention
    block, which structured pruning never does: refused, pointing at ``q_head``. ``kv_heads``: per pruned layer."""
    if unit == "kv_group" and ratio > 0 and 1 in kv_heads:
        raise UserError("the model has a single KV head per layer (MQA), so no KV group can be pruned; use "
                        f"{field_ref('attn_unit')} q_head (query heads and MLP channels go)", field="attn_unit",
                        value=unit)


def reduce_mlp(module: str, scores: jnp.ndarray) -> jnp.ndarray:
    """Element scores of gate/up [in, m] or down [m, out] -> [m]."""
    return scores.sum(axis=1) if module == "down_proj" else scores.sum(axis=0)


def num_attention_units(num_heads: int, num_kv_heads: int, unit: AttnUnit) -> int:
    return num_kv_heads if unit == "kv_group" else num_heads


def head_mask_from_units(unit_mask: jnp.ndarray, num_heads: int, num_kv_heads: int, unit: AttnUnit):
    """Unit keep-mask -> per-query-head keep-mask [num_heads]."""
    if unit == "kv_group":
        return jnp.repeat(unit_mask, num_heads // num_kv_heads)
    return unit_mask


def units_from_head_mask(head_mask, num_heads: int, num_kv_heads: int, unit: AttnUnit):
    """Per-query-head keep-mask -> unit keep-mask (a KV group is kept if any of its heads is)."""
    if unit == "kv_group":
        return head_mask.reshape(num_kv_heads, num_heads // num_kv_heads).any(-1)
    return head_mask


def excluded_layers_default(num_layers: int) -> tuple[int, ...]:
    """LoRAPrune's default: layers below int(0.1·L) and the last one are never pruned."""
    return tuple(sorted(set(range(int(0.1 * num_layers))) | {num_layers - 1}))


WIDTHS = ("layerwise", "uniform", "global", "incremental")


def structured_layers(num_layers: int, exclude: str, widths: str) -> list[int]:
    """The layers structured pruning touches. ``widths='uniform'`` prunes every layer to the same kept
    counts (a stock-config model); excluding layers then is an error. ``'layerwise'`` follows
    ``--exclude-layers`` (LoRAPrune / LLM-Pruner: the first layers and the last one keep full width).
    ``'global'`` ranks the units of every layer not listed in ``exclude`` ('default': none) against each
    other (``masks.global_structured_masks``), so the widths follow the scores; ``'incremental'`` prunes those
    layers at ratios rising with depth (``masks.incremental_ratios``, SlimGPT)."""
    if widths in ("global", "incremental"):
        return prunable_layers(num_layers, "none" if exclude == "default" else exclude)
    layers = prunable_layers(num_layers, exclude)  # validates the indices either way
    if widths == "layerwise":
        return layers
    if widths != "uniform":
        raise UserError(f"expected one of {', '.join(WIDTHS)}", field="widths", value=widths)
    if exclude not in ("default", "none", "") and len(layers) < num_layers:
        raise UserError(f"keeps layers at full width, which {field_ref('widths')} uniform does not allow: drop "
                        f"{field_ref('widths')} uniform for {field_ref('widths')} layerwise", field="exclude_layers",
                        value=exclude)
    return list(range(num_layers))


def prunable_layers(num_layers: int, exclude: str) -> list[int]:
    """The layers structured pruning may touch for ``--exclude-layers``: 'default' (LoRAPrune's
    ``excluded_layers_default``), 'none', or comma-separated indices never pruned."""
    if exclude == "default":
        excluded = set(excluded_layers_default(num_layers))
    elif exclude in ("none", ""):
        excluded = set()
    else:
        try:
            excluded = {int(x) for x in str(exclude).split(",") if x.strip()}
        except ValueError:
            raise UserError("expected comma-separated integers, 'none' or 'default'", field="exclude_layers",
                            value=exclude) from None
        bad = [i for i in excluded if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"layer {bad[0]} out of range 0..{num_layers - 1}", field="exclude_layers",
                            value=exclude)
    return [i for i in range(num_layers) if i not in excluded]
