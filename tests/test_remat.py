"""Rematerialised decoder layers (`--remat`, model._remat_layer): the same loss and gradients as the plain
model, with the activations of one layer instead of all of them in the compiled step's temporaries (the
custom-VJP remat holds on XLA:CPU, where jax.checkpoint's is merged back into the forward by CSE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.config import ModelConfig
from jaxprune.model import LlamaForCausalLM, causal_lm_loss
from jaxprune.partition import add_lora, partition
from jaxprune.quantize import quantize_base

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_layers=8, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=256)


def loss_and_grad(remat: bool, int8: bool):
    m = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    m.remat = remat
    if int8:
        quantize_base(m)
    add_lora(m, rank=4, alpha=8)
    graphdef, frozen, trainable, masks = partition(m)
    trainable = jax.tree.map(lambda a: a + 0.01, trainable)  # B = 0 at init: make every LoRA gradient non-zero

    def loss(tr, toks):
        return causal_lm_loss(nnx.merge(graphdef, tr, frozen, masks)(toks), toks)[0]
    return jax.jit(jax.value_and_grad(loss)), trainable


@pytest.mark.parametrize("int8", [False, True])
def test_remat_gives_the_same_loss_and_lora_gradients(int8):
    toks = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 32)))
    (l0, g0), (l1, g1) = (fn(tr, toks) for fn, tr in (loss_and_grad(False, int8), loss_and_grad(True, int8)))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 1e-4


def test_remat_temporaries_hold_one_layer_of_activations():
    """At 4 x 256 tokens the per-layer activations (attention probs 4·4·256²·4 B = 4 MiB, MLP 3 x 0.75 MiB ...)
    dwarf the weights, so eight layers' worth kept for the backward is several times one layer's."""
    toks = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    temps = {}
    for remat in (False, True):
        fn, tr = loss_and_grad(remat, False)
        temps[remat] = fn.lower(tr, toks).compile().memory_analysis().temp_size_in_bytes
    assert temps[True] < 0.4 * temps[False], temps
