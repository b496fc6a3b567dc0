"""Orbax checkpoints of the TrainState, and resuming from the newest readable one.

Layout: RUN_DIR/checkpoints/<step>/ with two items, ``state`` (every leaf of the TrainState under
``leaves_dict``'s keys "00000", "00001", ...; the tree structure comes from the live state) and ``extra``
(JSON, ``{"step": step}``). ``frozen`` is never saved: it is reloaded from the base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ..errors import UserError, field_ref
from ..sharding import is_main_process, log
from .step import TrainState


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


def restore_latest(run_dir: Path, state: TrainState) -> tuple[TrainState, int]:
    """(state from RUN_DIR's newest readable checkpoint, its step), onto ``state``'s shardings.

    A damaged checkpoint (truncated or missing file, bad metadata) is reported on stderr, removed, and the
    previous one is tried; when every checkpoint is damaged it is a UserError, never a silent restart from
    step 0. No checkpoint at all (killed before the first save): (state, 0), said on stderr."""
    directory = Path(run_dir) / "checkpoints"
    ckpts = TrainCheckpoints(directory)
    try:
        steps = sorted(ckpts.manager.all_steps(), reverse=True)
        if not steps:
            log(f"resume: no checkpoint in {directory} yet; starting from step 0")
            return state, 0
        for i, step in enumerate(steps):
            try:
                return ckpts.restore(step, state)[0], step
            except UserError:  # readable, but not this run's model: never delete it
                raise
            except Exception as e:  # orbax / tensorstore raise many types for a damaged checkpoint
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                log(f"resume: checkpoint step {step} in {directory} is damaged ({reason}); "
                    + (f"removing it and trying step {steps[i + 1]}" if i + 1 < len(steps)
                       else "and it was the last one"))
                _remove_step(ckpts, directory, step)
        raise UserError(f"{directory}: every checkpoint ({', '.join(map(str, steps))}) is damaged; cannot resume "
                        f"(start again with {field_ref('overwrite')})")
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
