"""GGUF out and in, with per-layer widths, read and written with the ``gguf`` package.

A model whose layers all have the same widths is written as llama.cpp's ``llama`` architecture;
one whose layers differ as ``deci`` (llama.cpp's DeciLM: ``{arch}.attention.head_count``,
``.head_count_kv`` and ``.feed_forward_length`` are per-layer arrays, and every tensor takes its
layer's shape). Tensors are HF's ``[out, in]`` arrays under llama.cpp names, with the q / k rows
permuted from HF's rotate-half order to llama.cpp's interleaved one, as ``convert_hf_to_gguf.py``
(``LlamaModel.permute``) does: ``W.reshape(n, 2, D/2, in).swapaxes(1, 2).reshape(n·D, in)`` with
n = the layer's query heads for q and KV heads for k.

jaxprune reads these files (and any llama / deci GGUF) itself: ``gguf.quants.dequantize``
then the inverse permutation; weights come back bit-exact from f32, f16 within f16 rounding.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from . import gguf_vocab, llamacpp
from .config import ModelConfig
from .errors import UserError, field_ref
from .families import supporting
from .model import LlamaForCausalLM
from .weights import dense_arrays, model_from_arrays

OUTTYPES = ("f32", "f16", "q8_0", *llamacpp.FTYPES)
GGUF_LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
GGUF_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
READABLE_ARCHS = ("llama", "deci")


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows [n·D, ...] -> llama.cpp's interleaved rows (``LlamaModel.permute``)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of ``permute_qk``."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """llama.cpp-named tensors [out, in] (LoRA merged, masks folded in, q / k rows permuted). An all-zero bias
    is left out (llama.cpp and ``load_gguf_file`` read an absent bias as zero; FLAP's q / k / v are such);
    a nonzero q bias narrower than hidden_size is refused: llama.cpp reads ``attn_q.bias`` hidden_size wide."""
    cfg = model.config
    out = {}
    for path, a in dense_arrays(model).items():
        if path[-1] == "bias" and not np.any(np.asarray(a)):
            continue
        if path[-2:] == ("q_proj", "bias") and a.shape[0] != cfg.hidden_size:
            raise UserError(f"GGUF export: layer {path[1]} has a nonzero q_proj bias {a.shape[0]} wide, and llama.cpp "
                            f"reads attn_q.bias {cfg.hidden_size} (hidden_size) wide; export {field_ref('format')} "
                            f"hf ({field_ref('pad')} when layers differ) or vllm instead")
        a = np.asarray(a, np.float32)
        if path == ("embed_tokens",):
            out["token_embd.weight"] = a
        elif path == ("norm", "weight"):
            out["output_norm.weight"] = a
        elif path == ("lm_head", "kernel"):
            out["output.weight"] = np.ascontiguousarray(a.T)
        elif path[0] == "layers" and path[-1] in ("kernel", "bias"):
            _, i, _, proj, leaf = path
            t = np.ascontiguousarray(a.T) if leaf == "kernel" else a
            if proj in ("q_proj", "k_proj"):
                t = permute_qk(t, cfg.heads(i) if proj == "q_proj" else cfg.kv_heads(i))
            out[f"blk.{i}.{GGUF_LINEARS[proj]}.{'weight' if leaf == 'kernel' else 'bias'}"] = t
        elif path[0] == "layers":
            out[f"blk.{path[1]}.{GGUF_NORMS[path[2]]}.weight"] = a
    return out


def _per_layer(cfg: ModelConfig, f) -> int | list[int]:
    vals = [int(f(i)) for i in range(cfg.num_layers)]
    return vals[0] if cfg.is_uniform else vals


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out}: output already exists (pass {field_ref('overwrite')} to replace it)")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: parent directory does not exist")


def _resolve_tokenizer(tokenizer, pre: str | None) -> tuple[bool, str | None, str | None]:
    """(write a tokenizer?, llama.cpp pre-tokenizer name, how it was found); UserError for an unknown one."""
    if tokenizer is None or not gguf_vocab.is_byte_level_bpe(tokenizer):
        return False, None, None
    if pre:
        return True, pre, "given"
    return (True, *gguf_vocab.tokenizer_pre(tokenizer))


def export_gguf(model: LlamaForCausalLM, out: Path, *, tokenizer=None, outtype: str = "f16",
                overwrite: bool = False, tokenizer_pre: str | None = None) -> dict:
    """Write ``out`` (.gguf) atomically: llama arch when every layer has the same widths, else deci with
    per-layer head / KV-head / MLP arrays. 2-D weights in ``outtype``: f32 / f16 / q8_0 written here (q8_0
    where rows divide into its 32-blocks, else f16), the 4-bit and other llama.cpp types (``llamacpp.FTYPES``)
    by llama.cpp's own quantizer from an f32 file; norms and biases f32. The tokenizer (byte-level BPE)
    goes in with llama.cpp's pre-tokenizer name: ``tokenizer_pre`` if given, else found as
    convert_hf_to_gguf.py finds it (``gguf_vocab.tokenizer_pre``; unknown: UserError).
    Returns {arch, bytes, tokenizer, tokenizer_pre, tokenizer_pre_from, outtype}."""
    out = Path(out)
    if outtype not in OUTTYPES:
        raise UserError(f"expected one of {', '.join(OUTTYPES)}", field="outtype", value=outtype)
    _check_out(out, overwrite)
    cfg = model.config
    if not cfg.family.gguf:
        raise UserError(f"GGUF export: model_type {cfg.model_type!r} is not supported yet ({supporting('gguf')})")
    if cfg.rope_type not in ("default", "linear"):
        raise UserError(f"GGUF export: rope_type {cfg.rope_type!r} is not supported yet (default, linear)")
    has_tokenizer, pre, pre_from = _resolve_tokenizer(tokenizer, tokenizer_pre)
    quantized = outtype in llamacpp.FTYPES
    if quantized:
        llamacpp.require()
    tmps = []

    def temp() -> str:
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        tmps.append(name)
        return name

    try:
        tmp = temp()
        arch = _write_gguf(model, tmp, "f32" if quantized else outtype, tokenizer if has_tokenizer else None, pre)
        if quantized:
            src, tmp = tmp, temp()
            llamacpp.quantize(src, tmp, outtype)
        os.replace(tmp, out)
    finally:
        for name in tmps:
            Path(name).unlink(missing_ok=True)
    return {"arch": arch, "bytes": out.stat().st_size, "tokenizer": has_tokenizer, "tokenizer_pre": pre,
            "tokenizer_pre_from": pre_from, "outtype": outtype}


def _write_gguf(model: LlamaForCausalLM, path: str, outtype: str, tokenizer, pre: str | None) -> str:
    """Write the GGUF (f32 / f16 / q8_0) to ``path``; returns the arch."""
    cfg = model.config
    arch = "llama" if cfg.is_uniform else "deci"
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
    w = gguf.GGUFWriter(path, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(str(cfg.extra_hf.get("_name_or_path", "jaxprune")))
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(_per_layer(cfg, cfg.mlp_width))
    w.add_head_count(_per_layer(cfg, cfg.heads))
    w.add_head_count_kv(_per_layer(cfg, cfg.kv_heads))
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    if tokenizer is not None:
        gguf_vocab.add_tokenizer(w, tokenizer, pre)
    else:
        for key, tid in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id)):
            if isinstance(tid, int):
                getattr(w, f"add_{key}_token_id")(tid)
    for name, t in gguf_tensors(model).items():
        qtype = qtypes[outtype] if t.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16
        w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arch


# ---- reading ------------------------------------------------------------------
def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (a one-line UserError for a file that is not GGUF)."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / struct errors / OSError on bad files
        raise UserError(f"{path}: cannot read GGUF ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    return str(_field(reader, "general.architecture", ""))


def has_tokenizer(path: Path) -> bool:
    """True when the GGUF file carries tokenizer.ggml.* metadata."""
    return "tokenizer.ggml.model" in gguf.GGUFReader(path).fields


def config_from_gguf(reader, names: set[str]) -> ModelConfig:
    """ModelConfig from a llama / deci GGUF's metadata (per-layer arrays allowed) and tensor names."""
    arch = str(_field(reader, "general.architecture"))
    if arch not in READABLE_ARCHS:
        raise UserError(f"GGUF architecture {arch!r} is not supported (jaxprune reads {', '.join(READABLE_ARCHS)})")
    k = lambda name, default=None: _field(reader, f"{arch}.{name}", default)  # noqa: E731
    L, hidden = int(k("block_count")), int(k("embedding_length"))

    def per_layer(name):
        v = k(name)
        if v is None:
            raise UserError(f"GGUF: {arch}.{name} is missing")
        v = [int(x) for x in v] if isinstance(v, list) else [int(v)] * L
        if len(v) != L:
            raise UserError(f"GGUF: {arch}.{name} has {len(v)} entries for {L} layers")
        return v

    heads, kvs, ffn = per_layer("attention.head_count"), per_layer("attention.head_count_kv"), \
        per_layer("feed_forward_length")
    head_dim = int(k("attention.key_length", 0) or k("rope.dimension_count", 0) or hidden // max(heads))
    scaling = None
    stype = k("rope.scaling.type")
    if stype not in (None, "none"):
        if stype != "linear":
            raise UserError(f"GGUF: rope scaling {stype!r} is not supported (linear)")
        scaling = {"rope_type": "linear", "factor": float(k("rope.scaling.factor"))}
    vocab = reader.tensors[[t.name for t in reader.tensors].index("token_embd.weight")].shape
    has = lambda *kinds: any(f"blk.{i}.{kind}.bias" in names for i in range(L) for kind in kinds)  # noqa: E731
    attn_bias, o_bias, mlp_bias = has("attn_q", "attn_k", "attn_v"), has("attn_output"), \
        has("ffn_gate", "ffn_up", "ffn_down")
    base = ModelConfig(
        vocab_size=int(max(vocab)), hidden_size=hidden, intermediate_size=max(ffn), num_layers=L,
        num_heads=max(heads), num_kv_heads=max(kvs), head_dim=head_dim,
        rope_theta=float(k("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(k("context_length", 2048)),
        rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in names, attention_bias=attn_bias, mlp_bias=mlp_bias,
        attention_out_bias=None if o_bias == attn_bias else o_bias,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))
    return base.with_layer_widths(heads, kvs, ffn)


def load_gguf_file(path: Path, dtype=jnp.float32) -> tuple[LlamaForCausalLM, ModelConfig]:
    """A llama / deci GGUF -> jaxprune model, dequantised with ``gguf.quants`` (no torch)."""
    path = Path(path)
    gguf_architecture(path)  # a one-line error for a file that is not GGUF
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    cfg = config_from_gguf(reader, names)
    inverse = {v: k for k, v in GGUF_LINEARS.items()}
    norms = {v: k for k, v in GGUF_NORMS.items()}
    arrays = {}
    for t in reader.tensors:
        a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            arrays[("embed_tokens",)] = a
        elif t.name == "output_norm.weight":
            arrays[("norm", "weight")] = a
        elif t.name == "output.weight":
            arrays[("lm_head", "kernel")] = np.ascontiguousarray(a.T)
        elif parts[0] == "blk" and parts[2] in inverse:
            i, proj, leaf = int(parts[1]), inverse[parts[2]], parts[3]
            if proj in ("q_proj", "k_proj"):
                a = unpermute_qk(a, cfg.heads(i) if proj == "q_proj" else cfg.kv_heads(i))
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            arrays[("layers", i, block, proj, "kernel" if leaf == "weight" else "bias")] = \
                np.ascontiguousarray(a.T) if leaf == "weight" else a
        elif parts[0] == "blk" and parts[2] in norms:
            arrays[("layers", int(parts[1]), norms[parts[2]], "weight")] = a
        elif t.name == "rope_freqs.weight":
            raise UserError(f"{path}: rope_freqs (llama3 rope) is not supported by jaxprune's GGUF reader")
        else:
            raise UserError(f"{path}: unexpected tensor {t.name!r} in a llama-family GGUF")
    for key, width in _bias_widths(cfg).items():  # a bias left out of the file (all zero)
        arrays.setdefault(key, np.zeros(width, np.float32))
    return model_from_arrays(cfg, arrays, dtype=dtype, source=str(path)), cfg


def _bias_widths(cfg: ModelConfig) -> dict[tuple, int]:
    """{bias path: width} of every bias ``cfg`` has."""
    out = {}
    for i in range(cfg.num_layers):
        q, kv, h, m = cfg.heads(i) * cfg.head_dim, cfg.kv_heads(i) * cfg.head_dim, cfg.hidden_size, cfg.mlp_width(i)
        widths = {}
        if cfg.attention_bias:
            widths.update(q_proj=q, k_proj=kv, v_proj=kv)
        if cfg.o_bias:
            widths["o_proj"] = h
        if cfg.mlp_bias:
            widths.update(gate_proj=m, up_proj=m, down_proj=h)
        for proj, w in widths.items():
            block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out[("layers", i, block, proj, "bias")] = w
    return out
