"""SparseAdapter, Bone and RandLoRA on device meshes and with --remat (issue 35; DoRA's mesh check is in
tests/test_adapters.py): every adapter Variable carries logical axes from its creation (``layers.with_axes``), so
``sharding.Placement`` splits it with the layer's weight (checked on one array per adapter and mesh), and the loss
and gradients of the trainable pytree on an FSDP mesh (data=2,fsdp=4), a tensor mesh (data=4,tensor=2) and the FSDP
mesh with remat (each decoder layer recomputed in the backward pass: what ``--remat`` sets) equal the one-device
ones without remat (1e-5 relative per array). The 8 host CPU devices come from conftest's XLA_FLAGS.

Fast on purpose: a one-layer model, each loss-and-gradient compiled once per structure and sharding at XLA's backend
optimisation level 0 (``adapter_reference.compiled_once``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adapter_reference import compiled_once
from conftest import random_llama, rel_err
from jaxprune.adapters import adapter_of, attach_adapter
from jaxprune.config import tiny_config
from jaxprune.meshes import ShardingRules, make_mesh
from jaxprune.partition import add_lora, partition
from jaxprune.sharding import Placement
from jaxprune.train import make_loss_fn
from jaxprune.weights import linears

TOL = 1e-5
RANK, ALPHA = 4, 8.0
TINY = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
                   num_layers=1)
TOKENS = np.random.default_rng(1).integers(0, 64, (8, 10))
MESHES = {"fsdp": "data=2,fsdp=4", "tensor": "data=4,tensor=2"}
#: per adapter and mesh: (linear, leaf, dimension, the mesh axis it must be split on): the check has teeth
SPLIT = {
    ("sparse", "fsdp"): ("self_attn.q_proj", "sparse_mask_a", 0, "fsdp"),
    ("sparse", "tensor"): ("mlp.up_proj", "sparse_mask_b", 1, "tensor"),
    ("bone", "fsdp"): ("mlp.up_proj", "bone_block", 1, "fsdp"),
    ("bone", "tensor"): ("self_attn.q_proj", "bone_block", 1, "tensor"),
    ("randlora", "fsdp"): ("self_attn.q_proj", "randlora_gamma", 1, "fsdp"),
    ("randlora", "tensor"): ("self_attn.k_proj", "randlora_gamma", 1, "tensor"),
}


def adapted(name: str):
    """The tiny model with adapter ``name`` on every decoder linear, its trainable arrays at trained-looking values
    (B ≠ 0, D ≠ 0, λ ≠ 0, γ ≠ its start) so that every term of the formula acts."""
    model = random_llama(TINY, 0)
    add_lora(model, rank=RANK, alpha=ALPHA, seed=0)
    attach_adapter(model, name, seed=0)
    rng = np.random.default_rng(2)
    for _, lin in linears(model):
        if adapter_of(lin) == name:
            for path, var in nnx.to_flat_state(nnx.state(lin, nnx.LoRAParam)):
                x = np.asarray(var.get_value())
                x = x * rng.uniform(0.5, 1.5, x.shape) if path[-1] == "randlora_gamma" else rng.normal(0, 0.1, x.shape)
                var.set_value(jnp.asarray(x, jnp.float32))
    return model


@compiled_once
def _loss_and_grads(graphdef, trainable, frozen, masks, tokens):
    return jax.value_and_grad(lambda t: make_loss_fn(graphdef)(t, frozen, masks, tokens)[0])(trainable)


def leaf_of(trees, linear: str, leaf: str):
    """``leaf`` of ``linear`` (``block.name`` in layer 0) from the first of ``trees`` that holds it."""
    block, name = linear.split(".")
    return next(d[leaf] for d in (nnx.to_pure_dict(t)["layers"][0][block][name] for t in trees) if leaf in d)


@pytest.fixture(scope="module", params=["sparse", "bone", "randlora"])
def one_device(request):
    """(adapter name, its model, the loss and gradients on one device without remat)."""
    model = adapted(request.param)
    graphdef, frozen, trainable, masks = partition(model)
    return request.param, model, _loss_and_grads(graphdef, trainable, frozen, masks, jnp.asarray(TOKENS))


@pytest.mark.parametrize("mesh, remat", [("fsdp", False), ("tensor", False), ("fsdp", True)],
                         ids=["fsdp", "tensor", "fsdp-remat"])
def test_adapter_on_a_mesh_and_with_remat_equals_one_device(one_device, mesh, remat):
    if jax.device_count() < 8:
        pytest.skip("needs the 8 host devices conftest asks for")
    name, model, (want_loss, want_grads) = one_device
    model = nnx.clone(model)
    model.remat = remat
    graphdef, frozen, trainable, masks = partition(model)
    pl = Placement(make_mesh(MESHES[mesh]), ShardingRules(), TINY.head_dim)
    tr, fr, ma = pl.put(trainable), pl.put(frozen), pl.put(masks)
    linear, leaf, dim, axis = SPLIT[(name, mesh)]
    spec = leaf_of((tr, fr), linear, leaf).sharding.spec  # the adapter's array is split, not replicated
    assert len(spec) > dim and spec[dim] is not None and axis in np.atleast_1d(spec[dim]), (linear, leaf, spec)
    loss, grads = _loss_and_grads(graphdef, tr, fr, ma, pl.put_batch(TOKENS, 0))
    assert abs(float(loss) - float(want_loss)) < TOL * abs(float(want_loss))
    got, want = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert np.abs(np.asarray(w)).max() > 0  # every trained array gets a gradient
        assert rel_err(g, w) < TOL, rel_err(g, w)
