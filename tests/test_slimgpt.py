"""SlimGPT (issue 31) against a literal torch port of the authors' ``SlimGPT.struct_prune`` (as vendored in
aden9460/EdgeVAR ``slimgpt_pub/slim_utils/slimgpt.py``) and their sequential layer loop, run on transformers' model:

* ``obs_prune`` equals ``struct_prune`` (heads: grouped Cholesky, one head per round; channels: Dynamic Group Size
  over two rounds) on the same W and H;
* ``jaxprune prune --method slimgpt --recover-steps 0`` keeps the heads / channels the sequential port keeps, and
  the stock-HF export gives the port's logits (which pruning without the OBS update does not);
* the Incremental Pruning Ratio: ``log_increase``'s shape, mean = --ratio.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from conftest import make_hf_llama, run_cli

H, KV, D, M, HIDDEN, LAYERS = 4, 2, 8, 160, 32, 3


def struct_prune(W, Hm, sparsity: float, headsize: int, percdamp: float):
    """The authors' ``struct_prune``, literally (torch float64; W [out, in]). Returns (W, pruned column indices)."""
    import torch

    W, Hm = torch.as_tensor(W, dtype=torch.float64).clone(), torch.as_tensor(Hm, dtype=torch.float64).clone()
    columns = W.shape[1]
    dead = torch.diag(Hm) == 0
    Hm[dead, dead] = 1
    W[:, dead] = 0
    if percdamp > 0:
        damp = percdamp * torch.mean(torch.diag(Hm))
        diag = torch.arange(Hm.size(0))
        Hm[diag, diag] += damp
    column_mask = torch.zeros(columns, dtype=torch.bool)
    pruned_columns = column_mask.count_nonzero()
    target_columns = round(columns // headsize * sparsity) * headsize
    blocksize = (target_columns - 512) // 2
    while pruned_columns < target_columns:
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hm))
        if headsize > 1:
            Hinv_diag = torch.stack([Hinv[i:i + headsize, i:i + headsize] for i in range(0, columns, headsize)])
            Hinv_diag = torch.diagonal(torch.linalg.cholesky(Hinv_diag), dim1=-2, dim2=-1).reshape(-1)
            Hinv_diag = Hinv_diag ** 2
        else:
            Hinv_diag = Hinv.diag()
        error = torch.sum(W ** 2 / Hinv_diag.unsqueeze(0), dim=0)
        error[column_mask] = torch.inf
        if headsize > 1:
            head_sort_idx = error.view(-1, headsize).sum(1).argsort()
            column_sort_idx = torch.hstack([torch.arange(x * headsize, x * headsize + headsize) for x in head_sort_idx])
            cnt = headsize
        else:
            column_sort_idx = error.argsort()
            cnt = min(target_columns - pruned_columns, max(blocksize, 64), 1024)
        W = W[:, column_sort_idx]
        Hinv = Hinv[column_sort_idx, :][:, column_sort_idx]
        Hinv = torch.linalg.cholesky(Hinv, upper=True)[:cnt]
        W1 = W[:, :cnt].clone()
        Hinv1 = Hinv[:, :cnt]
        Err1 = torch.zeros_like(W1)
        for i in range(cnt):
            Err1[:, i:i + 1] = W1[:, i:i + 1] / Hinv1[i, i]
            W1[:, i:] -= Err1[:, i:i + 1].matmul(Hinv1[i:i + 1, i:])
        W[:, :cnt] = 0
        end = columns - pruned_columns
        W[:, cnt:end] -= Err1.matmul(Hinv[:, cnt:end])
        W = W[:, torch.argsort(column_sort_idx)]
        pruned_idx = column_sort_idx[:cnt]
        Hm[pruned_idx, :] = Hm[:, pruned_idx] = 0
        Hm[pruned_idx, pruned_idx] = 1
        column_mask[pruned_idx] = 1
        pruned_columns += cnt
        if headsize == 1:
            blocksize = (blocksize - 512) // 2
    return W.numpy(), torch.where(column_mask)[0].numpy()


@pytest.mark.parametrize("headsize, n_in, sparsity", [(8, 48, 0.5), (1, 200, 0.45)])
def test_obs_prune_equals_the_authors_struct_prune(headsize, n_in, sparsity):
    from jaxprune.prune.slimgpt import obs_prune

    rng = np.random.default_rng(headsize)
    x = rng.standard_normal((n_in, 24)) @ rng.standard_normal((24, 400)) + 0.3 * rng.standard_normal((n_in, 400))
    x[3] = 0.0  # correlated inputs (as a layer's are: kept channels can stand in for pruned ones); a dead one
    hm = 2 * x @ x.T / 400
    w = rng.standard_normal((24, n_in))  # torch layout [out, in]
    want_w, want_idx = struct_prune(w, hm, sparsity, headsize, 0.01)
    n_units = round(n_in // headsize * sparsity)
    got_w, gone = obs_prune(w.T, hm, n_units, headsize, percdamp=0.01)
    assert sorted(np.flatnonzero(np.repeat(gone, headsize))) == sorted(want_idx)
    np.testing.assert_allclose(got_w.T, want_w, rtol=1e-9, atol=1e-9)
    assert headsize > 1 or n_units > 64  # the channel case runs two Dynamic Group Size rounds (64, then the rest)
    # the OBS update lowers the output error against simply zeroing the same columns
    dropped = w.copy()
    dropped[:, want_idx] = 0
    err = lambda v: np.linalg.norm((v - w) @ x)  # noqa: E731
    assert err(got_w.T) < 0.9 * err(dropped)


def test_q_head_unit_keeps_every_kv_group_equally_pruned():
    from jaxprune.prune.slimgpt import obs_prune

    rng = np.random.default_rng(1)
    x = rng.standard_normal((6 * 4, 300))
    x[:8] *= 0.01  # group 0's heads (0, 1) are the cheapest: a free greedy would take both
    w = rng.standard_normal((6 * 4, 10))
    _, gone = obs_prune(w, 2 * x @ x.T / 300, 3, 4, groups=np.repeat(np.arange(3), 2), per_group=1)
    assert gone.reshape(3, 2).sum(axis=1).tolist() == [1, 1, 1]


def test_incremental_ratios_follow_log_increase():
    from jaxprune.prune.masks import incremental_ratios

    r = incremental_ratios(0.2, 32)
    assert r.mean() == pytest.approx(0.2, abs=1e-12)
    assert r[-1] == pytest.approx(0.25)  # their LLaMA-7B 20% run: max 0.25 (min 0.0625, mean 0.195)
    shape = (r - r[0]) / (r[-1] - r[0])
    np.testing.assert_allclose(shape, np.log1p(np.arange(32)) / np.log(32), atol=1e-12)
    assert np.all(np.diff(r) > 0) and 0.05 < r[0] < 0.07


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory, fixtures):
    root = tmp_path_factory.mktemp("slimgpt")
    hf_dir, model = make_hf_llama(root, 5, vocab_size=49152, hidden_size=HIDDEN, intermediate_size=M,
                                  num_attention_heads=H, num_key_value_heads=KV, num_hidden_layers=LAYERS)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures.hf_dir / name, hf_dir / name)
    return hf_dir, model


def slimgpt_reference(torch_model, calib: np.ndarray, ratio: float, percdamp: float = 0.01):
    """The authors' sequential loop on a copy of ``torch_model``: per layer, o_proj's H from its inputs (the
    earlier layers already pruned) -> struct_prune (headsize = a KV group's G·D columns); the layer's down_proj H
    with those heads gone -> struct_prune (channels). Pruned columns stay as zeros (the same function)."""
    import torch

    model = copy.deepcopy(torch_model)
    tokens = torch.as_tensor(calib)

    def hessian(lin):
        got = []
        hook = lin.register_forward_hook(lambda _m, inp, _o: got.append(inp[0].double().reshape(-1, inp[0].shape[-1])))
        with torch.no_grad():
            model(tokens)
        hook.remove()
        x = torch.cat(got)
        return (2 * x.T @ x / len(calib)).numpy()

    kept = []
    for layer in model.model.layers:
        row = {}
        for lin, headsize, key in ((layer.self_attn.o_proj, (H // KV) * D, "heads"), (layer.mlp.down_proj, 1, "mlp")):
            w, idx = struct_prune(lin.weight.detach().double().numpy(), hessian(lin), ratio, headsize, percdamp)
            with torch.no_grad():
                lin.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
            gone = np.zeros(lin.weight.shape[1], bool)
            gone[idx] = True
            row[key] = gone
        kept.append(row)
    return kept, model


def test_slimgpt_cli_equals_the_sequential_port_and_transformers_reproduces_it(gqa_model, small_text, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxprune import load
    from jaxprune.data import Blocks, token_stream

    hf_dir, torch_model = gqa_model
    run = tmp_path / "run"
    proc = run_cli("prune", hf_dir, "--method", "slimgpt", "--widths", "uniform", "--attn-unit", "kv_group",
                   "--ratio", "0.5", "--recover-steps", "0", "--calib-samples", "8", "--calib-len", "32",
                   "--calib-batch", "4", "--seq-len", "32", "--text", small_text, "--out", run, "--no-progress",
                   "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["widths_mode"] == "uniform"

    blocks = Blocks.from_stream(token_stream(small_text, load.load_tokenizer(hf_dir)), 32, seed=0)
    calib = np.asarray(blocks.calibration(8, 32, seed=0))
    kept, reference = slimgpt_reference(torch_model, calib, 0.5)
    model = load.load_model(run / "model")
    for i, (layer, row) in enumerate(zip(reference.model.layers, kept)):
        assert model.config.mlp_width(i) == M // 2 and model.config.kv_heads(i) == KV // 2
        want = layer.mlp.down_proj.weight.detach().numpy()[:, ~row["mlp"]]  # the kept, compensated columns
        np.testing.assert_allclose(np.asarray(model.layers[i].mlp.down_proj.kernel[...]).T, want, rtol=1e-4,
                                   atol=1e-5)
        want = layer.self_attn.o_proj.weight.detach().numpy()[:, ~row["heads"]]
        np.testing.assert_allclose(np.asarray(model.layers[i].self_attn.o_proj.kernel[...]).T, want, rtol=1e-4,
                                   atol=1e-5)

    out = tmp_path / "hf"
    proc = run_cli("export", run / "model", out)  # uniform widths: a stock LLaMA
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, 49152, (2, 16)))
    plain = copy.deepcopy(torch_model)  # the same columns zeroed without the OBS update
    with torch.no_grad():
        for layer, row in zip(plain.model.layers, kept):
            layer.self_attn.o_proj.weight[:, torch.as_tensor(row["heads"])] = 0
            layer.mlp.down_proj.weight[:, torch.as_tensor(row["mlp"])] = 0
        want = reference(tokens).logits.numpy()
        got = exported(tokens).logits.numpy()
        unc = plain(tokens).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - unc).max() > 1e-2  # the compensation is what the comparison checks
