"""LoRAM (issue 21): LoRA trained on the pruned model, recovered to the full shape, merged into W0.

* the recovered factors are the pruned ones scattered into the kept rows / columns with zeros elsewhere,
  checked against a numpy scatter driven by boolean column masks (not by the code's kept indices);
* the full model with the recovered LoRA has transformers' logits of W0 + s·A^R B^R (the sum formed in
  numpy on the torch weights), and its HF export has them too;
* `jaxprune loram` end to end on a tiny model: RUN/model is W0 (not the aligned weights) + the scattered
  LoRA of RUN/train/model; an interruption in the alignment stage resumes to the same final model, bit for
  bit; int8 base + a 2x2 mesh + LoRAPrune as the pruner.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.hf import export_hf, load_hf_dir
from jaxprune.model import DECODER_LINEARS
from jaxprune.prune.groups import UNIT_AXIS
from jaxprune.prune.loram import host_arrays, pruned_model, recover_factors, recover_full_model, recovered_lora
from jaxprune.weights import linears

from conftest import jax_logits, make_hf_llama, torch_logits

H, KV, D, HIDDEN, M, LAYERS = 4, 2, 8, 32, 40, 3
UNITS = {  # layer 0: q_head (one head per KV group), layer 1: a whole KV group, layer 2: not pruned
    "head_mask": [[True, False, False, True], [False, False, True, True], [True] * H],
    "channel_mask": [list(np.random.default_rng(i).random(M) < 0.6) for i in range(2)] + [[True] * M],
}
HF_NAMES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
            "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
            "down_proj": "mlp.down_proj"}


def keep_mask(units, layer: int, name: str) -> np.ndarray:
    """Boolean keep-mask along ``name``'s unit axis in the full model, from the head / channel masks."""
    hm = np.asarray(units["head_mask"][layer], bool)
    if name in ("q_proj", "o_proj"):
        return np.repeat(hm, D)
    if name in ("k_proj", "v_proj"):
        return np.repeat(hm.reshape(KV, H // KV).any(1), D)
    return np.asarray(units["channel_mask"][layer], bool)


def scatter(a, b, keep: np.ndarray, axis: int):
    """The reference recovery: boolean-mask assignment (keeps order), zeros elsewhere."""
    a, b = np.asarray(a), np.asarray(b)
    if axis == 1:
        out = np.zeros((b.shape[0], len(keep)), b.dtype)
        out[:, keep] = b
        return a, out
    out = np.zeros((len(keep), a.shape[1]), a.dtype)
    out[keep] = a
    return out, b


def test_recover_factors_is_a_scatter_with_zeros():
    rng = np.random.default_rng(0)
    keep = rng.random(12) < 0.5
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((3, int(keep.sum())))
    ra, rb = recover_factors(a, b, np.flatnonzero(keep), 12, 1)
    assert ra is a or np.array_equal(ra, a)
    np.testing.assert_array_equal(rb, scatter(a, b, keep, 1)[1])
    assert np.all(rb[:, ~keep] == 0) and np.array_equal(rb[:, keep], b)
    a2 = rng.standard_normal((int(keep.sum()), 3))
    ra, rb = recover_factors(a2, b[:, :2], np.flatnonzero(keep), 12, 0)
    np.testing.assert_array_equal(ra, scatter(a2, b[:, :2], keep, 0)[0])
    assert np.all(ra[~keep] == 0) and np.array_equal(rb, b[:, :2])


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    """(torch model of W0, full model with recovered LoRA, pruned model with its LoRA) on a tiny GQA model
    with biases."""
    root = tmp_path_factory.mktemp("loram-unit")
    hf_dir, torch_model = make_hf_llama(root, 5, hidden_size=HIDDEN, intermediate_size=M, num_hidden_layers=LAYERS,
                                        num_attention_heads=H, num_key_value_heads=KV, attention_bias=True,
                                        mlp_bias=True)
    full, _ = load_hf_dir(hf_dir)
    cfg = full.config
    w0 = host_arrays(full)
    small = pruned_model(cfg, w0, UNITS, jnp.float32)
    assert [(small.config.heads(i), small.config.kv_heads(i)) for i in range(LAYERS)] == [(2, 2), (2, 1), (4, 2)]
    rng = np.random.default_rng(1)
    for path, lin in linears(small):
        if path[0] == "layers":  # A and B both random: the recovery of each matters
            lin.set_lora(jnp.asarray(0.2 * rng.standard_normal((lin.in_features, 4)), jnp.float32),
                         jnp.asarray(0.2 * rng.standard_normal((4, lin.out_features)), jnp.float32), 8.0 / 4)
    out = recover_full_model(cfg, w0, small, UNITS, jnp.float32)
    return torch_model, out, small, root


def test_recovered_factors_are_the_pruned_ones_scattered(recovered):
    _, full, small, _ = recovered
    arrays = recovered_lora(small, full.config, UNITS)
    small_lin, full_lin = dict(linears(small)), dict(linears(full))
    for i in range(LAYERS):
        for block, name in DECODER_LINEARS:
            path = ("layers", i, block, name)
            keep = keep_mask(UNITS, i, name)
            want_a, want_b = scatter(small_lin[path].lora_a[...], small_lin[path].lora_b[...], keep, UNIT_AXIS[name])
            np.testing.assert_array_equal(arrays[path + ("lora_a",)], want_a)
            np.testing.assert_array_equal(arrays[path + ("lora_b",)], want_b)
            np.testing.assert_array_equal(np.asarray(full_lin[path].lora_a[...]), want_a)
            np.testing.assert_array_equal(np.asarray(full_lin[path].lora_b[...]), want_b)
            pruned = ~keep
            if pruned.any():  # a pruned unit's rows / columns of the update are exactly zero
                delta = np.asarray(full_lin[path].merged_kernel()) - np.asarray(full_lin[path].base_kernel())
                assert np.all((delta[:, pruned] if UNIT_AXIS[name] == 1 else delta[pruned]) == 0)
            # on the kept block, the update is the pruned model's: (A^R B^R)[kept] = A^P B^P
            got = np.asarray(full_lin[path].lora_a[...]) @ np.asarray(full_lin[path].lora_b[...])
            got = got[:, keep] if UNIT_AXIS[name] == 1 else got[keep]
            np.testing.assert_allclose(got, np.asarray(small_lin[path].lora_a[...]) @ np.asarray(
                small_lin[path].lora_b[...]), rtol=1e-6, atol=1e-6)


def test_recovered_model_equals_dense_plus_scattered_lora_in_torch_and_export(recovered, tmp_path):
    """Transformers' model of W0 with W += s·(A^R B^R)ᵀ (numpy scatter) == the recovered jaxprune model ==
    transformers on its HF export."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    torch_model, full, small, _ = recovered
    ref = copy.deepcopy(torch_model)
    small_lin = dict(linears(small))
    with torch.no_grad():
        for i in range(LAYERS):
            for block, name in DECODER_LINEARS:
                lin = small_lin[("layers", i, block, name)]
                a, b = scatter(lin.lora_a[...], lin.lora_b[...], keep_mask(UNITS, i, name), UNIT_AXIS[name])
                w = ref.model.layers[i].get_submodule(HF_NAMES[name]).weight  # [out, in]
                w.add_(torch.as_tensor((lin.lora_scale * (a @ b)).T.astype(np.float32)))
    tokens = np.random.default_rng(2).integers(0, 96, (2, 13))
    want = torch_logits(ref, tokens)
    got = jax_logits(full, tokens)
    assert np.abs(want - torch_logits(torch_model, tokens)).max() > 1e-3  # the LoRA changes the function
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    out = export_hf(full, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in torch_model.parameters())
    np.testing.assert_allclose(torch_logits(hf, tokens), want, rtol=1e-4, atol=1e-4)


# ---- the command -------------------------------------------------------------------------------------------
COMMON = ("--seq-len", "32", "--batch-size", "2", "--lora-rank", "4", "--lr", "1e-2", "--warmup-steps", "1",
          "--val-every", "3", "--val-blocks", "2", "--save-every", "2", "--no-progress", "--json")


def main_in_process(*args) -> subprocess.CompletedProcess:
    from jaxprune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def lin_arrays(model, path, leaf):
    return np.asarray(getattr(dict(linears(model))[path], leaf)[...])


@pytest.fixture(scope="module")
def cli_run(tiny_hf_with_tokenizer, small_text, tmp_path_factory):
    hf_dir, _ = tiny_hf_with_tokenizer
    root = tmp_path_factory.mktemp("loram-cli")
    argv = ("loram", hf_dir, "--prune-method", "llm-pruner", "--ratio", "0.5", "--exclude-layers", "none",
            "--calib-len", "32", "--calib-samples", "4", "--text", small_text, "--steps", "4", "--align-steps", "4",
            "--align-lr", "1e-3", *COMMON)
    proc = main_in_process(*argv, "--out", root / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return argv, root, json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_run_is_w0_plus_the_recovered_lora(cli_run, tiny_hf_with_tokenizer):
    from jaxprune import load

    argv, root, summary = cli_run
    run = root / "run"
    assert summary == {k: v for k, v in json.loads((run / "loram.json").read_text()).items()
                       if k not in ("kept_heads", "kept_channels")}
    assert summary["heads_pruned"] == 0.5 and summary["channels_pruned"] == pytest.approx(24 / 48)
    units = json.loads((run / "units.json").read_text())
    orig, _ = load_hf_dir(tiny_hf_with_tokenizer[0])
    full, small = load.load_model(run), load.load_model(run / "train")
    assert full.config == orig.config and small.config.num_params() < orig.config.num_params()
    assert summary["params_full"] == orig.config.num_params()
    assert summary["trainable_params"] == sum(int(np.prod(np.shape(v))) for p, v in host_arrays(small).items()
                                              if p[-1] in ("lora_a", "lora_b"))
    hd = orig.config.head_dim
    for i in range(2):
        for block, name in DECODER_LINEARS:
            path = ("layers", i, block, name)
            # the base is W0 itself, not the aligned weights of the small model
            np.testing.assert_array_equal(lin_arrays(full, path, "kernel"), lin_arrays(orig, path, "kernel"))
            hm = np.asarray(units["head_mask"][i], bool)
            g = orig.config.num_heads // orig.config.num_kv_heads
            keep = {"q_proj": np.repeat(hm, hd), "o_proj": np.repeat(hm, hd),
                    "k_proj": np.repeat(hm.reshape(-1, g).any(1), hd), "v_proj": np.repeat(hm.reshape(-1, g).any(1), hd)
                    }.get(name, np.asarray(units["channel_mask"][i], bool))
            want_a, want_b = scatter(lin_arrays(small, path, "lora_a"), lin_arrays(small, path, "lora_b"), keep,
                                     UNIT_AXIS[name])
            np.testing.assert_array_equal(lin_arrays(full, path, "lora_a"), want_a)
            np.testing.assert_array_equal(lin_arrays(full, path, "lora_b"), want_b)
    assert np.abs(lin_arrays(small, ("layers", 0, "mlp", "down_proj"), "lora_b")).max() > 1e-4  # B trained
    # alignment moved the small model's base away from P(W0)
    keep_ch = np.asarray(units["channel_mask"][0], bool)
    w_small = lin_arrays(small, ("layers", 0, "mlp", "up_proj"), "kernel")
    assert np.abs(w_small - lin_arrays(orig, ("layers", 0, "mlp", "up_proj"), "kernel")[:, keep_ch]).max() > 1e-5


def test_cli_resume_after_an_interrupted_alignment_gives_the_same_model(cli_run, tmp_path):
    """What a kill after align's step-2 checkpoint leaves: align/ with checkpoint 2, nothing after it."""
    from jaxprune import load

    argv, root, _ = cli_run
    run, ref = root / "run", tmp_path / "ref"  # the same --out (run.json records it); the finished run aside
    shutil.copytree(run, ref)
    for p in (run / "align" / "model", run / "align" / "checkpoints" / "4", run / "train", run / "model"):
        shutil.rmtree(p)
    (run / "loram.json").unlink()
    bad = main_in_process(*argv, "--out", run, "--resume", "--steps", "5")
    assert bad.returncode == 2 and "--resume with a different 'steps'" in bad.stderr, bad.stderr[-2000:]
    proc = main_in_process(*argv, "--out", run, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(l)["step"] for l in (run / "align" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    want, got = host_arrays(load.load_model(ref)), host_arrays(load.load_model(run))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_cli_loraprune_int8_base_on_a_mesh(tiny_hf_with_tokenizer, small_text, tmp_path):
    """LoRAPrune picks the units, LoRA trains on an int8 pruned base over a 2x2 mesh; with --merge RUN/model's
    kernels are W0 + s·A^R B^R formed here in numpy: W0 the float checkpoint's weights (read with safetensors, not
    their int8 image, which differs by up to half a quantisation step), A^R, B^R RUN/train/model's trained factors
    scattered by units.json, s = alpha / rank = 16 / 4. RUN/model exports with its logits."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from jaxprune import load

    hf_dir, _ = tiny_hf_with_tokenizer
    proc = main_in_process("loram", hf_dir, "--prune-method", "loraprune", "--prune-steps", "6", "--prune-every", "2",
                           "--attn-unit", "q_head", "--ratio", "0.5", "--exclude-layers", "1", "--text", small_text,
                           "--steps", "3", "--quantize-base", "int8", "--mesh", "data=2,tensor=2", "--merge",
                           *COMMON, "--val-every", "0", "--save-every", "100", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["quantize_base"] == "int8" and summary["merged"] and summary["prunable_layers"] == [0]
    units = json.loads((tmp_path / "run" / "units.json").read_text())
    assert [sum(h) for h in units["head_mask"]] == [2, 4] and [sum(c) for c in units["channel_mask"]] == [24, 48]
    assert len((tmp_path / "run" / "prune" / "metrics.jsonl").read_text().splitlines()) == 6
    full, small = load.load_model(tmp_path / "run"), load.load_model(tmp_path / "run" / "train")
    assert not any(lin.has_lora for _, lin in linears(full))  # --merge: W0 + s·A^R B^R folded
    w0 = load_file(hf_dir / "model.safetensors")
    lora, int8_error = 0.0, 0.0
    for i in range(2):
        for block, name in DECODER_LINEARS:
            path = ("layers", i, block, name)
            a, b = scatter(lin_arrays(small, path, "lora_a"), lin_arrays(small, path, "lora_b"),
                           keep_mask(units, i, name), UNIT_AXIS[name])
            w = w0[f"model.layers.{i}.{HF_NAMES[name]}.weight"].T.astype(np.float64)  # [in, out]
            update = 16.0 / 4 * (a.astype(np.float64) @ b.astype(np.float64))
            np.testing.assert_allclose(lin_arrays(full, path, "kernel"), w + update, rtol=0, atol=1e-6,
                                       err_msg=str(path))
            step = np.abs(w).max(0) / 127  # the int8 image: per output channel absmax / 127
            lora, int8_error = max(lora, np.abs(update).max()), max(int8_error, np.abs(
                np.round(w / step) * step - w).max())
    assert lora > 1e-3 and int8_error > 1e-4  # the tolerance tells W0 from its int8 image, and the LoRA from none
    out = export_hf(full, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 12))
    np.testing.assert_allclose(torch_logits(hf, tokens), jax_logits(full, tokens), rtol=1e-4, atol=1e-4)


def test_cli_refuses_a_model_with_lora_in_one_line(cli_run, small_text, tmp_path):
    """RUN/model carries LoRA factors: one line, exit 2, no run dir."""
    _, root, _ = cli_run
    proc = main_in_process("loram", root / "run", "--text", small_text, "--steps", "2", *COMMON,
                           "--out", tmp_path / "again")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "carries LoRA factors" in lines[0], proc.stderr[-2000:]
    assert lines[0].startswith("jaxprune loram: error:") and not (tmp_path / "again").exists()
