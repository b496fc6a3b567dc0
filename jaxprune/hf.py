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
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from . import deci, gguf_io
from .config import ModelConfig, Rule, check_field, check_hf_fields
from .errors import UserError
from .fileio import check_output_dir, replace_dir
from .model import LlamaForCausalLM
from .padding import pad_to_layout
from .weights import abstract_model, dense_arrays, model_from_arrays

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)$")
_NORM = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
                   r"|post_feedforward_layernorm)\.weight$")  # the last two: Gemma 3
_QK_NORM = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight$")  # Qwen3, Gemma 3
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
    if m := _QK_NORM.match(name):
        return ("layers", int(m.group(1)), "self_attn", m.group(2), "weight"), False
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise UserError(f"unexpected tensor {name!r} in a LLaMA-family checkpoint")


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
    if path[0] == "layers" and len(path) == 5:  # Qwen3's self_attn.q_norm / k_norm
        return f"model.layers.{path[1]}.{path[2]}.{path[3]}.weight", False
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


#: the weight dtypes read (anything else, e.g. an integer tensor, is a UserError naming it)
WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _read_safetensors(files: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """(HF name -> array, HF name -> the file it came from); a damaged file or a non-float tensor is a UserError."""
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    for f in files:
        if not f.exists():
            raise UserError(f"{f}: shard named in the index is missing")
        try:
            part = load_file(f)
        except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as e:
            # TypeError / AttributeError: a dtype numpy has no type for (safetensors' numpy reader)
            raise UserError(f"{f}: truncated or corrupt safetensors file ({str(e).splitlines()[0]})") from None
        for name, arr in part.items():
            if arr.dtype.name not in WEIGHT_DTYPES:
                raise UserError(f"{f}: tensor {name} has dtype {arr.dtype.name} (weights are "
                                f"{', '.join(WEIGHT_DTYPES)})")
        tensors.update(part)
        origin.update(dict.fromkeys(part, f))
    return tensors, origin


def _check_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], origin: dict[str, Path], where: Path) -> None:
    """Each HF tensor of the model present with the shape config.json implies (HF's [out, in])."""
    layers = {int(m.group(1)) for name in tensors if (m := re.match(r"^model\.layers\.(\d+)\.", name))}
    if max(layers, default=-1) + 1 != cfg.num_layers:
        raise UserError(f"{where}: the weights hold {max(layers, default=-1) + 1} layers, config.json's "
                        f"num_hidden_layers is {cfg.num_layers}")
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)):
        name, transpose = path_to_hf_name(tuple(path))
        want = tuple(var.get_value().shape)[::-1] if transpose else tuple(var.get_value().shape)
        if name not in tensors:
            raise UserError(f"{where}: tensor {name} is missing")
        got = tuple(tensors[name].shape)
        if got != want:
            raise UserError(f"{origin.get(name, where)}: tensor {name} has shape {list(got)}, config.json implies "
                            f"{list(want)}")


def _read_json(f: Path, what: str):
    try:
        return json.loads(f.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise UserError(f"{f}: not valid JSON {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def _shard_files(path: Path, index: Path) -> list[Path]:
    """The shards an index's ``weight_map`` names (plain file names in ``path``)."""
    d = _read_json(index, "index")
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: weight_map must be a mapping of tensor name to shard file")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise UserError(f"{index}: weight_map[{name!r}]={shard!r} must be a file name in {path}")
    return sorted({path / f for f in weight_map.values()})


def load_hf_dir(path: Path, dtype=None) -> tuple[LlamaForCausalLM, ModelConfig]:
    """An HF model dir (config.json + safetensors, single or sharded) -> jaxprune model.

    Anything wrong in a file is a UserError naming the file and the field or tensor."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{path}: no config.json (not an HF model dir)")
    d = _read_json(cfg_file, "config")
    try:
        cfg = config_from_hf_json(d)
    except UserError as e:
        raise UserError(f"{cfg_file}: {e.message.removeprefix('config: ')}") from None
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = _shard_files(path, index)
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise UserError(f"{path}: only pickle weights ({pickles[0]}); jaxprune loads safetensors only. "
                            "Convert with: python -c \"from transformers import AutoModelForCausalLM as M; "
                            f"M.from_pretrained('{path}').save_pretrained('OUT', safe_serialization=True)\"")
        raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")
    where = files[0] if len(files) == 1 else index
    tensors, origin = _read_safetensors(files)
    try:
        tensors = cfg.family.split_tensors(tensors, cfg)  # Phi-3's fused qkv / gate_up
    except ValueError as e:  # a fused tensor whose rows do not split as config.json says
        raise UserError(f"{where}: fused tensors do not split as config.json implies ({e})") from None
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if cfg.tie_word_embeddings and head is not None and embed is not None and not np.array_equal(head, embed):
        raise UserError(f"{origin['lm_head.weight']}: tensor lm_head.weight differs from model.embed_tokens.weight, "
                        "but config.json's tie_word_embeddings is true (false unties them)")
    for name in tensors:
        try:
            hf_name_to_path(name)
        except UserError as e:
            raise UserError(f"{origin.get(name, where)}: {e.message}") from None
    _check_tensors(cfg, tensors, origin, where)
    arrays = _arrays_from_hf_tensors(tensors)
    if dtype is None:
        dtype = arrays[("embed_tokens",)].dtype
    return model_from_arrays(cfg, arrays, dtype=dtype, source=str(path)), cfg


def config_from_hf_json(d: dict) -> ModelConfig:
    """An HF ``config.json`` dict (stock LLaMA, or vLLM's per-layer DeciLM form) -> ModelConfig."""
    if isinstance(d, dict) and d.get("model_type") == deci.MODEL_TYPE:
        check_hf_fields(d, required=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"))
        _check_deci_blocks(d)
        return deci.from_deci_dict(d)
    return ModelConfig.from_hf_dict(d)


def _check_deci_blocks(d: dict) -> None:
    """The types and ranges of the ``block_configs`` fields ``deci.from_deci_dict`` reads."""
    blocks = d.get("block_configs")
    if not isinstance(blocks, list) or len(blocks) != d["num_hidden_layers"]:
        raise UserError("config: nemotron-nas needs block_configs with one entry per layer")
    for i, b in enumerate(blocks):
        where = f"block_configs[{i}]"
        if not isinstance(b, dict):
            raise UserError(f"config: {where}={b!r} must be a mapping")
        for part in ("attention", "ffn"):
            if not isinstance(b.get(part, {}), dict):
                raise UserError(f"config: {where}.{part}={b[part]!r} must be a mapping")
            for flag in ("no_op", "replace_with_linear"):
                check_field(f"{where}.{part}.{flag}", b.get(part, {}).get(flag), Rule("bool", null=True))
        check_field(f"{where}.attention.n_heads_in_group", b.get("attention", {}).get("n_heads_in_group"),
                    Rule("int", 1))
        ffn = b.get("ffn", {})
        check_field(f"{where}.ffn.ffn_mult", ffn.get("ffn_mult"), Rule("number", 0, lo_open=True, null=True))
        check_field(f"{where}.ffn.intermediate_size", ffn.get("intermediate_size"), Rule("int", 0, null=True))


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
    tensors = cfg.family.split_tensors(tensors, cfg)
    return model_from_arrays(cfg, _arrays_from_hf_tensors(tensors), dtype=dtype, source=str(path)), cfg


def load_tokenizer(path: Path):
    """The tokenizer of an HF dir, a jaxprune checkpoint dir or a GGUF file."""
    path = Path(path)
    if path.suffix != ".gguf" and not any((path / f).exists()
                                          for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None  # checked before importing transformers (seconds of imports for nothing)
    if path.suffix == ".gguf":
        if not gguf_io.has_tokenizer(path):
            return None
        # the fast class directly: AutoTokenizer would first build a transformers config, which has no
        # form for the per-layer 'deci' architecture
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    if (path / "tokenizer.json").exists():
        # The fast tokenizer alone: same ids as AutoTokenizer, without importing torch (seconds per CLI run).
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


# ---- export -----------------------------------------------------------------
def hf_tensors(model: LlamaForCausalLM, layout: ModelConfig | None = None
               ) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """HF-named tensors [out, in] with LoRA merged and masks folded in, zero-padded to ``layout``'s
    per-layer widths when given (``padding.pad_to_layout``)."""
    cfg = model.config
    arrays = {p: np.asarray(a) for p, a in dense_arrays(model).items()}
    if layout is not None and layout != cfg:
        arrays, cfg = pad_to_layout(arrays, cfg, layout), layout
    tensors = {}
    for path, arr in arrays.items():
        name, transpose = path_to_hf_name(path)
        tensors[name] = np.ascontiguousarray(arr.T) if transpose else np.ascontiguousarray(arr)
    return cfg.family.fuse_tensors(tensors, cfg), cfg


NON_UNIFORM_OPTIONS = ("--format gguf (per-layer arrays), --format vllm (DeciLM per-layer config), "
                       "--pad (zero-padded to dense shape, same logits) or prune with --widths uniform")


def export_hf(model: LlamaForCausalLM, out_dir: Path, *, tokenizer=None, overwrite: bool = False,
              dtype=None, shard_bytes: int = SHARD_BYTES, pad: bool = False) -> Path:
    """Write a stock-transformers LLaMA dir (config.json, model.safetensors[.index.json], tokenizer) atomically.

    The file holds exactly the model's parameters. A model whose layers differ in width has no stock
    config: it is refused unless ``pad`` (zero-padded to the widest layer, same logits, dense size).
    A Gemma 3 whose head count does not divide hidden_size gets zero query heads up to one that does
    (``ModelConfig.stock_layout``: transformers refuses the config otherwise).
    """
    cfg = model.config
    if not cfg.is_uniform and not pad:
        raise UserError(f"the model's layers differ in width ({describe_layout(cfg)}); a stock transformers "
                        f"config cannot describe it without padding. Use {NON_UNIFORM_OPTIONS}")
    layout = (cfg if cfg.is_uniform else cfg.padded()).stock_layout()
    return write_hf_dir(model, out_dir, layout, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype,
                        shard_bytes=shard_bytes)


def export_vllm(model: LlamaForCausalLM, out_dir: Path, *, tokenizer=None, overwrite: bool = False,
                dtype=None) -> Path:
    """Write the per-layer-width DeciLM (``nemotron-nas``) dir that vLLM serves (see ``deci``): LLaMA tensor
    names, ``block_configs`` with each layer's ``n_heads_in_group`` and ``ffn_mult``; padded only where that
    form cannot express a width."""
    layout = deci.deci_layout(model.config)
    return write_hf_dir(model, out_dir, layout, hf_config=deci.to_deci_dict(layout), tokenizer=tokenizer,
                        overwrite=overwrite, dtype=dtype, extra_files={deci.CONFIG_FILE: deci.CONFIG_CODE})


def describe_layout(cfg: ModelConfig) -> str:
    """'heads 6-9, KV heads 2-3, MLP 768-1536': the range of each per-layer width."""
    def span(f):
        vals = [f(i) for i in range(cfg.num_layers)]
        return f"{min(vals)}" if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}"
    return f"heads {span(cfg.heads)}, KV heads {span(cfg.kv_heads)}, MLP {span(cfg.mlp_width)}"


def write_hf_dir(model: LlamaForCausalLM, out_dir: Path, layout: ModelConfig, *, hf_config: dict | None = None,
                 tokenizer=None, overwrite: bool = False, dtype=None, shard_bytes: int = SHARD_BYTES,
                 extra_files: dict[str, str] | None = None) -> Path:
    """The model's tensors padded to ``layout`` under HF names + ``hf_config`` (default: the stock LLaMA
    config of ``layout``) + ``extra_files`` ({name: text}), written atomically to ``out_dir``."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    tensors, _ = hf_tensors(model, layout)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        cfg_dict = dict(hf_config) if hf_config is not None else layout.to_hf_dict()
        cfg_dict["dtype"] = str(next(iter(tensors.values())).dtype)
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        _write_shards(tensors, tmp, shard_bytes, save_file)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
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
