"""FLAP (An et al., AAAI 2024, arXiv 2312.11983; CASIA-IVA-Lab/FLAP ``lib/prune.py`` ``prune_flap`` / ``compress``,
``lib/layerwrapper.py`` ``BiasGPT``): retraining-free structured pruning by the fluctuation of each channel's
input, with the lost mean output folded into a bias.

Statistics, from the unpruned model on the calibration sequences, of the input ``x`` [tokens, in] of ``o_proj``
(in = H·D: heads) and ``down_proj`` (in = m: MLP channels) of every layer, per sequence n (T tokens)::

    μ_n = μ_{n−1}·(n−1)/n + mean_t x / n                     running mean (BiasGPT.baseline_inp)
    F_1 = 0,  F_n = F_{n−1}·(n−2)/(n−1) + Σ_t (x_t − μ_n)² / n  running fluctuation (BiasGPT.fluc_inp; the
                                                               first sequence only seeds the mean, as there)
    WIFV_j = F_j · ‖W[j, :]‖²        (our W [in, out]: input channel j's row)
    attention: WIFV², z-scored over the layer's H·D channels, then the mean over each unit's channels;
    MLP:       WIFV, z-scored over the layer's m channels

The paper's allocation is one threshold over every layer and both modules, each unit weighted by its parameters
(``--widths global``, AL-AM; ``masks.global_structured_masks``: GQA units cost what they hold, where the official
code assumes multi-head attention with head_dim 128). Measured on SmolLM2-135M (README, "The best pruned model
for a budget") the global allocation is the worst of the three here, so FLAP's default is ``--widths uniform``
(every layer pruned alike: a stock transformers model). Then the bias compensation (``compress``)::

    b_out = Σ_{j pruned} μ_j · W[j, :]        on o_proj and down_proj

so that a pruned channel's mean contribution stays. The exported model is a stock LLaMA with
``attention_bias`` / ``mlp_bias`` (q, k, v, gate, up biases zero).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from .masks import standardise
from .registry import STRUCTURED, ScoreInputs, StructuredCriterion
from .taps import TAPPED, sums_and_squares, unit_input_stats

def running_statistics(s1: np.ndarray, s2: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """BiasGPT's running (mean μ [in], fluctuation F [in]) from per-sequence sums ``s1``, ``s2`` [n, in]."""
    mean = np.zeros(s1.shape[1])
    fluc = np.zeros(s1.shape[1])
    for n in range(1, len(s1) + 1):
        mean = mean * (n - 1) / n + s1[n - 1] / tokens / n
        if n > 1:  # Σ_t (x_t − μ)² = Σx² − 2μΣx + Tμ²
            fluc = fluc * (n - 2) / (n - 1) + (s2[n - 1] - 2 * mean * s1[n - 1] + tokens * mean * mean) / n
    return mean, fluc


def flap_statistics(x: ScoreInputs) -> list[dict]:
    """Per layer {attn, mlp: (μ [in], F [in])}, memoised in ``x.cache``."""
    if "flap" not in x.cache:
        chunks = unit_input_stats(x, sums_and_squares, "flap")
        tokens = np.asarray(x.calib).shape[1]
        x.cache["flap"] = [
            {key: running_statistics(np.concatenate([np.asarray(c[li][key][0], np.float64) for c in chunks]),
                                     np.concatenate([np.asarray(c[li][key][1], np.float64) for c in chunks]), tokens)
             for _, _, key in TAPPED}
            for li in range(x.cfg.num_layers)]
    return x.cache["flap"]


def _row_norms(frozen: dict, i: int, block: str, name: str) -> np.ndarray:
    w = np.asarray(frozen["layers"][i][block][name]["kernel"], np.float64)  # [in, out]
    return (w * w).sum(axis=1)


def flap_scores(x: ScoreInputs):
    """Standardised WIFV per unit (module docstring): ([attention units] per layer, [MLP channels] per layer)."""
    cfg, stats, frozen = x.cfg, flap_statistics(x), x.frozen_arrays()
    attn, mlp = [], []
    for i in range(cfg.num_layers):
        H, KV, D = cfg.heads(i), cfg.kv_heads(i), cfg.head_dim
        if H:
            chan = standardise((stats[i]["attn"][1] * _row_norms(frozen, i, "self_attn", "o_proj")) ** 2)
            per_head = chan.reshape(H, D).mean(axis=1)
            attn.append(per_head if x.unit == "q_head" else per_head.reshape(KV, H // KV).mean(axis=1))
        else:
            attn.append(np.zeros(0))
        m = cfg.mlp_width(i)
        mlp.append(standardise(stats[i]["mlp"][1] * _row_norms(frozen, i, "mlp", "down_proj")) if m else np.zeros(0))
    return tuple(attn), tuple(mlp)


def flap_biases(x: ScoreInputs, masks) -> dict[tuple, np.ndarray]:
    """{(layer, block, name, 'bias'): b [hidden]}: ``Σ_{j pruned} μ_j · W[j, :]`` on o_proj / down_proj (``compress``)."""
    cfg, stats, frozen = x.cfg, flap_statistics(x), x.frozen_arrays()
    d = nnx.to_pure_dict(masks)
    out = {}
    for i in range(cfg.num_layers):
        H, KV, D = cfg.heads(i), cfg.kv_heads(i), cfg.head_dim
        head_keep = np.asarray(d["layers"][i]["self_attn"]["head_mask"], bool)
        pruned = {"attn": ~np.repeat(head_keep, D) if H else np.zeros(0, bool),
                  "mlp": ~np.asarray(d["layers"][i]["mlp"]["channel_mask"], bool)}
        for block, name, key in TAPPED:
            w = np.asarray(frozen["layers"][i][block][name]["kernel"], np.float64)
            mean = stats[i][key][0]
            out[(i, block, name, "bias")] = (mean * pruned[key]) @ w if w.size else np.zeros(cfg.hidden_size)
    return out


NAME = "flap"

STRUCTURED.register(StructuredCriterion(
    NAME, "fluctuation of each channel's input × ‖W row‖² (WIFV), z-scored per layer, one global threshold, "
    "bias compensation; retraining-free", flap_scores, ("calibration",),
    citation="An et al. 2024, arXiv 2312.11983 (CASIA-IVA-Lab/FLAP prune_flap, BiasGPT)",
    normalised=True, default_widths="uniform", compensate=flap_biases, compensates=("bias",)))
