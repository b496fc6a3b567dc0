"""Pure-``jnp`` references: the specification every Pallas kernel in this package is tested against.

All references compute in float32 with ``precision=HIGHEST`` and cast the result back to the
input dtype, so the kernels (which accumulate in float32) are compared against the exact math.

Formulas (issue 7):

* block-sparse matmul:      ``y = x @ W`` with ``W`` zero outside its live ``bs_k x bs_n`` blocks;
* masked low-rank matmul:   ``y = x @ W'`` with ``W' = (W + s * (A @ B)) ⊙ M``  (SLTrain / LoRAPrune);
  gradients (``W``, ``M`` frozen): ``G = (xᵀ dy) ⊙ M``, ``dA = s G Bᵀ``, ``dB = s Aᵀ G``,
  ``dx = dy W'ᵀ``;
* structured masks: ``M = mask_rows[:, None] & mask_cols[None, :]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def _f32(a: jax.Array) -> jax.Array:
    return jnp.asarray(a).astype(jnp.float32)


def expand_block_mask(block_mask, block_size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Element mask ``[K, N]`` (bool) of a block mask ``[ceil(K/bs_k), ceil(N/bs_n)]``."""
    bk, bn = block_size
    full = np.kron(np.asarray(block_mask, bool), np.ones((bk, bn), bool))
    return full[: shape[0], : shape[1]]


def block_sparse_matmul_ref(x: jax.Array, w_dense: jax.Array) -> jax.Array:
    """``x [..., K] @ w_dense [K, N] -> [..., N]`` (dtype of ``x``); ``w_dense`` = ``bsm.to_dense()``."""
    return jnp.matmul(_f32(x), _f32(w_dense), precision=HIGHEST).astype(x.dtype)


def rowcol_mask(mask_rows, mask_cols, shape: tuple[int, int]) -> jax.Array:
    """Element mask ``[K, N]`` = ``mask_rows[:, None] & mask_cols[None, :]`` (None = all True)."""
    k, n = shape
    r = jnp.ones((k,), bool) if mask_rows is None else jnp.asarray(mask_rows, bool)
    c = jnp.ones((n,), bool) if mask_cols is None else jnp.asarray(mask_cols, bool)
    return r[:, None] & c[None, :]


def masked_weight_ref(w, a, b, mask, scale: float) -> jax.Array:
    """The merged weight ``W' = (W + s * (A @ B)) ⊙ M`` in float32, ``[K, N]``."""
    merged = _f32(w) + scale * jnp.matmul(_f32(a), _f32(b), precision=HIGHEST)
    return jnp.where(jnp.asarray(mask, bool), merged, 0.0)


def masked_lowrank_matmul_ref(x, w, a, b, mask, scale: float) -> jax.Array:
    """``y = x @ ((W + s * A @ B) ⊙ M)`` for ``x [..., K]``, ``W [K, N]``, ``A [K, r]``, ``B [r, N]``,
    ``M [K, N]`` bool.  ``W`` is frozen (``stop_gradient``), matching the kernel's custom VJP."""
    w = jax.lax.stop_gradient(w)
    return jnp.matmul(_f32(x), masked_weight_ref(w, a, b, mask, scale), precision=HIGHEST).astype(x.dtype)


def masked_lowrank_rowcol_ref(x, w, a, b, mask_rows, mask_cols, scale: float) -> jax.Array:
    """As :func:`masked_lowrank_matmul_ref` with the structured mask ``rows[:, None] & cols[None, :]``."""
    return masked_lowrank_matmul_ref(x, w, a, b, rowcol_mask(mask_rows, mask_cols, w.shape), scale)


def lora_matmul_ref(x, w, a, b, scale: float) -> jax.Array:
    """Plain LoRA ``y = x @ W + s * (x @ A) @ B`` (``W`` frozen); equals the masked form with ``M = 1``."""
    xf, w = _f32(x), jax.lax.stop_gradient(_f32(w))
    y = jnp.matmul(xf, w, precision=HIGHEST)
    y = y + scale * jnp.matmul(jnp.matmul(xf, _f32(a), precision=HIGHEST), _f32(b), precision=HIGHEST)
    return y.astype(x.dtype)


def masked_lowrank_grads_ref(x, w, a, b, mask, scale: float, dy):
    """Closed-form cotangents ``(dx, dA, dB)`` of :func:`masked_lowrank_matmul_ref` for 2-D ``x``.

    ``W' = (W + sAB) ⊙ M``; ``G = (xᵀ dy) ⊙ M``; ``dx = dy W'ᵀ``; ``dA = s G Bᵀ``; ``dB = s Aᵀ G``.
    """
    wm = masked_weight_ref(w, a, b, mask, scale)
    g = jnp.where(mask, jnp.matmul(_f32(x).T, _f32(dy), precision=HIGHEST), 0.0)
    dx = jnp.matmul(_f32(dy), wm.T, precision=HIGHEST)
    da = scale * jnp.matmul(g, _f32(b).T, precision=HIGHEST)
    db = scale * jnp.matmul(_f32(a).T, g, precision=HIGHEST)
    return dx, da, db
