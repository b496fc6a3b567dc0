"""SIGTERM anywhere in a command (issue 33, "preemption everywhere"): while loading, calibrating, selecting or
saving, `prune` stops at once with exit 75 and nothing half-written (no model dir, no temp dir left), and the
rerun (`--resume` once the run dir exists) finishes with the uninterrupted run's model, bit for bit. The
training loop's own preemption (checkpoint first, then exit 75) is tests/test_reliability.py's."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from jaxprune import checkpoint, load
from jaxprune.cli import main
from jaxprune.prune import pipeline, slimgpt
from jaxprune.prune.loram import host_arrays


def prune_argv(hf_dir, text, out) -> list[str]:
    return ["prune", str(hf_dir), "--method", "slimgpt", "--ratio", "0.5", "--recover-steps", "2",
            "--calib-samples", "4", "--calib-len", "16", "--seq-len", "16", "--batch-size", "2", "--lora-rank", "2",
            "--val-every", "0", "--save-every", "2", "--text", str(text), "--out", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_hf_with_tokenizer, small_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("preempt") / "ref"
    assert main(prune_argv(tiny_hf_with_tokenizer[0], small_text, out)) == 0
    return host_arrays(load.load_model(out / "model"))


def sigterm_first(fn):
    """``fn`` that gets a SIGTERM as it starts (the handler raises before ``fn`` runs any further)."""
    def wrapped(*a, **k):
        signal.raise_signal(signal.SIGTERM)
        time.sleep(30)  # not reached: the handler raises at once
        return fn(*a, **k)
    return wrapped


# (phase, module, function that starts it, run dir exists by then)
PHASES = [("loading", load, "load_model", False), ("calibrating", pipeline, "calibration_batch", True),
          ("selecting", slimgpt, "obs_prune", True), ("saving", checkpoint, "save_pytree", True)]


@pytest.mark.parametrize("phase,module,name,has_run_dir", PHASES, ids=[p[0] for p in PHASES])
def test_sigterm_exits_75_and_the_rerun_equals_the_uninterrupted_run(phase, module, name, has_run_dir, uninterrupted,
                                                                     tiny_hf_with_tokenizer, small_text, tmp_path,
                                                                     monkeypatch, capsys):
    out = tmp_path / "run"
    argv = prune_argv(tiny_hf_with_tokenizer[0], small_text, out)
    with monkeypatch.context() as m:
        m.setattr(module, name, sigterm_first(getattr(module, name)))
        assert main(argv) == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped by SIGTERM" in err[0], err
    assert err[0].endswith("--resume to finish" if has_run_dir else "rerun the same command"), err[0]
    assert out.exists() == has_run_dir
    if has_run_dir:  # nothing half-written: no model, no summary, no temp dir of an interrupted save
        left = sorted(p.name for p in out.iterdir())
        assert "model" not in left and "prune.json" not in left and not any(".tmp" in n for n in left), left
    assert main(argv + (["--resume"] if has_run_dir else [])) == 0
    got = host_arrays(load.load_model(out / "model"))
    assert got.keys() == uninterrupted.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], uninterrupted[k], err_msg=f"{phase}: {k}")
