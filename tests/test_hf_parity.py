"""Logit parity with transformers' torch LlamaForCausalLM on tiny random configs (fp32, bf16)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jax_logits, make_hf_llama, torch_logits
from jaxprune.hf import load_hf_dir
from jaxprune.weights import model_arrays, model_from_arrays

FP32_TOL = 1e-4
# bf16 weights + bf16 activations vs the fp32 reference, on a model whose attention is sharp (q/k
# weights x6) so that position matters. Measured (seed 2): our bf16 forward max |diff| 0.67% of the
# largest |logit|, mean 0.13%; transformers' own bf16 forward 0.63% / 0.14%; the fp32 forward
# *without RoPE* 11% / 1.3%. Bounds: 3x the bf16 noise, well below what a missing RoPE changes.
BF16_MAX_REL, BF16_MEAN_REL = 2e-2, 4e-3
QK_GAIN = 6.0

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
    import copy

    import torch
    import transformers.models.llama.modeling_llama as modeling_llama

    hf_dir, torch_model = make_hf_llama(tmp_path, seed=2, attention_bias=True)
    with torch.no_grad():  # sharp attention: RoPE (where each token looks) then changes the logits a lot
        for layer in torch_model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(QK_GAIN)
                proj.bias.mul_(QK_GAIN)
    torch_model.save_pretrained(hf_dir, safe_serialization=True)
    model, cfg = load_hf_dir(hf_dir, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    tokens = _tokens(cfg.vocab_size, 24, seed=3)
    ref = torch_logits(torch_model, tokens)
    scale = np.abs(ref).max()

    def rel(logits):
        err = np.abs(logits - ref)
        return err.max() / scale, err.mean() / scale

    ours = rel(jax_logits(model, tokens))
    assert ours[0] <= BF16_MAX_REL and ours[1] <= BF16_MEAN_REL, ours
    # no worse than transformers' own bf16 forward (the same rounding budget) by more than 1.5x
    torch_bf16 = rel(torch_logits(copy.deepcopy(torch_model).to(torch.bfloat16), tokens))
    assert ours[1] <= 1.5 * torch_bf16[1], (ours, torch_bf16)
    # and bf16 really is lower precision than fp32 (the dtype took effect)
    assert ours[0] * scale > FP32_TOL
    # the bounds are tight enough to catch a forward without RoPE (transformers' fp32 with RoPE switched off)
    orig = modeling_llama.apply_rotary_pos_emb
    modeling_llama.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        no_rope = rel(torch_logits(torch_model, tokens))
    finally:
        modeling_llama.apply_rotary_pos_emb = orig
    assert no_rope[0] > 2 * BF16_MAX_REL and no_rope[1] > 2 * BF16_MEAN_REL, no_rope
