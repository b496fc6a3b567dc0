"""Minitron importance (issue 31) against an independent torch computation with forward hooks on transformers'
LlamaForCausalLM (GQA), as NVIDIA Model-Optimizer's hooks compute it (mean |input| over the sequence, L2 over
the batch, L2 over a head's channels / a KV group's heads):

* ``minitron_scores`` equals it for MLP channels and both attention units (q_head, kv_group);
* `jaxprune prune --method minitron --recover-steps 0` keeps exactly the highest-scored units of every layer
  (the same width everywhere: ``--widths uniform`` is the method's default).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli

H, KV, D, M, LAYERS = 4, 2, 8, 48, 2
G = H // KV
CALIB_N, CALIB_LEN, SEQ_LEN, CALIB_BATCH = 6, 32, 32, 4


def calibration(hf_dir, text) -> np.ndarray:
    """The calibration tokens exactly as the pipeline draws them (seed 0)."""
    from jaxprune import load
    from jaxprune.data import Blocks, token_stream

    blocks = Blocks.from_stream(token_stream(text, load.load_tokenizer(hf_dir)), SEQ_LEN, seed=0)
    return np.asarray(blocks.calibration(CALIB_N, min(CALIB_LEN, SEQ_LEN), seed=0))


def torch_reference(torch_model, calib: np.ndarray, batch: int = CALIB_BATCH):
    """Per layer (q_head [H], kv_group [KV], MLP channel [M]) scores from forward hooks on o_proj / down_proj,
    in Model-Optimizer's order: |x|.mean(seq) -> pow(2).sum(batch), summed over batches -> sqrt -> L2 norms."""
    import torch

    acc: dict = {}

    def hook(key):
        def fn(_module, inputs, _output):
            a = inputs[0].detach().double().abs().mean(dim=1).pow(2).sum(dim=0)  # HF: [B, S, in]
            acc[key] = acc[key] + a if key in acc else a
        return fn

    handles = [getattr(getattr(layer, blk), name).register_forward_hook(hook((i, name)))
               for i, layer in enumerate(torch_model.model.layers)
               for blk, name in (("self_attn", "o_proj"), ("mlp", "down_proj"))]
    try:
        with torch.no_grad():
            for s in range(0, len(calib), batch):
                torch_model(torch.as_tensor(calib[s:s + batch]))
    finally:
        for h in handles:
            h.remove()
    out = []
    for i in range(len(torch_model.model.layers)):
        attn = acc[i, "o_proj"].sqrt()
        heads = torch.linalg.vector_norm(attn.view(H, D), ord=2, dim=1)
        groups = torch.linalg.vector_norm(attn.view(KV, G, D), ord=2, dim=(1, 2))  # query head h -> KV head h // G
        out.append((heads.numpy(), groups.numpy(), acc[i, "down_proj"].sqrt().numpy()))
    return out


@pytest.fixture(scope="module")
def reference(tiny_hf_with_tokenizer, small_text):
    hf_dir, torch_model = tiny_hf_with_tokenizer
    calib = calibration(hf_dir, small_text)
    return calib, torch_reference(torch_model, calib)


@pytest.mark.parametrize("unit", ["q_head", "kv_group"])
def test_scores_equal_torch_forward_hooks(tiny_hf_with_tokenizer, reference, unit):
    from jaxprune import load
    from jaxprune.partition import partition
    from jaxprune.prune.registry import STRUCTURED, ScoreInputs

    hf_dir, _ = tiny_hf_with_tokenizer
    calib, ref = reference
    model = load.load_model(hf_dir)
    assert (model.config.heads(0), model.config.kv_heads(0), model.config.head_dim) == (H, KV, D)
    graphdef, frozen, trainable, masks = partition(model)
    x = ScoreInputs(model.config, unit, graphdef, frozen, trainable, masks, calib, 0, CALIB_BATCH)
    attn, mlp = STRUCTURED.get("minitron").score(x)
    for i in range(LAYERS):
        heads, groups, channels = ref[i]
        np.testing.assert_allclose(attn[i], heads if unit == "q_head" else groups, rtol=1e-5)
        np.testing.assert_allclose(mlp[i], channels, rtol=1e-5)
        assert attn[i].shape == ((H,) if unit == "q_head" else (KV,)) and mlp[i].shape == (M,)
    # one pass of all sequences at once gives the same aggregation
    whole = ScoreInputs(model.config, unit, graphdef, frozen, trainable, masks, calib, 0, None)
    np.testing.assert_allclose(STRUCTURED.get("minitron").score(whole)[1][0], ref[0][2], rtol=1e-5)


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
def test_cli_keeps_the_highest_scored_units_of_every_layer(tiny_hf_with_tokenizer, small_text, reference, unit,
                                                          tmp_path):
    from jaxprune import load

    hf_dir, torch_model = tiny_hf_with_tokenizer
    _, ref = reference
    run = tmp_path / "run"
    proc = run_cli("prune", hf_dir, "--method", "minitron", "--ratio", "0.5", "--attn-unit", unit,
                   "--recover-steps", "0", "--calib-samples", CALIB_N, "--calib-len", CALIB_LEN, "--calib-batch",
                   CALIB_BATCH, "--seq-len", SEQ_LEN, "--text", small_text, "--out", run, "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["method"] == "minitron" and summary["widths_mode"] == "uniform"
    assert summary["params_after"] < summary["params_before"]
    assert not (run / "metrics.jsonl").exists()  # nothing trained

    for heads, groups, channels in ref:  # no near-tie at a cut: float32 jax vs torch cannot swap the choice
        cuts = [(channels, M // 2), (groups, KV // 2), *((heads[g * G:(g + 1) * G], G // 2) for g in range(KV))]
        for scores, k in cuts:
            o = np.sort(scores)
            assert o[k] - o[k - 1] > 1e-5 * o[-1], (scores, k)
    model = load.load_model(run / "model")
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    for i in range(LAYERS):  # every layer pruned (uniform widths), the lowest-scored units gone
        heads, groups, channels = ref[i]
        kept_channels = np.sort(np.argsort(channels, kind="stable")[int(0.5 * M):])
        down = np.asarray(model.layers[i].mlp.down_proj.kernel[...])  # [kept, hidden]
        np.testing.assert_allclose(down, sd[f"model.layers.{i}.mlp.down_proj.weight"][:, kept_channels].T, atol=1e-6)
        if unit == "kv_group":
            kept_groups = np.sort(np.argsort(groups, kind="stable")[int(0.5 * KV):])
            kept_heads = np.concatenate([np.arange(g * G, (g + 1) * G) for g in kept_groups])
        else:  # the same number of query heads pruned in each KV group, ranked within the group
            kept_groups = np.arange(KV)
            kept_heads = np.concatenate([g * G + np.sort(np.argsort(heads[g * G:(g + 1) * G], kind="stable")
                                                         [int(0.5 * G):]) for g in range(KV)])
        k_rows = np.concatenate([np.arange(g * D, (g + 1) * D) for g in kept_groups])
        q_rows = np.concatenate([np.arange(h * D, (h + 1) * D) for h in kept_heads])
        k_proj = np.asarray(model.layers[i].self_attn.k_proj.kernel[...])  # [hidden, kept groups · D]
        q_proj = np.asarray(model.layers[i].self_attn.q_proj.kernel[...])  # [hidden, kept heads · D]
        np.testing.assert_allclose(k_proj, sd[f"model.layers.{i}.self_attn.k_proj.weight"][k_rows].T, atol=1e-6)
        np.testing.assert_allclose(q_proj, sd[f"model.layers.{i}.self_attn.q_proj.weight"][q_rows].T, atol=1e-6)
