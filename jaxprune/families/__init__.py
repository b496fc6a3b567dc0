"""The model families, one module each (``model_type`` -> ``Family``): what each reads from and writes to an
HF ``config.json`` beyond LLaMA's keys, and the tensors it stores differently. A new family is a module with a
``Family`` subclass and one entry in ``FAMILIES``."""

from __future__ import annotations

from .base import ACTIVATIONS, LAYER_TYPES, Family
from .gemma3 import Gemma3
from .llama import Llama
from .mistral import Mistral
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen3 import Qwen3

FAMILIES: dict[str, Family] = {f.model_type: f for f in (Llama(), Mistral(), Qwen2(), Qwen3(), Phi3(), Gemma3())}
#: HF keys some family reads: ``ModelConfig.from_hf_dict`` never carries them through in ``extra_hf``
HF_KEYS = frozenset().union(*(f.hf_keys for f in FAMILIES.values()))


def supporting(capability: str) -> str:
    """'llama': the model_types whose ``capability`` (``gguf``, ``vllm_deci``) is set, for error messages."""
    return ", ".join(t for t, f in FAMILIES.items() if getattr(f, capability))


__all__ = ["ACTIVATIONS", "FAMILIES", "HF_KEYS", "LAYER_TYPES", "Family", "supporting"]
