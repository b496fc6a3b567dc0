"""The training objective: next-token cross-entropy of the partitioned model, or distillation from the
unpruned model, and the micro-batch mean that gradient accumulation uses.

    loss_fn(trainable, frozen, masks, tokens [B, S]) -> (mean NLL over B·(S-1) predicted positions, n)
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..model import causal_lm_loss
from ..partition import combine


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from the unpruned model (Minitron: Muralidharan et al. 2024, arXiv 2407.14679;
    Hinton et al. 2015): ``loss = (1 - α)·CE(student) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``, the KL
    averaged over predicted positions. The teacher is the same frozen base with every structured mask on
    and the LoRA factors off, computed in the same step: no second copy of the weights."""
    alpha: float = 0.5
    temperature: float = 1.0


def distillation_loss(student_logits, teacher_logits, tokens, alpha: float, temperature: float):
    """(loss, n): logits [B, S, V] (fp32), tokens [B, S]; see ``DistillConfig``."""
    ce, n = causal_lm_loss(student_logits, tokens)
    T = temperature
    s = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32) / T, axis=-1)
    t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits[:, :-1]).astype(jnp.float32) / T, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1).mean()
    return (1.0 - alpha) * ce + alpha * T * T * kl, n


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_loss_fn(graphdef, compute_dtype=None, distill: DistillConfig | None = None):
    """loss(trainable, frozen, masks, tokens [B, S]) -> (mean NLL, n tokens); with ``distill``, the
    distillation objective against the unpruned frozen base (``DistillConfig``)."""
    def loss_fn(trainable, frozen, masks, tokens):
        if compute_dtype is not None:
            trainable, frozen = _cast_floats(trainable, compute_dtype), _cast_floats(frozen, compute_dtype)
        logits = combine(graphdef, frozen, trainable, masks)(tokens)
        if distill is None:
            return causal_lm_loss(logits, tokens)
        teacher = combine(graphdef, frozen, jax.tree.map(jnp.zeros_like, trainable),
                          jax.tree.map(jnp.ones_like, masks))
        return distillation_loss(logits, teacher(tokens), tokens, distill.alpha, distill.temperature)
    return loss_fn


def mean_over_microbatches(fn, batches):
    """The mean of the pytree ``fn(b)`` over the leading axis of ``batches`` [k, ...], scanned so that one
    micro-batch's activations are live at a time (gradient accumulation: summed, then divided by k)."""
    def body(acc, b):
        return jax.tree.map(jnp.add, acc, fn(b)), None

    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fn, batches[0]))
    total, _ = jax.lax.scan(body, zeros, batches)
    return jax.tree.map(lambda t: t / batches.shape[0], total)
