"""Block-sparse matmul kernels (issue 7.1) vs the pure-jnp reference; Pallas in interpret mode on CPU.

Tolerances (error measured as ``max|kernel - ref| / max|ref|``): float32 1e-5, bfloat16 2e-2
(bf16 outputs / cotangents are rounded to 8 mantissa bits; accumulation is float32 in both).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import kernels as K
from jaxprune.kernels import block_sparse as bs

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


from conftest import compile_fast, rel_err  # noqa: E402


def random_block_mask(rng, grid, sparsity: float) -> np.ndarray:
    """Block mask with exactly ``round((1 - sparsity) * n_blocks)`` live blocks."""
    n = grid[0] * grid[1]
    live = rng.permutation(n)[: int(round((1 - sparsity) * n))]
    mask = np.zeros(n, bool)
    mask[live] = True
    return mask.reshape(grid)


def make_problem(seed, lead, k, n, block, sparsity, dtype):
    rng = np.random.default_rng(seed)
    grid = (-(-k // block[0]), -(-n // block[1]))
    w = rng.standard_normal((k, n)).astype(np.float32)
    bmask = random_block_mask(rng, grid, sparsity)
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
    bsm = K.BlockSparseMatrix.from_dense(jnp.asarray(w, dtype), bmask, block)
    ct = jnp.asarray(rng.standard_normal((*lead, n)), jnp.float32)  # fixed output cotangent
    return x, bsm, bmask, w, ct


def loss_and_grads(x, bsm, ct, impl):
    """``(y, dx, dvalues)`` of ``sum(y * ct)`` with ``y = block_sparse_matmul(x, W)``."""
    def loss(x, values):
        y = K.block_sparse_matmul(x, K.BlockSparseMatrix(values, bsm.layout), impl=impl)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    # jit: one compiled program instead of op-by-op dispatch (much faster in interpret mode).
    (_, y), (dx, dv) = compile_fast(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), x, bsm.values)
    return y, dx, dv


def test_layout_roundtrip_and_tables():
    """from_dense/to_dense keep exactly the live blocks (non-multiple shape); tables are CSC/CSR."""
    rng = np.random.default_rng(0)
    k, n, block = 100, 70, (32, 16)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bmask = random_block_mask(rng, (4, 5), 0.5)
    bsm = K.BlockSparseMatrix.from_dense(jnp.asarray(w), bmask, block)
    want = w * K.reference.expand_block_mask(bmask, block, (k, n))
    np.testing.assert_array_equal(np.asarray(bsm.to_dense()), want)
    lay = bsm.layout
    assert bsm.n_live == int(bmask.sum()) == bsm.values.shape[0]
    np.testing.assert_array_equal(lay.block_mask, bmask)
    np.testing.assert_array_equal(np.diff(lay.col_ptr), bmask.sum(0))
    np.testing.assert_array_equal(np.diff(lay.row_ptr), bmask.sum(1))
    # CSR entry t of row r is block (r, col_idx[t]) stored at values[perm[t]].
    rows_of_csr = np.repeat(np.arange(lay.grid[0]), np.diff(lay.row_ptr))
    np.testing.assert_array_equal(np.asarray(lay.row_idx)[list(lay.perm)], rows_of_csr)
    np.testing.assert_array_equal(lay.value_cols[list(lay.perm)], lay.col_idx)
    # mask=None derives the live blocks from the nonzeros.
    again = K.BlockSparseMatrix.from_dense(jnp.asarray(want), None, block)
    np.testing.assert_array_equal(again.layout.block_mask, bmask)


CASES = [  # (impl, dtype, sparsity, lead dims, K, N, block)
    *[("pallas_tpu", dt, sp, (2, 3), 100, 72, (32, 16))
      for dt, sp in itertools.product([jnp.float32, jnp.bfloat16], [0.0, 0.5, 0.9, 1.0])],
    ("pallas_tpu", jnp.float32, 0.5, (1,), 64, 128, (32, 32)),  # batch of 1
    ("pallas_gpu", jnp.float32, 0.5, (2, 3), 100, 72, (32, 16)),
    ("pallas_gpu", jnp.float32, 1.0, (5,), 64, 64, (32, 32)),
    ("pallas_gpu", jnp.bfloat16, 0.9, (1,), 96, 80, (16, 16)),
]


@pytest.mark.parametrize("impl,dtype,sparsity,lead,k,n,block", CASES)
def test_values_and_grads_match_reference(impl, dtype, sparsity, lead, k, n, block):
    x, bsm, bmask, w, ct = make_problem(1, lead, k, n, block, sparsity, dtype)
    y, dx, dv = loss_and_grads(x, bsm, ct, impl)
    y_ref, dx_ref, dv_ref = loss_and_grads(x, bsm, ct, "xla")
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert dx.shape == x.shape and dv.shape == bsm.values.shape == (bsm.n_live, *block)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) <= tol
    assert rel_err(dx, dx_ref) <= tol
    if bsm.n_live:
        assert rel_err(dv, dv_ref) <= tol
    if sparsity == 1.0:
        assert not np.any(np.asarray(y, np.float32)) and not np.any(np.asarray(dx, np.float32))
    if dtype == jnp.float32:
        # Independent float64 check: y = x @ (W ⊙ blockmask); dvalues[b] = (xᵀ ct) on live block b.
        wm = w * K.reference.expand_block_mask(bmask, block, (k, n))
        x2 = np.asarray(x, np.float64).reshape(-1, k)
        np.testing.assert_allclose(np.asarray(y).reshape(-1, n), x2 @ wm, rtol=1e-4, atol=1e-4)
        g = x2.T @ np.asarray(ct, np.float64).reshape(-1, n)
        g_blocks = K.BlockSparseMatrix.from_dense(jnp.asarray(g, jnp.float32), bmask, block).values
        np.testing.assert_allclose(np.asarray(dv), np.asarray(g_blocks), rtol=1e-4, atol=1e-4)


def test_auto_on_cpu_is_xla_reference():
    """``impl="auto"`` on CPU is the XLA path, ``"pallas"`` the TPU-style kernel in interpret mode."""
    assert K.resolve_impl("auto", backend="cpu") == ("xla", False)
    assert K.resolve_impl("pallas", backend="cpu") == ("tpu", True)
    assert K.resolve_impl("auto", backend="gpu") == ("gpu", False)
    x, bsm, bmask, w, _ = make_problem(2, (4,), 64, 64, (32, 32), 0.5, jnp.float32)
    want = np.asarray(x) @ (w * K.reference.expand_block_mask(bmask, (32, 32), (64, 64)))
    for impl in ("auto", "pallas"):
        np.testing.assert_allclose(np.asarray(K.block_sparse_matmul(x, bsm, impl=impl)), want,
                                   rtol=1e-5, atol=1e-5)


def _tpu_grid_schedule(layout, m_blocks):
    """Replay the TPU kernel's grid with its own index maps: per step the (x block, W block) it
    would hold in VMEM and whether it multiplies (``t < count(c)``)."""
    walk = bs.forward_walk(layout)
    ptr, idx, vid = (np.asarray(a) for a in walk[:3])
    steps = []
    for i, c, t in itertools.product(range(m_blocks), range(len(ptr) - 1), range(walk.max_count)):
        xb = tuple(int(v) for v in bs.walk_x_index_map(i, c, t, ptr, idx, vid))
        wb = tuple(int(v) for v in bs.walk_w_index_map(i, c, t, ptr, idx, vid))
        steps.append((i, c, xb, wb, t < ptr[c + 1] - ptr[c]))
    return steps


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_zero_blocks_are_skipped(impl):
    """Proof of skipping: the kernel's own iteration counter equals the number of live blocks (not
    the dense block count), and the TPU grid only ever fetches live blocks, each once per m-block."""
    rng = np.random.default_rng(3)
    k, n, block, m = 128, 160, (32, 32), 40  # grid 4 x 5 blocks, 6 live, column 2 empty
    bmask = np.array([[1, 0, 0, 0, 1], [0, 1, 0, 0, 0], [1, 0, 0, 1, 0], [0, 0, 0, 0, 1]], bool)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bsm = K.BlockSparseMatrix.from_dense(jnp.asarray(w), bmask, block)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    y, counts = K.block_sparse_matmul_with_counts(x, bsm, impl=impl, block_m=16)
    m_blocks = 3  # ceil(40 / 16)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ np.asarray(bsm.to_dense()), rtol=1e-5, atol=1e-4)
    # Executed block products per output tile == live blocks in that column; total == live * m-blocks.
    np.testing.assert_array_equal(np.asarray(counts), np.tile(bmask.sum(0), (m_blocks, 1)))
    assert int(counts.sum()) == m_blocks * bsm.n_live == m_blocks * 6 < m_blocks * bmask.size

    steps = _tpu_grid_schedule(bsm.layout, m_blocks)
    row_idx = np.asarray(bsm.layout.row_idx)
    computed = [(i, c, wb[0]) for i, c, xb, wb, live in steps if live]
    # Every (m-block, live block) product happens exactly once, with the matching x block.
    assert sorted(computed) == sorted((i, int(bsm.layout.value_cols[b]), b)
                                      for i in range(m_blocks) for b in range(bsm.n_live))
    assert all(xb == (i, row_idx[wb[0]]) for i, c, xb, wb, live in steps if live)
    # DMA model: a block is copied only when its index changes between consecutive grid steps.
    fetches = [s[3] for s, prev in zip(steps, [None] + steps[:-1]) if prev is None or s[3] != prev[3]]
    assert len(fetches) == m_blocks * bsm.n_live
    assert {wb[0] for wb in fetches} == set(range(bsm.n_live))


def test_fully_sparse_counts_zero():
    """100% block sparsity: no block product executes and y == 0."""
    x = jnp.ones((8, 64), jnp.float32)
    bsm = K.BlockSparseMatrix.from_dense(jnp.ones((64, 64)), np.zeros((2, 2), bool), (32, 32))
    y, counts = K.block_sparse_matmul_with_counts(x, bsm, impl="pallas_tpu")
    assert bsm.n_live == 0 and int(np.asarray(counts).sum()) == 0
    np.testing.assert_array_equal(np.asarray(y), np.zeros((8, 64), np.float32))
