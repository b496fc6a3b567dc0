"""GGUF out and in, with per-layer widths, read and written with the ``gguf`` package.

Each family goes out as its llama.cpp architecture (``gguf_families``: llama for LLaMA and Mistral, qwen2,
qwen3, gemma3, phi3). A LLaMA / Mistral whose layers all have the same widths is written as ``llama``;
one whose layers differ as ``deci`` (llama.cpp's DeciLM: ``{arch}.attention.head_count``,
``.head_count_kv`` and ``.feed_forward_length`` are per-layer arrays, and every tensor takes its
layer's shape). Tensors are HF's ``[out, in]`` arrays under llama.cpp names, with the q / k rows
permuted from HF's rotate-half order to llama.cpp's interleaved one, as ``convert_hf_to_gguf.py``
(``LlamaModel.permute``) does: ``W.reshape(n, 2, D/2, in).swapaxes(1, 2).reshape(n·D, in)`` with
n = the layer's query heads for q and KV heads for k.

jaxprune reads files of these archs (ours or llama.cpp's) itself: ``gguf.quants.dequantize``
then the inverse permutation; weights come back bit-exact from f32, f16 within f16 rounding.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from . import gguf_families, gguf_vocab, llamacpp
from .config import ModelConfig
from .errors import UserError, field_ref
from .families import supporting
from .gguf_reader import open_gguf
from .model import LlamaForCausalLM
from .padding import pad_to_layout
from .rope import attention_scaling, rotary_dim
from .weights import dense_arrays, model_from_arrays

OUTTYPES = ("f32", "f16", "q8_0", *llamacpp.FTYPES)
GGUF_LINEARS = gguf_families.LINEARS
READABLE_ARCHS = ("llama", "deci", "qwen2", "qwen3", "gemma3", "phi3")


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows [n·D, ...] -> llama.cpp's interleaved rows (``LlamaModel.permute``)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of ``permute_qk``."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: LlamaForCausalLM, *, pad: bool = False) -> tuple[dict[str, np.ndarray], ModelConfig, str]:
    """(llama.cpp-named tensors [out, in], the widths written, the arch) of ``model``, LoRA merged and masks folded
    in, as ``gguf_families`` says for its family: padded where the arch needs it (``gguf_families.layout``), q / k
    rows permuted for the llama arch, Gemma's norms as 1 + w, Phi-3's q/k/v and gate/up fused. A bias llama.cpp
    does not read must be zero (else UserError) and is left out, as is an all-zero one it does not require
    (llama.cpp and ``load_gguf_file`` read an absent bias as zero; FLAP's q / k / v are such); for the llama arch
    a nonzero q bias narrower than hidden_size is refused: llama.cpp reads ``attn_q.bias`` hidden_size wide."""
    cfg = model.config
    arch = gguf_families.arch_of(cfg)
    gguf_families.check(cfg, arch)
    lay, name = gguf_families.layout(cfg, arch, pad)
    arrays = {p: np.asarray(a, np.float32) for p, a in dense_arrays(model).items()}
    if lay != cfg:
        arrays = pad_to_layout(arrays, cfg, lay)
    q_scale = gguf_families.attention_scale_fix(lay, arch)
    out = {}
    for path, a in arrays.items():
        if path[-1] == "bias":
            proj = path[3]
            if proj not in arch.biases:
                if np.any(a):
                    raise UserError(f"GGUF export: layer {path[1]} has a nonzero {proj} bias, which llama.cpp's "
                                    f"{arch.name} does not read; export {field_ref('format')} hf instead")
                continue
            if proj not in arch.required_biases and not np.any(a):
                continue
            if arch.permute_qk and proj == "q_proj" and a.shape[0] != lay.hidden_size:
                raise UserError(f"GGUF export: layer {path[1]} has a nonzero q_proj bias {a.shape[0]} wide, and "
                                f"llama.cpp reads attn_q.bias {lay.hidden_size} (hidden_size) wide; export "
                                f"{field_ref('format')} hf ({field_ref('pad')} when layers differ) or vllm instead")
        if path == ("embed_tokens",):
            out["token_embd.weight"] = a
        elif path == ("norm", "weight"):
            out["output_norm.weight"] = a + np.float32(arch.norm_shift)
        elif path == ("lm_head", "kernel"):
            out["output.weight"] = np.ascontiguousarray(a.T)
        elif path[0] == "layers" and path[-1] in ("kernel", "bias"):
            _, i, _, proj, leaf = path
            t = np.ascontiguousarray(a.T) if leaf == "kernel" else a
            if arch.permute_qk and proj in ("q_proj", "k_proj"):
                t = permute_qk(t, lay.heads(i) if proj == "q_proj" else lay.kv_heads(i))
            out[f"blk.{i}.{GGUF_LINEARS[proj]}.{'weight' if leaf == 'kernel' else 'bias'}"] = t
        elif path[0] == "layers":
            norm = path[-2]
            w = a + np.float32(arch.norm_shift)
            if norm == "q_norm" and q_scale != 1.0:
                w = (w * np.float32(q_scale)).astype(np.float32)
            out[f"blk.{path[1]}.{arch.norms[norm]}.weight"] = w
        else:
            raise UserError(f"GGUF export: no llama.cpp tensor for {'.'.join(map(str, path))}")
    for i in range(lay.num_layers):
        widths = {"q_proj": lay.heads(i) * lay.head_dim, "k_proj": lay.kv_heads(i) * lay.head_dim,
                  "v_proj": lay.kv_heads(i) * lay.head_dim}
        for proj in sorted(arch.required_biases):
            out.setdefault(f"blk.{i}.{GGUF_LINEARS[proj]}.bias", np.zeros(widths[proj], np.float32))
        if arch.fused:
            b = f"blk.{i}."
            qkv = [out.pop(f"{b}{x}.weight") for x in gguf_families.FUSED_QKV]
            gate_up = [out.pop(f"{b}{x}.weight") for x in gguf_families.FUSED_GATE_UP]
            out[b + "attn_qkv.weight"], out[b + "ffn_up.weight"] = np.concatenate(qkv), np.concatenate(gate_up)
    if lay.rope_type == "longrope":  # Phi-3: per-frequency factors, llama.cpp picks long past the original length
        for kind in ("long", "short"):
            out[f"rope_factors_{kind}.weight"] = np.asarray(lay.rope_scaling[f"{kind}_factor"], np.float32)
    return out, lay, name


def _per_layer(cfg: ModelConfig, f) -> int | list[int]:
    vals = [int(f(i)) for i in range(cfg.num_layers)]
    return vals[0] if cfg.is_uniform else vals


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out}: output already exists (pass {field_ref('overwrite')} to replace it)")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: parent directory does not exist")


def _resolve_tokenizer(tokenizer, pre: str | None) -> tuple[str | None, str | None, str | None]:
    """(tokenizer kind to write: 'bpe' | 'spm' | None, llama.cpp pre-tokenizer name, how it was found); UserError
    for an unknown byte-level one."""
    if tokenizer is None:
        return None, None, None
    if gguf_vocab.is_spm_bpe(tokenizer):  # llama.cpp's sentencepiece model: no pre-tokenizer regex
        return "spm", pre or "default", "given" if pre else "sentencepiece"
    if not gguf_vocab.is_byte_level_bpe(tokenizer):
        return None, None, None
    if pre:
        return "bpe", pre, "given"
    return ("bpe", *gguf_vocab.tokenizer_pre(tokenizer))


def export_gguf(model: LlamaForCausalLM, out: Path, *, tokenizer=None, outtype: str = "f16",
                overwrite: bool = False, tokenizer_pre: str | None = None, pad: bool = False) -> dict:
    """Write ``out`` (.gguf) atomically in llama.cpp's architecture for the model's family (``gguf_families``):
    llama / qwen2 / qwen3 / gemma3 / phi3 (Mistral as llama); a LLaMA or Mistral whose layers differ as deci
    (per-layer head / KV-head / MLP arrays); other families' differing layers are refused unless ``pad``
    (zero-padded to the widest layer, same logits). 2-D weights in ``outtype``: f32 / f16 / q8_0 written here
    (q8_0 where rows divide into its 32-blocks, else f16), the 4-bit and other llama.cpp types
    (``llamacpp.FTYPES``) by llama.cpp's own quantizer from an f32 file; norms and biases f32. The tokenizer:
    a byte-level BPE with llama.cpp's pre-tokenizer name (``tokenizer_pre`` if given, else found as
    convert_hf_to_gguf.py finds it, ``gguf_vocab.tokenizer_pre``; unknown: UserError), a sentencepiece-style
    one (Gemma) as llama.cpp's ``llama`` tokenizer model (``gguf_vocab.add_spm_tokenizer``).
    Returns {arch, bytes, tokenizer, tokenizer_pre, tokenizer_pre_from, outtype, stored_params, notes}."""
    out = Path(out)
    if outtype not in OUTTYPES:
        raise UserError(f"expected one of {', '.join(OUTTYPES)}", field="outtype", value=outtype)
    _check_out(out, overwrite)
    cfg = model.config
    if not cfg.family.gguf:
        raise UserError(f"GGUF export: model_type {cfg.model_type!r} is not supported yet ({supporting('gguf')})")
    arch = gguf_families.arch_of(cfg)
    gguf_families.check(cfg, arch)
    gguf_families.layout(cfg, arch, pad)  # refusals before any work
    kind, pre, pre_from = _resolve_tokenizer(tokenizer, tokenizer_pre)
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
        written = _write_gguf(model, tmp, "f32" if quantized else outtype, tokenizer if kind else None, kind, pre,
                              pad)
        if quantized:
            src, tmp = tmp, temp()
            llamacpp.quantize(src, tmp, outtype)
        os.replace(tmp, out)
    finally:
        for name in tmps:
            Path(name).unlink(missing_ok=True)
    return {"bytes": out.stat().st_size, "tokenizer": kind is not None, "tokenizer_pre": pre,
            "tokenizer_pre_from": pre_from, "outtype": outtype, **written}


def _write_gguf(model: LlamaForCausalLM, path: str, outtype: str, tokenizer, kind: str | None, pre: str | None,
                pad: bool) -> dict:
    """Write the GGUF (f32 / f16 / q8_0) to ``path``; returns {arch, stored_params, padded_heads, notes}."""
    tensors, lay, arch_name = gguf_tensors(model, pad=pad)
    cfg = model.config
    arch = gguf_families.arch_of(cfg)
    ctx, note = gguf_families.context_note(lay, arch)
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
    w = gguf.GGUFWriter(path, arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(str(cfg.extra_hf.get("_name_or_path", "jaxprune")))
    w.add_block_count(lay.num_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(lay.hidden_size)
    w.add_feed_forward_length(_per_layer(lay, lay.mlp_width))
    w.add_head_count(_per_layer(lay, lay.heads))
    w.add_head_count_kv(_per_layer(lay, lay.kv_heads))
    w.add_key_length(lay.head_dim)
    w.add_value_length(lay.head_dim)
    w.add_rope_dimension_count(rotary_dim(lay))
    w.add_rope_freq_base(lay.rope_theta)
    if lay.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(lay.rope_scaling["factor"]))
    elif lay.rope_type == "longrope":  # as convert_hf_to_gguf.py's Phi3MiniModel
        w.add_rope_scaling_attn_factors(attention_scaling(lay))
        w.add_rope_scaling_orig_ctx_len(int(lay.rope_scaling["original_max_position_embeddings"]))
    if arch.name in ("gemma3", "phi3"):  # phi3: 0 for none, as convert_hf_to_gguf.py writes it (b4965 needs the key)
        w.add_sliding_window(int(lay.sliding_window or 0))
    w.add_layer_norm_rms_eps(lay.rms_norm_eps)
    w.add_vocab_size(lay.vocab_size)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    if kind == "spm":
        gguf_vocab.add_spm_tokenizer(w, tokenizer)
    elif kind == "bpe":
        gguf_vocab.add_tokenizer(w, tokenizer, pre)
    else:
        for key, tid in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id)):
            if isinstance(tid, int):
                getattr(w, f"add_{key}_token_id")(tid)
    for name, t in tensors.items():
        qtype = qtypes[outtype] if t.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16
        if qtype == gguf.GGMLQuantizationType.F16:  # XLA's f32 -> f16 (round to nearest even, as numpy), ~10x faster
            data = np.asarray(jnp.asarray(t).astype(jnp.float16))
        else:
            data = gguf.quants.quantize(t, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    padded = sum(lay.heads(i) - cfg.heads(i) for i in range(cfg.num_layers))
    return {"arch": arch_name, "stored_params": lay.num_params(), "padded_heads": padded,
            "notes": [note] if note else []}


# ---- reading ------------------------------------------------------------------
def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (a one-line UserError for a file that is not GGUF)."""
    return str(_field(open_gguf(path), "general.architecture", ""))


def has_tokenizer(path: Path) -> bool:
    """True when the GGUF file carries tokenizer.ggml.* metadata."""
    return "tokenizer.ggml.model" in open_gguf(path).fields


#: the model_type each readable arch comes back as (a Mistral written as llama reads back as LLaMA)
ARCH_MODEL_TYPES = {"llama": "llama", "deci": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text",
                    "phi3": "phi3"}


def config_from_gguf(reader, names: set[str]) -> ModelConfig:
    """ModelConfig from a GGUF's metadata (per-layer arrays allowed) and tensor names, for the archs jaxprune
    writes (``READABLE_ARCHS``), as llama.cpp reads them: Gemma 3's fixed layer pattern, local RoPE base and
    attention scale, Phi-3's rotary dims, window and longrope factors."""
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
    head_dim = int(k("attention.key_length", 0) or hidden // max(heads))
    rot = int(k("rope.dimension_count", 0) or head_dim)
    scaling = None
    stype = k("rope.scaling.type")
    if stype not in (None, "none"):
        if stype != "linear":
            raise UserError(f"GGUF: rope scaling {stype!r} is not supported (linear)")
        scaling = {"rope_type": "linear", "factor": float(k("rope.scaling.factor"))}
    ctx = int(k("context_length", 2048))
    if "rope_factors_long.weight" in names:  # Phi-3's longrope
        factors = {t.name: [float(x) for x in np.asarray(t.data, np.float32)] for t in reader.tensors
                   if t.name.startswith("rope_factors_")}
        scaling = {"rope_type": "longrope", "long_factor": factors["rope_factors_long.weight"],
                   "short_factor": factors["rope_factors_short.weight"],
                   "original_max_position_embeddings": int(k("rope.scaling.original_context_length", ctx)),
                   "attention_factor": float(k("rope.scaling.attn_factor", 1.0))}
    vocab = reader.tensors[[t.name for t in reader.tensors].index("token_embd.weight")].shape
    has = lambda *kinds: any(f"blk.{i}.{kind}.bias" in names for i in range(L) for kind in kinds)  # noqa: E731
    attn_bias, o_bias, mlp_bias = has("attn_q", "attn_k", "attn_v"), has("attn_output"), \
        has("ffn_gate", "ffn_up", "ffn_down")
    window = int(k("attention.sliding_window", 0) or 0) or None
    fields = {}
    if arch == "gemma3":
        types = gguf_families.gemma3_layer_types(L) if window else None
        fields = dict(hidden_act="gelu_pytorch_tanh", norm_one_plus=True, sandwich_norms=True, scale_embeddings=True,
                      qk_norm=True, layer_types=types, sliding_window=window,
                      rope_local_base_freq=float(k("rope.freq_base_swa", gguf_families.GEMMA3_LOCAL_BASE)),
                      query_pre_attn_scalar=float(hidden // max(heads) if L == 62 else head_dim),
                      final_logit_softcapping=k("final_logit_softcapping"))
    elif arch == "qwen3":
        fields = dict(qk_norm=True)
    elif arch == "phi3":
        fields = dict(sliding_window=window, partial_rotary_factor=rot / head_dim)
    elif rot != head_dim:
        raise UserError(f"GGUF: {arch}.rope.dimension_count {rot} != head dim {head_dim} is not supported")
    base = ModelConfig(
        vocab_size=int(max(vocab)), hidden_size=hidden, intermediate_size=max(ffn), num_layers=L,
        num_heads=max(heads), num_kv_heads=max(kvs), head_dim=head_dim, model_type=ARCH_MODEL_TYPES[arch],
        rope_theta=float(k("rope.freq_base", 10000.0)), rope_scaling=scaling, max_position_embeddings=ctx,
        rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in names, attention_bias=attn_bias, mlp_bias=mlp_bias,
        attention_out_bias=None if o_bias == attn_bias else o_bias,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"), **fields)
    return base.with_layer_widths(heads, kvs, ffn)


def load_gguf_file(path: Path, dtype=jnp.float32) -> tuple[LlamaForCausalLM, ModelConfig]:
    """A GGUF of an arch jaxprune writes (``READABLE_ARCHS``) -> jaxprune model, dequantised with ``gguf.quants``
    (no torch): the inverse of ``gguf_tensors`` (q / k rows unpermuted for llama / deci, Gemma's 1 + w norms
    back to w, Phi-3's fused tensors split)."""
    path = Path(path)
    reader = open_gguf(path)
    names = {t.name for t in reader.tensors}
    cfg = config_from_gguf(reader, names)
    arch_name = str(_field(reader, "general.architecture"))
    arch = gguf_families.ARCHS["llama" if arch_name == "deci" else arch_name]
    inverse = {v: k for k, v in GGUF_LINEARS.items()}
    norms = {v: k for k, v in arch.norms.items()}
    shift = np.float32(arch.norm_shift)
    arrays = {}

    def linear(i: int, proj: str, leaf: str, a: np.ndarray) -> None:
        if arch.permute_qk and proj in ("q_proj", "k_proj"):
            a = unpermute_qk(a, cfg.heads(i) if proj == "q_proj" else cfg.kv_heads(i))
        block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        arrays[("layers", i, block, proj, "kernel" if leaf == "weight" else "bias")] = \
            np.ascontiguousarray(a.T) if leaf == "weight" else a

    for t in reader.tensors:
        a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            arrays[("embed_tokens",)] = a
        elif t.name == "output_norm.weight":
            arrays[("norm", "weight")] = a - shift
        elif t.name == "output.weight":
            arrays[("lm_head", "kernel")] = np.ascontiguousarray(a.T)
        elif t.name.startswith("rope_factors_"):
            continue  # read into the config
        elif parts[0] == "blk" and parts[2] == "attn_qkv":  # Phi-3: [q; k; v] rows
            i = int(parts[1])
            q, kv = cfg.heads(i) * cfg.head_dim, cfg.kv_heads(i) * cfg.head_dim
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), np.split(a, [q, q + kv])):
                linear(i, proj, parts[3], part)
        elif parts[0] == "blk" and parts[2] == "ffn_up" and arch.fused:  # Phi-3: [gate; up] rows
            for proj, part in zip(("gate_proj", "up_proj"), np.split(a, 2)):
                linear(int(parts[1]), proj, parts[3], part)
        elif parts[0] == "blk" and parts[2] in inverse:
            linear(int(parts[1]), inverse[parts[2]], parts[3], a)
        elif parts[0] == "blk" and parts[2] in norms:
            norm = norms[parts[2]]
            where = ("self_attn", norm) if norm in ("q_norm", "k_norm") else (norm,)
            arrays[("layers", int(parts[1]), *where, "weight")] = a - shift
        elif t.name == "rope_freqs.weight":
            raise UserError(f"{path}: rope_freqs (llama3 rope) is not supported by jaxprune's GGUF reader")
        else:
            raise UserError(f"{path}: unexpected tensor {t.name!r} in a {arch_name} GGUF")
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
