"""Issue 19: the select / recover split. `prune --method loraprune --select-steps T --recover-steps N` picks the
units in a LoRAPrune run of T steps (RUN_DIR/select, its own LoRA rank), freezes the masks, and recovers with a
fresh LoRA for N steps on the baselines' schedule."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jaxprune import load
from jaxprune.cli import main
from jaxprune.prune.loram import host_arrays
from jaxprune.prune.schedule import CubicSchedule

M = 48  # the tiny model's MLP width


def _metrics(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def _bool_leaves(ckpt) -> list[np.ndarray]:
    """A training checkpoint's masks: the TrainState's bool leaves, in tree order (head_mask / channel_mask)."""
    from jaxprune.checkpoint import restore_pytree

    state = restore_pytree(ckpt / "state")
    return [np.asarray(state[k]) for k in sorted(state) if np.asarray(state[k]).dtype == bool]


def test_select_then_recover(tiny_hf_with_tokenizer, small_text, tmp_path, capsys):
    hf_dir, _ = tiny_hf_with_tokenizer
    run = tmp_path / "run"
    argv = ["prune", str(hf_dir), "--method", "loraprune", "--ratio", "0.5", "--select-steps", "8",
            "--recover-steps", "4", "--select-lora-rank", "2", "--lora-rank", "4", "--prune-every", "2",
            "--exclude-layers", "none", "--text", str(small_text), "--seq-len", "32", "--batch-size", "2",
            "--val-every", "0", "--save-every", "2", "--no-progress", "--out", str(run), "--json"]
    assert main(argv) == 0
    summary = json.loads((run / "prune.json").read_text())
    select, recover = _metrics(run / "select"), _metrics(run)
    assert [r["step"] for r in select] == list(range(1, 9)) and [r["step"] for r in recover] == [1, 2, 3, 4]
    # selection follows the cubic schedule to the final ratio; recovery runs on the frozen final masks
    sched = CubicSchedule(8, 0.5, every=2)
    assert select[-1]["sparsity"] == pytest.approx(int(0.5 * M) / M) and sched.ratio(8) == pytest.approx(0.5)
    assert all(r["sparsity"] == pytest.approx(int(0.5 * M) / M) for r in recover)
    # the recovery's units are the selection's: its masks at every checkpoint equal the selection's final masks
    # (bool leaves: per layer the 4 heads and 48 channels, half of each pruned)
    chosen = _bool_leaves(run / "select" / "checkpoints" / "8")
    assert sorted(m.size for m in chosen) == [4, 4, M, M] and [int(m.sum()) for m in chosen if m.size == M] == [24] * 2
    assert not all(m.all() for m in _bool_leaves(run / "select" / "checkpoints" / "6"))  # pruning had begun
    for step in ("2", "4"):
        got = _bool_leaves(run / "checkpoints" / step)
        assert len(got) == len(chosen) and all(np.array_equal(g, c) for g, c in zip(got, chosen)), step
    # the recovery LoRA has --lora-rank 4, the selection's --select-lora-rank 2
    lora_params = lambda r: r * 2 * sum(i + o for i, o in ((32, 32), (32, 16), (32, 16), (32, 32), (32, 48),  # noqa
                                                          (32, 48), (48, 32)))
    assert summary["trainable_params"] == lora_params(4)
    sel_state = json.loads((run / "select" / "run.json").read_text())
    assert sel_state["stage"] == "select" and summary["select_steps"] == 8
    model = load.load_model(run)
    cfg = model.config
    assert [cfg.mlp_width(i) for i in range(cfg.num_layers)] == [M - int(0.5 * M)] * 2
    # killed after the recovery's step-2 checkpoint (its step 4 and the model not written; metrics logged past the
    # checkpoint): --resume gives the uninterrupted run's model, bit for bit
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    for p in (run / "checkpoints" / "4", run / "model"):
        shutil.rmtree(p)
    (run / "prune.json").unlink()
    assert main(argv + ["--resume"]) == 0
    assert _metrics(run / "select") == _metrics(ref / "select")  # the finished selection is not run again
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    want, got = host_arrays(load.load_model(ref)), host_arrays(load.load_model(run))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    capsys.readouterr()
    assert main(["prune", str(hf_dir), "--method", "l2", "--select-steps", "3", "--text", str(small_text),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--select-steps is an option of loraprune, not of --method l2" in capsys.readouterr().err
