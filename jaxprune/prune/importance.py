"""Importance of structured units: LoRA-guided (LoRAPrune), Taylor (LLM-Pruner), magnitude, random.

All functions work on pure nested dicts (``nnx.to_pure_dict`` of the pytrees) and are
jit-friendly. They return per-layer unit scores::

    UnitScores = (attn: tuple[[n_attn_units_l]] , mlp: tuple[[m_l]])   one entry per layer

LoRAPrune (Zhang et al. 2023, arXiv 2305.18403, eq. 6-8; aim-uofa/LoRAPrune ``utils.py``).
With the merged weight W' = W + s·A@B (ours: A [in, r], B [r, out]) and one SGD step of
size 1 on the LoRA factors, the change of the merged weight is
s·[(A − ∇A)(B − ∇B) − AB], so its gradient is estimated from LoRA alone as

    G = ∇A·B + A·∇B − ∇A·∇B          (up to the factor s, which per-module normalisation removes)

and the element importance is the first-order Taylor term ``|G ⊙ W'|``. Elements are summed per
unit in each module, each module's vector is L2-normalised, and the modules of a group
(q, k, v, o / gate, up, down) are summed. No gradient of a base weight is ever formed.

LLM-Pruner (Ma et al. 2023; horseee/LLM-Pruner ``taylor`` importance, ``param_first``):
element importance ``|W ⊙ ∂L/∂W|`` from base-weight gradients, summed over every element of the
unit's coupled weights (group reduction "sum").
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from .groups import ATTN_MODULES, MLP_MODULES, AttnUnit, num_attention_units, reduce_attention, reduce_mlp

UnitScores = tuple[tuple[jnp.ndarray, ...], tuple[jnp.ndarray, ...]]
# element_fn(layer, block, module) -> element scores [in, out] or None (module not scored)
ElementFn = Callable[[int, str, str], jnp.ndarray | None]


def lora_merged_grad(a, b, grad_a, grad_b):
    """Estimated gradient of the merged weight, [in, out]: ``∇A·B + A·∇B − ∇A·∇B``."""
    return grad_a @ b + a @ grad_b - grad_a @ grad_b


def base_kernel(module: dict) -> jnp.ndarray:
    """A frozen module dict's W [in, out]; int8 kernels dequantised (``q · s``, see quantize.py)."""
    if "kernel_scale" in module:
        from ..quantize import dequantize
        return dequantize(module["kernel"], module["kernel_scale"].astype(jnp.float32))
    return module["kernel"]


def _l2_normalise(v):
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
                total = total + (_l2_normalise(v) if normalise_modules else v)
        attn.append(total)
        total = jnp.zeros((cfg.mlp_width(i),), jnp.float32)
        for m in MLP_MODULES:
            s = element_fn(i, "mlp", m)
            if s is not None and cfg.mlp_width(i):
                v = reduce_mlp(m, s.astype(jnp.float32))
                total = total + (_l2_normalise(v) if normalise_modules else v)
        mlp.append(total)
    return tuple(attn), tuple(mlp)


def lora_guided_importance(cfg: ModelConfig, trainable: dict, grads: dict, frozen: dict, unit: AttnUnit,
                           lora_scale: float) -> UnitScores:
    """LoRAPrune's unit importance from LoRA factors and their gradients only (see module doc).

    ``lora_scale`` is s = α / r, used to form the merged weight W' = W + s·A@B.
    """
    def element(i, block, module):
        t = trainable["layers"][i][block].get(module)
        if t is None or "lora_a" not in t:
            return None
        g = grads["layers"][i][block][module]
        a, b = t["lora_a"], t["lora_b"]
        w = base_kernel(frozen["layers"][i][block][module])
        merged = w + lora_scale * (a @ b).astype(w.dtype)
        return jnp.abs(lora_merged_grad(a, b, g["lora_a"], g["lora_b"]) * merged)
    return unit_scores(cfg, element, unit, normalise_modules=True)


def taylor_importance(cfg: ModelConfig, frozen: dict, base_grads: dict, unit: AttnUnit) -> UnitScores:
    """LLM-Pruner's first-order Taylor importance ``Σ |W ⊙ ∂L/∂W|`` per unit (no module normalisation)."""
    def element(i, block, module):
        w = frozen["layers"][i][block][module]["kernel"]
        g = base_grads["layers"][i][block][module]["kernel"]
        return jnp.abs(w * g)
    return unit_scores(cfg, element, unit, normalise_modules=False)


def magnitude_importance(cfg: ModelConfig, frozen: dict, unit: AttnUnit) -> UnitScores:
    """L2 norm of each unit's weights across its coupled modules: sqrt(Σ W²)."""
    def element(i, block, module):
        w = base_kernel(frozen["layers"][i][block][module])
        return jnp.square(w.astype(jnp.float32))
    attn, mlp = unit_scores(cfg, element, unit, normalise_modules=False)
    return tuple(jnp.sqrt(a) for a in attn), tuple(jnp.sqrt(m) for m in mlp)


def random_importance(cfg: ModelConfig, unit: AttnUnit, seed: int = 0) -> UnitScores:
    key = jax.random.key(seed)
    attn, mlp = [], []
    for i in range(cfg.num_layers):
        key, k1, k2 = jax.random.split(key, 3)
        attn.append(jax.random.uniform(k1, (num_attention_units(cfg.heads(i), cfg.kv_heads(i), unit),)))
        mlp.append(jax.random.uniform(k2, (cfg.mlp_width(i),)))
    return tuple(attn), tuple(mlp)
