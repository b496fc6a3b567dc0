"""`jaxprune finetune` end to end: --config recipes, --merge then `export` to transformers, the NaN
guard, and a real SmolLM2 run (slow)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import numpy as np
import pytest

from conftest import finish_cli, jax_logits, run_cli, start_cli, torch_logits
from jaxprune.cli import main

RECIPE = """\
# a recipe: keys are finetune's flags, spelled with - or _
lora-rank: 4
lora_alpha: 8
steps: 4
batch-size: 2
seq-len: 32
lr: 2e-4          # YAML reads this as a string: it must still become a float
weight-decay: 1e-2
save-every: 2
val-every: 2
val-blocks: 2
merge: true
progress: false
"""
TINY_LORA_PARAMS = 2 * 4 * sum(i + o for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 48), (32, 48),
                                                  (48, 32)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf_with_tokenizer, small_text):
    """Two finetune runs side by side: a --config recipe run with --merge (a subprocess: the recipe's
    precedence reads sys.argv) and a diverging one (in-process, the same CLI code, stderr captured)."""
    model_dir, _ = tiny_hf_with_tokenizer
    root = tmp_path_factory.mktemp("finetune")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    proc = start_cli("finetune", model_dir, "--text", small_text, "--out", root / "config-run",
                     "--config", recipe, "--lr", "5e-3", "--json")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["finetune", str(model_dir), "--text", str(small_text), "--out", str(root / "nan-run"),
                     "--lr", "1e30", "--steps", "8", "--warmup-steps", "1", "--save-every", "1", "--val-every", "0",
                     "--seq-len", "32", "--batch-size", "2", "--lora-rank", "4", "--no-progress"])
    nan = subprocess.CompletedProcess(["finetune"], code, "", err.getvalue())
    return dict(model_dir=model_dir, root=root, recipe=recipe, config=finish_cli(proc), nan=nan)


def lora_model_from_checkpoint(model_dir, run_dir, step, rank, alpha):
    """The run's LoRA model at ``step``: the base + LoRA factors restored from RUN/checkpoints."""
    from jaxprune import load
    from jaxprune.partition import add_lora, combine, partition
    from jaxprune.train import OptimConfig, TrainCheckpoints, TrainState, make_optimizer

    model = load.load_model(model_dir)
    add_lora(model, rank=rank, alpha=alpha)
    graphdef, frozen, trainable, masks = partition(model)
    like = TrainState(trainable, make_optimizer(OptimConfig()).init(trainable), (), masks)
    ckpts = TrainCheckpoints(run_dir / "checkpoints")
    try:
        state, extra = ckpts.restore(step, like)
    finally:
        ckpts.close()
    assert extra["step"] == step
    return combine(graphdef, frozen, state.trainable, state.masks), state


def test_config_recipe_and_command_line_override(runs):
    r = runs["config"]
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    run_dir = runs["root"] / "config-run"
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["lr"] == 5e-3  # the command line wins over the recipe's 2e-4
    assert rec["weight_decay"] == 0.01 and isinstance(rec["weight_decay"], float)  # "1e-2" converted
    assert (rec["lora_rank"], rec["lora_alpha"], rec["steps"], rec["batch_size"], rec["seq_len"]) == (4, 8.0, 4, 2,
                                                                                                       32)
    assert rec["merge"] is True and rec["save_every"] == 2
    assert out["trainable_params"] == TINY_LORA_PARAMS == 3712
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [("val_ppl" in m) for m in metrics] == [False, True, False, True]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert all(np.isfinite(m["loss"]) for m in metrics)


def test_config_unknown_key_and_bad_value_are_one_line_errors(runs, tmp_path, capsys):
    from jaxprune.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nlearning_rate: 1e-3\n")
    r = run_cli("finetune", runs["model_dir"], "--text", "x.txt", "--out", tmp_path / "never", "--config", bad)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == f"jaxprune finetune: error: {bad}: unknown key 'learning_rate'"
    assert not (tmp_path / "never").exists()

    for text, needle in (("steps: many\n", "steps: must be an integer (got 'many')"),
                         ("compute-dtype: float16\n", "'float16' is not one of"),
                         ("model: other\n", "unknown key 'model'"),  # positionals are not recipe keys
                         ("- steps\n", "a recipe is a mapping")):
        bad.write_text(text)
        capsys.readouterr()
        assert main(["finetune", str(runs["model_dir"]), "--text", "x.txt", "--out", str(tmp_path / "never"),
                     "--config", str(bad)]) == 2, text
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and str(bad) in lines[0], (text, lines)
        assert not (tmp_path / "never").exists()


def test_merge_then_export_matches_lora_model(runs, tmp_path):
    """finetune --merge, then `jaxprune export RUN_DIR OUT`: transformers' logits == the LoRA model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxprune import load
    from jaxprune.checkpoint import read_meta

    assert runs["config"].returncode == 0, runs["config"].stderr[-2000:]
    run_dir = runs["root"] / "config-run"
    assert read_meta(run_dir / "model")["lora"] == {}  # merged: no factors left in RUN/model
    lora_model, state = lora_model_from_checkpoint(runs["model_dir"], run_dir, 4, rank=4, alpha=8.0)
    b_norm = max(float(np.abs(np.asarray(l.lora_b[...])).max()) for l in
                 (lora_model.layers[0].self_attn.q_proj, lora_model.layers[1].mlp.down_proj))
    assert b_norm > 1e-4  # B moved: the merge has something to fold

    tokens = np.random.default_rng(0).integers(0, 49152, (2, 16))
    want = jax_logits(lora_model, tokens)
    merged = load.load_model(run_dir)
    np.testing.assert_allclose(jax_logits(merged, tokens), want, rtol=0, atol=1e-5)

    out = tmp_path / "hf-export"
    assert main(["export", str(run_dir), str(out)]) == 0  # `jaxprune export RUN_DIR OUT`, in-process
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base_torch = torch_logits(AutoModelForCausalLM.from_pretrained(runs["model_dir"], dtype=torch.float32).eval(),
                              tokens)
    got = torch_logits(hf_model, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got - base_torch).max() > 1e-4  # the export carries the fine-tuning


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(runs):
    r = runs["nan"]
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    # step 1 has lr 0 (warmup), step 2 applies lr 1e30 after its loss is taken, step 3's loss is not finite
    assert "loss is nan at step 3" in lines[0] or "loss is inf at step 3" in lines[0], lines[0]
    assert "Last good checkpoint: step 2" in lines[0], lines[0]
    run_dir = runs["root"] / "nan-run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run_dir / "model").exists()
    _, state = lora_model_from_checkpoint(runs["model_dir"], run_dir, 2, rank=4, alpha=16.0)
    import jax
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


@pytest.mark.slow
def test_finetune_smollm2_two_steps(fixtures, small_text, tmp_path, capsys, smollm2_torch):
    """Two steps on the real SmolLM2-135M: the step-1 loss is the base model's own NLL on that batch
    (B = 0), here computed by transformers' torch model; step 2 moved only a tiny warmup step."""
    import torch

    from jaxprune import load
    from jaxprune.data import Blocks, token_stream

    run_dir = tmp_path / "smol"
    assert main(["finetune", str(fixtures.hf_dir), "--text", str(small_text), "--out", str(run_dir), "--steps", "2",
                 "--seq-len", "32", "--batch-size", "1", "--save-every", "2", "--val-every", "0", "--no-progress",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    assert out["final_loss"] == metrics[-1]["loss"]
    assert out["trainable_params"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)) == 2_442_240

    blocks = Blocks.from_stream(token_stream(small_text, load.load_tokenizer(fixtures.hf_dir)), 32, seed=0)
    nll = []
    for step in (0, 1):
        batch = torch.as_tensor(blocks.batch(step, 1), dtype=torch.long)
        with torch.no_grad():
            nll.append(float(smollm2_torch(batch, labels=batch).loss))
    assert 0.5 < nll[0] < 8  # a trained model on English text
    assert metrics[0]["loss"] == pytest.approx(nll[0], abs=1e-3)
    assert metrics[1]["loss"] == pytest.approx(nll[1], abs=0.05)
