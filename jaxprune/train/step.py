"""The generic jitted train and eval steps on partitioned pytrees, and the state they change.

    step(trainable, opt_state, hook_state, frozen, masks, batch, step_index)
        -> trainable, opt_state, hook_state, metrics {"loss", "grad_norm"}

Gradients are taken w.r.t. ``trainable`` only. ``batch`` is [accum, micro_batch, seq_len];
micro-batches are scanned and their gradients averaged (gradient accumulation). A
``GradHook`` sees the averaged gradients of the trainable factors inside the same jit
(LoRAPrune's importance estimate is one), before the optimizer update.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import optax

from ..meshes import activation_mesh, mesh_of
from .loss import DistillConfig, make_loss_fn, mean_over_microbatches


class GradHook(Protocol):
    """Reads the trainable gradients inside the jitted step (e.g. LoRAPrune's importance EMA)."""

    def __call__(self, hook_state, trainable, grads, frozen, masks, step) -> Any: ...


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, grad_hook: GradHook | None = None,
                    compute_dtype=None, donate: bool = True, state_shardings=None,
                    distill: DistillConfig | None = None, mask_fn=None):
    """The jitted pure train step (see module docstring).

    ``mask_fn(masks, step_index) -> masks``, when given, sets the masks this step trains through (DyLoRA's sampled
    rank, ``adapters/rank_allocation.py``); the state keeps its own masks.

    ``state_shardings``: (trainable, opt_state, hook_state) shardings the step returns its state with
    (``state_shardings_of``); inputs carry their own shardings, so one compile serves every step. Their mesh is
    also the one the model splits its activations' batch dimension over (``meshes.activation_mesh``).
    """
    loss_fn = make_loss_fn(graphdef, compute_dtype, distill)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    mesh = mesh_of(state_shardings)

    def step(trainable, opt_state, hook_state, frozen, masks, batch, step_index):
        with activation_mesh(mesh):
            return _step(trainable, opt_state, hook_state, frozen, masks, batch, step_index)

    def _step(trainable, opt_state, hook_state, frozen, masks, batch, step_index):
        if mask_fn is not None:
            masks = mask_fn(masks, step_index)

        def micro(tokens):
            (loss, _), g = grad_fn(trainable, frozen, masks, tokens)
            return loss, g

        loss, grads = mean_over_microbatches(micro, batch)
        if grad_hook is not None:
            hook_state = grad_hook(hook_state, trainable, grads, frozen, masks, step_index)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return trainable, opt_state, hook_state, metrics

    out_shardings = None
    if state_shardings is not None:
        out_shardings = (*state_shardings, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else (), out_shardings=out_shardings)


def make_eval_step(graphdef, compute_dtype=None, mesh=None):
    """(trainable, frozen, masks, tokens [B, S]) -> summed NLL, jitted; ``mesh``: the model's activations split
    over its batch axes (``meshes.activation_mesh``)."""
    loss_fn = make_loss_fn(graphdef, compute_dtype)

    @jax.jit
    def eval_step(trainable, frozen, masks, tokens):
        with activation_mesh(mesh):
            loss, n = loss_fn(trainable, frozen, masks, tokens)
        return loss * n
    return eval_step


class TrainState(NamedTuple):
    """Everything a step changes. ``frozen`` is never in here: it is reloaded from the base model."""
    trainable: Any
    opt_state: Any
    hook_state: Any
    masks: Any


def place_train_state(placement, optimizer, trainable, masks, hook_state=()) -> TrainState:
    """A fresh TrainState on ``placement``'s mesh; the optimizer state is created sharded (never whole)."""
    trainable, masks, hook_state = placement.put(trainable), placement.put(masks), placement.put(hook_state)
    opt_shardings = placement.tree_shardings(jax.eval_shape(optimizer.init, trainable))
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)
    return TrainState(trainable, opt_state, hook_state, masks)


def state_shardings_of(state: TrainState):
    """(trainable, opt_state, hook_state) shardings of a placed state, for ``make_train_step``."""
    return jax.tree.map(lambda x: x.sharding, (state.trainable, state.opt_state, state.hook_state))
