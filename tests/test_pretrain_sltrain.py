"""SLTrain (issue 8): W = s·A@B + S on a fixed random support. The parameter count is the paper's
formula, the forward is the dense composition, the sparse values' gradient is the gather of the
dense weight's gradient (jax.grad of the composition), and the support never moves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jax_logits
from jaxprune.config import ModelConfig
from jaxprune.model import causal_lm_loss
from jaxprune.partition import tree_size
from jaxprune.pretrain.methods import (MethodConfig, build_model, dense_model, param_summary, partition_pretrain,
                                       target_paths)
from jaxprune.pretrain.sltrain import (SparseIndex, SparseLowRankLinear, sample_support,
                                       sltrain_param_count)

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32), "gate_proj": (32, 48),
          "up_proj": (32, 48), "down_proj": (48, 32)}
R, ALPHA, DELTA = 4, 8.0, 0.03


@pytest.fixture(scope="module")
def sltrain_model():
    return build_model(CFG, MethodConfig("sltrain", rank=R, alpha=ALPHA, delta=DELTA), seed=0)


def layer_trainable(lin) -> int:
    return tree_size(nnx.state(lin, nnx.Param))


def test_param_count_is_the_papers_formula(sltrain_model):
    # r (d_in + d_out) + ⌊δ d_in d_out⌋, by hand for two layers, by the formula for all
    assert sltrain_param_count(32, 32, R, DELTA) == 4 * 64 + 30 == 286
    assert sltrain_param_count(48, 32, R, DELTA) == 4 * 80 + 46 == 366
    total = 0
    for i, block, name in target_paths(CFG, MethodConfig().targets):
        lin = getattr(getattr(sltrain_model.layers[i], block), name)
        d_in, d_out = SHAPES[name]
        want = R * (d_in + d_out) + int(DELTA * d_in * d_out)
        assert layer_trainable(lin) == want == sltrain_param_count(d_in, d_out, R, DELTA), name
        assert lin.sparse_index[...].shape == (int(DELTA * d_in * d_out),)
        total += want
    dense_linears = CFG.num_layers * sum(i * o for i, o in SHAPES.values())
    s = param_summary(sltrain_model, CFG, MethodConfig("sltrain", rank=R, alpha=ALPHA, delta=DELTA))
    assert s["linear_params_stored"] == total and s["linear_params_dense"] == dense_linears
    assert s["trainable_params"] == CFG.num_params() - dense_linears + total  # embeddings + norms stay dense


def test_lowrank_baseline_count_init_and_live_gradients():
    """W = s·A@B with r (in + out) parameters and no support. B starts U(±1/√r), not 0: with B = 0 (and
    no S) every attention / MLP output and every factor gradient is exactly zero, a saddle."""
    model = build_model(CFG, MethodConfig("lowrank", rank=R, alpha=ALPHA), seed=0)
    lin = model.layers[1].mlp.down_proj
    assert isinstance(lin, SparseLowRankLinear) and lin.sparse_values is None
    assert layer_trainable(lin) == R * (48 + 32)
    b = np.asarray(lin.lora_b[...])
    assert 0 < np.abs(b).max() <= 1 / np.sqrt(R) and abs(b.std() - 1 / np.sqrt(3 * R)) < 0.1 / np.sqrt(R)
    graphdef, frozen, trainable, masks = partition_pretrain(model)
    assert jax.tree.leaves(frozen) == []
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)

    @jax.jit
    def grads(trainable):
        return jax.grad(lambda t: causal_lm_loss(nnx.merge(graphdef, t, masks, frozen)(tokens), tokens)[0])(trainable)

    def factor_grads(trainable):  # max |grad| of every A and B
        return {p: float(jnp.abs(v.get_value()).max()) for p, v in nnx.to_flat_state(grads(trainable))
                if p[-1] in ("lora_a", "lora_b")}

    assert min(factor_grads(trainable).values()) > 0  # every layer learns
    zero_b = nnx.from_flat_state([(p, v.replace(jnp.zeros_like(v.get_value())) if p[-1] == "lora_b" else v)
                                  for p, v in nnx.to_flat_state(trainable)])
    assert max(factor_grads(zero_b).values()) == 0.0  # the saddle


def test_sltrain_b_init_zero_is_the_official_start_and_uniform_matches_lowrank(sltrain_model):
    """Official SLTrain: B = 0, so W = S at init (the sparse part alone). ``sltrain_b_init="uniform"`` draws
    B ~ U(±1/√r) as the low-rank baseline does; the support, the values and the parameter count do not change."""
    lin0 = sltrain_model.layers[0].mlp.up_proj
    assert float(jnp.abs(lin0.lora_b[...]).max()) == 0.0
    w0 = np.asarray(lin0.merged_kernel()).reshape(-1)
    idx = np.asarray(lin0.sparse_index[...])
    assert np.count_nonzero(w0) == idx.size and np.array_equal(w0[idx], np.asarray(lin0.sparse_values[...]))
    mc = MethodConfig("sltrain", rank=R, alpha=ALPHA, delta=DELTA, sltrain_b_init="uniform")
    lin1 = build_model(CFG, mc, seed=0).layers[0].mlp.up_proj
    b = np.asarray(lin1.lora_b[...])
    assert 0 < np.abs(b).max() <= 1 / np.sqrt(R) and abs(b.std() - 1 / np.sqrt(3 * R)) < 0.1 / np.sqrt(R)
    assert np.array_equal(np.asarray(lin1.sparse_index[...]), idx)  # every other draw is the same
    assert np.array_equal(np.asarray(lin1.sparse_values[...]), np.asarray(lin0.sparse_values[...]))
    assert np.array_equal(np.asarray(lin1.lora_a[...]), np.asarray(lin0.lora_a[...]))
    assert layer_trainable(lin1) == layer_trainable(lin0)
    with pytest.raises(Exception, match="sltrain_b_init"):  # the library names the config field
        MethodConfig("sltrain", sltrain_b_init="normal")


def test_support_sampling_uniform_without_replacement():
    idx = np.asarray(sample_support(jax.random.key(3), 48, 32, DELTA))
    assert idx.dtype == np.int32 and len(idx) == int(DELTA * 48 * 32) == 46
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 48 * 32  # sorted, distinct, in range
    assert np.array_equal(idx, np.asarray(sample_support(jax.random.key(3), 48, 32, DELTA)))  # deterministic
    # uniform: over many draws every flat position is hit δ of the time (binomial, 5 sigma)
    hits = np.zeros(48 * 32)
    for k in range(400):
        hits[np.asarray(sample_support(jax.random.key(k), 48, 32, DELTA))] += 1
    assert abs(hits.mean() / 400 - 46 / 1536) < 1e-12 and hits.sum() == 400 * 46
    # chi-square of the 1536 position counts (expected 400·46/1536 ≈ 12 each; dof ≈ 1535, sd √(2·1535) ≈ 55):
    # a sampler that uses only a third of the positions gives ≈ 37000, one biased toward low indices far more
    want = 400 * 46 / 1536
    chi2 = float(((hits - want) ** 2 / want).sum())
    assert 1535 - 5 * 55 < chi2 < 1535 + 5 * 55, chi2
    # joint uniformity: adjacent positions in one support occur as often as in a uniform subset
    # (46·45/1536 ≈ 1.35 pairs per draw); a strided sampler gives none, a contiguous run 45
    pairs = sum(int((np.diff(np.asarray(sample_support(jax.random.key(k), 48, 32, DELTA))) == 1).sum())
                for k in range(400))
    expected_pairs = 400 * 46 * 45 / 1536
    assert abs(pairs - expected_pairs) < 5 * np.sqrt(expected_pairs), (pairs, expected_pairs)


def _trained_layer(seed=0):
    """An SLTrain layer with B, values moved off their init (so every gradient term is non-trivial)."""
    lin = SparseLowRankLinear(48, 32, rank=R, alpha=ALPHA, delta=0.05, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    lin.lora_b.value = jnp.asarray(rng.standard_normal((R, 32)), jnp.float32)
    lin.sparse_values.value = jnp.asarray(rng.standard_normal(lin.sparse_values[...].shape), jnp.float32)
    return lin


def test_forward_is_the_dense_composition():
    lin = _trained_layer()
    a, b, v, idx = (np.asarray(x[...], np.float64) for x in (lin.lora_a, lin.lora_b, lin.sparse_values,
                                                             lin.sparse_index))
    w = (ALPHA / R) * a @ b
    np.add.at(w.reshape(-1), idx.astype(np.int64), v)  # numpy reference of scatter_add_
    x = np.random.default_rng(1).standard_normal((2, 5, 48)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lin.merged_kernel()), w, rtol=1e-6, atol=1e-6)


def np_layer_grads(a, b, s, vals, idx, x, target):
    """float64 numpy: W = s·A@B + scatter(vals at idx), L = Σ (x@W − t)²; returns (L, dA, dB, dvals) from
    G = ∂L/∂W = xᵀ·2(xW − t): dA = s·G@Bᵀ, dB = s·Aᵀ@G, dvals = G.flat[idx] (the paper's backward)."""
    a, b, x, t = (np.asarray(v, np.float64) for v in (a, b, x, target))
    w = s * a @ b
    if vals is not None:
        np.add.at(w.reshape(-1), np.asarray(idx, np.int64), np.asarray(vals, np.float64))
    x2 = x.reshape(-1, x.shape[-1])
    r = x2 @ w - t.reshape(-1, t.shape[-1])
    g = x2.T @ (2 * r)
    return (r ** 2).sum(), s * g @ b.T, s * a.T @ g, None if vals is None else g.reshape(-1)[np.asarray(idx)]


@pytest.mark.parametrize("kind", ["sltrain", "lowrank"])
def test_layer_gradients_match_float64_numpy(kind):
    """The layer's own gradients (through nnx, as the train step takes them) of A, B and the sparse values
    against float64 numpy formulas: the project's forward (scatter-add composition; for the low-rank baseline
    s·(x@A)@B without a dense weight) differentiated, not JAX's autodiff compared with itself."""
    if kind == "sltrain":
        lin = _trained_layer()
    else:
        lin = SparseLowRankLinear(48, 32, rank=R, alpha=ALPHA, delta=0.0, zero_b=False, rngs=nnx.Rngs(0))
    s = ALPHA / R
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 7, 48)), jnp.float32)
    target = jnp.asarray(np.random.default_rng(3).standard_normal((3, 7, 32)), jnp.float32)
    graphdef, params, rest = nnx.split(lin, nnx.Param, ...)
    loss, g = jax.value_and_grad(lambda p: jnp.sum((nnx.merge(graphdef, p, rest)(x) - target) ** 2))(params)
    vals = None if kind == "lowrank" else lin.sparse_values[...]
    idx = None if kind == "lowrank" else lin.sparse_index[...]
    want_loss, want_a, want_b, want_v = np_layer_grads(lin.lora_a[...], lin.lora_b[...], s, vals, idx, x, target)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for name, want in (("lora_a", want_a), ("lora_b", want_b)) + ((("sparse_values", want_v),) if vals is not None
                                                                 else ()):
        got = np.asarray(g[name][...], np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)
    assert "sparse_index" not in g  # the support is not a parameter


def test_support_is_frozen_and_rebuilt_bitwise(sltrain_model):
    """The supports are the only frozen arrays (never in the trainable pytree, so no optimizer step can
    move them); the same seed rebuilds them bitwise, another seed does not. Fixed across real train steps
    and checkpoints: tests/test_pretrain_cli.py."""
    _, frozen, trainable, _ = partition_pretrain(sltrain_model)
    flat = nnx.to_flat_state(frozen)
    assert len(flat) == 14 and all(isinstance(v, SparseIndex) and p[-1] == "sparse_index" for p, v in flat)
    assert not any(p[-1] == "sparse_index" for p, _ in nnx.to_flat_state(trainable))
    again = partition_pretrain(build_model(CFG, MethodConfig("sltrain", rank=R, alpha=ALPHA, delta=DELTA),
                                           seed=0))[1]
    other = partition_pretrain(build_model(CFG, MethodConfig("sltrain", rank=R, alpha=ALPHA, delta=DELTA),
                                           seed=1))[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(again)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(other)))
    # distinct layers draw distinct supports
    q, k = sltrain_model.layers[0].self_attn.q_proj, sltrain_model.layers[1].self_attn.q_proj
    assert not np.array_equal(np.asarray(q.sparse_index[...]), np.asarray(k.sparse_index[...]))


def test_dense_model_computes_the_same_function(sltrain_model):
    model = nnx.clone(sltrain_model)
    for _, lin in ((p, l) for p, l in nnx.iter_graph(model) if isinstance(l, SparseLowRankLinear)):
        lin.lora_b.value = 0.1 * jnp.ones_like(lin.lora_b[...])  # B != 0: the low-rank term counts too
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    np.testing.assert_allclose(jax_logits(dense_model(model), tokens), jax_logits(model, tokens), atol=2e-5)
