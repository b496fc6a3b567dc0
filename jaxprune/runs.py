"""A training run on a frozen / trainable / masks split, shared by ``finetune``, ``prune`` and ``pretrain``.

    cfg = TrainConfig(text=..., out=..., steps=200, ...)           # typed: the commands build it from flags
    placement = sharding.placement_for(mesh_config, cfg.batch_shape)
    run_dir, prev = prepare_run_dir(cfg.out, record, resume=cfg.resume, overwrite=cfg.overwrite)
    job = TrainJob(graphdef, frozen, trainable, masks, blocks, optimizer, grad_hook=..., hook_state=...)
    result = run_training(job, cfg, placement, run_dir, resume=prev is not None)
    result.model                                                  # gathered to the host, int8 dequantised

    RUN_DIR/
      run.json        the run's arguments (``--resume`` refuses a run whose arguments differ)
      checkpoints/    orbax CheckpointManager: trainable, optimizer state, masks, hook state
      metrics.jsonl   one line per step; loss.png at the end
      model/          the result (written by the command)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from . import load
from .data import Blocks, training_blocks
from .errors import UserError, field_ref
from .fileio import write_json_atomic
from .ops.sharded import KernelMesh
from .partition import DEFAULT_LORA_TARGETS, add_lora, combine, partition
from .quantize import dequantize_base, quantize_base
from .sharding import Placement, barrier, is_main_process, log, to_host
from .train import (DistillConfig, LoopCallbacks, LoopConfig, OptimConfig, TrainState, make_eval_step,
                    make_train_step, place_train_state, plot_metrics, restore_latest, state_shardings_of, train_loop)
from .weights import set_linear_impl


@dataclass(frozen=True)
class TrainConfig:
    """What every training command shares: data, LoRA / low-rank factors, optimizer, loop, run dir."""
    text: str | None = None
    out: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    targets: str = DEFAULT_LORA_TARGETS
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    compute_dtype: str = "float32"
    save_every: int = 50
    keep: int = 2
    val_every: int = 50
    val_blocks: int = 8
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    dtype: str | None = None
    quantize_base: str = "none"
    impl: str = "auto"  # element-masked linears: Pallas kernel or XLA (weights.set_linear_impl)
    remat: bool = False  # recompute each decoder layer in the backward pass (model._remat_layer)
    quiet: bool = False  # no informational stderr lines (``--json``)
    distill: bool = False  # train on train.DistillConfig(distill_alpha, distill_temp) instead of plain CE
    distill_alpha: float = 0.5
    distill_temp: float = 1.0

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        """[grad_accum, batch_size, seq_len] of one step's tokens."""
        return (self.grad_accum, self.batch_size, self.seq_len)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.steps,
                           weight_decay=self.weight_decay, clip_norm=self.clip_norm)

    def loop(self) -> LoopConfig:
        return LoopConfig(steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                          save_every=self.save_every, keep=self.keep, val_every=self.val_every,
                          val_blocks=self.val_blocks, progress=self.progress)

    def distill_config(self) -> DistillConfig | None:
        return DistillConfig(self.distill_alpha, self.distill_temp) if self.distill else None

    def jnp_compute_dtype(self):
        """The dtype steps compute in (None: as stored)."""
        return jnp.bfloat16 if self.compute_dtype == "bfloat16" else None


# ---- the run directory --------------------------------------------------------------------------
def prepare_run_dir(out: str | None, record: dict, *, resume: bool, overwrite: bool) -> tuple[Path, dict | None]:
    """Create / validate RUN_DIR. Returns (run_dir, previous run.json on resume).

    ``record`` (the run's arguments, JSON-able) is written to run.json; on ``resume`` it must equal the
    saved one. Every process runs the checks (reads only, so all fail alike); process 0 alone writes."""
    barrier("run_dir:enter")
    run_dir, prev = check_run_dir(out, record, resume=resume, overwrite=overwrite)
    if is_main_process() and run_dir.exists():
        lock_run_dir(run_dir)  # before anything is removed: another live run keeps its directory
    barrier("run_dir:checked")
    if prev is None and is_main_process():
        if run_dir.exists():
            release_run_dir(run_dir)
            shutil.rmtree(run_dir)
        run_dir.mkdir()
        lock_run_dir(run_dir)
        write_json_atomic(run_dir / "run.json", record)
    barrier("run_dir:ready")
    return run_dir, prev


_LOCKS: dict[str, int] = {}  # run dir -> open file descriptor holding its lock (for this process's lifetime)


def lock_run_dir(run_dir: Path) -> None:
    """Take RUN_DIR/.lock (``flock``, exclusive, released when the process ends); a UserError when another
    live process holds it: two runs never write to one directory."""
    key = str(Path(run_dir).resolve())
    if key in _LOCKS:
        return
    fd = os.open(Path(run_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{run_dir}: another jaxprune run is using this directory (wait for it, or pick "
                        f"another {field_ref('out')})") from None
    _LOCKS[key] = fd


def release_run_dir(run_dir: Path) -> None:
    fd = _LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)


def release_run_dirs() -> None:
    """Release every run-dir lock this process holds (the CLI does at the end of each command)."""
    for key in list(_LOCKS):
        release_run_dir(Path(key))


#: Flags added after runs were recorded, and the value a run.json without them had in effect: such a run
#: still resumes when the new flag is left at that value.
IMPLIED_BEFORE_RECORDED = {"impl": "auto", "sltrain_b_init": "zero", "attn_score": "ema", "distill": False,
                           "distill_alpha": 0.5, "distill_temp": 1.0, "teacher": None, "plugin": None,
                           "adapter": "lora", "rank_allocation": "fixed", "rank_target": None, "rank_init": 1,
                           "rank_tinit": 0, "rank_tfinal": 0, "rank_every": 1, "rank_grow": 1}


def check_run_dir(out: str | None, record: dict, *, resume: bool, overwrite: bool) -> tuple[Path, dict | None]:
    """The checks of ``prepare_run_dir``, writing nothing."""
    if not out:
        raise UserError("the run directory is required", field="out")
    run_dir = Path(out)
    if resume:
        run_file = run_dir / "run.json"
        if not run_file.exists():
            raise UserError(f"{run_dir}: nothing to resume (no run.json)")
        prev = json.loads(run_file.read_text())
        was = lambda k: prev.get(k, IMPLIED_BEFORE_RECORDED.get(k))  # noqa: E731
        diff = {k: (was(k), v) for k, v in record.items() if was(k) != v}
        if diff:
            k, (old, new) = next(iter(diff.items()))
            raise UserError(f"{field_ref('resume')} with a different {k!r} ({old!r} -> {new!r}); runs must match to "
                            "resume", field="resume")
        return run_dir, prev
    if run_dir.exists() and not overwrite:
        raise UserError(f"{run_dir}: run dir already exists (pass {field_ref('resume')} to continue or "
                        f"{field_ref('overwrite')})")
    if not run_dir.parent.exists():
        raise UserError(f"{run_dir.parent}: parent directory does not exist")
    return run_dir, None


def last_metrics(run_dir: Path) -> dict:
    """The final training loss and the last validation perplexity of RUN_DIR/metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    vals = [json.loads(l)["val_ppl"] for l in lines if "val_ppl" in l]
    return {"final_loss": last.get("loss"), "val_ppl": vals[-1] if vals else None}


# ---- LoRA on a frozen base ------------------------------------------------------------------------
@dataclass
class LoraSetup:
    """A loaded base with LoRA attached, split into pytrees, and the training text as token blocks."""
    model: Any
    tokenizer: Any
    graphdef: Any
    frozen: Any
    trainable: Any
    masks: Any
    blocks: Blocks
    lora_paths: list
    impl: str = "xla"  # the path element-masked linears take ("xla" or "pallas")


def stage_dir(run_dir: Path, name: str, record: dict, resume: bool) -> tuple[Path, bool]:
    """RUN_DIR/name as a run dir of its own (one stage of a multi-stage command): resumed when this is a
    resume and the stage had started. Returns (its path, whether it resumes)."""
    d = run_dir / name
    again = resume and (d / "run.json").exists()
    d, prev = prepare_run_dir(str(d), {**record, "stage": name}, resume=again, overwrite=True)
    return d, prev is not None


def setup_lora(model_path: str, cfg: TrainConfig, model=None, *, kernel_mesh: KernelMesh | None = None) -> LoraSetup:
    """Load ``model_path`` (or take ``model``), int8 its base if asked, attach LoRA, read ``cfg.text``;
    ``kernel_mesh``: the run's mesh for the Pallas kernels (``Placement.kernel_mesh()``, ``weights.set_linear_impl``)."""
    if not cfg.text:
        raise UserError("a text file is required", field="text")
    model = model if model is not None else load.load_model(model_path, cfg.dtype)
    if cfg.quantize_base == "int8":
        quantize_base(model)
    impl = set_linear_impl(model, cfg.impl, mesh=kernel_mesh)
    model.remat = cfg.remat  # static: part of the graphdef
    tok = load.load_tokenizer(model_path)
    paths = add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.targets, seed=cfg.seed)
    graphdef, frozen, trainable, masks = partition(model)
    blocks = training_blocks(cfg.text, tok, cfg.seq_len, seed=cfg.seed)  # several processes: each reads its share
    return LoraSetup(model, tok, graphdef, frozen, trainable, masks, blocks, paths, impl)


def final_model(graphdef, frozen, state: TrainState):
    """The trained model with every array gathered to this host (all processes take part); an int8
    base comes back dequantised (float, as every saved model is)."""
    frozen, trainable, masks = to_host((frozen, state.trainable, state.masks))
    as_jax = lambda t: jax.tree.map(jnp.asarray, t)  # noqa: E731
    model = combine(graphdef, as_jax(frozen), as_jax(trainable), as_jax(masks))
    dequantize_base(model)
    return model


# ---- the shared run -------------------------------------------------------------------------------
@dataclass
class TrainJob:
    """What a command trains: the split model, its data, its optimizer, and its pruner / scheduler hooks.

    ``grad_hook`` runs inside the jitted step (LoRAPrune's importance EMA); ``after_step(frozen, placement)``
    builds the loop's host-side callbacks once the state is on the mesh; ``on_start(state, frozen, start)``
    adjusts the placed (possibly restored) state before the first step."""
    graphdef: Any
    frozen: Any
    trainable: Any
    masks: Any
    blocks: Blocks
    optimizer: Any
    head_dim: int | None = None
    grad_hook: Callable | None = None
    hook_state: Any = ()
    callbacks: Callable[[Any, Placement], LoopCallbacks | None] | None = None
    on_start: Callable[[TrainState, Any, int], TrainState] | None = None
    mask_fn: Callable | None = None  # (masks, step_index) -> the masks one step trains through (DyLoRA)


@dataclass
class TrainResult:
    model: Any  # every array on the host, int8 dequantised, LoRA not merged
    state: TrainState
    frozen: Any
    start_step: int
    extra: dict = field(default_factory=dict)


def run_training(job: TrainJob, cfg: TrainConfig, placement: Placement, run_dir: Path, *,
                 resume: bool) -> TrainResult:
    """Place the job on the mesh, restore the latest checkpoint on ``resume`` (onto this run's mesh, whichever
    mesh saved it), compile one step, run the loop (metrics, validation, checkpoints), plot the loss and
    gather the trained model to the host."""
    placement = placement.with_head_dim(job.head_dim)
    frozen = placement.put(job.frozen)
    state = place_train_state(placement, job.optimizer, job.trainable, job.masks, job.hook_state)
    state, start = restore_latest(run_dir, state) if resume else (state, 0)
    if (line := placement.report()) is not None and not cfg.quiet:
        log(line)
    if job.on_start is not None:
        state = job.on_start(state, frozen, start)
    callbacks = job.callbacks(frozen, placement) if job.callbacks is not None else None
    step_fn = make_train_step(job.graphdef, job.optimizer, grad_hook=job.grad_hook,
                              compute_dtype=cfg.jnp_compute_dtype(), state_shardings=state_shardings_of(state),
                              distill=cfg.distill_config(), mask_fn=job.mask_fn)
    eval_fn = make_eval_step(job.graphdef, cfg.jnp_compute_dtype(), mesh=placement.mesh)
    state = train_loop(state, frozen, step_fn, eval_fn, job.blocks, run_dir, cfg.loop(), start_step=start,
                       callbacks=callbacks, placement=placement)
    if is_main_process():
        plot_metrics(run_dir)
    return TrainResult(final_model(job.graphdef, frozen, state), state, frozen, start)
