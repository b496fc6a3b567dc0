"""ModelConfig <-> HF config dicts, per-layer widths, padded(), num_params against real models."""

from __future__ import annotations

import pytest

from jaxprune.config import ModelConfig, tiny_config
from jaxprune.errors import UserError
from jaxprune.model import count_params
from jaxprune.weights import abstract_model

BASE_HF = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
               hidden_act="silu", tie_word_embeddings=False)


def hf(**kw):
    d = dict(BASE_HF)
    d.update(kw)
    return d


# ---- rope spellings ----------------------------------------------------------------------------
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("v4, v5, theta, scaling", [
    (dict(rope_theta=5e5), dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}), 5e5, None),
    (dict(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}),
     dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}),
     5e5, {"rope_type": "linear", "factor": 2.0}),
    (dict(rope_theta=1e4, rope_scaling={"rope_type": "llama3", **LLAMA3}),
     dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, **LLAMA3}),
     1e4, {"rope_type": "llama3", **LLAMA3}),
    (dict(rope_theta=2e4, rope_scaling={"type": "dynamic", "factor": 3.0}),
     dict(rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 2e4}),
     2e4, {"rope_type": "dynamic", "factor": 3.0}),
], ids=["default", "linear", "llama3", "dynamic"])
def test_both_rope_spellings_give_the_same_config(v4, v5, theta, scaling):
    a, b = ModelConfig.from_hf_dict(hf(**v4)), ModelConfig.from_hf_dict(hf(**v5))
    assert a == b
    assert a.rope_theta == theta
    assert a.rope_scaling == scaling
    assert a.rope_type == (scaling or {"rope_type": "default"})["rope_type"]
    # our HF dict is the transformers 5 spelling and reads back to the same config
    d = a.to_hf_dict()
    assert d["rope_parameters"] == {"rope_theta": theta, "rope_type": a.rope_type, **(scaling or {})}
    assert ModelConfig.from_hf_dict(d) == a


def test_hf_dict_fields_and_transformers_agree():
    from transformers import LlamaConfig

    src = hf(num_key_value_heads=1, head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
             bos_token_id=5, eos_token_id=[6, 7], pad_token_id=0, rope_theta=5e5,
             rope_scaling={"rope_type": "linear", "factor": 2.0}, some_future_key="carried")
    cfg = ModelConfig.from_hf_dict(src)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (96, 64, 80, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 1, 24)
    assert cfg.attention_bias and cfg.mlp_bias and cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (5, [6, 7], 0)
    assert (cfg.max_position_embeddings, cfg.rms_norm_eps) == (128, 1e-5)
    assert cfg.extra_hf == {"some_future_key": "carried"}
    d = cfg.to_hf_dict()
    assert d["some_future_key"] == "carried"
    # transformers reads our dict as the same model, and its own dict reads back as ours
    t = LlamaConfig(**d)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size) == (4, 1, 24, 64)
    assert t.rope_parameters["rope_type"] == "linear" and t.rope_parameters["factor"] == 2.0
    assert t.rope_parameters["rope_theta"] == 5e5
    assert t.tie_word_embeddings and t.attention_bias and t.mlp_bias
    assert ModelConfig.from_hf_dict(t.to_dict()) == cfg


def test_defaults_from_a_minimal_hf_dict():
    cfg = ModelConfig.from_hf_dict({k: BASE_HF[k] for k in ("model_type", "vocab_size", "hidden_size",
                                                            "intermediate_size", "num_hidden_layers",
                                                            "num_attention_heads")})
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None and cfg.rope_type == "default"
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.mlp_bias


@pytest.mark.parametrize("d, needle", [
    (hf(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type='yarn'"),
    (hf(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "longrope needs short_factor"),
    (hf(rope_scaling={"type": "su", "factor": 2.0}), "rope_type='su'"),
    (hf(model_type="gpt2"), "model_type='gpt2'"),
    (hf(hidden_act="gelu"), "hidden_act='gelu'"),
    (hf(pretraining_tp=2), "pretraining_tp"),
    ({k: v for k, v in BASE_HF.items() if k != "hidden_size"}, "'hidden_size'"),
    (hf(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
], ids=["yarn", "longrope", "su", "gpt2", "gelu", "tp", "missing", "gqa"])
def test_unsupported_hf_config_is_a_user_error_naming_the_field(d, needle):
    with pytest.raises(UserError) as e:
        ModelConfig.from_hf_dict(d)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


# ---- per-layer widths, padded ------------------------------------------------------------------
def test_per_layer_widths_and_padded():
    cfg = tiny_config(num_layers=3).with_layer_widths(heads=(4, 3, 2), kv_heads=(2, 1, 2), mlp=(96, 40, 0))
    assert not cfg.is_uniform
    assert [cfg.heads(i) for i in range(3)] == [4, 3, 2]
    assert [cfg.kv_heads(i) for i in range(3)] == [2, 1, 2]
    assert [cfg.mlp_width(i) for i in range(3)] == [96, 40, 0]
    with pytest.raises(ValueError):
        cfg.to_hf_dict()
    wide = cfg.padded()
    # widest KV count (2) x widest group (3 query heads per KV head in layer 1) = 6 query heads
    assert (wide.num_kv_heads, wide.num_heads, wide.intermediate_size) == (2, 6, 96)
    assert wide.is_uniform and wide.layer_num_heads is None
    assert ModelConfig.from_hf_dict(wide.to_hf_dict()).num_heads == 6
    # a padded model is never smaller than the pruned one
    assert wide.num_params() > cfg.num_params()
    # uniform widths collapse back to the global fields
    same = tiny_config(num_layers=2).with_layer_widths((4, 4), (2, 2), (50, 50))
    assert same.is_uniform and same.layer_intermediate_size is None and same.intermediate_size == 50
    # the dict round trip keeps per-layer widths
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kw, needle", [
    (dict(layer_num_heads=(4,)), "layer_num_heads has 1 entries"),
    (dict(layer_num_heads=(4, 3), layer_num_kv_heads=(2, 2)), "layer 1 has 3 query heads over 2 KV heads"),
    (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling.rope_type='yarn'"),
])
def test_bad_per_layer_config(kw, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**kw)


def test_from_dict_rejects_unknown_keys():
    d = tiny_config().to_dict()
    d["hidden_sise"] = 3
    with pytest.raises(UserError, match="hidden_sise"):
        ModelConfig.from_dict(d)


# ---- num_params --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie_word_embeddings=True),
    dict(attention_bias=True, mlp_bias=True),
    dict(tie_word_embeddings=True, attention_bias=True, num_key_value_heads=1, head_dim=24),
], ids=["untied", "tied", "biases", "tied_bias_kv1_hd24"])
def test_num_params_matches_transformers_and_jaxprune(kw):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_kw = hf(**kw)
    with torch.device("meta"):
        torch_model = LlamaForCausalLM(LlamaConfig(**hf_kw))
    torch_count = sum(p.numel() for p in torch_model.parameters())  # tied weights counted once
    cfg = ModelConfig.from_hf_dict(hf_kw)
    assert cfg.num_params() == torch_count
    assert count_params(abstract_model(cfg)) == torch_count


def test_num_params_per_layer_matches_model():
    cfg = tiny_config(num_layers=3, attention_bias=True, mlp_bias=True).with_layer_widths(
        heads=(4, 2, 0), kv_heads=(2, 1, 0), mlp=(96, 17, 5))
    assert cfg.num_params() == count_params(abstract_model(cfg))
