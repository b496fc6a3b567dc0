"""LOST, SwitchLoRA and S-STE pretraining (issue 22): each method's rule against small hand-computed cases
(S-STE's soft-threshold of a known row, LOST's SVD split, SwitchLoRA's switch of a known candidate and the
reset of exactly the counterpart rows / columns of Adam's moments), parameter counts against the papers'
formulas, LOST's layer gradients against float64 numpy, and through the CLI: a run resumed mid-run (across
switches / 2:4 pattern changes / LOST's training) is bitwise the uninterrupted one, and `jaxprune export RUN_DIR`
gives transformers logits equal to the trained model's."""

from __future__ import annotations

import argparse
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import flat_params, jax_logits, torch_logits
from conftest import run_main_json as run
from jaxprune.cli import main
from jaxprune.config import ModelConfig
from jaxprune.errors import UserError
from jaxprune.layers import Linear
from jaxprune.partition import combine
from jaxprune.pretrain.lost import LOSTLinear, channel_count, lost_param_count, svd_split
from jaxprune.pretrain.methods import (MethodConfig, build_model, dense_model, make_pretrain_optimizer,
                                       param_summary, partition_pretrain)
from jaxprune.pretrain.sste import SSTELinear, soft_threshold_24, sste_scale
from jaxprune.pretrain.switchlora import (SwitchLoRALinear, SwitchSchedule, make_switcher, pick_positions,
                                          switch_layer, switch_linears)
from jaxprune.train import OptimConfig, TrainCheckpoints, TrainState, make_train_step

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
DENSE_REST = 64 * 32 + 2 * 2 * 32 + 32  # tied embedding, two norms per layer, the final norm
LINEARS = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 48), (32, 48), (48, 32)]  # q k v o gate up down, [in, out]


def linear(d_in, d_out, seed=0):
    return Linear(d_in, d_out, kernel=jnp.asarray(np.random.default_rng(seed).standard_normal((d_in, d_out)),
                                                  jnp.float32))


# ---- S-STE ----------------------------------------------------------------------------------------
def test_sste_soft_threshold_of_a_known_row():
    # one output channel, 8 inputs = two 2:4 groups along `in`
    w = np.array([0.5, -0.1, 0.3, -0.8, 0.05, 0.2, -0.2, 0.9], np.float32)[:, None]
    # group 1: |.| sorted 0.1 0.3 0.5 0.8, t = 0.3; group 2: t = 0.2 (a tie: 3 zeros, the function stays continuous)
    want = np.array([0.2, 0, 0, -0.5, 0, 0, 0, 0.7], np.float32)[:, None]
    np.testing.assert_allclose(np.asarray(soft_threshold_24(jnp.asarray(w))), want, atol=1e-7)
    beta = (0.5 * 0.2 + 0.8 * 0.5 + 0.9 * 0.7) / (0.2 ** 2 + 0.5 ** 2 + 0.7 ** 2)  # <w, S> / |S|²
    assert abs(float(sste_scale(jnp.asarray(w))) - beta) < 1e-6
    # continuity: moving |w₃| across |w₂| (a mask flip for hard thresholding) moves S_soft by the same small amount
    for eps in (1e-3, -1e-3):
        w2 = w.copy()
        w2[2] = -0.1 - eps if eps > 0 else -0.1 + eps  # |w₂| = 0.1, |w₃| 0.3 -> close to 0.1 from either side
        w3 = w2.copy()
        w3[2] = -w3[2]
        assert np.abs(np.asarray(soft_threshold_24(jnp.asarray(w2))) - np.asarray(soft_threshold_24(jnp.asarray(w3)))
                      ).max() < 3e-3


def test_sste_layer_forward_is_beta_soft_and_backward_straight_through():
    lin = SSTELinear(linear(16, 12))
    w = np.asarray(lin.kernel[...])
    beta = float(lin.sste_beta[...])
    sparse = beta * np.asarray(soft_threshold_24(jnp.asarray(w)))
    groups = (sparse.T.reshape(12, 4, 4) != 0).sum(-1)
    assert groups.max() <= 2 and groups.mean() == 2  # random weights: exactly 2:4 along `in`
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), x @ sparse, rtol=1e-5, atol=1e-5)
    g = np.random.default_rng(2).standard_normal((3, 12)).astype(np.float32)
    graphdef, params, rest = nnx.split(lin, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(jnp.asarray(x)) * g))(params)
    np.testing.assert_allclose(np.asarray(grads["kernel"][...]), x.T @ g, rtol=1e-5, atol=1e-5)  # dense: pruned too
    # β is frozen: not a parameter, so not in the trainable pytree
    assert "sste_beta" not in params and beta == float(sste_scale(jnp.asarray(w)))


def test_sste_parameter_counts_and_bad_shape():
    mc = MethodConfig(method="sste")
    s = param_summary(build_model(CFG, mc), CFG, mc)
    dense = sum(i * o for i, o in LINEARS) * 2
    assert s["trainable_params"] == DENSE_REST + dense  # the dense master weights train
    assert s["linear_params_stored"] == dense // 2 and s["params_stored"] == DENSE_REST + dense // 2
    with pytest.raises(UserError, match="divisible by 4"):
        SSTELinear(linear(6, 8))


# ---- LOST -----------------------------------------------------------------------------------------
def test_lost_svd_split_reconstructs_w():
    w = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    top2 = (u[:, :2] * s[:2]) @ vt[:2]
    comp = w - top2
    a, b, idx, sv = (np.asarray(x) for x in svd_split(jnp.asarray(w), 2, 1.0))
    np.testing.assert_allclose(a @ b, top2, atol=1e-5)  # the dominant directions
    np.testing.assert_allclose((a @ b)[idx] + sv, w[idx], atol=1e-5)
    assert list(idx) == list(range(6))  # ρ = 1: every channel, W exactly
    a, b, idx, sv = (np.asarray(x) for x in svd_split(jnp.asarray(w), 2, 0.34))
    assert channel_count(6, 0.34) == 3 == len(idx)  # ⌈0.34 · 6⌉
    assert list(idx) == sorted(np.argsort(-np.linalg.norm(comp, axis=1))[:3])  # largest complement rows
    np.testing.assert_allclose(sv, comp[idx], atol=1e-5)
    lin = LOSTLinear(Linear(6, 5, kernel=jnp.asarray(w)), rank=2, ratio=0.34)
    merged = np.asarray(lin.merged_kernel())
    np.testing.assert_allclose(merged[idx], w[idx], atol=1e-5)  # W₀ on the sparse channels ...
    off = np.setdiff1d(np.arange(6), idx)
    np.testing.assert_allclose(merged[off], top2[off], atol=1e-5)  # ... its top-r SVD elsewhere
    x = np.random.default_rng(1).standard_normal((2, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), x @ merged, rtol=1e-5, atol=1e-5)


def test_lost_layer_gradients_match_float64_numpy():
    """The LOST layer's gradients (through nnx, as the train step takes them) of A, B, S and the bias against
    float64 numpy: y = (x@A)@B + x[..., idx]@S + b, L = Σ (y − t)², G = 2(y − t): dA = xᵀ G Bᵀ,
    dB = (xA)ᵀ G, dS = x[..., idx]ᵀ G, db = Σ G; the channel index (frozen) has none. A, B, S are moved off the
    SVD init first, so no term vanishes by construction."""
    rng = np.random.default_rng(0)
    lin = LOSTLinear(Linear(12, 10, kernel=jnp.asarray(rng.standard_normal((12, 10)), jnp.float32), use_bias=True,
                            bias=jnp.asarray(rng.standard_normal(10), jnp.float32)), rank=3, ratio=0.4)
    for v in (lin.lora_a, lin.lora_b, lin.sparse_values):
        v.set_value(v[...] + jnp.asarray(0.3 * rng.standard_normal(v[...].shape), jnp.float32))
    x = rng.standard_normal((3, 5, 12)).astype(np.float32)
    t = rng.standard_normal((3, 5, 10)).astype(np.float32)
    graphdef, params, rest = nnx.split(lin, nnx.Param, ...)
    loss, g = jax.value_and_grad(lambda p: jnp.sum((nnx.merge(graphdef, p, rest)(jnp.asarray(x)) - t) ** 2))(params)
    a, b, sv, bias = (np.asarray(v[...], np.float64) for v in (lin.lora_a, lin.lora_b, lin.sparse_values, lin.bias))
    idx = np.asarray(lin.channel_index[...])
    assert len(idx) == channel_count(12, 0.4) == 5
    x2, t2 = x.reshape(-1, 12).astype(np.float64), t.reshape(-1, 10).astype(np.float64)
    y = x2 @ a @ b + x2[:, idx] @ sv + bias
    G = 2 * (y - t2)
    np.testing.assert_allclose(float(loss), ((y - t2) ** 2).sum(), rtol=1e-5)
    for name, want in (("lora_a", x2.T @ G @ b.T), ("lora_b", (x2 @ a).T @ G), ("sparse_values", x2[:, idx].T @ G),
                       ("bias", G.sum(0))):
        got = np.asarray(g[name][...], np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)
    assert "channel_index" not in g and "kernel" not in g  # no dense weight, and the channels do not train


def test_lost_parameter_counts():
    mc = MethodConfig(method="lost", rank=4, channel_ratio=0.1)
    model = build_model(CFG, mc)
    per = [4 * (i + o) + int(np.ceil(0.1 * i)) * o for i, o in LINEARS]  # r(in + out) + ⌈ρ·in⌉·out
    assert per == [lost_param_count(i, o, 4, 0.1) for i, o in LINEARS] == [384, 256, 256, 384, 512, 512, 480]
    s = param_summary(model, CFG, mc)
    assert s["linear_params_stored"] == 2 * sum(per) and s["trainable_params"] == DENSE_REST + 2 * sum(per)
    frozen = partition_pretrain(model)[1]
    assert all(x.dtype == jnp.int32 for x in jax.tree.leaves(frozen)) and len(jax.tree.leaves(frozen)) == 14


# ---- SwitchLoRA -----------------------------------------------------------------------------------
def test_switchlora_pick_positions_and_schedule():
    blocked = jnp.array([False, False, True, False, False])
    assert list(np.asarray(pick_positions(jnp.int32(3), jnp.int32(3), blocked))) == [True, False, False, True, True]
    assert list(np.asarray(pick_positions(jnp.int32(0), jnp.int32(4), blocked))) == [True, True, False, False, False]
    sch = SwitchSchedule(steps=100, interval=4, descent_ratio=0.1, freeze_steps=2)
    q = 0.3 ** (1 / 10)  # a third-ish (0.3x) of the start rate at step D = 0.1 · 100
    rates = [8 * q ** (u + 1) / 4 for u in range(100)]  # r / interval(u)
    assert [sch.total(t, 8) for t in range(100)] == [int(np.floor(sum(rates[:t + 1]) + 1e-9)) for t in range(100)]
    assert sum(sch.count(t, 8) for t in range(100)) == sch.total(99, 8) and sch.count(0, 8) == 1
    with pytest.raises(UserError, match="must be >= 2 x freeze_steps"):
        SwitchSchedule(steps=10, interval=3, freeze_steps=2)


def test_switchlora_switch_of_a_known_candidate_keeps_the_function():
    lin = SwitchLoRALinear(linear(8, 6), rank=2, key=jax.random.key(0))
    assert lin.cand_a[...].shape == (6, 8) and lin.cand_b[...].shape == (6, 6)  # K = min(in, out) per side
    sel_a, sel_b = np.asarray(lin.sel_a[...]), np.asarray(lin.sel_b[...])
    np.testing.assert_array_equal(np.asarray(lin.lora_a[...]), np.asarray(lin.cand_a[...])[sel_a].T)
    before = np.asarray(lin.merged_kernel())
    a0, b0 = np.asarray(lin.lora_a[...]), np.asarray(lin.lora_b[...])
    sw_a, sw_b = switch_layer(lin, jax.random.key(1), jnp.int32(1), freeze_steps=3)
    # A switches round-robin from position 0, B from r/2 = 1
    assert list(np.asarray(sw_a)) == [True, False] and list(np.asarray(sw_b)) == [False, True]
    new_a, new_b = np.asarray(lin.sel_a[...]), np.asarray(lin.sel_b[...])
    assert new_a[1] == sel_a[1] and new_a[0] != sel_a[1] and new_b[0] == sel_b[0] and new_b[1] != sel_b[0]
    a1, b1 = np.asarray(lin.lora_a[...]), np.asarray(lin.lora_b[...])
    np.testing.assert_array_equal(a1[:, 0], np.asarray(lin.cand_a[...])[new_a[0]])  # the candidate, copied
    np.testing.assert_array_equal(a1[:, 1], a0[:, 1])
    np.testing.assert_array_equal(b1[1], np.asarray(lin.cand_b[...])[new_b[1]])
    np.testing.assert_array_equal(b1[0], b0[0])
    np.testing.assert_allclose(np.asarray(lin.merged_kernel()), before, atol=1e-6)  # W absorbs the difference
    # the counterparts are frozen: B's row 0 (A switched at 0), A's column 1 (B switched at 1)
    assert list(np.asarray(lin.frozen_b[...])) == [3, 0] and list(np.asarray(lin.frozen_a[...])) == [0, 3]
    assert list(np.asarray(lin.pointers[...])) == [1, 0]
    # while frozen, neither position switches again: n = 2 finds nothing free
    sw_a, sw_b = switch_layer(lin, jax.random.key(2), jnp.int32(2), freeze_steps=3)
    assert not np.asarray(sw_a).any() and not np.asarray(sw_b).any()
    assert list(np.asarray(lin.frozen_b[...])) == [2, 0]  # counted down by one step


def test_switchlora_resets_exactly_the_counterparts_moments_and_freezes_them():
    mc = MethodConfig(method="switchlora", rank=4)
    model = build_model(CFG, mc, seed=0)
    per = [4 * (i + o) for i, o in LINEARS]
    s = param_summary(model, CFG, mc)
    assert s["linear_params_stored"] == 2 * sum(per) and s["trainable_params"] == DENSE_REST + 2 * sum(per)
    graphdef, frozen, trainable, masks = partition_pretrain(model)
    opt = make_pretrain_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10), trainable)
    step = make_train_step(graphdef, opt, donate=False)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 2, 16)), jnp.int32)
    opt_state = opt.init(trainable)
    trainable, opt_state, _, _ = step(trainable, opt_state, (), frozen, masks, batch, jnp.int32(0))
    new_t, new_m, new_o = make_switcher(graphdef, 0, 2)(trainable, frozen, masks, opt_state, jnp.int32(0),
                                                        jnp.int32(1))

    def adam(o):
        return next(x for x in jax.tree.leaves(o, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu"))

    flat = lambda t: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(t)}  # noqa: E731
    mu0, nu0, mu1, nu1 = flat(adam(opt_state).mu), flat(adam(opt_state).nu), flat(adam(new_o).mu), flat(adam(new_o).nu)
    for p in mu0:
        if p[-1] == "lora_b":  # A switched at position 0 -> B's row 0 reset
            for m0, m1 in ((mu0, mu1), (nu0, nu1)):
                assert not m1[p][0].any() and m0[p][0].any()
                np.testing.assert_array_equal(m1[p][1:], m0[p][1:])
        elif p[-1] == "lora_a":  # B switched at position r/2 = 2 -> A's column 2 reset
            for m0, m1 in ((mu0, mu1), (nu0, nu1)):
                assert not m1[p][:, 2].any() and m0[p][:, 2].any()
                np.testing.assert_array_equal(np.delete(m1[p], 2, 1), np.delete(m0[p], 2, 1))
        else:
            np.testing.assert_array_equal(mu1[p], mu0[p])
            np.testing.assert_array_equal(nu1[p], nu0[p])
    # the next 2 steps leave the frozen vectors bitwise where the switch put them; the others move
    t, o = new_t, new_o
    for i in (1, 2):
        t, o, _, _ = step(t, o, (), frozen, new_m, batch, jnp.int32(i))
    sw, after = flat(new_t), flat(t)
    for p in sw:
        if p[-1] == "lora_b":
            np.testing.assert_array_equal(after[p][0], sw[p][0])
            assert not np.array_equal(after[p][1], sw[p][1])
        elif p[-1] == "lora_a":
            np.testing.assert_array_equal(after[p][:, 2], sw[p][:, 2])
    m = combine(graphdef, frozen, new_t, new_m)
    assert all(list(np.asarray(l.frozen_b[...])) == [2, 0, 0, 0] for _, l in switch_linears(m))


# ---- through the CLI ------------------------------------------------------------------------------
TINY = ["--hidden-size", "32", "--intermediate-size", "32", "--num-layers", "2", "--num-heads", "4",
        "--num-kv-heads", "4", "--seq-len", "32", "--batch-size", "2", "--lora-rank", "4", "--lora-alpha", "8",
        "--warmup-steps", "1", "--lr", "1e-2", "--val-blocks", "2", "--no-progress", "--json", "--steps", "8",
        "--save-every", "4", "--val-every", "0"]
METHOD_ARGS = {
    "lost": ["--method", "lost", "--lost-channel-ratio", "0.25"],
    "switchlora": ["--method", "switchlora", "--switch-interval", "2", "--switch-freeze-steps", "1",
                   "--switch-descent-ratio", "1"],
    "sste": ["--method", "sste"],
}


def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def model_at(run_dir, step):
    """The method's model of the run at ``step``: rebuilt from run.json and the checkpointed state."""
    from jaxprune.commands.pretrain import load_tokenizer, method_config, model_config

    args = argparse.Namespace(**json.loads((run_dir / "run.json").read_text()))
    cfg = model_config(args, load_tokenizer(args.tokenizer))
    graphdef, frozen, trainable, masks = partition_pretrain(build_model(cfg, method_config(args), seed=args.seed))
    like = TrainState(trainable, make_pretrain_optimizer(OptimConfig(), trainable).init(trainable), (), masks)
    ckpts = TrainCheckpoints(run_dir / "checkpoints", keep=10)
    try:
        state, _ = ckpts.restore(step, like)
    finally:
        ckpts.close()
    return combine(graphdef, frozen, state.trainable, state.masks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fixtures, small_text):
    """Each method: 8 steps, checkpoints at 4 and 8 (the uninterrupted reference runs)."""
    import contextlib
    import io

    base = tmp_path_factory.mktemp("newpre")
    common = ["--text", str(small_text), "--tokenizer", str(fixtures.hf_dir), *TINY, "--keep", "3"]
    out = {}
    for name, extra in METHOD_ARGS.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["pretrain", *common, *extra, "--out", str(base / name)]) == 0
        out[name] = (base / name, json.loads(buf.getvalue().splitlines()[-1]), common + extra)
    return out


@pytest.mark.parametrize("name", ["switchlora", "sste", "lost"])
def test_resume_mid_run_is_bitwise_the_same(runs, name, tmp_path, capsys):
    run_dir, out, argv = runs[name]
    ref = tmp_path / name  # the uninterrupted run (run.json records --out, so the resume happens in place)
    shutil.copytree(run_dir, ref)
    # "killed" right after the step-4 checkpoint: later checkpoints and outputs gone, the log runs ahead
    for sub in ("checkpoints/8", "model", "pretrain.json", "loss.png"):
        shutil.rmtree(run_dir / sub) if (run_dir / sub).is_dir() else (run_dir / sub).unlink()
    out2 = run(capsys, "pretrain", *argv, "--out", run_dir, "--resume")
    traj = lambda d: [(r["step"], r["loss"], r["grad_norm"], r.get("val_ppl")) for r in metrics(d)]  # noqa: E731
    assert traj(run_dir) == traj(ref) and out2["final_loss"] == out["final_loss"]
    got, want = flat_params(run_dir / "model"), flat_params(ref / "model")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    m4, m8 = model_at(ref, 4), model_at(ref, 8)
    if name == "switchlora":  # vectors switched between the checkpoints: selections and the frozen W moved
        l4 = dict(switch_linears(m4))
        changed = [not np.array_equal(np.asarray(l4[p].sel_a[...]), np.asarray(l.sel_a[...]))
                   and not np.array_equal(np.asarray(l4[p].kernel[...]), np.asarray(l.kernel[...]))
                   for p, l in switch_linears(m8)]
        assert all(changed) and out["switches_scheduled"] >= 4
    elif name == "sste":  # the 2:4 pattern of the forward weight changed between the checkpoints
        k4 = np.asarray(m4.layers[0].mlp.up_proj.merged_kernel()) != 0
        k8 = np.asarray(m8.layers[0].mlp.up_proj.merged_kernel()) != 0
        assert (k4 != k8).any()
    else:  # LOST: A, B and S all trained between the checkpoints, on the same frozen channels
        l4, l8 = m4.layers[0].mlp.up_proj, m8.layers[0].mlp.up_proj
        np.testing.assert_array_equal(np.asarray(l4.channel_index[...]), np.asarray(l8.channel_index[...]))
        assert all(not np.array_equal(np.asarray(getattr(l4, v)[...]), np.asarray(getattr(l8, v)[...]))
                   for v in ("lora_a", "lora_b", "sparse_values"))


@pytest.mark.parametrize("name", list(METHOD_ARGS))
def test_export_logits_equal_the_trained_model(runs, name, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, out, _ = runs[name]
    model = model_at(run_dir, 8)
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 16))
    want = jax_logits(model, tokens)
    np.testing.assert_allclose(jax_logits(dense_model(model), tokens), want, rtol=0, atol=1e-5)
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(hf, tokens), want, rtol=0, atol=1e-4)
    if name == "sste":  # the exported weights are 2:4 along `in`
        w = hf.model.layers[0].mlp.up_proj.weight.detach().numpy()  # [out, in]
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    rec = json.loads((run_dir / "run.json").read_text())
    assert out["method"] == name and rec["method"] == name


@pytest.mark.parametrize("extra, needle", [
    (["--method", "switchlora", "--switch-interval", "4", "--switch-freeze-steps", "3"],
     "--switch-interval 4 must be >= 2 x --switch-freeze-steps (3)"),
    (["--method", "switchlora", "--lora-rank", "32"], "must be below min(in, out) = 32"),
    (["--method", "lost", "--lost-channel-ratio", "0"], "argument --lost-channel-ratio: must be a number in (0, 1]"),
    (["--method", "lost", "--lora-rank", "64"], "exceeds min(in, out) = 32"),
    (["--method", "sste", "--hidden-size", "36", "--num-heads", "2", "--num-kv-heads", "2",
      "--intermediate-size", "34"], "divisible by 4"),  # down_proj's in = 34 (head_dim 18: RoPE needs it even)
])
def test_bad_flags_are_one_line_and_leave_no_run_dir(fixtures, small_text, tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    capsys.readouterr()
    argv = ["pretrain", "--text", str(small_text), "--tokenizer", str(fixtures.hf_dir), *TINY, *extra,
            "--out", str(out)]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxprune pretrain: error:") and needle in lines[0], lines
    assert not out.exists()
