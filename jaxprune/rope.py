"""Rotary position embeddings: default, linear, dynamic (NTK), llama3 and longrope (Phi-3) scalings, over
all of head_dim or its first ``int(head_dim·partial_rotary_factor)`` dims; Gemma 3's sliding layers take
their own tables (base ``rope_local_base_freq``, no scaling: ``layer_rope_tables``).

Follows transformers' ``modeling_rope_utils`` so logits match HF to fp32 precision.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def inv_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> np.ndarray:
    """The [head_dim // 2] inverse frequencies for ``cfg``'s rope type (fp32, as HF computes them)."""
    dim = rotary_dim(cfg)
    base = cfg.rope_theta
    sc = cfg.rope_scaling or {}
    rtype = cfg.rope_type
    if rtype == "dynamic" and seq_len is not None:
        max_pos = sc.get("original_max_position_embeddings", cfg.max_position_embeddings)
        if seq_len > max_pos:
            factor = sc["factor"]
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    if rtype == "longrope":  # LongRoPE: per-frequency factors, long ones past the pretraining length
        orig = sc["original_max_position_embeddings"]
        ext = sc["long_factor"] if seq_len and seq_len > orig else sc["short_factor"]
        return (1.0 / (np.asarray(ext, np.float32) * np.float32(base) ** exponents)).astype(np.float32)
    inv = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    if rtype == "linear":
        inv = (inv / np.float32(sc["factor"])).astype(np.float32)
    elif rtype == "llama3":
        factor = sc["factor"]
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rotary_dim(cfg: ModelConfig) -> int:
    """How many leading dims of each head RoPE rotates."""
    return int(cfg.head_dim * cfg.partial_rotary_factor)


def attention_scaling(cfg: ModelConfig) -> float:
    """The factor on cos / sin: longrope's sqrt(1 + ln(f) / ln(original length)) (f > 1), else 1."""
    if cfg.rope_type != "longrope":
        return 1.0
    sc = cfg.rope_scaling
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    orig = sc["original_max_position_embeddings"]
    factor = sc.get("factor") or cfg.max_position_embeddings / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray, seq_len: int | None = None):
    """cos, sin of shape [..., rotary_dim] for integer ``positions`` [...]."""
    inv = jnp.asarray(inv_frequencies(cfg, seq_len))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = attention_scaling(cfg)
    if scale != 1.0:
        return jnp.cos(emb) * scale, jnp.sin(emb) * scale
    return jnp.cos(emb), jnp.sin(emb)


def local_config(cfg: ModelConfig) -> ModelConfig:
    """The RoPE config of Gemma 3's sliding layers: base ``rope_local_base_freq``, default rope."""
    return cfg.replace(rope_theta=cfg.rope_local_base_freq, rope_scaling=None)


def layer_rope_tables(cfg: ModelConfig, positions: jnp.ndarray, seq_len: int | None = None) -> dict:
    """{"global": (cos, sin)} plus {"local": ...} when some layer is local; layer i takes ``rope_kind(cfg, i)``."""
    tables = {"global": rope_tables(cfg, positions, seq_len)}
    if any(cfg.is_local(i) for i in range(cfg.num_layers)):
        tables["local"] = rope_tables(local_config(cfg), positions, seq_len)
    return tables


def rope_kind(cfg: ModelConfig, layer: int) -> str:
    return "local" if cfg.is_local(layer) else "global"


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, S, H, D]; cos/sin [B, S, R] with R <= D rotated dims (HF's rotate-half convention on the first R)."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :R], cos, sin), x[..., R:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
