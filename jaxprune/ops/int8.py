"""Int8 frozen base weights: per-output-channel absmax quantisation (LLM.int8's vector-wise scheme).

For a kernel W [in, out] (our layout), one fp32 scale per output column j::

    s_j = max_i |W[i, j]| / 127,    q[i, j] = round(W[i, j] / s_j) ∈ [-127, 127] (int8),    W ≈ q · s

The official LoRAPrune's ``load_in_8bit`` (bitsandbytes ``Linear8bitLt``) stores the frozen base this
way (``SCB`` is the absmax of each row of torch's [out, in] weight, i.e. of each of our output
columns) and scores importance with the dequantised weight ``q · SCB / 127``
(aim-uofa/LoRAPrune ``loraprune/utils.py``, ``compute_sensitivity``). ``jaxprune.quantize``
applies it to a model: only the frozen kernels of the decoder linears are quantised; embeddings,
norms, ``lm_head``, biases and LoRA factors stay float.
A quantised base has no gradient, so only methods that never differentiate the base use it
(LoRA fine-tuning, LoRAPrune). Rounding error per element is at most s_j / 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .order import after


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """W [in, out] float -> (q [in, out] int8, s [out] float32) with W ≈ q · s."""
    w32 = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=0) / 127.0
    q = jnp.round(w32 / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """(q [in, out] int8, s [out]) -> q · s [in, out] in the scale's dtype."""
    return q.astype(scale.dtype) * scale


@jax.custom_vjp
def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """``(x @ q) · s``: x [..., in], q [in, out] int8, s [out] -> [..., out] in x's dtype.

    The backward pass dequantises q again (``dx = (dy · s) @ qᵀ``) instead of keeping the forward's
    float copy alive until then, so at most one layer's float weight exists at a time: the whole
    point of an int8 base. The base is frozen: its cotangents are zero (q's is float0).
    """
    return (x @ _float_copy(q, x, x.dtype)) * scale.astype(x.dtype)


def _float_copy(q, anchor, dtype):
    """``q.astype(dtype)``, made to depend on ``anchor`` (an activation of this call): XLA may otherwise hoist
    the copy out of the gradient-accumulation loop, or share one copy between the forward and the backward
    pass; either keeps every layer's float weight alive through the whole step, which defeats the int8 base
    (see :mod:`jaxprune.ops.order`)."""
    return after(q, anchor).astype(dtype)


def _int8_matmul_fwd(x, q, scale):
    return int8_matmul(x, q, scale), (q, scale)


def _int8_matmul_bwd(res, dy):
    q, scale = res
    dx = (dy * scale.astype(dy.dtype)) @ _float_copy(q, dy, dy.dtype).T
    return dx, np.zeros(q.shape, jax.dtypes.float0), jnp.zeros_like(scale)


int8_matmul.defvjp(_int8_matmul_fwd, _int8_matmul_bwd)
