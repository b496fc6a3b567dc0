"""Order computations that XLA would otherwise merge: ``after(x, anchor)`` is ``x`` made to depend on ``anchor``.

XLA's common-subexpression elimination merges two identical computations, and XLA:CPU drops the
optimisation barriers that ``jax.checkpoint`` relies on before it runs CSE. So a recomputation meant
for the backward pass (rematerialisation, or dequantising a weight again) can be merged with the
forward's copy, which then stays alive from the forward pass to the backward one: the memory the
recomputation was to save is spent anyway. Making the recomputation's input depend on a value that
exists only in the backward pass (an incoming cotangent) keeps the two apart on every backend.

The dependency is an exact zero: ``0·a`` where ``a`` (one element of ``anchor``) is finite, else 0,
which no compiler may fold away (``0·inf`` is NaN, so ``x + 0·a`` is not ``x`` for every ``a``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def exact_zero(anchor: jax.Array, dtype) -> jax.Array:
    """A scalar 0 of ``dtype`` that depends on ``anchor`` (a data dependency, not a value)."""
    a = anchor.reshape(-1)[0]
    return jnp.where(jnp.isfinite(a), a * 0, 0).astype(dtype)


def after(x, anchor: jax.Array):
    """``x`` (an array or a pytree of arrays, numeric or bool) unchanged in value, computed after ``anchor``."""
    def tie(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.bool_):
            return leaf | exact_zero(anchor, jnp.bool_)
        return leaf + exact_zero(anchor, leaf.dtype)
    return jax.tree.map(tie, x)
