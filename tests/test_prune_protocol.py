"""Issue 19: the select / recover split. `prune --method loraprune --select-steps T --recover-steps N` picks the
units in a LoRAPrune run of T steps (RUN_DIR/select, its own LoRA rank), freezes the masks, and recovers with a
fresh LoRA for N steps on the baselines' schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxprune import load
from jaxprune.cli import main
from jaxprune.prune.schedule import CubicSchedule

M = 48  # the tiny model's MLP width


def _metrics(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def test_select_then_recover(tiny_hf_with_tokenizer, small_text, tmp_path, capsys):
    hf_dir, _ = tiny_hf_with_tokenizer
    run = tmp_path / "run"
    argv = ["prune", str(hf_dir), "--method", "loraprune", "--ratio", "0.5", "--select-steps", "8",
            "--recover-steps", "4", "--select-lora-rank", "2", "--lora-rank", "4", "--prune-every", "2",
            "--exclude-layers", "none", "--text", str(small_text), "--seq-len", "32", "--batch-size", "2",
            "--val-every", "0", "--no-progress", "--out", str(run), "--json"]
    assert main(argv) == 0
    summary = json.loads((run / "prune.json").read_text())
    select, recover = _metrics(run / "select"), _metrics(run)
    assert [r["step"] for r in select] == list(range(1, 9)) and [r["step"] for r in recover] == [1, 2, 3, 4]
    # selection follows the cubic schedule to the final ratio; recovery runs on the frozen final masks
    sched = CubicSchedule(8, 0.5, every=2)
    assert select[-1]["sparsity"] == pytest.approx(int(0.5 * M) / M) and sched.ratio(8) == pytest.approx(0.5)
    assert all(r["sparsity"] == pytest.approx(int(0.5 * M) / M) for r in recover)
    # the recovery LoRA has --lora-rank 4, the selection's --select-lora-rank 2
    lora_params = lambda r: r * 2 * sum(i + o for i, o in ((32, 32), (32, 16), (32, 16), (32, 32), (32, 48),  # noqa
                                                          (32, 48), (48, 32)))
    assert summary["trainable_params"] == lora_params(4)
    sel_state = json.loads((run / "select" / "run.json").read_text())
    assert sel_state["stage"] == "select" and summary["select_steps"] == 8
    model = load.load_model(run)
    cfg = model.config
    assert [cfg.mlp_width(i) for i in range(cfg.num_layers)] == [M - int(0.5 * M)] * 2
    # the run resumes as a whole: a second --resume finds both stages done and gives the same model
    assert main(argv + ["--resume"]) == 0
    again = load.load_model(run)
    np.testing.assert_array_equal(np.asarray(again.layers[0].mlp.down_proj.kernel[...]),
                                  np.asarray(model.layers[0].mlp.down_proj.kernel[...]))
    capsys.readouterr()
    assert main(["prune", str(hf_dir), "--method", "l2", "--select-steps", "3", "--text", str(small_text),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--select-steps is an option of loraprune, not of --method l2" in capsys.readouterr().err
