"""Our GGUF exports run in a real llama.cpp (the CPU extension of ``llama-cpp-cffi==0.4.42``, via
``jaxprune.llamacpp``) and give jaxprune's numbers there:

* logits on the same token ids: tiny random models (llama arch and per-layer-width ``deci``; f32, f16, q8_0,
  q4_0, q4_k_m) and SmolLM2-135M pruned by jaxprune's ``shrink`` (uniform -> llama, per-layer -> deci);
* perplexity, including the 4-bit file llama.cpp's own quantizer writes for ``export --outtype q4_k_m``;
* tokens: llama.cpp's tokens of held-out play text equal transformers' for a default export (the
  pre-tokenizer name found by ``gguf_vocab``), for SmolLM2's tokenizer and the plays tokenizer.

Tolerances follow from what each side computes in: f32 files match to summation order (~1e-6 relative);
for f16 weights llama.cpp also rounds the activations to f16 before each matmul (2^-11 relative per
operand); for q8_0 / 4-bit weights it quantizes the activations to 8 bits (q8_0 / q8_K blocks), so
those are compared with jaxprune running the very weights in the file (read back, dequantised).
Skipped only when the ``llama`` package is not installed (``make setup`` installs it).
"""

from __future__ import annotations

import functools
import importlib.util
import json

import numpy as np
import pytest

if importlib.util.find_spec("llama") is None:
    pytest.skip("llama-cpp-cffi is not installed (make setup installs it)", allow_module_level=True)

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune import gguf_io, gguf_vocab, llamacpp, load
from jaxprune.config import tiny_config
from jaxprune.prune.shrink import shrink

from conftest import main_in_process, random_llama

T = 128  # tokens per window


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def jax_logits(model, tokens) -> np.ndarray:
    """[B, T, V] fp32 logits; one compile per config (the graphdef is the static key)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(np.asarray(tokens), jnp.int32)), np.float32)


def cpp_logits(path, windows) -> np.ndarray:
    """[B, T, V] llama.cpp logits, one fresh KV cache per window (1 thread: the 2-core box is shared)."""
    with llamacpp.LlamaCpp(path, n_ctx=windows.shape[1], n_threads=1) as m:
        return np.stack([m.logits(w) for w in windows])


def ppl(logits, windows) -> float:
    return float(np.exp(sum(llamacpp.nll_sum(x, w) for x, w in zip(logits, windows)) / (windows.size - len(windows))))


def rel_rms(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


@pytest.fixture(scope="module")
def plays_tok(fixtures):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixtures.plays_tokenizer)


@pytest.fixture(scope="module")
def heldout(fixtures) -> str:
    return fixtures.heldout_text.read_text()[:20_000]


# ---- tiny random models (vocab: the plays tokenizer's 4,096) -------------------------------------------------
TINY = {
    "llama": tiny_config(vocab_size=4096, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                         intermediate_size=256, rope_theta=500.0),
    # FLAP's biases: k / v / o / MLP (q's are zero: llama.cpp reads attn_q.bias hidden_size wide)
    "deci": tiny_config(vocab_size=4096, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                        intermediate_size=256, attention_bias=True, mlp_bias=True, rope_theta=500.0)
    .with_layer_widths([4, 2, 2], [2, 1, 2], [256, 96, 160]),
}
#: max relative RMS of llama.cpp's logits against jaxprune on the file's own weights (measured: f32 1.6e-6,
#: f16 8.8e-4, q8_0 / q4_0 / q4_k_m 2.3e-2 .. 2.9e-2 from the 8-bit activations), and of perplexity (measured
#: ≤ 5e-5 for f16, ≤ 2.5e-3 for the 8-bit ones)
TINY_TOL = {"f32": 1e-4, "f16": 4e-3, "q8_0": 0.06, "q4_0": 0.06, "q4_k_m": 0.06}
TINY_PPL_TOL = {"f16": 1e-3, "q8_0": 1e-2, "q4_0": 1e-2, "q4_k_m": 1e-2}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, plays_tok, heldout):
    """{arch: (model, {outtype: path})} written by export_gguf, and the [2, T] token windows."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    ids = np.asarray(plays_tok(heldout)["input_ids"][: 2 * T]).reshape(2, T)
    out = {}
    for arch, cfg in TINY.items():
        model = random_llama(cfg, seed=1)
        for layer in model.layers if cfg.attention_bias else ():
            layer.self_attn.q_proj.bias[...] = jnp.zeros_like(layer.self_attn.q_proj.bias[...])
        paths = {}
        for outtype in TINY_TOL:
            paths[outtype] = root / f"{arch}-{outtype}.gguf"
            info = gguf_io.export_gguf(model, paths[outtype], tokenizer=plays_tok, outtype=outtype)
            assert info["arch"] == arch and info["tokenizer_pre"] == "gpt-2"
        out[arch] = (model, paths)
    return out, ids


@pytest.mark.parametrize("arch", list(TINY))
def test_tiny_f32_logits_equal_jaxprune(tiny_files, arch):
    files, ids = tiny_files
    model, paths = files[arch]
    ref = jax_logits(model, ids)
    got = cpp_logits(paths["f32"], ids)
    assert rel_rms(got, ref) < TINY_TOL["f32"]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    assert abs(ppl(got, ids) / ppl(ref, ids) - 1) < 1e-5
    with llamacpp.LlamaCpp(paths["f32"], vocab_only=True) as m:
        assert m.meta("general.architecture") == arch


@pytest.mark.parametrize("outtype", ["f16", "q8_0", "q4_0", "q4_k_m"])
@pytest.mark.parametrize("arch", list(TINY))
def test_tiny_quantized_logits_equal_jaxprune_on_the_same_weights(tiny_files, arch, outtype):
    """llama.cpp on the file vs jaxprune reading the same file (its dequantised weights): only llama.cpp's
    activation rounding differs. q4_0 / q4_k_m come from llama.cpp's own quantizer (``export --outtype``)."""
    files, ids = tiny_files
    model, paths = files[arch]
    back = jax_logits(load.load_model(paths[outtype]), ids)
    got = cpp_logits(paths[outtype], ids)
    err = rel_rms(got, back)
    assert err < TINY_TOL[outtype], err
    assert abs(ppl(got, ids) / ppl(back, ids) - 1) < TINY_PPL_TOL[outtype]
    if outtype != "f16":  # the file is really quantized: its weights differ from the model's
        assert rel_rms(back, jax_logits(model, ids)) > 1e-3


def test_tiny_sizes_shrink_with_the_type(tiny_files):
    files, _ = tiny_files
    sizes = {t: p.stat().st_size for t, p in files["deci"][1].items()}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    assert sizes["q4_0"] < 0.45 * sizes["f16"]


def test_plays_tokenizer_tokens_equal_transformers(tiny_files, plays_tok, heldout):
    """The plays tokenizer has no entry in llama.cpp's hash table; its plain GPT-2 byte-level regex makes it
    ``gpt-2``, and llama.cpp's tokens then equal transformers' (``default`` would not)."""
    files, _ = tiny_files
    want = plays_tok(heldout)["input_ids"]
    with llamacpp.LlamaCpp(files["llama"][1]["f32"], vocab_only=True) as m:
        assert m.meta("tokenizer.ggml.pre") == "gpt-2"
        assert m.tokenize(heldout) == want


def test_every_table_name_is_known_to_llama_cpp(tmp_path, plays_tok):
    """Each pre-tokenizer name we may write loads in the pinned llama.cpp; a made-up one does not."""
    model = random_llama(tiny_config(vocab_size=4096, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     head_dim=16, intermediate_size=32))
    for pre in sorted(set(gguf_vocab.CHKHSH.values())) + ["not-a-pre-tokenizer"]:
        path = tmp_path / f"{pre}.gguf"
        gguf_io.export_gguf(model, path, tokenizer=plays_tok, outtype="f32", tokenizer_pre=pre)
        if pre == "not-a-pre-tokenizer":
            with pytest.raises(Exception, match="could not load"):
                llamacpp.LlamaCpp(path, vocab_only=True)
        else:
            with llamacpp.LlamaCpp(path, vocab_only=True) as m:
                assert m.meta("tokenizer.ggml.pre") == pre


def test_cli_export_q4_through_llama_cpp(tmp_path, tiny_files, plays_tok):
    """``export --format gguf --outtype q4_0`` from a checkpoint: llama.cpp's quantizer, atomic output."""
    from jaxprune.checkpoint import save_model

    files, ids = tiny_files
    ckpt = save_model(files["deci"][0], tmp_path / "ckpt", tokenizer=plays_tok)
    out = tmp_path / "m.gguf"
    r = main_in_process("export", ckpt, out, "--format", "gguf", "--outtype", "q4_0", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert (res["arch"], res["outtype"], res["tokenizer_pre"]) == ("deci", "q4_0", "gpt-2")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")] == []  # no temp left
    import gguf

    got, want = gguf.GGUFReader(out).tensors, gguf.GGUFReader(files["deci"][1]["q4_0"]).tensors
    types = {t.name: t.tensor_type.name for t in got}
    assert types["blk.1.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert [t.name for t in got] == [t.name for t in want]
    for a, b in zip(got, want):  # the same model through the same quantizer: the same bytes
        assert a.tensor_type == b.tensor_type and a.data.tobytes() == b.data.tobytes(), a.name


# ---- SmolLM2-135M, pruned (random units, jaxprune's shrink) -----------------------------------------------------
def _pruned_smollm2(model, heads_per_group, kv_heads, mlp, seed=0):
    """Mask random query heads (per KV group), KV groups and MLP channels per layer, then ``shrink``."""
    cfg, rng = model.config, np.random.default_rng(seed)
    for i, layer in enumerate(model.layers):
        G = cfg.heads(i) // cfg.kv_heads(i)
        hm = np.zeros((cfg.kv_heads(i), G), bool)
        for j in rng.permutation(cfg.kv_heads(i))[: kv_heads[i]]:
            hm[j, rng.permutation(G)[: heads_per_group[i]]] = True
        layer.self_attn.head_mask[...] = jnp.asarray(hm.reshape(-1))
        cm = np.zeros(cfg.mlp_width(i), bool)
        cm[rng.permutation(cfg.mlp_width(i))[: mlp[i]]] = True
        layer.mlp.channel_mask[...] = jnp.asarray(cm)
    return shrink(model)


L = 30
#: per layer (query heads per KV group, KV heads, MLP width): first 3 and last layer whole, as prune's layerwise
LAYERWISE = ([3] * 3 + [2 + i % 2 for i in range(26)] + [3], [3] * 3 + [3 - (i % 3 == 1) for i in range(26)] + [3],
             [1536] * 3 + [1536 - 32 * (i % 5) for i in range(26)] + [1536])
UNIFORM = ([2] * L, [3] * L, [1536] * L)


@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory, fixtures, heldout):
    """Pruned SmolLM2s, their default exports and [2, T] windows of held-out play text:
    uniform -> llama f16; layerwise -> deci f32 and (llama.cpp's quantizer) q4_k_m."""
    root = tmp_path_factory.mktemp("smollm2-gguf")
    tok = load.load_tokenizer(fixtures.hf_dir)
    ids = np.asarray(tok(heldout)["input_ids"][: 2 * T]).reshape(2, T)
    uni = _pruned_smollm2(load.load_model(fixtures.hf_dir), *UNIFORM)
    lw = _pruned_smollm2(load.load_model(fixtures.hf_dir), *LAYERWISE)
    assert uni.config.is_uniform and not lw.config.is_uniform
    paths = {"uniform-f16": root / "uniform-f16.gguf", "layerwise-f32": root / "layerwise-f32.gguf",
             "layerwise-q4_k_m": root / "layerwise-q4_k_m.gguf"}
    infos = {"uniform-f16": gguf_io.export_gguf(uni, paths["uniform-f16"], tokenizer=tok, outtype="f16"),
             "layerwise-f32": gguf_io.export_gguf(lw, paths["layerwise-f32"], tokenizer=tok, outtype="f32")}
    llamacpp.quantize(paths["layerwise-f32"], paths["layerwise-q4_k_m"], "q4_k_m")  # what --outtype q4_k_m runs
    return {"uniform": uni, "layerwise": lw}, paths, infos, tok, ids


@pytest.mark.slow
def test_smollm2_default_export_tokens_equal_transformers(smollm2_files, heldout, tmp_path, plays_tok):
    """The default export picks ``smollm`` (convert_hf_to_gguf.py's hash) and llama.cpp then splits 20,000
    characters of held-out plays into transformers' tokens; ``default`` (the old fallback) does not."""
    _, paths, infos, tok, _ = smollm2_files
    assert (infos["uniform-f16"]["tokenizer_pre"], infos["uniform-f16"]["tokenizer_pre_from"]) == ("smollm", "chkhsh")
    want = tok(heldout)["input_ids"]
    with llamacpp.LlamaCpp(paths["uniform-f16"], vocab_only=True) as m:
        assert m.meta("tokenizer.ggml.pre") == "smollm"
        assert m.tokenize(heldout) == want
    tiny = random_llama(tiny_config(vocab_size=49152, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    head_dim=16, intermediate_size=32))
    gguf_io.export_gguf(tiny, tmp_path / "d.gguf", tokenizer=tok, outtype="f32", tokenizer_pre="default")
    with llamacpp.LlamaCpp(tmp_path / "d.gguf", vocab_only=True) as m:
        assert m.tokenize(heldout) != want  # the text tells the two apart


@pytest.mark.slow
def test_smollm2_layerwise_deci_f32_equals_jaxprune(smollm2_files):
    """Per-layer widths (deci) in f32: logits to summation order (measured relative RMS 1.9e-6, max |Δ| 2.5e-4
    on logits up to 37), perplexity to 1e-5 (measured 42.9137 both)."""
    models, paths, infos, _, ids = smollm2_files
    assert infos["layerwise-f32"]["arch"] == "deci"
    ref = jax_logits(models["layerwise"], ids)
    got = cpp_logits(paths["layerwise-f32"], ids)
    assert rel_rms(got, ref) < 1e-4
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    assert abs(ppl(got, ids) / ppl(ref, ids) - 1) < 1e-5
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99


@pytest.mark.slow
def test_smollm2_uniform_llama_f16_close_to_jaxprune(smollm2_files):
    """Pruned heads at one width for every layer (llama arch), f16 weights: f16 rounding of weights and
    activations only (measured: relative RMS 5.2e-3, perplexity 81.874 vs 81.876, greedy tokens 99.6% equal)."""
    models, paths, infos, _, ids = smollm2_files
    assert infos["uniform-f16"]["arch"] == "llama"
    ref = jax_logits(models["uniform"], ids)
    got = cpp_logits(paths["uniform-f16"], ids)
    assert rel_rms(got, ref) < 1.5e-2
    assert abs(ppl(got, ids) / ppl(ref, ids) - 1) < 2e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95


@pytest.mark.slow
def test_smollm2_layerwise_q4_k_m_in_llama_cpp(smollm2_files):
    """llama.cpp's own q4_k_m of the deci file: a fifth of the f32 size, perplexity within what 4-bit costs
    (measured +2.8%; the dense model's q4_k_m costs +6.5% on 2,048 tokens), most greedy tokens kept (80%)."""
    _, paths, _, _, ids = smollm2_files
    f32 = cpp_logits(paths["layerwise-f32"], ids)
    q4 = cpp_logits(paths["layerwise-q4_k_m"], ids)
    assert paths["layerwise-q4_k_m"].stat().st_size < 0.25 * paths["layerwise-f32"].stat().st_size
    assert 0.98 < ppl(q4, ids) / ppl(f32, ids) < 1.15
    assert (q4.argmax(-1) == f32.argmax(-1)).mean() > 0.7


def test_q4_0_on_rows_that_do_not_split_into_blocks_is_one_line(tmp_path):
    """An MLP 40 wide has no q4_0 form (32-blocks): llama.cpp's refusal comes back as one line, nothing written;
    q4_k_m falls back per tensor (that down_proj stays f16)."""
    import gguf

    from jaxprune.errors import UserError

    model = random_llama(tiny_config(vocab_size=256, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                     head_dim=32, intermediate_size=40))
    with pytest.raises(UserError, match="q4_k_m") as e:
        gguf_io.export_gguf(model, tmp_path / "m.gguf", outtype="q4_0")
    assert "\n" not in str(e.value) and "Unsupported tensor size" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    gguf_io.export_gguf(model, tmp_path / "m.gguf", outtype="q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q5_0"
