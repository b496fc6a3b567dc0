"""Stopping a run cleanly on SIGTERM / SIGINT, whatever it is doing.

* In the training loop (``StopSignals``): the loop finishes its step, saves a checkpoint on every process and
  raises ``Preempted``.
* Anywhere else in a command (loading, calibrating, selecting, saving: ``CommandSignals``, installed by the CLI
  around the whole command): the signal raises ``StoppedEarly`` at once. Nothing is half-written, since every
  output is written atomically (a temp file or directory, then ``os.replace``; an interrupted save removes its
  temp), and the work done so far is deterministic, so ``--resume`` redoes it and finishes with the same result.

Either way the CLI exits with ``PREEMPTED_EXIT`` (75, EX_TEMPFAIL: rerun)."""

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


class StoppedEarly(Exception):
    """A SIGTERM / SIGINT outside the training loop (``CommandSignals``)."""

    def __init__(self, signame: str):
        super().__init__(f"stopped by {signame}; nothing is half-written (outputs are written atomically)")
        self.signame = signame


class _SignalGuard:
    """Installs ``self._handle`` for SIGTERM and SIGINT while active (main thread only; the previous handlers
    come back on exit). ``received``: the first signal's number."""

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
        raise NotImplementedError


class CommandSignals(_SignalGuard):
    """While active (the CLI, around a whole command), SIGTERM and SIGINT raise ``StoppedEarly`` in the main
    thread at the next Python instruction; the training loop's ``StopSignals`` takes over inside it (and
    hands the handlers back after). A second signal while the first unwinds is ignored."""

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            raise StoppedEarly(signal.Signals(signum).name)


class StopSignals(_SignalGuard):
    """While active, SIGTERM and SIGINT only set a flag that the loop reads between steps (a second
    SIGINT interrupts at once). Under jax.distributed every process learns of a signal any of them got,
    at the same step (one tiny all-gather per step), so all save the same checkpoint."""

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
