"""Int8 frozen base for a whole model: quantise / dequantise every decoder linear in place.

The maths (per-output-channel absmax, ``W ≈ q · s``, the int8 matmul) lives in
:mod:`jaxprune.ops.int8`; this module only walks the model. Embeddings, norms, ``lm_head``,
biases and LoRA factors stay float. A quantised base has no gradient, so only methods that never
differentiate the base use it (LoRA fine-tuning, LoRAPrune).
"""

from __future__ import annotations

from flax import nnx

from .ops.int8 import quantize_int8
from .weights import linears, path_str

QUANTIZE_CHOICES = ("none", "int8")


def quantize_base(model: nnx.Module) -> list[str]:
    """Quantise every decoder linear's kernel in place (``lm_head`` stays float); returns their paths."""
    done = []
    for path, lin in linears(model):
        name = path_str(path)
        if name == "lm_head" or lin.kernel_scale is not None or lin.kernel is None:
            continue
        lin.set_int8_kernel(*quantize_int8(lin.kernel[...]))
        done.append(name)
    return done


def dequantize_base(model: nnx.Module) -> int:
    """Undo ``quantize_base`` in place: kernels become ``q · s`` in the model's float dtype (the int8
    rounding stays). Returns the number of linears changed. Saved models are always float."""
    n = 0
    for _, lin in linears(model):
        if lin.kernel_scale is not None:
            lin.set_float_kernel(lin.base_kernel().astype(model.dtype))
            n += 1
    return n
