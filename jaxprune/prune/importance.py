"""Importance of structured units: the reduction every criterion shares, and the two data-free ones
(magnitude, random). LoRA-guided importance (LoRAPrune) is in ``loraprune.py``, Taylor importance
(LLM-Pruner) in ``llm_pruner.py``.

All functions work on pure nested dicts (``nnx.to_pure_dict`` of the pytrees) and are
jit-friendly. They return per-layer unit scores::

    UnitScores = (attn: tuple[[n_attn_units_l]] , mlp: tuple[[m_l]])   one entry per layer

Element scores ``[in, out]`` of each module are summed per unit (``groups.reduce_*``); with
``normalise_modules`` each module's unit vector is L2-normalised before the modules of a group
(q, k, v, o / gate, up, down) are summed (LoRAPrune), else summed as they are (LLM-Pruner).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..ops.int8 import dequantize
from .groups import ATTN_MODULES, MLP_MODULES, AttnUnit, num_attention_units, reduce_attention, reduce_mlp
from .registry import ScoreInputs, register_structured

UnitScores = tuple[tuple[jnp.ndarray, ...], tuple[jnp.ndarray, ...]]
# element_fn(layer, block, module) -> element scores [in, out] or None (module not scored)
ElementFn = Callable[[int, str, str], jnp.ndarray | None]


def base_kernel(module: dict) -> jnp.ndarray:
    """A frozen module dict's W [in, out]; int8 kernels dequantised (``q · s``, see quantize.py)."""
    if "kernel_scale" in module:
        return dequantize(module["kernel"], module["kernel_scale"].astype(jnp.float32))
    return module["kernel"]


def l2_normalise(v):
    return v / (jnp.linalg.norm(v) + 1e-12)


def unit_scores(cfg: ModelConfig, element_fn: ElementFn, unit: AttnUnit, *, normalise_modules: bool) -> UnitScores:
    """Reduce element scores to units for every layer; modules summed per group."""
    attn, mlp = [], []
    for i in range(cfg.num_layers):
        H, KV, D = cfg.heads(i), cfg.kv_heads(i), cfg.head_dim
        total = jnp.zeros((num_attention_units(H, KV, unit),), jnp.float32)
        for m in ATTN_MODULES:
            s = element_fn(i, "self_attn", m)
            v = None if s is None or H == 0 else reduce_attention(m, s.astype(jnp.float32), H, KV, D, unit)
            if v is not None:
                total = total + (l2_normalise(v) if normalise_modules else v)
        attn.append(total)
        total = jnp.zeros((cfg.mlp_width(i),), jnp.float32)
        for m in MLP_MODULES:
            s = element_fn(i, "mlp", m)
            if s is not None and cfg.mlp_width(i):
                v = reduce_mlp(m, s.astype(jnp.float32))
                total = total + (l2_normalise(v) if normalise_modules else v)
        mlp.append(total)
    return tuple(attn), tuple(mlp)


def magnitude_importance(cfg: ModelConfig, frozen: dict, unit: AttnUnit) -> UnitScores:
    """Magnitude baseline (LLM-Pruner's ``l2`` importance): the L2 norm of each unit's weights across its
    coupled modules, sqrt(Σ W²)."""
    def element(i, block, module):
        w = base_kernel(frozen["layers"][i][block][module])
        return jnp.square(w.astype(jnp.float32))
    attn, mlp = unit_scores(cfg, element, unit, normalise_modules=False)
    return tuple(jnp.sqrt(a) for a in attn), tuple(jnp.sqrt(m) for m in mlp)


def random_importance(cfg: ModelConfig, unit: AttnUnit, seed: int = 0) -> UnitScores:
    """Random baseline: U(0, 1) scores per unit, seeded."""
    key = jax.random.key(seed)
    attn, mlp = [], []
    for i in range(cfg.num_layers):
        key, k1, k2 = jax.random.split(key, 3)
        attn.append(jax.random.uniform(k1, (num_attention_units(cfg.heads(i), cfg.kv_heads(i), unit),)))
        mlp.append(jax.random.uniform(k2, (cfg.mlp_width(i),)))
    return tuple(attn), tuple(mlp)


@register_structured("l2", summary="L2 norm of each unit's coupled weights, no data (LLM-Pruner's l2 baseline)",
                     citation="Ma et al. 2023, arXiv 2305.11627 (horseee/LLM-Pruner, --pruner_type l2)")
def l2_scores(x: ScoreInputs) -> UnitScores:
    return magnitude_importance(x.cfg, x.frozen_arrays(), x.unit)


@register_structured("random", summary="U(0, 1) scores per unit, seeded by --seed (the floor every criterion must beat)")
def random_scores(x: ScoreInputs) -> UnitScores:
    return random_importance(x.cfg, x.unit, x.seed)
