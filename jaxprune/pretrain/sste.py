"""S-STE (Hu, Zhu & Chen, NeurIPS 2024, arXiv 2409.09099): 2:4 sparse pretraining with a continuous
pruning function and a frozen per-tensor scale.

In our ``[in, out]`` layout, 2:4 groups run along the input (reduction) dim, as torch's ``[out, in]``
row-wise 2:4 (and SLoPe here). For a group ``a = (a₁..a₄)`` let ``t`` be its second-smallest ``|aᵢ|``:

    S_soft(a)ᵢ = sign(aᵢ) · max(|aᵢ| − t, 0)                   (soft-thresholding: at most 2 non-zeros)
    W̃ = β · S_soft(W)                                          (the forward weight, exactly 2:4)
    β = ⟨W₀, S_soft(W₀)⟩ / ‖S_soft(W₀)‖²                        (per tensor, from the init W₀, then frozen)
    y = x @ W̃ + b,   ∂L/∂W = ∂L/∂W̃                             (straight-through: the dense W trains)

``S_soft`` is continuous in W (a group whose 2nd and 3rd magnitudes cross passes through a state
with 3 zeros instead of flipping), which the paper shows removes the mask oscillation of hard-threshold
STE; β (the MSE-optimal rescale) is computed once: recomputing it every step makes the flip rate blow
up (paper §4.3). The paper's MVUE weight-gradient sparsification and FP8 are speed-ups on sparse tensor
cores and are not done here (the dense weight gradient is exact). The exported dense model holds W̃.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import UserError
from ..layers import Linear
from .registry import PRETRAIN, PretrainMethod

M = 4  # 2:4 groups of 4


class SSTEScale(nnx.Variable):
    """S-STE's frozen per-tensor β []: computed at init, never trained (lands in ``frozen``)."""


def soft_threshold_24(w: jax.Array, axis: int = 0) -> jax.Array:
    """``S_soft``: every 4 consecutive entries along ``axis`` shrunk by their 2nd-smallest ``|w|``. w's shape."""
    x = jnp.moveaxis(w, axis, -1)
    if x.shape[-1] % M:
        raise UserError(f"sste: 2:4 sparsity needs a dimension divisible by {M}, got {x.shape[-1]}")
    g = x.reshape(*x.shape[:-1], -1, M)
    t = jnp.sort(jnp.abs(g), axis=-1)[..., 1:2]
    out = jnp.sign(g) * jnp.maximum(jnp.abs(g) - t, 0)
    return jnp.moveaxis(out.reshape(x.shape), -1, axis)


def sste_scale(w: jax.Array) -> jax.Array:
    """β = ⟨w, S_soft(w)⟩ / ‖S_soft(w)‖² (1 when S_soft(w) = 0). [] float32"""
    s = soft_threshold_24(w).astype(jnp.float32)
    den = jnp.sum(s * s)
    return jnp.where(den > 0, jnp.sum(w.astype(jnp.float32) * s) / jnp.where(den > 0, den, 1), 1.0)


@jax.custom_vjp
def sste_weight(w: jax.Array, beta: jax.Array) -> jax.Array:
    """``β · S_soft(w)`` [in, out]; its vjp passes the cotangent straight to ``w`` (STE)."""
    return (beta * soft_threshold_24(w)).astype(w.dtype)


def _sste_fwd(w, beta):
    return sste_weight(w, beta), beta


def _sste_bwd(beta, g):
    return g, jnp.zeros_like(beta)


sste_weight.defvjp(_sste_fwd, _sste_bwd)


class SSTELinear(Linear):
    """``y = x @ (β·S_soft(W)) + b`` with a dense trainable ``kernel`` W [in, out] and a frozen β []."""

    def __init__(self, base: Linear):
        w = base.kernel[...]
        if base.in_features % M:
            raise UserError(f"sste: layer {base.in_features}x{base.out_features} needs its input dim divisible by "
                            f"{M} for 2:4 sparsity")
        super().__init__(base.in_features, base.out_features, axes=base.axes, kernel=w, dtype=w.dtype,
                         use_bias=base.bias is not None, bias=None if base.bias is None else base.bias[...])
        self.sste_beta = SSTEScale(sste_scale(w))

    def merged_kernel(self) -> jax.Array:
        """``β · S_soft(W)``: the 2:4 weight the forward uses. [in, out]"""
        return sste_weight(self.kernel[...], self.sste_beta[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        y = x @ self.merged_kernel().astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def sste_linears(model: nnx.Module):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, SSTELinear):
            yield tuple(path), node


PRETRAIN.register(PretrainMethod("sste", "y = x @ β·S_soft(W): continuous 2:4 soft threshold, frozen β, straight-through",
                                 lambda old, mc, rngs, dtype: SSTELinear(old)))
