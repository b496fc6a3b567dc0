"""`jaxprune prune` end to end on a tiny model with SmolLM2's tokenizer (issue 5, item 8).

The LoRAPrune run is a real `python -m jaxprune.cli prune` subprocess; while it runs, the three
one-shot baselines go through the same CLI entry point (``jaxprune.cli.main``) in this process,
which saves three interpreter start-ups and imports (the suite's time budget is tight on two
cores). Each test then checks one run against numbers computed here.
Model: 2 layers, 4 query heads over 2 KV heads (groups of 2), head_dim 8, MLP 48, vocab 49152.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest


from jaxprune.prune.schedule import CubicSchedule

from conftest import finish_cli, jax_logits, main_in_process, start_cli

HIDDEN, H, KV, D, M, VOCAB = 32, 4, 2, 8, 48, 49152
COMMON = ("--seq-len", "32", "--batch-size", "2", "--no-progress", "--json")
RUNS = {  # name: (method, ratio, extra args, expected (heads, kv heads, mlp) per layer)
    "loraprune": ("loraprune", 0.5, ("--steps", "30", "--exclude-layers", "none", "--attn-unit", "q_head"),
                  [(2, 2, 24)] * 2),
    "llm-pruner": ("llm-pruner", 0.5, ("--steps", "30", "--recover-steps", "4", "--exclude-layers", "none",
                                       "--attn-unit", "kv_group", "--calib-len", "32", "--calib-samples", "4"),
                   [(2, 1, 24)] * 2),                                 # int(0.5·2) = 1 of 2 KV groups
    "l2": ("l2", 0.3, ("--steps", "30", "--recover-steps", "4", "--exclude-layers", "none",
                                     "--attn-unit", "q_head"),
                  [(4, 2, 34)] * 2),                                  # int(0.3·2) = 0 heads, int(14.4) = 14 ch.
    "random": ("random", 0.5, ("--steps", "30", "--recover-steps", "4", "--exclude-layers", "1",
                               "--widths", "layerwise", "--attn-unit", "q_head"),
               [(2, 2, 24), (4, 2, 48)]),                             # layer 1 excluded: non-uniform
}


def _params(widths, vocab=VOCAB, h=HIDDEN, d=D) -> int:
    """Parameter count of a LLaMA with these per-layer widths (untied embeddings, no biases)."""
    n = 2 * vocab * h + h
    for heads, kv, m in widths:
        n += h * heads * d * 2 + 2 * h * kv * d + 3 * h * m + 2 * h
    return n


@pytest.fixture(scope="module")
def runs(tiny_hf_with_tokenizer, small_text, tmp_path_factory):
    """{name: (CompletedProcess, run dir)} for the four prune runs."""
    hf_dir, _ = tiny_hf_with_tokenizer
    root = tmp_path_factory.mktemp("prune-runs")

    def argv(name):
        method, ratio, extra, _ = RUNS[name]
        return ("prune", hf_dir, "--method", method, "--ratio", ratio, "--text", small_text, "--out", root / name,
                *extra, *COMMON)

    proc = start_cli(*argv("loraprune"))
    done = {name: (main_in_process(*argv(name)), root / name) for name in RUNS if name != "loraprune"}
    done["loraprune"] = (finish_cli(proc, timeout=600), root / "loraprune")
    return done


def _check_run(name, runs, tiny_hf_with_tokenizer):
    from jaxprune import load
    from jaxprune.model import count_params

    proc, run_dir = runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    method, ratio, _, widths = RUNS[name]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "prune.json").read_text())
    assert {k: v for k, v in summary.items() if k != "widths"} == result

    _, torch_model = tiny_hf_with_tokenizer
    before = sum(p.numel() for p in torch_model.parameters())
    assert summary["params_before"] == before == _params([(H, KV, M)] * 2)
    model = load.load_model(run_dir)
    cfg = model.config
    assert [(cfg.heads(i), cfg.kv_heads(i), cfg.mlp_width(i)) for i in range(2)] == widths
    assert summary["params_after"] == count_params(model) == _params(widths) < before
    assert summary["params_removed_fraction"] == pytest.approx(1 - _params(widths) / before)
    assert [(w["heads"], w["kv_heads"], w["mlp"]) for w in summary["widths"]] == widths
    layers = summary["prunable_layers"]
    # fractions over the prunable layers: int(ratio·n) / n per layer
    unit_n = KV if "kv_group" in RUNS[name][2] else H // KV
    assert summary["heads_pruned"] == pytest.approx(int(ratio * unit_n) / unit_n)
    assert summary["channels_pruned"] == pytest.approx(int(ratio * M) / M)
    assert summary["trainable_params"] == 2 * 8 * sum(i + o for i, o in (
        (HIDDEN, H * D), (HIDDEN, KV * D), (HIDDEN, KV * D), (H * D, HIDDEN), (HIDDEN, M), (HIDDEN, M), (M, HIDDEN)))
    assert layers == ([0, 1] if name != "random" else [0])
    steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, (30 if method == "loraprune" else 4) + 1))
    assert all(math.isfinite(r["loss"]) for r in steps) and "val_ppl" in steps[-1]
    return summary, steps, model


def test_loraprune_cli_end_to_end(runs, tiny_hf_with_tokenizer, small_text, tmp_path):
    """prune.json matches the shrunk model; the logged sparsity follows the cubic schedule; `eval` on the
    run dir gives the perplexity transformers computes on `export`'s output; export logits match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxprune.evaluate import tokenize_text, windows

    summary, steps, model = _check_run("loraprune", runs, tiny_hf_with_tokenizer)
    # sparsity logged after step t = channels pruned at the last prune step <= t (masks set at t = 3, 13, 23, 27)
    sched = CubicSchedule(30, 0.5)
    last = 0.0
    for r in steps:
        if sched.is_prune_step(r["step"]):
            last = max(last, int(sched.ratio(r["step"]) * M) / M)
        assert r["sparsity"] == pytest.approx(last), r
    assert steps[0]["sparsity"] == 0.0 and steps[-1]["sparsity"] == 0.5

    run_dir = runs["loraprune"][1]
    out = tmp_path / "hf"
    ev = main_in_process("eval", run_dir, "--text", small_text, "--seq-len", "32", "--max-tokens", "1024",
                         "--batch-size", "4", "--json")
    ex = main_in_process("export", run_dir, out, "--json")
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert res["params"] == summary["params_after"] and res["windows"] == 32 and res["tokens"] == 32 * 31

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == summary["params_after"]  # uniform: nothing padded
    tok = AutoTokenizer.from_pretrained(out)
    win = windows(tokenize_text(tok, small_text.read_text()), 32, 1024)
    with torch.no_grad():
        logits = hf(torch.as_tensor(win, dtype=torch.long)).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                                torch.as_tensor(win[:, 1:], dtype=torch.long).reshape(-1))
    assert res["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    np.testing.assert_allclose(logits[:2, :16].numpy(), jax_logits(model, win[:2, :16]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llm-pruner", "l2", "random"])
def test_one_shot_baselines_cli(name, runs, tiny_hf_with_tokenizer):
    _check_run(name, runs, tiny_hf_with_tokenizer)


def test_random_run_exports_padded(runs, tmp_path):
    """Layer 1 excluded -> a non-uniform model, exported zero-padded with the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxprune import load
    from jaxprune.hf import export_hf

    model = load.load_model(runs["random"][1])
    assert not model.config.is_uniform
    out = export_hf(model, tmp_path / "hf", pad=True)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads, hf.config.intermediate_size) == (H, KV, M)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.float().numpy()
    np.testing.assert_allclose(jax_logits(model, tokens), want, rtol=1e-4, atol=1e-4)


def test_prune_bad_input(tiny_hf_with_tokenizer, small_text, tmp_path):
    """A real process for the exit status; the second case in-process (it loads the model first)."""
    hf_dir, _ = tiny_hf_with_tokenizer
    base = ("prune", hf_dir, "--text", small_text, "--steps", "2", "--seq-len", "32", "--no-progress")
    bad_ratio = finish_cli(start_cli(*base, "--ratio", "1.5", "--out", tmp_path / "a"))
    bad_layer = main_in_process(*base, "--exclude-layers", "99", "--out", tmp_path / "b")
    # excluding layers keeps them wide: not with --widths uniform (issue 15)
    wide_layer = main_in_process(*base, "--exclude-layers", "1", "--widths", "uniform", "--out", tmp_path / "c")
    for proc, words in ((bad_ratio, ("--ratio", "1.5")), (bad_layer, ("--exclude-layers", "99", "out of range")),
                        (wide_layer, ("--exclude-layers 1", "--widths uniform"))):
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxprune prune: error:"), proc.stderr[-2000:]
        assert all(w in lines[0] for w in words), lines[0]
        assert "Traceback" not in proc.stderr
    # rejected before a run dir is made (a left-over RUN_DIR would block the corrected command)
    assert not any((tmp_path / d).exists() for d in "abc")
