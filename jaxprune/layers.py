"""Layers and Variable types.

Variable types decide which pytree a value lands in (see ``partition.py``):

* ``nnx.Param``     base weights: frozen during fine-tuning and pruning
* ``nnx.LoRAParam`` low-rank factors (and other trainable factors): the optimizer's
* ``Mask``          boolean masks: owned by the pruner

Every Variable that should be sharded carries its **logical axes** as NNX metadata, given where
it is created (``logical_axes=("embed", "mlp")``, as MaxText's ``layers/linears.py`` does);
``sharding.py`` maps those names to mesh axes. A Variable without them is replicated.

``Linear`` covers the variants the methods need, in our ``[in, out]`` layout::

    y = x @ W + b                                  dense
    y = x @ W + s * (x @ A) @ B + b                + LoRA, A [in, r], B [r, out], s = alpha / r
    y = x @ ((W + s * A @ B) * M) + b              + elementwise mask M [in, out] (unstructured, N:M)
    y = x @ BlockSparse(values, layout) + b        inference form of a block mask (``set_block_sparse``)

W may be stored int8 with one scale per output column (``kernel_scale``, see ``ops/int8.py``):
then ``W = q · s`` and the unmasked forward computes ``(x @ q) · s``.

Structured masks (heads, MLP channels) live in the attention and MLP modules and
act on activations, which is exact and cheap (see ``model.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from . import kernels
from .ops.int8 import dequantize, int8_matmul
from .ops import sharded
from .ops.lora import lora_matmul

AXES_KEY = "logical_axes"  #: the NNX metadata key holding a Variable's logical axis names
Axes = tuple  # tuple[str | None, ...]: one logical name (or None) per dimension


class Mask(nnx.Variable):
    """A boolean mask owned by the pruner; ``True`` keeps a unit."""


def with_axes(variable_type, value, axes: Axes | None):
    """``variable_type(value)`` carrying ``axes`` as its logical-axes metadata (none when ``axes`` is None)."""
    return variable_type(value) if axes is None else variable_type(value, **{AXES_KEY: tuple(axes)})


def logical_axes_of(variable) -> Axes | None:
    """The logical axes a Variable was created with, or None."""
    return variable.get_metadata().get(AXES_KEY) if isinstance(variable, nnx.Variable) else None


class Linear(nnx.Module):
    """``y = x @ ((W + s·A@B) ⊙ M) + b`` with every term optional but W.

    Shapes: ``kernel`` [in, out] (float, or int8 with ``kernel_scale`` [out]), ``bias`` [out],
    ``lora_a`` [in, r], ``lora_b`` [r, out], ``weight_mask`` [in, out] bool.
    ``axes`` = (in, out) logical axis names, e.g. ``("embed", "mlp")``; every Variable of the layer
    takes its dimensions' names from them. ``with_kernel=False`` builds a layer whose weight is
    composed from other factors (SLTrain); it must then override ``merged_kernel`` and ``__call__``.
    Fine-tuning adapters other than LoRA are subclasses in ``adapters/`` that override ``low_rank()`` (the update's
    factors: RandLoRA), or rescale ``product()`` and ``merged_kernel()`` (DoRA).
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None] = (None, None),
                 use_bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 kernel: jax.Array | None = None, bias: jax.Array | None = None, init_std: float = 0.02,
                 with_kernel: bool = True):
        self.in_features, self.out_features = in_features, out_features
        self.axes = tuple(axes)
        if not with_kernel:
            self.kernel = nnx.data(None)
        else:
            if kernel is None:
                rngs = rngs or nnx.Rngs(0)
                kernel = init_std * jax.random.normal(rngs.params(), (in_features, out_features), dtype)
            self.kernel = with_axes(nnx.Param, jnp.asarray(kernel, dtype), self.axes)
        if use_bias and bias is None:
            bias = jnp.zeros((out_features,), dtype)
        self.bias = nnx.data(with_axes(nnx.Param, jnp.asarray(bias, dtype), self.axes[1:]) if use_bias else None)
        self.kernel_scale = nnx.data(None)  # [out] when ``kernel`` is int8 (quantize.quantize_base)
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.weight_mask = nnx.data(None)
        self.impl = "xla"
        self.kernel_mesh = None  # ops.sharded.KernelMesh: the kernels run under shard_map on it (set_linear_impl)
        self.block_layout = None  # static kernels.BlockLayout when ``kernel`` holds only the live blocks

    # ---- LoRA ---------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, rngs: nnx.Rngs, dtype=jnp.float32) -> None:
        """Attach LoRA factors: A ~ U(±1/√in) (PEFT's kaiming-uniform, a=√5), B = 0, s = α / r.

        The factors are fp32 master weights whatever the base dtype; they compute in x's dtype.
        """
        bound = 1.0 / math.sqrt(self.in_features)
        self.set_lora(jax.random.uniform(rngs.params(), (self.in_features, rank), dtype, -bound, bound),
                      jnp.zeros((rank, self.out_features), dtype), float(alpha) / float(rank))

    def set_lora(self, a: jax.Array, b: jax.Array, scale: float) -> None:
        """Install factors A [in, r], B [r, out] (trainable ``nnx.LoRAParam``) with scale s."""
        self.lora_a = with_axes(nnx.LoRAParam, a, (self.axes[0], "lora_rank"))
        self.lora_b = with_axes(nnx.LoRAParam, b, ("lora_rank", self.axes[1]))
        self.lora_scale = float(scale)

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def low_rank(self) -> tuple[jax.Array, jax.Array, float] | None:
        """The low-rank update ``s·A@B`` as ``(A [in, r], B [r, out], s)``, or None: LoRA's factors here; an
        adapter that composes A and B from other Variables (RandLoRA, ``adapters/``) overrides it, and every form
        of the product below (one matmul, int8, the masked kernel) and ``merged_kernel`` then use its factors."""
        return (self.lora_a[...], self.lora_b[...], self.lora_scale) if self.has_lora else None

    # ---- stored forms of W ----------------------------------------------------
    def set_int8_kernel(self, q: jax.Array, scale: jax.Array) -> None:
        """Store W as int8 ``q`` [in, out] with one scale per output column ``scale`` [out]."""
        self.kernel = with_axes(nnx.Param, q, self.axes)
        self.kernel_scale = with_axes(nnx.Param, scale, self.axes[1:])

    def set_float_kernel(self, w: jax.Array) -> None:
        """Store W [in, out] as a float kernel (drops an int8 scale)."""
        self.kernel = with_axes(nnx.Param, w, self.axes)
        self.kernel_scale = nnx.data(None)

    def set_weight_mask(self, keep: jax.Array) -> None:
        """Install (or replace) the element mask M [in, out] (True keeps a weight)."""
        keep = jnp.asarray(keep, jnp.bool_)
        if self.weight_mask is None:
            self.weight_mask = with_axes(Mask, keep, self.axes)
        else:
            self.weight_mask.set_value(keep)

    def set_block_sparse(self, bsm: "kernels.BlockSparseMatrix") -> None:
        """Inference form of a block-masked layer: ``kernel`` becomes the live blocks ``values [n_live, bk, bn]``
        of ``(W + s·A@B) ⊙ M`` and the forward runs the block-sparse kernel, which skips the pruned blocks
        (LoRA and mask are folded in and dropped)."""
        self.kernel = nnx.Param(bsm.values)
        self.kernel_scale = nnx.data(None)
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.weight_mask = nnx.data(None)
        self.block_layout = bsm.layout

    def bake_weight_mask(self) -> None:
        """Inference form of an element-masked float layer: ``kernel`` becomes ``merged_kernel()``, i.e.
        ``(W + s·A@B) ⊙ M`` computed once (LoRA and mask dropped), so the forward is one dense matmul."""
        w = self.merged_kernel()
        self.kernel = with_axes(nnx.Param, w, self.axes)
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.weight_mask = nnx.data(None)

    def base_kernel(self) -> jax.Array:
        """W [in, out], dequantised (``q · s``, in the scale's dtype) when stored int8."""
        if self.block_layout is not None:
            return kernels.BlockSparseMatrix(self.kernel[...], self.block_layout).to_dense()
        if self.kernel_scale is None:
            return self.kernel[...]
        return dequantize(self.kernel[...], self.kernel_scale[...])

    def merged_kernel(self) -> jax.Array:
        """The layer's whole weight [in, out], what merging and export write: ``adapted_kernel()`` (an adapter that
        rescales it, DoRA, overrides this)."""
        return self.adapted_kernel()

    def adapted_kernel(self) -> jax.Array:
        """``(W + s·A@B) ⊙ M``: [in, out], the kernel ``product`` multiplies by."""
        w = self.base_kernel()
        if (lr := self.low_rank()) is not None:
            w = w + lr[2] * (lr[0] @ lr[1]).astype(w.dtype)
        if self.weight_mask is not None:
            w = jnp.where(self.weight_mask[...], w, jnp.zeros((), w.dtype))
        return w

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        y = self.product(x)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def product(self, x: jax.Array) -> jax.Array:
        """``x @ ((W + s·A@B) ⊙ M)`` without the bias, by whichever path the layer's form takes: x [..., in] ->
        [..., out]. Adapters that rescale the output (``adapters/dora.py``) build on it."""
        lr = self.low_rank() if self.block_layout is None else None
        if self.block_layout is not None:
            y = sharded.block_sparse_matmul(x, kernels.BlockSparseMatrix(self.kernel[...], self.block_layout),
                                            self.kernel_mesh)
        elif self.weight_mask is not None:
            if self.impl == "pallas":
                w = self.base_kernel()
                if lr is not None:
                    a, b, s = lr[0].astype(w.dtype), lr[1].astype(w.dtype), lr[2]
                else:  # a rank-1 zero adapter: the kernel then computes x @ (W ⊙ M)
                    a, b, s = jnp.zeros((w.shape[0], 1), w.dtype), jnp.zeros((1, w.shape[1]), w.dtype), 0.0
                y = sharded.masked_lowrank_matmul(x, w, a, b, self.weight_mask[...], s, self.kernel_mesh, self.axes)
            else:
                y = x @ self.adapted_kernel()
        elif self.kernel_scale is None and lr is not None and x.dtype == self.kernel.dtype == jnp.float32:
            y = lora_matmul(x, self.kernel[...], lr[0].astype(x.dtype), lr[1].astype(x.dtype), lr[2])  # ops/lora.py
        else:
            if self.kernel_scale is None:
                y = x @ self.kernel[...]
            else:  # the scale is per output column, so it applies after the matmul: (x @ q) · s
                y = int8_matmul(x, self.kernel[...], self.kernel_scale[...])
            if lr is not None:
                a, b = lr[0].astype(x.dtype), lr[1].astype(x.dtype)
                y = y + lr[2] * ((x @ a) @ b)
        return y


class RMSNorm(nnx.Module):
    """``w · cast(x / sqrt(mean(x²) + eps))`` with the norm in fp32 (HF's LlamaRMSNorm), or with ``one_plus``
    ``cast(x32 / sqrt(mean(x32²) + eps) · (1 + w32))`` (Gemma3RMSNorm: the scale in fp32 too, w 0-centred)."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32, weight: jax.Array | None = None,
                 one_plus: bool = False):
        self.eps, self.one_plus = eps, one_plus
        init = jnp.zeros((dim,), dtype) if one_plus else jnp.ones((dim,), dtype)
        self.weight = with_axes(nnx.Param, init if weight is None else jnp.asarray(weight, dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.one_plus:
            return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(dtype)
        return self.weight[...] * x32.astype(dtype)
