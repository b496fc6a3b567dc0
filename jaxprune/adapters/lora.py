"""LoRA: ``y = x @ W + s·(x @ A) @ B + b``, A [in, r], B [r, out] trainable, s = α / r, B = 0 at the start.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685). The layer is
``layers.Linear`` itself (``add_lora`` / ``set_lora``): A ~ U(±1/√in) as PEFT's kaiming-uniform (a = √5) init,
B = 0, fp32 factors; merged as ``W + s·A@B``.
"""

from __future__ import annotations

from .registry import Adapter, register_adapter

LORA = register_adapter(Adapter(
    "lora", summary="W + s·A@B (A [in, r], B [r, out] trained; s = α/r)", convert=None,
    citation="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685; "
             "huggingface/peft src/peft/tuners/lora/layer.py",
    lora_guided=True, saves_unmerged=True))
