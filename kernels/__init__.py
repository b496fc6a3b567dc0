"""jaxprune Pallas kernels (issue 7), importable as ``jaxprune.kernels``.

* :func:`block_sparse_matmul` / :class:`BlockSparseMatrix`: ``y = x @ W`` touching only live blocks.
* :func:`masked_lowrank_matmul`: ``y = x @ ((W + s·A@B) ⊙ M)`` without materialising the merged weight.
* ``*_vjp``: the backward kernels alone (cotangents as partial sums), for ``jaxprune.ops.sharded``, which runs
  the kernels under ``shard_map`` on a device mesh and reduces the partial sums itself.

Every entry point takes ``impl`` ("auto" | "xla" | "pallas" | "pallas_tpu" | "pallas_gpu") and
``interpret``; on CPU "pallas" runs the kernels in interpret mode.  ``reference`` holds the pure-jnp
specification the kernels are tested against.
"""

from . import block_sizes, reference
from .block_sizes import BLOCK_SIZES, IMPLS, TileSizes, resolve_impl, tile_sizes
from .block_sparse import (BlockLayout, BlockSparseMatrix, block_sparse_matmul, block_sparse_matmul_vjp,
                           block_sparse_matmul_with_counts)
from .masked_lowrank import masked_lowrank_matmul, masked_lowrank_matmul_vjp

__all__ = [
    "BLOCK_SIZES", "IMPLS", "BlockLayout", "BlockSparseMatrix", "TileSizes", "block_sizes",
    "block_sparse_matmul", "block_sparse_matmul_vjp", "block_sparse_matmul_with_counts", "masked_lowrank_matmul",
    "masked_lowrank_matmul_vjp", "reference",
    "resolve_impl", "tile_sizes",
]
