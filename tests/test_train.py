"""The jitted LoRA train step on partitioned pytrees: optimizer-state size, frozen base,
loss decrease, gradient accumulation (issue 4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune.config import ModelConfig
from jaxprune.model import LlamaForCausalLM
from jaxprune.partition import add_lora, partition, tree_size
from jaxprune.train import OptimConfig, make_optimizer, make_train_step

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def tiny_lora_model(rank=4, alpha=8.0, seed=0):
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(seed))
    add_lora(model, rank=rank, alpha=alpha, seed=seed)
    return model


def tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, shape), jnp.int32)


def host_copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def device_copy(tree):
    return jax.tree.map(jnp.copy, tree)


@pytest.fixture(scope="module")
def tiny():
    """One tiny LoRA model, its partition, and one jitted step (compiled once per batch shape)."""
    model = tiny_lora_model()
    graphdef, frozen, trainable, masks = partition(model)
    optimizer = make_optimizer(OptimConfig(lr=2e-2, warmup_steps=1, total_steps=40))
    step = make_train_step(graphdef, optimizer)  # donates trainable / opt_state / hook_state
    return dict(graphdef=graphdef, frozen=frozen, trainable=trainable, masks=masks, optimizer=optimizer,
                step=step)


def run_steps(tiny, batches):
    """Steps over ``batches`` from fresh copies of the initial state -> (losses, trainable)."""
    trainable = device_copy(tiny["trainable"])
    opt_state, hook_state = tiny["optimizer"].init(trainable), ()
    losses = []
    for i, batch in enumerate(batches):
        trainable, opt_state, hook_state, m = tiny["step"](trainable, opt_state, hook_state, tiny["frozen"],
                                                           tiny["masks"], batch, jnp.int32(i))
        losses.append(float(m["loss"]))
    return losses, trainable


def test_optimizer_state_is_trainable_sized(tiny):
    frozen, trainable = tiny["frozen"], tiny["trainable"]
    opt_state = tiny["optimizer"].init(trainable)

    n_trainable = tree_size(trainable)
    # every LoRA factor of the 2 layers x 7 projections: A [in, 4] + B [4, out]
    h, m, q, kv = 32, 48, 32, 16
    per_layer = sum(4 * (i + o) for i, o in [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)])
    assert n_trainable == 2 * per_layer == 3712
    assert tree_size(frozen) == TINY.num_params()  # the whole base, every float weight
    assert tree_size(frozen) > 5 * n_trainable

    leaves = jax.tree.leaves(opt_state)
    scalars = [x for x in leaves if x.ndim == 0]
    arrays = [x for x in leaves if x.ndim > 0]
    # AdamW: mu and nu (2 slots, each shaped like `trainable`); scalar step counts of adam and the schedule
    assert sum(x.size for x in arrays) == 2 * n_trainable
    assert len(scalars) == 2 and all(x.dtype == jnp.int32 for x in scalars)
    assert tree_size(opt_state) == 2 * n_trainable + 2
    trainable_shapes = sorted(x.shape for x in jax.tree.leaves(trainable))
    assert sorted(x.shape for x in arrays) == sorted(trainable_shapes * 2)
    # nothing of the frozen base's size is in there
    frozen_shapes = {x.shape for x in jax.tree.leaves(frozen)}
    assert not frozen_shapes & {x.shape for x in arrays}


def test_frozen_bit_identical_after_10_steps(tiny):
    before_frozen, before_trainable = host_copy(tiny["frozen"]), host_copy(tiny["trainable"])
    losses, trainable = run_steps(tiny, [tokens((1, 4, 16), seed=i) for i in range(10)])
    assert np.all(np.isfinite(losses))
    for a, b in zip(jax.tree.leaves(before_frozen), jax.tree.leaves(tiny["frozen"]), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, np.asarray(b))
    changed = [not np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(before_trainable), jax.tree.leaves(trainable), strict=True)]
    assert all(changed)  # every A and every B moved


def test_loss_decreases_on_repeated_batch(tiny):
    batch = tokens((1, 4, 16), seed=1)
    losses, _ = run_steps(tiny, [batch] * 40)
    assert np.all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(TINY.vocab_size), abs=0.1)  # random init: ~uniform
    assert losses[1] == losses[0]  # step 0 has lr 0 (warmup from 0)
    assert losses[-1] < losses[0] - 0.4, losses
    assert losses[-1] < min(losses[:30]), losses


def test_grad_accum_matches_full_batch(tiny):
    """grad_accum=2 with micro-batch b == grad_accum=1 with batch 2b: loss, gradients and params (1e-6).

    The optimizer is plain SGD: Adam divides by sqrt(v), which blows the ~1e-12 rounding of
    near-zero gradient entries up past 1e-6 in the params, a property of Adam, not of accumulation.
    The averaged gradients themselves (what any optimizer sees) are compared through a GradHook.
    """
    b, S = 2, 16
    full = [tokens((2 * b, S), seed=10 + i) for i in range(3)]

    def keep_grads(hook_state, trainable, grads, frozen, masks, step):
        return grads

    def run(optimizer, accum):
        step = make_train_step(tiny["graphdef"], optimizer, grad_hook=keep_grads)
        trainable = random_factors(tiny["trainable"])
        opt_state, grads = optimizer.init(trainable), jax.tree.map(jnp.zeros_like, trainable)
        losses, all_grads = [], []
        for i, x in enumerate(full):
            trainable, opt_state, grads, m = step(trainable, opt_state, grads, tiny["frozen"], tiny["masks"],
                                                  x.reshape(accum, 2 * b // accum, S), jnp.int32(i))
            losses.append(float(m["loss"]))
            all_grads.append(host_copy(grads))
        return losses, all_grads, trainable

    def random_factors(trainable):  # B != 0 so that A gets a gradient from the first step
        leaves, treedef = jax.tree.flatten(trainable)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype)
                                            for k, x in zip(keys, leaves)])

    optimizer = optax.sgd(0.5)
    loss1, g1, t1 = run(optimizer, 1)
    loss2, g2, t2 = run(optimizer, 2)
    np.testing.assert_allclose(loss2, loss1, rtol=0, atol=1e-6)
    assert loss1[2] != loss1[0]  # the params moved
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(c, a, rtol=0, atol=1e-6)
    assert all(np.abs(g).max() > 1e-4 for g in jax.tree.leaves(g1[-1]))  # every factor has a real gradient
    for a, c in zip(jax.tree.leaves(t1), jax.tree.leaves(t2), strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=0, atol=1e-6)
