"""SLoPe (Mozaffari et al. 2024, arXiv 2405.16325): 2:4 sparse pretraining with a double-pruned
backward pass and lazy low-rank adapters in the last 1% of steps.

Read off the official code (Mohammad-Mozaffari/slope: ``slope/slope.py`` ``prune_model`` and
``SLoPeMatmul``, ``optimizers/adamw_sparse.py``, ``compression/ops.py``
``ReductionDimStaticPruneWeightMatmul``), in our ``[in, out]`` layout (torch's is ``[out, in]``):

* Forward: ``y = x @ (W ⊙ M)``. ``M`` is magnitude 2:4 along the input (reduction) dim: in every
  group of 4 consecutive inputs of an output column, the 2 largest ``|W|`` are kept
  (torch ``prune_row_wise(w, n=2, m=4)`` on ``[out, in]``).
* Backward (double pruning): ``∂L/∂x = ∂L/∂y @ (W ⊙ M ⊙ M₂)ᵀ`` where ``M₂`` is 2:4 along the
  output dim of the already-pruned ``W ⊙ M`` (``prune_column_wise``), so that the transposed
  product is 2:4 too; ``∂L/∂W = (xᵀ @ ∂L/∂y) ⊙ M`` (``grad_weight[mask] = 0``). A ``jax.custom_vjp``
  (:func:`double_pruned_matmul`). With ``pretrain --impl pallas`` (``auto`` on GPU/TPU) both masked
  products run through the Pallas masked low-rank kernel (``kernels/masked_lowrank.py``, a zero rank-1
  adapter), which applies the mask per tile instead of forming ``W ⊙ M``; the backward calls it on the
  transposed weight and mask (XLA copies ``Wᵀ`` and ``M₂ᵀ`` for it); ``∂L/∂W`` stays an XLA matmul. On a
  mesh of several devices both products run under ``shard_map`` (``ops/sharded.py``: rows over data/fsdp,
  tensor-parallel layers split on tensor, the backward product with the layer's axes swapped).
* Masks: ``M`` from ``|W|`` at initialisation; both ``M`` and ``M₂`` are recomputed from the current
  magnitudes every ``mask_change_freq`` steps during the first ``refresh_frac`` of training, and
  ``M₂`` alone every ``mask_change_freq`` steps afterwards (the official sparse AdamW re-prunes the
  transposed weight at ``step % mask_change_freq == mask_change_freq - 1``). Pruned entries keep their
  last value and get no gradient, so a refresh re-admits one only when a kept weight of its group
  shrank below it.
* Lazy adapters: ``y += (x @ L) @ R / r`` with ``L ~ N(0, 1)`` [in, r], ``R = 0`` [r, out], trained
  only in the last ``adapter_frac`` (1%) of steps. The merged dense weight is ``W ⊙ M + L @ R / r``.
  Unlike the official code (which adds them to the model at that point), the adapters exist from
  step 0 but are switched off by a boolean gate in the ``masks`` pytree: a ``lax.cond`` skips their
  compute, their gradient is exactly zero, so Adam leaves them bitwise unchanged until the gate opens;
  then their moments start at zero while the Adam step count is the global one (the official
  ``on_load_checkpoint`` copies the step count the same way).
* Layers whose aspect ratio ``max(in, out) / min(in, out)`` exceeds 5 stay dense (official ``prune_model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import UserError
from ..layers import Linear, Mask
from ..ops import sharded
from ..ops.nm import nm_keep_mask
from ..ops.sharded import KernelMesh
from ..partition import combine
from ..train import LoopCallbacks
from .registry import PRETRAIN, PretrainMethod, RunHooks

N, M = 2, 4  # 2:4


def nm_mask(w: jax.Array, axis: int, n: int = N, m: int = M) -> jax.Array:
    """Keep the ``n`` largest ``|w|`` of every ``m`` consecutive entries along ``axis``: bool, w's shape.

    Ties go to the earlier entry (stable sort), so the mask is a deterministic function of ``w``.
    """
    return nm_keep_mask(jnp.abs(w), n, m, axis=axis, keep_ties="earlier")


@jax.jit
def forward_mask(w: jax.Array) -> jax.Array:
    """``M``: 2:4 along the input dim of ``w`` [in, out]."""
    return nm_mask(w, axis=0)


@jax.jit
def double_pruned_mask(w: jax.Array, fwd_mask: jax.Array) -> jax.Array:
    """``M ⊙ M₂``: ``W ⊙ M`` pruned 2:4 once more, along the output dim. [in, out] bool."""
    return fwd_mask & nm_mask(jnp.where(fwd_mask, w, 0), axis=1)


def masked_matmul(x: jax.Array, w: jax.Array, mask: jax.Array, impl: str = "xla",
                  kernel_mesh: KernelMesh | None = None, axes=(None, None)) -> jax.Array:
    """``x [..., in] @ (w ⊙ mask) [in, out]``: XLA (``"xla"``), or the Pallas masked low-rank kernel with a
    zero rank-1 adapter (``"pallas"``: compiled on GPU/TPU, interpret mode on CPU), which merges the mask
    tile by tile and never forms ``w ⊙ mask``; on a ``kernel_mesh`` of several devices under ``shard_map``
    (``ops.sharded``; ``axes``: w's logical axes ``(in, out)``)."""
    if impl == "pallas":
        a, b = jnp.zeros((w.shape[0], 1), w.dtype), jnp.zeros((1, w.shape[1]), w.dtype)
        return sharded.masked_lowrank_matmul(x, w, a, b, mask, 0.0, kernel_mesh, axes).astype(x.dtype)
    return x @ jnp.where(mask, w, 0).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def double_pruned_matmul(x: jax.Array, w: jax.Array, fwd_mask: jax.Array, bwd_mask: jax.Array,
                         impl: str = "xla", kernel_mesh: KernelMesh | None = None, axes=(None, None)) -> jax.Array:
    """``x [..., in] @ (w ⊙ fwd_mask) [in, out]``; the x-gradient uses ``w ⊙ bwd_mask`` (see module doc).
    ``impl``: both masked products through XLA or the Pallas kernel (:func:`masked_matmul`; ``kernel_mesh``,
    ``axes``: its ``shard_map`` partition, the backward product's with the axes swapped)."""
    return masked_matmul(x, w, fwd_mask, impl, kernel_mesh, axes)


def _dpm_fwd(x, w, fwd_mask, bwd_mask, impl, kernel_mesh, axes):
    return double_pruned_matmul(x, w, fwd_mask, bwd_mask, impl, kernel_mesh, axes), (x, w, fwd_mask, bwd_mask)


def _dpm_bwd(impl, kernel_mesh, axes, res, g):
    x, w, fwd_mask, bwd_mask = res
    dx = masked_matmul(g, w.T, bwd_mask.T, impl, kernel_mesh, tuple(axes)[::-1])  # ∂L/∂y @ (W ⊙ M ⊙ M₂)ᵀ
    dw = x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    dw = jnp.where(fwd_mask, dw, 0).astype(w.dtype)
    return dx.astype(x.dtype), dw, None, None


double_pruned_matmul.defvjp(_dpm_fwd, _dpm_bwd)


def aspect_ratio(d_in: int, d_out: int) -> float:
    return max(d_in, d_out) / min(d_in, d_out)


class SLoPeLinear(Linear):
    """A 2:4 ``Linear`` with a double-pruned backward and a gated lazy adapter.

    Shapes: ``kernel`` [in, out] (dense master weight), ``nm_mask`` / ``backward_mask`` [in, out] bool,
    ``adapter_on`` [] bool, ``lora_a`` = L [in, r], ``lora_b`` = R [r, out], ``lora_scale`` = 1 / r.
    """

    def __init__(self, base: Linear, *, adapter_rank: int, rngs: nnx.Rngs):
        for d in (base.in_features, base.out_features):
            if d % M:
                raise UserError(f"slope: layer {base.in_features}x{base.out_features} needs both dims "
                                f"divisible by {M} for {N}:{M} sparsity")
        w = base.kernel[...]
        super().__init__(base.in_features, base.out_features, axes=base.axes, kernel=w, dtype=w.dtype,
                         use_bias=base.bias is not None, bias=None if base.bias is None else base.bias[...])
        fwd = forward_mask(w)
        self.nm_mask = Mask(fwd)
        self.backward_mask = Mask(double_pruned_mask(w, fwd))
        self.adapter_on = Mask(jnp.asarray(False))
        if adapter_rank > 0:
            self.set_lora(jax.random.normal(rngs.params(), (self.in_features, adapter_rank), w.dtype),
                          jnp.zeros((adapter_rank, self.out_features), w.dtype), 1.0 / adapter_rank)

    def sparse_kernel(self) -> jax.Array:
        """``W ⊙ M``: the weight the forward pass uses. [in, out]"""
        return jnp.where(self.nm_mask[...], self.kernel[...], 0)

    def merged_kernel(self) -> jax.Array:
        """``W ⊙ M + L @ R / r`` (the adapter term only once it is switched on). [in, out]"""
        w = self.sparse_kernel()
        if self.has_lora:
            lr = self.lora_scale * (self.lora_a[...] @ self.lora_b[...]).astype(w.dtype)
            w = w + jnp.where(self.adapter_on[...], lr, 0)
        return w

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        y = double_pruned_matmul(x, self.kernel[...], self.nm_mask[...], self.backward_mask[...], self.impl,
                                 self.kernel_mesh, self.axes)
        if self.has_lora:
            a, b, s = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype), self.lora_scale
            y = y + jax.lax.cond(self.adapter_on[...], lambda: s * ((x @ a) @ b),
                                 lambda: jnp.zeros(y.shape, y.dtype))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def slope_linears(model: nnx.Module):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, SLoPeLinear):
            yield tuple(path), node


def refresh_masks(model: nnx.Module, *, forward: bool) -> None:
    """In place: ``M`` from ``|W|`` (when ``forward``), then ``M₂`` from ``|W ⊙ M|``, for every SLoPe layer."""
    for _, lin in slope_linears(model):
        w = lin.kernel[...]
        if forward:
            lin.nm_mask.value = forward_mask(w)
        lin.backward_mask.value = double_pruned_mask(w, lin.nm_mask[...])


def set_adapters(model: nnx.Module, on: bool) -> None:
    for _, lin in slope_linears(model):
        lin.adapter_on.value = jnp.asarray(on)


@dataclass(frozen=True)
class SLoPeSchedule:
    """When masks refresh and adapters switch on, as functions of ``t`` = steps done (0..steps)."""

    steps: int
    mask_change_freq: int = 100
    refresh_frac: float = 0.1
    adapter_frac: float = 0.01

    def __post_init__(self):
        if self.mask_change_freq < 1:
            raise UserError("must be >= 1", field="mask_change_freq", value=self.mask_change_freq)
        if not 0.0 <= self.refresh_frac <= 1.0:
            raise UserError("must be in [0, 1]", field="refresh_frac", value=self.refresh_frac)
        if not 0.0 <= self.adapter_frac <= 1.0:
            raise UserError("must be in [0, 1]", field="adapter_frac", value=self.adapter_frac)

    @property
    def adapter_start(self) -> int:
        """The first step index (0-based) trained with adapters: the last ``⌈adapter_frac·steps⌉`` steps."""
        if self.adapter_frac == 0:
            return self.steps
        return self.steps - max(1, math.ceil(self.adapter_frac * self.steps))

    def refresh(self, t: int) -> str | None:
        """After ``t`` steps: ``"forward"`` (M and M₂), ``"backward"`` (M₂ only) or None."""
        if t <= 0 or t % self.mask_change_freq or t >= self.steps:
            return None
        return "forward" if t <= self.refresh_frac * self.steps else "backward"


def make_mask_updater(graphdef):
    """(trainable, frozen, masks, forward, backward, adapters_on) -> new masks, jitted and pure."""
    def update(trainable, frozen, masks, forward: bool, backward: bool, adapters_on: bool):
        model = combine(graphdef, frozen, trainable, masks)
        if forward or backward:
            refresh_masks(model, forward=forward)
        set_adapters(model, adapters_on)
        return nnx.state(model, Mask)
    return jax.jit(update, static_argnums=(3, 4, 5))


def make_after_step(graphdef, frozen, schedule: SLoPeSchedule):
    """The train loop's ``after_step(step, state) -> state``: refresh masks, switch adapters on.

    Everything it changes lives in ``state.masks``, so checkpoints carry it and resume is exact.
    """
    update = make_mask_updater(graphdef)

    def after_step(step, st):
        t = step + 1
        kind = schedule.refresh(t)
        if kind is None and t != schedule.adapter_start:
            return st
        return st._replace(masks=update(st.trainable, frozen, st.masks, kind == "forward", kind is not None,
                                        t >= schedule.adapter_start))
    return after_step


def initial_masks(graphdef, frozen, trainable, masks, schedule: SLoPeSchedule):
    """The masks before step 0: adapters already on when the schedule starts them at step 0."""
    if schedule.adapter_start > 0:
        return masks
    return make_mask_updater(graphdef)(trainable, frozen, masks, False, False, True)


def _build_slope(old: Linear, mc, rngs: nnx.Rngs, dtype) -> Linear:
    if aspect_ratio(old.in_features, old.out_features) > mc.max_aspect_ratio:
        return old  # SLoPe leaves very thin / wide layers dense
    return SLoPeLinear(old, adapter_rank=mc.adapter_rank, rngs=rngs)


@dataclass(frozen=True)
class SLoPeOptions:
    """The schedule's knobs, less the run's step count (``pipeline.PretrainConfig.slope``); checked by
    ``SLoPeSchedule`` when a SLoPe run starts."""

    mask_change_freq: int = 100
    refresh_frac: float = 0.1
    adapter_frac: float = 0.01

    def schedule(self, steps: int) -> SLoPeSchedule:
        return SLoPeSchedule(steps, self.mask_change_freq, self.refresh_frac, self.adapter_frac)


def job_hooks(graphdef, placement, schedule: SLoPeSchedule):
    """``runs.TrainJob``'s ``(on_start, callbacks)``: adapters on before step 0 when the schedule starts them
    there; after each step, refresh masks / switch adapters on, the new masks back on the mesh."""
    def on_start(state, frozen, start):
        if start:
            return state
        return state._replace(masks=placement.put(initial_masks(graphdef, frozen, state.trainable, state.masks,
                                                                schedule)))

    def callbacks(frozen, placement):
        slope_step = make_after_step(graphdef, frozen, schedule)

        def after_step(step, st):  # new masks go back to the mesh's shardings (one compile per run)
            st = slope_step(step, st)
            return st._replace(masks=placement.put(st.masks))
        return LoopCallbacks(after_step=after_step)
    return on_start, callbacks


def _plan(mc, cfg) -> RunHooks:
    schedule = cfg.slope.schedule(cfg.run.steps)
    return RunHooks(partial(job_hooks, schedule=schedule), {"adapter_start_step": schedule.adapter_start})


NAME = "slope"

PRETRAIN.register(PretrainMethod(NAME, "2:4 forward, double-pruned backward, lazy low-rank adapters at the end",
                                 _build_slope, uses_impl=True, plan=_plan))
