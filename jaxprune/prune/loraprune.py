"""LoRAPrune: importance moving average inside the train step, masks set by the cubic schedule.

    hook = importance_hook(cfg, unit, lora_scale)          # a train.GradHook
    step = make_train_step(graphdef, optimizer, grad_hook=hook)
    ... after step t: if schedule.is_prune_step(t): masks = update_structured_masks(masks, ema, s(t), ...)

The hook runs in the same jit as the LoRA update and reads only LoRA factors, their
gradients and the frozen weights: no second backward, no base-weight gradient.
Moving average (LoRAPrune eq. 9): ``Ḡ ← β·Ḡ + (1 − β)·Ĝ`` with β = 0.9; an update whose
scores hold a NaN / inf is skipped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from .groups import AttnUnit, num_attention_units
from .importance import lora_guided_importance


class ImportanceState(NamedTuple):
    """Moving averages of unit importance, one array per layer; ``updates`` counts accepted updates."""
    attn: tuple
    mlp: tuple
    updates: jax.Array


def init_importance(cfg: ModelConfig, unit: AttnUnit) -> ImportanceState:
    attn = tuple(jnp.zeros((num_attention_units(cfg.heads(i), cfg.kv_heads(i), unit),), jnp.float32)
                 for i in range(cfg.num_layers))
    mlp = tuple(jnp.zeros((cfg.mlp_width(i),), jnp.float32) for i in range(cfg.num_layers))
    return ImportanceState(attn, mlp, jnp.zeros((), jnp.int32))


def ema_update(state: ImportanceState, scores, beta: float) -> ImportanceState:
    """β·old + (1 − β)·new, or old unchanged when any new score is not finite."""
    attn, mlp = scores
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in (*attn, *mlp)]))
    mix = lambda old, new: jnp.where(ok, beta * old + (1.0 - beta) * new, old)  # noqa: E731
    return ImportanceState(tuple(map(mix, state.attn, attn)), tuple(map(mix, state.mlp, mlp)),
                           state.updates + ok.astype(jnp.int32))


def importance_hook(cfg: ModelConfig, unit: AttnUnit, lora_scale: float, beta: float = 0.9):
    """A train.GradHook that folds LoRA-guided importance into an ImportanceState."""
    def hook(state: ImportanceState, trainable, grads, frozen, masks, step):
        scores = lora_guided_importance(cfg, nnx.to_pure_dict(trainable), nnx.to_pure_dict(grads),
                                        nnx.to_pure_dict(frozen), unit, lora_scale)
        return ema_update(state, scores, beta)
    return hook
