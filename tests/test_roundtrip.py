"""HF -> jaxprune checkpoint (CLI convert) -> HF (CLI export): bit-identical tensors, same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import jax_logits, make_hf_llama, run_cli, torch_logits
from jaxprune.hf import export_hf, load_hf_dir
from jaxprune.weights import model_arrays


def _safetensors(directory):
    """Every tensor of an HF dir (single file or sharded), name -> array."""
    index = directory / "model.safetensors.index.json"
    files = (sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.exists() else [directory / "model.safetensors"])
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


def _transformers_logits(directory, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return torch_logits(model, tokens), model


TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 16), dtype=np.int32)


@pytest.mark.parametrize("tied", [False, True], ids=["untied_bias", "tied"])
def test_cli_convert_export_roundtrip(tmp_path, tied):
    kw = dict(tie_word_embeddings=True) if tied else dict(attention_bias=True, mlp_bias=True,
                                                          num_key_value_heads=1)
    src, torch_model = make_hf_llama(tmp_path, seed=4, **kw)
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    for args in (("convert", src, ckpt), ("export", ckpt, out)):
        r = run_cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["out"] == str(args[2])

    original, exported = _safetensors(src), _safetensors(out)
    assert ("lm_head.weight" in exported) == (not tied)
    _assert_bit_identical(original, exported)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] == tied

    ref = torch_logits(torch_model, TOKENS)
    logits, reloaded = _transformers_logits(out, TOKENS)
    assert reloaded.config.tie_word_embeddings == tied
    np.testing.assert_array_equal(logits, ref)


def test_sharded_export(tmp_path):
    src, torch_model = make_hf_llama(tmp_path, seed=5, attention_bias=True)
    model, cfg = load_hf_dir(src)
    out = export_hf(model, tmp_path / "sharded", shard_bytes=40_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert not (out / "model.safetensors").exists()
    total = sum(a.nbytes for a in _safetensors(out).values())
    assert index["metadata"]["total_size"] == total
    _assert_bit_identical(_safetensors(src), _safetensors(out))

    back, back_cfg = load_hf_dir(out)
    assert back_cfg == cfg
    a, b = model_arrays(model), model_arrays(back)
    assert sorted(a, key=str) == sorted(b, key=str)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))

    ref = torch_logits(torch_model, TOKENS)
    logits, _ = _transformers_logits(out, TOKENS)
    np.testing.assert_array_equal(logits, ref)
    np.testing.assert_allclose(jax_logits(back, TOKENS), ref, atol=1e-4, rtol=0)
