"""What a model family is to jaxprune: an HF ``model_type`` whose config and tensors map onto the one decoder.

A family reads its HF ``config.json`` keys into ``ModelConfig`` fields beyond LLaMA's (``fields``), writes them
back into the LLaMA-shaped dict ``ModelConfig.to_hf_dict`` starts from (``to_hf``), and splits / fuses tensors
HF stores differently from LLaMA (``split_tensors`` on load, ``fuse_tensors`` on export). Families see configs
duck-typed (``cfg`` is a ``ModelConfig``; this package sits below ``config`` and does not import it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

#: MLP activations: SwiGLU's silu, Gemma's GeGLU with tanh-approximate GELU
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


class Family:
    """LLaMA's behaviour; each family overrides what differs."""

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""  # the transformers class written to ``architectures``
    #: HF keys read beyond LLaMA's (never carried through in ``extra_hf``)
    hf_keys: ClassVar[frozenset[str]] = frozenset()
    #: the HF ``hidden_act`` values accepted; None: ``fields`` checks the family's own activation key
    hidden_acts: ClassVar[tuple[str, ...] | None] = ("silu",)
    #: HF rope types read as ours (Phi-3: su / yarn -> longrope)
    rope_type_aliases: ClassVar[dict[str, str]] = {}
    #: whether ``rope_parameters.partial_rotary_factor`` is written even when 1.0
    writes_partial_rotary: ClassVar[bool] = False
    #: keys of LLaMA's HF dict that this family's config class does not have
    hf_drop: ClassVar[tuple[str, ...]] = ("pretraining_tp", "mlp_bias", "attention_bias")
    #: its config class requires hidden_size % num_attention_heads == 0 (``ModelConfig.stock_layout``)
    heads_divide_hidden: ClassVar[bool] = False
    #: export capabilities: GGUF (as llama.cpp's ``gguf_arch``, see ``gguf_families``), vLLM's per-layer DeciLM
    gguf: ClassVar[bool] = True
    gguf_arch: ClassVar[str] = "llama"
    vllm_deci: ClassVar[bool] = False
    #: its HF config can hold o_proj and down_proj biases (LLaMA's attention_bias / mlp_bias, the other
    #: biases then zero): what FLAP's bias compensation writes
    output_biases: ClassVar[bool] = False

    def normalise_hf(self, d: dict) -> dict:
        """The HF dict in the flat spelling ``ModelConfig.from_hf_dict`` reads (a new dict when changed)."""
        return d

    def fields(self, d: dict) -> dict:
        """The ModelConfig fields this family sets beyond LLaMA's keys, read from HF dict ``d``."""
        return {}

    def to_hf(self, cfg: Any, d: dict) -> dict:
        """LLaMA's HF dict ``d`` of ``cfg`` made this family's (in place; returned)."""
        for key in self.hf_drop:
            d.pop(key)
        d.update({"architectures": [self.architecture], "model_type": self.model_type})
        self.write_hf(cfg, d)
        return d

    def write_hf(self, cfg: Any, d: dict) -> None:
        """Write the family's own keys into ``d`` (in place)."""

    def split_tensors(self, tensors: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
        """HF tensors (HF names, [out, in]) -> LLaMA's tensor names, on load."""
        return tensors

    def fuse_tensors(self, tensors: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
        """The inverse of ``split_tensors``, on export."""
        return tensors
