"""Issue 34 item 3: ``export --format vllm`` read back by a reader ported from vLLM's own source
(``vllm_deci_reference``), not by jaxprune's loader.

* the config parses the way vLLM parses it (``AutoConfig`` + ``--trust-remote-code`` through ``auto_map``),
  each layer's KV heads / MLP width come from vLLM's formulas, and every stored tensor has the shape vLLM
  allocates for it (stacked qkv / gate_up shards included), none missing, none extra;
* vLLM's graph in float64 numpy gives our logits on the same tokens;
* a planted ffn_mult bug (a multiplier vLLM rounds to another width) and a config without ``auto_map`` fail.
"""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest

from jaxprune import deci, hf
from jaxprune.cli import main
from jaxprune.config import tiny_config
from jaxprune.errors import UserError

import vllm_deci_reference as ref
from conftest import jax_logits, random_llama

TOKENS = np.random.default_rng(3).integers(0, 160, (2, 11))
# (heads, KV heads, MLP) per layer: layer 1's attention pruned to one head, layer 2's MLP to 40 of 1024
WIDTHS = ([4, 1, 4, 2], [2, 1, 1, 2], [1024, 700, 40, 512])
RTOL = ATOL = 1e-4


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


# SmolLM2-135M's shapes (hidden 576, 9 heads over 3 KV heads of 64), tied, llama3 RoPE: hidden 576 makes
# ffn_mult a repeating decimal (0.666…, 3.333…) that NVIDIA's BlockConfig rounds to 6 places before vLLM's int()
SMOL_WIDTHS = ([9, 3, 6], [3, 1, 2], [1536, 200, 1280])


@functools.lru_cache(maxsize=None)
def _model(*, smol=False):
    if smol:
        cfg = tiny_config(vocab_size=160, hidden_size=576, num_layers=3, num_heads=9, num_kv_heads=3, head_dim=64,
                          intermediate_size=1536, tie_word_embeddings=True, rope_theta=100000.0,
                          rope_scaling=LLAMA3, max_position_embeddings=64)
        return random_llama(cfg.with_layer_widths(*SMOL_WIDTHS), seed=8, std=0.05)
    cfg = tiny_config(vocab_size=160, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=1024, attention_bias=True, rope_theta=5000.0, max_position_embeddings=64)
    return random_llama(cfg.with_layer_widths(*WIDTHS), seed=7)


@functools.lru_cache(maxsize=None)
def _our_logits(**kw):
    return jax_logits(_model(**kw), TOKENS).astype(np.float64)


def _compare(out, **kw):
    spec, weights = ref.read_model(out)
    got = ref.forward(spec, weights, TOKENS)
    want = _our_logits(**kw)
    err = np.abs(got - want).max()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    return spec, err


@pytest.mark.parametrize("smol", [False, True], ids=["untied-bias", "smollm2-shaped-tied-llama3"])
def test_vllm_reads_our_export(tmp_path, smol):
    out = hf.export_vllm(_model(smol=smol), tmp_path / "vllm")
    assert (out / deci.CONFIG_FILE).exists()
    spec, err = _compare(out, smol=smol)
    # vLLM's per-layer widths: every layer keeps the widest layer's query heads (zero-padded ones where
    # pruned), KV heads as pruned (or the next divisor), MLP widths rounded up to 256 by vLLM's own formula
    want = [(9, 3, 1536), (9, 1, 256), (9, 3, 1280)] if smol else [(4, 2, 1024), (4, 1, 768), (4, 1, 256),
                                                                  (4, 2, 512)]
    assert [(L.num_heads, L.num_kv_heads, L.intermediate_size) for L in spec.layers] == want
    assert not any(L.attn_no_op or L.ffn_no_op for L in spec.layers)
    assert (spec.tie_word_embeddings, spec.qkv_bias, spec.o_bias) == ((True, False, False) if smol else
                                                                      (False, True, True))
    assert spec.rope_parameters["rope_type"] == ("llama3" if smol else "default")
    assert err < 1e-4, err  # measured max abs 2.5e-6 (tiny, logits to 2.7) / 7.1e-6 (smol, logits to 4.9)


def test_cli_export_read_by_vllm_reader(tmp_path):
    from jaxprune.checkpoint import save_model

    ckpt = save_model(_model(), tmp_path / "ckpt")
    assert main(["export", str(ckpt), str(tmp_path / "v"), "--format", "vllm"]) == 0
    _compare(tmp_path / "v")


def test_planted_ffn_mult_bug_fails(tmp_path, monkeypatch):
    """ffn_mult = width / hidden (the 2/3 forgotten): vLLM rounds layer 0's 1024 to 768 and layer 1's 768
    to 512, so the stored gate/up/down no longer fit what vLLM allocates."""
    model = _model()
    monkeypatch.setattr(deci, "intermediate_size_to_ffn_mult", lambda width, hidden: width / hidden)
    out = hf.export_vllm(model, tmp_path / "bad")
    with pytest.raises(ref.VllmWouldFail, match=r"mlp\.(gate|up|down)_proj.*vLLM"):
        ref.read_model(out)


def test_config_without_auto_map_is_refused(tmp_path):
    """What the export wrote before this check existed: model_type nemotron-nas with no auto_map, which
    neither transformers nor vLLM's config registry can parse."""
    out = hf.export_vllm(_model(), tmp_path / "v")
    d = json.loads((out / "config.json").read_text())
    d.pop("auto_map")
    (out / "config.json").write_text(json.dumps(d))
    (out / deci.CONFIG_FILE).unlink()
    with pytest.raises(ref.VllmWouldFail, match="auto_map"):
        ref.load_config(out)


def test_reader_refuses_what_vllm_refuses(tmp_path):
    """The port's own checks: a stray tensor, a missing one, a group size that gives other KV heads."""
    out = hf.export_vllm(_model(), tmp_path / "v")
    spec, _ = ref.read_model(out)
    tensors = ref.read_tensors(out)
    extra = dict(tensors, **{"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(ref.VllmWouldFail, match="no module or parameter"):
        ref.load_weights(spec, extra)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.2.self_attn.v_proj.weight"}
    with pytest.raises(ref.VllmWouldFail, match=r"qkv_proj.weight: shards"):
        ref.load_weights(spec, missing)
    bad = shutil.copytree(out, tmp_path / "bad")
    d = json.loads((bad / "config.json").read_text())
    d["block_configs"][1]["attention"]["n_heads_in_group"] = 3  # 4 // 3 = 1 KV head: vLLM reads it as 1
    (bad / "config.json").write_text(json.dumps(d))
    assert ref.read_model(bad)[0].layers[1].num_kv_heads == 1
    d["block_configs"][1]["attention"]["n_heads_in_group"] = 2  # 2 KV heads: k/v stored for 1
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(ref.VllmWouldFail, match=r"layers\.1\.self_attn\.[kv]_proj.*qkv_proj"):
        ref.read_model(bad)


def test_no_op_blocks_in_reference(tmp_path):
    """The port's no-op semantics (vLLM: no weights, the residual stream passes through): layer 2's MLP made
    a no-op by zeroing its down_proj gives the same logits as the block marked ``no_op`` with its tensors
    removed."""
    model = _model()
    out = hf.export_vllm(model, tmp_path / "v")
    spec, W = ref.read_model(out)
    W["model.layers.2.mlp.down_proj.weight"][:] = 0.0
    want = ref.forward(spec, W, TOKENS)
    nop = shutil.copytree(out, tmp_path / "nop")
    d = json.loads((nop / "config.json").read_text())
    d["block_configs"][2]["ffn"] = {"no_op": True, "replace_with_linear": False, "sparsify": None}
    (nop / "config.json").write_text(json.dumps(d))
    _, spec2 = ref.load_config(nop)
    assert spec2.layers[2].ffn_no_op and spec2.layers[2].intermediate_size == 0
    tensors = {k: v for k, v in ref.read_tensors(out).items()
               if not k.startswith(("model.layers.2.mlp.", "model.layers.2.post_attention_layernorm"))}
    np.testing.assert_allclose(ref.forward(spec2, ref.load_weights(spec2, tensors), TOKENS), want, rtol=1e-12,
                               atol=1e-12)


def test_removed_blocks_are_refused_by_our_export(tmp_path):
    """A layer with no attention heads or no MLP has a DeciLM form (``no_op``) but our export refuses it
    (one clear error rather than a checkpoint vLLM reads differently)."""
    cfg = tiny_config(vocab_size=160, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=256)
    model = random_llama(cfg.with_layer_widths([4, 4], [2, 2], [256, 0]), seed=1)
    with pytest.raises(UserError, match="no DeciLM form"):
        hf.export_vllm(model, tmp_path / "v")
