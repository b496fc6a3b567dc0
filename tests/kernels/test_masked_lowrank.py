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


def np_masked_lowrank(x, w, a, b, mask, scale, ct):
    """float64 numpy: y = x @ W', W' = (W + s·A@B) ⊙ M, and the gradients of sum(y · ct):
    G = (xᵀ ct) ⊙ M, dx = ct W'ᵀ, dA = s G Bᵀ, dB = s Aᵀ G (the issue's formulas, written here)."""
    x, w, a, b, ct = (np.asarray(v, np.float64) for v in (x, w, a, b, ct))
    m = np.asarray(mask, np.float64)
    merged = (w + scale * a @ b) * m
    x2, ct2 = x.reshape(-1, x.shape[-1]), ct.reshape(-1, ct.shape[-1])
    g = (x2.T @ ct2) * m
    return x @ merged, (ct @ merged.T, scale * g @ b.T, scale * a.T @ g)


@pytest.mark.parametrize("impl", ["auto", "xla"])
@pytest.mark.parametrize("masking", ["element", "rowcol", "none"])
def test_default_dispatch_matches_float64_numpy(impl, masking):
    """impl="auto" (the XLA path on CPU: what every Linear runs here) and impl="xla", values and gradients,
    against float64 numpy formulas (not against reference.py, which is what these paths execute)."""
    x, w, a, b, mask, ct = make_problem(5, (3, 4), 48, 40, 3, jnp.float32)
    rng = np.random.default_rng(6)
    rows, cols = rng.random(48) < 0.6, rng.random(40) < 0.7
    kw, m = {"element": ({"mask": mask}, np.asarray(mask)),
             "rowcol": ({"mask_rows": jnp.asarray(rows), "mask_cols": jnp.asarray(cols)}, rows[:, None] & cols),
             "none": ({}, np.ones((48, 40), bool))}[masking]
    y, (dx, dw, da, db) = value_and_grads(kernel_fn(impl, **kw), x, w, a, b, ct)
    want_y, (want_dx, want_da, want_db) = np_masked_lowrank(x, w, a, b, m, SCALE, ct)
    for name, got, want in (("y", y, want_y), ("dx", dx, want_dx), ("dA", da, want_da), ("dB", db, want_db)):
        assert rel_err(got, want) <= 1e-5, (name, rel_err(got, want))
    assert not np.any(np.asarray(dw)), "W is frozen: zero cotangent"
    if masking != "none":  # the mask matters: the unmasked product is far away
        assert rel_err(y, np_masked_lowrank(x, w, a, b, np.ones_like(m), SCALE, ct)[0]) > 0.05


def test_auto_picks_the_backends_kernel_and_bad_arguments_fail():
    """impl="auto": the XLA reference on CPU, the backend's own Pallas kernel (not interpreted) on TPU / GPU."""
    from jaxprune.kernels.block_sizes import resolve_impl

    assert resolve_impl("auto", backend="cpu") == ("xla", False)
    assert resolve_impl("auto", backend="gpu") == ("gpu", False)
    assert resolve_impl("auto", backend="tpu") == ("tpu", False)
    assert resolve_impl("pallas", backend="cpu") == ("tpu", True)
    x, w, a, b, mask, _ = make_problem(5, (4,), 32, 32, 2, jnp.float32)
    with pytest.raises(ValueError):
        K.masked_lowrank_matmul(x, w, a, b, mask, SCALE, mask_rows=jnp.ones(32, bool))
    with pytest.raises(ValueError):
        K.masked_lowrank_matmul(x, w, a, b.T, mask, SCALE)
    with pytest.raises(ValueError):
        K.masked_lowrank_matmul(x, w, a, b, mask, SCALE, impl="cuda")


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "no-lora"])
def test_linear_pallas_branch_matches_float64(lora):
    """``Linear(impl="pallas")`` with a weight mask (the kernel in interpret mode on CPU): output and the
    gradients w.r.t. x, A, B against float64 numpy. Nothing else in the suite runs this branch of Linear."""
    from flax import nnx

    from jaxprune.layers import Linear, Mask

    x, w, a, b, mask, ct = make_problem(7, (2, 5), 40, 24, 4, jnp.float32)
    lin = Linear(40, 24, use_bias=True, kernel=w, bias=jnp.asarray(np.random.default_rng(8).standard_normal(24),
                                                                    jnp.float32))
    if lora:
        lin.add_lora(4, 3.0, nnx.Rngs(0))
        lin.lora_a.set_value(a)
        lin.lora_b.set_value(b)
    lin.weight_mask = Mask(mask)
    lin.impl = "pallas"
    graphdef, params, rest = nnx.split(lin, nnx.LoRAParam, ...)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) * ct), nnx.merge(graphdef, params, rest)(x)

    (_, y), (g, dx) = compile_fast(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), params, x)
    s = lin.lora_scale if lora else 0.0
    want_y, (want_dx, want_da, want_db) = np_masked_lowrank(x, w, a if lora else 0 * a, b if lora else 0 * b,
                                                            np.asarray(mask), s, ct)
    want_y = want_y + np.asarray(lin.bias[...], np.float64)
    assert rel_err(y, want_y) <= 1e-5 and rel_err(dx, want_dx) <= 1e-5, (rel_err(y, want_y), rel_err(dx, want_dx))
    if lora:
        assert s == 0.75 and rel_err(g["lora_a"][...], want_da) <= 1e-5 and rel_err(g["lora_b"][...], want_db) <= 1e-5
    # and the xla branch of the same layer agrees (it is the one every other test runs)
    lin.impl = "xla"
    assert rel_err(lin(x), want_y) <= 1e-5
