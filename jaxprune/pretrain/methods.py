"""The seven pretraining parameterisations of a random-init LLaMA, and what they share.

    full        every weight dense and trainable (the full-rank baseline)
    lowrank     targeted linears ``W = s·A@B``, A [in, r], B [r, out] (the pure low-rank baseline; B starts
                random, not 0: see sltrain.py)
    sltrain     targeted linears ``W = s·A@B + S`` (sltrain.py)
    slope       targeted linears ``y = x @ (W ⊙ M)``, double-pruned backward, lazy adapters (slope.py)
    lost        targeted linears ``W = A@B + S`` from the init's SVD, S on k input channels (lost.py)
    switchlora  targeted linears ``W + s·A@B``, W frozen, A / B vectors switched from pools (switchlora.py)
    sste        targeted linears ``y = x @ β·S_soft(W)``, continuous 2:4, straight-through (sste.py)

Embeddings, norms and ``lm_head`` stay dense and trainable in every method (as in both papers'
code: SLTrain targets the ``attn`` / ``mlp`` linears only, SLoPe skips ``lm_head`` by aspect ratio).

Pretraining trains every ``nnx.Param`` (``nnx.LoRAParam`` is a subclass), so :func:`partition_pretrain`
splits with that filter; the result has the usual (frozen, trainable, masks) shape and the generic
``train.make_train_step`` / ``TrainCheckpoints`` run on it unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..config import ModelConfig
from ..errors import UserError
from ..layers import Linear
from ..model import DECODER_LINEARS, LlamaForCausalLM
from ..partition import DEFAULT_LORA_TARGETS, tree_size
from ..train import make_optimizer
from ..weights import dense_arrays, model_from_arrays
from .lost import LOSTLinear, lost_param_count
from .registry import PRETRAIN, PretrainMethod
from .sltrain import SparseLowRankLinear, sltrain_param_count
from .slope import SLoPeLinear, slope_linears
from .sste import SSTELinear, sste_linears
from .switchlora import MASKS, SwitchLoRALinear, switchlora_param_count

@dataclass(frozen=True)
class MethodConfig:
    """How the targeted linears are parameterised (``rank``: lowrank, sltrain, lost, switchlora; ``alpha``:
    lowrank and sltrain; ``delta``: sltrain; ``adapter_rank``/``max_aspect_ratio``: slope; ``channel_ratio``:
    lost; ``sltrain_b_init``: SLTrain's up factor at init, ``zero`` as the official code or ``uniform``
    U(±1/√r) as the low-rank baseline's)."""

    method: str = "full"
    rank: int = 32
    alpha: float = 8.0
    delta: float = 0.03
    targets: str = DEFAULT_LORA_TARGETS
    adapter_rank: int = 16
    max_aspect_ratio: float = 5.0
    channel_ratio: float = 0.03
    sltrain_b_init: str = "zero"

    def __post_init__(self):
        m = PRETRAIN.get(self.method)
        if m.check is not None:
            m.check(self)
        if m.uses_rank and self.rank < 1:
            raise UserError("must be >= 1", field="MethodConfig.rank", value=self.rank)
        if self.sltrain_b_init not in ("zero", "uniform"):
            raise UserError("expected zero or uniform", field="MethodConfig.sltrain_b_init", value=self.sltrain_b_init)
        if self.adapter_rank < 0:
            raise UserError("must be >= 0", field="MethodConfig.adapter_rank", value=self.adapter_rank)
        try:
            re.compile(self.targets)
        except re.error as e:
            raise UserError(f"not a valid regex ({e})", field="MethodConfig.targets", value=self.targets) from None


def target_paths(cfg: ModelConfig, targets: str):
    """(layer, block, name) of every decoder linear whose path ``layers.i.block.name`` matches."""
    pattern = re.compile(targets)
    return [(i, block, name) for i in range(cfg.num_layers) for block, name in DECODER_LINEARS
            if pattern.search(f"layers.{i}.{block}.{name}")]


def build_model(cfg: ModelConfig, mc: MethodConfig, *, seed: int = 0, dtype=jnp.float32) -> LlamaForCausalLM:
    """A random-init model (``LlamaForCausalLM``'s N(0, 0.02) init) with the method's linears swapped in.

    Deterministic in ``seed``: the same seed gives bitwise the same model (and SLTrain support).
    """
    if PRETRAIN.get(mc.method).build_linear is not None and not target_paths(cfg, mc.targets):
        raise UserError("matches no decoder linear", field="MethodConfig.targets", value=mc.targets)
    return _build(cfg, mc, seed, dtype)


def _build(cfg: ModelConfig, mc: MethodConfig, seed: int, dtype) -> LlamaForCausalLM:
    model = LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    build_linear = PRETRAIN.get(mc.method).build_linear
    if build_linear is None:
        return model
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1))
    for i, block, name in target_paths(cfg, mc.targets):
        parent = getattr(model.layers[i], block)
        old: Linear = getattr(parent, name)
        setattr(parent, name, build_linear(old, mc, rngs, dtype))
    return model


def partition_pretrain(model: nnx.Module):
    """-> graphdef, frozen (SLTrain supports, LOST channels, SwitchLoRA pools, S-STE β), trainable (every
    nnx.Param), masks (Mask, and SwitchLoRA's switch state: what changes between steps outside the optimizer)."""
    graphdef, trainable, masks, frozen = nnx.split(model, nnx.Param, MASKS, ...)
    return graphdef, frozen, trainable, masks


def dense_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A plain dense model computing the same function: every linear's merged weight, masks folded."""
    return model_from_arrays(model.config, dense_arrays(model), dtype=model.dtype)


def make_pretrain_optimizer(c, trainable) -> optax.GradientTransformation:
    """``train.make_optimizer``'s AdamW + warmup-cosine + clipping, with no weight decay on SLoPe's
    adapters (they must stay bitwise untouched while switched off)."""
    return make_optimizer(c, decay_mask=_decay_mask(trainable))


def _decay_mask(trainable):
    """False for SLoPe's adapter factors (``lora_a`` / ``lora_b`` next to a dense ``kernel``), else True."""
    flat = nnx.to_flat_state(trainable)
    paths = {tuple(p) for p, _ in flat}
    return nnx.from_flat_state([(p, v.replace(not (p[-1] in ("lora_a", "lora_b") and p[:-1] + ("kernel",) in paths)))
                                for p, v in flat])


# ---- parameter accounting -------------------------------------------------------------------
def linear_param_count(model: nnx.Module, cfg: ModelConfig, mc: MethodConfig) -> dict:
    """Parameters of the targeted linears: dense equivalent vs what the method stores.

    ``stored``: full ``in·out``; lowrank ``r(in+out)``; sltrain ``r(in+out) + ⌊δ·in·out⌋``;
    slope ``nnz(M)`` (half of ``in·out``) plus the adapters ``r(in+out)``; lost ``r(in+out) + ⌈ρ·in⌉·out``;
    switchlora ``r(in+out)`` trained (W and the pools are frozen, not counted); sste ``in·out / 2`` (2:4).
    """
    dense = stored = 0
    for i, block, name in target_paths(cfg, mc.targets):
        lin = getattr(getattr(model.layers[i], block), name)
        d_in, d_out = lin.in_features, lin.out_features
        dense += d_in * d_out
        if isinstance(lin, SparseLowRankLinear):
            stored += sltrain_param_count(d_in, d_out, lin.lora_a[...].shape[1],
                                          mc.delta if lin.sparse_values is not None else 0.0)
        elif isinstance(lin, LOSTLinear):
            stored += lost_param_count(d_in, d_out, lin.lora_a[...].shape[1], mc.channel_ratio)
        elif isinstance(lin, SwitchLoRALinear):
            stored += switchlora_param_count(d_in, d_out, lin.lora_a[...].shape[1])
        elif isinstance(lin, SSTELinear):
            stored += d_in * d_out // 2
        elif isinstance(lin, SLoPeLinear):
            stored += int(np.asarray(lin.nm_mask[...]).sum())
            if lin.has_lora:
                stored += lin.lora_a[...].shape[1] * (d_in + d_out)
        else:
            stored += d_in * d_out
    return {"dense": dense, "stored": stored}


def param_summary(model: nnx.Module, cfg: ModelConfig, mc: MethodConfig) -> dict:
    """Trainable scalars (what the optimizer holds), and the targeted linears' dense vs stored counts."""
    _, _, trainable, _ = partition_pretrain(model)
    lin = linear_param_count(model, cfg, mc)
    n_train = tree_size(trainable)
    pruned = sum(int((~np.asarray(l.nm_mask[...])).sum()) for _, l in slope_linears(model))
    pruned += sum(l.in_features * l.out_features // 2 for _, l in sste_linears(model))
    return {"trainable_params": n_train, "params_stored": n_train - pruned, "linear_params_dense": lin["dense"],
            "linear_params_stored": lin["stored"], "dense_params": cfg.num_params()}


PRETRAIN.register(PretrainMethod("full", "every weight dense and trainable (the full-rank baseline)"))
