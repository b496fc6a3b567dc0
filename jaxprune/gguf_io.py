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

import json
import os
import tempfile
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import UserError, field_ref
from .families import supporting
from .model import LlamaForCausalLM
from .weights import dense_arrays, model_from_arrays

OUTTYPES = ("f32", "f16", "q8_0")
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
    """llama.cpp-named tensors [out, in] (LoRA merged, masks folded in, q / k rows permuted)."""
    cfg = model.config
    out = {}
    for path, a in dense_arrays(model).items():
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


def _add_tokenizer(w, tokenizer, pre: str) -> bool:
    """tokenizer.ggml.* from an HF fast BPE tokenizer (gpt2 model); False when it is not one. ``pre`` is
    llama.cpp's pre-tokenizer name (convert_hf_to_gguf.py finds it by hashing a test encoding)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE":
        return False
    vocab = tokenizer.get_vocab()
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    types = [(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED) if i in added
             else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(w, f"add_{name}_token_id")(int(tid))
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    return True


def export_gguf(model: LlamaForCausalLM, out: Path, *, tokenizer=None, outtype: str = "f16",
                overwrite: bool = False, tokenizer_pre: str = "default") -> dict:
    """Write ``out`` (.gguf) atomically: llama arch when every layer has the same widths, else deci with
    per-layer head / KV-head / MLP arrays. 2-D weights in ``outtype`` (q8_0 where rows divide into its
    32-blocks, else f16), norms and biases f32. Returns {arch, bytes, tokenizer}."""
    out = Path(out)
    if outtype not in OUTTYPES:
        raise UserError(f"expected one of {', '.join(OUTTYPES)}", field="outtype", value=outtype)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: output already exists (pass {field_ref('overwrite')} to replace it)")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: parent directory does not exist")
    cfg = model.config
    if not cfg.family.gguf:
        raise UserError(f"GGUF export: model_type {cfg.model_type!r} is not supported yet ({supporting('gguf')})")
    if cfg.rope_type not in ("default", "linear"):
        raise UserError(f"GGUF export: rope_type {cfg.rope_type!r} is not supported yet (default, linear)")
    arch = "llama" if cfg.is_uniform else "deci"
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
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
        has_tokenizer = tokenizer is not None and _add_tokenizer(w, tokenizer, tokenizer_pre)
        if not has_tokenizer:
            for key, tid in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id)):
                if isinstance(tid, int):
                    getattr(w, f"add_{key}_token_id")(tid)
        for name, t in gguf_tensors(model).items():
            qtype = qtypes[outtype] if t.ndim == 2 else gguf.GGMLQuantizationType.F32
            if qtype == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % 32:
                qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(t, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"arch": arch, "bytes": out.stat().st_size, "tokenizer": has_tokenizer, "outtype": outtype}


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
    base = ModelConfig(
        vocab_size=int(max(vocab)), hidden_size=hidden, intermediate_size=max(ffn), num_layers=L,
        num_heads=max(heads), num_kv_heads=max(kvs), head_dim=head_dim,
        rope_theta=float(k("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(k("context_length", 2048)),
        rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in names, attention_bias="blk.0.attn_q.bias" in names,
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
    return model_from_arrays(cfg, arrays, dtype=dtype, source=str(path)), cfg
