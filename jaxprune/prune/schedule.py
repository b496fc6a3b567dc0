"""LoRAPrune's cubic sparsity schedule (Zhu & Gupta 2017, as used by LoRAPrune).

With T total steps, warm-up fraction w and cool-down fraction c::

    s(t) = 0                                               t <  wT
    s(t) = s_f + (s_i − s_f)(1 − (t − wT) / ((1 − w − c)T))³   wT ≤ t < (1 − c)T
    s(t) = s_f                                             t ≥ (1 − c)T

Masks are set to s(t) every ``every`` steps inside the pruning window, and once more
at t = (1 − c)T so the final ratio is always reached before the cool-down.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CubicSchedule:
    total_steps: int
    final_ratio: float
    initial_ratio: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.1
    every: int = 10

    @property
    def start(self) -> int:
        return int(self.warmup * self.total_steps)

    @property
    def end(self) -> int:
        return int((1.0 - self.cooldown) * self.total_steps)

    def ratio(self, t: int) -> float:
        """Target fraction of pruned units at step t."""
        if t < self.start:
            return 0.0
        if t >= self.end:
            return self.final_ratio
        frac = (t - self.start) / max(self.end - self.start, 1)
        return self.final_ratio + (self.initial_ratio - self.final_ratio) * (1.0 - frac) ** 3

    def is_prune_step(self, t: int) -> bool:
        """True at the steps where masks are (re)set: every ``every`` steps in [start, end], and at end."""
        return self.start <= t <= self.end and ((t - self.start) % self.every == 0 or t == self.end)
