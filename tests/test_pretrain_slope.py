"""SLoPe (issue 8): 2:4 forward weights, a double-pruned backward for the input gradient (checked
against jax.vjp of a matmul with the double-pruned weight), mask refreshes, and lazy adapters that
appear only in the last steps and start as a no-op."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.config import ModelConfig
from jaxprune.layers import Linear, Mask
from jaxprune.pretrain.methods import (MethodConfig, build_model, dense_model, make_pretrain_optimizer,
                                       partition_pretrain)
from jaxprune.pretrain.slope import (SLoPeLinear, SLoPeSchedule, initial_masks, make_after_step, nm_mask, refresh_masks, slope_linears)
from jaxprune.train import OptimConfig, TrainState, make_train_step

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)


def nm_reference(w: np.ndarray, axis: int) -> np.ndarray:
    """numpy: the 2 largest |w| of every 4 consecutive entries along ``axis`` (ties: earlier entry)."""
    wt = np.moveaxis(np.abs(w), axis, -1)
    groups = wt.reshape(*wt.shape[:-1], -1, 4)
    keep = np.zeros(groups.shape, bool)
    top = np.argsort(-groups, axis=-1, kind="stable")[..., :2]
    np.put_along_axis(keep, top, True, axis=-1)
    return np.moveaxis(keep.reshape(wt.shape), -1, axis)


def nonzeros_per_group(w: np.ndarray, axis: int) -> np.ndarray:
    wt = np.moveaxis(w, axis, -1)
    return (wt.reshape(*wt.shape[:-1], -1, 4) != 0).sum(-1)


def slope_layer(d_in=32, d_out=48, seed=0) -> SLoPeLinear:
    rng = np.random.default_rng(seed)
    base = Linear(d_in, d_out, kernel=jnp.asarray(rng.standard_normal((d_in, d_out)), jnp.float32))
    return SLoPeLinear(base, adapter_rank=4, rngs=nnx.Rngs(seed))


def test_nm_mask_keeps_the_two_largest_of_every_four():
    w = np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)
    w[0, 0] = w[1, 0]  # a tie: the earlier entry wins
    for axis in (0, 1):
        got = np.asarray(nm_mask(jnp.asarray(w), axis=axis))
        np.testing.assert_array_equal(got, nm_reference(w, axis))
        assert np.all(np.moveaxis(got, axis, -1).reshape(*np.moveaxis(got, axis, -1).shape[:-1], -1, 4).sum(-1)
                      == 2)


def test_forward_weight_is_2_4_along_the_input_dim():
    lin = slope_layer()
    w = np.asarray(lin.kernel[...])
    sparse = np.asarray(lin.sparse_kernel())
    assert np.all(nonzeros_per_group(sparse, axis=0) <= 2)  # every 2:4 group along `in`
    np.testing.assert_array_equal(sparse, np.where(nm_reference(w, 0), w, 0))  # magnitude-based
    x = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), x @ sparse, rtol=1e-5, atol=1e-5)
    assert np.mean(sparse == 0) == 0.5


@pytest.mark.parametrize("impl", ["xla", "pallas"])  # pallas: the masked low-rank kernel (interpret mode on CPU)
def test_backward_input_grad_uses_the_double_pruned_weight(impl):
    lin = slope_layer()
    lin.impl = impl
    w = np.asarray(lin.kernel[...])
    m = nm_reference(w, 0)
    m2 = m & nm_reference(np.where(m, w, 0), 1)  # W ⊙ M pruned 2:4 again along `out`
    w_dp = np.where(m2, w, 0)
    assert np.all(nonzeros_per_group(w_dp, axis=0) <= 2) and np.all(nonzeros_per_group(w_dp, axis=1) <= 2)
    np.testing.assert_array_equal(np.asarray(lin.backward_mask[...]), m2)

    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 32)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 48)), jnp.float32)
    graphdef, params, rest = nnx.split(lin, nnx.Param, ...)
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, x)
    jaxpr = str(jax.make_jaxpr(lambda p, x, g: jax.vjp(lambda p, x: nnx.merge(graphdef, p, rest)(x), p, x)[1](g))(
        params, x, g))
    assert jaxpr.count("pallas_call") == (2 if impl == "pallas" else 0)  # forward and dx through the kernel
    g_params, g_x = vjp(g)
    np.testing.assert_allclose(y, np.asarray(x) @ np.where(m, w, 0), rtol=1e-5, atol=1e-5)
    # reference: jax.vjp of a plain matmul with the double-pruned weight, w.r.t. x
    _, ref_vjp = jax.vjp(lambda x: x @ jnp.asarray(w_dp), x)
    np.testing.assert_allclose(g_x, ref_vjp(g)[0], rtol=1e-5, atol=1e-5)
    single = np.asarray(g) @ np.where(m, w, 0).T  # what an ordinary backward would give
    assert np.abs(np.asarray(g_x) - single).max() > 0.1  # the double pruning matters
    # the weight gradient is the ordinary one, zero off the forward mask
    g_w = np.asarray(x).reshape(-1, 32).T @ np.asarray(g).reshape(-1, 48)
    np.testing.assert_allclose(g_params["kernel"][...], np.where(m, g_w, 0), rtol=1e-5, atol=1e-5)
    # adapters are switched off: no gradient reaches them
    assert not np.any(np.asarray(g_params["lora_a"][...])) and not np.any(np.asarray(g_params["lora_b"][...]))


def test_refresh_masks_follow_the_magnitudes():
    lin = slope_layer()
    m0, m2_0 = np.asarray(lin.nm_mask[...]), np.asarray(lin.backward_mask[...])
    lin.kernel.value = jnp.asarray(np.random.default_rng(5).standard_normal((32, 48)), jnp.float32)
    w = np.asarray(lin.kernel[...])
    refresh_masks(lin, forward=False)  # M₂ only: from |W ⊙ M| with the old M
    np.testing.assert_array_equal(np.asarray(lin.nm_mask[...]), m0)
    np.testing.assert_array_equal(np.asarray(lin.backward_mask[...]), m0 & nm_reference(np.where(m0, w, 0), 1))
    refresh_masks(lin, forward=True)
    m = nm_reference(w, 0)
    np.testing.assert_array_equal(np.asarray(lin.nm_mask[...]), m)
    np.testing.assert_array_equal(np.asarray(lin.backward_mask[...]), m & nm_reference(np.where(m, w, 0), 1))
    assert not np.array_equal(m, m0) and not np.array_equal(np.asarray(lin.backward_mask[...]), m2_0)


def test_schedule_adapters_in_the_last_1_percent_and_refresh_early():
    s = SLoPeSchedule(1000, mask_change_freq=100, refresh_frac=0.1, adapter_frac=0.01)
    assert s.adapter_start == 990  # steps 990..999: the last 1%
    assert SLoPeSchedule(200).adapter_start == 198 and SLoPeSchedule(50).adapter_start == 49  # at least one step
    assert [s.refresh(t) for t in (99, 100, 200, 300, 900, 1000)] == [None, "forward", "backward", "backward",
                                                                        "backward", None]
    assert SLoPeSchedule(1000, 10, 0.1).refresh(100) == "forward" and SLoPeSchedule(1000, 10, 0.1).refresh(110) \
        == "backward"
    assert SLoPeSchedule(10, adapter_frac=0.0).adapter_start == 10  # never


def test_aspect_ratio_over_5_stays_dense():
    cfg = CFG.replace(hidden_size=16, intermediate_size=96, num_heads=2, num_kv_heads=2, head_dim=8)  # mlp 6:1
    model = nnx.eval_shape(lambda: build_model(cfg, MethodConfig("slope", adapter_rank=2), seed=0))  # no compute
    kinds = {name: type(getattr(getattr(model.layers[0], b), name)) for b, names in
             (("self_attn", ("q_proj", "k_proj")), ("mlp", ("gate_proj", "down_proj"))) for name in names}
    assert kinds == {"q_proj": SLoPeLinear, "k_proj": SLoPeLinear, "gate_proj": Linear, "down_proj": Linear}
    wide = nnx.eval_shape(lambda: build_model(cfg, MethodConfig("slope", adapter_rank=2, max_aspect_ratio=8), seed=0))
    assert isinstance(wide.layers[0].mlp.gate_proj, SLoPeLinear)


@pytest.fixture(scope="module")
def slope_run():
    """8 steps with a schedule that refreshes masks at t = 2, 4 (forward), 6 (M₂) and turns the adapters on
    for the last 2 steps; the state after every step is kept."""
    model = build_model(CFG, MethodConfig("slope", adapter_rank=4), seed=0)
    graphdef, frozen, trainable, masks = partition_pretrain(model)
    schedule = SLoPeSchedule(8, mask_change_freq=2, refresh_frac=0.5, adapter_frac=0.25)
    opt = make_pretrain_optimizer(OptimConfig(lr=3e-2, warmup_steps=1, total_steps=8, weight_decay=0.1), trainable)
    step = make_train_step(graphdef, opt, donate=False)
    after_step = make_after_step(graphdef, frozen, schedule)
    state = TrainState(trainable, opt.init(trainable), (), initial_masks(graphdef, frozen, trainable, masks,
                                                                           schedule))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 1, 2, 16)), jnp.int32)
    states = [state]
    for i in range(8):
        tr, os_, hs, _ = step(state.trainable, state.opt_state, state.hook_state, frozen, state.masks, tokens[i],
                              jnp.int32(i))
        state = after_step(i, state._replace(trainable=tr, opt_state=os_))
        states.append(state)
    return graphdef, frozen, schedule, states


def _model(graphdef, frozen, st):
    return nnx.merge(graphdef, st.trainable, st.masks, frozen)


@functools.lru_cache
def _forward(graphdef):
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


def logits(model, tokens) -> np.ndarray:
    """One compiled forward per model structure (the states of a run share it)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef)(state, tokens))


def test_adapters_only_in_the_last_steps_and_start_as_a_noop(slope_run):
    graphdef, frozen, schedule, states = slope_run
    assert schedule.adapter_start == 6
    first = _model(graphdef, frozen, states[0])
    l0 = {p: np.asarray(l.lora_a[...]) for p, l in slope_linears(first)}
    assert len(l0) == 14
    # L ~ N(0, 1): pooled over the 14 adapters (n ≈ 2000 draws) mean, std and a Kolmogorov-Smirnov distance to
    # the N(0, 1) CDF at the 0.1% level (U(-1, 1), std 0.58, or N(0, 0.8²) fail every one of the three)
    pooled = np.sort(np.concatenate([v.reshape(-1) for v in l0.values()]).astype(np.float64))
    n = len(pooled)
    assert abs(pooled.mean()) < 4 / np.sqrt(n) and abs(pooled.std() - 1) < 4 / np.sqrt(2 * n), (pooled.mean(),
                                                                                                  pooled.std())
    cdf = 0.5 * (1 + np.vectorize(math.erf)(pooled / np.sqrt(2)))
    ks = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
    assert ks < 1.95 / np.sqrt(n), ks
    assert all(abs(v.std() - 1) < 0.3 for v in l0.values())  # and each adapter on its own
    for t, st in enumerate(states):
        m = _model(graphdef, frozen, st)
        on = {bool(l.adapter_on[...]) for _, l in slope_linears(m)}
        assert on == {t >= 6}, t
        if t <= 6:  # trained 6 steps with weight decay 0.1: the idle adapters are bitwise untouched
            for p, l in slope_linears(m):
                assert np.array_equal(np.asarray(l.lora_a[...]), l0[p]) and not np.any(np.asarray(l.lora_b[...]))
    # switching them on at t = 6 is a no-op (R = 0)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 64, (2, 16)), jnp.int32)
    before = states[6]._replace(masks=states[5].masks)  # the t = 6 weights with the gates still off
    gates_before = {bool(l.adapter_on[...]) for _, l in slope_linears(_model(graphdef, frozen, before))}
    assert gates_before == {False}
    np.testing.assert_allclose(logits(_model(graphdef, frozen, states[6]), tokens),
                               logits(_model(graphdef, frozen, before), tokens), rtol=0, atol=0)
    # and they train afterwards: R moved, and the dense merge includes L @ R / r exactly
    last = _model(graphdef, frozen, states[8])
    assert all(np.abs(np.asarray(l.lora_b[...])).max() > 1e-4 for _, l in slope_linears(last))
    np.testing.assert_allclose(logits(dense_model(last), tokens), logits(last, tokens), atol=2e-5)


def test_masks_refresh_on_schedule_and_stay_2_4(slope_run):
    graphdef, frozen, _, states = slope_run
    for t, st in enumerate(states):
        m = _model(graphdef, frozen, st)
        prev = _model(graphdef, frozen, states[t - 1]) if t else None
        for p, l in slope_linears(m):
            w, fm, bm = np.asarray(l.kernel[...]), np.asarray(l.nm_mask[...]), np.asarray(l.backward_mask[...])
            assert np.all(nonzeros_per_group(np.where(fm, w, 0), 0) <= 2)
            assert np.all(fm.reshape(-1, 4, fm.shape[1]).sum(1) == 2)
            if t in (2, 4):  # forward refresh: M from |W| now
                np.testing.assert_array_equal(fm, nm_reference(w, 0))
            if t in (2, 4, 6):  # M₂ from |W ⊙ M| now
                np.testing.assert_array_equal(bm, fm & nm_reference(np.where(fm, w, 0), 1))
            elif t:  # otherwise both masks are carried over unchanged
                old = dict(slope_linears(prev))[p]
                np.testing.assert_array_equal(fm, np.asarray(old.nm_mask[...]))
                np.testing.assert_array_equal(bm, np.asarray(old.backward_mask[...]))
    # the masks live in the `masks` pytree (checkpointed with the train state)
    flat = nnx.to_flat_state(states[-1].masks)
    assert {p[-1] for p, v in flat if isinstance(v, Mask)} >= {"nm_mask", "backward_mask", "adapter_on"}
