"""One entry point for every MODEL argument: HF dir, .gguf file, jaxprune checkpoint or run dir."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from . import checkpoint, gguf_io, hf
from .errors import UserError
from .model import LlamaForCausalLM

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def resolve(path: str | Path) -> tuple[str, Path]:
    """(kind, path) with kind in {'checkpoint', 'hf', 'gguf'}; a run dir resolves to its ``model/``."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", p
        if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
            raise UserError(f"{p}: pickle weights are refused; convert to safetensors "
                            "(transformers: model.save_pretrained(OUT, safe_serialization=True))")
        raise UserError(f"{p}: not a model (expected an HF dir, a .gguf file or a jaxprune checkpoint)")
    if checkpoint.is_checkpoint(p):
        return "checkpoint", p
    if checkpoint.is_checkpoint(p / "model"):
        return "checkpoint", p / "model"
    if (p / "config.json").exists():
        return "hf", p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise UserError(f"{p}: not a model dir (no config.json, jaxprune.json, model/ or single .gguf)")


def load_model(path: str | Path, dtype: str | None = None) -> LlamaForCausalLM:
    kind, p = resolve(path)
    dt = DTYPES[dtype] if dtype else None
    if kind == "checkpoint":
        return checkpoint.load_model(p, dt)
    if kind == "gguf":
        if gguf_io.gguf_architecture(p) in gguf_io.READABLE_ARCHS:  # every arch export writes (gguf_families)
            return gguf_io.load_gguf_file(p, dt or jnp.float32)[0]
        return hf.load_gguf(p, dt or jnp.float32)[0]
    return hf.load_hf_dir(p, dt)[0]


def load_tokenizer(path: str | Path, required: bool = True):
    """The model's tokenizer; ``required=False`` returns None when the model has none."""
    kind, p = resolve(path)
    tok = hf.load_tokenizer(p)
    if tok is None and required:
        raise UserError(f"{p}: no tokenizer files found next to the model")
    return tok
