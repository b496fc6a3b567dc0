"""Distillation recovery of element-wise pruned models without a second copy of the base (issue 19).

``finetune --keep-sparsity`` trains through ``(W + s·A@B) ⊙ M``, so the base weights where ``M = 0`` never
reach the student. When the kept weights are the unpruned model's own (magnitude, Wanda: ``W_pruned =
W_teacher ⊙ M``), the frozen base may hold ``W_teacher`` itself: the student computes the same function, and
the distillation teacher of ``train.make_loss_fn`` -- the same frozen base with every mask on and the LoRA
factors off -- is then exactly the unpruned model (Minitron's prune-then-distil, Muralidharan et al. 2024,
arXiv 2407.14679, for element-wise sparsity). SparseGPT rewrites the kept weights (the OBS update), so its
base differs from the teacher's under ``M`` as well; it is refused rather than distilled towards a wrong
teacher. Before a model is saved its pruned weights are zeroed again (:func:`rezero_pruned_weights`), the
invariant every saved element-masked model keeps.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import UserError, field_ref
from ..weights import linears, merge_lora, path_str


def restore_pruned_weights(model: nnx.Module, teacher: nnx.Module, teacher_name: str) -> int:
    """Write the teacher's weights under every ``weight_mask``'s zeros of ``model`` (in place).

    Every other parameter must equal the teacher's exactly, and every masked kernel must equal
    ``W_teacher ⊙ M``; otherwise one ``UserError`` line names the first parameter that differs.
    Returns the number of weights restored (the pruned ones)."""
    if model.config != teacher.config:
        raise UserError("another architecture than the pruned model (its config differs)", field="teacher",
                        value=teacher_name)
    if any(lin.has_lora for _, lin in linears(model)):
        raise UserError("the pruned model carries LoRA factors; merge them first "
                        "(`jaxprune finetune ... --merge` writes a merged model)", field="distill")
    if any(lin.has_lora for _, lin in linears(teacher)):  # prune --sparsity merged them before pruning, so must we
        teacher = merge_lora(teacher)
    masked = {p + ("kernel",): lin for p, lin in linears(model) if lin.weight_mask is not None}
    if not masked:
        raise UserError(f"the model has no element masks ({field_ref('keep_sparsity')} masks none of its weights), "
                        "so the frozen base is the teacher already", field="distill")
    theirs = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(teacher, nnx.Param))}
    restored = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path, mine = tuple(path), var.get_value()
        if path not in theirs or theirs[path].shape != mine.shape:
            raise UserError(f"has no parameter {path_str(path)} of shape {mine.shape}", field="teacher",
                            value=teacher_name)
        want = np.asarray(theirs[path]).astype(mine.dtype)
        keep = np.asarray(masked[path].weight_mask[...]) if path in masked else True
        if not np.array_equal(np.asarray(mine), np.where(keep, want, np.zeros((), want.dtype))):
            raise UserError(f"{path_str(path)} differs from the teacher's ({teacher_name}) "
                            "where it is kept: the teacher must be the model this one was pruned from, by a method "
                            "that keeps the surviving weights (magnitude, wanda; sparsegpt rewrites them)",
                            field="distill")
        if path in masked:
            masked[path].kernel.set_value(jnp.asarray(want))
            restored += int(np.size(keep) - np.count_nonzero(keep))
    return restored


def rezero_pruned_weights(model: nnx.Module) -> None:
    """``kernel ← kernel ⊙ M`` for every element-masked linear (in place): saved models keep pruned weights 0."""
    for _, lin in linears(model):
        if lin.weight_mask is not None and lin.block_layout is None:
            w = lin.kernel[...]
            lin.kernel.set_value(jnp.where(lin.weight_mask[...], w, jnp.zeros((), w.dtype)))
