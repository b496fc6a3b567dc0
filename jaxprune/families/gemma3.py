"""Gemma 3 (text, ``gemma3_text``): GeGLU (``hidden_activation``), (1 + w) RMSNorms also around the blocks'
outputs, embeddings scaled by sqrt(hidden), q/k norms, its own attention scale (``query_pre_attn_scalar``),
sliding and global layers by ``layer_types`` each with its RoPE base (transformers 5's per-layer-type
``rope_parameters``), optional tanh soft-capping of the logits; Gemma3TextConfig's own defaults."""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .base import ACTIVATIONS, Family


class Gemma3(Family):
    model_type = "gemma3_text"
    architecture = "Gemma3ForCausalLM"
    gguf_arch = "gemma3"
    hf_keys = frozenset({"hidden_activation", "query_pre_attn_scalar", "rope_local_base_freq",
                         "sliding_window_pattern", "attn_logit_softcapping", "final_logit_softcapping",
                         "use_bidirectional_attention"})
    hidden_acts = None  # hidden_activation, checked in fields
    hf_drop = ("pretraining_tp", "mlp_bias", "attention_bias", "hidden_act")
    heads_divide_hidden = True

    def normalise_hf(self, d: dict) -> dict:
        """transformers 5's per-layer-type ``rope_parameters`` (or 4's ``rope_theta`` / ``rope_local_base_freq`` /
        ``rope_scaling``, with Gemma3TextConfig's defaults 1e6 / 1e4) in the flat form: the global layers' RoPE +
        ``rope_local_base_freq``."""
        d = dict(d)
        rope = d.get("rope_parameters") or {}
        if "full_attention" in rope or "sliding_attention" in rope:
            full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise UserError(f"config: rope_parameters.sliding_attention.rope_type={local['rope_type']!r} is "
                                "not supported (default)")
            d["rope_parameters"] = {"rope_theta": 1e6, **full}
            d["rope_local_base_freq"] = local.get("rope_theta", d.get("rope_local_base_freq", 1e4))
        elif not rope:
            d.setdefault("rope_theta", 1e6)
        d.setdefault("rope_local_base_freq", 1e4)
        return d

    def fields(self, d: dict) -> dict:
        """Gemma3TextConfig (and its defaults) -> ModelConfig fields; layer_types from ``sliding_window_pattern``
        when absent (layer i slides unless (i + 1) % pattern == 0, as transformers derives it)."""
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ACTIVATIONS:
            raise UserError(f"config: hidden_activation={act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if d.get("use_bidirectional_attention"):
            raise UserError("config: gemma3_text with use_bidirectional_attention is not supported")
        if d.get("attention_bias"):
            raise UserError("config: gemma3_text with attention_bias is not supported")
        if d.get("attn_logit_softcapping") is not None:  # Gemma3Attention never passes it to its attention function
            raise UserError("config: gemma3_text with attn_logit_softcapping is not supported (transformers' "
                            "Gemma3ForCausalLM ignores it)")
        n = d["num_hidden_layers"]
        types = d.get("layer_types")
        if types is None:
            pattern = d.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        window = d.get("sliding_window", 4096)
        return {"model_type": self.model_type, "hidden_act": act, "norm_one_plus": True, "sandwich_norms": True,
                "scale_embeddings": True, "qk_norm": True, "mlp_bias": False, "attention_bias": False,
                "query_pre_attn_scalar": d.get("query_pre_attn_scalar", 256), "layer_types": tuple(types),
                "sliding_window": window if "sliding_attention" in types else None,
                "rope_local_base_freq": float(d["rope_local_base_freq"]),
                "tie_word_embeddings": bool(d.get("tie_word_embeddings", True)),
                "final_logit_softcapping": d.get("final_logit_softcapping"),
                "bos_token_id": d.get("bos_token_id", 2), "eos_token_id": d.get("eos_token_id", 1),
                "pad_token_id": d.get("pad_token_id", 0)}

    def write_hf(self, cfg: Any, d: dict) -> None:
        """Gemma3TextConfig's spelling: hidden_activation, per-layer-type rope_parameters."""
        full = dict(d.pop("rope_parameters"))
        d.update({"hidden_activation": cfg.hidden_act, "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
                  "sliding_window": cfg.sliding_window or 4096, "attn_logit_softcapping": None,
                  "final_logit_softcapping": cfg.final_logit_softcapping,
                  "layer_types": list(cfg.layer_types or ["full_attention"] * cfg.num_layers),
                  "rope_parameters": {"full_attention": full, "sliding_attention": {
                      "rope_type": "default", "rope_theta": cfg.rope_local_base_freq or cfg.rope_theta}}})
