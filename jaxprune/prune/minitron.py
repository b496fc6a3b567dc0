"""Minitron width importance (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation", arXiv 2407.14679; NVIDIA Model-Optimizer, ``modelopt/torch/nas/plugins/megatron.py``
``_DynamicMLP._linear_fc2_forward_hook`` / ``_estimate_importance`` and ``_DynamicSelfAttention.
_linear_proj_forward_hook`` / ``_estimate_all_head_importance`` / ``_estimate_query_group_importance``; now
``modelopt/torch/prune/plugins/mcore_minitron.py``): activation-based importance of heads and MLP channels from
a forward pass of the unpruned model over the calibration sequences, no gradients.

The input ``x`` [B, S, in] of ``o_proj`` (in = H·D: heads; the attention output per head) and of ``down_proj``
(in = m: MLP channels, ``act(gate)·up``) of every layer is tapped, and per input channel j, over the calibration
sequences b (their hooks: ``input.abs().mean(dim=0)`` over the sequence, ``.pow(2).sum(dim=0)`` over the batch,
summed over batches, ``.pow(0.5)`` at the end)::

    a_j = sqrt( Σ_b ( mean_t |x_{b,t,j}| )² )           the L2 norm over the batch of the mean |·| over the sequence

    MLP channel j:  F_j = a_j                                              (_estimate_importance)
    query head h:   F_h = ‖a[h·D:(h+1)·D]‖₂                                (_estimate_all_head_importance)
    KV group g:     F_g = ‖a over the channels of the group's G = H/KV query heads‖₂ = sqrt(Σ_{h in g} F_h²)

``--attn-unit q_head`` (the paper's GQA head pruning, their ``attn_head_importance.view(n_groups,
heads_per_group).argsort`` per group): the same number of query heads is removed from every KV group, the lowest
F_h of each group (``masks.prune_attention_units``). ``--attn-unit kv_group`` (their ``num_query_groups``):
whole KV heads with their query heads go, scored as their ``_estimate_query_group_importance`` reduces query
groups, the L2 norm over every channel of the group's heads (``vector_norm(..., dim=(0, 2))``). Their code views
the channels as [heads_per_group, groups, D] there, i.e. gathers heads h ≡ g (mod KV), while its per-group head
ranking (and Megatron's / transformers' GQA layout, query head h reading KV head h // G) take heads g·G … g·G+G−1;
we use the latter, the heads that really share the KV head (the current Model-Optimizer no longer prunes query
groups).

Selection is the lowest scores of each layer; the published allocation is every layer pruned to the same width
(their NAS hparams ``ffn_hidden_size`` / ``num_heads_per_group`` are global), ``--widths uniform`` by default.
Recovery (the paper: logit distillation from the unpruned teacher) is the shared LoRA recovery, with
``--distill`` for the KL-to-the-base objective. Out of scope: embedding-channel (hidden size) pruning (their
``hidden_size`` importance over the LayerNorm outputs: jaxprune's units never shrink the residual stream), depth
pruning and the architecture search over candidates.
"""

from __future__ import annotations

import numpy as np

from .registry import STRUCTURED, ScoreInputs, StructuredCriterion
from .taps import TAPPED, mean_abs, unit_input_stats

def minitron_activations(x: ScoreInputs) -> list[dict]:
    """Per layer {attn: a [H·D], mlp: a [m]}: ``sqrt(Σ_b (mean_t |x_b,t|)²)`` over the calibration sequences,
    memoised in ``x.cache``."""
    if "minitron" not in x.cache:
        parts = unit_input_stats(x, mean_abs, "minitron")
        x.cache["minitron"] = [
            {key: np.sqrt(sum((np.asarray(p[li][key], np.float64) ** 2).sum(axis=0) for p in parts))
             for _, _, key in TAPPED}
            for li in range(x.cfg.num_layers)]
    return x.cache["minitron"]


def minitron_scores(x: ScoreInputs):
    """([attention units] per layer, [MLP channels] per layer): the module docstring's F."""
    cfg, acts = x.cfg, minitron_activations(x)
    attn, mlp = [], []
    for i in range(cfg.num_layers):
        H, KV, D = cfg.heads(i), cfg.kv_heads(i), cfg.head_dim
        if H:
            sq = (acts[i]["attn"] ** 2).reshape(H, D).sum(axis=1)  # ‖a‖² per query head
            attn.append(np.sqrt(sq if x.unit == "q_head" else sq.reshape(KV, H // KV).sum(axis=1)))
        else:
            attn.append(np.zeros(0))
        mlp.append(acts[i]["mlp"] if cfg.mlp_width(i) else np.zeros(0))
    return tuple(attn), tuple(mlp)


STRUCTURED.register(StructuredCriterion(
    "minitron", "activation magnitude: per channel the L2 norm over calibration sequences of the mean |input| of "
    "o_proj / down_proj, L2 over a head's channels; every layer to the same width (no gradients)",
    minitron_scores, ("calibration",),
    citation="Muralidharan et al. 2024, arXiv 2407.14679 (NVIDIA Model-Optimizer "
             "modelopt/torch/nas/plugins/megatron.py importance hooks)",
    default_widths="uniform"))
