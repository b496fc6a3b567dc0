"""SwitchLoRA (Zhou, Wang & Xu 2024, arXiv 2406.06564): LoRA factors whose vectors are switched, a few
at a time, for vectors from fixed candidate pools, so that the frozen weight accumulates a full-rank sum.

Read off the official code (``switchlora/switch_lora.py``, ``lora_utils.py``), in our ``[in, out]``
layout (torch's ``lora_A`` [r, in] rows are our A's columns, its ``lora_B`` [out, r] columns our B's rows)::

    y = x @ W + s · (x @ A) @ B            W [in, out] frozen, A [in, r], B [r, out] trained, s = 1 / r

* Candidates: ``K = min(in, out)`` vectors per side, ``C_A`` [K, in] ~ U(±√3·σ_A), ``C_B`` [K, out] ~
  U(±√3·σ_B), ``σ_A = g^½ (√out · r / in^{3/2})^{1/4}``, ``σ_B = g^½ (r / √(in·out))^{1/4}``,
  ``g = √(1/3)`` (``get_init_lora_bound``; s·A@B then has Kaiming's std g/√in). A and B start as r
  distinct random candidates each; the pools never change (the default ``switch_lora_drop = 0``).
* Switching A's vector i to candidate c keeps the function: ``W += s · (A − A') @ B`` (A' = A with
  column i := c), likewise for B: ``W += s · A' @ (B − B')``. W is changed only by switches.
* Counterparts: after A's vector i switched, B's vector i (whose gradient depends on it) has its Adam
  moments ``mu``/``nu`` reset to zero and gets no gradient for ``freeze_steps`` steps (``adam_warm_step``
  = 5; the official ``--zero_switch_state`` reset), and symmetrically. A vector never switches while
  it or its counterpart is frozen. A's positions switch round-robin from 0, B's from r/2.
* Frequency: ``r / interval(t)`` vectors per side per step, ``interval(t) = interval₀ / 0.3^{(t+1)/D}``,
  ``D = descent_ratio · steps`` (the official exponential descent: a third of the initial rate at
  step D). The official code rounds each step's count at random; here the running total is floored
  (``⌊Σ_{u≤t} r/interval(u)⌋``), the same expectation with no random state. The new candidate of a
  switched vector is drawn uniformly from those not in use at the other positions.

Everything a switch changes (W, the selected candidates, the round-robin pointers, the freeze counters)
lives in the ``masks`` pytree (``SwitchState``), so checkpoints carry it and resume is bitwise; the
random draws are ``fold_in(seed, step, layer)``. The pools are frozen and saved with ``support/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..errors import UserError, field_ref
from ..layers import Linear, Mask, with_axes
from ..partition import combine
from ..train import LoopCallbacks
from .registry import PRETRAIN, PretrainMethod, RunHooks

GAIN = math.sqrt(1.0 / 3.0)  # torch's calculate_gain("leaky_relu", √5)


class SwitchState(nnx.Variable):
    """What a switch changes between steps (W, selected candidates, pointers, freeze counters): lands in
    ``masks`` with the pruners' Mask variables (``methods.partition_pretrain``), so it is checkpointed."""


MASKS = (Mask, SwitchState)  #: the nnx filter of a pretraining run's ``masks`` pytree


class Candidates(nnx.Variable):
    """A fixed candidate pool [K, d]; frozen (saved with the run's ``support/``)."""


def candidate_bounds(d_in: int, d_out: int, rank: int) -> tuple[float, float]:
    """The uniform bounds ``√3·σ_A``, ``√3·σ_B`` of the candidates (module doc)."""
    std_a = ((d_out ** 0.5 * rank) / d_in ** 1.5) ** 0.25 * GAIN ** 0.5
    std_b = (rank / (d_in * d_out) ** 0.5) ** 0.25 * GAIN ** 0.5
    return math.sqrt(3.0) * std_a, math.sqrt(3.0) * std_b


def switchlora_param_count(d_in: int, d_out: int, rank: int) -> int:
    """Trainable scalars of one SwitchLoRA layer: ``r (d_in + d_out)`` (W and the pools are frozen)."""
    return rank * (d_in + d_out)


class SwitchLoRALinear(Linear):
    """``y = x @ W + s·(x @ A) @ B + b`` with W frozen. Shapes: ``kernel`` W [in, out] (SwitchState),
    ``lora_a`` [in, r], ``lora_b`` [r, out], ``cand_a`` [K, in], ``cand_b`` [K, out], ``sel_a`` / ``sel_b`` [r]
    int32 (candidate at each position), ``frozen_a`` / ``frozen_b`` [r] int32 (steps left frozen),
    ``pointers`` [2] int32 (next A / B position)."""

    def __init__(self, base: Linear, *, rank: int, key: jax.Array):
        w = base.kernel[...]
        d_in, d_out = base.in_features, base.out_features
        if rank >= min(d_in, d_out):
            raise UserError(f"must be below min(in, out) = {min(d_in, d_out)} (switchlora: the candidate pools hold "
                            "min(in, out) vectors)", field="rank", value=rank)
        super().__init__(d_in, d_out, axes=base.axes, use_bias=base.bias is not None, dtype=w.dtype,
                         bias=None if base.bias is None else base.bias[...], with_kernel=False)
        self.kernel = with_axes(SwitchState, w, self.axes)
        k = min(d_in, d_out)
        ka, kb, ks_a, ks_b = jax.random.split(key, 4)
        bound_a, bound_b = candidate_bounds(d_in, d_out, rank)
        self.cand_a = with_axes(Candidates, jax.random.uniform(ka, (k, d_in), w.dtype, -bound_a, bound_a),
                                (None, self.axes[0]))
        self.cand_b = with_axes(Candidates, jax.random.uniform(kb, (k, d_out), w.dtype, -bound_b, bound_b),
                                (None, self.axes[1]))
        sel_a = jax.random.permutation(ks_a, k)[:rank].astype(jnp.int32)
        sel_b = jax.random.permutation(ks_b, k)[:rank].astype(jnp.int32)
        self.set_lora(self.cand_a[...][sel_a].T, self.cand_b[...][sel_b], 1.0 / rank)
        self.sel_a, self.sel_b = SwitchState(sel_a), SwitchState(sel_b)
        self.frozen_a = SwitchState(jnp.zeros((rank,), jnp.int32))
        self.frozen_b = SwitchState(jnp.zeros((rank,), jnp.int32))
        self.pointers = SwitchState(jnp.asarray([0, rank // 2], jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]; frozen vectors get no gradient (``stop_gradient``)."""
        a, b = self.lora_a[...], self.lora_b[...]
        a = jnp.where(self.frozen_a[...][None, :] > 0, jax.lax.stop_gradient(a), a).astype(x.dtype)
        b = jnp.where(self.frozen_b[...][:, None] > 0, jax.lax.stop_gradient(b), b).astype(x.dtype)
        y = x @ self.kernel[...].astype(x.dtype) + self.lora_scale * ((x @ a) @ b)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def switch_linears(model: nnx.Module):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, SwitchLoRALinear):
            yield tuple(path), node


# ---- the switching rule ---------------------------------------------------------------------------
def pick_positions(start: jax.Array, n: jax.Array, blocked: jax.Array) -> jax.Array:
    """Bool [r]: the up-to-``n`` positions from ``start`` round-robin, stopping at the first blocked one."""
    r = blocked.shape[0]
    order = (start + jnp.arange(r)) % r
    ok = jnp.cumprod(~blocked[order]).astype(bool) & (jnp.arange(r) < n)
    return jnp.zeros((r,), bool).at[order].set(ok)


def draw_candidates(key: jax.Array, switch: jax.Array, sel: jax.Array, k: int) -> jax.Array:
    """New ``sel`` [r]: every switched position gets a distinct candidate not in use at the other positions."""
    in_use = jnp.zeros((k,), bool).at[sel].max(~switch)
    prio = jnp.where(in_use, -1.0, jax.random.uniform(key, (k,)))
    top = jnp.argsort(-prio, stable=True)[: sel.shape[0]]  # r distinct free candidates, random order
    return jnp.where(switch, top[jnp.cumsum(switch) - 1], sel).astype(sel.dtype)


def switch_layer(lin: SwitchLoRALinear, key: jax.Array, n: jax.Array, freeze_steps: int):
    """In place: switch up to ``n`` vectors of A and of B. -> (switch_a [r], switch_b [r]) bool."""
    fa, fb = (jnp.maximum(v[...] - 1, 0) for v in (lin.frozen_a, lin.frozen_b))  # the step just done
    busy = (fa > 0) | (fb > 0)
    ptr = lin.pointers[...]
    sw_a = pick_positions(ptr[0], n, busy)
    sw_b = pick_positions(ptr[1], n, busy | sw_a)
    ka, kb = jax.random.split(key)
    k = lin.cand_a[...].shape[0]
    sel_a, sel_b = draw_candidates(ka, sw_a, lin.sel_a[...], k), draw_candidates(kb, sw_b, lin.sel_b[...], k)
    a, b, w, s = lin.lora_a[...], lin.lora_b[...], lin.kernel[...], lin.lora_scale
    a2 = jnp.where(sw_a[None, :], lin.cand_a[...][sel_a].T, a)
    w = w + s * ((a - a2) @ b)
    b2 = jnp.where(sw_b[:, None], lin.cand_b[...][sel_b], b)
    w = w + s * (a2 @ (b - b2))
    lin.lora_a.value, lin.lora_b.value, lin.kernel.value = a2, b2, w
    lin.sel_a.value, lin.sel_b.value = sel_a, sel_b
    lin.frozen_a.value = jnp.where(sw_b, freeze_steps, fa).astype(jnp.int32)
    lin.frozen_b.value = jnp.where(sw_a, freeze_steps, fb).astype(jnp.int32)
    lin.pointers.value = (ptr + jnp.stack([sw_a.sum(), sw_b.sum()])).astype(jnp.int32) % a.shape[1]
    return sw_a, sw_b


def reset_moments(opt_state, keep):
    """``opt_state`` with every Adam ``mu`` / ``nu`` zeroed where ``keep`` (a bool tree like the params) is False."""
    def reset(st):
        if not isinstance(st, optax.ScaleByAdamState):
            return st
        zero = lambda m, k: jnp.where(k, m, jnp.zeros((), m.dtype))  # noqa: E731
        return st._replace(mu=jax.tree.map(zero, st.mu, keep), nu=jax.tree.map(zero, st.nu, keep))
    return jax.tree.map(reset, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))


def make_switcher(graphdef, seed: int, freeze_steps: int):
    """(trainable, frozen, masks, opt_state, step, n) -> (trainable, masks, opt_state), jitted and pure:
    every SwitchLoRA layer switches up to ``n`` vectors per side, counterparts' moments reset."""
    base_key = jax.random.key(seed)

    def update(trainable, frozen, masks, opt_state, step, n):
        model = combine(graphdef, frozen, trainable, masks)
        keep = {}
        for i, (path, lin) in enumerate(switch_linears(model)):
            key = jax.random.fold_in(jax.random.fold_in(base_key, step), i)
            sw_a, sw_b = switch_layer(lin, key, n, freeze_steps)
            keep[path + ("lora_a",)] = jnp.broadcast_to(~sw_b[None, :], lin.lora_a[...].shape)
            keep[path + ("lora_b",)] = jnp.broadcast_to(~sw_a[:, None], lin.lora_b[...].shape)
        new_trainable = nnx.state(model, nnx.Param)
        flat = nnx.to_flat_state(new_trainable)
        keep_tree = nnx.from_flat_state([(p, v.replace(keep.get(tuple(p), jnp.ones(v[...].shape, bool))))
                                         for p, v in flat])
        masks = nnx.state(model, MASKS)
        return new_trainable, masks, reset_moments(opt_state, keep_tree)
    return jax.jit(update)


@dataclass(frozen=True)
class SwitchSchedule:
    """How many vectors switch per side after each step (module doc)."""

    steps: int
    interval: int = 40
    descent_ratio: float = 0.1
    freeze_steps: int = 5

    def __post_init__(self):
        if self.interval < 1:
            raise UserError("must be >= 1", field="interval", value=self.interval)
        if not 0.0 < self.descent_ratio <= 1.0:
            raise UserError("must be in (0, 1]", field="descent_ratio", value=self.descent_ratio)
        if self.freeze_steps < 0:
            raise UserError("must be >= 0", field="freeze_steps", value=self.freeze_steps)
        if self.interval < 2 * self.freeze_steps:  # the official RuntimeError: switching outpaces the freeze
            raise UserError(f"{field_ref('interval')} {self.interval} must be >= 2 x {field_ref('freeze_steps')} "
                            f"({self.freeze_steps})", field="interval", value=self.interval)

    def total(self, t: int, rank: int) -> int:
        """Vectors switched per side by the end of step ``t`` (0-based): ``⌊Σ_{u≤t} r · q^{u+1} / interval₀⌋``,
        ``q = 0.3^{1/D}`` (0 for t < 0)."""
        if t < 0:
            return 0
        q = 0.3 ** (1.0 / max(self.descent_ratio * self.steps, 1e-9))
        geo = (t + 1) if q == 1.0 else q * (1 - q ** (t + 1)) / (1 - q)
        return int(math.floor(rank * geo / self.interval + 1e-9))

    def count(self, t: int, rank: int) -> int:
        """Vectors to switch per side after step ``t``."""
        return self.total(t, rank) - self.total(t - 1, rank)


def make_after_step(graphdef, frozen, schedule: SwitchSchedule, rank: int, seed: int):
    """The train loop's ``after_step(step, state) -> state``: switch vectors, reset counterparts' moments,
    count down the freezes. Everything it changes is in the checkpointed state."""
    switch = make_switcher(graphdef, seed, schedule.freeze_steps)

    def after_step(step, st):
        if step + 1 >= schedule.steps:
            return st
        trainable, masks, opt_state = switch(st.trainable, frozen, st.masks, st.opt_state, jnp.int32(step),
                                             jnp.int32(schedule.count(step, rank)))
        return st._replace(trainable=trainable, masks=masks, opt_state=opt_state)
    return after_step


@dataclass(frozen=True)
class SwitchOptions:
    """The switching schedule's knobs, less the run's step count (``pipeline.PretrainConfig.switch``); checked
    by ``SwitchSchedule`` when a SwitchLoRA run starts."""

    interval: int = 40
    descent_ratio: float = 0.1
    freeze_steps: int = 5

    def schedule(self, steps: int) -> SwitchSchedule:
        return SwitchSchedule(steps, self.interval, self.descent_ratio, self.freeze_steps)


def job_callbacks(graphdef, schedule: SwitchSchedule, rank: int, seed: int):
    """``runs.TrainJob.callbacks``: switch after each step, the new state back on the mesh."""
    def callbacks(frozen, placement):
        switch_step = make_after_step(graphdef, frozen, schedule, rank, seed)

        def after_step(step, st):
            new = switch_step(step, st)
            if new is st:
                return st
            return new._replace(trainable=placement.put(new.trainable), masks=placement.put(new.masks),
                                opt_state=placement.put(new.opt_state))
        return LoopCallbacks(after_step=after_step)
    return callbacks


def _plan(mc, cfg) -> RunHooks:
    schedule, steps = cfg.switch.schedule(cfg.run.steps), cfg.run.steps
    return RunHooks(lambda graphdef, placement: (None, job_callbacks(graphdef, schedule, mc.rank, cfg.run.seed)),
                    {"switches_scheduled": schedule.total(steps - 2, mc.rank)})  # per side, per layer (upper bound)


PRETRAIN.register(PretrainMethod(
    "switchlora", "W + s·A@B, W frozen, A / B vectors switched from candidate pools",
    lambda old, mc, rngs, dtype: SwitchLoRALinear(old, rank=mc.rank, key=rngs.params()), uses_rank=True,
    plan=_plan))
