"""LoRAM (Zhang et al., "Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models",
ICLR 2025, arXiv 2502.13533; official code junzhang-zj/LoRAM ``loram/0_..4_*.py``): train LoRA on a
structurally pruned model, recover the factors to the original shape, infer with the original model.

With W0 the original weights and P the structured pruning (kept heads / KV heads / MLP channels)::

    W^P   = P(W0)                            pruned full-rank weights: kept rows / columns of W0
                                              (``0_pruned_full_rank_weight_generation.py``; here ``shrink``)
    W^P*  = W^P + ΔW                         optional alignment: full-rank continual pre-training of the
                                              pruned model on general text, lm_head frozen
                                              (``1_pruned_full_rank_weight_alignment.py``; :func:`partition_align`)
    A^P, B^P = argmin L(W^P* + s·A^P B^P)    LoRA on the small model (``2_pruned_low_rank_matrix_training.py``),
                                              optionally on an int8 W^P* (QLoRAM)
    A^R, B^R = R(A^P), R(B^P)                recovery: the factor that carries the pruned axis is scattered
                                              back through the kept indices, zeros at pruned units
                                              (``3_recovered_low_rank_matrix_generation.py``, ``zeroA``, its default)
    W*    = W0 + s·A^R B^R                   inference with the ORIGINAL weights (neither W^P nor W^P*)

Which factor carries the pruned axis, in our ``[in, out]`` layout (A [in, r], B [r, out])::

    q/k/v/gate/up   units are output columns:  B^R [r, n] = 0;  B^R[:, kept] = B^P;   A^R = A^P
    o/down          units are input rows:      A^R [n, r] = 0;  A^R[kept, :] = A^P;   B^R = B^P

(the official script, in PEFT's A [r, in] / B [out, r], fills ``down/o lora_A`` columns and
``q/k/v/gate/up lora_B`` rows: the same thing transposed). Hence ``(A^R B^R)[kept block] = A^P B^P`` and
the update is zero on every row / column of a pruned unit: W* keeps W0 there.

Adapters other than LoRA (``loram --adapter``, ``jaxprune.adapters``) are recovered by the same rule, stated on the
update: with ΔW^P the trained layer's update evaluated on P(W0) (the base the full model infers with), ::

    W*[kept block] = P(W0) + ΔW^P          W*[pruned rows / columns] = W0          (ΔW^R = scatter(ΔW^P), 0 elsewhere)

* additive adapters (``Linear.low_rank()`` is the whole update s·A@B, whatever the base): SparseAdapter
  (A⊙M_A, B⊙M_B: the fixed support is scattered with the factor, False at pruned units), Bone (E, D), RandLoRA
  (U, V composed from the shared bases): their effective factors are scattered exactly as LoRA's;
* DoRA (the update depends on the base through ‖V‖_c): on q/k/v/gate/up (pruned output columns) this is DoRA on
  W0 itself with B scattered and the magnitude scattered, m^R[kept] = m^P and m^R[pruned] = ‖W0[:, pruned]‖_c
  (the norm a fresh DoRA starts at, so a pruned column is W0). On o/down (pruned input rows) m is per output
  feature of the whole column and would rescale the pruned rows too: no m^R gives both the pruned layer on the
  kept rows and W0 on the pruned ones, so the recovered layer is the merged W* above, not a DoRA layer.

Neither RandLoRA's nor Bone's own form survives pruning in general, so they are recovered as their update.
RandLoRA (ΔW = s·Σ_j B_j Λ_j A Γ_j, A on the smaller side of the layer, B_j on the larger, one frozen copy of the
bases for the model, sliced by prefix): even if the pruned model drew the dense bases restricted to its kept units
(A[:, kept] or B_j[kept]), (1) where the pruned axis is B's side (gate/up/down at moderate ratios: the hidden size
stays the smaller side) the full layer's B_j Λ_j A Γ_j is not zero on the pruned rows / columns, and B_j, shared by
every layer, cannot be zeroed there; (2) where pruning flips the smaller side (q: in = out in the full layer, out
smaller once pruned; any layer pruned below the hidden size) A acts on the other axis and n = ⌈min(in, out)/r⌉
changes, so λ [r, n^P], γ [n^P, min^P] have no place in the full layer's λ, γ. Only o/k/v (pruned axis on A's side
in both shapes: scatter γ, zero λ of the extra bases) would keep the form, with a per-layer gather of the bases.
Bone: on o/down ΔW[i, o] = D[i mod r, o] runs over the kept rows renumbered 0..n_kept-1, which is no Bone update of
the full rows (that one would also touch the pruned rows); on q/k/v/gate/up D's columns scatter and the form
survives. The recovered model therefore carries no adapter layers: LoRA is recovered as factors (merged with
``--merge``), every other adapter merged into W*, as ``finetune`` saves those adapters (a checkpoint records LoRA
factors only). An adapter that declares ``Adapter.unsupported`` ``loram`` is refused before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..adapters import adapter_of
from ..config import ModelConfig
from ..errors import UserError
from ..layers import Linear
from ..model import LlamaForCausalLM
from ..weights import KeyPath, linears, lora_spec, model_arrays, model_from_arrays, weight_mask_paths
from .groups import UNIT_AXIS
from .shrink import kept_indices, shrink

HEAD_MASK, CHANNEL_MASK = ("self_attn", "head_mask"), ("mlp", "channel_mask")


# ---- units: which heads / channels the pruner kept ---------------------------------------------------
def units_from_masks(masks: nnx.State | Mapping) -> dict:
    """``{"head_mask": [[bool] per layer], "channel_mask": [...]}`` (JSON-able) from a masks pytree."""
    d = masks if isinstance(masks, Mapping) and "layers" in masks else nnx.to_pure_dict(masks)
    layers = [d["layers"][i] for i in sorted(d["layers"])]
    return {"head_mask": [np.asarray(l["self_attn"]["head_mask"], bool).tolist() for l in layers],
            "channel_mask": [np.asarray(l["mlp"]["channel_mask"], bool).tolist() for l in layers]}


def mask_arrays(units: dict) -> dict[KeyPath, np.ndarray]:
    """The units as model arrays: ``('layers', i, 'self_attn', 'head_mask')`` -> [H] bool, likewise MLP."""
    out = {}
    for i, (hm, cm) in enumerate(zip(units["head_mask"], units["channel_mask"])):
        out[("layers", i) + HEAD_MASK] = np.asarray(hm, bool).reshape(-1)
        out[("layers", i) + CHANNEL_MASK] = np.asarray(cm, bool).reshape(-1)
    return out


def unit_columns(units_idx: np.ndarray, width: int) -> np.ndarray:
    """Indices of ``width``-wide blocks (heads of ``head_dim`` columns): [n] -> [n·width]."""
    return (np.asarray(units_idx)[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def kept_linear_indices(cfg: ModelConfig, layer: int, head_mask, channel_mask) -> dict[str, np.ndarray]:
    """{linear name: kept indices along its unit axis (``groups.UNIT_AXIS``)} of one layer of the FULL model."""
    hm = np.asarray(head_mask, bool)
    empty = np.zeros(0, np.int64)
    q_heads, kv_heads = kept_indices(hm, cfg.kv_heads(layer)) if len(hm) else (empty, empty)
    q, kv = unit_columns(q_heads, cfg.head_dim), unit_columns(kv_heads, cfg.head_dim)
    ch = np.flatnonzero(np.asarray(channel_mask, bool))
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": q, "gate_proj": ch, "up_proj": ch, "down_proj": ch}


# ---- W^P = P(W0) and the alignment split --------------------------------------------------------------
def host_arrays(model: nnx.Module) -> dict[KeyPath, np.ndarray]:
    """Every Variable of the model as a host numpy array (W0 kept off the accelerator while the small
    model trains)."""
    return {p: np.asarray(v) for p, v in model_arrays(model).items()}


def check_dense(model: LlamaForCausalLM) -> None:
    """LoRAM here prunes structurally from a plain dense model: no LoRA factors, no element masks."""
    if weight_mask_paths(model):
        raise UserError("loram: the model carries element (weight) masks; start from a dense model")
    if lora_spec(model):
        raise UserError("loram: the model carries LoRA factors; merge them first (jaxprune finetune --merge)")


def pruned_model(cfg: ModelConfig, w0: Mapping[KeyPath, np.ndarray], units: dict, dtype) -> LlamaForCausalLM:
    """W^P = P(W0): the original weights with the units' masks set, physically shrunk (``shrink``)."""
    arrays = {**w0, **mask_arrays(units)}
    return shrink(model_from_arrays(cfg, arrays, dtype=dtype, source="loram"))


def partition_align(model: nnx.Module):
    """-> graphdef, frozen, trainable, masks for full-rank alignment: every decoder-layer weight and the
    final norm train; embeddings and lm_head stay frozen (the official script freezes lm_head, which
    SmolLM2 ties to the embeddings)."""
    trainable_filter = nnx.All(nnx.Param, lambda path, _: path[0] in ("layers", "norm"))
    graphdef, trainable, masks, frozen = nnx.split(model, trainable_filter, nnx.Not(nnx.Param), ...)
    return graphdef, frozen, trainable, masks


# ---- recovery: R(A^P), R(B^P) -----------------------------------------------------------------------
def recover_factors(a: np.ndarray, b: np.ndarray, kept: np.ndarray, full: int, unit_axis: int):
    """(A^R, B^R) of one linear: ``unit_axis`` 1 (units are output columns) scatters B [r, n_kept] into
    zeros [r, full] at columns ``kept``; 0 (input rows) scatters A [n_kept, r] into zeros [full, r]."""
    a, b = np.asarray(a), np.asarray(b)
    if unit_axis == 1:
        return a, scatter_units(b, kept, full, 1)
    return scatter_units(a, kept, full, 0), b


def recovered_lora(small: LlamaForCausalLM, full_cfg: ModelConfig, units: dict) -> dict[KeyPath, np.ndarray]:
    """``{path + ('lora_a' | 'lora_b'): array}`` in the full model's shapes, for every LoRA of ``small``."""
    out = {}
    for path, layer in linears(small):
        if not layer.has_lora:
            continue
        a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
        where = unit_axis_of(full_cfg, units, path)
        if where is not None:  # LoRA outside the decoder linears (none by default) has no pruned axis
            a, b = recover_factors(a, b, *where)
        out[path + ("lora_a",)], out[path + ("lora_b",)] = a, b
    return out


def unit_axis_of(cfg: ModelConfig, units: dict, path: KeyPath) -> tuple[np.ndarray, int, int] | None:
    """(kept indices, full width, unit axis) of the decoder linear at ``path`` of the full model; None for a
    linear without a pruned axis (``lm_head``)."""
    if path[0] != "layers" or len(path) != 4 or path[3] not in UNIT_AXIS:
        return None
    i, name = int(path[1]), path[3]
    kept = kept_linear_indices(cfg, i, units["head_mask"][i], units["channel_mask"][i])[name]
    return kept, full_width(cfg, i, name), UNIT_AXIS[name]


def is_additive(layer: Linear) -> bool:
    """The layer's whole update is ``s·A@B`` of ``low_rank()``, whatever its base (LoRA, SparseAdapter, Bone,
    RandLoRA): it keeps ``Linear``'s ``merged_kernel`` and ``adapted_kernel`` (DoRA overrides the first)."""
    cls = type(layer)
    return cls.merged_kernel is Linear.merged_kernel and cls.adapted_kernel is Linear.adapted_kernel


def scatter_units(x: np.ndarray, kept: np.ndarray, full: int, unit_axis: int) -> np.ndarray:
    """``x`` with its ``unit_axis`` (n_kept long) put at positions ``kept`` of a zero array ``full`` long there: a
    factor carrying the pruned axis (``recover_factors``) or a layer's whole update ΔW^P [in_p, out_p] -> ΔW^R."""
    x, kept = np.asarray(x), np.asarray(kept)
    if x.shape[unit_axis] != len(kept):
        raise UserError(f"loram: {x.shape[unit_axis]} pruned units but {len(kept)} kept indices")
    shape = list(x.shape)
    shape[unit_axis] = full
    out = np.zeros(shape, x.dtype)
    if unit_axis == 1:
        out[:, kept] = x
    else:
        out[kept] = x
    return out


def update_on_base(layer: Linear, base: np.ndarray) -> np.ndarray:
    """ΔW^P [in, out] (float32) of a trained adapter layer evaluated on the float ``base`` [in, out] instead of
    the one it trained on (W^P, aligned or int8): ``merged_kernel()`` of a copy holding ``base``, minus ``base``.
    Additive layers give ``s·A@B`` exactly (no base added and taken away)."""
    if is_additive(layer):
        a, b, s = layer.low_rank()
        return s * (np.asarray(a, np.float32) @ np.asarray(b, np.float32))
    probe = nnx.clone(layer)
    probe.set_float_kernel(jnp.asarray(base, jnp.float32))
    return np.asarray(probe.merged_kernel(), np.float32) - np.asarray(base, np.float32)


def recovered_update(layer: Linear, w0_kernel: np.ndarray, where) -> np.ndarray:
    """ΔW^R [in, out] of one trained layer of the pruned model in the full model's shape (float32): its update on
    P(W0) (the kept columns / rows of W0) scattered to the kept units, zeros at the pruned ones. For an additive
    adapter this is its effective factors scattered as LoRA's (a SparseAdapter's support, Bone's E, RandLoRA's
    composed bases): the zero rows / columns add nothing to the product."""
    if where is None:  # no pruned axis: the layer has its full shape
        return update_on_base(layer, w0_kernel)
    kept, full, axis = where
    return scatter_units(update_on_base(layer, np.take(np.asarray(w0_kernel, np.float32), kept, axis=axis)), kept,
                         full, axis)


def full_width(cfg: ModelConfig, layer: int, name: str) -> int:
    """Length of ``name``'s unit axis in the full model (columns of q/k/v/gate/up, rows of o/down)."""
    if name in ("q_proj", "o_proj"):
        return cfg.heads(layer) * cfg.head_dim
    if name in ("k_proj", "v_proj"):
        return cfg.kv_heads(layer) * cfg.head_dim
    return cfg.mlp_width(layer)


def recover_full_model(cfg: ModelConfig, w0: Mapping[KeyPath, np.ndarray], small: LlamaForCausalLM, units: dict,
                       dtype) -> LlamaForCausalLM:
    """The original model with the adapter ``small`` trained, recovered (module docstring). LoRA: W* = W0 +
    s·A^R B^R carried as factors (same rank and α as ``small``'s; ``weights.merge_lora`` or any export folds
    them in). Any other adapter: the merged W* = W0 + ΔW^R, no adapter layers."""
    trained = [(p, l) for p, l in linears(small) if adapter_of(l) is not None]
    if not trained:
        raise UserError("loram: the trained pruned model has no LoRA factors")
    arrays = {p: v for p, v in w0.items() if p[-1] not in ("lora_a", "lora_b")}
    if all(adapter_of(l) == "lora" for _, l in trained):
        arrays.update(recovered_lora(small, cfg, units))
        return model_from_arrays(cfg, arrays, dtype=dtype, lora=lora_spec(small), source="loram")
    for path, layer in trained:
        k = path + ("kernel",)
        w = np.asarray(arrays[k], np.float32)
        arrays[k] = w + recovered_update(layer, w, unit_axis_of(cfg, units, path))
    return model_from_arrays(cfg, arrays, dtype=dtype, source="loram")


def describe_units(cfg: ModelConfig, units: dict, layers=None) -> dict:
    """Kept query heads / MLP channels per layer; the fractions pruned over ``layers`` (default: all), as
    ``masks.structured_sparsity`` reports them."""
    heads = [int(np.sum(h)) for h in units["head_mask"]]
    chans = [int(np.sum(c)) for c in units["channel_mask"]]
    layers = range(cfg.num_layers) if layers is None else layers
    total_h, total_c = sum(cfg.heads(i) for i in layers), sum(cfg.mlp_width(i) for i in layers)
    return {"kept_heads": heads, "kept_channels": chans,
            "heads_pruned": 1 - sum(heads[i] for i in layers) / max(total_h, 1),
            "channels_pruned": 1 - sum(chans[i] for i in layers) / max(total_c, 1)}

