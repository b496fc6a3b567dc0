"""Rotary position embeddings: default, linear, dynamic (NTK) and llama3 scalings.

Follows transformers' ``modeling_rope_utils`` so logits match HF to fp32 precision.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def inv_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> np.ndarray:
    """The [head_dim // 2] inverse frequencies for ``cfg``'s rope type (fp32, as HF computes them)."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    sc = cfg.rope_scaling or {}
    rtype = cfg.rope_type
    if rtype == "dynamic" and seq_len is not None:
        max_pos = sc.get("original_max_position_embeddings", cfg.max_position_embeddings)
        if seq_len > max_pos:
            factor = sc["factor"]
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
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


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray, seq_len: int | None = None):
    """cos, sin of shape [..., head_dim] for integer ``positions`` [...]."""
    inv = jnp.asarray(inv_frequencies(cfg, seq_len))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, S, H, D]; cos/sin [B, S, D] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
