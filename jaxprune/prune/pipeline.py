"""Structured pruning runs: units chosen by a registered criterion, LoRA recovery, physical shrink.

The Python API behind ``jaxprune prune`` (the command only turns flags into these configs)::

    from jaxprune.prune.pipeline import StructuredPruneConfig, prune_structured
    from jaxprune.runs import TrainConfig

    summary = prune_structured("path/to/hf_or_gguf", StructuredPruneConfig(method="llm-pruner", ratio=0.5),
                               TrainConfig(text="train.txt", out="runs/x", steps=30))
    # runs/x/model: the shrunk model (jaxprune checkpoint); summary: parameter counts, widths, ...

A one-shot criterion (``registry.StructuredCriterion.score``: l2, random, llm-pruner, plugins) scores the
units once on the base (+ calibration samples when it ``needs`` them); the lowest-scored units of each
prunable layer are masked, LoRA recovers for ``recover_steps`` on the final shape. The iterative one
(LoRAPrune) prunes during its LoRA run on a cubic schedule, or picks the units in a selection run of its
own (``select_steps``) and then recovers exactly as the one-shot criteria do (the fair protocol).

Recovery trains ``recover_adapter`` (any registered adapter, ``jaxprune.adapters``; default LoRA) on the pruned,
frozen base: LoRA is attached as always (the same draws at one seed) and turned into the adapter's layers just
before the recovery run. LoRAPrune's importance stays LoRA-guided: its selection run (``select_steps``) trains LoRA
whatever ``recover_adapter`` is, and without ``select_steps`` (one run that prunes on a schedule while it trains,
so no separate recovery stage) only LoRA is accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checkpoint
from ..adapters import ADAPTERS, attach_adapter
from ..errors import UserError, field_ref
from ..fileio import write_json_atomic
from ..model import DECODER_LINEARS
from ..partition import combine, partition, tree_size
from ..quantize import dequantize_base
from ..runs import TrainConfig, TrainJob, last_metrics, prepare_run_dir, run_training, setup_lora, stage_dir
from ..sharding import MeshConfig, Placement, init_distributed, is_main_process, placement_for, to_host
from ..train import LoopCallbacks, make_optimizer
from ..weights import merged_arrays, model_from_arrays
from . import slimgpt
from .groups import WIDTHS, check_attn_unit, resolve_attn_unit, structured_layers
from .loraprune import LoRAPruneOptions, importance_hook, init_importance, scheduled_mask_update
from .masks import global_structured_masks, layer_ratios, structured_sparsity, update_structured_masks
from .registry import STRUCTURED, ScoreInputs, StructuredCriterion, method_options, options_record
from .schedule import CubicSchedule
from .shrink import describe_widths, shrink


#: ``prune``'s default recipe: the best stock-loadable one measured (README, "The best pruned model for a budget"):
#: SlimGPT, its default ``uniform`` widths, LoRA recovery
DEFAULT_METHOD = slimgpt.NAME


@dataclass(frozen=True)
class StructuredPruneConfig:
    """What a structured prune run does. ``options``: the criterion's options dataclass (None: its defaults);
    ``widths``: 'layerwise', 'uniform' or 'global' (None: the criterion's published allocation, else
    layerwise); ``recover_steps``: LoRA recovery steps for one-shot criteria and LoRAPrune with
    ``select_steps`` (None: ``TrainConfig.steps``; 0: none, the pruned base as it is); ``calib_*``:
    calibration samples for criteria that need them; ``recover_adapter``: the adapter the recovery run trains
    (``jaxprune.adapters``; LoRAPrune's selection run always trains LoRA)."""
    method: str = DEFAULT_METHOD
    ratio: float = 0.5
    attn_unit: str = "auto"
    widths: str | None = None
    exclude_layers: str = "default"
    calib_samples: int = 80
    calib_len: int = 128
    calib_batch: int | None = 8
    recover_steps: int | None = None
    options: Any = None
    recover_adapter: str = "lora"

    def criterion(self) -> StructuredCriterion:
        return STRUCTURED.get(self.method)

    def method_options(self):
        """``options``, or the criterion's defaults; checked against its declared ranges."""
        return method_options(self.criterion(), self.options, "StructuredPruneConfig")

    def resolved_widths(self) -> str:
        return self.widths or self.criterion().default_widths or "layerwise"

    def check(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise UserError(f"StructuredPruneConfig.ratio = {self.ratio}: must be in [0, 1)")
        widths = self.resolved_widths()
        if widths not in WIDTHS:
            raise UserError(f"StructuredPruneConfig.widths = {widths!r}: expected one of {', '.join(WIDTHS)}")
        if widths in ("global", "incremental") and self.criterion().iterative:
            raise UserError(f"StructuredPruneConfig.widths = {widths!r}: {self.method} prunes during training on a "
                            "per-layer schedule; this allocation is for one-shot criteria")
        if widths == "global" and self.criterion().select is not None:
            raise UserError(f"StructuredPruneConfig.widths = 'global': {self.method} chooses its units layer by "
                            "layer (use uniform, layerwise or incremental)")
        if self.recover_steps is not None and self.recover_steps < 0:
            raise UserError(f"StructuredPruneConfig.recover_steps = {self.recover_steps}: must be >= 0")
        opts = self.method_options()
        ADAPTERS.get(self.recover_adapter)
        if (self.recover_adapter != "lora" and self.criterion().iterative
                and getattr(opts, "select_steps", None) is None):
            raise UserError(f"{self.method} without {field_ref('select_steps')} prunes while it trains, in one LoRA "
                            "run whose importance reads LoRA's A, B gradients: there is no separate recovery stage; "
                            f"give {field_ref('select_steps')} N to recover with another adapter",
                            field="recover_adapter", value=self.recover_adapter)


@dataclass(frozen=True)
class LoRAPruneHooks:
    """LoRAPrune's pieces of a ``runs.TrainJob``: the in-step importance hook, its state, the mask update."""
    grad_hook: Any
    hook_state: Any
    after_step: Any


def loraprune_hooks(cfg, unit: str, layers: Sequence[int], steps: int, ratio: float, opts: LoRAPruneOptions,
                    lora_scale: float, place=lambda tree: tree) -> LoRAPruneHooks:
    """The importance EMA inside the step and the cubic-schedule mask update between steps (``loraprune.py``)."""
    schedule = CubicSchedule(steps, ratio, warmup=opts.warmup_frac, cooldown=opts.cooldown_frac,
                             every=opts.prune_every)
    return LoRAPruneHooks(importance_hook(cfg, unit, lora_scale, opts.beta),
                          init_importance(cfg, unit, track_sum=opts.attn_score == "mean"),
                          scheduled_mask_update(cfg, unit, layers, schedule, place, opts.attn_score))


def loraprune_job(s, hooks: LoRAPruneHooks, run_cfg: TrainConfig, describe=None, *, frozen=None) -> TrainJob:
    """A ``TrainJob`` of LoRA training on ``s`` (``runs.LoraSetup``) with LoRAPrune's hooks."""
    return TrainJob(s.graphdef, s.frozen if frozen is None else frozen, s.trainable, s.masks, s.blocks,
                    make_optimizer(run_cfg.optim()), head_dim=s.model.config.head_dim, grad_hook=hooks.grad_hook,
                    hook_state=hooks.hook_state,
                    callbacks=lambda _f, _p: LoopCallbacks(after_step=hooks.after_step, describe=describe))


def calibration_batch(s, placement: Placement, samples: int, length: int, seed: int):
    """``samples`` calibration sequences [samples, L] from ``s.blocks`` (``runs.LoraSetup``), L = ``length`` capped
    at the training window (a short --seq-len shortens the samples too), on the mesh's batch axes."""
    length = min(length, s.blocks.train.shape[1])
    return placement.put_batch(s.blocks.calibration(samples, length, seed=seed), 0, strict=False)


def with_recovery_adapter(s, name: str, seed: int, placement: Placement | None = None):
    """``s`` (``runs.LoraSetup``) with its LoRA layers turned into adapter ``name``'s (``adapters.attach_adapter``,
    drawing from ``seed``) and split anew; LoRA itself returns ``s`` as it is. With ``placement``: also the new
    frozen pytree placed on the mesh, as ``(s, frozen)``."""
    if name != "lora":
        attach_adapter(s.model, name, seed=seed)
        graphdef, frozen, trainable, masks = partition(s.model)
        s = dataclasses.replace(s, graphdef=graphdef, frozen=frozen, trainable=trainable, masks=masks)
    return s if placement is None else (s, placement.put(s.frozen))


def check_recovery_adapter(name: str, train: TrainConfig) -> None:
    """One UserError when adapter ``name`` refuses a feature of the run (``Adapter.check``)."""
    ADAPTERS.get(name).check(distill=train.distill, int8=train.quantize_base == "int8", pallas=train.impl == "pallas")


def recovery_job(s, frozen, masks, train: TrainConfig, describe) -> TrainJob:
    """LoRA recovery of ``s`` (``runs.LoraSetup``) with fixed ``masks``: a fresh optimizer, no pruning hooks."""
    return TrainJob(s.graphdef, frozen, s.trainable, masks, s.blocks, make_optimizer(train.optim()),
                    head_dim=s.model.config.head_dim, callbacks=lambda _f, _p: LoopCallbacks(describe=describe))


def one_shot_masks(criterion: StructuredCriterion, s, ratio: float, unit: str, layers: Sequence[int],
                   placement: Placement, *, calib_samples: int, calib_len: int, calib_batch: int | None, seed: int,
                   options=None, frozen=None, widths: str = "layerwise", progress: bool = True):
    """(host masks, the ``ScoreInputs`` scored) of ``s`` (``runs.LoraSetup``-like: graphdef, frozen, trainable,
    masks, blocks, model), scored once by ``criterion``: the lowest-scored ``ratio`` of units of each layer in
    ``layers`` masked, or with ``widths='global'`` one threshold over all of them
    (``masks.global_structured_masks``), or at ratios rising with depth (``incremental``); a criterion with its own
    ``select`` (SlimGPT) picks them itself. ``frozen``: ``s.frozen`` already on the mesh (else placed here)."""
    cfg = s.model.config
    placement = placement.with_head_dim(cfg.head_dim)
    calib = None
    if "calibration" in criterion.needs:
        calib = calibration_batch(s, placement, calib_samples, calib_len, seed)
    frozen = placement.put(s.frozen) if frozen is None else frozen
    inputs = ScoreInputs(cfg, unit, s.graphdef, frozen, placement.put(s.trainable),
                         placement.put(s.masks), calib, seed, calib_batch, options, progress=progress)
    ratios = layer_ratios(widths, ratio, layers)
    if criterion.select is not None:
        return criterion.select(inputs, ratios), inputs
    scores = to_host(criterion.score(inputs))
    if widths == "global":
        return global_structured_masks(to_host(s.masks), scores, ratio, cfg, unit, layers,
                                       normalised=criterion.normalised), inputs
    masks = to_host(s.masks)
    for r in sorted(set(ratios.values())):
        masks = update_structured_masks(masks, scores, r, cfg, unit, [i for i in layers if ratios[i] == r])
    return masks, inputs


def describe_sparsity(cfg, layers):
    """The loop's per-step record of the MLP channels pruned so far (metrics.jsonl 'sparsity')."""
    return lambda st: {"sparsity": structured_sparsity(to_host(st.masks), cfg, layers)["channels_pruned"]}


def prune_structured(model_path: str, prune: StructuredPruneConfig, train: TrainConfig,
                     mesh: MeshConfig = MeshConfig(), *, record: dict | None = None) -> dict:
    """Prune ``model_path`` into ``train.out`` (run dir; ``model/`` the shrunk model, ``prune.json`` the summary,
    returned). ``record``: what run.json stores and ``train.resume`` compares (default: both configs)."""
    prune.check()
    criterion, opts = prune.criterion(), prune.method_options()
    check_recovery_adapter(prune.recover_adapter, train)
    if train.quantize_base != "none" and "base_gradients" in criterion.needs:
        raise UserError(f"TrainConfig.quantize_base = {train.quantize_base!r}: {prune.method} reads base-weight "
                        "gradients, which an int8 base does not have")
    split = criterion.iterative and opts.select_steps is not None
    if prune.recover_steps is not None and (not criterion.iterative or split):
        train = dataclasses.replace(train, steps=prune.recover_steps)
    init_distributed(mesh)
    placement = placement_for(mesh, train.batch_shape)
    s = setup_lora(model_path, train, kernel_mesh=placement.kernel_mesh())
    cfg = s.model.config
    placement = placement.with_head_dim(cfg.head_dim)
    widths = prune.resolved_widths()
    layers = structured_layers(cfg.num_layers, prune.exclude_layers, widths)
    unit = resolve_attn_unit(prune.attn_unit, [cfg.kv_heads(i) for i in layers])
    if criterion.compensates and train.quantize_base != "none":
        raise UserError(f"{prune.method} updates the base weights ({', '.join(criterion.compensates)}): it needs a "
                        "float base", field="quantize_base", value=train.quantize_base)
    if "bias" in criterion.compensates and not cfg.family.output_biases:
        raise UserError(f"{prune.method} adds output biases to the base: it needs a family whose HF config holds "
                        f"them (llama), not model_type {cfg.model_type!r}", field="method", value=prune.method)
    check_attn_unit([cfg.kv_heads(i) for i in layers], unit, prune.ratio)
    if record is None:
        record = {"kind": "prune", "model": str(model_path), **options_record(prune), **dataclasses.asdict(train)}
    run_dir, prev = prepare_run_dir(train.out, record, resume=train.resume,
                                    overwrite=train.overwrite)  # after the checks above: bad input leaves no run dir
    frozen = placement.put(s.frozen)
    describe = describe_sparsity(cfg, layers)
    if split:  # LoRAPrune picks the units in its own run; recovery below is the baselines' (fresh LoRA)
        masks = select_with_loraprune(model_path, prune, opts, train, s, layers, unit, placement, run_dir, record,
                                      prev is not None)
        if train.steps > 0 and prune.recover_adapter != "lora":  # s's LoRA is fresh (selection trained copies)
            del frozen
            s, frozen = with_recovery_adapter(s, prune.recover_adapter, train.seed, placement)
        job = recovery_job(s, frozen, masks, train, describe)
    elif criterion.iterative:
        hooks = loraprune_hooks(cfg, unit, layers, train.steps, prune.ratio, opts, train.lora_scale, placement.put)
        job = loraprune_job(s, hooks, train, describe, frozen=frozen)
    else:
        masks, inputs = one_shot_masks(criterion, s, prune.ratio, unit, layers, placement,
                                       calib_samples=prune.calib_samples, calib_len=prune.calib_len,
                                       calib_batch=prune.calib_batch, seed=train.seed, options=opts, frozen=frozen,
                                       widths=widths, progress=train.progress)
        if criterion.compensate is not None:  # a new base (new output biases: a new shape), so LoRA goes on anew
            updated = with_weight_updates(s.model, criterion.compensate(inputs, masks))
            del inputs, frozen
            s = setup_lora(model_path, train, model=updated, kernel_mesh=placement.kernel_mesh())
            frozen = placement.put(s.frozen)
        if train.steps > 0 and prune.recover_adapter != "lora":  # scored on the base (B = 0); recovery's adapter
            del frozen
            s, frozen = with_recovery_adapter(s, prune.recover_adapter, train.seed, placement)
        job = recovery_job(s, frozen, masks, train, describe)
    if train.steps == 0:  # no recovery: the pruned base as it is (LoRA's B = 0 adds nothing)
        model = combine(job.graphdef, *jax.tree.map(jnp.asarray, to_host((job.frozen, job.trainable, job.masks))))
        dequantize_base(model)
        final_masks, trained = job.masks, 0
    else:
        result = run_training(job, train, placement, run_dir, resume=prev is not None)
        model, final_masks, trained = result.model, result.state.masks, tree_size(result.state.trainable)
    small = shrink(model)
    if is_main_process():
        checkpoint.save_model(small, run_dir / "model", tokenizer=s.tokenizer, overwrite=True,
                              extra_meta={"pruned_from": str(model_path), "method": prune.method})
    before, after = cfg.num_params(), small.config.num_params()
    summary = {
        "method": prune.method, "ratio": prune.ratio, "attn_unit": unit, "impl": s.impl,
        "widths_mode": widths, "prunable_layers": layers,
        "recover_steps": train.steps if not criterion.iterative or split else None,
        "recover_adapter": prune.recover_adapter if train.steps > 0 else None,
        "params_before": before, "params_after": after, "params_removed_fraction": 1 - after / before,
        **structured_sparsity(to_host(final_masks), cfg, layers),
        "trainable_params": trained,
        "widths": describe_widths(small), "run_dir": str(run_dir), "model_dir": str(run_dir / "model"),
        "distill": {"alpha": train.distill_alpha, "temperature": train.distill_temp} if train.distill else None,
        "select_steps": opts.select_steps if split else None,
        "attn_score": opts.attn_score if criterion.iterative else None,
        "select": last_metrics(run_dir / "select") if split else None,
    }
    if is_main_process():
        write_json_atomic(run_dir / "prune.json", summary)
    return summary


def with_weight_updates(model, updates: dict) -> nnx.Module:
    """``model`` (its LoRA merged; B = 0 before training) with ``updates`` {(layer, block, linear, param): delta}
    added, ``param`` 'kernel' [in, out] or 'bias' [out]; with any bias its config gains LLaMA's
    ``attention_bias`` / ``mlp_bias`` (the other biases zero)."""
    cfg = model.config
    arrays = merged_arrays(model)
    if any(key[3] == "bias" for key in updates):
        cfg = dataclasses.replace(cfg, attention_bias=True, attention_out_bias=None, mlp_bias=True)
        for i in range(cfg.num_layers):
            for block, name in DECODER_LINEARS:
                path = ("layers", i, block, name, "bias")
                if path not in arrays:
                    arrays[path] = np.zeros(arrays[path[:-1] + ("kernel",)].shape[1], np.float32)
    for (i, block, name, param), delta in updates.items():
        path = ("layers", i, block, name, param)
        arrays[path] = np.asarray(arrays[path], np.float64) + np.asarray(delta, np.float64)
    return model_from_arrays(cfg, arrays, dtype=model.dtype, source="pruning compensation")


def select_with_loraprune(model_path, prune: StructuredPruneConfig, opts: LoRAPruneOptions, train: TrainConfig, s,
                          layers, unit: str, placement: Placement, run_dir: Path, record: dict, resume: bool):
    """LoRAPrune's selection run in RUN_DIR/select (``select_steps``, rank ``select_lora_rank``): its final masks
    (host); its LoRA is discarded."""
    d, again = stage_dir(run_dir, "select", record, resume)
    rank = opts.select_lora_rank or train.lora_rank
    scfg = dataclasses.replace(train, out=str(d), steps=opts.select_steps, lora_rank=rank, distill=False)
    sel = s if rank == train.lora_rank else setup_lora(model_path, scfg, kernel_mesh=placement.kernel_mesh())
    cfg = sel.model.config
    hooks = loraprune_hooks(cfg, unit, layers, opts.select_steps, prune.ratio, opts, scfg.lora_scale,
                            placement.put)
    # the selection run trains host copies of s's LoRA (its step donates them), so s.trainable stays fresh
    host = dataclasses.replace(sel, trainable=jax.tree.map(np.array, sel.trainable),
                               masks=jax.tree.map(np.array, sel.masks))
    job = loraprune_job(host, hooks, scfg, describe_sparsity(cfg, layers), frozen=placement.put(sel.frozen))
    return to_host(run_training(job, scfg, placement, d, resume=again).state.masks)

