"""Logit parity with transformers' torch LlamaForCausalLM on tiny random configs (fp32, bf16)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jax_logits, make_hf_llama, torch_logits
from jaxprune.hf import load_hf_dir
from jaxprune.weights import model_arrays, model_from_arrays

FP32_TOL = 1e-4
# bf16 weights + bf16 activations vs the fp32 reference: ~3 significant digits per op, a few
# ops deep. Bound: max |diff| <= 5% of the largest |logit|, mean |diff| <= 1% of it.
BF16_MAX_REL, BF16_MEAN_REL = 5e-2, 1e-2

CASES = {
    "kv1": dict(num_key_value_heads=1),
    "kv2": dict(num_key_value_heads=2),
    "kv_eq_heads": dict(num_key_value_heads=4),
    "tied": dict(tie_word_embeddings=True),
    "untied_bias": dict(attention_bias=True, mlp_bias=True),
    "head_dim_24": dict(head_dim=24),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "rope_llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                         "rope_theta": 10000.0}),
    # seq_len (48) > max_position_embeddings (32): the NTK base is recomputed for the long sequence
    "rope_dynamic": dict(max_position_embeddings=32,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
}
SEQ = {"rope_dynamic": 48}


def _tokens(vocab, seq, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, seq), dtype=np.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_logits_match_transformers(tmp_path, name):
    hf_dir, torch_model = make_hf_llama(tmp_path, seed=1, **CASES[name])
    model, cfg = load_hf_dir(hf_dir)
    assert model.dtype == jnp.float32
    tokens = _tokens(cfg.vocab_size, SEQ.get(name, 24))
    ref = torch_logits(torch_model, tokens)
    ours = jax_logits(model, tokens)
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max()
    assert diff <= FP32_TOL, f"{name}: max |logit diff| {diff:.3g} > {FP32_TOL}"

    if name.startswith("rope_"):
        assert cfg.rope_type == name.removeprefix("rope_")
        # the same weights with default RoPE must give different logits, else the case proves nothing
        plain = model_from_arrays(cfg.replace(rope_scaling=None), model_arrays(model))
        plain_diff = np.abs(jax_logits(plain, tokens) - ref).max()
        assert plain_diff > 1e-3, f"{name}: scaling does not change the logits ({plain_diff:.3g})"


def test_bf16_logits_close_to_fp32(tmp_path):
    hf_dir, torch_model = make_hf_llama(tmp_path, seed=2, attention_bias=True)
    model, cfg = load_hf_dir(hf_dir, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    tokens = _tokens(cfg.vocab_size, 24, seed=3)
    ref = torch_logits(torch_model, tokens)
    ours = jax_logits(model, tokens)
    scale = np.abs(ref).max()
    err = np.abs(ours - ref)
    assert err.max() <= BF16_MAX_REL * scale, (err.max(), scale)
    assert err.mean() <= BF16_MEAN_REL * scale, (err.mean(), scale)
    # and bf16 really is lower precision than fp32 (the dtype took effect)
    assert err.max() > FP32_TOL
