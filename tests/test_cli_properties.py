"""Property test (hypothesis): any values of any flags of every command end in exit 0, or in exit 2 with
exactly one line on stderr and no new file; never a traceback, never exit 1.

Each example runs ``jaxprune.cli.main`` in this process (an uncaught exception fails the test with its
traceback) on a tiny model; values are drawn from good ones (small, so successful runs take seconds)
and from bad ones (zero, negative, NaN, inf, wrong type, out of range).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jaxprune.cli import main

BAD_INT = ["0", "-1", "-3", "nan", "inf", "1.5", "two", "", "1e9x"]
BAD_FLOAT = ["nan", "inf", "-inf", "-1", "-0.5", "x", ""]
BAD_FRACTION = ["1", "1.5", "-0.1", "nan", "inf", "x"]


def flag(name: str, good: list[str], bad: list[str]):
    """(name, value): a good value or a bad one, even odds."""
    return st.tuples(st.just(name), st.one_of(st.sampled_from(good), st.sampled_from(bad)))


def some(*flags):
    """Up to three of ``flags`` with drawn values (so about a third of the examples are all good)."""
    return st.lists(st.one_of(*flags), max_size=3)


RUN_FLAGS = [
    flag("--lora-rank", ["2", "4"], BAD_INT),
    flag("--lora-alpha", ["8", "16.0"], BAD_FLOAT + ["0"]),
    flag("--steps", ["1", "2"], BAD_INT),
    flag("--batch-size", ["1", "2"], BAD_INT),
    flag("--grad-accum", ["1", "2"], BAD_INT),
    flag("--seq-len", ["16", "32"], BAD_INT + ["1", "100000"]),
    flag("--lr", ["1e-3", "2e-4"], BAD_FLOAT + ["0"]),
    flag("--warmup-steps", ["0", "1"], ["-1", "x", "nan"]),
    flag("--weight-decay", ["0", "0.1"], BAD_FLOAT),
    flag("--clip-norm", ["0", "1"], BAD_FLOAT),
    flag("--save-every", ["1", "5"], BAD_INT),
    flag("--keep", ["1", "2"], BAD_INT),
    flag("--val-every", ["0", "1"], ["-1", "x", "inf"]),
    flag("--val-blocks", ["1", "2"], BAD_INT),
    flag("--seed", ["0", "3"], ["-1", "x", "nan", "99999999999"]),
]
PRUNE_FLAGS = [
    flag("--ratio", ["0.25", "0.5"], BAD_FRACTION),
    flag("--prune-every", ["1", "2"], BAD_INT),
    flag("--warmup-frac", ["0", "0.1"], BAD_FRACTION),
    flag("--cooldown-frac", ["0", "0.1"], BAD_FRACTION),
    flag("--beta", ["0.9"], BAD_FRACTION),
    flag("--calib-samples", ["2"], BAD_INT),
    flag("--calib-len", ["8", "16"], BAD_INT + ["1"]),
    flag("--method", ["loraprune", "l2", "random", "llm-pruner"], ["nope"]),
]
PRETRAIN_FLAGS = [
    flag("--hidden-size", ["16", "32"], BAD_INT),
    flag("--intermediate-size", ["32"], BAD_INT),
    flag("--num-layers", ["1", "2"], BAD_INT),
    flag("--num-heads", ["2", "4"], BAD_INT),
    flag("--num-kv-heads", ["1", "2", "3"], BAD_INT),
    flag("--sparse-ratio", ["0.05"], BAD_FRACTION + ["0"]),
    flag("--method", ["full", "lowrank", "sltrain", "slope"], ["nope"]),
    flag("--adapter-frac", ["0", "0.5"], BAD_FRACTION[1:]),
    flag("--mask-change-freq", ["1"], BAD_INT),
]
EVAL_FLAGS = [
    flag("--seq-len", ["16", "32"], BAD_INT + ["1", "100000"]),
    flag("--batch-size", ["1", "3"], BAD_INT),
    flag("--max-tokens", ["64", "200"], BAD_INT + ["1"]),
]
GENERATE_FLAGS = [
    flag("--max-new-tokens", ["0", "3"], ["-1", "x", "nan"]),
    flag("--temperature", ["0", "0.7"], BAD_FLOAT),
    flag("--seed", ["0", "5"], ["-1", "x"]),
]


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


_count = itertools.count()


def check(argv, workdir, capsys, must_succeed: bool = False):
    """Run one command; assert the contract. Returns the exit code."""
    out_root = workdir / f"ex{next(_count)}"
    out_root.mkdir()
    argv = [str(a).replace("{OUT}", str(out_root / "out")) for a in argv]
    before = listing(workdir)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err)
    if must_succeed:
        assert code == 0, (argv, err)
    if code == 2:
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1, (argv, err)
        assert "error" in lines[0], (argv, err)
        assert listing(workdir) == before, (argv, err)
    return code


def flags_of(drawn) -> list[str]:
    return [x for name, value in drawn for x in (name, value)]


SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@example([])  # every default: must succeed
@given(some(*RUN_FLAGS))
def test_finetune_flags(tiny_hf_with_tokenizer, small_text, workdir, capsys, drawn):
    hf_dir, _ = tiny_hf_with_tokenizer
    check(["finetune", hf_dir, "--text", small_text, "--out", "{OUT}", "--no-progress", "--steps", "1",
           "--seq-len", "16", "--val-blocks", "1", *flags_of(drawn)], workdir, capsys, must_succeed=not drawn)


@SETTINGS
@example([])  # every default: must succeed
@given(some(*PRUNE_FLAGS, *RUN_FLAGS[2:7]))
def test_prune_flags(tiny_hf_with_tokenizer, small_text, workdir, capsys, drawn):
    hf_dir, _ = tiny_hf_with_tokenizer
    check(["prune", hf_dir, "--text", small_text, "--out", "{OUT}", "--no-progress", "--steps", "2",  # LoRAPrune's
           "--seq-len", "16", "--val-blocks", "1", "--method", "loraprune", "--prune-every", "1",  # flags: its run
           *flags_of(drawn)], workdir, capsys, must_succeed=not drawn)


@SETTINGS
@example([])  # every default: must succeed
@given(some(*PRETRAIN_FLAGS, *RUN_FLAGS[:4]))
def test_pretrain_flags(fixtures, small_text, workdir, capsys, drawn):
    check(["pretrain", "--text", small_text, "--out", "{OUT}", "--no-progress", "--steps", "1", "--seq-len", "16",
           "--hidden-size", "16", "--intermediate-size", "32", "--num-layers", "1", "--num-heads", "2",
           "--num-kv-heads", "2", "--val-blocks", "1", *flags_of(drawn)], workdir, capsys, must_succeed=not drawn)


@SETTINGS
@example([])  # every default: must succeed
@given(some(*EVAL_FLAGS))
def test_eval_flags(tiny_hf_with_tokenizer, small_text, workdir, capsys, drawn):
    hf_dir, _ = tiny_hf_with_tokenizer
    check(["eval", hf_dir, "--text", small_text, "--max-tokens", "64", "--seq-len", "32", *flags_of(drawn)], workdir, capsys, must_succeed=not drawn)


@SETTINGS
@example([])  # every default: must succeed
@given(some(*GENERATE_FLAGS))
def test_generate_flags(tiny_hf_with_tokenizer, workdir, capsys, drawn):
    hf_dir, _ = tiny_hf_with_tokenizer
    check(["generate", hf_dir, "--prompt", "To be", "--max-new-tokens", "2", *flags_of(drawn)], workdir, capsys, must_succeed=not drawn)
