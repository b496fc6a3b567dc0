"""Stopping a run cleanly on SIGTERM / SIGINT: the loop finishes its step, saves a checkpoint on every
process and raises ``Preempted``; the CLI exits with ``PREEMPTED_EXIT`` (rerun with --resume)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

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
