"""Failure behaviour: the reported tracebacks, preemption (SIGTERM) with a bitwise-exact resume, damaged
checkpoints, two runs on one directory, an output that cannot be written."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import finish_cli, free_port, start_cli
from jaxprune.cli import main
from jaxprune.train import PREEMPTED_EXIT

TINY_RUN = ["--no-progress", "--seq-len", "16", "--batch-size", "2", "--val-blocks", "1", "--lr", "1e-3",
            "--warmup-steps", "2", "--lora-rank", "4"]


def run(argv, capsys):
    """``jaxprune ARGV`` in this process -> (exit code, stderr lines)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, [l for l in capsys.readouterr().err.splitlines() if l.strip()]


def model_arrays(path):
    from jaxprune import load
    from jaxprune.weights import model_arrays as arrays
    return {k: np.asarray(v) for k, v in arrays(load.load_model(path)).items()}


def assert_same_model(a, b):
    x, y = model_arrays(a), model_arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=str(k))


@pytest.mark.parametrize("argv, flag", [
    (["finetune", "{MODEL}", "--text", "{TEXT}", "--lora-rank", "0", "--out", "{OUT}"], "--lora-rank"),
    (["finetune", "{MODEL}", "--text", "{TEXT}", "--steps", "0", "--out", "{OUT}"], "--steps"),
    (["eval", "{MODEL}", "--text", "{TEXT}", "--seq-len", "0"], "--seq-len"),
    (["finetune", "{MODEL}", "--text", "{TEXT}", "--lora-r", "4", "--out", "{OUT}"], "--lora-r"),  # no abbreviations
    (["prune", "{MODEL}", "--text", "{TEXT}", "--ratio", "nan", "--out", "{OUT}"], "--ratio"),
])
def test_reported_tracebacks_are_one_line_and_write_nothing(argv, flag, tiny_hf_with_tokenizer, small_text, tmp_path,
                                                            capsys):
    hf_dir, _ = tiny_hf_with_tokenizer
    argv = [a.replace("{MODEL}", str(hf_dir)).replace("{TEXT}", str(small_text)).replace("{OUT}", str(tmp_path / "x"))
            for a in argv]
    code, err = run(argv, capsys)
    assert code == 2 and len(err) == 1 and flag in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_recipe_value_is_checked_like_the_flag(tiny_hf_with_tokenizer, small_text, tmp_path, capsys):
    hf_dir, _ = tiny_hf_with_tokenizer
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora_rank: -2\n")
    code, err = run(["finetune", hf_dir, "--text", small_text, "--out", tmp_path / "x", "--config", recipe], capsys)
    assert code == 2 and err == [f"jaxprune finetune: error: {recipe}: lora_rank: must be an integer >= 1 (got -2)"]
    assert not (tmp_path / "x").exists()


def test_sigterm_saves_the_step_and_resume_is_bitwise_the_uninterrupted_run(tiny_hf_with_tokenizer, small_text,
                                                                            tmp_path, capsys):
    hf_dir, _ = tiny_hf_with_tokenizer
    common = ["finetune", hf_dir, "--text", small_text, "--steps", "30", "--save-every", "100", *TINY_RUN]
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    proc = start_cli(*common, "--out", stopped)
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    r = finish_cli(proc)
    err = r.stderr
    assert r.returncode == PREEMPTED_EXIT, err[-2000:]
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 30
    assert f"stopped by SIGTERM after step {done}; checkpoint saved" in err
    assert sorted(int(p.name) for p in (stopped / "checkpoints").iterdir() if p.name.isdigit()) == [done]

    assert run([*common, "--out", stopped, "--resume"], capsys)[0] == 0
    assert run([*common, "--out", whole], capsys)[0] == 0
    assert_same_model(stopped / "model", whole / "model")
    def log(run_dir):  # every metric but the timing
        return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"}
                for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert log(stopped) == log(whole)


def _damage(step_dir):
    """Truncate every file of a checkpoint step to half its length."""
    for p in step_dir.rglob("*"):
        if p.is_file() and p.stat().st_size:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_hf_with_tokenizer, small_text, tmp_path,
                                                                  capsys):
    hf_dir, _ = tiny_hf_with_tokenizer
    common = ["finetune", hf_dir, "--text", small_text, "--steps", "4", "--save-every", "2", "--keep", "2", *TINY_RUN]
    damaged, whole = tmp_path / "damaged", tmp_path / "whole"
    assert run([*common, "--out", whole], capsys)[0] == 0
    # a run stopped after step 4 whose step-4 checkpoint is damaged: resume redoes steps 3-4 from step 2
    assert run([*common, "--out", damaged], capsys)[0] == 0
    _damage(damaged / "checkpoints" / "4")
    code, err = run([*common, "--out", damaged, "--resume"], capsys)
    assert code == 0, err
    assert any("checkpoint step 4" in l and "damaged" in l and "trying step 2" in l for l in err), err
    assert_same_model(damaged / "model", whole / "model")

    for step in ("2", "4"):
        _damage(damaged / "checkpoints" / step)
    code, err = run([*common, "--out", damaged, "--resume"], capsys)
    assert code == 2 and "every checkpoint (4, 2) is damaged" in err[-1], err


def test_a_second_run_on_the_same_directory_refuses(tiny_hf_with_tokenizer, small_text, tmp_path, capsys):
    hf_dir, _ = tiny_hf_with_tokenizer
    common = ["finetune", hf_dir, "--text", small_text, "--steps", "2", *TINY_RUN, "--out", tmp_path / "run"]
    assert run(common, capsys)[0] == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX | "
        "fcntl.LOCK_NB); print('locked', flush=True); time.sleep(120)"), str(tmp_path / "run" / ".lock")],
        stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in (["--resume"], ["--overwrite"]):
            code, err = run([*common, *extra], capsys)
            assert code == 2 and len(err) == 1 and "another jaxprune run is using this directory" in err[0], err
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # --overwrite removed nothing
    finally:
        holder.kill()
        holder.wait()


def test_an_output_that_cannot_be_written_is_one_line_and_keeps_the_old_one(tiny_hf_with_tokenizer, tmp_path,
                                                                           capsys, monkeypatch):
    from jaxprune import checkpoint

    hf_dir, _ = tiny_hf_with_tokenizer
    out = tmp_path / "ckpt"
    assert run(["convert", hf_dir, out], capsys)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".ckpt.tmp"))
    monkeypatch.setattr(checkpoint, "save_pytree", full_disk)
    code, err = run(["convert", hf_dir, out, "--overwrite"], capsys)
    assert code == 74 and len(err) == 1 and "No space left on device" in err[0], err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left behind


def test_sigterm_on_one_host_stops_every_host_at_the_same_step_and_resume_is_bitwise(tmp_path, tiny_hf_with_tokenizer,
                                                                                     small_text):
    """2 processes × 2 devices (gloo), fsdp (batch and weights split across the hosts) × tensor: SIGTERM to
    process 1 only; both save the same step and exit 75, and --resume on both finishes the run with the model
    (base, LoRA factors, masks) and the log bitwise those of an uninterrupted 2-process run.

    The reference is a 2-process run, not one process on 4 devices: the losses agree bitwise, but a weight or
    two differs by an ulp (the partitioned programs differ slightly). A persistent compilation cache shared by
    the three launches compiles the train step once; the reference runs alongside the resume."""
    model_dir, _ = tiny_hf_with_tokenizer
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    common = ["finetune", model_dir, "--text", small_text, "--steps", "8", "--batch-size", "8", "--seq-len", "32",
              "--lora-rank", "4", "--lr", "1e-2", "--warmup-steps", "1", "--val-every", "0", "--save-every", "100",
              "--mesh", "fsdp=2,tensor=2", "--no-progress"]
    two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def launch(out, *extra):
        port = free_port()
        return [start_cli(*common, "--out", out, *extra, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                          "2", "--process-id", str(i), env=two) for i in range(2)]

    def finish(procs):
        try:
            return [finish_cli(p, timeout=300) for p in procs]
        finally:
            for p in procs:
                p.kill()

    procs = launch(stopped)
    try:
        metrics = stopped / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        results = finish(procs)
    for r in results:
        assert r.returncode == PREEMPTED_EXIT, r.stderr[-2000:]
    assert "stopped by SIGTERM" in results[1].stderr and "stopped by a signal on another process" in results[0].stderr
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 8
    assert sorted(int(p.name) for p in (stopped / "checkpoints").iterdir() if p.name.isdigit()) == [done]

    resumed, reference = launch(stopped, "--resume"), launch(whole)  # the reference: the same run, uninterrupted
    for r in finish(resumed) + finish(reference):
        assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(l)["step"] for l in metrics.read_text().splitlines()] == list(range(1, 9))
    assert_same_model(stopped / "model", whole / "model")

    def log(run_dir):  # every metric but the timing
        return [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"}
                for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert log(stopped) == log(whole)
