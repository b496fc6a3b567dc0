"""The adapters, by name (``finetune --adapter``): what fine-tuning trains on top of a frozen base.

An adapter turns a ``Linear`` that carries LoRA factors (``Linear.add_lora``: A ~ U(±1/√in), B = 0, s = α/r)
into its own layer: a ``Linear`` subclass with its formula in ``__call__`` / ``merged_kernel``, like the pretraining
methods' layers (``pretrain/sltrain.py``). Starting from LoRA keeps the random draws of every adapter equal to
LoRA's at one seed. Its trainable Variables are ``nnx.LoRAParam`` (the trainable pytree: the optimizer state is the
size of what trains), its fixed ones ``nnx.Param`` (the frozen pytree), with logical axes given at creation
(``layers.with_axes``), so meshes, ``--remat``, resume and ``--merge`` need nothing adapter-specific::

    from jaxprune.adapters import ADAPTERS, Adapter

    ADAPTERS.register(Adapter("my-adapter", summary="...", convert=lambda lin, rngs, shared: MyLinear(lin),
                              citation="..."))

``convert`` is None for LoRA itself (the layer stays a ``Linear``). ``shared(lins, rngs)``, when given, builds
once what every layer of the model shares (RandLoRA's random bases: one frozen copy, referenced by each layer)
and ``convert`` receives it. ``unsupported`` lists the run features the adapter refuses, as (feature, reason)
pairs; the features are :data:`FEATURES` (``loram``: LoRAM cannot recover the adapter trained on a pruned model
to the full shape; ``prune/loram.py`` recovers every layer whose update it can evaluate on P(W0), so only an adapter
whose update is not a function of its own layer's base and parameters needs to refuse it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
from flax import nnx

from ..errors import UserError, field_ref
from ..layers import Linear
from ..registry import Registry
from ..weights import linears, path_str, replace_linear

#: run features an adapter may refuse (``Adapter.unsupported``), as an error message names them
_FEATURE_TEXT = {"distill": field_ref("distill"), "int8": f"{field_ref('quantize_base')} int8",
                 "keep_sparsity": field_ref("keep_sparsity"), "pallas": f"{field_ref('impl')} pallas",
                 "loram": "jaxprune loram (its update cannot be recovered to the full shape)"}
FEATURES = tuple(_FEATURE_TEXT)


@dataclass(frozen=True)
class Adapter:
    """A registered adapter. ``convert(lin, rngs, shared) -> Linear``: the adapter's layer built from a LoRA-carrying
    ``lin`` (None: LoRA, the layer as it is); ``shared(lins, rngs)``: what the layers share (None: nothing);
    ``lora_guided``: the layer keeps LoRA's A, B and LoRAPrune's importance ``|∇(s·A@B) ⊙ W'|`` could read them
    (``prune`` selects with LoRA whatever ``--recover-adapter`` is); ``saves_unmerged``: a model with this adapter
    can be saved as a checkpoint without merging (the checkpoint format records LoRA factors only)."""
    name: str
    summary: str
    convert: Callable[[Linear, nnx.Rngs, Any], Linear] | None = None
    shared: Callable[[list[Linear], nnx.Rngs], Any] | None = None
    citation: str = ""
    lora_guided: bool = True
    saves_unmerged: bool = False
    unsupported: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        bad = [f for f, _ in self.unsupported if f not in FEATURES]
        if bad:
            raise UserError(f"adapter {self.name!r}: unknown feature {bad[0]!r} (one of {', '.join(FEATURES)})")

    def check(self, **features: bool) -> None:
        """One UserError for the first feature in use (``features[name]`` true) that this adapter refuses."""
        for feature, why in self.unsupported:
            if features.get(feature):
                raise UserError(f"not with {_FEATURE_TEXT[feature]}: {why}", field="adapter", value=self.name)


ADAPTERS: Registry[Adapter] = Registry("adapter")


def take_over(new: Linear, old: Linear) -> None:
    """Give ``new`` (an adapter layer, built with ``with_kernel=False``) every Variable and setting of ``old``: its
    kernel (int8 and scale included), bias, LoRA factors, element mask, ``impl`` and kernel mesh, as they are."""
    for name, value in vars(old).items():
        if not name.startswith("_") and value is not None:
            setattr(new, name, value)


def register_adapter(adapter: Adapter) -> Adapter:
    return ADAPTERS.register(adapter)


def attach_adapter(model: nnx.Module, name: str, *, seed: int = 0) -> list[str]:
    """Turn every LoRA-carrying ``Linear`` of ``model`` (plain LoRA, no other adapter yet) into adapter ``name``'s
    layer, in place. Returns the paths converted (LoRA itself converts nothing and returns them all). ``seed`` draws the
    adapter's own random values (RandLoRA's bases), apart from LoRA's."""
    adapter = ADAPTERS.get(name)
    targets = [(path, lin) for path, lin in linears(model) if adapter_of(lin) == "lora"]
    if adapter.convert is not None:
        rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1))  # a stream apart from LoRA's A draws
        shared = adapter.shared([lin for _, lin in targets], rngs) if adapter.shared is not None and targets else None
        for path, lin in targets:
            replace_linear(model, path, adapter.convert(lin, rngs, shared))
    return [path_str(p) for p, _ in targets]


def adapter_of(lin: Linear) -> str | None:
    """The name of the adapter ``lin`` carries (an adapter layer's class attribute ``adapter_name``; ``"lora"``
    for a plain ``Linear`` with LoRA factors), or None."""
    name = getattr(lin, "adapter_name", None)
    return name if name is not None else ("lora" if lin.has_lora else None)
