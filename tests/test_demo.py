"""`make demo-quick`: the demo script end to end on the real SmolLM2-135M (issue 5, item 9)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_demo_quick(fixtures, tmp_path):
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
    # the printed numbers are the ones in demo.json
    params_row = next(l for l in table.splitlines() if l.startswith("parameters"))
    assert f"{res['params_before']:,}" in params_row and f"{res['params_after']:,}" in params_row
    ppl_row = next(l for l in table.splitlines() if l.startswith("perplexity"))
    assert f"{res['dense_ppl']:.2f}" in ppl_row and f"{res['pruned_ppl']:.2f}" in ppl_row
    # the shrunk model and its HF export are where the demo says
    assert (out / "model").is_dir() and (out / "hf" / "config.json").exists()
    hf_cfg = json.loads((out / "hf" / "config.json").read_text())
    assert hf_cfg["num_hidden_layers"] == 30
