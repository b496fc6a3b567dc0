"""Phi-3: Mistral's config (sliding window, no biases) with q/k/v and gate/up stored fused (split on load,
fused on export), RoPE over a fraction of head_dim (``partial_rotary_factor``) and longrope (HF's su / yarn)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .mistral import Mistral


class Phi3(Mistral):
    model_type = "phi3"
    architecture = "Phi3ForCausalLM"
    gguf_arch = "phi3"
    rope_type_aliases = {"su": "longrope", "yarn": "longrope"}
    writes_partial_rotary = True

    def split_tensors(self, tensors: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
        """Fused ``qkv_proj`` [(H + 2·KV)·D, hidden] and ``gate_up_proj`` [2·m, hidden] (HF [out, in]) -> LLaMA's
        q/k/v and gate/up (rows in that order, as Phi3Attention / Phi3MLP slice them)."""
        out = dict(tensors)
        for i in range(cfg.num_layers):
            pre = f"model.layers.{i}"
            if (qkv := out.pop(f"{pre}.self_attn.qkv_proj.weight", None)) is not None:
                q, kv = cfg.heads(i) * cfg.head_dim, cfg.kv_heads(i) * cfg.head_dim
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(qkv, [q, q + kv])):
                    out[f"{pre}.self_attn.{name}.weight"] = part
            if (gate_up := out.pop(f"{pre}.mlp.gate_up_proj.weight", None)) is not None:
                for name, part in zip(("gate_proj", "up_proj"), np.split(gate_up, 2)):
                    out[f"{pre}.mlp.{name}.weight"] = part
        return out

    def fuse_tensors(self, tensors: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
        out = dict(tensors)
        for i in range(cfg.num_layers):
            pre = f"model.layers.{i}"
            out[f"{pre}.self_attn.qkv_proj.weight"] = np.concatenate(
                [out.pop(f"{pre}.self_attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj")])
            out[f"{pre}.mlp.gate_up_proj.weight"] = np.concatenate(
                [out.pop(f"{pre}.mlp.{n}.weight") for n in ("gate_proj", "up_proj")])
        return out
