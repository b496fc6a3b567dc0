"""Issue 18: the block-sparse pattern end to end. `prune --method {magnitude,wanda} --pattern block:BxB` scores
each block by its summed importance (checked against a loop-over-blocks numpy reference); `eval` / `generate
--impl pallas` run those layers through `kernels.block_sparse_matmul` (interpret mode on CPU) with the numbers of
the XLA path, and the kernel's grid executes only the live blocks."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import kernels, load
from jaxprune.cli import main
from jaxprune.errors import UserError
from jaxprune.prune.select import Block, block_keep_mask, parse_pattern
from jaxprune.weights import block_sparse_linears, linears, set_linear_impl

from conftest import jax_logits


def _reference_block_mask(scores, s, bk, bn, per_output):
    """Independent reference: python loops over blocks, stable sort of the block sums."""
    K, N = scores.shape
    blocks = [(i, j, scores[i:i + bk, j:j + bn].sum()) for i in range(0, K, bk) for j in range(0, N, bn)]
    keep = np.ones((K, N), bool)
    groups = [[b for b in blocks if b[1] == j] for j in range(0, N, bn)] if per_output else [blocks]
    for g in groups:
        n_prune = int(np.floor(s * len(g) + 1e-9))
        for i, j, _ in sorted(g, key=lambda b: b[2])[:n_prune]:  # stable: the earlier block of equal sums goes
            keep[i:i + bk, j:j + bn] = False
    return keep


@pytest.mark.parametrize("per_output", [False, True], ids=["layer", "per-output"])
@pytest.mark.parametrize("shape,block", [((64, 96), (16, 16)), ((40, 72), (16, 32))])
def test_block_mask_matches_reference(shape, block, per_output):
    scores = np.abs(np.random.default_rng(0).standard_normal(shape))
    got = block_keep_mask(scores, 0.5, Block(*block), per_output=per_output)
    np.testing.assert_array_equal(got, _reference_block_mask(scores, 0.5, *block, per_output))
    # whole blocks (each all kept or all pruned), floor(0.5·n) pruned of each group's n (a ragged edge block counts)
    bk, bn = block
    cells = [[got[i:i + bk, j:j + bn] for j in range(0, shape[1], bn)] for i in range(0, shape[0], bk)]
    assert all(c.all() or not c.any() for row in cells for c in row)
    kept = np.array([[c.all() for c in row] for row in cells])
    if per_output:
        assert (kept.shape[0] - kept.sum(0) == kept.shape[0] // 2).all()
    else:
        assert kept.size - kept.sum() == kept.size // 2


def test_parse_and_refusals():
    assert parse_pattern("block:32x16") == Block(32, 16)
    for bad in ("block:0x4", "block:4", "block:axb"):
        with pytest.raises(UserError, match="block:BKxBN"):
            parse_pattern(bad)


@pytest.fixture(scope="module")
def block_ckpt(tiny_hf_with_tokenizer, small_text, tmp_path_factory):
    """The tiny model (hidden 32, MLP 48) pruned by Wanda in 16x16 blocks at 50%."""
    hf_dir, _ = tiny_hf_with_tokenizer
    out = tmp_path_factory.mktemp("block") / "ckpt"
    assert main(["prune", str(hf_dir), "--method", "wanda", "--pattern", "block:16x16", "--sparsity", "0.5",
                 "--calib", str(small_text), "--calib-samples", "4", "--calib-len", "32", "--out", str(out),
                 "--no-progress", "--json"]) == 0
    return out


def run_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main([str(a) for a in argv] + ["--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


HF_LINEARS = {("self_attn", n): f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    ("mlp", n): f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}


def wanda_block_reference(torch_model, calib):
    """The block masks Wanda's rule gives, computed in torch / numpy: layer by layer (the layers before pruned
    with the masks found for them, as in the Wanda paper's code), score |W_ij|·||x_i|| with x the linear's input
    on the calibration batch (torch hooks on transformers' forward), 16x16 blocks ranked by their summed score,
    floor(half) of each column of blocks pruned. {(layer, block, name): keep [in, out]}."""
    import copy

    import torch

    ref = copy.deepcopy(torch_model)
    masks = {}
    for i, layer in enumerate(ref.model.layers):
        sq, hooks = {}, []
        for key, name in HF_LINEARS.items():
            def hook(mod, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[key] = sq.get(key, 0) + (x * x).sum(0).numpy()
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook))
        with torch.no_grad():
            ref(torch.as_tensor(calib))
        for h in hooks:
            h.remove()
        for key, name in HF_LINEARS.items():
            w = layer.get_submodule(name).weight  # [out, in]
            scores = np.abs(w.detach().double().numpy().T) * np.sqrt(sq[key])[:, None]
            masks[(i,) + key] = _reference_block_mask(scores, 0.5, 16, 16, per_output=True)
            with torch.no_grad():
                w.mul_(torch.as_tensor(masks[(i,) + key].T, dtype=w.dtype))
    return masks


def test_cli_block_prune_then_eval_and_generate_through_the_kernel(block_ckpt, tiny_hf_with_tokenizer, small_text,
                                                                   capsys):
    """The kept blocks are the top blocks by summed Wanda score (the reference above, on the run's calibration
    windows); eval and generate through the kernel give the XLA path's numbers."""
    from jaxprune.prune.posttraining import calibration_tokens

    model = load.load_model(block_ckpt)
    masked = {path: lin for path, lin in linears(model) if lin.weight_mask is not None}
    assert len(masked) == 14
    hf_dir, torch_model = tiny_hf_with_tokenizer
    calib = calibration_tokens(small_text, load.load_tokenizer(hf_dir), 4, 32)
    want = wanda_block_reference(torch_model, calib)
    assert sorted(want) == sorted(p[1:] for p in masked)
    for path, lin in masked.items():
        m = np.asarray(lin.weight_mask[...])
        np.testing.assert_array_equal(m, want[path[1:]], err_msg=str(path))
        rows = m.shape[0] // 16  # 1 of 2 k-blocks pruned per column of blocks (in = 32), 1 of 3 (in = 48)
        assert m.mean() == pytest.approx(1 - (rows // 2) / rows)
    common = ["eval", block_ckpt, "--text", small_text, "--seq-len", "32", "--max-tokens", "96", "--batch-size", "3"]
    xla, pallas = run_json(capsys, *common, "--impl", "xla"), run_json(capsys, *common, "--impl", "pallas")
    assert (xla["block_sparse_linears"], pallas["block_sparse_linears"]) == (0, 14)
    assert pallas["ppl"] == pytest.approx(xla["ppl"], rel=1e-5)
    gen = ["generate", block_ckpt, "--prompt", "To be, or", "--max-new-tokens", "4"]
    tokens = {impl: run_json(capsys, *gen, "--impl", impl)["token_ids"] for impl in ("pallas", "xla")}
    assert tokens["pallas"] == tokens["xla"]


def test_converted_layers_skip_pruned_blocks(block_ckpt):
    """Logits equal the masked model's; each converted layer stores only its live blocks, and the kernel's
    per-tile counters show exactly the live blocks executed (none of the pruned ones)."""
    model = load.load_model(block_ckpt)
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 16))
    want = jax_logits(model, tokens)
    set_linear_impl(model, "pallas", inference=True)
    assert len(block_sparse_linears(model)) == 14
    np.testing.assert_allclose(jax_logits(model, tokens), want, rtol=1e-5, atol=1e-5)
    lin = model.layers[0].mlp.gate_proj  # [32, 48]: 2 x 3 blocks, one of the two k-blocks kept per column
    lay = lin.block_layout
    assert lay.grid == (2, 3) and lay.n_live == 3 and lin.kernel[...].shape == (3, 16, 16)
    x = jax.random.normal(jax.random.key(0), (32, 32))
    bsm = kernels.BlockSparseMatrix(lin.kernel[...], lay)
    y, counts = kernels.block_sparse_matmul_with_counts(x, bsm, impl="pallas", block_m=16)
    assert np.asarray(counts).tolist() == [[1, 1, 1], [1, 1, 1]]  # 2 row tiles x 3 block-columns, 1 live each
    np.testing.assert_allclose(y, x @ bsm.to_dense(), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(bsm.to_dense()).sum()) > 0


def test_inference_forms_bake_masks_unless_the_block_kernel_pays(block_ckpt):
    """Inference (eval / generate / lm-eval) bakes (W ⊙ M) into a dense kernel on the XLA path and under auto where
    the block-sparse kernel does not pay (weights.block_sparse_pays, from the H200 table): same logits, no mask
    left; the tiny model's 50% block layers stay dense under auto even on a GPU."""
    from jaxprune.weights import block_sparse_pays

    tokens = np.random.default_rng(1).integers(0, 49152, (2, 16))
    want = jax_logits(load.load_model(block_ckpt), tokens)
    for impl, backend in (("xla", None), ("auto", "cpu"), ("auto", "gpu")):
        model = load.load_model(block_ckpt)
        set_linear_impl(model, impl, inference=True, backend=backend)
        lins = [lin for _, lin in linears(model)]
        assert all(lin.weight_mask is None and lin.block_layout is None and not lin.has_lora for lin in lins)
        np.testing.assert_allclose(jax_logits(model, tokens), want, rtol=1e-6, atol=1e-6)
        gate = model.layers[0].mlp.gate_proj.kernel[...]
        assert int((np.asarray(gate) == 0).sum()) >= gate.size // 2  # the pruned blocks are zeros in the kernel
    assert [block_sparse_pays(sp, shape) for sp, shape in (
        (0.9, (576, 1536)), (0.75, (4096, 11008)), (0.75, (576, 1536)), (0.5, (4096, 11008)))] == [
        True, True, False, False]


def test_sparsegpt_refuses_block_patterns(tiny_hf_with_tokenizer, small_text, tmp_path, capsys):
    hf_dir, _ = tiny_hf_with_tokenizer
    code = main(["prune", str(hf_dir), "--method", "sparsegpt", "--pattern", "block:16x16", "--sparsity", "0.5",
                 "--calib", str(small_text), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "magnitude or wanda" in err[0]
