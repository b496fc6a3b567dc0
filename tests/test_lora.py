"""LoRA factors on Linear: B = 0 leaves the model unchanged, a full-rank step matches a hand
computation, merging folds s·A@B into W exactly (issue 4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune.config import ModelConfig
from jaxprune.layers import Linear
from jaxprune.model import LlamaForCausalLM
from jaxprune.partition import add_lora, combine, partition, tree_size
from jaxprune.weights import merge_lora
from jaxprune.weights import linears, lora_spec

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=64)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)


@pytest.fixture(scope="module")
def tiny_base():
    """One random tiny model per module (eager construction is slow on CPU); tests take nnx.clone copies."""
    return LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))


def logits(model, tokens=TOKENS) -> np.ndarray:
    """The model's logits through one jit (much faster to compile than op-by-op eager dispatch)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))


def test_add_lora_leaves_logits_unchanged(tiny_base):
    model = nnx.clone(tiny_base)
    before = logits(model)
    paths = add_lora(model, rank=4, alpha=8.0, seed=0)
    after = logits(model)
    assert np.array_equal(before, after)  # exact: B = 0

    assert len(paths) == 2 * 7 and "lm_head" not in paths
    for _, lin in linears(model):
        if lin.has_lora:
            assert not np.any(np.asarray(lin.lora_b[...]))
            assert np.all(np.abs(np.asarray(lin.lora_a[...])) <= 1 / np.sqrt(lin.in_features))
            assert np.any(np.asarray(lin.lora_a[...])) and lin.lora_scale == 2.0
    _, frozen, trainable, _ = partition(model)
    assert tree_size(trainable) == sum(4 * (l.in_features + l.out_features) for _, l in linears(model)
                                       if l.has_lora)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen))


def test_full_rank_lora_sgd_step_matches_hand_computation():
    """r = min(in, out), alpha = r (s = 1), one SGD step on L = ½‖X(W + AB) − T‖², checked in float64 numpy."""
    rng = np.random.default_rng(1)
    n_in, n_out, n = 5, 3, 7
    rank, lr = min(n_in, n_out), 0.05
    W = rng.normal(size=(n_in, n_out)).astype(np.float32)
    X = rng.normal(size=(n, n_in)).astype(np.float32)
    T = rng.normal(size=(n, n_out)).astype(np.float32)
    B0 = rng.normal(size=(rank, n_out)).astype(np.float32)  # B != 0 so that A gets a gradient too

    lin = Linear(n_in, n_out, kernel=jnp.asarray(W))
    lin.add_lora(rank, float(rank), nnx.Rngs(3))
    assert lin.lora_scale == 1.0
    lin.lora_b[...] = jnp.asarray(B0)
    A0 = np.asarray(lin.lora_a[...])

    graphdef, frozen, trainable, masks = partition(lin)
    optimizer = optax.sgd(lr)

    def loss_fn(trainable):
        y = combine(graphdef, frozen, trainable, masks)(jnp.asarray(X))
        return 0.5 * jnp.sum((y - T) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, _ = optimizer.update(grads, optimizer.init(trainable), trainable)
    new = combine(graphdef, frozen, optax.apply_updates(trainable, updates), masks)

    # by hand: Y = X(W + AB), G = ∂L/∂Y = Y − T, ∂L/∂A = Xᵀ G Bᵀ, ∂L/∂B = (XA)ᵀ G
    Xd, Wd, Ad, Bd, Td = (a.astype(np.float64) for a in (X, W, A0, B0, T))
    Y = Xd @ (Wd + Ad @ Bd)
    G = Y - Td
    dA, dB = Xd.T @ G @ Bd.T, (Xd @ Ad).T @ G
    A1, B1 = Ad - lr * dA, Bd - lr * dB
    np.testing.assert_allclose(float(loss), 0.5 * np.sum(G ** 2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.lora_a[...]), A1, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new.lora_b[...]), B1, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new.merged_kernel()), Wd + A1 @ B1, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new(jnp.asarray(X))), Xd @ (Wd + A1 @ B1), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(new.kernel[...]), W)  # the base did not move


def test_merge_lora_matches_lora_model(tiny_base):
    model = nnx.clone(tiny_base)
    add_lora(model, rank=4, alpha=8.0, seed=0)
    keys = iter(jax.random.split(jax.random.key(5), 100))
    for _, lin in linears(model):
        if lin.has_lora:
            lin.lora_b[...] = 0.05 * jax.random.normal(next(keys), lin.lora_b[...].shape)
    lora_logits = logits(model)
    assert np.abs(lora_logits - logits(tiny_base)).max() > 1e-3  # LoRA does something

    merged = merge_lora(model)
    assert lora_spec(merged) == {} and not any(l.has_lora for _, l in linears(merged))
    np.testing.assert_allclose(logits(merged), lora_logits, rtol=0, atol=1e-5)
    q = model.layers[0].self_attn.q_proj
    np.testing.assert_allclose(np.asarray(merged.layers[0].self_attn.q_proj.kernel[...]),
                               np.asarray(q.kernel[...]) + 2.0 * np.asarray(q.lora_a[...]) @ np.asarray(q.lora_b[...]),
                               rtol=0, atol=1e-6)
