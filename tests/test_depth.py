"""Depth pruning (issue 31): ShortGPT and ReplaceMe through `jaxprune prune` + `jaxprune export`, each number
checked against transformers / numpy on the same calibration tokens (drawn as the pipeline draws them:
``data.Blocks.calibration`` with the run's seed).

Model: a tiny random LLaMA of 6 layers (hidden 32, 4 query heads over 2 KV heads, MLP 48) with SmolLM2's
tokenizer; --ratio 0.34 removes round(0.34·6) = 2 layers.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from conftest import jax_logits, main_in_process, make_hf_llama

LAYERS, SEQ, SAMPLES = 6, 32, 6
COMMON = ("--seq-len", str(SEQ), "--batch-size", "2", "--calib-len", str(SEQ), "--calib-samples", str(SAMPLES),
          "--calib-batch", "4", "--no-progress", "--json")
TOKENS = np.random.default_rng(1).integers(0, 49152, (2, 12))


@pytest.fixture(scope="module")
def deep_hf(tmp_path_factory, fixtures):
    root = tmp_path_factory.mktemp("deep")
    out, model = make_hf_llama(root, 3, vocab_size=49152, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures.hf_dir / name, out / name)
    return out, model


def calibration(hf_dir, text, seed=0):
    """The pipeline's calibration tokens [SAMPLES, SEQ]."""
    from jaxprune import load
    from jaxprune.data import Blocks, token_stream

    blocks = Blocks.from_stream(token_stream(text, load.load_tokenizer(hf_dir)), SEQ, seed=seed)
    return blocks.calibration(SAMPLES, SEQ, seed=seed)


def hf_hidden_states(model, tokens):
    """transformers' ``output_hidden_states`` [L+1, n, S, hidden] float64 (the last after the final norm)."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True)
    return np.stack([s.double().numpy() for s in out.hidden_states])


def layer_outputs(model, tokens, mlp_layer):
    """(output of every decoder layer, before the final norm [L, n·S, hidden], MLP output of ``mlp_layer``
    [n·S, hidden]), float64, from forward hooks on transformers' model."""
    import torch

    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, k=k: seen.update({k: o[0] if isinstance(o, tuple) else o}))
             for k, layer in enumerate(model.model.layers)]
    hooks.append(model.model.layers[mlp_layer].mlp.register_forward_hook(lambda m, a, o: seen.update(mlp=o)))
    with torch.no_grad():
        model(torch.as_tensor(tokens, dtype=torch.long))
    for h in hooks:
        h.remove()
    flat = lambda a: a.double().numpy().reshape(-1, a.shape[-1])  # noqa: E731
    return np.stack([flat(seen[k]) for k in range(len(model.model.layers))]), flat(seen["mlp"])


def reference_fit(model, tokens, i, n, ridge=0.0):
    """T: M_i·T ≈ x_{i+n} + M_i − x_i (x_k: output of layer k), numpy's lstsq (ridge: the normal equations)."""
    x, mlp = layer_outputs(model, tokens, i)
    target = x[i + n] + mlp - x[i]
    if ridge == 0.0:
        return np.linalg.lstsq(mlp, target, rcond=None)[0]
    return np.linalg.solve(mlp.T @ mlp + ridge * np.eye(mlp.shape[1]), mlp.T @ target)


def without_layers(model, removed):
    """transformers' own model with decoder layers ``removed`` deleted (num_hidden_layers reduced)."""
    import torch

    small = copy.deepcopy(model)
    small.model.layers = torch.nn.ModuleList([l for i, l in enumerate(small.model.layers) if i not in removed])
    small.config.num_hidden_layers = len(small.model.layers)
    for k, layer in enumerate(small.model.layers):  # as built with fewer layers (the KV cache is per index)
        layer.self_attn.layer_idx = k
    return small


def run_prune(hf_dir, text, out, method, *extra):
    proc = main_in_process("prune", hf_dir, "--method", method, "--ratio", "0.34", "--text", text, "--out", out,
                           *COMMON, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "prune.json").read_text())


def export(run_dir, out):
    import torch
    from transformers import AutoModelForCausalLM

    proc = main_in_process("export", run_dir, out, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def test_shortgpt_block_influence_selection_and_export(deep_hf, small_text, tmp_path):
    from conftest import torch_logits

    hf_dir, model = deep_hf
    summary = run_prune(hf_dir, small_text, tmp_path / "run", "shortgpt", "--recover-steps", "0")
    h = hf_hidden_states(model, calibration(hf_dir, small_text))
    cos = (h[:-1] * h[1:]).sum(-1) / (np.linalg.norm(h[:-1], axis=-1) * np.linalg.norm(h[1:], axis=-1))
    bi = 1 - cos.reshape(LAYERS, -1).mean(axis=1)  # BI_i = 1 − mean_t cos(h_i, h_{i+1}), h_L after the norm
    np.testing.assert_allclose(summary["block_influence"], bi, rtol=0, atol=1e-6)
    assert summary["layers_removed"] == sorted(np.argsort(bi)[:2].tolist())
    assert (summary["layers_before"], summary["layers_after"]) == (LAYERS, LAYERS - 2)

    hf = export(tmp_path / "run", tmp_path / "hf")
    assert hf.config.num_hidden_layers == LAYERS - 2
    assert sum(p.numel() for p in hf.parameters()) == summary["params_after"]
    want = torch_logits(without_layers(model, summary["layers_removed"]), TOKENS)
    np.testing.assert_allclose(torch_logits(hf, TOKENS), want, rtol=1e-4, atol=1e-4)


def test_replaceme_distance_transform_and_export(deep_hf, small_text, tmp_path):
    import torch

    from conftest import torch_logits

    hf_dir, model = deep_hf
    summary = run_prune(hf_dir, small_text, tmp_path / "run", "replaceme", "--recover-steps", "0")
    calib = calibration(hf_dir, small_text)
    h = hf_hidden_states(model, calib)
    hs = h[1:, :, -1]  # distance.py: hidden_states[1:], each sequence's last token
    n = 2
    cos = (hs[:-n] * hs[n:]).sum(-1) / (np.linalg.norm(hs[:-n], axis=-1) * np.linalg.norm(hs[n:], axis=-1))
    dist = (np.arccos(np.clip(cos, -1, 1)) / np.pi).mean(axis=1)
    np.testing.assert_allclose(summary["block_distances"], dist, rtol=0, atol=1e-6)
    i = int(np.argmin(dist))
    assert summary["fit_layer"] == i and summary["layers_removed"] == [i + 1, i + 2]

    t = reference_fit(model, calib, i, n)  # numpy's least squares on transformers' activations
    hf = export(tmp_path / "run", tmp_path / "hf")
    assert hf.config.num_hidden_layers == LAYERS - n
    w = model.model.layers[i].mlp.down_proj.weight.detach().double().numpy().T  # [m, hidden]
    got = hf.model.layers[i].mlp.down_proj.weight.detach().double().numpy().T
    np.testing.assert_allclose(got, w @ t, rtol=1e-4, atol=1e-4)
    ref = without_layers(model, summary["layers_removed"])
    with torch.no_grad():
        ref.model.layers[i].mlp.down_proj.weight.copy_(torch.as_tensor((w @ t).T, dtype=torch.float32))
    np.testing.assert_allclose(torch_logits(hf, TOKENS), torch_logits(ref, TOKENS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_replaceme_fit_through_the_last_layer(deep_hf, small_text, ridge):
    """T of a run ending at the last layer (its output before the final norm: our one change of the target) equals
    numpy's least squares on transformers' activations; the ridge term as lstsq.py's alpha."""
    from jaxprune import load
    from jaxprune.partition import partition
    from jaxprune.prune.depth import ReplaceMeOptions, replaceme_fit, replaceme_transform
    from jaxprune.prune.registry import ScoreInputs

    hf_dir, model = deep_hf
    calib = calibration(hf_dir, small_text)
    mine = load.load_model(hf_dir)
    inputs = ScoreInputs(mine.config, "kv_group", *partition(mine), calib=calib, calib_batch=4,
                         options=ReplaceMeOptions(ridge=ridge))
    i, n = LAYERS - 3, 2
    want = reference_fit(model, calib, i, n, ridge)
    np.testing.assert_allclose(replaceme_fit(inputs, i, n), want, rtol=1e-4, atol=1e-4)
    (path, kernel), = replaceme_transform(inputs, [i + 1, i + 2]).items()
    w = model.model.layers[i].mlp.down_proj.weight.detach().double().numpy().T
    assert path == ("layers", i, "mlp", "down_proj", "kernel")
    np.testing.assert_allclose(kernel, w @ want, rtol=1e-4, atol=1e-4)


def test_depth_with_lora_recovery_exports(deep_hf, small_text, tmp_path):
    from conftest import torch_logits

    from jaxprune import load

    hf_dir, _ = deep_hf
    summary = run_prune(hf_dir, small_text, tmp_path / "run", "shortgpt", "--recover-steps", "2", "--steps", "50")
    assert summary["recover_steps"] == 2 and summary["trainable_params"] > 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if '"loss"' in l][-1] == 2
    hf = export(tmp_path / "run", tmp_path / "hf")
    assert hf.config.num_hidden_layers == LAYERS - 2
    mine = load.load_model(tmp_path / "run" / "model")
    np.testing.assert_allclose(torch_logits(hf, TOKENS), jax_logits(mine, TOKENS), rtol=1e-4, atol=1e-4)


def test_depth_bad_input(deep_hf, small_text, tmp_path):
    hf_dir, _ = deep_hf
    base = ("prune", hf_dir, "--text", small_text, *COMMON)
    cases = [(("--method", "shortgpt", "--ratio", "0.05"), ("round(0.05·6) = 0",)),
             (("--method", "shortgpt", "--widths", "uniform"), ("--widths", "structured")),
             (("--method", "replaceme", "--distill"), ("distill",))]
    for k, (args, words) in enumerate(cases):
        proc = main_in_process(*base, *args, "--out", tmp_path / str(k))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert all(w in proc.stderr for w in words), proc.stderr[-2000:]
        assert not (tmp_path / str(k)).exists()


def test_remove_layers_keeps_gemma3_layer_types(tmp_path):
    """Per-layer config fields follow the kept layers: a Gemma 3 with its one global layer of four removed exports
    to transformers with the logits of transformers' own model with that layer deleted."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from conftest import torch_logits

    from jaxprune.hf import export_hf, load_hf_dir
    from jaxprune.prune.depth_pipeline import remove_layers

    S, F = "sliding_attention", "full_attention"
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=[S, F, S, S], max_position_embeddings=64, rms_norm_eps=1e-5,
                              rope_parameters={F: {"rope_type": "default", "rope_theta": 5e4},
                                               S: {"rope_type": "default", "rope_theta": 100.0}})
    model = Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "g3", safe_serialization=True)
    mine, cfg = load_hf_dir(tmp_path / "g3")
    small = remove_layers(mine, [1])
    assert small.config.num_layers == 3 and small.config.layer_types == (S, S, S)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(small, tmp_path / "hf"), dtype=torch.float32).eval()
    assert list(hf.config.layer_types) == [S, S, S]
    ref = without_layers(model, [1])
    ref.config.layer_types = [S, S, S]
    tokens = np.random.default_rng(0).integers(0, 96, (2, 11))  # 11 > the window of 4: the window matters
    np.testing.assert_allclose(torch_logits(hf, tokens), torch_logits(ref, tokens), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax_logits(small, tokens), torch_logits(ref, tokens), rtol=1e-4, atol=1e-4)


def test_a_depth_name_clashing_with_another_registry_is_refused():
    from jaxprune.cli import build_parser
    from jaxprune.errors import UserError
    from jaxprune.prune.depth import shortgpt_select
    from jaxprune.prune.registry import DEPTH, DepthCriterion

    DEPTH.register(DepthCriterion("wanda", "a clash", shortgpt_select))
    try:
        with pytest.raises(UserError, match="'wanda' is registered twice"):
            build_parser()
    finally:
        DEPTH.unregister("wanda")
    build_parser()
