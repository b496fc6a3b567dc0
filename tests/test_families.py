"""Issue 16 (first families): Qwen2 (q/k/v bias, no o bias), Qwen3 (per-head q/k RMSNorm, explicit head_dim),
Mistral (sliding window), Phi-3 (fused qkv / gate_up, partial rotary, longrope) against transformers' own
classes: load, logits, parameter counts, pruning (both
attention units) and export back as the same model_type, the sliding window in the KV-cache generate path, and
a CLI prune run per family with a different method each."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from jaxprune import load
from jaxprune.cli import main
from jaxprune.config import ModelConfig
from jaxprune.errors import UserError
from jaxprune.hf import export_hf, load_hf_dir
from jaxprune.partition import combine, partition
from jaxprune.prune.masks import update_structured_masks
from jaxprune.prune.shrink import shrink

from conftest import jax_logits, rewrite_config, torch_logits

#: initializer_range 0.2 (HF's default 0.02 leaves q·k near 0, attention near uniform, and the logits to the
#: embeddings: position, window and rotary features would barely show)
KW = dict(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
          num_key_value_heads=3, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
          initializer_range=0.2)
FAMILIES = {"qwen2": {}, "qwen3": {"head_dim": 12}, "mistral": {"sliding_window": 4},
            "phi3": {"sliding_window": 5, "pad_token_id": 0, "partial_rotary_factor": 0.5}}
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 13))


def _classes(family):
    import transformers
    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi3"}[family]
    return getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")


def make_hf(tmp_path, family, seed=0, **overrides):
    """A tiny random transformers model of ``family`` (norms and biases randomised), saved; (dir, model)."""
    config_cls, model_cls = _classes(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**KW, **FAMILIES[family], **overrides})).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    out = tmp_path / f"{family}-{seed}"
    model.save_pretrained(out, safe_serialization=True)
    return out, model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    return request.param, *make_hf(tmp_path_factory.mktemp(request.param), request.param)


def test_load_matches_transformers(family_model):
    family, hf_dir, torch_model = family_model
    model, cfg = load_hf_dir(hf_dir)
    assert cfg.model_type == family
    assert cfg.num_params() == sum(p.numel() for p in torch_model.parameters())
    want = {"qwen2": (True, False, False, None), "qwen3": (False, False, True, None),
            "mistral": (False, False, False, 4), "phi3": (False, False, False, 5)}[family]
    assert (cfg.attention_bias, cfg.o_bias, cfg.qk_norm, cfg.sliding_window) == want
    np.testing.assert_allclose(jax_logits(model, TOKENS), torch_logits(torch_model, TOKENS), rtol=1e-4, atol=1e-4)


def _rewrite_tensors(src, dst, change):
    """A copy of the HF dir ``src`` at ``dst`` with ``change(name, array)`` applied to each tensor."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file({k: change(k, v) for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


#: per family, variants that each remove or change one of its features: (name, config changes, tensor change)
FEATURES = {
    "qwen2": [("no q/k/v bias", {}, lambda k, v: 0 * v if k.endswith("_proj.bias") else v)],
    "qwen3": [("q/k norm weights 1", {}, lambda k, v: np.ones_like(v) if k.endswith(("q_norm.weight", "k_norm.weight"))
               else v)],
    "mistral": [("no window", {"sliding_window": None}, None)],
    "phi3": [("no window", {"sliding_window": None}, None),
             ("full rotary", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 1.0}}, None)],
}


def test_each_family_feature_changes_the_logits(family_model, tmp_path):
    """The model without (or with another value of) each family feature: jaxprune's logits are still
    transformers', and they differ from the model's by more than 1e-2 on 13 tokens (window 4 / 5: the sequence
    is longer), so each feature is exercised by the tests that compare logits (Phi-3: half of each head's dims
    rotated against all of them)."""
    family, hf_dir, _ = family_model
    model, cfg = load_hf_dir(hf_dir)
    if family == "phi3":
        rope = json.loads((hf_dir / "config.json").read_text())["rope_parameters"]
        assert cfg.partial_rotary_factor == 0.5 and rope == {**FEATURES["phi3"][1][1]["rope_parameters"],
                                                              "partial_rotary_factor": 0.5}
    base = jax_logits(model, TOKENS)
    for feature, changes, tensors in FEATURES[family]:
        d = tmp_path / feature.replace(" ", "-").replace("/", "")
        other = rewrite_config(hf_dir, d, **changes) if changes else _rewrite_tensors(hf_dir, d, tensors)
        got = jax_logits(load_hf_dir(other)[0], TOKENS)
        want = torch_logits(_classes(family)[1].from_pretrained(other, dtype=torch.float32).eval(), TOKENS)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=feature)
        assert np.abs(got - base).max() > 1e-2, feature


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
def test_pruned_export_is_the_same_family(family_model, unit, tmp_path):
    """Masked == shrunk == the exported model in transformers' class of the same family (stock config, no padding)."""
    family, hf_dir, torch_model = family_model
    model, cfg = load_hf_dir(hf_dir)
    graphdef, frozen, trainable, masks = partition(model)
    rng = np.random.default_rng(1)
    n_units = cfg.num_kv_heads if unit == "kv_group" else cfg.num_heads
    scores = (tuple(rng.random(n_units) for _ in range(2)), tuple(rng.random(40) for _ in range(2)))
    masks = update_structured_masks(masks, scores, 0.5, cfg, unit, [0, 1])
    masked = combine(graphdef, frozen, trainable, masks)
    want = jax_logits(masked, TOKENS)
    small = shrink(masked)
    assert small.config.is_uniform and small.config.num_params() < cfg.num_params()
    np.testing.assert_allclose(jax_logits(small, TOKENS), want, rtol=1e-5, atol=1e-5)
    out = export_hf(small, tmp_path / "hf")
    d = json.loads((out / "config.json").read_text())
    assert d["model_type"] == family and d["architectures"] == [_classes(family)[1].__name__]
    back = _classes(family)[1].from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in back.parameters()) == small.config.num_params()
    np.testing.assert_allclose(torch_logits(back, TOKENS), want, rtol=1e-4, atol=1e-4)


def test_mistral_sliding_window_generate_matches_transformers(tmp_path):
    """Greedy decoding of 14 tokens past a 6-token prompt with window 3: the KV-cache path honours the window
    exactly as transformers' generate does (the window changes the output: checked against window=None)."""
    from jaxprune.generate import generate

    hf_dir, torch_model = make_hf(tmp_path, "mistral", seed=3, sliding_window=3)
    model, _ = load_hf_dir(hf_dir)
    prompt = [5, 17, 3, 88, 41, 9]
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, min_new_tokens=14)
    want = ref[0, len(prompt):].tolist()
    assert generate(model, prompt, max_new_tokens=14, temperature=0.0).tolist() == want
    unwindowed, _ = load_hf_dir(rewrite_config(hf_dir, tmp_path / "nowin", sliding_window=None))
    logits_win, logits_full = jax_logits(model, [prompt * 2]), jax_logits(unwindowed, [prompt * 2])
    assert np.abs(logits_win - logits_full).max() > 1e-3  # the window matters on this sequence


def test_phi3_longrope_partial_rotary(tmp_path):
    """Phi-3 with longrope over half of head_dim: short factors up to original_max_position_embeddings (8), long
    factors and the attention factor sqrt(1 + ln(16)/ln(8)) past it; the fused checkpoint's tensors split on load
    and fuse again on export (the same names and bytes)."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": list(1 + rng.random(2)), "long_factor": list(2 + 3 * rng.random(2))}
    hf_dir, torch_model = make_hf(tmp_path, "phi3", original_max_position_embeddings=8, rope_parameters=rope)
    model, cfg = load_hf_dir(hf_dir)
    assert cfg.rope_type == "longrope" and cfg.partial_rotary_factor == 0.5
    for length in (6, 13):  # 13 > 8: the long factors
        tokens = np.random.default_rng(length).integers(0, 96, (2, length))
        np.testing.assert_allclose(jax_logits(model, tokens), torch_logits(torch_model, tokens), rtol=1e-4,
                                   atol=1e-4)
    out = export_hf(model, tmp_path / "hf")
    want, got = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(got) == set(want) and "model.layers.0.self_attn.qkv_proj.weight" in got
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_unsupported_family_features_are_one_line_errors(tmp_path, capsys):
    hf_dir, _ = make_hf(tmp_path, "qwen2")
    bad = rewrite_config(hf_dir, tmp_path / "win", use_sliding_window=True, sliding_window=8)
    with pytest.raises(UserError, match="use_sliding_window"):
        load_hf_dir(bad)
    gemma = rewrite_config(hf_dir, tmp_path / "gemma", model_type="gemma2")
    capsys.readouterr()  # transformers' save progress bars
    assert main(["convert", str(gemma), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gemma2" in err[0] and "qwen3" in err[0] and "gemma3_text" in err[0]
    with pytest.raises(UserError, match="model_type"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, model_type="gemma2")


@pytest.mark.parametrize("family,method", [("qwen3", "loraprune"), ("qwen2", "llm-pruner"),
                                           ("mistral", "wanda"), ("phi3", "l2")])
def test_cli_prune_each_family(family, method, tmp_path, fixtures, small_text):
    """`jaxprune prune` + `export` on each family (a different method each): the export loads in the family's
    transformers class with jaxprune's logits."""
    hf_dir, source = make_hf(tmp_path, family, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures.hf_dir / name, hf_dir / name)
    run = tmp_path / "run"
    common = ["--text", str(small_text), "--seq-len", "32", "--batch-size", "2", "--no-progress", "--out", str(run)]
    if method == "wanda":
        args = ["--method", "wanda", "--sparsity", "0.5", "--calib-samples", "4", "--calib-len", "32"]
        common = ["--text", str(small_text), "--out", str(run)]
    elif method == "loraprune":  # uniform widths: the export below is a stock transformers model
        args = ["--method", "loraprune", "--ratio", "0.5", "--steps", "6", "--prune-every", "2", "--widths", "uniform"]
    else:
        args = ["--method", method, "--ratio", "0.5", "--steps", "2", "--calib-samples", "2", "--calib-len", "32",
                "--widths", "uniform"]
    assert main(["prune", str(hf_dir), *args, *common]) == 0
    model = load.load_model(run)
    assert model.config.model_type == family
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    back = _classes(family)[1].from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert sum(p.numel() for p in back.parameters()) == model.config.num_params()
    # the export is smaller than the input: structured pruning drops units (parameters and bytes); Wanda's zeros
    # keep the dense shape, half of each decoder linear zero
    params_in = sum(p.numel() for p in source.parameters())
    bytes_in, bytes_out = ((d / "model.safetensors").stat().st_size for d in (hf_dir, tmp_path / "hf"))
    if method == "wanda":
        w = back.model.layers[0].mlp.up_proj.weight.detach().numpy()
        assert model.config.num_params() == params_in and (w == 0).mean() == pytest.approx(0.5)
    else:
        assert model.config.num_params() < params_in and bytes_out < bytes_in
    np.testing.assert_allclose(torch_logits(back, TOKENS), jax_logits(model, TOKENS), rtol=1e-4, atol=1e-4)
