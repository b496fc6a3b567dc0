"""LLM-Pruner (Ma et al. 2023, arXiv 2305.11627; horseee/LLM-Pruner ``taylor`` importance, ``param_first``):
first-order Taylor importance from base-weight gradients.

    I(unit) = Σ_{w ∈ unit's coupled weights} |w · ∂L/∂w|

summed over every element of the unit's coupled weights (group reduction "sum", no module
normalisation), on a calibration batch. Unlike LoRAPrune it needs the gradient of every base weight:
that memory is what LoRAPrune's criterion avoids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from ..meshes import activation_mesh, mesh_of
from ..train import make_loss_fn, mean_over_microbatches
from .groups import AttnUnit
from .importance import UnitScores, unit_scores
from .registry import ScoreInputs, register_structured


def taylor_importance(cfg: ModelConfig, frozen: dict, base_grads: dict, unit: AttnUnit) -> UnitScores:
    """LLM-Pruner's first-order Taylor importance ``Σ |W ⊙ ∂L/∂W|`` per unit (no module normalisation)."""
    def element(i, block, module):
        w = frozen["layers"][i][block][module]["kernel"]
        g = base_grads["layers"][i][block][module]["kernel"]
        return jnp.abs(w * g)
    return unit_scores(cfg, element, unit, normalise_modules=False)


def taylor_importance_step(graphdef, cfg: ModelConfig, unit: AttnUnit, chunk: int | None = None,
                           mesh: jax.sharding.Mesh | None = None):
    """A jitted ``(frozen, trainable, masks, batch [n, S]) -> UnitScores``: base-weight gradients of the
    mean NLL on a calibration batch, reduced to units.

    ``chunk``: sequences per forward/backward pass. The gradient of the batch mean is accumulated over
    ``n / c`` equal passes of ``c`` sequences (``c`` the largest divisor of ``n`` not above ``chunk``),
    ``∂L/∂W = (1/k) Σ_j ∂L_j/∂W``, so the activations of one pass are live at a time; ``None``: one pass.
    ``mesh``: the mesh the inputs are placed on; the passes' activations are split over its batch axes
    (``meshes.activation_mesh``) as the train step's are, not laid out like the fsdp-split weights."""
    loss_fn = make_loss_fn(graphdef)

    @jax.jit
    def step(frozen, trainable, masks, batch):
        with activation_mesh(mesh):
            return _step(frozen, trainable, masks, batch)

    def _step(frozen, trainable, masks, batch):
        n = batch.shape[0]
        c = max(d for d in range(1, min(chunk or n, n) + 1) if n % d == 0)
        grad = jax.grad(lambda fr, b: loss_fn(trainable, fr, masks, b)[0])
        if c == n:
            grads = grad(frozen, batch)
        else:
            grads = mean_over_microbatches(lambda b: grad(frozen, b), batch.reshape(n // c, c, -1))
        return taylor_importance(cfg, nnx.to_pure_dict(frozen), nnx.to_pure_dict(grads), unit)
    return step


NAME = "llm-pruner"


@register_structured(NAME, needs=("calibration", "base_gradients"),
                     summary="first-order Taylor importance Σ|W ⊙ ∂L/∂W| from base-weight gradients on calibration "
                             "samples",
                     citation="Ma et al. 2023, arXiv 2305.11627 (horseee/LLM-Pruner, taylor, param_first)")
def llm_pruner_scores(x: ScoreInputs) -> UnitScores:
    step = taylor_importance_step(x.graphdef, x.cfg, x.unit, x.calib_batch, mesh_of(x.frozen))
    return step(x.frozen, x.trainable, x.masks, x.calib)
