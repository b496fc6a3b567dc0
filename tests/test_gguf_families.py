"""GGUF export of every family in its llama.cpp architecture (``jaxprune.gguf_families``), run in the pinned
llama.cpp (llama-cpp-cffi 0.4.42, build b4965) against jaxprune on the same token ids:

* tiny random Qwen2 (q/k/v biases, pruned query heads zero-padded to hidden / head_dim), Mistral (llama arch,
  its sliding window cut into context_length), Gemma 3 (6 layers: 5 sliding + 1 global, (1 + w) norms, q/k
  norms, query_pre_attn_scalar folded into the q norm) and Phi-3 (fused qkv / gate_up, partial rotary,
  longrope, pruned heads padded), f32 and q8_0 (and llama.cpp's own q4_0); Qwen3 is written as
  convert_hf_to_gguf.py writes it, and the pinned llama.cpp, older than Qwen3, refuses it by name;
* planted export bugs (Gemma's norms without + 1, Phi-3's fused rows in k, q, v order, Qwen2's q / k rows
  permuted as for llama) change the logits;
* per-layer widths: refused in one line naming --pad for archs without a per-layer form, padded with --pad;
* jaxprune reads every arch back (``gguf_io.load_gguf_file``): f32 exactly, the quantized files as written;
* the real Gemma 3 270M: logits in llama.cpp equal jaxprune's, and a default export's tokens (sentencepiece
  pieces with scores from the merges) equal transformers' on held-out text.

Tolerances (relative RMS of the logits): f32 files to summation order, except Gemma 3, whose GELU llama.cpp
reads from an f16 table (its input rounded to f16); q8_0 / q4_0: llama.cpp also quantizes the activations.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

if importlib.util.find_spec("llama") is None:
    pytest.skip("llama-cpp-cffi is not installed (make setup installs it)", allow_module_level=True)

import gguf
import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune import gguf_families, gguf_io, llamacpp, load
from jaxprune.config import ModelConfig
from jaxprune.errors import UserError

from conftest import main_in_process, random_llama
from test_llamacpp import cpp_logits, ppl, rel_rms

T = 128
V = 4096  # the plays tokenizer's vocabulary
BASE = dict(vocab_size=V, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_theta=500.0)
#: HF config.json dicts of tiny models, one per family (read by ``ModelConfig.from_hf_dict``: the family's rules)
TINY_HF = {
    # 3 query heads of 32 over 1 KV head: attn_q is 96 wide, llama.cpp's qwen2 wants 128: one zero head
    "qwen2": dict(BASE, model_type="qwen2", num_attention_heads=3, num_key_value_heads=1, head_dim=32),
    "mistral": dict(BASE, model_type="mistral", sliding_window=None),
    # 6 layers: llama.cpp b4965 needs a global one besides the sliding ones (it crashes on an unused mask)
    "gemma3": dict({k: v for k, v in BASE.items() if k != "rope_theta"}, model_type="gemma3_text",
                   num_hidden_layers=6, num_attention_heads=3,
                   num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=48,
                   tie_word_embeddings=True, rope_parameters={
                       "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # Phi-4-mini-like: partial rotary, longrope (T = 128 > 64: the long factors), 3 of 4 heads
    "phi3": dict(BASE, model_type="phi3", num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                 partial_rotary_factor=0.5, sliding_window=None, original_max_position_embeddings=64,
                 rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 64,
                               "short_factor": [1.0 + 0.1 * i for i in range(8)],
                               "long_factor": [1.5 + 0.3 * i for i in range(8)]}),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=48),
}
ARCH = {"qwen2": "qwen2", "mistral": "llama", "gemma3": "gemma3", "phi3": "phi3", "qwen3": "qwen3"}
RUNNABLE = [f for f in TINY_HF if gguf_families.ARCHS[ARCH[f]].in_pinned]
#: max relative RMS of llama.cpp's logits against jaxprune's (measured values in the tests' docstrings)
F32_TOL = {"qwen2": 1e-5, "mistral": 1e-5, "phi3": 1e-5, "gemma3": 2e-3}
Q_TOL = 0.06


_FORWARD: dict = {}


def jax_logits(model, tokens) -> np.ndarray:
    """[B, T, V] fp32 logits through one forward compiled per config and shape (the read-back files of a family
    share it), at XLA backend optimisation level 0: compiles ~2x faster, the same fp32 maths."""
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
    key = (json.dumps(model.config.to_dict(), sort_keys=True, default=str), tokens.shape)
    if key not in _FORWARD:
        _FORWARD[key] = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens).compile(
            {"xla_backend_optimization_level": 0})
    return np.asarray(_FORWARD[key](state, tokens), np.float32)


def tiny_model(family: str, seed: int = 1):
    """A random model of ``family``; Gemma's norm weights 0-centred as in its checkpoints (scale 1 + w ≈ 1: with
    random_llama's 1 + noise the scale ≈ 2 makes q·k so large that attention flips on 8-bit activation noise)."""
    model = random_llama(ModelConfig.from_hf_dict(TINY_HF[family]), seed=seed)
    if model.config.norm_one_plus:
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if path[-1] == "weight":
                var.set_value(var.get_value() - 1.0)
    return model


@pytest.fixture(scope="module")
def plays_tok(fixtures):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixtures.plays_tokenizer)


@pytest.fixture(scope="module")
def windows(fixtures, plays_tok) -> np.ndarray:
    text = fixtures.heldout_text.read_text()[:20_000]
    return np.asarray(plays_tok(text)["input_ids"][: 2 * T]).reshape(2, T)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, plays_tok, windows):
    """{family: (model, jaxprune logits [2, T, V], {outtype: path}, export info)}."""
    root = tmp_path_factory.mktemp("gguf-families")
    out = {}
    for family in TINY_HF:
        model = tiny_model(family)
        paths, infos = {}, {}
        for outtype in ("f32", "q8_0", "q4_0") if family in RUNNABLE else ("f32",):
            paths[outtype] = root / f"{family}-{outtype}.gguf"
            infos[outtype] = gguf_io.export_gguf(model, paths[outtype], tokenizer=plays_tok, outtype=outtype)
        out[family] = (model, jax_logits(model, windows), paths, infos["f32"])
    return out


@pytest.mark.parametrize("family", RUNNABLE)
def test_tiny_f32_logits_equal_jaxprune(tiny, windows, family):
    """f32 files: llama.cpp's logits are jaxprune's (measured relative RMS: qwen2, mistral, phi3 1.5e-6; gemma3
    3.1e-4, from llama.cpp's f16 GELU table), perplexity to 1e-5 (measured ≤ 3e-6)."""
    model, ref, paths, info = tiny[family]
    assert info["arch"] == ARCH[family]
    got = cpp_logits(paths["f32"], windows)
    err = rel_rms(got, ref)
    assert err < F32_TOL[family], err
    assert abs(ppl(got, windows) / ppl(ref, windows) - 1) < 1e-5
    with llamacpp.LlamaCpp(paths["f32"], vocab_only=True) as m:
        assert m.meta("general.architecture") == ARCH[family]


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("family", RUNNABLE)
def test_tiny_quantized_logits_equal_jaxprune_on_the_same_weights(tiny, windows, family, outtype):
    """q8_0 (written here) and q4_0 (llama.cpp's own quantizer, ``export --outtype``): llama.cpp on the file vs
    jaxprune reading the same file back (``load_gguf_file``, dequantised): only llama.cpp's 8-bit activations
    differ (measured relative RMS 0.018-0.025, perplexity ≤ 2e-3); the file's weights really are quantized."""
    model, ref, paths, _ = tiny[family]
    back = load.load_model(paths[outtype])
    same = jax_logits(back, windows)
    got = cpp_logits(paths[outtype], windows)
    err = rel_rms(got, same)
    assert err < Q_TOL, err
    assert abs(ppl(got, windows) / ppl(same, windows) - 1) < 1e-2
    assert rel_rms(same, ref) > 1e-3
    types = [t.tensor_type.name for t in gguf.GGUFReader(paths[outtype]).tensors
             if t.name.startswith("blk.") and len(t.shape) == 2]
    assert types.count(outtype.upper()) > len(types) / 2, types  # the decoder's linears (the rest: llama.cpp's mix)


def test_tiny_f32_files_read_back_exactly(tiny, windows):
    """jaxprune reads every arch it writes (``load_gguf_file``): the f32 files give back the model's logits."""
    for family, (model, ref, paths, _) in tiny.items():
        back = load.load_model(paths["f32"])
        assert rel_rms(jax_logits(back, windows), ref) < 1e-5, family  # gemma3: its q-norm fold, 5e-6


def test_tiny_files_hold_each_arch_s_tensors(tiny):
    """What each arch's file holds: the padded query heads (qwen2 / phi3: 3 -> 4 heads of 32 = hidden 128, the
    extra one zero), Phi-3's fused tensors and rope factors, Gemma's norms as 1 + w (no output.weight: tied),
    Mistral's q rows permuted, Qwen3's q rows as they are with its q / k norms."""
    files = {f: gguf.GGUFReader(p["f32"]) for f, (_, _, p, _) in tiny.items()}
    t = {f: {x.name: np.asarray(x.data) for x in r.tensors} for f, r in files.items()}
    for fam in ("qwen2", "phi3"):
        assert tiny[fam][3]["padded_heads"] == 2
        assert files[fam].fields[f"{ARCH[fam]}.attention.head_count"].contents() == 4
    q = t["qwen2"]["blk.0.attn_q.weight"]
    assert q.shape == (128, 128) and not q[96:].any() and not t["qwen2"]["blk.0.attn_output.weight"][:, 96:].any()
    assert t["qwen2"]["blk.1.attn_q.bias"].shape == (128,) and not t["qwen2"]["blk.1.attn_q.bias"][96:].any()
    assert t["phi3"]["blk.0.attn_qkv.weight"].shape == (128 + 2 * 32, 128)
    assert t["phi3"]["blk.0.ffn_up.weight"].shape == (2 * 192, 128) and "blk.0.ffn_gate.weight" not in t["phi3"]
    assert t["phi3"]["rope_factors_long.weight"].shape == (8,)
    assert files["phi3"].fields["phi3.rope.dimension_count"].contents() == 16
    g = tiny["gemma3"][0]
    np.testing.assert_array_equal(t["gemma3"]["blk.2.post_ffw_norm.weight"],
                                  np.asarray(g.layers[2].post_feedforward_layernorm.weight[...]) + 1)
    assert "output.weight" not in t["gemma3"]
    assert files["gemma3"].fields["gemma3.attention.sliding_window"].contents() == 48
    m = tiny["mistral"][0]
    wq = np.asarray(m.layers[0].self_attn.q_proj.kernel[...]).T
    np.testing.assert_array_equal(t["mistral"]["blk.0.attn_q.weight"], gguf_io.permute_qk(wq, 4))
    q3 = tiny["qwen3"][0]
    wq = np.asarray(q3.layers[0].self_attn.q_proj.kernel[...]).T
    np.testing.assert_array_equal(t["qwen3"]["blk.0.attn_q.weight"], wq)
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(t["qwen3"])


def test_qwen3_is_refused_by_the_pinned_llama_cpp_by_name(tiny):
    """llama.cpp b4965 predates Qwen3 (its ``qwen3`` arch came later): the file loads there only in a newer build."""
    _, _, paths, info = tiny["qwen3"]
    assert info["arch"] == "qwen3"
    with pytest.raises(UserError, match="unknown model architecture: 'qwen3'"):
        llamacpp.LlamaCpp(paths["f32"], vocab_only=True)


def test_mistral_sliding_window_is_cut_into_context_length(tmp_path, windows, plays_tok):
    """llama.cpp's llama arch attends to every earlier token: a Mistral with a 64-token window is exact within the
    window, which the file declares as its context_length (llama.cpp warns past it)."""
    model = random_llama(ModelConfig.from_hf_dict(dict(TINY_HF["mistral"], sliding_window=64)), seed=1)
    info = gguf_io.export_gguf(model, tmp_path / "m.gguf", outtype="f32", tokenizer=plays_tok)
    assert info["notes"] and "sliding window" in info["notes"][0]
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["llama.context_length"].contents() == 64
    ref, got = jax_logits(model, windows), cpp_logits(tmp_path / "m.gguf", windows)
    assert rel_rms(got[:, :64], ref[:, :64]) < 1e-5 < rel_rms(got[:, 64:], ref[:, 64:])


@pytest.mark.parametrize("bug", ["gemma3 norms without + 1", "phi3 qkv rows as k, q, v", "qwen2 q/k rows permuted"])
def test_planted_export_bugs_change_the_logits(tiny, windows, tmp_path, monkeypatch, plays_tok, bug):
    """The comparisons above can fail: each bug, planted in the writer, moves llama.cpp's logits far past the
    f32 tolerance (measured relative RMS: 1.00, 1.15, 1.08; Gemma's unfolded q-norm scale 0.11, Phi-3's gate / up
    swapped 0.93)."""
    family = bug.split()[0]
    arch = gguf_families.ARCHS[ARCH[family]]
    if family == "gemma3":
        monkeypatch.setitem(gguf_families.ARCHS, "gemma3", dataclasses.replace(arch, norm_shift=0.0))
    elif family == "qwen2":  # the llama arch's interleaving applied to a rotate-half arch
        monkeypatch.setitem(gguf_families.ARCHS, "qwen2", dataclasses.replace(arch, permute_qk=True))
    else:
        monkeypatch.setattr(gguf_families, "FUSED_QKV", ("attn_k", "attn_q", "attn_v"))
    model, ref, _, _ = tiny[family]
    gguf_io.export_gguf(model, tmp_path / "bug.gguf", outtype="f32", tokenizer=plays_tok)
    err = rel_rms(cpp_logits(tmp_path / "bug.gguf", windows), ref)
    assert err > 100 * F32_TOL[family], err


def test_per_layer_widths_need_pad_where_the_arch_has_no_per_layer_form(tmp_path, plays_tok):
    """A Qwen2 whose layers differ: one line naming --pad; with it, the file holds the widest layer's widths
    (zero-padded: same logits); a Mistral whose layers differ goes out as deci, like LLaMA."""
    from jaxprune.checkpoint import save_model

    cfg = ModelConfig.from_hf_dict(dict(TINY_HF["qwen2"], num_attention_heads=4, num_key_value_heads=2))
    model = random_llama(cfg.with_layer_widths([4, 2], [2, 1], [192, 96]), seed=2)
    ckpt = save_model(model, tmp_path / "ckpt", tokenizer=plays_tok)
    r = main_in_process("export", ckpt, tmp_path / "q.gguf", "--format", "gguf", "--outtype", "f32")
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "--pad" in err and "qwen2" in err, err
    assert not (tmp_path / "q.gguf").exists()
    r = main_in_process("export", ckpt, tmp_path / "q.gguf", "--format", "gguf", "--outtype", "f32", "--pad")
    assert r.returncode == 0, r.stderr
    ids = np.arange(1, 65)[None]
    assert rel_rms(cpp_logits(tmp_path / "q.gguf", ids), jax_logits(model, ids)) < 1e-5
    mistral = random_llama(ModelConfig.from_hf_dict(TINY_HF["mistral"]).with_layer_widths([4, 2], [2, 1], [192, 96]),
                           seed=2)
    info = gguf_io.export_gguf(mistral, tmp_path / "m.gguf", outtype="f32", tokenizer=plays_tok)
    assert info["arch"] == "deci"
    assert rel_rms(cpp_logits(tmp_path / "m.gguf", ids), jax_logits(mistral, ids)) < 1e-5


def test_what_llama_cpp_cannot_compute_is_refused_in_one_line(tmp_path):
    """Gemma 3 layers off llama.cpp's fixed 5:1 pattern; a nonzero bias the arch does not read (Qwen3's)."""
    cfg = ModelConfig.from_hf_dict(dict(TINY_HF["gemma3"], layer_types=["sliding_attention"] * 5 + ["full_attention"]))
    bad = cfg.replace(layer_types=("full_attention",) + cfg.layer_types[1:])
    with pytest.raises(UserError, match="5 sliding then 1 global") as e:
        gguf_io.export_gguf(random_llama(bad), tmp_path / "g.gguf", outtype="f32")
    assert "\n" not in str(e.value) and "format" in str(e.value)
    qwen3 = random_llama(ModelConfig.from_hf_dict(dict(TINY_HF["qwen3"], attention_bias=True)), seed=3)
    with pytest.raises(UserError, match="nonzero ._proj bias, which llama.cpp's qwen3 does not read") as e:
        gguf_io.export_gguf(qwen3, tmp_path / "q.gguf", outtype="f32")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


# ---- the real Gemma 3 270M -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gemma3_270m_in_llama_cpp(fixtures, tmp_path):
    """Gemma 3 270M from the HF fixture, a default f16 export: llama.cpp's tokens of held-out text are
    transformers' (the sentencepiece scores derived from the merges), and its logits jaxprune's (f16 weights and
    activations, f16 GELU table: measured relative RMS 1.3e-3, perplexity 22.876 vs 22.885 on 64 tokens, greedy
    tokens all equal; transformers' and llama.cpp's tokens 5,755 / 5,755)."""
    tok = load.load_tokenizer(fixtures.gemma3_hf_dir)
    model = load.load_model(fixtures.gemma3_hf_dir)
    path = tmp_path / "gemma3.gguf"
    info = gguf_io.export_gguf(model, path, tokenizer=tok, outtype="f16")
    assert (info["arch"], info["tokenizer_pre_from"]) == ("gemma3", "sentencepiece")
    text = fixtures.heldout_text.read_text()[:20_000]
    want = tok(text)["input_ids"]
    with llamacpp.LlamaCpp(path, n_ctx=32, n_threads=2) as m:
        assert m.tokenize(text, add_special=True) == want
        ids = np.asarray(want[:32])
        got = m.logits(ids)[None]
    ref = jax_logits(model, ids[None])
    assert rel_rms(got, ref) < 1e-2
    assert abs(ppl(got, ids[None]) / ppl(ref, ids[None]) - 1) < 5e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95
