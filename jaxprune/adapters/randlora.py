"""RandLoRA: a full-rank update from fixed random low-rank bases, of which only diagonal scalings train::

    ΔW = s · Σ_{j<n} B_j Λ_j A Γ_j          n = ⌈min(in, out) / r⌉ bases of rank r: n·r ≥ min(in, out)

A [r, min] and B_j [max, r] are random and frozen, one set shared by every layer of the model (sliced to each
layer's sizes); Λ_j = diag(λ[:, j]) [r] and Γ_j = diag(γ[j]) [min] train (λ [r, n] starts at 0, so ΔW = 0 at the
start; γ [n, min] at 1 / min). A always acts on the smaller dimension of the layer. s = α / r. In matrix form, as
PEFT computes it (torch ``[out, in]``; we store the transposes, ``[in, out]``)::

    U = (λ[:, :, None] · A[:, None, :] · γ[None]).reshape(r·n, min)      the scaled bases
    V = B[:max, :n, :].reshape(max, n·r)                                  the fixed bases
    ΔW_torch = s · V @ U  (in <= out)    or    s · (V @ U)ᵀ  (in > out)

(U's rows run over (rank, basis) and V's columns over (basis, rank): PEFT pairs them in that order, and so do we;
the bases being random, either pairing is a valid draw). The layer is ``Linear`` with ``low_rank()`` returning
these factors, so the one-matmul, int8 and element-masked products and ``merged_kernel`` are LoRA's.

The bases are drawn U(-1, 1) and divided by their sample standard deviation (PEFT draws kaiming-uniform, then
divides by the std the same way); they are ``nnx.Param`` (the frozen pytree, one copy for the model) and are drawn
again from ``--seed`` on resume. λ and γ are ``nnx.LoRAParam`` (γ with the logical axis of the smaller dimension).

Albert, Zhang, Saratchandran, Rodriguez-Opazo, van den Hengel, Abbasnejad 2025, "RandLoRA: Full-rank
parameter-efficient fine-tuning of large models", ICLR 2025, arXiv 2502.00987 (code: PaulAlbert31/RandLoRA).
Checked against huggingface/peft 0.21.0 ``src/peft/tuners/randlora/layer.py`` (``get_scaled_bases``,
``UniqueBaseGrad``) and ``model.py`` (the shared bases) in ``tests/test_adapters.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ..layers import Linear, with_axes
from .registry import Adapter, register_adapter, take_over


def num_bases(min_dim: int, rank: int) -> int:
    """⌈min_dim / rank⌉: enough rank-r bases for a full-rank update."""
    return math.ceil(min_dim / rank)


class RandLoRABases(nnx.Module):
    """The random bases every RandLoRA layer of a model shares: ``a`` [r, min], ``b`` [max, n, r] (frozen), sized
    for the largest targeted layer (``max`` / ``min``: of the largest in and out sizes, as PEFT's ``_find_dim``)."""

    def __init__(self, rank: int, max_dim: int, min_dim: int, key: jax.Array):
        ka, kb = jax.random.split(key)
        a = jax.random.uniform(ka, (rank, min_dim), jnp.float32, -1.0, 1.0)
        b = jax.random.uniform(kb, (max_dim, num_bases(min_dim, rank), rank), jnp.float32, -1.0, 1.0)
        self.a = nnx.Param(a / jnp.std(a, ddof=1))
        self.b = nnx.Param(b / jnp.std(b, ddof=1))


class RandLoRALinear(Linear):
    """``y = x @ ((W + s·U@V) ⊙ M) + b`` with U, V composed from the shared bases and the trained λ [r, n], γ [n, min]
    (see the module docstring). Built from a LoRA-carrying ``Linear``: its rank and scale s are taken, its A, B
    dropped. Element-masked layers take the XLA path (the Pallas kernel is built for small ranks; n·r ≥ min)."""

    adapter_name = "randlora"

    def __init__(self, lin: Linear, bases: RandLoRABases):
        if not lin.has_lora or lin.block_layout is not None or lin.kernel is None:
            raise ValueError("RandLoRALinear is built from a dense (or int8) Linear with LoRA factors")
        rank = int(lin.lora_a[...].shape[1])
        super().__init__(lin.in_features, lin.out_features, axes=lin.axes, with_kernel=False)
        take_over(self, lin)
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)
        self.impl = "xla"
        self.rank = rank
        small = min(self.in_features, self.out_features)
        self.num_bases = num_bases(small, rank)
        self.randlora_bases = bases
        small_axis = self.axes[0] if small == self.in_features else self.axes[1]
        self.randlora_lambda = with_axes(nnx.LoRAParam, jnp.zeros((rank, self.num_bases), jnp.float32),
                                         ("lora_rank", None))
        self.randlora_gamma = with_axes(nnx.LoRAParam, jnp.full((self.num_bases, small),
                                                                1.0 / max(self.num_bases, small), jnp.float32),
                                        (None, small_axis))

    def low_rank(self) -> tuple[jax.Array, jax.Array, float] | None:
        """(U [in, n·r], V [n·r, out], s): ``s·U@V`` is the update ΔW [in, out] (None once folded: block-sparse)."""
        if self.randlora_lambda is None:
            return None
        r, n = self.rank, self.num_bases
        small, large = sorted((self.in_features, self.out_features))
        a = self.randlora_bases.a[...][:, :small]
        b = self.randlora_bases.b[...][:large, :n, :]
        scaled = (self.randlora_lambda[...][:, :, None] * a[:, None, :] * self.randlora_gamma[...][None])
        scaled = scaled.reshape(r * n, small).astype(b.dtype)
        fixed = b.reshape(large, n * r)
        if small == self.in_features:  # torch: x -> x @ scaledᵀ -> @ fixedᵀ
            return scaled.T, fixed.T, self.lora_scale
        return fixed, scaled, self.lora_scale

    def set_block_sparse(self, bsm) -> None:
        super().set_block_sparse(bsm)  # holds merged_kernel(): the update is folded in
        self.randlora_lambda = nnx.data(None)
        self.randlora_gamma = nnx.data(None)


def _shared(lins: list[Linear], rngs: nnx.Rngs) -> RandLoRABases:
    ranks = {int(l.lora_a[...].shape[1]) for l in lins}
    if len(ranks) != 1:
        raise ValueError(f"RandLoRA shares one rank across the model (got {sorted(ranks)})")
    big_out, big_in = max(l.out_features for l in lins), max(l.in_features for l in lins)
    return RandLoRABases(ranks.pop(), max(big_out, big_in), min(big_out, big_in), rngs.params())


RANDLORA = register_adapter(Adapter(
    "randlora", summary="W + s·Σ_j B_j Λ_j A Γ_j: fixed random bases shared by all layers (frozen), full rank; "
                        "only the diagonal scalings λ [r, n], γ [n, min] train (n = ⌈min(in, out)/r⌉)",
    convert=lambda lin, rngs, shared: RandLoRALinear(lin, shared), shared=_shared,
    citation="Albert et al. 2025, RandLoRA: Full-rank parameter-efficient fine-tuning of large models, ICLR 2025, "
             "arXiv 2502.00987 (PaulAlbert31/RandLoRA); huggingface/peft 0.21.0 src/peft/tuners/randlora/layer.py, "
             "model.py",
    lora_guided=False, saves_unmerged=False,
    unsupported=(("pallas", "the masked low-rank kernel is built for small ranks and RandLoRA's update has rank "
                            "⌈min/r⌉·r (full); element-masked RandLoRA layers run on XLA"),)))
