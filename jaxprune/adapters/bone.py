"""Bone (renamed MiSS in PEFT): one trained block D [r, out] shared by every r-row shard of the weight::

    ΔW[i, o] = D[i mod r, o]                        [in, out]   (W split into ⌈in / r⌉ row blocks, each + D)
    y = x @ (W + ΔW) + b = x @ W + (Σ_k x[k·r : (k+1)·r]) @ D + b      (x zero-padded to a multiple of r)

That is a LoRA update with a fixed A and s = 1: ``ΔW = E @ D``, E [in, r] the 0/1 matrix ``E[i, j] = [i mod r =
j]`` (built from iota, not stored) and D trained (``nnx.LoRAParam`` ``bone_block``, 0 at the start, so ΔW = 0). The
layer is ``Linear`` with ``low_rank()`` returning (E, D, 1), so the one-matmul, int8, element-masked and Pallas
products and ``merged_kernel`` are LoRA's. Trainable parameters per layer: r·out (LoRA's: r·(in + out)). The rank is
``--lora-rank`` (r ≤ in); ``--lora-alpha`` is not used (PEFT's MiSS has no scaling: ``scale_layer`` warns and keeps 1).

This is PEFT's default variant (``MissConfig(init_weights=True)``, "balance": ``MissLinear.forward`` sums the
r-sized chunks of x and multiplies by ``miss_block``; ``get_delta_weight_miss`` adds the block to every shard of
torch's ``weight [out, in]`` along ``in``; our [in, out] kernel is its transpose). Not implemented: the 'bat'
variant (``W + W_blocks @ D + D`` per [r, r] block, the block-affine update of the paper's title) and 'mini'
(D [r, mini_r] repeated along ``out``).

Kang 2024, "Bone: Block-Affine Adaptation of Large Language Models" (arXiv 2409.15371; later "MiSS: Balancing LoRA
Performance and Efficiency with Simple Shard Sharing", code: JL-er/MiSS). Checked against huggingface/peft 0.21.0
``src/peft/tuners/miss/layer.py`` (``MissLinear.forward``, ``get_delta_weight_miss``) in
``tests/test_adapters_more.py``: logits before and after merging and one SGD step, with and without in % r ≠ 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import UserError, field_ref
from ..layers import Linear, with_axes
from .registry import Adapter, register_adapter, take_over


def shard_sum_matrix(in_features: int, rank: int, dtype=jnp.float32) -> jax.Array:
    """E [in, r], ``E[i, j] = 1 if i mod r == j else 0``: ``x @ E`` sums the r-sized chunks of x (zero-padded)."""
    return (jnp.arange(in_features)[:, None] % rank == jnp.arange(rank)[None, :]).astype(dtype)


class BoneLinear(Linear):
    """``y = x @ ((W + E@D) ⊙ M) + b`` with E the fixed shard-sum matrix and D [r, out] trained (see the module
    docstring). Built from a LoRA-carrying ``Linear``: its rank is taken, its A, B and scale dropped."""

    adapter_name = "bone"

    def __init__(self, lin: Linear):
        if not lin.has_lora or lin.block_layout is not None or lin.kernel is None:
            raise ValueError("BoneLinear is built from a dense (or int8) Linear with LoRA factors")
        rank = int(lin.lora_a[...].shape[1])
        if rank > lin.in_features:
            raise UserError(f"{field_ref('adapter')} bone: rank {rank} is larger than a targeted layer's input size "
                            f"{lin.in_features} (Bone's blocks are r rows of the weight)", field="lora_rank",
                            value=rank)
        super().__init__(lin.in_features, lin.out_features, axes=lin.axes, with_kernel=False)
        take_over(self, lin)
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)
        self.rank = rank
        self.bone_block = with_axes(nnx.LoRAParam, jnp.zeros((rank, self.out_features), jnp.float32),
                                    ("lora_rank", self.axes[1]))

    def low_rank(self) -> tuple[jax.Array, jax.Array, float] | None:
        """(E [in, r], D [r, out], 1.0): ``E@D`` is the update ΔW [in, out] (None once folded: block-sparse)."""
        if self.bone_block is None:
            return None
        d = self.bone_block[...]
        return shard_sum_matrix(self.in_features, self.rank, d.dtype), d, 1.0

    def set_block_sparse(self, bsm) -> None:
        super().set_block_sparse(bsm)  # holds merged_kernel(): the update is folded in
        self.bone_block = nnx.data(None)


BONE = register_adapter(Adapter(
    "bone", summary="W + E@D: one trained block D [r, out] added to every r-row shard of W (PEFT's MiSS, "
                    "default 'balance' variant; r·out trained per layer, --lora-alpha unused)",
    convert=lambda lin, rngs, shared: BoneLinear(lin),
    citation="Kang 2024, Bone: Block-Affine Adaptation of Large Language Models (MiSS), arXiv 2409.15371 "
             "(JL-er/MiSS); huggingface/peft 0.21.0 src/peft/tuners/miss/layer.py",
    lora_guided=False, saves_unmerged=False))
