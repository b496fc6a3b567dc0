"""DoRA: weight-decomposed low-rank adaptation. A LoRA update sets the direction, a trained magnitude the length
of every output feature's weight vector::

    V  = (W0 + s·A@B) ⊙ M                  [in, out]   (M: an element mask, when the model has one)
    W' = m ⊙ V / ‖V‖_c                     ‖V‖_c [out]: the L2 norm of each output column of V (over ``in``)
    y  = x @ W' + b = (m / ‖V‖_c) ⊙ (x @ V) + b

A [in, r], B [r, out] and m [out] train; m starts at ‖W0 ⊙ M‖_c (so W' = W0 at the start, B being 0). ‖V‖_c is
a constant to the gradient (the paper's §4.3: "we suggest treating ‖V + ΔV‖_c in Eq. (5) as a constant, thereby
detaching it from the gradient graph"), as in the authors' code and PEFT. Our kernels are [in, out], so the norm of
torch's ``weight [out, in]`` over ``dim=1`` is ours over axis 0. The bias is not rescaled (PEFT subtracts it
from the base output before scaling). Merging folds ``m / ‖V‖_c`` into the kernel's columns.

The forward is ``Linear.product`` (whichever path the layer's form takes: one-matmul LoRA, int8 ``(x @ q) · s``,
the Pallas masked low-rank kernel) times m / ‖V‖_c; the norm is taken over V formed in XLA (an int8 base is
dequantised for it, as PEFT's ``dequantize_module_weight``), so every layer forms its dense V once per forward.

Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
arXiv 2402.09353 (code: NVlabs/DoRA). Checked against huggingface/peft 0.21.0 ``src/peft/tuners/lora/dora.py``
(``DoraLinearLayer.get_weight_norm`` / ``forward``) and ``variants.py`` (``DoraLinearVariant.merge_safe``) in
``tests/test_adapters.py``: logits before and after merging and one SGD step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import field_ref
from ..layers import Linear, with_axes
from .registry import Adapter, register_adapter, take_over


def column_norm(v: jax.Array) -> jax.Array:
    """‖V‖_c: the L2 norm of each output column of ``v`` [in, out] -> [out], in float32."""
    v = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v * v, axis=0))


class DoRALinear(Linear):
    """``y = (m / ‖V‖_c) ⊙ (x @ V) + b``, V = (W + s·A@B) ⊙ M (see the module docstring).

    Built from a LoRA-carrying ``Linear`` (its Variables are taken over as they are: kernel, int8 scale, bias,
    A, B, element mask); adds ``dora_magnitude`` m [out], an fp32 ``nnx.LoRAParam`` with the output's logical axis.
    """

    adapter_name = "dora"

    def __init__(self, lin: Linear):
        if not lin.has_lora:
            raise ValueError("DoRALinear is built from a Linear with LoRA factors (Linear.add_lora)")
        if lin.block_layout is not None or lin.kernel is None:
            raise ValueError("DoRALinear needs a dense (or int8) kernel")
        super().__init__(lin.in_features, lin.out_features, axes=lin.axes, with_kernel=False)
        take_over(self, lin)
        m = column_norm(self.adapted_kernel()).astype(self.lora_a[...].dtype)
        self.dora_magnitude = with_axes(nnx.LoRAParam, m, self.axes[1:])

    def direction_scale(self) -> jax.Array:
        """m / ‖V‖_c [out] (float32), the norm detached from the gradient; a zero column divides by 1."""
        n = column_norm(jax.lax.stop_gradient(self.adapted_kernel()))
        return self.dora_magnitude[...].astype(jnp.float32) / jnp.where(n > 0, n, 1.0)

    def merged_kernel(self) -> jax.Array:
        """``W' = V · m / ‖V‖_c`` [in, out]."""
        w = self.adapted_kernel()
        if self.dora_magnitude is None:
            return w
        return w * self.direction_scale().astype(w.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        y = self.product(x)
        if self.dora_magnitude is not None:
            y = y * self.direction_scale().astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def set_block_sparse(self, bsm) -> None:
        """The block-sparse inference form holds ``merged_kernel()`` (m / ‖V‖_c folded in): m goes with A, B."""
        super().set_block_sparse(bsm)
        self.dora_magnitude = nnx.data(None)


DORA = register_adapter(Adapter(
    "dora", summary="m ⊙ (W + s·A@B) / ‖W + s·A@B‖_c (A, B and a magnitude m per output feature trained)",
    convert=lambda lin, rngs, shared: DoRALinear(lin),
    citation="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024, arXiv 2402.09353 "
             "(NVlabs/DoRA); huggingface/peft 0.21.0 src/peft/tuners/lora/dora.py, variants.py",
    lora_guided=True, saves_unmerged=False,
    unsupported=(("distill", f"the teacher is the base with every trainable factor zeroed, and a zero magnitude "
                             f"zeroes a DoRA layer; distil with {field_ref('adapter')} lora"),)))
