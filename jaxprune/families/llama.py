"""LLaMA: the reference every other family is a delta from; the only one vLLM DeciLM export writes."""

from __future__ import annotations

from .base import Family


class Llama(Family):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    hf_drop = ()  # ModelConfig.to_hf_dict's dict is LLaMA's
    vllm_deci = True
    output_biases = True
