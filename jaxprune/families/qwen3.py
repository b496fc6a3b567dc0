"""Qwen3: Qwen2's config without the forced q/k/v bias (``attention_bias`` as given, o too), plus q and k
RMS-normalised per head before RoPE (``qk_norm``)."""

from __future__ import annotations

from .qwen2 import Qwen2


class Qwen3(Qwen2):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    gguf_arch = "qwen3"
    hf_drop = ("pretraining_tp", "mlp_bias")  # Qwen3Config has attention_bias

    def attention_fields(self, d: dict) -> dict:
        return {"qk_norm": True, "mlp_bias": False}
