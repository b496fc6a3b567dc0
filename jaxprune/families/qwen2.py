"""Qwen2: q/k/v bias, none on o (transformers' Qwen2Attention); full attention in every layer (its
``use_sliding_window`` / sliding ``layer_types`` are refused)."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .base import Family


class Qwen2(Family):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    gguf_arch = "qwen2"

    def fields(self, d: dict) -> dict:
        if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or ()):
            raise UserError(f"config: {self.model_type} with use_sliding_window / sliding_attention layers is not "
                            "supported")
        return {"model_type": self.model_type, **self.attention_fields(d)}

    def attention_fields(self, d: dict) -> dict:
        return {"attention_bias": True, "attention_out_bias": False, "mlp_bias": False}

    def write_hf(self, cfg: Any, d: dict) -> None:
        d.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
                  "layer_types": ["full_attention"] * cfg.num_layers})
