"""SparseAdapter: a wider LoRA pruned at initialisation to a fixed sparse support ("Large-Sparse")::

    y = x @ W + s·(x @ (A ⊙ M_A)) @ (B ⊙ M_B) + b          A [in, R], B [R, out], M_A, M_B fixed booleans
    R = ⌈r / d⌉,   |M_A| = round(d·in·R),   |M_B| = round(d·R·out)

r = ``--lora-rank``, d = the density (kept fraction, ``DENSITY`` = 0.5 for the registered ``sparse``): the adapter
is 1/d times LoRA's rank with a fraction d of each factor's entries kept, so its live trainable parameters,
d·R·(in + out) ≈ r·(in + out), match the rank-r LoRA it replaces (the paper's "Large-Sparse": a larger adapter under
the same parameter budget). s = α / r, LoRA's at ``--lora-alpha`` / ``--lora-rank`` (the budget's LoRA, not α / R).
A ~ U(±1/√in) (LoRA's draw, at rank R) with its pruned entries set to 0, B = 0: ΔW = 0 at the start.

The support is chosen once, at initialisation, by the paper's *random* criterion (exactly ``round(d·size)``
entries of each factor, uniformly; drawn from ``--seed``, so a resume draws it again): B starts at 0, so the
magnitude and SNIP scores |B| and |B ⊙ ∇B| are all 0 there and cannot rank it, and the paper reports random
pruning at init as close to the data-driven criteria. M_A and M_B are ``nnx.Param`` (bool): the frozen pytree, as
the design puts a fixed sparse support. A and B are ``nnx.LoRAParam`` ``lora_a`` / ``lora_b`` stored dense: the
gradient of a pruned entry is 0 (the forward multiplies through the mask), so under SGD / Adam / AdamW (decoupled
decay of a 0) it stays exactly 0. The optimizer state is therefore the dense size of A and B, 1/d times the live
count (what ``trainable_params`` reports); storing values on indices (as SLTrain's S) would save that.

Because A ⊙ M_A and B ⊙ M_B are a LoRA pair, the layer is ``Linear`` with ``low_rank()`` returning them: the
one-matmul, int8, element-masked and Pallas products and ``merged_kernel`` (W + s·(A⊙M_A)@(B⊙M_B)) are LoRA's, and
LoRAPrune's importance reads its A, B (``lora_guided``). Another density registers as an adapter of its own, e.g.
from a plugin (``jaxprune.methods`` entry point)::

    from jaxprune.adapters.registry import register_adapter
    from jaxprune.adapters.sparse import sparse_adapter
    register_adapter(sparse_adapter(0.25, name="sparse-d25"))     # rank 4r, a quarter of each factor kept

He, Ding, Dong, Zhang, Tao 2022, "SparseAdapter: An Easy Approach for Improving the Parameter-Efficiency of
Adapters", Findings of EMNLP 2022, arXiv 2210.04284 (code: Shwai-He/SparseAdapter). huggingface/peft 0.21.0 has no
implementation; ``tests/test_adapters_more.py`` checks the formula against numpy (forward, merge, one SGD step, the
pruned entries staying 0).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ..layers import Linear, with_axes
from .registry import Adapter, register_adapter, take_over

DENSITY = 0.5  #: the registered ``sparse`` adapter's kept fraction of each factor (rank 2r)


def sparse_rank(rank: int, density: float) -> int:
    """R = ⌈r / d⌉: the wider rank whose d-dense factors hold about as many live entries as rank r's dense ones."""
    return max(1, math.ceil(rank / density - 1e-9))


def random_support(key: jax.Array, shape: tuple[int, ...], density: float) -> jax.Array:
    """A boolean mask of ``shape`` with exactly ``max(1, round(density · size))`` True entries, uniformly placed."""
    size = math.prod(shape)
    keep = min(size, max(1, round(density * size)))
    order = jnp.argsort(jax.random.uniform(key, (size,)))
    return jnp.zeros((size,), jnp.bool_).at[order[:keep]].set(True).reshape(shape)


class SparseAdapterLinear(Linear):
    """``y = x @ ((W + s·(A⊙M_A)@(B⊙M_B)) ⊙ M) + b`` (see the module docstring). Built from a LoRA-carrying ``Linear``:
    its scale s is kept, its A, B replaced by rank-⌈r/d⌉ ones on a random support drawn from ``key``."""

    adapter_name = "sparse"

    def __init__(self, lin: Linear, key: jax.Array, density: float = DENSITY):
        if not lin.has_lora or lin.block_layout is not None or lin.kernel is None:
            raise ValueError("SparseAdapterLinear is built from a dense (or int8) Linear with LoRA factors")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"SparseAdapter density {density}: must be in (0, 1]")
        r = int(lin.lora_a[...].shape[1])
        rank = sparse_rank(r, density)
        super().__init__(lin.in_features, lin.out_features, axes=lin.axes, with_kernel=False)
        take_over(self, lin)
        self.density = float(density)
        ka, kma, kmb = jax.random.split(key, 3)
        dtype = lin.lora_a[...].dtype
        mask_a = random_support(kma, (self.in_features, rank), density)
        mask_b = random_support(kmb, (rank, self.out_features), density)
        bound = 1.0 / math.sqrt(self.in_features)
        a = jax.random.uniform(ka, (self.in_features, rank), dtype, -bound, bound)
        self.set_lora(jnp.where(mask_a, a, jnp.zeros((), dtype)), jnp.zeros((rank, self.out_features), dtype),
                      lin.lora_scale)
        self.sparse_mask_a = with_axes(nnx.Param, mask_a, (self.axes[0], "lora_rank"))
        self.sparse_mask_b = with_axes(nnx.Param, mask_b, ("lora_rank", self.axes[1]))

    def low_rank(self) -> tuple[jax.Array, jax.Array, float] | None:
        """(A ⊙ M_A [in, R], B ⊙ M_B [R, out], s); None once folded (block-sparse)."""
        if not self.has_lora:
            return None
        a, b = self.lora_a[...], self.lora_b[...]
        return (jnp.where(self.sparse_mask_a[...], a, jnp.zeros((), a.dtype)),
                jnp.where(self.sparse_mask_b[...], b, jnp.zeros((), b.dtype)), self.lora_scale)

    def set_block_sparse(self, bsm) -> None:
        super().set_block_sparse(bsm)  # holds merged_kernel(): the update is folded in
        self.sparse_mask_a = nnx.data(None)
        self.sparse_mask_b = nnx.data(None)


def sparse_adapter(density: float = DENSITY, name: str = "sparse") -> Adapter:
    """An ``Adapter`` (not registered) building ``SparseAdapterLinear`` at ``density``; each layer draws its own
    support and A from the adapter's stream."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"SparseAdapter density {density}: must be in (0, 1]")
    return Adapter(
        name, summary=f"W + s·(A⊙M_A)@(B⊙M_B): LoRA of rank ⌈r/{density:g}⌉ pruned at init to a fixed random "
                      f"{density:g}-dense support (frozen), about rank r's live parameters (Large-Sparse)",
        convert=lambda lin, rngs, shared: SparseAdapterLinear(lin, rngs.params(), density),
        citation="He et al. 2022, SparseAdapter: An Easy Approach for Improving the Parameter-Efficiency of Adapters, "
                 "Findings of EMNLP 2022, arXiv 2210.04284 (Shwai-He/SparseAdapter); not in huggingface/peft 0.21.0 "
                 "(checked against numpy)",
        lora_guided=True, saves_unmerged=False)


SPARSE = register_adapter(sparse_adapter(DENSITY, "sparse"))
