"""Depth pruning runs: whole decoder layers removed by a registered ``registry.DEPTH`` method, LoRA recovery.

The Python API behind ``jaxprune prune --method shortgpt|replaceme``::

    from jaxprune.prune.depth_pipeline import DepthPruneConfig, prune_depth
    from jaxprune.runs import TrainConfig

    summary = prune_depth("path/to/hf_or_gguf", DepthPruneConfig(method="shortgpt", ratio=0.25, recover_steps=0),
                          TrainConfig(text="train.txt", out="runs/x", seq_len=64))
    # runs/x/model: the shallower model (jaxprune checkpoint); runs/x/prune.json: the summary (returned)

``n = round(ratio · L)`` layers go (half up; the originals take the count itself: ShortGPT's
``n_prune_layers``, ReplaceMe's ``layers_to_skip``). The method scores the float base on ``calib_samples``
calibration sequences of ``calib_len`` tokens drawn from the training text (``data.Blocks.calibration``,
seed ``TrainConfig.seed``, as the structured criteria); its ``transform`` (ReplaceMe's linear map) rewrites
kept layers' arrays; the kept layers are renumbered into a model of ``L − n`` layers with every per-layer
config field (widths, Gemma 3's ``layer_types``) following them. Widths stay uniform, so ``jaxprune export``
writes a stock transformers model. ``recover_steps`` > 0: LoRA on the shallower model (as ``prune/pipeline``),
merged into ``model/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import checkpoint
from ..errors import UserError
from ..fileio import write_json_atomic
from ..partition import tree_size
from ..runs import TrainConfig, TrainJob, prepare_run_dir, run_training, setup_lora
from ..sharding import MeshConfig, init_distributed, is_main_process, placement_for
from ..train import make_optimizer
from ..weights import merged_arrays, model_from_arrays
from . import depth
from .pipeline import calibration_batch, check_recovery_adapter, with_recovery_adapter
from .registry import DEPTH, DepthCriterion, ScoreInputs, method_options, options_record
from .shrink import shrink

#: ModelConfig fields with one entry per layer
PER_LAYER_FIELDS = ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size", "layer_types")


@dataclass(frozen=True)
class DepthPruneConfig:
    """What a depth prune run does: ``ratio`` = the fraction of decoder layers removed (n = round(ratio·L), at
    least 1, at most L − 1); ``recover_steps``: LoRA recovery steps (None: ``TrainConfig.steps``; 0: none);
    ``options``: the method's options dataclass (None: its defaults); ``recover_adapter``: the adapter recovery
    trains (``jaxprune.adapters``, default LoRA)."""
    method: str = depth.SHORTGPT
    ratio: float = 0.25
    calib_samples: int = 80
    calib_len: int = 128
    calib_batch: int | None = 8
    recover_steps: int | None = None
    options: Any = None
    recover_adapter: str = "lora"

    def criterion(self) -> DepthCriterion:
        return DEPTH.get(self.method)

    def method_options(self):
        return method_options(self.criterion(), self.options, "DepthPruneConfig")

    def n_remove(self, num_layers: int) -> int:
        """round(ratio · L), half up; a UserError unless 1 <= n <= L − 1."""
        n = int(np.floor(self.ratio * num_layers + 0.5))
        if not 1 <= n <= num_layers - 1:
            raise UserError(f"DepthPruneConfig.ratio = {self.ratio}: removes round({self.ratio}·{num_layers}) = {n} "
                            f"of {num_layers} layers; between 1 and {num_layers - 1} must go")
        return n

    def check(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"DepthPruneConfig.ratio = {self.ratio}: must be in (0, 1)")
        if self.recover_steps is not None and self.recover_steps < 0:
            raise UserError(f"DepthPruneConfig.recover_steps = {self.recover_steps}: must be >= 0")
        for name in ("calib_samples", "calib_len"):
            if getattr(self, name) < 1:
                raise UserError(f"DepthPruneConfig.{name} = {getattr(self, name)}: must be >= 1")
        self.method_options()


def remove_layers(model, removed, updates: dict | None = None):
    """``model`` (LoRA merged) without the decoder layers ``removed``; ``updates`` {path: array} (original layer
    indices) replace arrays first. Per-layer config fields, and any ``extra_hf`` list of one entry per layer,
    keep the kept layers' entries."""
    cfg = model.config
    arrays = {p: np.asarray(v) for p, v in merged_arrays(model).items()}
    arrays.update(updates or {})
    gone = set(removed)
    kept = [i for i in range(cfg.num_layers) if i not in gone]
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for path, v in arrays.items():
        if path[0] == "layers":
            if path[1] in gone:
                continue
            path = ("layers", new_index[path[1]]) + path[2:]
        out[path] = v
    per_layer = {f: tuple(getattr(cfg, f)[i] for i in kept) for f in PER_LAYER_FIELDS if getattr(cfg, f) is not None}
    extra = {k: [v[i] for i in kept] if isinstance(v, list) and len(v) == cfg.num_layers else v
             for k, v in cfg.extra_hf.items()}
    new_cfg = dataclasses.replace(cfg, num_layers=len(kept), extra_hf=extra, **per_layer)
    return model_from_arrays(new_cfg, out, dtype=model.dtype, source="depth pruning")


def prune_depth(model_path: str, cfg: DepthPruneConfig, train: TrainConfig, mesh: MeshConfig = MeshConfig(), *,
                record: dict | None = None) -> dict:
    """Remove ``cfg.ratio`` of ``model_path``'s decoder layers into ``train.out`` (run dir; ``model/`` the
    shallower model, ``prune.json`` the summary, returned); LoRA recovery for ``recover_steps``."""
    cfg.check()
    criterion, opts = cfg.criterion(), cfg.method_options()
    check_recovery_adapter(cfg.recover_adapter, train)
    if train.distill:
        raise UserError("the frozen base of a depth-pruned model is the pruned model itself (no teacher); recover "
                        "without it, or `jaxprune finetune RUN_DIR/model --distill` later", field="distill")
    if cfg.recover_steps is not None:
        train = dataclasses.replace(train, steps=cfg.recover_steps)
    init_distributed(mesh)
    placement = placement_for(mesh, train.batch_shape)
    s = setup_lora(model_path, dataclasses.replace(train, quantize_base="none"), kernel_mesh=placement.kernel_mesh())
    mcfg = s.model.config
    n = cfg.n_remove(mcfg.num_layers)
    placement = placement.with_head_dim(mcfg.head_dim)
    calib = (calibration_batch(s, placement, cfg.calib_samples, cfg.calib_len, train.seed)
             if "calibration" in criterion.needs else None)
    inputs = ScoreInputs(mcfg, "kv_group", s.graphdef, placement.put(s.frozen), placement.put(s.trainable),
                         placement.put(s.masks), calib, train.seed, cfg.calib_batch, opts)
    removed = sorted(int(i) for i in criterion.select(inputs, n))
    if len(set(removed)) != n or not all(0 <= i < mcfg.num_layers for i in removed):
        raise UserError(f"{cfg.method} chose layers {removed}: expected {n} distinct indices below {mcfg.num_layers}")
    updates = criterion.transform(inputs, removed) if criterion.transform is not None else None
    small = remove_layers(s.model, removed, updates)
    method_summary, tokenizer = inputs.cache.get("summary", {}), s.tokenizer
    del inputs, s
    if record is None:
        record = {"kind": "prune", "model": str(model_path), **options_record(cfg), **dataclasses.asdict(train)}
    run_dir, prev = prepare_run_dir(train.out, record, resume=train.resume,
                                    overwrite=train.overwrite)  # after the checks: bad input leaves no run dir
    trainable = 0
    if train.steps > 0:
        r = with_recovery_adapter(setup_lora(model_path, train, model=small, kernel_mesh=placement.kernel_mesh()),
                                  cfg.recover_adapter, train.seed)
        job = TrainJob(r.graphdef, r.frozen, r.trainable, r.masks, r.blocks, make_optimizer(train.optim()),
                       head_dim=mcfg.head_dim)
        result = run_training(job, train, placement, run_dir, resume=prev is not None)
        small, trainable = shrink(result.model), tree_size(result.state.trainable)
    if is_main_process():
        checkpoint.save_model(small, run_dir / "model", tokenizer=tokenizer, overwrite=True,
                              extra_meta={"pruned_from": str(model_path), "method": cfg.method,
                                          "layers_removed": removed})
    before, after = mcfg.num_params(), small.config.num_params()
    summary = {
        "method": cfg.method, "ratio": cfg.ratio, "layers_before": mcfg.num_layers,
        "layers_after": small.config.num_layers, "layers_removed": removed, "recover_steps": train.steps,
        "recover_adapter": cfg.recover_adapter if train.steps > 0 else None,
        "params_before": before, "params_after": after, "params_removed_fraction": 1 - after / before,
        "trainable_params": trainable, "calib_samples": cfg.calib_samples,
        "calib_len": min(cfg.calib_len, train.seq_len), **method_summary,
        "run_dir": str(run_dir), "model_dir": str(run_dir / "model"),
    }
    if is_main_process():
        write_json_atomic(run_dir / "prune.json", summary)
    return summary

