"""The training loop: steps, RUN_DIR/metrics.jsonl, periodic validation, checkpoints, NaN guard, stop signals.

One JSON line per step in metrics.jsonl: ``{"step", "loss", "grad_norm", "tokens_per_s"}``, plus
``LoopCallbacks.describe``'s entries and ``"val_ppl"`` on validation steps. A batch is
[grad_accum, batch_size, seq_len] tokens, laid out over the placement's data×fsdp axes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..fileio import write_text_atomic
from ..sharding import Placement, is_main_process, scalar
from .checkpoints import TrainCheckpoints
from .signals import Preempted, StopSignals
from .step import TrainState


@dataclass
class LoopConfig:
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    save_every: int = 50
    keep: int = 2
    val_every: int = 50
    val_blocks: int = 8
    progress: bool = True


@dataclass
class LoopCallbacks:
    """Optional work between steps (outside jit), e.g. a pruner updating masks."""
    after_step: Callable[[int, TrainState], TrainState] | None = None
    describe: Callable[[TrainState], dict] | None = None  # extra metrics for the log


def train_loop(state: TrainState, frozen, train_step, eval_step, blocks, run_dir: Path, loop: LoopConfig, *,
               placement: Placement, start_step: int = 0, callbacks: LoopCallbacks | None = None) -> TrainState:
    """Run steps [start_step, loop.steps): metrics JSONL, periodic validation, checkpoints, NaN guard.

    Batches are laid out over ``placement``'s data×fsdp axes, each process feeding only its own rows;
    logs and plots come from process 0, checkpoints from all processes.
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
            batch = placement.put_batch(batch, 1)
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
                ckpts.save(done, state, {"step": done})
            if stop_now:
                ckpts.close()
                raise Preempted(done, run_dir / "checkpoints", stop.name)
    ckpts.close()
    return state


def validation_ppl(eval_step, state: TrainState, frozen, blocks, loop: LoopConfig, placement: Placement) -> float:
    """exp(mean NLL) over the first ``loop.val_blocks`` validation blocks [n, seq_len], ``batch_size`` at a time."""
    val = blocks.val[: loop.val_blocks]
    total = 0.0
    for i in range(0, len(val), loop.batch_size):
        tokens = placement.put_batch(val[i:i + loop.batch_size], 0, strict=False)
        total += scalar(eval_step(state.trainable, frozen, state.masks, tokens))
    return float(np.exp(total / (len(val) * (val.shape[1] - 1))))


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl lines of steps <= ``step`` (and drop a line cut short by a killed process)."""
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
