"""The inputs of each layer's ``o_proj`` (heads: [..., H·D]) and ``down_proj`` (MLP channels: [..., m]) on the
calibration sequences, reduced in the same jitted forward: what activation-based criteria (FLAP, Minitron) read.

    per_chunk = unit_input_stats(inputs, mean_abs)   # [{attn: stat(x_o_proj), mlp: stat(x_down_proj)} per layer]
                                                     # for each chunk of ``inputs.calib_batch`` sequences
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError
from ..partition import combine
from .registry import ScoreInputs

#: (block, linear, key) of the tapped inputs
TAPPED = (("self_attn", "o_proj", "attn"), ("mlp", "down_proj", "mlp"))


def sums_and_squares(x: jax.Array):
    """x [B, S, in] -> per sequence (Σ_t x, Σ_t x²), each [B, in] (FLAP)."""
    return x.sum(axis=1), (x * x).sum(axis=1)


def mean_abs(x: jax.Array):
    """x [B, S, in] -> per sequence mean_t |x| [B, in] (Minitron)."""
    return jnp.abs(x).mean(axis=1)


class _Tap:
    """Wraps a Linear inside a traced forward: records ``stat`` of its fp32 input."""

    def __init__(self, inner, sink: list, stat):
        self.inner, self.sink, self.stat = inner, sink, stat

    def __call__(self, x):
        self.sink.append(self.stat(x.astype(jnp.float32)))
        return self.inner(x)


@partial(jax.jit, static_argnums=(0, 5))
def _tapped_forward(graphdef, frozen, trainable, masks, tokens, stat):
    """tokens [B, S] -> per layer {attn, mlp: stat(input)} of o_proj / down_proj."""
    model = combine(graphdef, frozen, trainable, masks)
    model.remat = False
    sinks = []
    for layer in model.layers:
        sink: list = []
        for block, name, _ in TAPPED:
            parent = getattr(layer, block)
            setattr(parent, name, _Tap(getattr(parent, name), sink, stat))
        sinks.append(sink)
    model.hidden_states(tokens)
    return [{key: sink[k] for k, (_, _, key) in enumerate(TAPPED)} for sink in sinks]


def unit_input_stats(x: ScoreInputs, stat, who: str) -> list[list[dict]]:
    """``stat`` of the tapped inputs for each chunk of ``x.calib_batch`` calibration sequences (host arrays);
    ``who`` names the criterion in the error when there is no calibration data."""
    if x.calib is None:
        raise UserError(f"{who} needs calibration samples")
    calib = np.asarray(x.calib)
    chunk = x.calib_batch or len(calib)
    return [jax.tree.map(np.asarray, _tapped_forward(x.graphdef, x.frozen, x.trainable, x.masks,
                                                     jnp.asarray(calib[i:i + chunk]), stat))
            for i in range(0, len(calib), chunk)]
