"""The optimizer every training command uses: AdamW, linear warm-up + cosine decay, global-norm clipping."""

from __future__ import annotations

from dataclasses import dataclass

import optax


@dataclass
class OptimConfig:
    lr: float = 2e-4
    warmup_steps: int = 10
    total_steps: int = 200
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.999


def make_optimizer(c: OptimConfig, decay_mask=None) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay and global-norm clipping; ``decay_mask`` (a pytree of bools
    like the parameters, optax's ``mask``) limits weight decay to some parameters."""
    return optax.chain(optax.clip_by_global_norm(c.clip_norm) if c.clip_norm else optax.identity(),
                       optax.adamw(lr_schedule(c), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=decay_mask))


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    """Linear warm-up from 0 over ``max(warmup_steps, 1)`` steps, then cosine decay to ``lr·min_lr_ratio``
    at ``total_steps`` (at least one decay step, so a 1-step run with no warm-up is valid)."""
    warmup = max(c.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, warmup, max(c.total_steps, warmup + 1),
                                              end_value=c.lr * c.min_lr_ratio)
