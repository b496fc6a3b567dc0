"""Resume is exact: a run SIGKILLed after its step-10 checkpoint and resumed to step 20 ends with the
same LoRA factors and the same loss trajectory, bit for bit on CPU, as a run of 20 steps in one go."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import jax
import numpy as np

from conftest import finish_cli, start_cli
from jaxprune.cli import main
from jaxprune.checkpoint import restore_pytree


def losses(run_dir):
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(r["step"], r["loss"], r["grad_norm"], r.get("val_ppl")) for r in recs]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_hf_with_tokenizer, small_text, capsys):
    """The victim is a subprocess (SIGKILL); the reference and the resume run in-process (same CLI code)."""
    model_dir, _ = tiny_hf_with_tokenizer
    args = ["finetune", model_dir, "--text", small_text, "--steps", 20, "--save-every", 10, "--val-every", 10,
            "--val-blocks", 2, "--seq-len", 64, "--batch-size", 2, "--lora-rank", 4, "--lr", 1e-3,
            "--warmup-steps", 2, "--no-progress", "--json"]
    args = [str(a) for a in args]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    victim = start_cli(*args, "--out", run_dir)

    # kill the victim as soon as its step-10 checkpoint is finalized (orbax writes a temp dir and
    # renames it to `10` once complete; _CHECKPOINT_METADATA is inside it)
    done_marker = run_dir / "checkpoints" / "10" / "_CHECKPOINT_METADATA"

    def kill_after_step_10():
        deadline = time.monotonic() + 400
        while victim.poll() is None and time.monotonic() < deadline:
            if done_marker.exists():
                victim.send_signal(signal.SIGKILL)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_after_step_10, daemon=True)
    killer.start()
    assert main([*args, "--out", str(ref_dir)]) == 0  # the uninterrupted run, meanwhile
    ref_out = json.loads(capsys.readouterr().out.splitlines()[-1])
    killer.join(timeout=400)
    out = finish_cli(victim)
    if out.returncode == 0:  # raced past step 20 (a starved test process): undo the tail by hand
        shutil.rmtree(run_dir / "checkpoints" / "20")
        shutil.rmtree(run_dir / "model")
    else:
        assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert not (run_dir / "model").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["10"]
    assert len(losses(run_dir)) >= 10

    assert main([*args, "--out", str(run_dir), "--resume"]) == 0
    run_out = json.loads(capsys.readouterr().out.splitlines()[-1])

    # the same trajectory, bitwise (JSON floats round-trip exactly)
    assert [s for s, *_ in losses(run_dir)] == list(range(1, 21))
    assert losses(run_dir) == losses(ref_dir)
    assert run_out["final_loss"] == ref_out["final_loss"]

    # the same final model, LoRA factors included, bitwise
    got, want = restore_pytree(run_dir / "model" / "params"), restore_pytree(ref_dir / "model" / "params")
    got_flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    want_flat = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    assert got_flat.keys() == want_flat.keys()
    lora_keys = [k for k in want_flat if any("lora_b" in str(p) for p in k)]
    assert len(lora_keys) == 2 * 7
    assert all(np.any(np.asarray(want_flat[k])) for k in lora_keys)  # B moved away from 0
    for k in want_flat:
        assert np.array_equal(np.asarray(got_flat[k]), np.asarray(want_flat[k])), k


def test_run_recorded_before_a_flag_existed_resumes_at_the_flags_old_value(tmp_path):
    """A run.json written before --attn-score / --impl / --sltrain-b-init existed resumes when the new flag
    is left at the value such a run had in effect, and is refused otherwise."""
    import json as _json

    import pytest

    from jaxprune.errors import UserError
    from jaxprune.runs import IMPLIED_BEFORE_RECORDED, check_run_dir

    from jaxprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for key, implied in IMPLIED_BEFORE_RECORDED.items():  # each is the default of every command that has it
        defaults = [p.get_default(key) for p in sub.values() if any(a.dest == key for a in p._actions)]
        assert defaults and all(d == implied for d in defaults), (key, defaults)
    (tmp_path / "run.json").write_text(_json.dumps({"kind": "prune", "steps": 4}))
    record = {"kind": "prune", "steps": 4, "attn_score": "ema", "impl": "auto"}
    assert check_run_dir(str(tmp_path), record, resume=True, overwrite=False)[1]["steps"] == 4
    with pytest.raises(UserError, match="different 'attn_score' \\('ema' -> 'mean'\\)"):
        check_run_dir(str(tmp_path), {**record, "attn_score": "mean"}, resume=True, overwrite=False)
