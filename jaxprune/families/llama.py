"""LLaMA: the reference every other family is a delta from; the only one GGUF and vLLM DeciLM export write."""

from __future__ import annotations

from .base import Family


class Llama(Family):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    hf_drop = ()  # ModelConfig.to_hf_dict's dict is LLaMA's
    gguf = True
    vllm_deci = True
    output_biases = True
