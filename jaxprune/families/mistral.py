"""Mistral: attention limited to a ``sliding_window`` (query i sees keys j with i - W < j <= i); no biases."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .base import Family


class Mistral(Family):
    model_type = "mistral"
    architecture = "MistralForCausalLM"

    def fields(self, d: dict) -> dict:
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise UserError(f"config: {self.model_type} with biases is not a stock transformers model")
        return {"model_type": self.model_type, "sliding_window": d.get("sliding_window"), "attention_bias": False,
                "mlp_bias": False}

    def write_hf(self, cfg: Any, d: dict) -> None:
        d["sliding_window"] = cfg.sliding_window
