"""FLAP (issue 31) against a port of the authors' code (CASIA-IVA-Lab/FLAP ``BiasGPT``, ``prune_flap`` AL-AM,
``compress``) run on transformers' torch model:

* the running mean / fluctuation from per-sequence sums equal BiasGPT's in-place recurrence (aliasing included);
* `jaxprune prune --method flap --recover-steps 0` keeps exactly the heads and channels the port keeps, and its
  `export` (stock LLaMA with attention_bias / mlp_bias) gives the logits of the port's compressed torch model.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import make_hf_llama, run_cli

H, D, M, HIDDEN, LAYERS = 4, 8, 48, 32, 3


def bias_gpt(samples: np.ndarray):
    """BiasGPT.add_batch for 'WIFV', literally: samples [n, T, in] one at a time -> (baseline_inp, fluc_inp).
    ``old_baseline_inp = self.baseline_inp`` aliases the tensor updated in place, as in torch."""
    baseline = np.zeros(samples.shape[2])
    fluc, n = None, 0
    for x in samples:
        inp = x.T  # (dim, seqlen)
        old = baseline  # the same array
        baseline *= n / (n + 1)
        baseline += inp.mean(axis=1) / (n + 1)
        if n == 0:
            fluc = 0
        else:
            fluc *= (n - 1) / (n + 1 - 1)
            fluc += ((inp - baseline[:, None]) * (inp - old[:, None])).sum(axis=1) / (n + 1)
        n += 1
    return baseline, fluc


def test_running_statistics_equal_bias_gpt():
    from jaxprune.prune.flap import running_statistics

    x = np.random.default_rng(0).standard_normal((7, 5, 6)) * 3 + 1
    mean, fluc = running_statistics(x.sum(axis=1), (x * x).sum(axis=1), 5)
    want_mean, want_fluc = bias_gpt(x.copy())
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(fluc, want_fluc, rtol=1e-10)


def flap_reference(torch_model, calib: np.ndarray, ratio: float):
    """The authors' prune_flap (WIFV, AL-AM) + compress on a copy of ``torch_model`` (multi-head: head weight
    4·D/3, their 512/3 at D = 128). Returns (attn_mask [L, H], mlp_mask [L, M], compressed torch model)."""
    import copy

    import torch

    model = copy.deepcopy(torch_model)
    inputs = {}
    hooks = [getattr(getattr(layer, blk), name).register_forward_hook(
        lambda _m, inp, _o, key=(i, name): inputs.setdefault(key, []).append(inp[0][0].double().numpy()))
        for i, layer in enumerate(model.model.layers) for blk, name in (("self_attn", "o_proj"), ("mlp", "down_proj"))]
    with torch.no_grad():
        for seq in calib:  # one sample at a time, as prune_flap
            model(torch.as_tensor(seq[None]))
    for h in hooks:
        h.remove()
    std = lambda x: (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, ddof=1, keepdims=True)  # noqa: E731
    attn_metric, mlp_metric, means = [], [], {}
    for i, layer in enumerate(model.model.layers):
        for blk, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            means[i, name], fluc = bias_gpt(np.stack(inputs[i, name]))
            w = getattr(getattr(layer, blk), name).weight.detach().double().numpy()  # [out, in]
            metric = fluc * (w ** 2).sum(axis=0)
            (attn_metric if name == "o_proj" else mlp_metric).append(metric ** 2 if name == "o_proj" else metric)
    attn = std(np.stack(attn_metric)).reshape(len(attn_metric), -1, D).mean(axis=2)
    mlp = std(np.stack(mlp_metric))
    prune_metric = np.concatenate([attn.reshape(-1), mlp.reshape(-1)])
    indices = np.argsort(-prune_metric, kind="stable")
    weight = np.ones(len(indices))
    weight[indices < attn.size] = 4 * D / 3
    threshold = prune_metric[indices][np.argmin(np.abs(np.cumsum(weight) - weight.sum() * (1 - ratio)))]
    attn_mask, mlp_mask = attn > threshold, mlp > threshold
    with torch.no_grad():  # compress(): real pruning + the bias
        for i, layer in enumerate(model.model.layers):
            att, mlpm = layer.self_attn, layer.mlp
            keep = np.repeat(attn_mask[i], D)
            b = torch.as_tensor((means[i, "o_proj"] * ~keep) @ att.o_proj.weight.double().numpy().T)
            for name in ("q_proj", "k_proj", "v_proj"):
                lin = getattr(att, name)
                lin.weight = torch.nn.Parameter(lin.weight[torch.as_tensor(keep)])
                lin.bias = torch.nn.Parameter(lin.bias[torch.as_tensor(keep)])
            att.o_proj.weight = torch.nn.Parameter(att.o_proj.weight[:, torch.as_tensor(keep)])
            att.o_proj.bias = torch.nn.Parameter(att.o_proj.bias + b.float())
            att.num_heads = att.config.num_attention_heads = int(attn_mask[i].sum())
            att.num_key_value_heads = int(attn_mask[i].sum())
            b = torch.as_tensor((means[i, "down_proj"] * ~mlp_mask[i]) @ mlpm.down_proj.weight.double().numpy().T)
            for name in ("gate_proj", "up_proj"):
                lin = getattr(mlpm, name)
                lin.weight = torch.nn.Parameter(lin.weight[torch.as_tensor(mlp_mask[i])])
                lin.bias = torch.nn.Parameter(lin.bias[torch.as_tensor(mlp_mask[i])])
            mlpm.down_proj.weight = torch.nn.Parameter(mlpm.down_proj.weight[:, torch.as_tensor(mlp_mask[i])])
            mlpm.down_proj.bias = torch.nn.Parameter(mlpm.down_proj.bias + b.float())
    return attn_mask, mlp_mask, model


@pytest.fixture(scope="module")
def mha_model(tmp_path_factory, fixtures):
    """A tiny multi-head LLaMA (FLAP's setting) with zero biases on every linear (the compress port adds to
    them), SmolLM2's tokenizer."""
    import torch

    root = tmp_path_factory.mktemp("flap")
    hf_dir, model = make_hf_llama(root, 3, vocab_size=49152, hidden_size=HIDDEN, intermediate_size=M,
                                  num_attention_heads=H, num_key_value_heads=H, num_hidden_layers=LAYERS,
                                  attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "proj" in name:
                p.mul_(10.0)  # activations well away from zero: a sharper ranking
    model.save_pretrained(hf_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures.hf_dir / name, hf_dir / name)
    return hf_dir, model


def test_flap_cli_equals_the_authors_pruning_and_transformers_reproduces_it(mha_model, small_text, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxprune import load
    from jaxprune.data import Blocks, token_stream

    hf_dir, torch_model = mha_model
    run = tmp_path / "run"
    proc = run_cli("prune", hf_dir, "--method", "flap", "--widths", "global", "--ratio", "0.3", "--recover-steps", "0",
                   "--calib-samples",
                   "6", "--calib-len", "32", "--calib-batch", "4", "--seq-len", "32", "--text", small_text,
                   "--out", run, "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["widths_mode"] == "global" and summary["recover_steps"] == 0
    assert not (run / "metrics.jsonl").exists()  # nothing trained

    blocks = Blocks.from_stream(token_stream(small_text, load.load_tokenizer(hf_dir)), 32, seed=0)
    calib = np.asarray(blocks.calibration(6, 32, seed=0))
    attn_mask, mlp_mask, reference = flap_reference(torch_model, calib, 0.3)
    assert 0 < attn_mask.sum() < attn_mask.size and 0 < mlp_mask.sum() < mlp_mask.size
    assert len(set(mlp_mask.sum(axis=1))) > 1  # global allocation: the widths differ by layer
    widths = json.loads((run / "prune.json").read_text())["widths"]
    assert [(w["heads"], w["mlp"]) for w in widths] == list(zip(attn_mask.sum(1), mlp_mask.sum(1)))

    model = load.load_model(run / "model")
    for i, layer in enumerate(reference.model.layers):  # the same kept rows, and the compensating biases
        np.testing.assert_allclose(np.asarray(model.layers[i].mlp.down_proj.kernel[...]).T,
                                   layer.mlp.down_proj.weight.detach().numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(model.layers[i].mlp.down_proj.bias[...]),
                                   layer.mlp.down_proj.bias.detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(model.layers[i].self_attn.o_proj.bias[...]),
                                   layer.self_attn.o_proj.bias.detach().numpy(), rtol=1e-4, atol=1e-5)

    out = tmp_path / "hf"
    proc = run_cli("export", run / "model", out, "--pad")  # per-layer widths: zero-padded stock LLaMA
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, 49152, (2, 16)))
    with torch.no_grad():
        want = reference(tokens).logits.numpy()
        got = exported(tokens).logits.numpy()
        dense = torch_model(tokens).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - dense).max() > 1e-2  # pruning changed the function: the comparison is not vacuous
