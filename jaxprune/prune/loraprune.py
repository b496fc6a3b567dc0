"""LoRAPrune (Zhang et al. 2023, arXiv 2305.18403; aim-uofa/LoRAPrune ``loraprune/utils.py``):
structured pruning guided by LoRA, during LoRA fine-tuning of a frozen base.

Importance (eq. 6-8). With the merged weight W' = W + s·A@B (ours: A [in, r], B [r, out]) and one
SGD step of size 1 on the LoRA factors, the change of the merged weight is
s·[(A − ∇A)(B − ∇B) − AB], so its gradient is estimated from LoRA alone as

    G = ∇A·B + A·∇B − ∇A·∇B          (up to the factor s, which per-module normalisation removes)

and the element importance is the first-order Taylor term ``|G ⊙ W'|``. Elements are summed per
unit in each module, each module's vector is L2-normalised, and the modules of a group
(q, k, v, o / gate, up, down) are summed. No gradient of a base weight is ever formed.

Moving average (eq. 9): ``Ḡ ← β·Ḡ + (1 − β)·Ĝ`` with β = 0.9; an update whose scores hold a
NaN / inf is skipped. It is an ``(init, update)`` pair in the style of optax transformations
(:func:`lora_importance_ema`), run inside the jitted train step as a ``train.GradHook``::

    hook = importance_hook(cfg, unit, lora_scale)                 # reads LoRA factors and their grads
    step = make_train_step(graphdef, optimizer, grad_hook=hook)
    after_step = scheduled_mask_update(cfg, unit, layers, schedule, placement.put)   # between steps

Masks follow the cubic schedule (``schedule.py``): at every prune step the lowest-scored units of
each prunable layer are masked (``masks.update_structured_masks``); pruned sets only grow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import ModelConfig
from ..sharding import to_host
from .groups import AttnUnit, num_attention_units
from .importance import UnitScores, base_kernel, unit_scores
from .masks import update_structured_masks
from .registry import STRUCTURED, StructuredCriterion, option
from .schedule import CubicSchedule


def lora_merged_grad(a, b, grad_a, grad_b):
    """Estimated gradient of the merged weight, [in, out]: ``∇A·B + A·∇B − ∇A·∇B``."""
    return grad_a @ b + a @ grad_b - grad_a @ grad_b


def lora_guided_importance(cfg: ModelConfig, trainable: dict, grads: dict, frozen: dict, unit: AttnUnit,
                           lora_scale: float) -> UnitScores:
    """LoRAPrune's unit importance from LoRA factors and their gradients only (see module doc).

    ``lora_scale`` is s = α / r, used to form the merged weight W' = W + s·A@B.
    """
    def element(i, block, module):
        t = trainable["layers"][i][block].get(module)
        if t is None or "lora_a" not in t:
            return None
        g = grads["layers"][i][block][module]
        a, b = t["lora_a"], t["lora_b"]
        w = base_kernel(frozen["layers"][i][block][module])
        merged = w + lora_scale * (a @ b).astype(w.dtype)
        return jnp.abs(lora_merged_grad(a, b, g["lora_a"], g["lora_b"]) * merged)
    return unit_scores(cfg, element, unit, normalise_modules=True)


class ImportanceState(NamedTuple):
    """Moving averages of unit importance, one array per layer; ``updates`` counts accepted updates;
    ``attn_sum`` sums the accepted raw attention scores (``--attn-score mean`` ranks by it)."""
    attn: tuple
    mlp: tuple
    updates: jax.Array
    attn_sum: tuple = ()


def init_importance(cfg: ModelConfig, unit: AttnUnit, *, track_sum: bool = False) -> ImportanceState:
    """Zero moving averages; ``track_sum`` (``--attn-score mean``) adds the attention-score sums, so runs
    without it keep the checkpoint layout they always had."""
    attn = tuple(jnp.zeros((num_attention_units(cfg.heads(i), cfg.kv_heads(i), unit),), jnp.float32)
                 for i in range(cfg.num_layers))
    mlp = tuple(jnp.zeros((cfg.mlp_width(i),), jnp.float32) for i in range(cfg.num_layers))
    return ImportanceState(attn, mlp, jnp.zeros((), jnp.int32),
                           tuple(jnp.zeros_like(a) for a in attn) if track_sum else ())


def ema_update(state: ImportanceState, scores, beta: float) -> ImportanceState:
    """β·old + (1 − β)·new (and ``attn_sum + new``), or old unchanged when any new score is not finite."""
    attn, mlp = scores
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in (*attn, *mlp)]))
    mix = lambda old, new: jnp.where(ok, beta * old + (1.0 - beta) * new, old)  # noqa: E731
    add = lambda total, new: jnp.where(ok, total + new, total)  # noqa: E731
    return ImportanceState(tuple(map(mix, state.attn, attn)), tuple(map(mix, state.mlp, mlp)),
                           state.updates + ok.astype(jnp.int32), tuple(map(add, state.attn_sum, attn)))


class ImportanceTransform(NamedTuple):
    """An optax-style pair: ``init() -> state``; ``update(state, trainable, grads, frozen) -> state``
    (pure nested dicts or nnx.State; jit-friendly)."""
    init: Callable[[], ImportanceState]
    update: Callable[..., ImportanceState]


def lora_importance_ema(cfg: ModelConfig, unit: AttnUnit, lora_scale: float, beta: float = 0.9
                        ) -> ImportanceTransform:
    """LoRA-guided importance folded into a moving average (eq. 9)."""
    def init() -> ImportanceState:
        return init_importance(cfg, unit)

    def update(state: ImportanceState, trainable, grads, frozen) -> ImportanceState:
        scores = lora_guided_importance(cfg, nnx.to_pure_dict(trainable), nnx.to_pure_dict(grads),
                                        nnx.to_pure_dict(frozen), unit, lora_scale)
        return ema_update(state, scores, beta)
    return ImportanceTransform(init, update)


def importance_hook(cfg: ModelConfig, unit: AttnUnit, lora_scale: float, beta: float = 0.9):
    """``lora_importance_ema``'s update as a ``train.GradHook`` (runs in the same jit as the LoRA step)."""
    tx = lora_importance_ema(cfg, unit, lora_scale, beta)

    def hook(state: ImportanceState, trainable, grads, frozen, masks, step):
        return tx.update(state, trainable, grads, frozen)
    return hook


ATTN_SCORES = ("ema", "mean")


def scheduled_mask_update(cfg: ModelConfig, unit: AttnUnit, layers: Sequence[int], schedule: CubicSchedule,
                          place: Callable = lambda tree: tree, attn_score: str = "ema"):
    """The train loop's ``after_step(step, state) -> state``: at each of the schedule's prune steps, the
    masks of ``layers`` grow to ``schedule.ratio(t)`` by the importance scores (on the host, between
    jitted steps); ``place`` puts the new masks back onto the mesh.

    ``attn_score``: attention units ranked by the moving average at that step (``"ema"``, the paper's eq. 9)
    or by the mean of every accepted step's score so far (``"mean"``: with few KV groups per layer the
    attention decision is one-shot, and the mean over the whole window is less noisy than an EMA whose
    weights fall off over ~1/(1 − β) steps). MLP channels always use the moving average."""
    if attn_score not in ATTN_SCORES:
        raise ValueError(f"attn_score {attn_score!r}: expected one of {ATTN_SCORES}")

    def after_step(step: int, st):
        t = step + 1
        if schedule.is_prune_step(t):
            if attn_score == "mean" and not st.hook_state.attn_sum:
                raise ValueError("attn_score 'mean' needs init_importance(..., track_sum=True)")
            attn = st.hook_state.attn if attn_score == "ema" else st.hook_state.attn_sum  # a sum ranks as a mean
            scores, masks = to_host(((attn, st.hook_state.mlp), st.masks))
            masks = update_structured_masks(masks, scores, schedule.ratio(t), cfg, unit, layers)
            st = st._replace(masks=place(masks))
        return st
    return after_step


@dataclass(frozen=True)
class LoRAPruneOptions:
    """LoRAPrune's own options (the ``loraprune options`` group of ``jaxprune prune``)."""
    prune_every: int = option(10, "loraprune: steps between mask updates", lo=1)
    warmup_frac: float = option(0.1, "loraprune: fraction of steps before pruning", lo=0.0, hi=1.0, hi_open=True)
    cooldown_frac: float = option(0.1, "loraprune: final fine-tuning fraction", lo=0.0, hi=1.0, hi_open=True)
    beta: float = option(0.9, "loraprune: importance moving-average factor", lo=0.0, hi=1.0, hi_open=True)
    attn_score: str = option("ema", "loraprune: rank attention units by the moving average at the prune step (ema, "
                             "the paper's) or by the mean score over every step so far (mean)", choices=ATTN_SCORES)
    select_steps: int | None = option(None, "loraprune: select the units in a run of this many steps "
                                      "(RUN_DIR/select), freeze the masks, then recover with fresh LoRA for "
                                      "--recover-steps at the baselines' schedule (the fair comparison with "
                                      "one-shot criteria); default: prune during the one run", lo=1)
    select_lora_rank: int | None = option(None, "loraprune --select-steps: LoRA rank of the selection run "
                                          "(default: --lora-rank)", lo=1)


STRUCTURED.register(StructuredCriterion(
    "loraprune", "LoRA-guided importance |(∇A·B + A·∇B − ∇A·∇B) ⊙ (W + s·A@B)|, moving average, pruned on a "
    "cubic schedule during LoRA fine-tuning (no base-weight gradient)", None, ("lora_gradients",),
    LoRAPruneOptions, "Zhang et al. 2023, arXiv 2305.18403 (aim-uofa/LoRAPrune)"))
