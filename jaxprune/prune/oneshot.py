"""One-shot structured baselines: unit scores from a single look at the base (then the same masks,
LoRA recovery and shrink as LoRAPrune).

    magnitude    ``importance.magnitude_importance``  (no data)
    random       ``importance.random_importance``     (seeded)
    llm-pruner   ``llm_pruner.taylor_importance``     (base-weight gradients on calibration samples)
"""

from __future__ import annotations

from flax import nnx

from ..config import ModelConfig
from .groups import AttnUnit
from .importance import UnitScores, magnitude_importance, random_importance
from .llm_pruner import taylor_importance_step

ONE_SHOT_METHODS = ("llm-pruner", "magnitude", "random")


def one_shot_scores(method: str, cfg: ModelConfig, unit: AttnUnit, *, frozen, graphdef=None, trainable=None,
                    masks=None, calib=None, seed: int = 0, calib_batch: int | None = None) -> UnitScores:
    """Unit scores of a one-shot baseline. ``frozen`` (and for llm-pruner ``trainable``, ``masks`` and the
    calibration batch ``calib`` [n, S], scored ``calib_batch`` sequences per pass) may already be on a mesh."""
    if method == "magnitude":
        return magnitude_importance(cfg, nnx.to_pure_dict(frozen), unit)
    if method == "random":
        return random_importance(cfg, unit, seed)
    if method == "llm-pruner":
        return taylor_importance_step(graphdef, cfg, unit, calib_batch)(frozen, trainable, masks, calib)
    raise ValueError(f"unknown one-shot method {method!r} (expected one of {', '.join(ONE_SHOT_METHODS)})")
