"""`--impl`: element-masked linears through the Pallas masked low-rank kernel (interpret mode on CPU) give
the XLA path's numbers, from the commands users run (eval, generate, finetune --keep-sparsity)."""

from __future__ import annotations

import json

import pytest

from jaxprune.cli import main


def run_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main([str(a) for a in argv] + ["--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sparse_ckpt(tiny_hf_with_tokenizer, small_text, tmp_path_factory):
    """The tiny model, magnitude-pruned 2:4 (element masks in the checkpoint)."""
    hf_dir, _ = tiny_hf_with_tokenizer
    out = tmp_path_factory.mktemp("impl") / "ckpt"
    assert main(["prune", str(hf_dir), "--method", "magnitude", "--pattern", "2:4", "--out", str(out),
                 "--no-progress", "--json"]) == 0
    return out


def test_eval_and_generate_through_the_kernel_equal_xla(sparse_ckpt, small_text, capsys, monkeypatch):
    from jaxprune import kernels

    calls = []
    real = kernels.masked_lowrank_matmul
    monkeypatch.setattr(kernels, "masked_lowrank_matmul", lambda *a, **k: calls.append(k["impl"]) or real(*a, **k))
    common = ["eval", sparse_ckpt, "--text", small_text, "--seq-len", "32", "--max-tokens", "96", "--batch-size", "3"]
    xla, pallas, auto = [], [], []
    for impl, out in (("xla", xla), ("pallas", pallas), ("auto", auto)):
        calls.clear()
        out.append(run_json(capsys, *common, "--impl", impl))
        out.append(len(calls))  # traced kernel calls: one per masked linear and compile
    (xla, n_xla), (pallas, n_pallas), (auto, n_auto) = xla, pallas, auto
    import jax

    accel = jax.default_backend() in ("gpu", "tpu")  # auto: the kernel path on GPU/TPU, XLA on CPU
    # For inference, auto (and xla) bake (W ⊙ M) once into a dense kernel (weights.set_linear_impl: a dense matmul
    # beat the masked kernel 3.8x on an H200): only an explicit --impl pallas reaches the masked kernel.
    assert n_xla == 0 and n_pallas >= 14 and n_auto == 0  # 7 masked linears x 2 layers
    assert (xla["impl"], pallas["impl"], auto["impl"]) == ("xla", "pallas", "pallas" if accel else "xla")
    assert pallas["ppl"] == pytest.approx(xla["ppl"], rel=1e-5) and auto["ppl"] == xla["ppl"]
    gen = ["generate", sparse_ckpt, "--prompt", "To be, or", "--max-new-tokens", "4"]
    assert run_json(capsys, *gen, "--impl", "pallas")["token_ids"] == run_json(capsys, *gen, "--impl", "xla")["token_ids"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_keep_sparsity_finetune_through_the_kernel_equals_xla(sparse_ckpt, small_text, tmp_path, capsys,
                                                              monkeypatch, optimizer):
    """Four steps on four distinct batches at a non-zero learning rate (SGD: 0.5 from the first step): every step's loss and
    the trained LoRA factors through the Pallas kernel equal XLA's. With SGD (no
    clipping) each update is lr × the gradient, so a gradient mis-scaled in the kernel's backward moves the factors
    differently; AdamW (the commands' optimizer) would normalise such a scale away."""
    import numpy as np
    import optax

    from jaxprune import load
    from jaxprune.commands import finetune
    from jaxprune.prune.loram import host_arrays

    if optimizer == "sgd":
        monkeypatch.setattr(finetune, "make_optimizer", lambda c: optax.sgd(0.5))
    common = ["finetune", sparse_ckpt, "--text", small_text, "--keep-sparsity", "--steps", "4", "--seq-len", "16",
              "--batch-size", "2", "--lora-rank", "4", "--lr", "1e-2", "--warmup-steps", "0", "--val-every", "0",
              "--no-progress"]
    runs = {impl: run_json(capsys, *common, "--impl", impl, "--out", tmp_path / impl) for impl in ("xla", "pallas")}
    assert (runs["xla"]["impl"], runs["pallas"]["impl"]) == ("xla", "pallas")
    assert json.loads((tmp_path / "pallas" / "run.json").read_text())["impl"] == "pallas"
    losses = {impl: [json.loads(l)["loss"] for l in (tmp_path / impl / "metrics.jsonl").read_text().splitlines()
                     if "loss" in json.loads(l)] for impl in runs}
    assert len(losses["xla"]) == 4 and len(set(losses["xla"])) == 4  # distinct batches (and updates)
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
    xla, pallas = (host_arrays(load.load_model(tmp_path / impl / "model")) for impl in ("xla", "pallas"))
    factors = [k for k in xla if k[-1] in ("lora_a", "lora_b")]
    assert len(factors) == 28 and max(np.abs(xla[k]).max() for k in factors if k[-1] == "lora_b") > 1e-3
    for k in factors:
        np.testing.assert_allclose(pallas[k], xla[k], rtol=1e-4, atol=1e-6, err_msg=str(k))
