"""Bad input through the CLI: one line on stderr, exit code 2, no traceback, nothing written.

The subprocesses (a few seconds of imports each) run concurrently from one module fixture;
each case is then checked by its own parametrized test.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import make_hf_llama, run_cli


def _listing(directory):
    """Every path under ``directory`` (hidden ones included) with its size."""
    return sorted((str(p.relative_to(directory)), p.stat().st_size if p.is_file() else -1)
                  for p in directory.rglob("*"))


def _case_missing_path(root, hf_dir, tok_dir):
    out_parent = root / "out"
    return ["convert", root / "does-not-exist", out_parent / "ckpt"], out_parent, "does-not-exist"


def _case_gpt2_config(root, hf_dir, tok_dir):
    from safetensors.numpy import save_file

    src = root / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
                                                 "n_head": 4, "vocab_size": 96}))
    save_file({"wte.weight": np.zeros((96, 64), np.float32)}, src / "model.safetensors")
    out_parent = root / "out"
    return ["convert", src, out_parent / "ckpt"], out_parent, "model_type='gpt2'"


def _case_truncated_safetensors(root, hf_dir, tok_dir):
    import shutil

    src = root / "truncated"
    shutil.copytree(hf_dir, src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    out_parent = root / "out"
    return ["convert", src, out_parent / "ckpt"], out_parent, "truncated or corrupt"


def _case_output_exists(root, hf_dir, tok_dir):
    out_parent = root / "out"
    (out_parent / "ckpt").mkdir(parents=True)
    (out_parent / "ckpt" / "keep.txt").write_text("precious")
    return ["convert", hf_dir, out_parent / "ckpt"], out_parent, "--overwrite"


def _case_text_too_short(root, hf_dir, tok_dir):
    out_parent = root / "text"
    out_parent.mkdir()
    (out_parent / "short.txt").write_text("To be, or not to be, that is the question.")
    return (["eval", tok_dir, "--text", out_parent / "short.txt", "--seq-len", 512], out_parent,
            "text too short")


def _case_pickle_weights_only(root, hf_dir, tok_dir):
    import shutil

    src = root / "pickle"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src / "config.json")
    # never unpickled: any bytes do; a real pickle payload here would be a security test failure
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    out_parent = root / "out"
    return ["convert", src, out_parent / "ckpt"], out_parent, "pytorch_model.bin"


def _case_mesh_too_big(root, hf_dir, tok_dir):
    out_parent = root / "runs"
    (out_parent).mkdir()
    (out_parent / "t.txt").write_text("To be, or not to be. " * 400)
    return (["finetune", tok_dir, "--text", out_parent / "t.txt", "--out", out_parent / "run", "--mesh",
             "data=4,tensor=4"], out_parent, "has 16 devices, but 8 are available")


def _case_batch_not_divisible_by_mesh(root, hf_dir, tok_dir):
    out_parent = root / "runs"
    (out_parent).mkdir()
    (out_parent / "t.txt").write_text("To be, or not to be. " * 400)
    return (["prune", tok_dir, "--text", out_parent / "t.txt", "--out", out_parent / "run", "--mesh",
             "fsdp=8", "--batch-size", "4"], out_parent, "batch size 4 does not divide")


CASES = {f.__name__.removeprefix("_case_"): f for f in (
    _case_missing_path, _case_gpt2_config, _case_truncated_safetensors, _case_output_exists,
    _case_text_too_short, _case_pickle_weights_only, _case_mesh_too_big, _case_batch_not_divisible_by_mesh)}


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_hf_with_tokenizer):
    hf_dir, _ = make_hf_llama(tmp_path_factory.mktemp("src"), seed=0)
    tok_dir = tiny_hf_with_tokenizer[0]
    prepared = {}
    for name, make in CASES.items():
        root = tmp_path_factory.mktemp(name)
        args, watch, expect = make(root, hf_dir, tok_dir)
        watch.mkdir(exist_ok=True)
        prepared[name] = (args, watch, expect, _listing(watch), _listing(tok_dir))
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = {name: pool.submit(run_cli, *p[0], timeout=300) for name, p in prepared.items()}
        return {name: (procs[name].result(),) + prepared[name][1:] for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(results, tiny_hf_with_tokenizer, name):
    proc, watch, expect, before, tok_before = results[name]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    command = proc.args[3]
    assert lines[0].startswith(f"jaxprune {command}: error: "), lines[0]
    assert expect in lines[0], lines[0]
    # nothing half-written: the output parent (and the model dir) are exactly as before
    assert _listing(watch) == before
    assert _listing(tiny_hf_with_tokenizer[0]) == tok_before
