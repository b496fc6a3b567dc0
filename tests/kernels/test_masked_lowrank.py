"""Masked low-rank matmul kernels (issue 7.2) vs the pure-jnp reference; Pallas interpret mode on CPU.

``y = x @ ((W + s·A@B) ⊙ M)``; W and M frozen.  Tolerances (``max|kernel - ref| / max|ref|``):
float32 1e-5, bfloat16 2e-2 (the kernel rounds each merged W' tile to bf16 before the MXU dot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import kernels as K

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SCALE = 0.75
TILES = (16, 32, 32)  # small tiles -> multi-block grids on small shapes


from conftest import compile_fast, rel_err  # noqa: E402


def make_problem(seed, lead, k, n, r, dtype, density=0.5):
    rng = np.random.default_rng(seed)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), dtype)  # noqa: E731
    x, w, a, b = arr(*lead, k), arr(k, n), arr(k, r), arr(r, n)
    mask = jnp.asarray(rng.random((k, n)) < density)
    ct = jnp.asarray(rng.standard_normal((*lead, n)), jnp.float32)
    return x, w, a, b, mask, ct


def value_and_grads(fn, x, w, a, b, ct):
    """``(y, (dx, dW, dA, dB))`` of ``sum(fn(x, w, a, b) * ct)``."""
    def loss(x, w, a, b):
        y = fn(x, w, a, b)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    # jit: one compiled program instead of op-by-op dispatch (~3x faster in interpret mode).
    (_, y), grads = compile_fast(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True), x, w, a, b)
    return y, grads


def kernel_fn(impl, block_sizes=TILES, **mask_kw):
    return lambda x, w, a, b: K.masked_lowrank_matmul(x, w, a, b, scale=SCALE, impl=impl,
                                                      block_sizes=block_sizes, **mask_kw)


def assert_close(got, want, tol):
    y, (dx, dw, da, db) = got
    y_ref, (dx_ref, _, da_ref, db_ref) = want
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    for g, r in ((y, y_ref), (dx, dx_ref), (da, da_ref), (db, db_ref)):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert rel_err(g, r) <= tol, (rel_err(g, r), tol)
    assert not np.any(np.asarray(dw, np.float32)), "W is frozen: zero cotangent"


@pytest.mark.parametrize("impl,dtype,lead,k,n,r", [
    ("pallas_tpu", jnp.float32, (2, 5), 100, 72, 4),   # non-multiples of the tiles, leading dims
    ("pallas_tpu", jnp.bfloat16, (2, 5), 100, 72, 4),
    ("pallas_tpu", jnp.float32, (1,), 64, 96, 8),      # batch of 1
    ("pallas_gpu", jnp.float32, (3, 7), 80, 100, 6),
    ("pallas_gpu", jnp.bfloat16, (1,), 64, 64, 8),
])
def test_random_mask_matches_reference(impl, dtype, lead, k, n, r):
    x, w, a, b, mask, ct = make_problem(0, lead, k, n, r, dtype)
    got = value_and_grads(kernel_fn(impl, mask=mask), x, w, a, b, ct)
    want = value_and_grads(lambda *o: K.reference.masked_lowrank_matmul_ref(*o, mask, SCALE), x, w, a, b, ct)
    assert_close(got, want, TOL[dtype])


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_all_ones_mask_is_plain_lora(impl):
    """M = 1 (as an explicit mask, and as the default with no mask) equals x@W + s·(x@A)@B."""
    x, w, a, b, _, ct = make_problem(1, (24,), 96, 80, 4, jnp.float32)
    want = value_and_grads(lambda *o: K.reference.lora_matmul_ref(*o, SCALE), x, w, a, b, ct)
    # tpu flavour: explicit all-True element mask; gpu flavour: no mask at all (row/col path).
    kw = dict(mask=jnp.ones((96, 80), bool)) if impl == "pallas_tpu" else {}
    assert_close(value_and_grads(kernel_fn(impl, **kw), x, w, a, b, ct), want, 1e-5)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_all_zeros_mask_gives_zeros(impl):
    x, w, a, b, _, ct = make_problem(2, (8,), 64, 48, 4, jnp.float32)
    y, (dx, dw, da, db) = value_and_grads(kernel_fn(impl, mask=jnp.zeros((64, 48), bool)), x, w, a, b, ct)
    for v in (y, dx, dw, da, db):
        np.testing.assert_array_equal(np.asarray(v), np.zeros(v.shape, np.float32))
    assert y.shape == (8, 48)


@pytest.mark.parametrize("impl,dtype", [("pallas_tpu", jnp.float32), ("pallas_gpu", jnp.bfloat16)])
def test_row_col_masks_match_reference(impl, dtype):
    """Structured masks (rows [K], cols [N]) without an element mask == reference with rows ⊗ cols."""
    rng = np.random.default_rng(3)
    x, w, a, b, _, ct = make_problem(3, (2, 9), 100, 72, 4, dtype)
    rows, cols = jnp.asarray(rng.random(100) < 0.7), jnp.asarray(rng.random(72) < 0.6)
    got = value_and_grads(kernel_fn(impl, mask_rows=rows, mask_cols=cols), x, w, a, b, ct)
    full = K.reference.rowcol_mask(rows, cols, (100, 72))
    want = value_and_grads(lambda *o: K.reference.masked_lowrank_matmul_ref(*o, full, SCALE), x, w, a, b, ct)
    assert_close(got, want, TOL[dtype])
    # The XLA path of the structured variant agrees as well.
    xla = value_and_grads(kernel_fn("xla", mask_rows=rows, mask_cols=cols), x, w, a, b, ct)
    assert_close(xla, want, TOL[dtype])


def test_closed_form_gradients():
    """The issue's formulas (G = (xᵀdy)⊙M, dA = sGBᵀ, dB = sAᵀG, dx = dy W'ᵀ) equal autodiff of the
    reference and the kernel's custom VJP (default tiles, auto-clamped to the problem)."""
    x, w, a, b, mask, ct = make_problem(4, (40,), 96, 64, 8, jnp.float32)
    dx, da, db = K.reference.masked_lowrank_grads_ref(x, w, a, b, mask, SCALE, ct)
    for fn in (lambda *o: K.reference.masked_lowrank_matmul_ref(*o, mask, SCALE),
               kernel_fn("pallas", block_sizes=None, mask=mask)):
        _, (gx, _, ga, gb) = value_and_grads(fn, x, w, a, b, ct)
        for g, r in ((gx, dx), (ga, da), (gb, db)):
            assert rel_err(g, r) <= 1e-5


def test_merged_weight_never_differs_from_reference_dispatch():
    """impl="auto" on CPU is the XLA reference; errors on bad arguments."""
    x, w, a, b, mask, _ = make_problem(5, (4,), 32, 32, 2, jnp.float32)
    np.testing.assert_allclose(
        np.asarray(K.masked_lowrank_matmul(x, w, a, b, mask, SCALE)),
        np.asarray(x) @ np.asarray(K.reference.masked_weight_ref(w, a, b, mask, SCALE)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        K.masked_lowrank_matmul(x, w, a, b, mask, SCALE, mask_rows=jnp.ones(32, bool))
    with pytest.raises(ValueError):
        K.masked_lowrank_matmul(x, w, a, b.T, mask, SCALE)
