"""Rank allocation for LoRA (``finetune --rank-allocation``): which rank-1 components ``A[:, j] B[j, :]`` of each
layer's LoRA update train and count, decided during training.

Every LoRA-carrying ``Linear`` becomes a :class:`RankMaskedLinear`: its factors are preallocated at the full rank r
(``--lora-rank``) and a boolean rank mask m [r] (a :class:`RankMask`, so it lives in the masks pytree, outside what
trains, and is checkpointed with the run's ``TrainState``) selects the live components::

    y = x @ W + s·(x @ A)·diag(m) @ B + b        (A [in, r], B [r, out], s = α/r)

A masked component gets no gradient (its A column and B row are multiplied by 0). Shapes never change, so the
train step is compiled once. At the end (``finalize_rank_masks``) the masked components are dropped: each layer
keeps ``A[:, m]``, ``B[m, :]`` with the same s, so ``--merge`` writes ``W0 + s·A·diag(m)·B``.

The schedules are pure numpy functions of (step, scores, state), called between jitted steps (AdaLoRA, IncreLoRA)
or, for DyLoRA's sampled rank, inside the step from the step index:

* **AdaLoRA** (Zhang, Chen, Bukharin, He, Cheng, Chen, Zhao, ICLR 2023, "Adaptive Budget Allocation for
  Parameter-Efficient Fine-Tuning", arXiv 2303.10512; code QingruZhang/AdaLoRA; reference implementation
  huggingface/peft 0.21.0 ``tuners/adalora/layer.py`` ``RankAllocator``). Sensitivity of every trained element
  I = |w·∇w| (Eq. 8), smoothed I-bar ← β1·I-bar + (1-β1)·I (Eq. 9) and uncertainty U-bar ← β2·U-bar +
  (1-β2)·|I - I-bar| (Eq. 10), element score I-bar·U-bar (Eq. 11); a component's score is the mean element score
  of its A column plus that of its B row (PEFT's ``_combine_ipt``). The budget (total components kept over all
  layers) follows the cubic schedule (Eq. 12, PEFT's ``budget_schedule``)::

      b(t) = b0                                                      t <= t_init
      b(t) = b_T + (b0 - b_T)·(1 - (t - t_init)/(T - t_final - t_init))³   (int, floored), t_init < t <= T - t_final

  with b0 = r·L, b_T = r_target·L. Every ΔT steps in that window, and at t = T - t_final, the components scoring at
  or below the (b0 - b(t))-th smallest score over all layers are masked (PEFT's ``mask_to_budget``: a global
  ``kthvalue`` threshold); after T - t_final the mask stays fixed and the scores stop updating. t counts the
  steps done (1 after the first step), as PEFT's ``global_step`` in ``update_and_allocate``.

  **How this differs from the paper and PEFT.** The update is LoRA's A·diag(m)·B, not AdaLoRA's SVD form
  P·Λ·Q: there is no trained singular value Λ (so a component's score has no Λ term; PEFT's triplet score is
  s(Λ_i) + mean s(P_i) + mean s(Q_i)) and no orthogonality regulariser ‖PᵀP - I‖ + ‖QQᵀ - I‖. A masked
  component keeps its values and is multiplied by 0 until a later masking step selects it again (PEFT writes
  Λ_i = 0 in place and lets it train again between masking steps). Sensitivities use the weights the gradient was
  taken at (PEFT's ``update_and_allocate`` runs after ``optimizer.step()``, on the updated weights). s = α/r (PEFT:
  α/(r + 1e-5)). The budget, the scores given I-bar and U-bar, the EMA and the masking rule are PEFT's, checked
  against its ``RankAllocator`` in ``tests/test_rank_allocation.py``.

* **IncreLoRA** (Zhang, Li, Huang, Du, Wu, Yang, Wang, 2023, "IncreLoRA: Incremental Parameter Allocation Method
  for Parameter-Efficient Fine-tuning", arXiv 2308.12043; code FeiyuZhang98/IncreLoRA). Every layer starts with
  ``r_init`` live components; after t_init, every k steps the h layers with the highest importance that still
  have room (rank < r) get one more component each, until the total reaches b_T = r_target·L. A layer's
  importance is the mean of the AdaLoRA element scores I-bar·U-bar over its live A and B elements (the paper's
  average sensitivity·uncertainty of the module's parameters). Differences from the paper: the factors are
  preallocated at rank r (LoRA's init: a new component starts with its A column drawn at the start and B = 0,
  so adding it does not change the output), not SVD-form triplets appended with the paper's "advance learning"
  initialisation and per-increment learning-rate restart; no orthogonality regulariser.

* **DyLoRA** (Valipour, Rezagholizadeh, Kobyzev, Ghodsi, EACL 2023, "DyLoRA: Parameter-Efficient Tuning of
  Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation", arXiv 2210.07558; code huawei-noah/KD-NLP,
  DyLoRA). Each step samples b ~ Uniform{1, ..., r} (one b for every layer, drawn from the step index and
  ``--seed``) and trains the truncated update (α/b)·A[:, :b]·B[:b, :] (nested-dropout-style): the step's mask is
  m = [j < b] and the scale α/b is folded into the mask (A·diag(m·r/b)). Validation and the saved model use the
  full rank r (any b ≤ r is usable afterwards). Every component j < b trains; the paper's "frozen" mode, which
  updates only the b-th row/column, is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import UserError, field_ref
from ..layers import Linear, Mask, with_axes
from ..weights import linears, path_str, replace_linear
from .registry import take_over

#: ``--rank-allocation`` choices (``fixed``: every layer keeps rank r, today's LoRA)
RANK_ALLOCATIONS = ("fixed", "adalora", "increlora", "dylora")
#: PEFT AdaLoraConfig's defaults for the sensitivity EMA (β1) and the uncertainty EMA (β2)
BETA1, BETA2 = 0.85, 0.85


class RankMask(Mask):
    """bool [r]: True keeps rank-1 component j (``A[:, j] B[j, :]``) of a LoRA update (a masks-pytree Variable)."""


class RankMaskedLinear(Linear):
    """``y = x @ W + s·(x @ A)·diag(m') @ B + b``: LoRA with a rank mask m [r] (``lora_rank_mask``); m' = m, or with
    ``rank_rescale`` (DyLoRA) m·r/Σm, so that the live b components carry the scale α/b. Built from a
    LoRA-carrying ``Linear``, whose Variables it takes over (kernel, int8 scale, bias, A, B, element mask)."""

    def __init__(self, lin: Linear, *, live: int | None = None, rescale: bool = False):
        if not lin.has_lora or getattr(lin, "adapter_name", None) is not None:
            raise ValueError("RankMaskedLinear is built from a plain LoRA Linear (Linear.add_lora)")
        super().__init__(lin.in_features, lin.out_features, axes=lin.axes, with_kernel=False)
        take_over(self, lin)
        r = int(lin.lora_a[...].shape[1])
        live = r if live is None else live
        self.rank_rescale = bool(rescale)
        self.lora_rank_mask = with_axes(RankMask, jnp.arange(r) < live, ("lora_rank",))

    def rank_multiplier(self) -> jax.Array:
        """m' [r] float32: the mask, times r / Σm under ``rank_rescale``."""
        m = self.lora_rank_mask[...].astype(jnp.float32)
        if self.rank_rescale:
            m = m * (m.shape[0] / jnp.maximum(jnp.sum(m), 1.0))
        return m

    def low_rank(self):
        """(A·diag(m'), B, s): every form of the product and ``merged_kernel`` use the masked factors."""
        a, b, s = self.lora_a[...], self.lora_b[...], self.lora_scale
        return a * self.rank_multiplier().astype(a.dtype), b, s


# ---- configuration ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankAllocationConfig:
    """``--rank-allocation`` and its schedule. ``rank``: the preallocated r (``--lora-rank``); ``target``: the
    average live rank per layer at the end (AdaLoRA's target_r, IncreLoRA's budget / L); ``init``: IncreLoRA's
    starting rank per layer; ``tinit`` / ``tfinal`` / ``every``: AdaLoRA's t_init, t_final, ΔT (IncreLoRA: t_init
    and its interval k); ``grow``: IncreLoRA's h (layers grown per increment); ``total``: T, the run's steps."""
    kind: str = "fixed"
    rank: int = 8
    target: int = 4
    init: int = 1
    tinit: int = 0
    tfinal: int = 0
    every: int = 1
    grow: int = 1
    total: int = 200
    seed: int = 0
    beta1: float = BETA1
    beta2: float = BETA2

    def check(self) -> None:
        """One UserError for a schedule that cannot run."""
        flag = lambda name: field_ref(name)  # noqa: E731
        if self.kind not in RANK_ALLOCATIONS:
            raise UserError(f"unknown rank allocation {self.kind!r} (one of {', '.join(RANK_ALLOCATIONS)})")
        if self.kind in ("fixed", "dylora"):
            return
        if not 1 <= self.target <= self.rank:
            raise UserError(f"{flag('rank_target')} must be in [1, {flag('lora_rank')} = {self.rank}] (got "
                            f"{self.target})")
        if self.every < 1:
            raise UserError(f"{flag('rank_every')} must be >= 1 (got {self.every})")
        if self.tinit < 0 or self.tfinal < 0 or self.tinit >= self.total - self.tfinal:
            raise UserError(f"{flag('rank_tinit')} {self.tinit} and {flag('rank_tfinal')} {self.tfinal} leave no "
                            f"allocation steps in {self.total} steps (need 0 <= tinit < steps - tfinal)")
        if self.kind == "increlora" and not (1 <= self.init <= self.target):
            raise UserError(f"{flag('rank_init')} must be in [1, {flag('rank_target')} = {self.target}] (got "
                            f"{self.init})")
        if self.kind == "increlora" and self.grow < 1:
            raise UserError(f"{flag('rank_grow')} must be >= 1 (got {self.grow})")


# ---- the schedules: pure numpy ------------------------------------------------------------------------------------
def adalora_budget(t: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total: int,
                   delta_t: int) -> tuple[int, bool]:
    """(budget, whether to mask at step t): PEFT's ``RankAllocator.budget_schedule`` (AdaLoRA Eq. 12), cubic
    from ``init_bgt`` after ``tinit`` to ``target_bgt`` at ``total - tfinal``, masking every ``delta_t`` steps in
    that window and every step after it (where PEFT's model keeps the pattern fixed: :func:`adalora_event`)."""
    if t <= tinit:
        return init_bgt, False
    if t > total - tfinal:
        return target_bgt, True
    mul = 1 - (t - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), t % delta_t == 0


def adalora_event(t: int, c: RankAllocationConfig, n_layers: int) -> int | None:
    """The budget to mask to after step t (t = steps done), or None when the mask stays: PEFT's
    ``AdaLoraModel.update_and_allocate`` (every ΔT steps in the cubic window, forced at t = T - t_final, fixed
    after)."""
    if t > c.total - c.tfinal:
        return None
    budget, mask_now = adalora_budget(t, c.rank * n_layers, c.target * n_layers, c.tinit, c.tfinal, c.total,
                                      c.every)
    return budget if (mask_now or t == c.total - c.tfinal) else None


def component_scores(ibar_a, ubar_a, ibar_b, ubar_b) -> np.ndarray:
    """[r]: mean over ``in`` of I-bar·U-bar of A [in, r] plus mean over ``out`` of that of B [r, out] (PEFT's
    ``mask_to_budget`` for lora_A / lora_B, which stores them transposed), float32."""
    sa = np.asarray(ibar_a, np.float32) * np.asarray(ubar_a, np.float32)
    sb = np.asarray(ibar_b, np.float32) * np.asarray(ubar_b, np.float32)
    return (sa.mean(axis=0) + sb.mean(axis=1)).astype(np.float32)


def adalora_mask(scores: list[np.ndarray], budget: int) -> list[np.ndarray]:
    """Keep masks [r] per layer: the k = Σr - budget lowest-scoring components over every layer are masked
    (PEFT's global ``torch.kthvalue`` threshold). Ties at the threshold: PEFT masks every score <= the k-th smallest
    (all of them when the scores are all 0, as before B has moved); here exactly k are masked, among equal scores
    the later ones (layers in order, components in order). k <= 0 keeps all."""
    flat = np.concatenate([np.asarray(s, np.float32) for s in scores])
    k = flat.size - int(budget)
    keep = np.ones(flat.size, bool)
    if k > 0:
        order = np.lexsort((-np.arange(flat.size), flat))  # ascending score, later index first among equals
        keep[order[:k]] = False
    out, i = [], 0
    for s in scores:
        out.append(keep[i:i + np.size(s)])
        i += np.size(s)
    return out


def module_score(ibar_a, ubar_a, ibar_b, ubar_b, keep) -> float:
    """IncreLoRA's importance of one layer: the mean of I-bar·U-bar over its live A columns and B rows."""
    keep = np.asarray(keep, bool)
    sa = (np.asarray(ibar_a, np.float32) * np.asarray(ubar_a, np.float32))[:, keep]
    sb = (np.asarray(ibar_b, np.float32) * np.asarray(ubar_b, np.float32))[keep, :]
    n = sa.size + sb.size
    return float((sa.sum(dtype=np.float64) + sb.sum(dtype=np.float64)) / max(n, 1))


def increlora_event(t: int, c: RankAllocationConfig) -> bool:
    """Whether IncreLoRA grows ranks after step t: every k steps after t_init, before T - t_final."""
    return c.tinit < t <= c.total - c.tfinal and (t - c.tinit) % c.every == 0


def increlora_grow(ranks: list[int], scores: list[float], budget: int, grow: int, max_rank: int) -> list[int]:
    """The ranks after one increment: the ``grow`` highest-scoring layers with rank < ``max_rank`` get +1 each
    (ties: the earlier layer first), never past a total of ``budget``."""
    ranks = list(ranks)
    room = int(budget) - sum(ranks)
    order = sorted((i for i in range(len(ranks)) if ranks[i] < max_rank), key=lambda i: (-scores[i], i))
    for i in order[:max(min(grow, room), 0)]:
        ranks[i] += 1
    return ranks


def dylora_rank(seed: int, step, rank: int):
    """DyLoRA's b for a step (0-based index): Uniform{1, ..., rank} from ``fold_in(key(seed + 7919), step)``."""
    return jax.random.randint(jax.random.fold_in(jax.random.key(seed + 7919), step), (), 1, rank + 1)


# ---- the model ----------------------------------------------------------------------------------------------------
def attach_rank_masks(model: nnx.Module, c: RankAllocationConfig) -> list[str]:
    """Turn every plain-LoRA ``Linear`` of ``model`` into a :class:`RankMaskedLinear` (IncreLoRA: ``c.init`` live
    components, else all r; DyLoRA: rescaled), in place. Returns the paths. A layer carrying another adapter is a
    UserError (rank allocation masks LoRA's rank components)."""
    done = []
    for path, lin in list(linears(model)):
        if not lin.has_lora:
            continue
        name = getattr(lin, "adapter_name", None)
        if name is not None:
            raise UserError(f"{field_ref('rank_allocation')} {c.kind} masks LoRA's rank components: not with "
                            f"{field_ref('adapter')} {name}")
        live = c.init if c.kind == "increlora" else None
        replace_linear(model, path, RankMaskedLinear(lin, live=live, rescale=c.kind == "dylora"))
        done.append(path_str(path))
    if not done:
        raise UserError(f"{field_ref('rank_allocation')} {c.kind}: no layer carries LoRA factors")
    return done


def finalize_rank_masks(model: nnx.Module) -> dict[str, int]:
    """Replace each :class:`RankMaskedLinear` by a plain ``Linear`` keeping only the live components: A[:, m]·m'[m],
    B[m, :], the same s (no live component: no LoRA). In place; returns {path: rank kept}."""
    kept = {}
    for path, lin in list(linears(model)):
        if not isinstance(lin, RankMaskedLinear):
            continue
        keep = np.asarray(lin.lora_rank_mask[...], bool)
        mult = np.asarray(lin.rank_multiplier())
        a, b, s = np.asarray(lin.lora_a[...]), np.asarray(lin.lora_b[...]), lin.lora_scale
        new = Linear(lin.in_features, lin.out_features, axes=lin.axes, with_kernel=False)
        for name, value in vars(lin).items():
            if not name.startswith("_") and value is not None and name not in ("lora_rank_mask", "rank_rescale"):
                setattr(new, name, value)
        if keep.any():
            new.set_lora(jnp.asarray(a[:, keep] * mult[keep].astype(a.dtype)), jnp.asarray(b[keep, :]), s)
        else:
            new.lora_a, new.lora_b, new.lora_scale = nnx.data(None), nnx.data(None), 0.0
        replace_linear(model, path, new)
        kept[path_str(path)] = int(keep.sum())
    return kept


# ---- the allocator in the training loop ---------------------------------------------------------------------------
def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _flat(tree) -> dict[tuple, Any]:
    """{(layer path..., leaf name): array} of an nnx State pytree."""
    return {_dict_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def sensitivity_hook(c: RankAllocationConfig):
    """The grad hook (inside the jitted step): hook_state (I-bar, U-bar), pytrees like ``trainable``, updated as
    PEFT's ``update_ipt`` with I = |w·∇w| while t = step + 1 < T - t_final."""
    def hook(state, trainable, grads, frozen, masks, step):
        ibar, ubar = state
        ipt = jax.tree.map(lambda w, g: jnp.abs(w * g), trainable, grads)
        new_i = jax.tree.map(lambda e, x: c.beta1 * e + (1 - c.beta1) * x, ibar, ipt)
        new_u = jax.tree.map(lambda u, x, e: c.beta2 * u + (1 - c.beta2) * jnp.abs(x - e), ubar, ipt, new_i)
        on = step + 1 < c.total - c.tfinal
        pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(on, n, o), new, old)  # noqa: E731
        return pick(new_i, ibar), pick(new_u, ubar)
    return hook


def dylora_masks(c: RankAllocationConfig):
    """The in-step mask function of DyLoRA: every rank mask [r] set to j < b, b = :func:`dylora_rank`."""
    def fn(masks, step):
        b = dylora_rank(c.seed, step, c.rank)

        def leaf(path, m):
            keys = _dict_keys(path)
            return (jnp.arange(m.shape[0]) < b) if keys and keys[-1] == "lora_rank_mask" else m
        return jax.tree_util.tree_map_with_path(leaf, masks)
    return fn


@dataclass
class RankAllocator:
    """The host side of an allocation run: ``after_step`` (the loop's callback) applies the schedule to the
    state's rank masks, ``describe`` adds what it decided to that step's metrics line: ``rank_budget``,
    ``rank_scores`` {layer: [r] component scores (AdaLoRA) or its importance (IncreLoRA)} and ``rank_keep``
    {layer: the live components' indices}; DyLoRA: ``rank_sample``, the b of the step."""
    config: RankAllocationConfig
    layers: list[str]
    pending: dict = field(default_factory=dict)

    def after_step(self, step: int, state):
        c, t = self.config, step + 1
        if c.kind == "dylora":
            self.pending = {"rank_sample": int(dylora_rank(c.seed, step, c.rank))}
            return state
        masks = {k[:-1]: np.asarray(v) for k, v in _flat(state.masks).items() if k[-1] == "lora_rank_mask"}
        ibar, ubar = _flat(state.hook_state[0]), _flat(state.hook_state[1])
        keys = list(masks)
        sc = lambda k: (ibar[k + ("lora_a",)], ubar[k + ("lora_a",)], ibar[k + ("lora_b",)],  # noqa: E731
                        ubar[k + ("lora_b",)])
        if c.kind == "adalora":
            budget = adalora_event(t, c, len(keys))
            if budget is None:
                return state
            scores = [component_scores(*sc(k)) for k in keys]
            new = dict(zip(keys, adalora_mask(scores, budget)))
            self.pending = {"rank_budget": budget,
                            "rank_scores": {path_str(k): [float(x) for x in s] for k, s in zip(keys, scores)}}
        else:  # increlora
            if not increlora_event(t, c):
                return state
            budget = c.target * len(keys)
            scores = [module_score(*sc(k), masks[k]) for k in keys]
            ranks = increlora_grow([int(masks[k].sum()) for k in keys], scores, budget, c.grow, c.rank)
            new = {k: np.arange(c.rank) < n for k, n in zip(keys, ranks)}
            self.pending = {"rank_budget": budget,
                            "rank_scores": {path_str(k): s for k, s in zip(keys, scores)}}
        self.pending["rank_keep"] = {path_str(k): [int(j) for j in np.flatnonzero(new[k])] for k in keys}

        def leaf(path, m):
            k = _dict_keys(path)
            if k and k[-1] == "lora_rank_mask":
                return jax.device_put(jnp.asarray(new[k[:-1]]), m.sharding)
            return m
        return state._replace(masks=jax.tree_util.tree_map_with_path(leaf, state.masks))

    def describe(self, state) -> dict:
        out, self.pending = self.pending, {}
        return out


def training_hooks(c: RankAllocationConfig, trainable, layers: list[str]) -> tuple[RankAllocator, dict]:
    """(the host-side allocator, whose ``after_step`` / ``describe`` are the loop's callbacks; the ``TrainJob``
    fields of an allocation run: the grad hook and its state (AdaLoRA, IncreLoRA) or the in-step mask function
    (DyLoRA))."""
    if c.kind == "dylora":
        return RankAllocator(c, layers), {"mask_fn": dylora_masks(c)}
    zeros = lambda: jax.tree.map(jnp.zeros_like, trainable)  # noqa: E731
    return RankAllocator(c, layers), {"grad_hook": sensitivity_hook(c), "hook_state": (zeros(), zeros())}
