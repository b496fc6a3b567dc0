"""Issue 19: `prune --distill`: recovery on (1-a)·CE + a·T²·KL(teacher ‖ student), the teacher being the unpruned
frozen base (every mask on, LoRA off) computed in the same step."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.cli import main
from jaxprune.config import tiny_config
from jaxprune.layers import Mask
from jaxprune.partition import partition
from jaxprune.train import DistillConfig, distillation_loss, make_loss_fn
from jaxprune.weights import linears, model_arrays, model_from_arrays

from conftest import make_hf_llama, random_llama, torch_logits


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_distill(student, teacher, tokens, alpha, T):
    s, t = student[:, :-1].astype(np.float64), teacher[:, :-1].astype(np.float64)
    ls = _np_log_softmax(s)
    ce = -np.take_along_axis(ls, tokens[:, 1:, None], -1).mean()
    ps, pt = _np_log_softmax(s / T), _np_log_softmax(t / T)
    kl = (np.exp(pt) * (pt - ps)).sum(-1).mean()
    return (1 - alpha) * ce + alpha * T * T * kl


@pytest.mark.parametrize("alpha,T", [(0.5, 1.0), (1.0, 2.0), (0.0, 1.0)])
def test_distillation_loss_matches_numpy(alpha, T):
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 7, 11)).astype(np.float32), rng.standard_normal((2, 7, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 7))
    got, n = distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(tokens), alpha, T)
    assert float(n) == 12
    assert float(got) == pytest.approx(_np_distill(s, t, tokens, alpha, T), rel=1e-5)


def test_teacher_is_the_unpruned_base():
    """With LoRA (B != 0) and half the heads and channels masked, the step's loss equals the formula on the
    student's logits and the logits of the same base with no LoRA and no mask; with everything on and B = 0 the
    student is the teacher and the KL term vanishes."""
    cfg = tiny_config()
    model = random_llama(cfg, seed=1, lora={".*": (4, 8.0)}, lora_b_std=0.1)
    arrays = {p: v for p, v in model_arrays(model).items() if p[-1] not in ("lora_a", "lora_b")}
    base = model_from_arrays(cfg, arrays)  # the same base weights, no LoRA, every mask on
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12))
    graphdef, frozen, trainable, masks = partition(model)
    pruned = jax.tree.map(lambda m: m.at[::2].set(False), masks)
    loss_fn = make_loss_fn(graphdef, distill=DistillConfig(alpha=0.5, temperature=2.0))
    got, _ = jax.jit(loss_fn)(trainable, frozen, pruned, jnp.asarray(tokens))
    student = nnx.merge(graphdef, frozen, trainable, pruned)(jnp.asarray(tokens))
    teacher = base(jnp.asarray(tokens))
    assert float(got) == pytest.approx(_np_distill(np.asarray(student), np.asarray(teacher), tokens, 0.5, 2.0),
                                       rel=1e-5)
    zero_b = jax.tree.map(jnp.zeros_like, trainable)
    kl_only = make_loss_fn(graphdef, distill=DistillConfig(alpha=1.0))
    assert abs(float(jax.jit(kl_only)(zero_b, frozen, masks, jnp.asarray(tokens))[0])) < 1e-6
    assert isinstance(next(iter(nnx.to_flat_state(nnx.state(model, Mask))))[1], Mask)


@pytest.fixture(scope="module")
def strong_hf(tmp_path_factory, fixtures):
    """(dir, torch model): a tiny random LLaMA with SmolLM2's tokenizer whose pruning shows in the distributions.
    With HF's init (std 0.02) the logits are ~0.1, every distribution is near uniform over the 49k tokens, and the
    KL between pruned and unpruned is 1e-5 of the objective; std 0.2 and an lm_head 10x larger give logits of
    order 10."""
    import shutil

    import torch

    out, model = make_hf_llama(tmp_path_factory.mktemp("strong"), 0, vocab_size=49152, hidden_size=32,
                               intermediate_size=48, initializer_range=0.2)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixtures.hf_dir / name, out / name)
    return out, model


def first_batch(model_dir, text, seq_len: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """The training batch of step 1 (the runs' data: ``data.Blocks`` over the text's token stream)."""
    from jaxprune import load
    from jaxprune.data import Blocks, token_stream

    blocks = Blocks.from_stream(token_stream(text, load.load_tokenizer(model_dir)), seq_len, seed=seed)
    return blocks.batch(0, batch_size)


def check_first_loss(run_dir, student, teacher, batch, alpha, T):
    """The run's step-1 loss (computed before any update; LoRA's B = 0) is the objective formed in numpy from the
    two models' logits; a teacher equal to the student, a = 0.5 (the default) or T = 1 in its place all differ
    from it by 10x the tolerance."""
    loss = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    want = _np_distill(student, teacher, batch, alpha, T)
    assert loss == pytest.approx(want, rel=1e-4)
    for wrong in (_np_distill(student, student, batch, alpha, T), _np_distill(student, teacher, batch, 0.5, T),
                  _np_distill(student, teacher, batch, alpha, 1.0)):
        assert abs(wrong / want - 1) > 1e-3, (wrong, want)  # 10x the tolerance above


def test_cli_prune_distill(strong_hf, small_text, tmp_path):
    """`prune --distill` with a = 0.3, T = 2: step 1's loss is (1-a)·CE + a·T²·KL(teacher ‖ student) with the
    student the pruned model (the run's model after one step at lr 1e-9) and the teacher the unpruned model in
    transformers."""
    from jaxprune import load

    hf_dir, torch_model = strong_hf
    run = tmp_path / "kd"
    assert main(["prune", str(hf_dir), "--method", "llm-pruner", "--ratio", "0.5", "--steps", "1", "--lr", "1e-9",
                 "--calib-samples", "2", "--calib-len", "32", "--text", str(small_text), "--seq-len", "32",
                 "--batch-size", "2", "--no-progress", "--val-every", "0", "--distill", "--distill-alpha", "0.3",
                 "--distill-temp", "2", "--exclude-layers", "none", "--out", str(run), "--json"]) == 0
    assert json.loads((run / "prune.json").read_text())["distill"] == {"alpha": 0.3, "temperature": 2.0}
    batch = first_batch(hf_dir, small_text, 32, 2)
    student = load.load_model(run)
    assert student.config.num_params() < load.load_model(hf_dir).config.num_params()
    check_first_loss(run, np.asarray(student(jnp.asarray(batch))), torch_logits(torch_model, batch), batch, 0.3, 2.0)


@pytest.fixture(scope="module")
def element_pruned(strong_hf, small_text, tmp_path_factory):
    """(unpruned HF dir, magnitude 50% checkpoint, SparseGPT 50% checkpoint) of the tiny model."""
    hf_dir, _ = strong_hf
    out = tmp_path_factory.mktemp("element")
    for method in ("magnitude", "sparsegpt"):
        assert main(["prune", str(hf_dir), "--method", method, "--sparsity", "0.5", "--calib", str(small_text),
                     "--calib-samples", "4", "--calib-len", "32", "--out", str(out / method), "--no-progress"]) == 0
    return hf_dir, out / "magnitude", out / "sparsegpt"


def test_element_teacher_is_the_unpruned_model(element_pruned):
    """After restore_pruned_weights the student still computes the pruned model, and the distillation
    objective at a = 1 is KL(unpruned ‖ pruned) computed from two independent forward passes."""
    from jaxprune import load
    from jaxprune.prune.element_teacher import restore_pruned_weights, rezero_pruned_weights
    from jaxprune.prune.posttraining import attach_sparsity_masks

    hf_dir, ckpt, _ = element_pruned
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 49152, (2, 16)))
    want_student = np.asarray(load.load_model(ckpt)(tokens))
    want_teacher = np.asarray(load.load_model(hf_dir)(tokens))
    model = load.load_model(ckpt)
    attach_sparsity_masks(model)
    masked = [(p, lin) for p, lin in linears(model) if lin.weight_mask is not None]
    zeros = {p: float(np.mean(np.asarray(lin.kernel[...]) == 0)) for p, lin in masked}
    assert len(masked) == 7 * model.config.num_layers and min(zeros.values()) >= 0.5
    n = restore_pruned_weights(model, load.load_model(hf_dir), str(hf_dir))
    assert n == sum(int(np.size(l.weight_mask[...]) - np.count_nonzero(l.weight_mask[...])) for _, l in masked)
    assert all(float(np.mean(np.asarray(l.kernel[...]) == 0)) < 0.01 for _, l in masked)
    np.testing.assert_allclose(np.asarray(model(tokens)), want_student, rtol=1e-5, atol=1e-5)
    graphdef, frozen, trainable, masks = partition(model)
    got, _ = jax.jit(make_loss_fn(graphdef, distill=DistillConfig(alpha=1.0)))(trainable, frozen, masks, tokens)
    want = _np_distill(want_student, want_teacher, np.asarray(tokens), 1.0, 1.0)
    assert want > 1e-4 and float(got) == pytest.approx(want, rel=2e-3)  # a small KL: fp32 rounding of p·(log p - log q)
    rezero_pruned_weights(model)
    assert {p: float(np.mean(np.asarray(lin.kernel[...]) == 0)) for p, lin in masked} == zeros


def test_cli_finetune_distill_element_wise(element_pruned, strong_hf, small_text, tmp_path, capsys):
    """`finetune --keep-sparsity --distill` with a = 0.7, T = 1.5: step 1's loss is the objective with the student
    the magnitude-pruned checkpoint and the teacher the unpruned model in transformers (its 'pruned_from')."""
    from jaxprune import load

    hf_dir, ckpt, sgpt = element_pruned
    common = ["finetune", str(ckpt), "--keep-sparsity", "--text", str(small_text), "--steps", "2", "--seq-len", "32",
              "--batch-size", "2", "--lora-rank", "4", "--warmup-steps", "1", "--val-every", "0", "--no-progress"]
    assert main(common + ["--distill", "--distill-alpha", "0.7", "--distill-temp", "1.5", "--out",
                          str(tmp_path / "kd"), "--json"]) == 0
    batch = first_batch(hf_dir, small_text, 32, 2)
    student = np.asarray(load.load_model(ckpt)(jnp.asarray(batch)))
    check_first_loss(tmp_path / "kd", student, torch_logits(strong_hf[1], batch), batch, 0.7, 1.5)
    run = json.loads((tmp_path / "kd" / "run.json").read_text())
    assert (run["teacher"], run["distill"], run["distill_alpha"], run["distill_temp"]) == (str(hf_dir), True, 0.7,
                                                                                           1.5)  # from 'pruned_from'
    before, after = load.load_model(ckpt), load.load_model(tmp_path / "kd" / "model")
    pairs = [(p, a, b) for (p, a), (_, b) in zip(linears(before), linears(after)) if a.weight_mask is not None]
    assert len(pairs) == 7 * before.config.num_layers
    for p, a, b in pairs:  # same masks; pruned weights saved as zeros
        np.testing.assert_array_equal(np.asarray(b.weight_mask[...]), np.asarray(a.weight_mask[...]))
        assert not np.any(np.asarray(b.kernel[...])[~np.asarray(a.weight_mask[...])]), p
    capsys.readouterr()
    assert main(["finetune", str(sgpt), *common[2:], "--distill", "--teacher", str(hf_dir),
                 "--out", str(tmp_path / "sgpt")]) == 2
    assert "sparsegpt rewrites them" in capsys.readouterr().err and not (tmp_path / "sgpt").exists()
    assert main(["finetune", str(hf_dir), "--distill", "--text", str(small_text), "--out", str(tmp_path / "x")]) == 2
    assert "pass --keep-sparsity" in capsys.readouterr().err
    assert main([*common, "--distill", "--quantize-base", "int8", "--out", str(tmp_path / "q")]) == 2
    assert "the int8 scales would be taken over the teacher's restored weights" in capsys.readouterr().err
    assert main(["prune", str(hf_dir), "--method", "magnitude", "--sparsity", "0.5", "--distill",
                 "--out", str(tmp_path / "y")]) == 2
    assert "finetune CKPT --keep-sparsity --distill" in capsys.readouterr().err
