"""The generic jitted training step and loop on partitioned pytrees.

    step(trainable, opt_state, hook_state, frozen, masks, batch, step_index)
        -> trainable, opt_state, hook_state, metrics

Gradients are taken w.r.t. ``trainable`` only. ``batch`` is [accum, micro_batch, seq_len];
micro-batches are scanned and their gradients averaged (gradient accumulation). A
``GradHook`` sees the averaged gradients of the trainable factors inside the same jit
(LoRAPrune's importance estimate is one), before the optimizer update.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm import tqdm

from .errors import UserError
from .fileio import write_json_atomic, write_text_atomic
from .model import causal_lm_loss
from .partition import combine
from .sharding import is_main_process, log, scalar


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


class GradHook(Protocol):
    """Reads the trainable gradients inside the jitted step (e.g. LoRAPrune's importance EMA)."""

    def __call__(self, hook_state, trainable, grads, frozen, masks, step) -> Any: ...


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


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, grad_hook: GradHook | None = None,
                    compute_dtype=None, donate: bool = True, state_shardings=None,
                    distill: DistillConfig | None = None):
    """The jitted pure train step (see module docstring).

    ``state_shardings``: (trainable, opt_state, hook_state) shardings the step returns its state with
    (``state_shardings_of``); inputs carry their own shardings, so one compile serves every step.
    """
    loss_fn = make_loss_fn(graphdef, compute_dtype, distill)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, opt_state, hook_state, frozen, masks, batch, step_index):
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
        replicated = jax.tree.leaves(state_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
        out_shardings = (*state_shardings, jax.sharding.NamedSharding(replicated.mesh, jax.sharding.PartitionSpec()))
    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else (), out_shardings=out_shardings)


def make_eval_step(graphdef, compute_dtype=None):
    """(trainable, frozen, masks, tokens [B, S]) -> summed NLL, jitted."""
    loss_fn = make_loss_fn(graphdef, compute_dtype)

    @jax.jit
    def eval_step(trainable, frozen, masks, tokens):
        loss, n = loss_fn(trainable, frozen, masks, tokens)
        return loss * n
    return eval_step


# ---- checkpointing of the train state ------------------------------------------
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


def leaves_dict(tree) -> dict[str, Any]:
    """Every leaf of ``tree`` under a sortable key ("00000", "00001", ...): how orbax stores a pytree whose
    structure comes from the live state."""
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


class TrainCheckpoints:
    """Orbax CheckpointManager over the flattened TrainState (structure comes from the live state)."""

    def __init__(self, directory: Path, *, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def save(self, step: int, state: TrainState, extra: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves_dict(state)), extra=ocp.args.JsonSave(extra)), force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict]:
        leaves, treedef = jax.tree.flatten(like)
        abstract = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                    for k, x in leaves_dict(like).items()}  # restored onto ``like``'s mesh, whatever saved it
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        restored = [out.state[k] for k in sorted(out.state)]
        if len(restored) != len(leaves):
            raise UserError("checkpoint does not match this run's model (different number of arrays)")
        return jax.tree.unflatten(treedef, restored), dict(out.extra)

    def close(self):
        self.manager.close()


def restore_latest(run_dir: Path, state: TrainState, *, warn=log) -> tuple[TrainState, int]:
    """(state from RUN_DIR's newest readable checkpoint, its step), onto ``state``'s shardings.

    A damaged checkpoint (truncated or missing file, bad metadata) is reported on stderr, removed, and the
    previous one is tried; when every checkpoint is damaged it is a UserError, never a silent restart from
    step 0. No checkpoint at all (killed before the first save): (state, 0), said on stderr."""
    directory = Path(run_dir) / "checkpoints"
    ckpts = TrainCheckpoints(directory)
    try:
        steps = sorted(ckpts.manager.all_steps(), reverse=True)
        if not steps:
            warn(f"resume: no checkpoint in {directory} yet; starting from step 0")
            return state, 0
        for i, step in enumerate(steps):
            try:
                return ckpts.restore(step, state)[0], step
            except UserError:  # readable, but not this run's model: never delete it
                raise
            except Exception as e:  # orbax / tensorstore raise many types for a damaged checkpoint
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                warn(f"resume: checkpoint step {step} in {directory} is damaged ({reason}); "
                     + (f"removing it and trying step {steps[i + 1]}" if i + 1 < len(steps)
                        else "and it was the last one"))
                _remove_step(ckpts, directory, step)
        raise UserError(f"{directory}: every checkpoint ({', '.join(map(str, steps))}) is damaged; cannot resume "
                        "(start again with --overwrite)")
    finally:
        ckpts.close()


def _remove_step(ckpts: TrainCheckpoints, directory: Path, step: int) -> None:
    """Delete a damaged step so that the resumed run can save that step again (process 0 only)."""
    if not is_main_process():
        return
    try:
        ckpts.manager.delete(step)
    except Exception:  # metadata too damaged for orbax: remove the folder itself
        shutil.rmtree(directory / str(step), ignore_errors=True)
    ckpts.manager.reload()


# ---- the loop ---------------------------------------------------------------
@dataclass
class LoopConfig:
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    save_every: int = 50
    keep: int = 2
    val_every: int = 50
    val_blocks: int = 8
    log_every: int = 1
    progress: bool = True


#: exit code of a run stopped by SIGTERM / SIGINT after saving its checkpoint (EX_TEMPFAIL: rerun with --resume)
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """A SIGTERM / SIGINT stopped the loop; the checkpoint at ``step`` is saved (every process)."""

    def __init__(self, step: int, directory: Path, signame: str):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint saved in {directory} "
                         "(continue with --resume)")
        self.step = step


class StopSignals:
    """While active, SIGTERM and SIGINT only set a flag that the loop reads between steps (a second
    SIGINT interrupts at once). Under jax.distributed every process learns of a signal any of them got,
    at the same step (one tiny all-gather per step), so all save the same checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def stop_requested(self) -> bool:
        """True on every process when any process has received a signal."""
        mine = self.received is not None
        if jax.process_count() == 1:
            return mine
        return bool(np.any(multihost_utils.process_allgather(np.int32(mine))))

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another process"


@dataclass
class LoopCallbacks:
    """Optional work between steps (outside jit), e.g. a pruner updating masks."""
    after_step: Callable[[int, TrainState], TrainState] | None = None
    describe: Callable[[TrainState], dict] | None = None  # extra metrics for the log
    extra_state: Callable[[], dict] = field(default=lambda: {})


def train_loop(state: TrainState, frozen, train_step, eval_step, blocks, run_dir: Path, loop: LoopConfig, *,
               start_step: int = 0, callbacks: LoopCallbacks | None = None, placement=None) -> TrainState:
    """Run steps [start_step, loop.steps): metrics JSONL, periodic validation, checkpoints, NaN guard.

    ``placement`` (sharding.Placement): batches are laid out over its data×fsdp axes, each process
    feeding only its own rows; logs and plots come from process 0, checkpoints from all processes.
    """
    run_dir = Path(run_dir)
    cb = callbacks or LoopCallbacks()
    main = is_main_process()
    ckpts = TrainCheckpoints(run_dir / "checkpoints", keep=loop.keep)
    metrics_file = run_dir / "metrics.jsonl"
    if main and start_step == 0 and metrics_file.exists():
        metrics_file.unlink()
    elif main:  # resume: drop log lines past the checkpoint so the log matches the state
        _truncate_metrics(metrics_file, start_step)
    tokens_per_step = loop.batch_size * loop.grad_accum * blocks.train.shape[1]
    bar = tqdm(range(start_step, loop.steps), initial=start_step, total=loop.steps,
               disable=not (loop.progress and main), desc="train", unit="step", dynamic_ncols=True)
    t_last = time.perf_counter()
    with StopSignals() as stop:  # a signal ends the loop after the current step, checkpoint saved
        for step in bar:
            batch = blocks.batch(step, loop.batch_size * loop.grad_accum).reshape(
                loop.grad_accum, loop.batch_size, -1)
            batch = placement.put_batch(batch, 1) if placement is not None else jnp.asarray(batch)
            trainable, opt_state, hook_state, m = train_step(state.trainable, state.opt_state, state.hook_state,
                                                             frozen, state.masks, batch, jnp.int32(step))
            state = state._replace(trainable=trainable, opt_state=opt_state, hook_state=hook_state)
            loss = scalar(m["loss"])
            if not math.isfinite(loss):
                last = ckpts.latest_step()
                ckpts.close()
                raise UserError(f"loss is {loss} at step {step + 1}; stopped. Last good checkpoint: "
                                f"{'step ' + str(last) if last is not None else 'none'} in {run_dir / 'checkpoints'}")
            if cb.after_step is not None:
                state = cb.after_step(step, state)
            now = time.perf_counter()
            rec = {"step": step + 1, "loss": loss, "grad_norm": scalar(m["grad_norm"]),
                   "tokens_per_s": tokens_per_step / max(now - t_last, 1e-9)}
            t_last = now
            if cb.describe is not None:
                rec.update(cb.describe(state))
            done = step + 1
            if loop.val_every and (done % loop.val_every == 0 or done == loop.steps):
                rec["val_ppl"] = validation_ppl(eval_step, state, frozen, blocks, loop, placement)
            if main:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in rec.items()
                             if k in ("loss", "tokens_per_s", "val_ppl", "sparsity")})
            stop_now = done < loop.steps and stop.stop_requested()  # every process asks, every step
            if done % loop.save_every == 0 or done == loop.steps or stop_now:
                ckpts.save(done, state, {"step": done, **cb.extra_state()})
            if stop_now:
                ckpts.close()
                raise Preempted(done, run_dir / "checkpoints", stop.name)
    ckpts.close()
    return state


def validation_ppl(eval_step, state: TrainState, frozen, blocks, loop: LoopConfig, placement=None) -> float:
    val = blocks.val[: loop.val_blocks]
    total = 0.0
    for i in range(0, len(val), loop.batch_size):
        chunk = val[i:i + loop.batch_size]
        tokens = placement.put_batch(chunk, 0, strict=False) if placement is not None else jnp.asarray(chunk)
        total += scalar(eval_step(state.trainable, frozen, state.masks, tokens))
    return float(np.exp(total / (len(val) * (val.shape[1] - 1))))


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a killed process
            continue
        if rec["step"] <= step:
            keep.append(line)
    write_text_atomic(path, "".join(l + "\n" for l in keep))


def plot_metrics(run_dir: Path) -> Path | None:
    """loss (and validation perplexity) against step, as RUN_DIR/loss.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train loss")
    val = [(r["step"], math.log(r["val_ppl"])) for r in recs if "val_ppl" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="val NLL")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


save_json_atomic = write_json_atomic  # run.json, prune.json


def config_dict(*objs) -> dict:
    out = {}
    for o in objs:
        out.update(asdict(o))
    return out
