"""A LoRA linear as one matmul: ``x @ (W + s·A@B)`` with a backward that never forms ``∂L/∂W`` unless asked.

The unmerged form ``x @ W + s·(x @ A) @ B`` spends two skinny matmuls ([T, in] x [in, r], [T, r] x [r, out])
per linear in the forward; on CPU they are memory-bound and cost a third of a decoder layer's forward at
r = 8 for ~1% of its FLOPs (benchmarks/mfu.json). Merging first costs one rank-r product and an add over
[in, out] instead. The backward, for y = x @ W′, W′ = W + s·A@B and dy::

    dx = dy @ W′ᵀ,    dA = s · xᵀ @ (dy @ Bᵀ),    dB = s · (x @ A)ᵀ @ dy,    dW = xᵀ @ dy

dW is formed only when something differentiates W (LLM-Pruner's calibration with LoRA attached); for a
frozen W it is not in the program at all (``symbolic_zeros``), so the step holds no base-weight
gradient. W′ is formed in the forward from an input made to depend on x, and again in the backward from
one made to depend on dy (``order.after``), so XLA can neither form every layer's W′ up front nor keep the
forward's until the backward. Float32 only: merging into a bf16 W would round away LoRA updates smaller
than 2⁻⁸·|W| (the unmerged form keeps them).
"""

from __future__ import annotations

from functools import partial

import jax
from jax.custom_derivatives import SymbolicZero

from .order import after


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def lora_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """x [..., in], w [in, out], a [in, r], b [r, out] -> x @ (w + scale·a@b) [..., out]. W′ depends on x, so
    XLA cannot form every layer's W′ up front (they depend on parameters only) and hold them all."""
    return x @ (w + scale * (after(a, x) @ b))


def _fwd(x, w, a, b, scale):
    # symbolic_zeros: each primal comes with .perturbed, False where nothing differentiates it (the frozen W)
    x, w, a, b = x.value, (w.value, w.perturbed), a.value, b.value
    return lora_matmul(x, w[0], a, b, scale), (x, w, a, b)


def _bwd(scale, res, dy):
    x, (w, w_perturbed), a, b = res
    if isinstance(dy, SymbolicZero):  # nothing downstream depends on y
        return None, None, None, None
    merged = w + scale * (after(a, dy) @ b)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = dy @ merged.T
    da = scale * (x2.T @ (dy2 @ b.T))
    db = scale * ((x2 @ a).T @ dy2)
    dw = (x2.T @ dy2).astype(w.dtype) if w_perturbed else None  # never formed for a frozen W
    return dx, dw, da.astype(a.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_fwd, _bwd, symbolic_zeros=True)
