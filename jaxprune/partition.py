"""One model, three pytrees: ``frozen`` (base weights), ``trainable`` (LoRA factors), ``masks``.

    graphdef, frozen, trainable, masks = partition(model)
    model = combine(graphdef, frozen, trainable, masks)

Every step function is pure in these pytrees; gradients are taken w.r.t. ``trainable``
only, so optimizer state is the size of the trainable factors, never of the base.
"""

from __future__ import annotations

import re

import jax
from flax import nnx

from .errors import UserError
from .layers import Mask
from .model import DECODER_LINEARS
from .weights import linears, path_str

#: every decoder linear (``model.DECODER_LINEARS``), as a regex over layer paths
DEFAULT_LORA_TARGETS = "|".join(name for _, name in DECODER_LINEARS)


def partition(model: nnx.Module):
    """-> graphdef, frozen (nnx.Param but not LoRA), trainable (nnx.LoRAParam), masks (Mask)."""
    graphdef, trainable, masks, frozen = nnx.split(model, nnx.LoRAParam, Mask, ...)
    return graphdef, frozen, trainable, masks


def combine(graphdef, frozen, trainable, masks) -> nnx.Module:
    return nnx.merge(graphdef, trainable, masks, frozen)


def add_lora(model: nnx.Module, *, rank: int, alpha: float, targets: str = DEFAULT_LORA_TARGETS,
             seed: int = 0) -> list[str]:
    """Attach LoRA (B = 0, so the output is unchanged) to every Linear whose path matches ``targets``.

    ``targets`` is a regex searched in the dotted path, e.g. ``layers.3.self_attn.q_proj``.
    Returns the matched paths; no match is a UserError.
    """
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise UserError(f"not a valid regex ({e})", field="targets", value=targets) from None
    rngs = nnx.Rngs(seed)
    hit = []
    for path, lin in linears(model):
        name = path_str(path)
        if pattern.search(name) and name != "lm_head":
            lin.add_lora(rank, alpha, rngs)
            hit.append(name)
    if not hit:
        raise UserError("matches no linear layer", field="targets", value=targets)
    return hit


def tree_size(tree) -> int:
    """Number of scalars in a pytree."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
