"""LoRAM with adapters other than LoRA (``loram --adapter``, issue 35): the adapter trained on the pruned model is
recovered into the dense model as its update on the kept units and W0 on the pruned ones (``prune/loram.py``).

* for every registered adapter, the recovered dense model's logits equal transformers' logits of W0 with the
  adapter's update applied on the scattered factors, formed here in numpy from the pruned layer's raw parameters
  and boolean keep-masks (LoRA: s·A^R B^R; SparseAdapter: s·(A⊙M_A)^R (B⊙M_B)^R, the support scattered with its
  factor; Bone: D[i mod r] on the pruned layer's rows, scattered; RandLoRA: PEFT's composition of the shared bases,
  scattered; DoRA: B and the magnitude scattered, ‖W0‖ at pruned output columns, and the pruned DoRA on P(W0) at
  kept input rows, W0 at pruned ones), within 1e-5 relative;
* `jaxprune loram --adapter NAME` end to end on the tiny CLI model: RUN/model is W0 plus the update of
  RUN/train/model (saved merged) put back at the kept units of units.json, W0 exactly elsewhere;
* an adapter LoRAM cannot recover, or one refusing a flag, is refused in one line before anything is written.
"""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adapter_reference import logits
from conftest import main_in_process, make_hf_llama, rel_err, torch_logits
from jaxprune.adapters import ADAPTERS, Adapter, adapter_of, attach_adapter
from jaxprune.hf import load_hf_dir
from jaxprune.model import DECODER_LINEARS
from jaxprune.partition import add_lora
from jaxprune.prune.groups import UNIT_AXIS
from jaxprune.prune.loram import host_arrays, pruned_model, recover_full_model
from jaxprune.weights import linears
from test_loram import COMMON, HF_NAMES, keep_mask

RANK, ALPHA, LAYERS, M = 4, 8.0, 2, 40
UNITS = {  # layer 0: one query head per KV group, layer 1: a whole KV group; 24 of 40 MLP channels in each
    "head_mask": [[True, False, False, True], [False, False, True, True]],
    "channel_mask": [list(np.random.default_rng(i).permutation(M) < 24) for i in range(LAYERS)],
}
TOL = 1e-5  # max |ours - reference| / max |reference| over the logits


# ---- the reference: ΔW^P of each adapter in numpy, from the pruned layer's raw parameters -------------------------
def leaf(lin, name) -> np.ndarray:
    return np.asarray(getattr(lin, name)[...], np.float64)


def pruned_update(lin, name: str) -> np.ndarray:
    """ΔW^P [in_p, out_p] of an additive adapter layer of the pruned model (the adapter's formula, not its code)."""
    s = lin.lora_scale
    if name == "lora":
        return s * leaf(lin, "lora_a") @ leaf(lin, "lora_b")
    if name == "sparse":
        a, b = leaf(lin, "lora_a") * leaf(lin, "sparse_mask_a"), leaf(lin, "lora_b") * leaf(lin, "sparse_mask_b")
        return s * a @ b
    if name == "bone":
        d = leaf(lin, "bone_block")
        return d[np.arange(lin.in_features) % d.shape[0]]  # ΔW[i, o] = D[i mod r, o]
    assert name == "randlora"
    lam, gam = leaf(lin, "randlora_lambda"), leaf(lin, "randlora_gamma")
    r, n = lam.shape
    small, large = sorted((lin.in_features, lin.out_features))
    a = np.asarray(lin.randlora_bases.a[...], np.float64)[:, :small]
    b = np.asarray(lin.randlora_bases.b[...], np.float64)[:large, :n, :]
    vu = b.reshape(large, n * r) @ (lam[:, :, None] * a[:, None, :] * gam[None]).reshape(r * n, small)  # [large, small]
    return s * (vu.T if small == lin.in_features else vu)  # PEFT's [out, in] = V @ U when in <= out; ours [in, out]


def recovered_kernel(w0: np.ndarray, lin, name: str, keep: np.ndarray, axis: int) -> np.ndarray:
    """W* [in, out] of one linear: W0 with the adapter's update applied on the scattered factors."""
    w = w0.copy()
    if name != "dora":
        if axis == 1:
            w[:, keep] += pruned_update(lin, name)
        else:
            w[keep] += pruned_update(lin, name)
        return w
    a, b, m, s = leaf(lin, "lora_a"), leaf(lin, "lora_b"), leaf(lin, "dora_magnitude"), lin.lora_scale
    if axis == 1:  # pruned output columns: B and m scattered; a pruned column keeps W0's direction and norm
        b_r = np.zeros((b.shape[0], len(keep)))
        b_r[:, keep] = b
        m_r = np.linalg.norm(w0, axis=0)
        m_r[keep] = m
        v = w0 + s * a @ b_r
        return m_r * v / np.linalg.norm(v, axis=0)
    v = w0[keep] + s * a @ b  # pruned input rows: the pruned DoRA on P(W0) at the kept rows, W0 at the pruned ones
    w[keep] = m * v / np.linalg.norm(v, axis=0)
    return w


def trained_looking(model, name: str, seed: int = 0) -> None:
    """Every trainable array of the adapter set to a trained-looking value (B ≠ 0, m ≠ ‖W‖, λ ≠ 0, D ≠ 0; a
    SparseAdapter's A and B non-zero off their support too, so that the support must be applied)."""
    rng = np.random.default_rng(seed)
    for _, lin in linears(model):
        if adapter_of(lin) != name:
            continue
        for path, var in nnx.to_flat_state(nnx.state(lin, nnx.LoRAParam)):
            x = np.asarray(var.get_value())
            if path[-1] == "dora_magnitude":
                x = x * rng.uniform(0.7, 1.3, x.shape)
            elif path[-1] == "randlora_gamma":
                x = x * rng.uniform(0.5, 1.5, x.shape)
            else:
                x = rng.normal(0, 0.05, x.shape)  # an update of about W0's size (its entries ~ N(0, 0.02²))
            var.set_value(jnp.asarray(x, jnp.float32))


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    """test_loram's tiny GQA LLaMA (two layers) with q/k/v/o and MLP biases, as (torch model, jaxprune model, W0)."""
    hf_dir, torch_model = make_hf_llama(tmp_path_factory.mktemp("loram-adapters"), 5, hidden_size=32,
                                        intermediate_size=M, num_hidden_layers=LAYERS, num_attention_heads=4,
                                        num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    full, _ = load_hf_dir(hf_dir)
    return torch_model, full, host_arrays(full)


@pytest.mark.parametrize("name", ADAPTERS.names())
def test_recovered_model_is_w0_plus_the_adapters_scattered_update(tiny_gqa, name):
    """UNITS prune one query head per KV group (layer 0), a whole KV group (layer 1) and 40% of the MLP channels.
    Every adapter's recovered dense model has transformers' logits of the
    reference W* (numpy), which differ from W0's; the pruned units' rows / columns are W0 exactly."""
    torch_model, full, w0 = tiny_gqa
    cfg = full.config
    small = pruned_model(cfg, w0, UNITS, jnp.float32)
    add_lora(small, rank=RANK, alpha=ALPHA, seed=0)
    attach_adapter(small, name, seed=0)
    trained_looking(small, name)
    out = recover_full_model(cfg, w0, small, UNITS, jnp.float32)
    assert all(adapter_of(l) == ("lora" if name == "lora" and p[0] == "layers" else None) for p, l in linears(out))

    ref, small_lin, out_lin = copy.deepcopy(torch_model), dict(linears(small)), dict(linears(out))
    for i in range(LAYERS):
        for block, lname in DECODER_LINEARS:
            path, axis = ("layers", i, block, lname), UNIT_AXIS[lname]
            keep = keep_mask(UNITS, i, lname)
            tw = ref.model.layers[i].get_submodule(HF_NAMES[lname]).weight  # [out, in]
            want = recovered_kernel(tw.detach().numpy().T.astype(np.float64), small_lin[path], name, keep, axis)
            tw.data.copy_(torch_from(want.T))
            got = np.asarray(out_lin[path].merged_kernel())
            pruned = ~keep
            w0k = w0[path + ("kernel",)]
            if pruned.any():  # no update at a pruned unit
                assert np.array_equal(got[:, pruned] if axis == 1 else got[pruned],
                                      w0k[:, pruned] if axis == 1 else w0k[pruned]), f"{path}: not W0 at a pruned unit"
    tokens = np.random.default_rng(2).integers(0, 96, (2, 13))
    want = torch_logits(ref, tokens)
    assert rel_err(want, torch_logits(torch_model, tokens)) > 1e-3  # the adapter changes the function
    err = rel_err(logits(out, tokens), want)
    assert err < TOL, f"{name}: the recovered model's logits differ from the reference by {err:.3g} (relative)"


def torch_from(x: np.ndarray):
    import torch
    return torch.as_tensor(np.ascontiguousarray(x, np.float32))


# ---- the command ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dora"])
def test_cli_loram_adapter_is_w0_plus_the_scattered_update_of_the_trained_pruned_model(
        name, tiny_hf_with_tokenizer, small_text, tmp_path):
    """`loram --adapter NAME`: the adapter trains on the pruned model (RUN/train/model: saved merged, so its update is
    its kernel minus P(W0), no alignment and a float base), RUN/model is saved merged and each of its decoder kernels
    is W0 (the float checkpoint's, read with safetensors) plus that update at the kept units of units.json."""
    from safetensors.numpy import load_file

    from jaxprune import load

    hf_dir, _ = tiny_hf_with_tokenizer
    run = tmp_path / "run"
    proc = main_in_process("loram", hf_dir, "--adapter", name, "--prune-method", "l2", "--ratio", "0.5",
                           "--exclude-layers", "1", "--attn-unit", "q_head", "--text", small_text, "--steps", "2",
                           *COMMON, "--val-every", "0", "--save-every", "100", "--out", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["adapter"] == name and summary["merged"] and summary["prunable_layers"] == [0]
    assert json.loads((run / "run.json").read_text())["adapter"] == name
    units = json.loads((run / "units.json").read_text())
    full, small = load.load_model(run), load.load_model(run / "train")
    assert not any(l.has_lora for _, l in linears(full)) and not any(l.has_lora for _, l in linears(small))
    w0, full_lin, small_lin = load_file(hf_dir / "model.safetensors"), dict(linears(full)), dict(linears(small))
    g = full.config.num_heads // full.config.num_kv_heads
    moved = 0.0
    for i in range(2):
        hm, hd = np.asarray(units["head_mask"][i], bool), full.config.head_dim
        for block, lname in DECODER_LINEARS:
            path, axis = ("layers", i, block, lname), UNIT_AXIS[lname]
            keep = {"q_proj": np.repeat(hm, hd), "o_proj": np.repeat(hm, hd),
                    "k_proj": np.repeat(hm.reshape(-1, g).any(1), hd), "v_proj": np.repeat(hm.reshape(-1, g).any(1), hd)
                    }.get(lname, np.asarray(units["channel_mask"][i], bool))
            w = w0[f"model.layers.{i}.{HF_NAMES[lname]}.weight"].T.astype(np.float64)  # [in, out]
            trained = np.asarray(small_lin[path].kernel[...], np.float64)
            want = w.copy()
            if axis == 1:
                want[:, keep] = trained
            else:
                want[keep] = trained
            np.testing.assert_allclose(np.asarray(full_lin[path].kernel[...]), want, rtol=0, atol=2e-6,
                                       err_msg=str(path))
            moved = max(moved, np.abs(trained - (w[:, keep] if axis == 1 else w[keep])).max())
    assert moved > 1e-4  # the adapter trained


# ---- refusals ---------------------------------------------------------------------------------------------------
def test_cli_refuses_an_adapter_it_cannot_recover_and_one_refusing_a_flag(tiny_hf_with_tokenizer, small_text,
                                                                          tmp_path):
    """One line naming the adapter and why, exit 2, no run dir: an adapter whose registration says LoRAM cannot
    recover it (``unsupported`` ``loram``), and RandLoRA with --impl pallas (as `finetune` refuses it)."""
    hf_dir, _ = tiny_hf_with_tokenizer
    why = "its update reads the whole unpruned weight"
    ADAPTERS.register(Adapter("test-no-loram", "a stand-in", convert=None, unsupported=(("loram", why),)))
    try:
        cases = [(("--adapter", "test-no-loram"), f"--adapter test-no-loram: not with jaxprune loram (its update "
                                                  f"cannot be recovered to the full shape): {why}"),
                 (("--adapter", "randlora", "--impl", "pallas"), "--adapter randlora: not with --impl pallas: ")]
        for k, (flags, text) in enumerate(cases):
            out = tmp_path / f"run{k}"
            proc = main_in_process("loram", hf_dir, *flags, "--text", small_text, "--steps", "2", *COMMON,
                                   "--out", out)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
            assert lines[0].startswith("jaxprune loram: error: " + text), lines[0]
            assert not out.exists()
    finally:
        ADAPTERS.unregister("test-no-loram")
