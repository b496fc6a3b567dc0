"""Block-sparse matmul ``y = x @ W`` where only the live ``bs_k x bs_n`` blocks of ``W`` are stored,
loaded and multiplied (issue 7, part 1).

Storage (:class:`BlockSparseMatrix`): ``values [n_live, bs_k, bs_n]`` in CSC block order (by output
block-column, then k-block), plus a static, hashable :class:`BlockLayout` of index tables:

* ``col_ptr [nb_n + 1]``, ``row_idx [n_live]``: column ``j``'s live blocks are
  ``values[col_ptr[j]:col_ptr[j+1]]`` at k-blocks ``row_idx[...]`` (forward walk);
* ``row_ptr [nb_k + 1]``, ``col_idx [n_live]``, ``perm [n_live]``: the transposed (CSR) walk used
  by the backward ``dx = dy @ Wᵀ``; k-block ``r``'s blocks are ``values[perm[row_ptr[r]:row_ptr[r+1]]]``.

Kernels (both run in interpret mode on CPU):

* ``tpu`` flavour: grid ``(m-blocks, out-block-columns, max live blocks per column)``; the index
  tables are scalar-prefetched (``pltpu.PrefetchScalarGridSpec``) and drive the BlockSpec index
  maps, so only live blocks are DMA'd.  Steps past a column's live count re-use the previous
  block index (Pallas skips the copy when the block index does not change) and are masked with
  ``pl.when``; see :func:`walk_block`.
* ``gpu`` flavour (Triton style): grid ``(m-blocks, out-block-columns)``; each program loops
  ``for t in range(ptr[c], ptr[c+1])`` and loads ``values[vid[t]]`` and the matching x slice.

Backward (``jax.custom_vjp``): ``dx = dy @ Wᵀ`` by the same walk over the transposed tables, and
``dvalues[b] = x[:, kb(b)]ᵀ @ dy[:, nb(b)]`` only for live blocks (same layout as ``values``).

Padding: ``W`` is zero-padded to whole blocks in :meth:`BlockSparseMatrix.from_dense`; ``x`` is
zero-padded to ``[round_up(M, bm), K_pad]``; the output is sliced back to ``[..., N]``.

Hardware constraints on the block size (not checked on CPU): TPU wants ``bs_n`` a multiple of 128
and ``bs_k`` a multiple of 8 (16 for bf16); Triton wants powers of 2 >= 16.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import reference
from .block_sizes import fit_tile, pad_to, resolve_impl, round_up, tile_sizes

# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Static (hashable) block structure of a block-sparse ``[K, N]`` matrix; see module docstring."""

    shape: tuple[int, int]
    block_size: tuple[int, int]
    grid: tuple[int, int]
    col_ptr: tuple[int, ...]
    row_idx: tuple[int, ...]
    row_ptr: tuple[int, ...]
    col_idx: tuple[int, ...]
    perm: tuple[int, ...]

    @classmethod
    def from_block_mask(cls, block_mask, block_size, shape) -> "BlockLayout":
        """Layout of the live blocks of ``block_mask [ceil(K/bs_k), ceil(N/bs_n)]`` (bool, concrete)."""
        bm = np.asarray(block_mask, bool)
        grid = (-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]))
        if bm.shape != grid:
            raise ValueError(f"block_mask shape {bm.shape} != block grid {grid} of {shape} / {block_size}")
        cols, rows = np.nonzero(bm.T)  # CSC order: by column, then row
        csr = np.lexsort((cols, rows))  # CSR order of the same (value) indices
        as_t = lambda a: tuple(int(v) for v in a)  # noqa: E731
        return cls(shape=as_t(shape), block_size=as_t(block_size), grid=grid,
                   col_ptr=as_t(np.r_[0, np.cumsum(bm.sum(0))]), row_idx=as_t(rows),
                   row_ptr=as_t(np.r_[0, np.cumsum(bm.sum(1))]), col_idx=as_t(cols[csr]), perm=as_t(csr))

    @property
    def n_live(self) -> int:
        return len(self.row_idx)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.grid[0] * self.block_size[0], self.grid[1] * self.block_size[1]

    @property
    def value_cols(self) -> np.ndarray:
        """n-block index of each stored block ``values[b]``, ``[n_live]``."""
        return np.repeat(np.arange(self.grid[1]), np.diff(self.col_ptr))

    @property
    def block_mask(self) -> np.ndarray:
        """``[nb_k, nb_n]`` bool."""
        m = np.zeros(self.grid, bool)
        m[np.asarray(self.row_idx, int), self.value_cols] = True
        return m

    @property
    def max_per_col(self) -> int:
        return int(np.diff(self.col_ptr).max(initial=0))

    @property
    def max_per_row(self) -> int:
        return int(np.diff(self.row_ptr).max(initial=0))


@jax.tree_util.register_pytree_node_class
class BlockSparseMatrix:
    """A block-sparse ``[K, N]`` weight: pytree with one leaf ``values [n_live, bs_k, bs_n]`` and a
    static :class:`BlockLayout` (so jit specialises on the sparsity pattern, which is fixed after pruning)."""

    def __init__(self, values: jax.Array, layout: BlockLayout):
        self.values, self.layout = values, layout

    def tree_flatten(self):
        return (self.values,), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(children[0], layout)

    shape = property(lambda self: self.layout.shape)
    block_size = property(lambda self: self.layout.block_size)
    n_live = property(lambda self: self.layout.n_live)
    dtype = property(lambda self: self.values.dtype)

    def __repr__(self):
        lay = self.layout
        return (f"BlockSparseMatrix(shape={lay.shape}, block_size={lay.block_size}, "
                f"live={lay.n_live}/{lay.grid[0] * lay.grid[1]}, dtype={self.values.dtype})")

    @classmethod
    def from_dense(cls, w: jax.Array, block_mask=None, block_size=(128, 128)) -> "BlockSparseMatrix":
        """Compress ``w [K, N]`` keeping the blocks where ``block_mask`` is True.

        ``block_mask [ceil(K/bs_k), ceil(N/bs_n)]`` must be concrete; if None it is derived from the
        nonzero blocks of a concrete ``w``.  ``w`` is zero-padded to whole blocks.
        """
        k, n = w.shape
        bk, bn = block_size
        grid = (-(-k // bk), -(-n // bn))
        blocks = pad_to(jnp.asarray(w), (grid[0] * bk, grid[1] * bn))
        blocks = blocks.reshape(grid[0], bk, grid[1], bn).transpose(0, 2, 1, 3)  # [nb_k, nb_n, bk, bn]
        if block_mask is None:
            block_mask = np.asarray(jnp.any(blocks != 0, axis=(2, 3)))
        layout = BlockLayout.from_block_mask(block_mask, (bk, bn), (k, n))
        values = blocks[np.asarray(layout.row_idx, int), layout.value_cols]
        return cls(values, layout)

    def to_dense(self) -> jax.Array:
        """The dense ``[K, N]`` matrix (zeros outside live blocks); differentiable in ``values``."""
        lay = self.layout
        (gk, gn), (bk, bn) = lay.grid, lay.block_size
        dense = jnp.zeros((gk, gn, bk, bn), self.values.dtype)
        dense = dense.at[np.asarray(lay.row_idx, int), lay.value_cols].set(self.values)
        dense = dense.transpose(0, 2, 1, 3).reshape(gk * bk, gn * bn)
        return dense[: lay.shape[0], : lay.shape[1]]


# --------------------------------------------------------------------------------------------
# Walk tables: out[:, c] = sum_{t in ptr[c]..ptr[c+1]} x[:, idx[t]] @ op(values[vid[t]])
# --------------------------------------------------------------------------------------------


class Walk(NamedTuple):
    """Index tables of one block walk (int32): ``ptr [C + 1]``, ``idx [L]`` (x block), ``vid [L]``."""

    ptr: jax.Array
    idx: jax.Array
    vid: jax.Array
    max_count: int  # static grid extent (>= 1)


def forward_walk(layout: BlockLayout) -> Walk:
    """Walk for ``y = x @ W``: output block-columns are W's n-blocks (CSC tables)."""
    return _make_walk(layout.col_ptr, layout.row_idx, range(layout.n_live), layout.max_per_col)


def transposed_walk(layout: BlockLayout) -> Walk:
    """Walk for ``dx = dy @ Wᵀ``: output block-columns are W's k-blocks (CSR tables)."""
    return _make_walk(layout.row_ptr, layout.col_idx, layout.perm, layout.max_per_row)


def _make_walk(ptr, idx, vid, max_count) -> Walk:
    # An empty matrix still gets one (never multiplied) entry, so every BlockSpec has a block.
    idx, vid = (tuple(idx) or (0,)), (tuple(vid) or (0,))
    i32 = lambda a: jnp.asarray(np.asarray(a, np.int32))  # noqa: E731
    return Walk(i32(ptr), i32(idx), i32(vid), max(1, int(max_count)))


def walk_block(ptr, c, t):
    """Table position visited at step ``t`` of output column ``c``: ``max(min(ptr[c] + t, ptr[c+1] - 1), 0)``.

    Steps ``t >= count(c)`` repeat the column's last live block, and an empty column repeats the
    previous column's last block, so the block index does not change and no new DMA is issued."""
    return jnp.maximum(jnp.minimum(ptr[c] + t, ptr[c + 1] - 1), 0)


def walk_x_index_map(i, c, t, ptr, idx, vid):
    """BlockSpec index map of the x operand in the ``tpu`` walk kernel: ``(i, idx[pos])``."""
    return i, idx[walk_block(ptr, c, t)]


def walk_w_index_map(i, c, t, ptr, idx, vid):
    """BlockSpec index map of ``values`` in the ``tpu`` walk kernel: ``(vid[pos], 0, 0)``."""
    return vid[walk_block(ptr, c, t)], 0, 0


def _dot(a, w, transpose_w: bool):
    """``a @ w`` (or ``a @ wᵀ``) with float32 accumulation."""
    dims = (((1,), (1 if transpose_w else 0,)), ((), ()))
    return jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)


# ---- tpu flavour ----------------------------------------------------------------------------


def _walk_kernel_tpu(ptr_ref, idx_ref, vid_ref, x_ref, w_ref, o_ref, *cnt_ref, transpose_w):
    """Grid step ``(i, c, t)``: ``o[i, c] += x[i, idx[pos]] @ op(values[vid[pos]])`` if ``t < count(c)``."""
    c, t = pl.program_id(1), pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        o_ref[...] = jnp.zeros_like(o_ref)
        for r in cnt_ref:
            r[...] = jnp.zeros_like(r)

    @pl.when(t < ptr_ref[c + 1] - ptr_ref[c])
    def _accumulate():
        o_ref[...] += _dot(x_ref[...], w_ref[0], transpose_w)
        for r in cnt_ref:
            r[...] += 1


def _walk_tpu(x, values, walk: Walk, *, transpose_w, bm, interpret, with_counts):
    """``[Mp, Kx] -> [Mp, C * bo]`` float32 (+ ``counts [Mp/bm, C]``) with the scalar-prefetch grid."""
    mp = x.shape[0]
    bk, bn = values.shape[1:]
    bx, bo = (bn, bk) if transpose_w else (bk, bn)
    n_out = walk.ptr.shape[0] - 1
    out_shape = [jax.ShapeDtypeStruct((mp, n_out * bo), jnp.float32)]
    out_specs = [pl.BlockSpec((bm, bo), lambda i, c, t, *_: (i, c))]
    if with_counts:
        out_shape.append(jax.ShapeDtypeStruct((mp // bm, n_out, 1, 1), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 1, 1), lambda i, c, t, *_: (i, c, 0, 0)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(mp // bm, n_out, walk.max_count),
        in_specs=[pl.BlockSpec((bm, bx), walk_x_index_map), pl.BlockSpec((1, bk, bn), walk_w_index_map)],
        out_specs=out_specs)
    outs = pl.pallas_call(
        functools.partial(_walk_kernel_tpu, transpose_w=transpose_w), out_shape=out_shape,
        grid_spec=grid_spec, interpret=interpret,
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
    )(walk.ptr, walk.idx, walk.vid, x, values)
    return outs[0], (outs[1][..., 0, 0] if with_counts else None)


def _dw_kernel_tpu(rows_ref, cols_ref, x_ref, dy_ref, o_ref):
    """Grid step ``(b, m)``: ``dvalues[b] += x[m, rows[b]]ᵀ @ dy[m, cols[b]]``."""
    @pl.when(pl.program_id(1) == 0)
    def _init():
        o_ref[...] = jnp.zeros_like(o_ref)

    dims = (((0,), (0,)), ((), ()))
    o_ref[0] += jax.lax.dot_general(x_ref[...], dy_ref[...], dims, preferred_element_type=jnp.float32)


def _dw_tpu(x, dy, rows, cols, block_size, *, bm, interpret):
    """``dvalues [L, bk, bn]`` float32 for live blocks only; grid ``(L, Mp / bm)``."""
    bk, bn = block_size
    n_live = rows.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(n_live, x.shape[0] // bm),
        in_specs=[pl.BlockSpec((bm, bk), lambda b, m, rows, cols: (m, rows[b])),
                  pl.BlockSpec((bm, bn), lambda b, m, rows, cols: (m, cols[b]))],
        out_specs=pl.BlockSpec((1, bk, bn), lambda b, m, *_: (b, 0, 0)))
    return pl.pallas_call(
        _dw_kernel_tpu, out_shape=jax.ShapeDtypeStruct((n_live, bk, bn), jnp.float32),
        grid_spec=grid_spec, interpret=interpret,
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")),
    )(rows, cols, x, dy)


# ---- gpu flavour ----------------------------------------------------------------------------


def _walk_kernel_gpu(ptr_ref, idx_ref, vid_ref, x_ref, w_ref, o_ref, *cnt_ref, transpose_w, bx):
    """Program ``(i, c)``: loop over column ``c``'s live blocks only, loading each once."""
    c = pl.program_id(1)

    def body(t, carry):
        acc, n = carry
        start = pl.multiple_of(idx_ref[t] * bx, bx)
        xt = x_ref[:, pl.ds(start, bx)]
        return acc + _dot(xt, w_ref[vid_ref[t]], transpose_w), n + 1

    init = (jnp.zeros(o_ref.shape, jnp.float32), jnp.int32(0))
    acc, n = jax.lax.fori_loop(ptr_ref[c], ptr_ref[c + 1], body, init)
    o_ref[...] = acc
    for r in cnt_ref:
        r[...] = jnp.full(r.shape, n, jnp.int32)


def _walk_gpu(x, values, walk: Walk, *, transpose_w, bm, interpret, with_counts):
    """Same contract as :func:`_walk_tpu`; grid ``(Mp / bm, C)`` with an in-kernel loop."""
    mp, kx = x.shape
    bk, bn = values.shape[1:]
    bx, bo = (bn, bk) if transpose_w else (bk, bn)
    n_out = walk.ptr.shape[0] - 1
    full = lambda a: pl.BlockSpec(a.shape, lambda i, c: (0,) * a.ndim)  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((mp, n_out * bo), jnp.float32)]
    out_specs = [pl.BlockSpec((bm, bo), lambda i, c: (i, c))]
    if with_counts:
        out_shape.append(jax.ShapeDtypeStruct((mp // bm, n_out, 1, 1), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 1, 1), lambda i, c: (i, c, 0, 0)))
    outs = pl.pallas_call(
        functools.partial(_walk_kernel_gpu, transpose_w=transpose_w, bx=bx), out_shape=out_shape,
        grid=(mp // bm, n_out),
        in_specs=[full(walk.ptr), full(walk.idx), full(walk.vid),
                  pl.BlockSpec((bm, kx), lambda i, c: (i, 0)), full(values)],
        out_specs=out_specs, interpret=interpret,
    )(walk.ptr, walk.idx, walk.vid, x, values)
    return outs[0], (outs[1][..., 0, 0] if with_counts else None)


def _dw_kernel_gpu(rows_ref, cols_ref, x_ref, dy_ref, o_ref, *, bm, bk, bn):
    """Program ``b``: ``dvalues[b] = sum_m x[m, rows[b]]ᵀ @ dy[m, cols[b]]``."""
    b = pl.program_id(0)
    ks, ns = pl.multiple_of(rows_ref[b] * bk, bk), pl.multiple_of(cols_ref[b] * bn, bn)
    dims = (((0,), (0,)), ((), ()))

    def body(m, acc):
        ms = pl.multiple_of(m * bm, bm)
        xt, dyt = x_ref[pl.ds(ms, bm), pl.ds(ks, bk)], dy_ref[pl.ds(ms, bm), pl.ds(ns, bn)]
        return acc + jax.lax.dot_general(xt, dyt, dims, preferred_element_type=jnp.float32)

    o_ref[0] = jax.lax.fori_loop(0, x_ref.shape[0] // bm, body, jnp.zeros((bk, bn), jnp.float32))


def _dw_gpu(x, dy, rows, cols, block_size, *, bm, interpret):
    """Same contract as :func:`_dw_tpu`; grid ``(L,)`` with an in-kernel loop over m-blocks."""
    bk, bn = block_size
    n_live = rows.shape[0]
    full = lambda a: pl.BlockSpec(a.shape, lambda b: (0,) * a.ndim)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_dw_kernel_gpu, bm=bm, bk=bk, bn=bn),
        out_shape=jax.ShapeDtypeStruct((n_live, bk, bn), jnp.float32), grid=(n_live,),
        in_specs=[full(rows), full(cols), full(x), full(dy)],
        out_specs=pl.BlockSpec((1, bk, bn), lambda b: (b, 0, 0)), interpret=interpret,
    )(rows, cols, x, dy)


_WALK = {"tpu": _walk_tpu, "gpu": _walk_gpu}
_DW = {"tpu": _dw_tpu, "gpu": _dw_gpu}

# --------------------------------------------------------------------------------------------
# custom_vjp
# --------------------------------------------------------------------------------------------


class _Cfg(NamedTuple):
    """Static configuration of one call (hashable: nondiff argument of the custom VJP)."""

    layout: BlockLayout
    variant: str
    interpret: bool
    bm: int


def _values_for_kernel(values):
    """``values``, or one zero block when the matrix has no live block (keeps BlockSpecs valid)."""
    return values if values.shape[0] else jnp.zeros((1, *values.shape[1:]), values.dtype)


def _forward(cfg: _Cfg, x2, values, with_counts=False):
    """``x2 [M, K] -> (y [M, N] in x2.dtype, counts [Mp/bm, nb_n] | None)``."""
    lay = cfg.layout
    m = x2.shape[0]
    xp = pad_to(x2, (round_up(m, cfg.bm), lay.padded_shape[0]))
    y, counts = _WALK[cfg.variant](xp, _values_for_kernel(values), forward_walk(lay), transpose_w=False,
                                   bm=cfg.bm, interpret=cfg.interpret, with_counts=with_counts)
    return y[:m, : lay.shape[1]].astype(x2.dtype), counts


def _backward(cfg: _Cfg, x2, values, dy):
    """Cotangents ``(dx [M, K], dvalues [n_live, bs_k, bs_n])``: ``dx = dy Wᵀ``, ``dW`` on live blocks."""
    lay = cfg.layout
    m = x2.shape[0]
    mp = round_up(m, cfg.bm)
    dyp = pad_to(dy.astype(x2.dtype), (mp, lay.padded_shape[1]))
    dx, _ = _WALK[cfg.variant](dyp, _values_for_kernel(values), transposed_walk(lay), transpose_w=True,
                               bm=cfg.bm, interpret=cfg.interpret, with_counts=False)
    dx = dx[:m, : lay.shape[0]].astype(x2.dtype)
    if lay.n_live == 0:
        return dx, jnp.zeros_like(values)
    xp = pad_to(x2, (mp, lay.padded_shape[0]))
    rows = jnp.asarray(np.asarray(lay.row_idx, np.int32))
    cols = jnp.asarray(lay.value_cols.astype(np.int32))
    dv = _DW[cfg.variant](xp, dyp, rows, cols, lay.block_size, bm=cfg.bm, interpret=cfg.interpret)
    return dx, dv.astype(values.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bsmm(cfg: _Cfg, x2, values):
    return _forward(cfg, x2, values)[0]


def _bsmm_fwd(cfg, x2, values):
    return _forward(cfg, x2, values)[0], (x2, values)


def _bsmm_bwd(cfg, res, dy):
    return _backward(cfg, *res, dy)


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)

# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def _config(x, bsm: BlockSparseMatrix, impl, interpret, block_m):
    if x.shape[-1] != bsm.shape[0]:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match W {bsm.shape}")
    variant, interpret = resolve_impl(impl, interpret)
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    bm = fit_tile(tile_sizes(None, bm=block_m).bm, m, variant)
    return _Cfg(bsm.layout, variant, interpret, bm)


def block_sparse_matmul(x: jax.Array, bsm: BlockSparseMatrix, *, impl: str = "auto",
                        interpret: bool | None = None, block_m: int | None = None) -> jax.Array:
    """``y [..., N] = x [..., K] @ W`` for a :class:`BlockSparseMatrix` ``W``; differentiable in
    ``x`` and ``bsm.values`` (custom VJP, ``dvalues`` only for live blocks).

    ``impl``: see :func:`jaxprune.kernels.block_sizes.resolve_impl` ("auto", "xla", "pallas",
    "pallas_tpu", "pallas_gpu").  ``block_m``: rows per tile (default from the per-backend table,
    shrunk for small M by ``block_sizes.fit_tile``).  Output dtype is ``x.dtype``; accumulation is float32.
    """
    cfg = _config(x, bsm, impl, interpret, block_m)
    if cfg.variant == "xla":
        return reference.block_sparse_matmul_ref(x, bsm.to_dense())
    y = _bsmm(cfg, x.reshape(-1, x.shape[-1]), bsm.values)
    return y.reshape(*x.shape[:-1], bsm.shape[1])


def block_sparse_matmul_vjp(x: jax.Array, bsm: BlockSparseMatrix, dy: jax.Array, *, impl: str = "auto",
                            interpret: bool | None = None, block_m: int | None = None):
    """The cotangents ``(dx [..., K], dvalues [n_live, bs_k, bs_n])`` of :func:`block_sparse_matmul` at
    ``dy [..., N]``, by the backward kernels alone; for callers that reduce ``dvalues`` themselves (under
    ``shard_map`` it is a partial sum over the rows this device holds: ``jaxprune.ops.sharded``)."""
    cfg = _config(x, bsm, impl, interpret, block_m)
    if cfg.variant == "xla":
        dense = lambda v: BlockSparseMatrix(v, bsm.layout).to_dense()  # noqa: E731
        _, vjp = jax.vjp(lambda x, v: reference.block_sparse_matmul_ref(x, dense(v)), x, bsm.values)
        return vjp(dy.astype(x.dtype))
    dx, dv = _backward(cfg, x.reshape(-1, x.shape[-1]), bsm.values, dy.reshape(-1, bsm.shape[1]))
    return dx.reshape(x.shape), dv


def block_sparse_matmul_with_counts(x: jax.Array, bsm: BlockSparseMatrix, *, impl: str = "pallas",
                                    interpret: bool | None = None, block_m: int | None = None):
    """Forward only, also returning ``counts [m_blocks, nb_n]``: how many block products each output
    tile actually executed (instrumentation proving that zero blocks are skipped)."""
    cfg = _config(x, bsm, impl, interpret, block_m)
    if cfg.variant == "xla":
        raise ValueError("counts are only produced by the Pallas kernels")
    y, counts = _forward(cfg, x.reshape(-1, x.shape[-1]), bsm.values, with_counts=True)
    return y.reshape(*x.shape[:-1], bsm.shape[1]), counts
