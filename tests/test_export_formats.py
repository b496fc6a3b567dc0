"""Issue 15: a pruned model stays small outside jaxprune.

* stock HF export of a model whose layers differ in width is refused without --pad (one line, exit 2);
* GGUF (llama arch when uniform, llama.cpp's deci arch with per-layer arrays when not): read back
  bit-exact from f32; a uniform file read by transformers' own GGUF loader gives our logits (so the q / k
  permutation is llama.cpp's); the tokenizer round-trips;
* vLLM's DeciLM config: each layer's width from vLLM's own formulas, logits equal on read-back.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxprune import gguf_io, hf, load
from jaxprune.cli import main
from jaxprune.config import tiny_config
from jaxprune.errors import UserError
from jaxprune.weights import dense_arrays

from conftest import jax_logits, random_llama

D = 8
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 13))
# three layers of different widths: (heads, KV heads, MLP)
WIDTHS = ([4, 2, 6], [2, 1, 3], [24, 40, 16])


def _nonuniform(bias: bool = False):
    cfg = tiny_config(hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=D, intermediate_size=40,
                      attention_bias=bias, rope_theta=500.0)
    return random_llama(cfg.with_layer_widths(*WIDTHS), seed=1)


def _uniform():
    return random_llama(tiny_config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                    intermediate_size=64), seed=2)


def test_stock_export_refuses_nonuniform_unless_padded(tmp_path):
    model = _nonuniform()
    with pytest.raises(UserError, match="--format gguf.*--format vllm.*--pad"):
        hf.export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    out = hf.export_hf(model, tmp_path / "hf", pad=True)
    back = load.load_model(out)
    assert back.config.is_uniform and back.config.num_params() > model.config.num_params()
    np.testing.assert_allclose(jax_logits(back, TOKENS), jax_logits(model, TOKENS), rtol=1e-5, atol=1e-5)


def test_uniform_export_holds_exactly_the_parameters(tmp_path):
    model = _uniform()
    out = hf.export_hf(model, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    n = sum(t.size for t in tensors.values())
    assert n == model.config.num_params()
    assert (out / "model.safetensors").stat().st_size <= 4 * n * 1.01


def _zero_q_bias(model):
    """llama.cpp reads attn_q.bias hidden_size wide, so a pruned layer's q bias must be zero (as FLAP's are)."""
    for layer in model.layers:
        layer.self_attn.q_proj.bias[...] = jnp.zeros_like(layer.self_attn.q_proj.bias[...])
    return model


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gguf_per_layer_roundtrip_is_exact(tmp_path, bias):
    import gguf

    model = _nonuniform(bias)
    if bias:
        _zero_q_bias(model)
    info = gguf_io.export_gguf(model, tmp_path / "m.gguf", outtype="f32")
    assert info["arch"] == "deci"
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["deci.attention.head_count"].contents() == WIDTHS[0]
    assert reader.fields["deci.attention.head_count_kv"].contents() == WIDTHS[1]
    assert reader.fields["deci.feed_forward_length"].contents() == WIDTHS[2]
    # the file holds the pruned shapes: llama.cpp's [in, out] ne order of layer 1's q is (48, 2·D)
    q1 = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    assert tuple(int(x) for x in q1.shape) == (48, 2 * D)
    left_out = sum(WIDTHS[0]) * D if bias else 0  # the all-zero q biases
    assert sum(int(t.n_elements) for t in reader.tensors) == model.config.num_params() - left_out
    assert ("blk.0.attn_q.bias" in {t.name for t in reader.tensors}, "blk.0.attn_k.bias" in
            {t.name for t in reader.tensors}) == (False, bias)

    back = load.load_model(tmp_path / "m.gguf")
    assert back.config == model.config.replace(rms_norm_eps=float(np.float32(model.config.rms_norm_eps)))  # f32 key
    want = {p: np.asarray(a) for p, a in dense_arrays(model).items()}
    got = {p: np.asarray(a) for p, a in dense_arrays(back).items()}
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
    np.testing.assert_allclose(jax_logits(back, TOKENS), jax_logits(model, TOKENS), rtol=1e-6, atol=1e-6)


def test_gguf_f16_and_q8_0(tmp_path):
    model = _nonuniform()
    gguf_io.export_gguf(model, tmp_path / "h.gguf", outtype="f16")
    back = load.load_model(tmp_path / "h.gguf")
    k = ("layers", 2, "mlp", "up_proj", "kernel")
    want = np.asarray(dense_arrays(model)[k])
    np.testing.assert_array_equal(np.asarray(dense_arrays(back)[k]), want.astype(np.float16).astype(np.float32))
    # q8_0 on a model whose linears' inputs split into 32-blocks (the tiny per-layer one's 48 do not: kept f16)
    model = _uniform()
    sizes = {t: gguf_io.export_gguf(model, tmp_path / f"{t}.gguf", outtype=t)["bytes"] for t in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    q8_model = load.load_model(tmp_path / "q8_0.gguf")
    # q8_0 is exactly llama.cpp's rounding (quantize_row_q8_0, written out in numpy here): each run of 32 inputs of
    # an output row shares d = absmax / 127 (stored f16) and q = round-half-away(x / d)
    k = ("layers", 1, "mlp", "up_proj", "kernel")
    want = np.asarray(dense_arrays(model)[k], np.float32)  # [in, out]
    w = want.T.reshape(want.shape[1], -1, 32)  # ggml rows: one per output, blocks along the inputs
    d = np.abs(w).max(-1, keepdims=True) / 127
    x = w * np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
    q = np.sign(x) * np.floor(np.abs(x) + 0.5)
    rounded = (d.astype(np.float16).astype(np.float32) * q).reshape(want.shape[1], -1).T
    np.testing.assert_allclose(np.asarray(dense_arrays(q8_model)[k]), rounded, rtol=0, atol=1e-7)
    assert np.abs(rounded - want).max() > 1e-4  # not vacuous: q8_0 did change the weights
    q8, ref = jax_logits(q8_model, TOKENS), jax_logits(model, TOKENS)
    assert np.abs(q8 - ref).max() < 0.05 * np.abs(ref).max()


def test_gguf_llama_arch_matches_transformers_reader(tmp_path):
    """A uniform model's GGUF, read by transformers' GGUF loader (which undoes llama.cpp's q / k permutation
    its own way) gives jaxprune's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = _uniform()
    assert gguf_io.export_gguf(model, tmp_path / "u.gguf", outtype="f32")["arch"] == "llama"
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="u.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf_model(torch.as_tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(got, jax_logits(model, TOKENS), rtol=1e-4, atol=1e-4)


def test_gguf_reader_equals_transformers_on_smollm2(smollm2_jax, fixtures):
    """jaxprune's own GGUF reader (gguf.quants, no torch) on the real Q4_1/Q8_0 SmolLM2 file: every weight
    equal to transformers' dequantised model (the session fixture)."""
    model, _ = gguf_io.load_gguf_file(fixtures.gguf)
    want = {p: np.asarray(a) for p, a in dense_arrays(smollm2_jax).items()}
    got = {p: np.asarray(a) for p, a in dense_arrays(model).items()}
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))


def test_gguf_tokenizer_roundtrip(tiny_hf_with_tokenizer, tmp_path):
    hf_dir, _ = tiny_hf_with_tokenizer
    tok = load.load_tokenizer(hf_dir)
    model = load.load_model(hf_dir)
    assert gguf_io.export_gguf(model, tmp_path / "t.gguf", tokenizer=tok, outtype="f32")["tokenizer"]
    back = load.load_tokenizer(tmp_path / "t.gguf")
    text = "Enter HAMLET, reading.\nTo be, or not to be: that is the question. 1234 <|im_end|>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert (back.bos_token_id, back.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def _vllm_width(ffn_mult: float, hidden: int) -> int:
    """vLLM nemotron_nas._ffn_mult_to_intermediate_size, restated."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def test_vllm_deci_export(tmp_path):
    model = _nonuniform(bias=True)
    out = hf.export_vllm(model, tmp_path / "vllm")
    d = json.loads((out / "config.json").read_text())
    assert d["model_type"] == "nemotron-nas" and d["architectures"] == ["DeciLMForCausalLM"]
    H = d["num_attention_heads"]
    assert H == 6
    kv = [H // b["attention"]["n_heads_in_group"] for b in d["block_configs"]]
    mlp = [_vllm_width(b["ffn"]["ffn_mult"], d["hidden_size"]) for b in d["block_configs"]]
    assert kv == [2, 1, 3] and mlp == [256, 256, 256]  # KV heads kept per layer; MLP widths in 256s
    tensors = load_file(out / "model.safetensors")
    for i in range(3):
        assert tensors[f"model.layers.{i}.self_attn.k_proj.weight"].shape == (kv[i] * D, 48)
        assert tensors[f"model.layers.{i}.mlp.up_proj.weight"].shape == (mlp[i], 48)
    back = load.load_model(out)
    np.testing.assert_allclose(jax_logits(back, TOKENS), jax_logits(model, TOKENS), rtol=1e-5, atol=1e-5)


def test_cli_export_formats(tmp_path, capsys):
    from jaxprune.checkpoint import save_model

    ckpt = save_model(_nonuniform(), tmp_path / "ckpt")
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pad" in err and "--format gguf" in err
    assert main(["export", str(ckpt), str(tmp_path / "x.bin"), "--format", "gguf"]) == 2
    assert main(["export", str(ckpt), str(tmp_path / "m.gguf"), "--format", "gguf", "--outtype", "f32",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["padded_fraction"] == 0.0 and res["arch"] == "deci"
    assert main(["export", str(ckpt), str(tmp_path / "hfp"), "--pad", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["padded_fraction"] > 0
    # the exports are inputs again: convert the GGUF to a checkpoint, same logits
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    np.testing.assert_allclose(jax_logits(load.load_model(tmp_path / "back"), TOKENS),
                               jax_logits(load.load_model(ckpt), TOKENS), rtol=1e-6, atol=1e-6)


# ---- issue 32: the tokenizer llama.cpp sees, biases llama.cpp can read, 4-bit without llama.cpp -------------------
def test_tokenizer_pre_found_as_llama_cpp_converter_does(fixtures):
    """convert_hf_to_gguf.py's hash of SmolLM2's tokenizer is its ``smollm`` entry; the plays tokenizer (not in
    the table) is plain GPT-2 byte-level, ``gpt-2``."""
    from transformers import AutoTokenizer

    from jaxprune import gguf_vocab

    smol = AutoTokenizer.from_pretrained(fixtures.hf_dir)
    assert gguf_vocab.chkhsh(smol) == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    assert gguf_vocab.tokenizer_pre(smol) == ("smollm", "chkhsh")
    assert gguf_vocab.tokenizer_pre(AutoTokenizer.from_pretrained(fixtures.plays_tokenizer)) == \
        ("gpt-2", "gpt2-byte-level")


def _digit_split_tokenizer(fixtures):
    """The plays tokenizer with digits split first: byte-level BPE that no rule here identifies."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((fixtures.plays_tokenizer / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


def test_unknown_tokenizer_is_refused_naming_tokenizer_pre(tmp_path, fixtures, capsys):
    from jaxprune.checkpoint import save_model

    model = random_llama(tiny_config(vocab_size=4096, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     head_dim=16, intermediate_size=32))
    ckpt = save_model(model, tmp_path / "ckpt", tokenizer=_digit_split_tokenizer(fixtures))
    assert main(["export", str(ckpt), str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tokenizer-pre" in err and "chkhsh" in err
    assert not (tmp_path / "m.gguf").exists()
    assert main(["export", str(ckpt), str(tmp_path / "m.gguf"), "--format", "gguf", "--tokenizer-pre", "gpt-2",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (res["tokenizer_pre"], res["tokenizer_pre_from"]) == ("gpt-2", "given")


def test_gguf_source_keeps_its_own_pre_tokenizer(tmp_path, fixtures, capsys):
    """Export from a GGUF: ``tokenizer.ggml.pre`` is the source's, not re-derived (here a name the hash would
    not give)."""
    import gguf
    from transformers import AutoTokenizer

    model = random_llama(tiny_config(vocab_size=4096, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     head_dim=16, intermediate_size=32))
    src = tmp_path / "src.gguf"
    gguf_io.export_gguf(model, src, tokenizer=AutoTokenizer.from_pretrained(fixtures.plays_tokenizer),
                        outtype="f32", tokenizer_pre="stablelm2")
    assert main(["export", str(src), str(tmp_path / "out.gguf"), "--format", "gguf", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (res["tokenizer_pre"], res["tokenizer_pre_from"]) == ("stablelm2", "source gguf")
    assert gguf.GGUFReader(tmp_path / "out.gguf").fields["tokenizer.ggml.pre"].contents() == "stablelm2"


def test_flap_style_biases_round_trip_and_a_narrow_q_bias_is_refused(tmp_path):
    """All-zero q / k / v biases (FLAP's) are left out; o / MLP biases kept; jaxprune reads the file back to the
    same logits. A nonzero q bias on a pruned layer has no llama.cpp form: one line."""
    cfg = tiny_config(hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=D, intermediate_size=40,
                      attention_bias=True, mlp_bias=True, rope_theta=500.0).with_layer_widths(*WIDTHS)
    model = random_llama(cfg, seed=3)
    with pytest.raises(UserError, match="attn_q.bias"):
        gguf_io.export_gguf(model, tmp_path / "q.gguf", outtype="f32")
    assert not list(tmp_path.iterdir())
    for layer in model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias[...] = jnp.zeros_like(proj.bias[...])
    gguf_io.export_gguf(model, tmp_path / "m.gguf", outtype="f32")
    back = load.load_model(tmp_path / "m.gguf")
    c = back.config
    assert (c.attention_bias, c.o_bias, c.mlp_bias) == (False, True, True)
    np.testing.assert_allclose(jax_logits(back, TOKENS), jax_logits(model, TOKENS), rtol=1e-6, atol=1e-6)


def test_4bit_without_llama_cpp_is_one_line(tmp_path, monkeypatch, capsys):
    from jaxprune import llamacpp
    from jaxprune.checkpoint import save_model

    def absent(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(llamacpp, "_STATE", {})
    monkeypatch.setattr(llamacpp.importlib, "import_module", absent)
    ckpt = save_model(_nonuniform(), tmp_path / "ckpt")
    assert main(["export", str(ckpt), str(tmp_path / "m.gguf"), "--format", "gguf", "--outtype", "q4_k_m"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps llama-cpp-cffi==0.4.42" in err
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
