"""The pruning methods, by name: structured criteria (heads / MLP channels) and element-wise methods.

A **structured criterion** turns the model (and what it says it ``needs``) into per-layer unit scores;
selection (lowest scores masked per layer), shrink, recovery and export are shared
(``prune/pipeline.py``). A one-shot criterion is a function of :class:`ScoreInputs`::

    from jaxprune.prune.registry import register_structured

    @register_structured("l1", summary="sum of |W| over each unit's coupled weights")
    def l1_scores(x: ScoreInputs):     # -> UnitScores: ([attn units] per layer, [MLP channels] per layer)
        ...

An **element-wise method** turns one linear's weight ``W [in, out]`` and its input statistic into a
keep-mask (or, ``compensates=True``, a keep-mask and updated weights: SparseGPT), run layer by layer by
``prune/posttraining.py``.

Every built-in registers in its own module (``importance.py``: l2, random; ``llm_pruner.py``;
``loraprune.py``; ``select.py``: magnitude; ``wanda.py``; ``sparsegpt.py``); ``jaxprune.prune`` imports
them all. Plugins register the same way (``jaxprune.plugins``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from flax import nnx

from ..config import ModelConfig
from ..errors import UserError
from ..registry import Registry
from .groups import AttnUnit

#: what a structured criterion may need from the pipeline
NEEDS = ("calibration", "base_gradients", "lora_gradients")


def option(default, help: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
           choices: tuple | None = None):
    """A field of a method's options dataclass: default, help, and its allowed range or choices (the command
    layer turns each field into a checked ``--flag``; :func:`check_options` checks a config made in Python)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "hi_open": hi_open, "choices": choices})


def check_options(options) -> None:
    """One UserError naming the field whose value is out of its declared range."""
    if options is None:
        return
    for f in dataclasses.fields(options):
        v, m = getattr(options, f.name), f.metadata
        where = f"{type(options).__name__}.{f.name}"
        if m.get("choices") is not None:
            if v not in m["choices"]:
                raise UserError(f"{where} = {v!r}: expected one of {', '.join(map(str, m['choices']))}")
            continue
        if v is None or isinstance(v, (str, bool)):
            continue
        lo, hi = m.get("lo"), m.get("hi")
        if (lo is not None and (v < lo or (m.get("lo_open") and v == lo))) or \
                (hi is not None and (v > hi or (m.get("hi_open") and v == hi))):
            raise UserError(f"{where} = {v!r}: out of range")


def method_options(entry, options, where: str):
    """``options``, or ``entry``'s defaults (``entry.options()``; None when it has none), checked against their
    declared ranges; ``where`` names the config in the error for options of another method's type."""
    if entry.options is None:
        check_options(options)
        return options
    opts = entry.options() if options is None else options
    if not isinstance(opts, entry.options):
        raise UserError(f"{where}.options: {entry.name} takes {entry.options.__name__}, not {type(opts).__name__}")
    check_options(opts)
    return opts


def options_record(config) -> dict:
    """A method config (a dataclass with ``options`` and ``method_options()``) as run.json fields: its fields with
    the options flattened in (so a recorded run compares field by field on ``resume``)."""
    opts = config.method_options()
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "options"}
    return {**fields, **(dataclasses.asdict(opts) if opts is not None else {})}


@dataclass(frozen=True)
class ScoreInputs:
    """What a one-shot structured criterion may read. ``frozen`` / ``trainable`` / ``masks``: the model's
    pytrees (possibly sharded on a mesh); ``calib`` [n, S] calibration tokens (criteria that need
    ``calibration``) scored ``calib_batch`` sequences per pass; ``options``: the criterion's options."""
    cfg: ModelConfig
    unit: AttnUnit
    graphdef: Any
    frozen: Any
    trainable: Any
    masks: Any
    calib: Any = None
    seed: int = 0
    calib_batch: int | None = None
    options: Any = None
    cache: dict = field(default_factory=dict)  # a criterion's statistics, shared by its score and compensate
    progress: bool = True  # a criterion's own progress bar (SlimGPT's per layer), off with --no-progress

    def frozen_arrays(self) -> dict:
        """The frozen base as a nested dict: ``d["layers"][i]["self_attn"]["q_proj"]["kernel"]`` [in, out]."""
        return nnx.to_pure_dict(self.frozen)


@dataclass(frozen=True)
class StructuredCriterion:
    """A registered structured criterion. ``score`` is None for an iterative one (LoRAPrune scores inside
    the LoRA training step; ``prune/pipeline.py`` runs it); ``options`` is its options dataclass.
    ``normalised``: its scores are comparable across layers already (``--widths global`` does not z-score
    them); ``default_widths``: the allocation it is published with (None: ``layerwise``);
    ``compensate(inputs, masks) -> {(layer, block, linear, param): delta}``: what is added to the base once the
    units are chosen, ``param`` in ``compensates``: ``"bias"`` (output biases the config gains: FLAP) or
    ``"kernel"`` (SlimGPT's OBS update); ``select(inputs, {layer: ratio}) -> masks``: a criterion that chooses
    its units itself, layer by layer (SlimGPT), instead of ``score`` + lowest-first selection."""
    name: str
    summary: str
    score: Callable[[ScoreInputs], Any] | None = None  # -> importance.UnitScores
    needs: tuple[str, ...] = ()
    options: type | None = None
    citation: str = ""
    normalised: bool = False
    default_widths: str | None = None
    compensate: Callable | None = None
    compensates: tuple[str, ...] = ()
    select: Callable | None = None

    def __post_init__(self):
        bad = [n for n in self.needs if n not in NEEDS]
        if bad:
            raise UserError(f"structured criterion {self.name!r}: unknown need {bad[0]!r} (one of {', '.join(NEEDS)})")

    @property
    def iterative(self) -> bool:
        return self.score is None and self.select is None


@dataclass(frozen=True)
class ElementwiseMethod:
    """A registered element-wise method. ``statistic``: what it reads of each linear's input over the
    calibration tokens: None (no data), ``"sq"`` (``Σ_t x_t²`` [in]) or ``"xtx"`` (``Σ_t x_t x_tᵀ`` [in, in]).
    ``select(w [in, out] f32, stat, sparsity, nm) -> keep [in, out] bool``; a ``compensates`` method is run
    by ``posttraining`` itself (it rewrites the kept weights: SparseGPT)."""
    name: str
    summary: str
    statistic: str | None = None
    select: Callable | None = None
    compensates: bool = False
    options: type | None = None
    citation: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None


STRUCTURED: Registry[StructuredCriterion] = Registry("structured pruning criterion")
ELEMENTWISE: Registry[ElementwiseMethod] = Registry("element-wise pruning method")


def register_structured(name: str, *, summary: str, needs: tuple[str, ...] = (), options: type | None = None,
                        citation: str = ""):
    """Decorator: register ``fn(ScoreInputs) -> importance.UnitScores`` as the one-shot structured criterion
    ``name``."""
    def wrap(fn):
        STRUCTURED.register(StructuredCriterion(name, summary, fn, tuple(needs), options, citation))
        return fn
    return wrap


def register_elementwise(name: str, *, summary: str, statistic: str | None = None, options: type | None = None,
                         citation: str = ""):
    """Decorator: register ``select(w, stat, sparsity, nm) -> keep`` as the element-wise method ``name``."""
    def wrap(fn):
        ELEMENTWISE.register(ElementwiseMethod(name, summary, statistic, fn, False, options, citation))
        return fn
    return wrap


@dataclass(frozen=True)
class DepthCriterion:
    """A registered depth-pruning method: whole decoder layers go. ``select(inputs, n_remove) -> [layer indices]``
    (``inputs``: a :class:`ScoreInputs`); ``transform``: an optional fold applied to the kept layers
    (ReplaceMe's linear map), run by ``prune/depth_pipeline.py``."""
    name: str
    summary: str
    select: Callable
    needs: tuple[str, ...] = ("calibration",)
    transform: Callable | None = None
    options: type | None = None
    citation: str = ""


DEPTH: Registry[DepthCriterion] = Registry("depth pruning method")
