"""LoRA-guided importance (LoRAPrune), its moving average, and the claim that the LoRAPrune step
never forms a base-weight gradient (issue 5, items 1, 2, 3, 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune.config import ModelConfig
from jaxprune.layers import Linear
from jaxprune.weights import linears
from jaxprune.partition import partition
from jaxprune.prune.loraprune import lora_guided_importance, lora_merged_grad
from jaxprune.prune.loraprune import ImportanceState, ema_update, importance_hook, init_importance
from jaxprune.train import make_loss_fn, make_train_step

from conftest import random_llama

ALL = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"

GQA = ModelConfig(vocab_size=50, hidden_size=24, intermediate_size=20, num_layers=2, num_heads=6,
                  num_kv_heads=3, head_dim=4, max_position_embeddings=64)


# ---- 1. the merged-weight gradient estimate G ----------------------------------------------------
def test_lora_merged_grad_is_the_formula_exactly():
    """Integer-valued fp32 inputs: every product and sum is exact, so array_equal is fair."""
    rng = np.random.default_rng(0)
    a, b, ga, gb = (rng.integers(-4, 5, s).astype(np.float32) for s in ((7, 3), (3, 5), (7, 3), (3, 5)))
    want = ga @ b + a @ gb - ga @ gb  # [in, out]
    got = np.asarray(lora_merged_grad(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ga), jnp.asarray(gb)))
    assert got.shape == (7, 5)
    assert np.array_equal(got, want)


def _lora_linear(seed=0, n_in=7, n_out=5, rank=3, alpha=6.0):
    lin = Linear(n_in, n_out, rngs=nnx.Rngs(seed))
    lin.add_lora(rank, alpha, nnx.Rngs(seed + 1))
    lin.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed + 2), (rank, n_out))  # B = 0 would hide terms
    return lin


def test_lora_merged_grad_is_the_merged_weight_change_of_an_sgd_step():
    """The precise statement behind LoRAPrune's estimate, in our [in, out] layout.

    W' = W + s·A@B (A [in, r], B [r, out]). One SGD step of size η on the factors,
    A ← A − η∇A, B ← B − η∇B, changes the merged weight by exactly

        ΔW' = s·[(A − η∇A)(B − η∇B) − AB] = −s·G(A, B, η∇A, η∇B)

    with G = lora_merged_grad (an algebraic identity, any loss). The gradients come from jax.grad
    through the real Linear forward (which computes x@W + s·(x@A)@B, never W').
    For a loss linear in W', L = Σ C ⊙ W' (here L = Σ R ⊙ (X W') so C = Xᵀ R), the chain rule gives
    ∇A = s·C·Bᵀ and ∇B = s·Aᵀ·C, so the first-order part of G is s·(C·BᵀB + AAᵀ·C): the true
    merged-weight gradient C (checked with jax.grad w.r.t. W') seen through the LoRA factors, and
    ΔW'/η → −s·(∇A·B + A·∇B) as η → 0 with an O(η) remainder −s·η·∇A·∇B.
    """
    lin = _lora_linear()
    s = lin.lora_scale
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    r = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    graphdef, lora, rest = nnx.split(lin, nnx.LoRAParam, ...)

    def loss(lora_state):
        return jnp.sum(r * nnx.merge(graphdef, lora_state, rest)(x))

    g = nnx.to_pure_dict(jax.grad(loss)(lora))
    a, b = lin.lora_a[...], lin.lora_b[...]
    ga, gb = g["lora_a"], g["lora_b"]
    w_before = lin.merged_kernel()

    # the true gradient of the merged weight, and the chain rule through A and B
    c = jax.grad(lambda w: jnp.sum(r * (x @ w)))(w_before)
    np.testing.assert_allclose(c, x.T @ r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ga, s * c @ b.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, s * a.T @ c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ga @ b + a @ gb, s * (c @ b.T @ b + a @ a.T @ c), rtol=1e-5, atol=1e-5)

    for eta in (1.0, 0.05):
        stepped = nnx.merge(graphdef, jax.tree.map(lambda p, d: p - eta * d, lora, jax.grad(loss)(lora)), rest)
        delta = np.asarray(stepped.merged_kernel() - w_before)
        want = -s * np.asarray(lora_merged_grad(a, b, eta * ga, eta * gb))
        np.testing.assert_allclose(delta, want, rtol=1e-4, atol=1e-5 * max(1.0, eta * np.abs(want).max()))
        # η = 1 is the form the pruner uses: ΔW' = −s·G(A, B, ∇A, ∇B)
        if eta == 1.0:
            np.testing.assert_allclose(delta, -s * np.asarray(lora_merged_grad(a, b, ga, gb)), rtol=1e-4,
                                       atol=1e-5 * np.abs(want).max())

    # first order: ΔW'/η = −s·(∇A·B + A·∇B) + s·η·∇A·∇B
    eta = 1e-3
    stepped = nnx.merge(graphdef, jax.tree.map(lambda p, d: p - eta * d, lora, jax.grad(loss)(lora)), rest)
    delta = np.asarray(stepped.merged_kernel() - w_before, np.float64) / eta
    first = -s * np.asarray(ga @ b + a @ gb, np.float64)
    err = np.abs(delta - first).max() / np.abs(first).max()
    assert err < 1e-2, err  # O(η) + fp32 cancellation; a wrong sign or factor gives err ~ 1


# ---- 2. lora_guided_importance against numpy ------------------------------------------------------
def _gqa_model_with_lora(targets=ALL, seed=0):
    # random B (instead of the initial zeros) and random "gradients" of the LoRA factors
    model = random_llama(GQA, seed, lora={targets: (3, 6.0)}, lora_b_std=0.2)
    graphdef, frozen, trainable, masks = partition(model)
    rng = np.random.default_rng(seed + 10)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), trainable)
    return graphdef, frozen, trainable, masks, grads


def _numpy_importance(cfg, trainable, grads, frozen, unit, s):
    """Hand reference: per module |G ⊙ W'| -> per-unit sums -> L2 normalise -> sum over the group."""
    H, KV, D, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    attn_out, mlp_out = [], []
    for i in range(cfg.num_layers):
        def element(block, mod):
            t = trainable["layers"][i][block].get(mod)
            if t is None or "lora_a" not in t:
                return None
            a, b = np.asarray(t["lora_a"], np.float64), np.asarray(t["lora_b"], np.float64)
            ga = np.asarray(grads["layers"][i][block][mod]["lora_a"], np.float64)
            gb = np.asarray(grads["layers"][i][block][mod]["lora_b"], np.float64)
            w = np.asarray(frozen["layers"][i][block][mod]["kernel"], np.float64)
            gm = ga @ b + a @ gb - ga @ gb
            return np.abs(gm * (w + s * a @ b))

        norm = lambda v: v / np.linalg.norm(v)  # noqa: E731
        n_units = KV if unit == "kv_group" else H
        total = np.zeros(n_units)
        for mod in ("q_proj", "k_proj", "v_proj", "o_proj"):
            e = element("self_attn", mod)
            if e is None:
                continue
            if mod in ("k_proj", "v_proj"):
                if unit == "q_head":
                    continue  # shared by the heads of a group: not a q_head score
                per_kv = np.array([e[:, j * D:(j + 1) * D].sum() for j in range(KV)])
                total += norm(per_kv)
                continue
            # q: output columns of head h are h*D..h*D+D; o: input rows of head h
            per_head = np.array([(e[:, h * D:(h + 1) * D] if mod == "q_proj" else e[h * D:(h + 1) * D, :]).sum()
                                 for h in range(H)])
            if unit == "kv_group":  # query head h belongs to KV head h // G (HF repeat_kv)
                per_head = np.array([per_head[j * G:(j + 1) * G].sum() for j in range(KV)])
            total += norm(per_head)
        attn_out.append(total)
        total = np.zeros(cfg.intermediate_size)
        for mod in ("gate_proj", "up_proj", "down_proj"):
            e = element("mlp", mod)
            if e is not None:
                total += norm(e.sum(axis=1) if mod == "down_proj" else e.sum(axis=0))
        mlp_out.append(total)
    return attn_out, mlp_out


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
@pytest.mark.parametrize("targets", [ALL, "q_proj|v_proj|o_proj|up_proj"])
def test_lora_guided_importance_matches_numpy(unit, targets):
    _, frozen, trainable, _, grads = _gqa_model_with_lora(targets)
    fr, tr, gr = nnx.to_pure_dict(frozen), nnx.to_pure_dict(trainable), nnx.to_pure_dict(grads)
    attn, mlp = jax.jit(lambda t, g, f: lora_guided_importance(GQA, t, g, f, unit, 2.0))(tr, gr, fr)
    want_attn, want_mlp = _numpy_importance(GQA, tr, gr, fr, unit, 2.0)
    assert [a.shape for a in attn] == [(3,) if unit == "kv_group" else (6,)] * 2
    for got, want in zip(attn, want_attn):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    for got, want in zip(mlp, want_mlp):
        assert got.shape == (20,)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)


# ---- 3. the moving average -----------------------------------------------------------------------
def test_ema_update_and_nan_guard():
    state = init_importance(GQA, "q_head")
    assert [a.shape for a in state.attn] == [(6,)] * 2 and [m.shape for m in state.mlp] == [(20,)] * 2
    rng = np.random.default_rng(0)
    old = ImportanceState(tuple(jnp.asarray(rng.random(6), jnp.float32) for _ in range(2)),
                          tuple(jnp.asarray(rng.random(20), jnp.float32) for _ in range(2)), jnp.int32(3),
                          tuple(jnp.asarray(rng.random(6), jnp.float32) for _ in range(2)))
    new = (tuple(jnp.asarray(rng.random(6), jnp.float32) for _ in range(2)),
           tuple(jnp.asarray(rng.random(20), jnp.float32) for _ in range(2)))
    beta = 0.9
    out = jax.jit(ema_update, static_argnums=2)(old, new, beta)
    for o, n, got in zip((*old.attn, *old.mlp), (*new[0], *new[1]), (*out.attn, *out.mlp)):
        np.testing.assert_allclose(np.asarray(got), beta * np.asarray(o) + (1 - beta) * np.asarray(n), rtol=1e-6)
    for o, n, got in zip(old.attn_sum, new[0], out.attn_sum):
        np.testing.assert_allclose(np.asarray(got), np.asarray(o) + np.asarray(n), rtol=1e-6)
    assert int(out.updates) == 4

    for bad in (np.nan, np.inf):
        mlp1 = np.asarray(new[1][1]).copy()
        mlp1[7] = bad
        poisoned = (new[0], (new[1][0], jnp.asarray(mlp1)))
        out = jax.jit(ema_update, static_argnums=2)(old, poisoned, beta)
        for o, got in zip((*old.attn, *old.mlp, *old.attn_sum), (*out.attn, *out.mlp, *out.attn_sum)):
            assert np.array_equal(np.asarray(got), np.asarray(o))
        assert int(out.updates) == 3


def test_attn_score_mean_ranks_by_the_window_sum_where_ema_ranks_by_recency():
    """Two accepted steps of attention scores for a 3-KV-group layer, β = 0.5: the EMA is
    [3, 2.5, 3.75] (group 1 lowest), the sum [6, 10, 10] (group 0 lowest). ``--attn-score ema`` prunes
    group 1, ``mean`` group 0; MLP channels follow the EMA either way."""
    from types import SimpleNamespace

    from jaxprune.model import LlamaForCausalLM
    from jaxprune.partition import partition
    from jaxprune.prune.loraprune import scheduled_mask_update
    from jaxprune.prune.schedule import CubicSchedule

    cfg = GQA.replace(num_heads=3, num_kv_heads=3, head_dim=8, num_layers=1)
    assert init_importance(cfg, "kv_group").attn_sum == ()  # the default (ema) keeps the old checkpoint layout
    state = init_importance(cfg, "kv_group", track_sum=True)
    mlp_steps = (np.arange(20, dtype=np.float32), np.arange(20, dtype=np.float32)[::-1].copy())
    for attn, mlp in zip(([0.0, 10.0, 5.0], [6.0, 0.0, 5.0]), mlp_steps):
        state = ema_update(state, ((jnp.asarray(attn, jnp.float32),), (jnp.asarray(mlp),)), 0.5)
    np.testing.assert_allclose(np.asarray(state.attn[0]), [3.0, 2.5, 3.75])
    np.testing.assert_allclose(np.asarray(state.attn_sum[0]), [6.0, 10.0, 10.0])
    masks = partition(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))[3]
    schedule = CubicSchedule(4, 0.4, warmup=0.0, cooldown=0.0, every=4)  # one prune step, at t = 4: ratio 0.4
    kept = {}
    for how in ("ema", "mean"):
        st = SimpleNamespace(hook_state=state, masks=masks, _replace=lambda **kw: SimpleNamespace(**kw))
        out = scheduled_mask_update(cfg, "kv_group", [0], schedule, attn_score=how)(3, st)
        d = nnx.to_pure_dict(out.masks)["layers"][0]
        kept[how] = (np.asarray(d["self_attn"]["head_mask"]), np.asarray(d["mlp"]["channel_mask"]))
    assert kept["ema"][0].tolist() == [True, False, True] and kept["mean"][0].tolist() == [False, True, True]
    # EMA of the channels: 0.25·i + 0.5·(19 − i) is lowest for the largest i: channels 12..19 (8 = int(0.4·20))
    want = np.arange(20) < 12
    assert np.array_equal(kept["ema"][1], want) and np.array_equal(kept["mean"][1], want)


# ---- 6. no base-weight gradient in the LoRAPrune step --------------------------------------------
# Shapes chosen so no LoRA factor, activation or other weight shares a frozen 2-D weight's shape:
# hidden 40, intermediate 72, 6 heads x 8 = 48 (q, o), 3 KV heads x 8 = 24 (k, v), vocab 56, rank 4.
UNIQUE = ModelConfig(vocab_size=56, hidden_size=40, intermediate_size=72, num_layers=1, num_heads=6,
                     num_kv_heads=3, head_dim=8, max_position_embeddings=64)


def _frozen_matrix_shapes(frozen) -> set[tuple[int, ...]]:
    return {tuple(x.shape) for x in jax.tree.leaves(frozen) if x.ndim == 2}


def _count_shaped_outputs(jaxpr, shapes, min_contraction: int = 0) -> int:
    """Number of equation outputs (recursively, through jit / scan / custom_jvp / custom_vjp bodies) whose
    shape is one of ``shapes``. Inputs are not counted: only values the computation *forms*. With
    ``min_contraction``: only dot_generals contracting at least that many elements per output, i.e. sums over
    tokens (a weight gradient Σ_t x_t·dy_t), not rank-r products (W + s·A@B, LoRAPrune's G)."""
    n = 0
    for eqn in jaxpr.eqns:
        if min_contraction:
            if eqn.primitive.name == "dot_general":
                (lhs_c, _), _ = eqn.params["dimension_numbers"]
                size = int(np.prod([eqn.invars[0].aval.shape[d] for d in lhs_c]))
                n += size >= min_contraction and tuple(eqn.outvars[0].aval.shape) in shapes
        else:
            n += sum(tuple(getattr(v.aval, "shape", ())) in shapes for v in eqn.outvars)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_shaped_outputs(inner, shapes, min_contraction)
    return n


def _unique_setup():
    model = random_llama(UNIQUE, 0, lora={ALL: (4, 8.0)}, lora_b_std=0.05)
    graphdef, frozen, trainable, masks = partition(model)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 56, (1, 2, 16)), jnp.int32)  # [accum, B, S]
    return graphdef, frozen, trainable, masks, batch


def test_loraprune_step_forms_no_base_weight_gradient():
    """LoRAPrune's claim: importance needs only LoRA gradients; no gradient of a frozen weight exists.

    The importance itself *does* form kernel-shaped values by design (W' = W + s·A@B and G, for
    |G ⊙ W'|), so "no kernel-shaped value anywhere" would be false. The check that can fail is:

    (i)  the grads pytree handed to the hook holds LoRA factors only (no frozen path, no kernel shape);
    (ii) counting equation outputs of frozen-matrix shape in the jaxpr: the train step *without* the
         hook forms none (forward + backward w.r.t. LoRA never materialise a W-shaped value), and the
         step *with* the hook forms exactly as many as the hook forms on its own, i.e. the backward
         pass contributes zero. As a positive control, LLM-Pruner's Taylor step
         (prune/cli.taylor_importance_step), which differentiates w.r.t. the frozen weights, forms at
         least one per frozen matrix (their cotangents), so the counter does see base gradients;
    (iii) the outputs of the compiled step (trainable, opt_state, hook_state, metrics) hold no leaf of
         a frozen matrix's shape, and the hook state equals the EMA of the hand-computed importance.
    """
    from jaxprune.prune.llm_pruner import taylor_importance_step

    graphdef, frozen, trainable, masks, batch = _unique_setup()
    shapes = _frozen_matrix_shapes(frozen)
    assert len(shapes) == 7  # q, k/v, o, gate/up, down, embed, lm_head
    assert all(lin.lora_scale == 2.0 for _, lin in linears(nnx.merge(graphdef, frozen, trainable, masks))
               if lin.has_lora)
    lora_shapes = {tuple(x.shape) for x in jax.tree.leaves(trainable)}
    assert not shapes & lora_shapes

    seen = {}
    inner_hook = importance_hook(UNIQUE, "q_head", lora_scale=2.0)

    def recording_hook(state, tr, grads, fr, mk, step):
        seen["paths"] = [tuple(str(k) for k in p) for p, _ in nnx.to_flat_state(grads)]
        seen["shapes"] = {tuple(x.shape) for x in jax.tree.leaves(grads)}
        return inner_hook(state, tr, grads, fr, mk, step)

    optimizer = optax.sgd(0.1)
    hook_state = init_importance(UNIQUE, "q_head")
    args = lambda: (trainable, optimizer.init(trainable), hook_state, frozen, masks, batch, jnp.int32(0))  # noqa

    with_hook = make_train_step(graphdef, optimizer, grad_hook=recording_hook, donate=False)
    without = make_train_step(graphdef, optimizer, donate=False)
    tokens = batch.shape[1] * batch.shape[2]  # a weight gradient sums over every token of the micro-batch
    jaxpr_with = jax.make_jaxpr(with_hook)(*args()).jaxpr
    # (i)
    assert seen["paths"] and all(p[-1] in ("lora_a", "lora_b") for p in seen["paths"])
    assert not seen["shapes"] & shapes
    # (ii) W-shaped sums over tokens: none in the LoRAPrune step (with or without the hook) ...
    jaxpr_without = jax.make_jaxpr(without)(*args()).jaxpr
    assert _count_shaped_outputs(jaxpr_with, shapes, tokens) == 0
    assert _count_shaped_outputs(jaxpr_without, shapes, tokens) == 0
    # ... and the hook adds its own W-shaped values (W', G), the step's backward none beyond its forward's
    zero_grads = jax.tree.map(jnp.zeros_like, trainable)
    n_hook = _count_shaped_outputs(jax.make_jaxpr(inner_hook)(hook_state, trainable, zero_grads, frozen, masks,
                                                             jnp.int32(0)).jaxpr, shapes)
    assert n_hook > 0
    assert _count_shaped_outputs(jaxpr_with, shapes) == _count_shaped_outputs(jaxpr_without, shapes) + n_hook
    # positive control: LLM-Pruner's Taylor step forms one per frozen linear kernel (the embedding's is a scatter)
    taylor = taylor_importance_step(graphdef, UNIQUE, "q_head")
    n_taylor = _count_shaped_outputs(jax.make_jaxpr(taylor)(frozen, trainable, masks, batch[0]).jaxpr, shapes,
                                     tokens)
    n_frozen_kernels = sum(x.ndim == 2 for x in jax.tree.leaves(frozen)) - 1
    assert n_taylor >= n_frozen_kernels

    # (iii)
    out = with_hook(*args())
    assert not {tuple(x.shape) for x in jax.tree.leaves(out)} & shapes
    loss_fn = make_loss_fn(graphdef)
    grads = jax.jit(jax.grad(lambda t: loss_fn(t, frozen, masks, batch[0])[0]))(trainable)
    want = lora_guided_importance(UNIQUE, nnx.to_pure_dict(trainable), nnx.to_pure_dict(grads),
                                  nnx.to_pure_dict(frozen), "q_head", 2.0)
    new_state = out[2]
    assert int(new_state.updates) == 1
    for got, w in zip((*new_state.attn, *new_state.mlp), (*want[0], *want[1])):
        np.testing.assert_allclose(np.asarray(got), 0.1 * np.asarray(w), rtol=1e-4, atol=1e-7)
