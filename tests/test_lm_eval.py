"""`jaxprune lm-eval` against lm-evaluation-harness's own `hf` backend, and `eval --dataset`.

A tiny random LLaMA (SmolLM2's tokenizer) is converted to a jaxprune checkpoint and exported back with
``hf.export_hf``; ``jaxprune lm-eval CKPT`` must give lm-eval's ``hf`` backend's numbers on the export, request
by request (fp32), on the local task family (multiple choice, cloze, rolling).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_hf_llama, run_cli

pytest.importorskip("lm_eval")

OFFLINE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_DATASETS_OFFLINE": "", "HF_HUB_OFFLINE": ""}  # no hub: probe fails
MAX_LEN = 64  # short: contexts get left-truncated and passages span several rolling windows
LIMIT = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory, fixtures):
    """(jaxprune checkpoint dir, its HF export dir) of a tiny random model with large weights (non-flat logits)."""
    from jaxprune import checkpoint, hf, load

    root = tmp_path_factory.mktemp("lmeval")
    src, _ = make_hf_llama(root, 3, vocab_size=49152, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                           num_key_value_heads=2, initializer_range=0.3)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures.hf_dir / name, src / name)
    model, tok = load.load_model(src), load.load_tokenizer(src)
    checkpoint.save_model(model, root / "ckpt", tokenizer=tok)
    hf.export_hf(model, root / "export", tokenizer=tok)
    return root / "ckpt", root / "export"


@pytest.fixture(scope="module")
def hf_lm(models, monkeypatch_module):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(models[1]), dtype="float32", device="cpu", batch_size=8, max_length=MAX_LEN)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}.items():
        mp.setenv(k, v)
    yield mp
    mp.undo()


def test_lm_eval_equals_the_hf_backend_on_the_export(models, hf_lm, tmp_path):
    """Same accuracy and per-request log-likelihoods (within 1e-4) and is_greedy as lm-eval's `hf` backend."""
    from jaxprune import lm_eval_tasks

    out = tmp_path / "res.json"
    r = run_cli("lm-eval", models[0], "--tasks", "shakespeare", "--limit", LIMIT, "--max-length", MAX_LEN,
                "--batch-size", 8, "--output", out, "--json", env=OFFLINE)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["offline"] is True
    assert len(got["buckets"]) <= 3 and max(got["buckets"]) == MAX_LEN  # a handful of compiles, not one per request
    mine = json.loads(out.read_text())["per_request"]

    tm, _ = lm_eval_tasks.find_tasks(["shakespeare"])
    tasks = lm_eval_tasks.load_tasks(tm, ["shakespeare"], offline=True)
    ref = lm_eval_tasks.evaluate(hf_lm, tasks, tm, limit=LIMIT)
    want_metrics, want = lm_eval_tasks.metrics(ref), json.loads(json.dumps(lm_eval_tasks.per_request(ref)))

    assert set(mine) == set(want) == {"shakespeare_next_line", "shakespeare_last_word", "shakespeare_passages"}
    for task in want:
        assert [d["doc_id"] for d in mine[task]] == [d["doc_id"] for d in want[task]] == list(range(LIMIT))
        (lls_a, greedy_a), (lls_b, greedy_b) = answers(mine[task]), answers(want[task])
        assert len(lls_a) == len(lls_b) == LIMIT * {"shakespeare_next_line": 4}.get(task, 1)
        assert greedy_a == greedy_b
        # rolling: a sum over a whole passage (hundreds of tokens); 1e-4 per 100 nats
        tol = 1e-4 if task != "shakespeare_passages" else 1e-4 * max(1.0, np.abs(lls_b).max() / 100)
        np.testing.assert_allclose(lls_a, lls_b, rtol=0, atol=tol)
    for task, metric in (("shakespeare_next_line", "acc"), ("shakespeare_next_line", "acc_norm"),
                         ("shakespeare_last_word", "acc")):
        assert got["tasks"][task][metric] == want_metrics[task][metric]
    # not a degenerate model: it prefers different choices for different documents
    assert 0 < got["tasks"]["shakespeare_next_line"]["acc"] < 1
    np.testing.assert_allclose(got["tasks"]["shakespeare_passages"]["bits_per_byte"],
                               want_metrics["shakespeare_passages"]["bits_per_byte"], rtol=1e-6)


def test_loglikelihood_rolling_equals_eval_total_nll(models, tmp_path, capsys):
    """The rolling log-likelihood of a text is minus `jaxprune eval`'s total NLL over the same tokens: eval reads
    the prefix token the harness puts first, in one window as long as the text."""
    from lm_eval.api.instance import Instance

    from jaxprune import lm_eval_model, load

    text = json.loads((load_dir() / "passages.test.jsonl").read_text().splitlines()[0])["text"][:300]
    model, tok = load.load_model(models[0]), load.load_tokenizer(models[0])
    lm = lm_eval_model.make_lm(model, tok, batch_size=2, progress=False)
    n = len(lm.tok_encode(text))
    assert 2 * 16 < n < lm.max_length
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]

    path = tmp_path / "t.txt"
    path.write_text(tok.decode([lm.prefix_token_id]) + text)
    code, out, err = cli(capsys, "eval", models[0], "--text", path, "--seq-len", n + 1, "--json")
    assert code == 0, err[-2000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["tokens"] == n and res["windows"] == 1
    assert abs(-rolling - res["nll"] * res["tokens"]) < 1e-4 * n


def test_generate_until_equals_the_hf_backend(models, hf_lm):
    from lm_eval.api.instance import Instance

    from jaxprune import lm_eval_model, load

    lm = lm_eval_model.make_lm(load.load_model(models[0]), load.load_tokenizer(models[0]), progress=False)
    reqs = [Instance("generate_until", {}, ("MACBETH.\nIs this a dagger", {"until": ["\n\n"], "max_gen_toks": 12}), 0),
            Instance("generate_until", {}, ("To be, or not", {"until": ["."], "max_gen_toks": 6}), 1)]
    got = lm.generate_until(reqs)
    assert got == hf_lm.generate_until(reqs, disable_tqdm=True)
    assert any(got)


def test_bad_tasks_exit_2_with_one_line(models, tmp_path, capsys, offline):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    broken_type = tmp_path / "badtype"
    broken_type.mkdir()
    (broken_type / "t.yaml").write_text("task: wrong_type\ndataset_path: json\noutput_type: nonsense\n"
                                        "test_split: test\ndoc_to_text: x\ndoc_to_target: y\n")
    cases = {
        ("--tasks", "shakespeare_nextline"): "unknown task 'shakespeare_nextline'",
        ("--tasks", "shakespeare_next_line", "--include-path", bad): "broken.yaml: line 3: not valid YAML",
        ("--tasks", "wrong_type", "--include-path", broken_type): "task wrong_type: cannot be built",
        ("--tasks", "arc_easy"): "task arc_easy needs a download from the hub",
        ("--tasks", ","): "--tasks: give at least one task name",
    }
    for args, msg in cases.items():
        code, _, err = cli(capsys, "lm-eval", models[0], *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and msg in lines[0], (args, err[-2000:])


def test_eval_dataset_equals_eval_text(models, tmp_path, capsys):
    """`eval --dataset FILE` reads the rows' text joined by blank lines, like `--text` on that text."""
    rows = [json.loads(line)["text"] for line in
            (load_dir() / "passages.test.jsonl").read_text().splitlines()[:6]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(rows)))
    (tmp_path / "d.txt").write_text("\n\n".join(rows))
    flags = ("--seq-len", 64, "--json")
    ra, rb = (cli(capsys, "eval", models[0], *src, *flags) for src in (("--dataset", f"{data}:train"),
                                                                       ("--text", tmp_path / "d.txt")))
    assert ra[0] == rb[0] == 0, ra[2][-2000:] + rb[2][-2000:]
    ra, rb = (json.loads(r[1].strip().splitlines()[-1]) for r in (ra, rb))
    assert ra["tokens"] == rb["tokens"] > 0 and ra["ppl"] == pytest.approx(rb["ppl"], rel=1e-6)
    for spec, msg in ((f"{data}:nosuch", "cannot be loaded"), ("a:b:c:d", "expected NAME[:CONFIG][:SPLIT]")):
        code, _, err = cli(capsys, "eval", models[0], "--dataset", spec)
        assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, err[-2000:]


def cli(capsys, *args) -> tuple[int, str, str]:
    """``jaxprune ARGS`` in this process (no interpreter start, compiled functions shared): (code, out, err)."""
    from jaxprune.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable for in-process runs; offline-mode switches set by the command are undone after."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)


def answers(docs: list[dict]) -> tuple[np.ndarray, list]:
    """Every request's log-likelihood and is_greedy (None for rolling) from ``per_request`` rows."""
    flat = [r[0] for d in docs for r in d["resps"]]
    return (np.array([x[0] if isinstance(x, list) else x for x in flat], np.float64),
            [x[1] if isinstance(x, list) else None for x in flat])


def load_dir():
    from jaxprune.lm_tasks import TASKS_DIR
    return TASKS_DIR
