"""Physical shrink of a structurally masked GQA model and its HF export (issue 5, item 7):
masked logits == shrunk logits (fp32, 1e-5) == transformers' logits of the export (1e-4),
for both attention units, uniform and non-uniform (padded export) layers, with biases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from jaxprune.errors import UserError
from jaxprune.hf import export_hf, load_hf_dir
from jaxprune.partition import combine, partition
from jaxprune.prune.masks import update_structured_masks
from jaxprune.prune.shrink import kept_indices, shrink
from jaxprune.weights import linears, model_arrays, model_from_arrays, path_str

from conftest import jax_logits, make_hf_llama, torch_logits

H, KV, D, M, LAYERS = 6, 3, 8, 40, 3
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 11))

# per-layer ratios -> expected (heads, kv heads) per layer, for each unit
CASES = {
    ("kv_group", "uniform"): ([0.5] * 3, [(4, 2)] * 3),               # int(1.5) = 1 of 3 groups
    ("q_head", "uniform"): ([0.5] * 3, [(3, 3)] * 3),                 # int(0.5·2) = 1 head per group
    ("kv_group", "nonuniform"): ([0.34, 0.67, 0.0], [(4, 2), (2, 1), (6, 3)]),
    ("q_head", "nonuniform"): ([0.5, 0.0, 0.5], [(3, 3), (6, 3), (3, 3)]),
}


def _with_random_lora(model, rank=4, alpha=8.0, seed=0):
    """The same model with LoRA factors (A and B both random, so merging matters) on every linear."""
    rng = np.random.default_rng(seed)
    arrays = {p: np.asarray(v) for p, v in model_arrays(model).items() if p[-1] not in ("head_mask", "channel_mask")}
    spec = {}
    for path, lin in linears(model):
        if path_str(path) == "lm_head":
            continue
        spec[path_str(path)] = (rank, alpha)
        arrays[path + ("lora_a",)] = (0.1 * rng.standard_normal((lin.in_features, rank))).astype(np.float32)
        arrays[path + ("lora_b",)] = (0.1 * rng.standard_normal((rank, lin.out_features))).astype(np.float32)
    return model_from_arrays(model.config, arrays, lora=spec)


@pytest.fixture(scope="module", params=[False, True], ids=["nobias", "bias"])
def hf_gqa(request, tmp_path_factory):
    bias = request.param
    return make_hf_llama(tmp_path_factory.mktemp("gqa"), 3, hidden_size=H * D, intermediate_size=M,
                         num_hidden_layers=LAYERS, num_attention_heads=H, num_key_value_heads=KV,
                         attention_bias=bias, mlp_bias=bias), bias


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
def test_masked_equals_shrunk_equals_export(unit, hf_gqa, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    (hf_dir, torch_model), bias = hf_gqa
    layout = "nonuniform" if bias else "uniform"  # the non-uniform case also carries q/k/v/o + MLP biases
    ratios, want_widths = CASES[(unit, layout)]
    base, _ = load_hf_dir(hf_dir)  # (load parity itself: test_hf_parity)

    model = _with_random_lora(base)
    graphdef, frozen, trainable, masks = partition(model)
    rng = np.random.default_rng(1)
    n_units = KV if unit == "kv_group" else H
    scores = (tuple(rng.random(n_units) for _ in range(LAYERS)), tuple(rng.random(M) for _ in range(LAYERS)))
    for i, r in enumerate(ratios):
        masks = update_structured_masks(masks, scores, r, model.config, unit, [i])
    masked = combine(graphdef, frozen, trainable, masks)
    want = jax_logits(masked, TOKENS)
    assert not np.allclose(want, torch_logits(torch_model, TOKENS), atol=1e-2)  # LoRA + pruning changed it

    small = shrink(masked)
    cfg = small.config
    assert [(cfg.heads(i), cfg.kv_heads(i)) for i in range(LAYERS)] == want_widths
    assert [cfg.mlp_width(i) for i in range(LAYERS)] == [M - int(r * M) for r in ratios]
    assert cfg.is_uniform == (layout == "uniform")
    assert not any(lin.has_lora for _, lin in linears(small))
    n_small = sum(int(np.prod(x.shape)) for p, x in nnx.to_flat_state(nnx.state(small, nnx.Param)))
    assert n_small == cfg.num_params() < base.config.num_params()
    np.testing.assert_allclose(jax_logits(small, TOKENS), want, rtol=1e-5, atol=1e-5)

    if layout != "uniform":  # a stock config cannot hold per-layer widths: refused unless padded (issue 15)
        with pytest.raises(UserError, match="--pad"):
            export_hf(small, tmp_path / "hf")
    out = export_hf(small, tmp_path / "hf", pad=layout != "uniform")
    hf_cfg = json.loads((out / "config.json").read_text())
    wide_kv = max(kv for _, kv in want_widths)
    wide_group = max(h // kv for h, kv in want_widths)
    assert (hf_cfg["num_key_value_heads"], hf_cfg["num_attention_heads"]) == (wide_kv, wide_kv * wide_group)
    assert hf_cfg["intermediate_size"] == max(cfg.mlp_width(i) for i in range(LAYERS))
    assert hf_cfg["attention_bias"] == bias and hf_cfg["mlp_bias"] == bias
    hf_small = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(hf_small, TOKENS), want, rtol=1e-4, atol=1e-4)
    if layout == "uniform":  # nothing padded: the export is exactly as small as the shrunk model
        assert sum(p.numel() for p in hf_small.parameters()) == cfg.num_params()

    else:  # the padded export reads back into jaxprune with the same function
        back, _ = load_hf_dir(out)
        np.testing.assert_allclose(jax_logits(back, TOKENS), want, rtol=1e-5, atol=1e-5)


def test_shrink_refuses_uneven_kv_groups():
    """A head mask whose KV groups keep different numbers of query heads is not valid GQA."""
    with pytest.raises(UserError, match="different numbers of query heads"):
        kept_indices(np.array([1, 1, 1, 0, 0, 0], bool), 3)
    q, kv = kept_indices(np.array([0, 0, 1, 0, 0, 1], bool), 3)
    assert q.tolist() == [2, 5] and kv.tolist() == [1, 2]
