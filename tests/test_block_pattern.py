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
from jaxprune.ops.blocks import block_shape_of
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
    assert block_shape_of(got, candidates=(block[0],)) is not None or block[0] != block[1]


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


def test_cli_block_prune_then_eval_and_generate_through_the_kernel(block_ckpt, small_text, capsys):
    model = load.load_model(block_ckpt)
    masked = [lin for _, lin in linears(model) if lin.weight_mask is not None]
    assert len(masked) == 14
    for lin in masked:  # whole 16x16 blocks, floor(0.5·rows of blocks) of each column of blocks pruned (Wanda
        m = np.asarray(lin.weight_mask[...])  # compares per output): 1 of 2 k-blocks (in = 32), 1 of 3 (in = 48)
        assert block_shape_of(m, candidates=(16,)) == (16, 16)
        rows = m.shape[0] // 16
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
    set_linear_impl(model, "pallas", block_sparse=True)
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


def test_sparsegpt_refuses_block_patterns(tiny_hf_with_tokenizer, small_text, tmp_path, capsys):
    hf_dir, _ = tiny_hf_with_tokenizer
    code = main(["prune", str(hf_dir), "--method", "sparsegpt", "--pattern", "block:16x16", "--sparsity", "0.5",
                 "--calib", str(small_text), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "magnitude or wanda" in err[0]
