"""Property tests (hypothesis) of every numeric flag of every command (issue 34, item 2).

``SPEC`` below says, independently of ``jaxprune.commands.flags``, which values each numeric flag takes: an
integer or a finite number, within a range. The flags are discovered from the argparse parsers (a typed option,
or one with a numeric default), and every one must have an entry, so a new flag cannot go untested.

* every flag, a value drawn outside its range or of the wrong type (NaN, inf, negative, zero where >= 1, too
  large, a fraction for an integer, text): ``jaxprune.cli.main`` exits 2 with exactly one line on stderr that
  names the flag, and writes nothing;
* every flag, a value drawn inside its range is accepted and parsed to that number; each closed end of a
  range is accepted, each open end, the nearest value beyond each end, NaN, inf and text refused;
* whole runs (finetune, prune, pretrain, eval, generate) with drawn valid values exit 0, and their results
  follow from those values by an independent computation (LoRA parameter counts, steps logged, the tiny model's
  parameter count, transformers' perplexity and greedy tokens).

Each example runs in this process (``conftest.main_in_process``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import string
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jaxprune.cli import build_parser

from conftest import main_in_process


@dataclass(frozen=True)
class Range:
    """``kind`` int or float (finite), between ``lo`` and ``hi`` (None: unbounded), each end open or closed."""
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, x) -> bool:
        if self.kind == "int" and (not isinstance(x, int) or isinstance(x, bool)):
            return False
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))


INT_GE0, INT_GE1, INT_GE2 = Range("int", 0), Range("int", 1), Range("int", 2)
SEED = Range("int", 0, 2**32 - 1)  # numpy's and jax's seed range
POSITIVE, NONNEG, AT_LEAST_1 = Range("float", 0, lo_open=True), Range("float", 0), Range("float", 1)
UNIT, BELOW_1 = Range("float", 0, 1), Range("float", 0, 1, hi_open=True)
ABOVE_0, OPEN_UNIT = Range("float", 0, 1, lo_open=True), Range("float", 0, 1, lo_open=True, hi_open=True)

#: every numeric flag (the same range in every command that has it)
SPEC: dict[str, Range] = {
    # training runs (finetune, prune, pretrain, loram)
    "--lora-rank": INT_GE1, "--lora-alpha": POSITIVE, "--steps": INT_GE1, "--batch-size": INT_GE1,
    "--grad-accum": INT_GE1, "--seq-len": INT_GE2, "--lr": POSITIVE, "--warmup-steps": INT_GE0,
    "--weight-decay": NONNEG, "--clip-norm": NONNEG, "--save-every": INT_GE1, "--keep": INT_GE1,
    "--val-every": INT_GE0, "--val-blocks": INT_GE1, "--seed": SEED, "--num-processes": INT_GE1,
    "--process-id": INT_GE0, "--distill-alpha": UNIT, "--distill-temp": POSITIVE,
    # prune / loram: a fraction of units removed (1 would remove them all)
    "--ratio": BELOW_1, "--sparsity": BELOW_1, "--recover-steps": INT_GE0, "--calib-samples": INT_GE1,
    "--calib-len": INT_GE2, "--calib-batch": INT_GE1, "--prune-every": INT_GE1, "--warmup-frac": BELOW_1,
    "--cooldown-frac": BELOW_1, "--beta": BELOW_1, "--select-steps": INT_GE1, "--select-lora-rank": INT_GE1,
    "--blocksize": INT_GE1, "--percdamp": NONNEG, "--ridge": NONNEG, "--prune-steps": INT_GE1,
    "--align-steps": INT_GE0, "--align-lr": POSITIVE,
    # finetune --rank-allocation
    "--rank-target": INT_GE1, "--rank-init": INT_GE1, "--rank-tinit": INT_GE0, "--rank-tfinal": INT_GE0,
    "--rank-every": INT_GE1, "--rank-grow": INT_GE1,
    # pretrain: the model and the methods
    "--hidden-size": INT_GE1, "--intermediate-size": INT_GE1, "--num-layers": INT_GE1, "--num-heads": INT_GE1,
    "--num-kv-heads": INT_GE1, "--head-dim": INT_GE1, "--sparse-ratio": OPEN_UNIT, "--adapter-rank": INT_GE0,
    "--adapter-frac": UNIT, "--mask-change-freq": INT_GE1, "--mask-refresh-frac": UNIT,
    "--max-aspect-ratio": AT_LEAST_1, "--lost-channel-ratio": ABOVE_0, "--switch-interval": INT_GE1,
    "--switch-descent-ratio": ABOVE_0, "--switch-freeze-steps": INT_GE0,
    # eval, generate, lm-eval
    "--max-tokens": INT_GE2, "--max-new-tokens": INT_GE0, "--temperature": NONNEG, "--num-fewshot": INT_GE0,
    "--limit": INT_GE1, "--max-length": INT_GE2, "--max-gen-toks": INT_GE1, "--bootstrap-iters": INT_GE0,
}

#: each command's required arguments ({MODEL}, {TEXT}, {OUT}: paths of the test's work dir)
BASE_ARGV = {
    "convert": ["{MODEL}", "{OUT}"], "export": ["{MODEL}", "{OUT}"], "eval": ["{MODEL}", "--text", "{TEXT}"],
    "generate": ["{MODEL}", "--prompt", "To be"], "lm-eval": ["{MODEL}", "--tasks", "shakespeare"],
    "finetune": ["{MODEL}", "--text", "{TEXT}", "--out", "{OUT}"],
    "prune": ["{MODEL}", "--text", "{TEXT}", "--out", "{OUT}"],
    "loram": ["{MODEL}", "--text", "{TEXT}", "--out", "{OUT}"],
    "pretrain": ["--text", "{TEXT}", "--out", "{OUT}"],
}


@lru_cache(maxsize=None)
def _parser():
    return build_parser()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def numeric_flags(command: str) -> dict[str, argparse.Action]:
    """The command's options that take a number: a ``type=`` other than str, or a numeric default."""
    out = {}
    for a in _subparsers()[command]._actions:
        if not a.option_strings or a.nargs == 0:
            continue
        numeric_default = isinstance(a.default, (int, float)) and not isinstance(a.default, bool)
        if (a.type is not None and a.type is not str) or numeric_default:
            out[max(a.option_strings, key=len)] = a
    return out


PAIRS = [(c, f) for c in sorted(BASE_ARGV) for f in sorted(numeric_flags(c))]


def test_every_command_and_numeric_flag_has_a_spec():
    assert set(_subparsers()) == set(BASE_ARGV)
    flags = {f for _, f in PAIRS}
    assert not flags - set(SPEC), f"numeric flags without a range in SPEC: {sorted(flags - set(SPEC))}"
    assert not set(SPEC) - flags, f"SPEC entries no command has: {sorted(set(SPEC) - flags)}"
    assert len(PAIRS) > 100


# ---- values --------------------------------------------------------------------------------------------------
NOT_A_NUMBER = st.one_of(st.sampled_from(["", " ", "x", "two", "1e9x", "0x10", "1,5", "None", "true", "--", "1 2"]),
                         st.text(string.ascii_letters + "_%", min_size=1, max_size=6))
NOT_FINITE = st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999", "-1e999"])
FINITE = dict(allow_nan=False, allow_infinity=False)


def invalid_values(r: Range):
    """Texts the flag must refuse: not a number, not finite, outside the range, a fraction for an integer."""
    options = [NOT_A_NUMBER, NOT_FINITE]
    if r.kind == "int":
        options.append(st.floats(-1e12, 1e12).filter(lambda x: not x.is_integer()).map(repr))
        if r.lo is not None:
            options.append(st.integers(max_value=int(r.lo) - 1).map(str))
        if r.hi is not None:
            options.append(st.integers(min_value=int(r.hi) + 1).map(str))
    else:
        if r.lo is not None:
            options.append(st.floats(max_value=r.lo, **FINITE).filter(lambda x: not r.contains(x)).map(repr))
        if r.hi is not None:
            options.append(st.floats(min_value=r.hi, **FINITE).filter(lambda x: not r.contains(x)).map(repr))
    return st.one_of(options)


def valid_values(r: Range):
    """(text, the number it must parse to) inside the range."""
    if r.kind == "int":
        lo = int(r.lo) if r.lo is not None else -10**12
        return st.integers(lo, int(r.hi) if r.hi is not None else lo + 10**12).map(lambda v: (str(v), v))
    hi = r.hi if r.hi is not None else 1e9
    return st.floats(r.lo, hi, exclude_min=r.lo_open, exclude_max=r.hi_open, **FINITE).map(lambda v: (repr(v), v))


# ---- every flag, parsed -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


_count = itertools.count()


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def argv_of(command: str, workdir, *extra) -> list[str]:
    out = workdir / f"ex{next(_count)}" / "out"
    fill = {"{MODEL}": str(workdir / "model"), "{TEXT}": str(workdir / "t.txt"), "{OUT}": str(out)}
    return [command, *(fill.get(a, a) for a in BASE_ARGV[command]), *extra]


SETTINGS = settings(max_examples=4, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("command, flag", PAIRS)
@SETTINGS
@given(data=st.data())
def test_invalid_value_is_one_line_and_exit_2(workdir, command, flag, data):
    text = data.draw(invalid_values(SPEC[flag]), label="value")
    before = listing(workdir)
    r = main_in_process(*argv_of(command, workdir, f"{flag}={text}"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (text, r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"jaxprune {command}: error: argument {flag}"), (text, r.stderr)
    assert r.stdout == "" and listing(workdir) == before


def _parse(argv):
    """(namespace or None, stderr) of the real parser on ``argv``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return _parser().parse_args(argv), err.getvalue()
        except SystemExit as e:
            assert e.code == 2
            return None, err.getvalue()


@pytest.mark.parametrize("command, flag", PAIRS)
@settings(SETTINGS, max_examples=10)
@given(data=st.data())
def test_valid_value_is_accepted(workdir, command, flag, data):
    text, value = data.draw(valid_values(SPEC[flag]), label="value")
    args, err = _parse(argv_of(command, workdir, f"{flag}={text}"))
    assert args is not None, (text, err)
    got = getattr(args, numeric_flags(command)[flag].dest)
    assert got == value and type(got) is type(value), (text, got)


#: texts every numeric flag refuses (the draws above may miss them)
ALWAYS_BAD = ["nan", "-nan", "inf", "-inf", "1e999", "", "x", "None"]


@pytest.mark.parametrize("command, flag", PAIRS)
def test_range_ends_and_non_numbers(workdir, command, flag):
    """A closed end is accepted and an open end refused; the nearest value beyond each end, NaN, infinities, text
    and (integers) a fraction are refused, each with one line naming the flag."""
    r = SPEC[flag]
    refused = list(ALWAYS_BAD) + (["1.5", "2.0"] if r.kind == "int" else [])
    for end, is_open, outward in ((r.lo, r.lo_open, -math.inf), (r.hi, r.hi_open, math.inf)):
        if end is None:
            continue
        beyond = end + (1 if outward > 0 else -1) if r.kind == "int" else math.nextafter(end, outward)
        end = int(end) if r.kind == "int" else float(end)
        args, _ = _parse(argv_of(command, workdir, f"{flag}={end!r}"))
        assert (args is None) == is_open, (flag, end)
        refused.append(repr(beyond))
    for text in refused:
        args, err = _parse(argv_of(command, workdir, f"{flag}={text}"))
        lines = err.strip().splitlines()
        assert args is None and len(lines) == 1 and f"argument {flag}" in lines[0], (flag, text, err)


# ---- whole runs with drawn valid values -----------------------------------------------------------------------
RUN_SETTINGS = settings(SETTINGS, max_examples=3)


def run_json(*argv) -> dict:
    r = main_in_process(*argv, "--json")
    assert r.returncode == 0, (argv, r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def lora_params(rank: int, hidden: int, mlp: int, heads: int, kv: int, head_dim: int, layers: int) -> int:
    """r·(in + out) per LoRA'd linear (q, k, v, o, gate, up, down) of a LLaMA layer."""
    q, k = heads * head_dim, kv * head_dim
    return layers * rank * ((hidden + q) * 2 + (hidden + k) * 2 + (hidden + mlp) * 3)


TINY = dict(hidden=32, mlp=48, heads=4, kv=2, head_dim=8, layers=2)  # conftest.tiny_hf_with_tokenizer


def logged_steps(run_dir) -> list[int]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted({m["step"] for m in lines if "loss" in m})


@RUN_SETTINGS
@example(rank=1, alpha=16.0, steps=1, batch=1, accum=1, seq_len=2, lr=1e-3, warmup=0, keep=1, val_every=0, seed=0)
@given(rank=st.integers(1, 4), alpha=st.floats(0.5, 64), steps=st.integers(1, 2), batch=st.integers(1, 2),
       accum=st.integers(1, 2), seq_len=st.integers(2, 24), lr=st.floats(1e-5, 1e-2), warmup=st.integers(0, 3),
       keep=st.integers(1, 2), val_every=st.integers(0, 2), seed=st.integers(0, 2**32 - 1))
def test_finetune_runs_with_drawn_values(tiny_hf_with_tokenizer, small_text, workdir, rank, alpha, steps, batch,
                                        accum, seq_len, lr, warmup, keep, val_every, seed):
    hf_dir, _ = tiny_hf_with_tokenizer
    out = workdir / f"ft{next(_count)}"
    res = run_json("finetune", hf_dir, "--text", small_text, "--out", out, "--no-progress", "--val-blocks", "1",
                   "--lora-rank", rank, "--lora-alpha", repr(alpha), "--steps", steps, "--batch-size", batch,
                   "--grad-accum", accum, "--seq-len", seq_len, "--lr", repr(lr), "--warmup-steps", warmup,
                   "--keep", keep, "--save-every", 1, "--val-every", val_every, "--seed", seed)
    assert res["trainable_params"] == lora_params(rank, **TINY)
    assert logged_steps(out) == list(range(1, steps + 1))
    assert math.isfinite(res["final_loss"]) and res["final_loss"] > 0
    assert len([p for p in (out / "checkpoints").iterdir() if p.name.isdigit()]) == min(keep, steps)


@RUN_SETTINGS
@example(ratio=0.5, every=1, warmup=0.0, cooldown=0.0, beta=0.0, steps=2)
@given(ratio=st.sampled_from([0.25, 0.5, 0.75]), every=st.integers(1, 2), warmup=st.floats(0, 0.3),
       cooldown=st.floats(0, 0.3), beta=st.floats(0, 0.99), steps=st.integers(2, 3))
def test_loraprune_runs_with_drawn_values(tiny_hf_with_tokenizer, small_text, workdir, ratio, every, warmup,
                                         cooldown, beta, steps):
    """The KV groups (2 per layer) and MLP channels (48) kept follow the drawn ratio: int(ratio · n) of the n units
    pruned in each layer."""
    hf_dir, _ = tiny_hf_with_tokenizer
    out = workdir / f"pr{next(_count)}"
    run_json("prune", hf_dir, "--text", small_text, "--out", out, "--no-progress", "--method", "loraprune",
             "--steps", steps, "--seq-len", 16, "--val-blocks", 1, "--batch-size", 2, "--ratio", ratio,
             "--prune-every", every, "--warmup-frac", repr(warmup), "--cooldown-frac", repr(cooldown),
             "--beta", repr(beta), "--widths", "uniform", "--exclude-layers", "none", "--attn-unit", "kv_group")
    cfg = json.loads((out / "model" / "jaxprune.json").read_text())["config"]
    assert (cfg["num_kv_heads"], cfg["intermediate_size"]) == (2 - int(ratio * 2), 48 - int(ratio * 48))


@RUN_SETTINGS
@example(hidden=16, heads=2, kv=2, mlp=32, layers=1, tied=False)
@given(hidden=st.sampled_from([8, 16, 24, 32]), heads=st.sampled_from([1, 2, 4]), kv=st.sampled_from([1, 2, 3]),
       mlp=st.integers(1, 40), layers=st.integers(1, 2), tied=st.booleans())
def test_pretrain_model_flags(fixtures, small_text, workdir, hidden, heads, kv, mlp, layers, tied):
    """The model built is the one the flags describe (parameter count by formula), or, where the heads do not
    group (heads % kv) or leave an odd head_dim for RoPE, one line and exit 2."""
    out = workdir / f"pt{next(_count)}"
    argv = ["pretrain", "--text", small_text, "--out", out, "--no-progress", "--steps", 1, "--seq-len", 16,
            "--val-blocks", 1, "--method", "full", "--hidden-size", hidden, "--num-heads", heads, "--num-kv-heads",
            kv, "--intermediate-size", mlp, "--num-layers", layers,
            "--tie-word-embeddings" if tied else "--no-tie-word-embeddings"]
    head_dim = hidden // heads
    if heads % kv or head_dim % 2:
        before = listing(workdir)
        r = main_in_process(*argv)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
        assert listing(workdir) == before
        return
    run_json(*argv)
    cfg = json.loads((out / "model" / "jaxprune.json").read_text())["config"]
    V = cfg["vocab_size"]
    per_layer = hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden + 3 * hidden * mlp + 2 * hidden
    want = V * hidden * (1 if tied else 2) + hidden + layers * per_layer
    from jaxprune.config import ModelConfig
    assert ModelConfig.from_dict(cfg).num_params() == want
    assert (cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"], cfg["intermediate_size"], cfg["num_layers"],
            cfg["tie_word_embeddings"]) == (hidden, heads, kv, mlp, layers, tied)


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory, fixtures):
    path = tmp_path_factory.mktemp("eval") / "t.txt"
    path.write_text(fixtures.train_text.read_text()[:1500])
    return path


@RUN_SETTINGS
@example(seq_len=2, batch=1, max_tokens=None)
@given(seq_len=st.integers(2, 64), batch=st.integers(1, 5), max_tokens=st.one_of(st.none(), st.integers(2, 400)))
def test_eval_perplexity_is_transformers(tiny_hf_with_tokenizer, eval_text, seq_len, batch, max_tokens):
    """Perplexity over the non-overlapping seq-len windows of the first max-tokens tokens (tail dropped), as the
    torch model computes it; a max-tokens below one window is one line and exit 2."""
    import torch
    from transformers import PreTrainedTokenizerFast

    hf_dir, torch_model = tiny_hf_with_tokenizer
    tok = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    ids = np.asarray(tok(eval_text.read_text())["input_ids"])[:max_tokens]
    argv = ["eval", hf_dir, "--text", eval_text, "--seq-len", seq_len, "--batch-size", batch,
            *(["--max-tokens", max_tokens] if max_tokens else [])]
    n = len(ids) // seq_len
    if n == 0:
        r = main_in_process(*argv)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"jaxprune eval: error: text too short: {len(ids)} tokens is less than one window of seq-len {seq_len}"]
        return
    res = run_json(*argv)
    win = torch.as_tensor(ids[: n * seq_len].reshape(n, seq_len))
    with torch.no_grad():
        logits = torch_model(win).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))
    assert (res["windows"], res["tokens"]) == (n, n * (seq_len - 1))
    np.testing.assert_allclose(res["ppl"], float(torch.exp(nll)), rtol=2e-5)


@RUN_SETTINGS
@example(new=0, temperature=0.0, seed=0)
@given(new=st.integers(0, 6), temperature=st.sampled_from([0.0, 0.7, 1.5]), seed=st.integers(0, 2**32 - 1))
def test_generate_returns_the_tokens_asked_for(tiny_hf_with_tokenizer, new, temperature, seed):
    """--max-new-tokens N gives N tokens (the tiny model's EOS never comes first here); greedy ones are
    transformers' greedy ones; the same seed samples the same tokens."""
    import torch

    hf_dir, torch_model = tiny_hf_with_tokenizer
    argv = ["generate", hf_dir, "--prompt", "To be, or", "--max-new-tokens", new, "--temperature",
            repr(temperature), "--seed", seed]
    res = run_json(*argv)
    ids = res["token_ids"]
    assert len(ids) == new
    if temperature == 0.0 and new:
        from transformers import PreTrainedTokenizerFast
        prompt = PreTrainedTokenizerFast.from_pretrained(hf_dir)("To be, or", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = torch_model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert ids == ref[0, prompt.shape[1]:].tolist()
    elif new:
        assert run_json(*argv)["token_ids"] == ids
