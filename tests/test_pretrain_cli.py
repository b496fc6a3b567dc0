"""`jaxprune pretrain` end to end (issue 8): a SLoPe run resumed mid-run (across a mask refresh and the
adapters switching on) is bitwise the uninterrupted one; an SLTrain run from the shipped recipe keeps
its support across steps and checkpoints; `jaxprune export RUN_DIR` gives transformers logits equal
to the trained SLTrain model's; bad input is one line with no run dir left behind."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from conftest import REPO, flat_params, jax_logits, torch_logits
from conftest import run_main_json as run
from jaxprune.checkpoint import restore_pytree
from jaxprune.cli import main

# every linear 32 x 32: one shape, so the eager ops of model construction compile once
TINY = ["--hidden-size", "32", "--intermediate-size", "32", "--num-layers", "2", "--num-heads", "4",
        "--num-kv-heads", "4", "--seq-len", "32", "--batch-size", "2", "--lora-rank", "4", "--lora-alpha", "8",
        "--warmup-steps", "1", "--lr", "1e-2", "--val-blocks", "2", "--no-progress", "--json"]
SLOPE = ["--method", "slope", "--steps", "8", "--save-every", "4", "--val-every", "0", "--mask-change-freq", "2",
         "--mask-refresh-frac", "0.5", "--adapter-frac", "0.25", "--adapter-rank", "4"]


def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def trajectory(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"], r.get("val_ppl")) for r in metrics(run_dir)]


@pytest.fixture(scope="module")
def common(fixtures, small_text):
    return ["--text", str(small_text), "--tokenizer", str(fixtures.hf_dir), *TINY]


def test_slope_resume_mid_run_is_bitwise_the_same(tmp_path, common, capsys):
    run_dir, ref = tmp_path / "run", tmp_path / "ref"
    out = run(capsys, "pretrain", *common, *SLOPE, "--out", run_dir)
    assert out["adapter_start_step"] == 6 and [r["step"] for r in metrics(run_dir)] == list(range(1, 9))
    assert out["params_stored"] < out["trainable_params"]  # half of every SLoPe weight is pruned
    shutil.copytree(run_dir, ref)  # the uninterrupted run
    # "killed" right after the step-4 checkpoint: later checkpoints and outputs gone, the log runs ahead
    for name in ("checkpoints/8", "model", "pretrain.json", "loss.png"):
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    out2 = run(capsys, "pretrain", *common, *SLOPE, "--out", run_dir, "--resume")
    assert trajectory(run_dir) == trajectory(ref)  # steps 5-8 re-run: refresh at 6, adapters on for 7-8
    assert out2["final_loss"] == out["final_loss"]
    got, want = flat_params(run_dir / "model"), flat_params(ref / "model")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    # RUN_DIR/model is dense: plain kernels, no factors, no element masks; the 2:4 zeros are in the weights
    from jaxprune.checkpoint import read_meta
    meta = read_meta(ref / "model")
    assert meta["lora"] == {} and meta["weight_masks"] == [] and meta["pretrain_method"] == "slope"
    assert not any(n in k for k in want for n in ("lora", "nm_mask", "backward_mask", "adapter_on"))


def test_slope_impl_pallas_trains_as_xla(tmp_path, common, capsys):
    """`pretrain --method slope --impl pallas`: the 2:4 forward and the double-pruned input gradient run
    through the masked low-rank kernel (interpret mode here); losses, gradient norms and the final dense
    weights equal the XLA run's (fp32, 1e-5). `auto` is XLA on CPU."""
    short = [*SLOPE, "--steps", "3", "--save-every", "3", "--mask-change-freq", "1"]
    xla = run(capsys, "pretrain", *common, *short, "--out", tmp_path / "xla")
    pallas = run(capsys, "pretrain", *common, *short, "--impl", "pallas", "--out", tmp_path / "pallas")
    assert (xla["impl"], pallas["impl"]) == ("xla", "pallas")
    for a, b in zip(trajectory(tmp_path / "xla"), trajectory(tmp_path / "pallas"), strict=True):
        assert a[0] == b[0] and np.allclose(a[1:3], b[1:3], rtol=1e-5, atol=1e-6), (a, b)
    got, want = flat_params(tmp_path / "pallas" / "model"), flat_params(tmp_path / "xla" / "model")
    assert all(np.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want)
    # (that the kernel really runs is test_pretrain_slope's jaxpr count; at 32 x 32 it is one tile and
    # the results here come out bitwise equal)


@pytest.fixture(scope="module")
def sltrain_run(tmp_path_factory, common):
    """4 SLTrain steps from configs/pretrain_tiny.yaml (its model size overridden to the tiny one)."""
    import contextlib
    import io

    run_dir = tmp_path_factory.mktemp("pretrain") / "sltrain"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["pretrain", "--config", "configs/pretrain_tiny.yaml", *common, "--method", "sltrain",
                     "--steps", "4", "--save-every", "2", "--val-every", "2", "--keep", "2", "--out", str(run_dir)])
    assert code == 0
    return run_dir, json.loads(buf.getvalue().splitlines()[-1])


def sltrain_model_at(run_dir, step):
    """The SLTrain model of the run at ``step``: rebuilt from run.json and the checkpointed trainable."""
    from jaxprune.partition import combine
    from jaxprune.commands.pretrain import load_tokenizer, method_config, model_config
    from jaxprune.pretrain.methods import build_model, make_pretrain_optimizer, partition_pretrain
    from jaxprune.train import OptimConfig, TrainCheckpoints, TrainState
    import argparse

    args = argparse.Namespace(**json.loads((run_dir / "run.json").read_text()))
    cfg = model_config(args, load_tokenizer(args.tokenizer))
    graphdef, frozen, trainable, masks = partition_pretrain(build_model(cfg, method_config(args), seed=args.seed))
    like = TrainState(trainable, make_pretrain_optimizer(OptimConfig(), trainable).init(trainable), (), masks)
    ckpts = TrainCheckpoints(run_dir / "checkpoints")
    try:
        state, _ = ckpts.restore(step, like)
    finally:
        ckpts.close()
    return combine(graphdef, frozen, state.trainable, state.masks)


def test_sltrain_recipe_run_counts_and_support(sltrain_run):
    from jaxprune.pretrain.sltrain import SparseLowRankLinear, sltrain_param_count

    run_dir, out = sltrain_run
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["sparse_ratio"] == 0.03 and rec["mask_change_freq"] == 20  # from the recipe
    assert rec["hidden_size"] == 32 and rec["lr"] == 1e-2  # the command line wins
    # parameter count: dense embeddings (tied) + norms, the paper's formula for every attention / MLP linear
    linears = 2 * 7 * sltrain_param_count(32, 32, 4, 0.03)  # r (d_in + d_out) + ⌊δ d_in d_out⌋ per linear
    assert linears == 14 * (4 * (32 + 32) + int(0.03 * 32 * 32)) == 14 * 286
    assert out["linear_params_stored"] == linears
    assert out["trainable_params"] == 49152 * 32 + 32 + 2 * 2 * 32 + linears

    # the support: saved once, equal to the rebuilt one, and the trained weights live on it at steps 2 and 4
    from flax import nnx

    from jaxprune.pretrain.sltrain import restore_support
    from jaxprune.pretrain.methods import partition_pretrain

    at2, at4 = sltrain_model_at(run_dir, 2), sltrain_model_at(run_dir, 4)
    frozen = partition_pretrain(at4)[1]
    saved = restore_pytree(run_dir / "support")
    assert len(saved) == len(jax.tree.leaves(frozen)) == 14
    assert all(np.array_equal(saved[k], v) for k, v in zip(sorted(saved), jax.tree.leaves(frozen)))
    back = restore_support(run_dir, jax.tree.map(np.zeros_like, frozen))  # what --resume does
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(frozen)))
    lins2 = {p: l for p, l in nnx.iter_graph(at2) if isinstance(l, SparseLowRankLinear)}
    for path, lin in ((p, l) for p, l in nnx.iter_graph(at4) if isinstance(l, SparseLowRankLinear)):
        idx = np.asarray(lin.sparse_index[...])
        assert np.array_equal(np.asarray(lins2[path].sparse_index[...]), idx)
        assert not np.array_equal(np.asarray(lins2[path].sparse_values[...]), np.asarray(lin.sparse_values[...]))
        resid = np.asarray(lin.merged_kernel() - lin.lora_scale * lin.lora_a[...] @ lin.lora_b[...]).reshape(-1)
        off = np.ones(resid.size, bool)
        off[idx] = False
        assert not np.any(resid[off])  # W - s·A@B is zero off the support ...
        np.testing.assert_allclose(resid[idx], np.asarray(lin.sparse_values[...]), atol=1e-6)  # ... S on it
    # RUN_DIR/model holds the merged dense weight of the final step
    dense = flat_params(run_dir / "model")
    q = at4.layers[1].self_attn.q_proj
    np.testing.assert_allclose(dense["['layers']['1']['self_attn']['q_proj']['kernel']"], np.asarray(q.merged_kernel()),
                               rtol=0, atol=1e-7)


def test_export_logits_equal_the_sltrain_model(sltrain_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, _ = sltrain_run
    model = sltrain_model_at(run_dir, 4)
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 16))
    want = jax_logits(model, tokens)
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0  # `jaxprune export RUN_DIR OUT`
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings and hf.config.vocab_size == 49152
    np.testing.assert_allclose(torch_logits(hf, tokens), want, rtol=0, atol=1e-4)


def test_eval_run_dir_is_the_sltrain_models_perplexity(sltrain_run, small_text, capsys):
    from jaxprune import load
    from jaxprune.evaluate import perplexity, tokenize_text

    run_dir, _ = sltrain_run
    got = run(capsys, "eval", run_dir, "--text", small_text, "--seq-len", "32", "--max-tokens", "640", "--json")
    tokens = tokenize_text(load.load_tokenizer(run_dir), small_text.read_text())
    want = perplexity(sltrain_model_at(run_dir, 4), tokens, seq_len=32, max_tokens=640, progress=False)
    assert got["tokens"] == want["tokens"] == 20 * 31
    assert abs(got["ppl"] / want["ppl"] - 1) < 1e-5


@pytest.mark.parametrize("extra, needle", [
    (["--method", "sltrain", "--sparse-ratio", "0"], "argument --sparse-ratio: must be a number in (0, 1) (got 0)"),
    (["--method", "slope", "--hidden-size", "36", "--num-heads", "2", "--num-kv-heads", "2",
      "--intermediate-size", "34"], "divisible by 4"),
    (["--method", "lowrank", "--targets", "nothing_matches"], "matches no decoder linear"),
    (["--method", "full", "--tokenizer", "/nonexistent/tok"], "/nonexistent/tok: no such tokenizer dir"),
])
def test_bad_input_is_one_line_and_leaves_no_run_dir(common, tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    capsys.readouterr()
    assert main(["pretrain", *common, "--steps", "2", *extra, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxprune pretrain: error:") and needle in lines[0], lines
    assert not out.exists()


def test_plays_tokenizer_is_deterministic_lossless_and_sets_the_vocab(fixtures, small_text, tmp_path, capsys):
    """`--tokenizer plays-bpe-4096`: the fixture's byte-level BPE (4,096 tokens, trained on the training plays)
    is rebuilt bitwise from the same text, decodes the held-out plays back exactly, and a pretraining run with
    it has a 4,096 x hidden embedding."""
    import importlib.util
    from types import SimpleNamespace

    from jaxprune import load
    from jaxprune.commands.pretrain import load_tokenizer

    spec = importlib.util.spec_from_file_location("fixtures_script", REPO / "scripts" / "fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    again = SimpleNamespace(train_text=fixtures.train_text, plays_tokenizer=tmp_path / "tok")
    script.train_plays_tokenizer(again)
    assert (again.plays_tokenizer / "tokenizer.json").read_bytes() == \
        (fixtures.plays_tokenizer / "tokenizer.json").read_bytes()
    tok = load_tokenizer("plays-bpe-4096")
    assert len(tok) == tok.vocab_size == 4096
    text = fixtures.heldout_text.read_text()[:20_000]
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text and len(ids) < len(text) / 2.5  # lossless, ~2.9 characters a token
    out = tmp_path / "run"
    args = ["--text", str(small_text), *TINY, "--tokenizer", "plays-bpe-4096", "--method", "full", "--steps", "1",
            "--val-every", "0", "--out", str(out)]
    run(capsys, "pretrain", *args)
    assert flat_params(out / "model")["['embed_tokens']"].shape == (4096, 32)
    assert len(load.load_tokenizer(out / "model")) == 4096


def test_run_pretrain_library_call_without_flags(fixtures, small_text, tmp_path):
    """`pretrain.pipeline.run_pretrain` of typed configs alone (no argparse): the method's own summary key comes
    from its registered plan, a schedule option of another method is never checked, and a bad one of the
    run's method is a UserError naming it before any run dir exists; run.json defaults to the config's fields."""
    from jaxprune.errors import UserError
    from jaxprune.pretrain.methods import MethodConfig
    from jaxprune.pretrain.pipeline import PretrainConfig, TinyModelConfig, run_pretrain
    from jaxprune.pretrain.switchlora import SwitchOptions
    from jaxprune.runs import TrainConfig

    run = TrainConfig(text=str(small_text), out=str(tmp_path / "run"), steps=2, batch_size=2, seq_len=32, lr=1e-2,
                      warmup_steps=1, save_every=2, val_every=0, val_blocks=1, progress=False, quiet=True)
    tiny = TinyModelConfig(hidden_size=32, intermediate_size=32, num_layers=1, num_heads=4, num_kv_heads=4)
    bad_switch = SwitchOptions(interval=4, freeze_steps=3)  # interval < 2 x freeze: SwitchLoRA's schedule refuses
    with pytest.raises(UserError, match="must be >= 2 x"):
        run_pretrain(PretrainConfig(run=run, method=MethodConfig("switchlora", rank=4), model=tiny,
                                    switch=bad_switch, tokenizer=str(fixtures.hf_dir)))
    assert not (tmp_path / "run").exists()
    out = run_pretrain(PretrainConfig(run=run, method=MethodConfig("lowrank", rank=4), model=tiny,
                                      switch=bad_switch, tokenizer=str(fixtures.hf_dir)))
    assert out["method"] == "lowrank" and out["impl"] is None and "switches_scheduled" not in out
    assert json.loads((tmp_path / "run" / "pretrain.json").read_text()) == out
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["kind"] == "pretrain" and rec["method"]["rank"] == 4 and "resume" not in rec["run"]
    with pytest.raises(UserError, match="TinyModelConfig.num_layers = 0"):
        TinyModelConfig(num_layers=0)
