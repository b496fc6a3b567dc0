"""The pretraining parameterisations, by name (``jaxprune pretrain --method``).

Each method module registers a :class:`PretrainMethod` once: how a targeted dense ``Linear`` of a random-init
LLaMA becomes the method's layer (``build_linear``), whether it reads ``--lora-rank``, its own checks
of a ``methods.MethodConfig``, and what it adds to a run (``plan``: schedules, train-loop hooks, summary
keys). ``full`` (no swap) registers in ``methods.py``; ``pipeline.run_pretrain`` runs any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..registry import Registry


@dataclass(frozen=True)
class RunHooks:
    """What a method adds to a pretraining run.

    ``job(graphdef, placement) -> (on_start, callbacks)``: ``runs.TrainJob``'s hooks of the split model (either
    may be None); ``summary``: the method's extra ``pretrain.json`` keys."""
    job: Callable[[Any, Any], tuple[Callable | None, Callable | None]] | None = None
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainMethod:
    """``build_linear(old: Linear, mc: MethodConfig, rngs: nnx.Rngs, dtype) -> Linear`` (None: keep dense);
    ``check(mc)`` raises a UserError naming the bad field; ``uses_impl``: ``TrainConfig.impl`` (``--impl``)
    drives the method's products (``pretrain.json`` records it); ``plan(mc, cfg: pipeline.PretrainConfig) ->
    RunHooks`` is called before anything is built (its schedule options fail there) and reads the run's
    ``cfg.run.steps`` / ``cfg.run.seed`` and the method's own options of ``cfg``."""
    name: str
    summary: str
    build_linear: Callable | None = None
    uses_rank: bool = False
    check: Callable | None = None
    citation: str = ""
    uses_impl: bool = False
    plan: Callable[[Any, Any], RunHooks] | None = None


PRETRAIN: Registry[PretrainMethod] = Registry("pretraining method")
