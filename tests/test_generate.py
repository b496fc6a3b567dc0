"""Greedy generation: the KV cache path equals full-forward decoding; SmolLM2 matches transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.config import tiny_config
from jaxprune.generate import generate
from jaxprune.model import LlamaForCausalLM
from jaxprune.weights import linears


def _sharp_model(cfg, seed=7, scale=5.0):
    """A random model with 5x the init scale: peaked logits, so greedy choices are not near-ties."""
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))
    model.embed_tokens[...] = model.embed_tokens[...] * scale
    for _, lin in linears(model):
        lin.kernel[...] = lin.kernel[...] * scale
    return model


def _full_forward_greedy(model, prompt, n_new):
    """Greedy decoding with no cache: one full forward over a fixed-length buffer per token.

    The model is causal, so the logits at position t depend on tokens <= t only and the zero
    padding after the current end changes nothing (one compile for every step).
    """
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    buf = np.zeros((1, len(prompt) + n_new), np.int32)
    buf[0, :len(prompt)] = prompt
    out, all_logits = [], []
    for i in range(n_new):
        cur = len(prompt) + i
        logits = np.asarray(fwd(state, jnp.asarray(buf)))[0, cur - 1]
        all_logits.append(logits)
        out.append(int(np.argmax(logits)))
        buf[0, cur] = out[-1]
    return np.asarray(out), np.stack(all_logits)


def _cached_logits(model, prompt, new_tokens):
    """The logits the cache path sees: prefill the prompt, then feed ``new_tokens`` one at a time."""
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda s, t, c, i: nnx.merge(graphdef, s)(t, caches=c, cache_index=i))
    caches = model.init_caches(1, len(prompt) + len(new_tokens))
    logits, caches = call(state, jnp.asarray(prompt)[None], caches, 0)
    rows = [np.asarray(logits[0, -1])]
    for i, t in enumerate(new_tokens[:-1]):
        logits, caches = call(state, jnp.asarray([[t]], jnp.int32), caches, jnp.int32(len(prompt) + i))
        rows.append(np.asarray(logits[0, -1]))
    return np.stack(rows)


@pytest.mark.parametrize("kw", [dict(num_kv_heads=1), dict(num_kv_heads=4, tie_word_embeddings=True,
                                                           attention_bias=True)], ids=["kv1", "mha_tied_bias"])
def test_kv_cache_decoding_equals_full_forward(kw):
    model = _sharp_model(tiny_config(**kw))
    prompt = np.array([3, 17, 42, 5, 99], np.int32)
    n_new = 12
    ref, ref_logits = _full_forward_greedy(model, prompt, n_new)
    ours = generate(model, prompt, max_new_tokens=n_new)
    np.testing.assert_array_equal(ours, ref)
    assert len(set(ref.tolist())) > 2  # not a degenerate constant sequence
    top2 = np.sort(ref_logits, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3  # argmax equality is not decided by rounding
    np.testing.assert_allclose(_cached_logits(model, prompt, ref), ref_logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_jax, smollm2_torch, smollm2_tokenizer):
    import torch

    n_new, must_match = 24, 20
    prompt = smollm2_tokenizer("Once upon a time, in a small village by the sea,")["input_ids"]
    with torch.no_grad():
        ref = smollm2_torch.generate(torch.as_tensor([prompt]), attention_mask=torch.ones(1, len(prompt)).long(),
                                     max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                     pad_token_id=smollm2_tokenizer.eos_token_id)[0, len(prompt):].numpy()
    ours = generate(smollm2_jax, np.asarray(prompt), max_new_tokens=n_new)
    assert len(ref) == n_new and len(ours) == n_new
    np.testing.assert_array_equal(ours[:must_match], ref[:must_match],
                                  err_msg=f"ours: {smollm2_tokenizer.decode(ours)!r}\n"
                                          f"ref:  {smollm2_tokenizer.decode(ref)!r}")
