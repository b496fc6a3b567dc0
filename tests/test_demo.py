"""`make demo-quick`: the demo script end to end on the real SmolLM2-135M (issue 5, item 9)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO


DENSE_PPL_REL_TOL = 1e-4  # two fp32 implementations of the same forward: ~1e-6 apart (see test_real_model)


def torch_heldout_perplexity(fixtures, torch_model, tokenizer, eval_tokens=2048, seq_len=256) -> float:
    """The demo's dense protocol (first ``eval_tokens`` held-out tokens, non-overlapping windows of 256)
    computed by transformers' torch model with its own tokenizer call: exp(mean next-token NLL)."""
    import numpy as np
    import torch

    tokenizer.model_max_length = 10**12
    ids = np.asarray(tokenizer(fixtures.heldout_text.read_text())["input_ids"][:eval_tokens])
    n = len(ids) // seq_len
    windows = torch.as_tensor(ids[:n * seq_len].reshape(n, seq_len)).long()
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 4):
            w = windows[i:i + 4]
            logits = torch_model(w).logits.float()
            total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       w[:, 1:].reshape(-1), reduction="sum").item()
    return float(np.exp(total / (n * (seq_len - 1))))


@pytest.mark.slow
def test_demo_quick(fixtures, tmp_path, smollm2_torch, smollm2_tokenizer):
    out = tmp_path / "runs" / "demo"  # a parent that does not exist yet, as runs/ in a fresh clone
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout
    for word in ("parameters", "perplexity", "tokens/s", "dense", "LoRAPrune"):
        assert word in table, table

    res = json.loads((out / "demo.json").read_text())
    assert res["params_after"] < res["params_before"]
    assert res["params_before"] == 134_515_008  # SmolLM2-135M, tied embeddings
    for k in ("dense_ppl", "pruned_ppl", "dense_tokens_per_s", "pruned_tokens_per_s"):
        assert math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    assert 1.0 < res["dense_ppl"] < res["pruned_ppl"]  # 8 steps of pruning to 50% cost perplexity
    # the dense perplexity is deterministic: transformers' torch model on the same held-out windows
    assert res["eval_tokens"] == 2048
    want = torch_heldout_perplexity(fixtures, smollm2_torch, smollm2_tokenizer)
    assert abs(res["dense_ppl"] - want) <= DENSE_PPL_REL_TOL * want, (res["dense_ppl"], want)
    # the printed numbers are the ones in demo.json
    params_row = next(l for l in table.splitlines() if l.startswith("parameters"))
    assert f"{res['params_before']:,}" in params_row and f"{res['params_after']:,}" in params_row
    ppl_row = next(l for l in table.splitlines() if l.startswith("perplexity"))
    assert f"{res['dense_ppl']:.2f}" in ppl_row and f"{res['pruned_ppl']:.2f}" in ppl_row
    # the shrunk model and its HF export are where the demo says
    assert (out / "model").is_dir() and (out / "hf" / "config.json").exists()
    hf_cfg = json.loads((out / "hf" / "config.json").read_text())
    assert hf_cfg["num_hidden_layers"] == 30
    # issue 15: the export is a stock config exactly as small as the pruned model (no zero padding)
    assert hf_cfg["model_type"] == "llama" and hf_cfg["intermediate_size"] == 1536 - int(0.5 * 1536)
    stored = sum(f.stat().st_size for f in (out / "hf").glob("*.safetensors"))
    assert res["params_after"] * 4 <= stored <= res["params_after"] * 4 * 1.01, (stored, res["params_after"])
    assert abs(res["hf_pruned_mb"] - stored / 1e6) < 0.1 and res["hf_pruned_mb"] < 0.75 * res["hf_dense_mb"]
    assert math.isfinite(res["transformers_speedup"]) and res["transformers_speedup"] > 0
    size_row = next(l for l in table.splitlines() if l.startswith("HF safetensors size"))
    assert f"{res['hf_pruned_mb']:.1f}" in size_row
