"""HF checkpoints in and out: safetensors dirs (single or sharded), GGUF files; export.

HF stores linear weights as [out, in]; jaxprune as [in, out] (a transpose both ways,
bit-exact). ``.bin`` / pickle weights are refused: jaxprune never unpickles.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .config import ModelConfig
from .errors import UserError
from .fileio import check_output_dir, replace_dir
from .model import LlamaForCausalLM
from .weights import dense_arrays, model_from_arrays

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)$")
_NORM = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
SHARD_BYTES = 2 * 1024**3  # export shards above this size


def hf_name_to_path(name: str) -> tuple[tuple, bool] | None:
    """HF tensor name -> (our path, needs transpose); None for tensors we ignore (rotary buffers)."""
    if name == "model.embed_tokens.weight":
        return ("embed_tokens",), False
    if name == "model.norm.weight":
        return ("norm", "weight"), False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    if m := _LAYER.match(name):
        layer, block, proj, kind = m.groups()
        return ("layers", int(layer), block, proj, "kernel" if kind == "weight" else "bias"), kind == "weight"
    if m := _NORM.match(name):
        return ("layers", int(m.group(1)), m.group(2), "weight"), False
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise UserError(f"unexpected tensor {name!r} in a LLaMA checkpoint")


def path_to_hf_name(path: tuple) -> tuple[str, bool]:
    if path == ("embed_tokens",):
        return "model.embed_tokens.weight", False
    if path == ("norm", "weight"):
        return "model.norm.weight", False
    if path == ("lm_head", "kernel"):
        return "lm_head.weight", True
    if path[0] == "layers" and path[-1] in ("kernel", "bias"):
        _, i, block, proj, kind = path
        return f"model.layers.{i}.{block}.{proj}.{'weight' if kind == 'kernel' else 'bias'}", kind == "kernel"
    if path[0] == "layers":
        return f"model.layers.{path[1]}.{path[2]}.weight", False
    raise ValueError(f"no HF name for {path}")


def _arrays_from_hf_tensors(tensors: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    out = {}
    for name, arr in tensors.items():
        mapped = hf_name_to_path(name)
        if mapped is None:
            continue
        path, transpose = mapped
        out[path] = np.ascontiguousarray(arr.T) if transpose else arr
    return out


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:

    tensors: dict[str, np.ndarray] = {}
    for f in files:
        if not f.exists():
            raise UserError(f"{f}: shard named in the index is missing")
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f}: truncated or corrupt safetensors file ({str(e).splitlines()[0]})") from None
    return tensors


def load_hf_dir(path: Path, dtype=None) -> tuple[LlamaForCausalLM, ModelConfig]:
    """An HF model dir (config.json + safetensors, single or sharded) -> jaxprune model."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{path}: no config.json (not an HF model dir)")
    try:
        cfg = ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise UserError(f"{path}: only pickle weights ({pickles[0]}); jaxprune loads safetensors only. "
                            "Convert with: python -c \"from transformers import AutoModelForCausalLM as M; "
                            f"M.from_pretrained('{path}').save_pretrained('OUT', safe_serialization=True)\"")
        raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors = _read_safetensors(files)
    arrays = _arrays_from_hf_tensors(tensors)
    if dtype is None:
        dtype = arrays[("embed_tokens",)].dtype
    return model_from_arrays(cfg, arrays, dtype=dtype, source=str(path)), cfg


def load_gguf(path: Path, dtype=jnp.float32) -> tuple[LlamaForCausalLM, ModelConfig]:
    """A GGUF file -> jaxprune model, dequantised by transformers' GGUF reader (needs torch + gguf)."""
    path = Path(path)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise UserError(f"reading GGUF needs torch and transformers ({e}); "
                        "install with: pip install torch==2.13.0") from None
    try:
        hf_cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise UserError(f"{path}: cannot read GGUF ({str(e).splitlines()[0]})") from None
    d = hf_cfg.to_dict()
    d.pop("quantization_config", None)
    cfg = ModelConfig.from_hf_dict(d)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tensors = {k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return model_from_arrays(cfg, _arrays_from_hf_tensors(tensors), dtype=dtype, source=str(path)), cfg


def load_tokenizer(path: Path):
    """The tokenizer of an HF dir, a jaxprune checkpoint dir or a GGUF file."""
    path = Path(path)
    if path.suffix != ".gguf" and not any((path / f).exists()
                                          for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None  # checked before importing transformers (seconds of imports for nothing)
    if path.suffix == ".gguf":
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if (path / "tokenizer.json").exists():
        # The fast tokenizer alone: same ids as AutoTokenizer, without importing torch (seconds per CLI run).
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


# ---- export -----------------------------------------------------------------
def hf_tensors(model: LlamaForCausalLM) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """HF-named tensors [out, in] with LoRA merged and masks folded in; non-uniform layers zero-padded."""
    cfg = model.config
    arrays = {p: np.asarray(a) for p, a in dense_arrays(model).items()}
    if not cfg.is_uniform:
        arrays, cfg = pad_to_uniform(arrays, cfg)
    tensors = {}
    for path, arr in arrays.items():
        name, transpose = path_to_hf_name(path)
        tensors[name] = np.ascontiguousarray(arr.T) if transpose else np.ascontiguousarray(arr)
    return tensors, cfg


def pad_to_uniform(arrays: dict[tuple, np.ndarray], cfg: ModelConfig):
    """Zero-pad every layer to the widest layer's heads, KV heads and MLP width (exact logits).

    A padded query head has zero q/k/v rows and zero o_proj columns: its scores are 0, it
    averages zero values, and o_proj ignores it. A padded MLP channel has zero gate/up rows,
    so silu(0) * 0 = 0 feeds zero down_proj columns.
    """
    wide = cfg.padded()
    D, kvw, gw = cfg.head_dim, wide.num_kv_heads, wide.num_heads // wide.num_kv_heads
    out = dict(arrays)
    for i in range(cfg.num_layers):
        kv, g, m = cfg.kv_heads(i), cfg.heads(i) // max(cfg.kv_heads(i), 1), cfg.mlp_width(i)

        def heads_axis(a, axis, n_kv, group):
            """Scatter [.., n_kv*group*D, ..] into the wide [.., kvw*gw*D, ..] layout along ``axis``."""
            a = np.moveaxis(a, axis, 0)
            src = a.reshape((n_kv, group, D) + a.shape[1:])
            dst = np.zeros((kvw, gw, D) + a.shape[1:], a.dtype)
            dst[:n_kv, :group] = src
            return np.moveaxis(dst.reshape((kvw * gw * D,) + a.shape[1:]), 0, axis)

        def kv_axis(a, axis):
            a = np.moveaxis(a, axis, 0)
            dst = np.zeros((kvw * D,) + a.shape[1:], a.dtype)
            dst[: kv * D] = a
            return np.moveaxis(dst, 0, axis)

        def mlp_axis(a, axis):
            a = np.moveaxis(a, axis, 0)
            dst = np.zeros((wide.intermediate_size,) + a.shape[1:], a.dtype)
            dst[:m] = a
            return np.moveaxis(dst, 0, axis)

        L = ("layers", i)
        for name, fn in (("q_proj", lambda a, ax: heads_axis(a, ax, kv, g)), ("k_proj", kv_axis),
                         ("v_proj", kv_axis)):
            out[L + ("self_attn", name, "kernel")] = fn(arrays[L + ("self_attn", name, "kernel")], 1)
            if (b := L + ("self_attn", name, "bias")) in arrays:
                out[b] = fn(arrays[b], 0)
        out[L + ("self_attn", "o_proj", "kernel")] = heads_axis(arrays[L + ("self_attn", "o_proj", "kernel")], 0,
                                                                kv, g)
        for name in ("gate_proj", "up_proj"):
            out[L + ("mlp", name, "kernel")] = mlp_axis(arrays[L + ("mlp", name, "kernel")], 1)
            if (b := L + ("mlp", name, "bias")) in arrays:
                out[b] = mlp_axis(arrays[b], 0)
        out[L + ("mlp", "down_proj", "kernel")] = mlp_axis(arrays[L + ("mlp", "down_proj", "kernel")], 0)
    return out, wide


def export_hf(model: LlamaForCausalLM, out_dir: Path, *, tokenizer=None, overwrite: bool = False,
              dtype=None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write an HF dir (config.json, model.safetensors[.index.json], tokenizer) atomically."""

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    tensors, cfg = hf_tensors(model)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["dtype"] = str(next(iter(tensors.values())).dtype)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        _write_shards(tensors, tmp, shard_bytes, save_file)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_shards(tensors, directory: Path, shard_bytes: int, save_file) -> None:
    total = sum(v.nbytes for v in tensors.values())
    if total <= shard_bytes:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        if cur and size + tensors[name].nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += tensors[name].nbytes
    shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
