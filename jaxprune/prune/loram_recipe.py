"""LoRAM as a library recipe (``jaxprune loram`` is flags -> :class:`LoRAMConfig` -> :func:`run_loram`): structured
pruning picks the units, optional full-rank alignment of the pruned model, LoRA on the pruned model, recovery of
the factors to the full shape, the original model with the recovered LoRA.

    RUN_DIR/ run.json       the run's arguments (``resume`` refuses different ones)
             prune/         an iterative criterion (loraprune): the run that picks the units (run dir)
             units.json     the kept query heads / MLP channels per layer (the pruning's result)
             align/         ``align_steps``: full-rank training of the pruned model (run dir); align/model
             train/         the adapter (``adapter``, LoRA by default) on the (aligned, optionally int8) pruned model
                            (run dir); train/model: pruned + LoRA (merged for another adapter, as ``finetune``)
             model/         the ORIGINAL model with the recovered LoRA (merged with ``merge``, and always for another
                            adapter: ``loram.recover_full_model``)
             loram.json     parameter counts, trainable parameters, units, final metrics of each stage

Each stage is one ``runs.run_training``; ``resume`` skips finished stages and resumes the running one from its
latest checkpoint. Recovery maths: ``loram.py``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from .. import checkpoint, load
from ..adapters import ADAPTERS
from ..data import Blocks, HostBlocks, training_blocks
from ..errors import UserError
from ..fileio import write_json_atomic
from ..partition import partition, tree_size
from ..runs import TrainConfig, TrainJob, last_metrics, prepare_run_dir, run_training, setup_lora, stage_dir
from ..sharding import MeshConfig, Placement, init_distributed, is_main_process, log, placement_for, to_host
from ..train import make_optimizer
from ..weights import merge_lora
from . import llm_pruner
from .groups import prunable_layers, resolve_attn_unit
from .loram import (check_dense, describe_units, host_arrays, partition_align, pruned_model, recover_full_model,
                    units_from_masks)
from .loraprune import LoRAPruneOptions
from .pipeline import loraprune_hooks, loraprune_job, one_shot_masks, with_recovery_adapter
from .registry import STRUCTURED


@dataclass(frozen=True)
class LoRAMConfig:
    """``prune_method``: a structured criterion (registry); ``prune_steps``: an iterative criterion's run (None:
    ``TrainConfig.steps``); ``align_steps`` 0: no alignment; ``align_text`` None: ``TrainConfig.text``; ``adapter``:
    what trains on the pruned model (``jaxprune.adapters``; an iterative criterion's unit selection trains LoRA)."""
    prune_method: str = llm_pruner.NAME  # the paper's LoRAM-Stru
    ratio: float = 0.5
    attn_unit: str = "auto"
    exclude_layers: str = "default"
    calib_samples: int = 10
    calib_len: int = 64
    prune_steps: int | None = None
    prune_every: int = 10
    beta: float = 0.9
    align_steps: int = 0
    align_text: str | None = None
    align_lr: float = 5e-5
    merge: bool = False
    adapter: str = "lora"


def run_loram(model_path: str, c: LoRAMConfig, run_cfg: TrainConfig, mc: MeshConfig = MeshConfig(), *,
              record: dict | None = None) -> dict:
    """LoRAM of ``model_path`` into ``run_cfg.out``; returns the summary (also RUN_DIR/loram.json)."""
    if not run_cfg.text:
        raise UserError("TrainConfig.text: LoRAM needs training text")
    if not 0.0 <= c.ratio < 1.0:
        raise UserError(f"LoRAMConfig.ratio = {c.ratio}: must be in [0, 1)")
    STRUCTURED.get(c.prune_method)
    adapter = ADAPTERS.get(c.adapter)
    adapter.check(int8=run_cfg.quantize_base == "int8", pallas=run_cfg.impl == "pallas", loram=True)
    init_distributed(mc)
    placement = placement_for(mc, run_cfg.batch_shape)  # a bad --mesh fails before anything is written
    dense = load.load_model(model_path, run_cfg.dtype)
    check_dense(dense)
    cfg, dtype = dense.config, dense.dtype
    tok = load.load_tokenizer(model_path)
    layers = prunable_layers(cfg.num_layers, c.exclude_layers)
    c = dataclasses.replace(c, attn_unit=resolve_attn_unit(c.attn_unit, [cfg.kv_heads(i) for i in layers]))
    blocks = training_blocks(run_cfg.text, tok, run_cfg.seq_len, seed=run_cfg.seed)  # N hosts: each its share
    align_blocks = None
    if c.align_steps:
        align_blocks = training_blocks(c.align_text or run_cfg.text, tok, run_cfg.seq_len, seed=run_cfg.seed)
    w0 = host_arrays(dense)  # W0 stays on the host while the small model trains
    if record is None:
        record = {"kind": "loram", "model": str(model_path), **dataclasses.asdict(c), **dataclasses.asdict(run_cfg)}
    run_dir, prev = prepare_run_dir(run_cfg.out, record, resume=run_cfg.resume,
                                    overwrite=run_cfg.overwrite)  # after the checks above: bad input leaves no run dir
    resume = prev is not None

    units = choose_units(c, model_path, run_cfg, dense, blocks, layers, placement, run_dir, record, resume)
    del dense
    small = pruned_model(cfg, w0, units, dtype)
    if c.align_steps:
        small = align(c, run_cfg, small, align_blocks, tok, placement, run_dir, record, resume)
    d, again = stage_dir(run_dir, "train", record, resume)
    lora_cfg = dataclasses.replace(run_cfg, out=str(d))
    s = setup_lora(model_path, lora_cfg, model=small, kernel_mesh=placement.kernel_mesh())
    s = with_recovery_adapter(s, adapter.name, lora_cfg.seed)  # LoRA's draws at one seed, then the adapter's layers
    job = TrainJob(s.graphdef, s.frozen, s.trainable, s.masks, s.blocks, make_optimizer(lora_cfg.optim()),
                   head_dim=cfg.head_dim)
    result = run_training(job, lora_cfg, placement, d, resume=again)
    full = recover_full_model(cfg, w0, result.model, units, dtype)  # another adapter than LoRA: merged already
    merged = c.merge or not adapter.saves_unmerged
    if c.merge:
        full = merge_lora(full)
    if merged and not c.merge and not run_cfg.quiet:
        log(f"{run_dir / 'model'} and {d / 'model'}: the {adapter.name} adapter is merged into the weights (a "
            "checkpoint records LoRA factors only)")
    meta = {"loram_from": str(model_path), "prune_method": c.prune_method, "ratio": c.ratio, "adapter": adapter.name}
    trained = result.model if adapter.saves_unmerged else merge_lora(result.model)
    if is_main_process():
        checkpoint.save_model(trained, d / "model", tokenizer=tok, overwrite=True, extra_meta=meta)
        checkpoint.save_model(full, run_dir / "model", tokenizer=tok, overwrite=True, extra_meta=meta)
    summary = {
        "prune_method": c.prune_method, "ratio": c.ratio, "attn_unit": c.attn_unit, "prunable_layers": layers,
        "params_full": cfg.num_params(), "params_pruned": small.config.num_params(),
        "trainable_params": tree_size(result.state.trainable), "quantize_base": run_cfg.quantize_base,
        "impl": s.impl, "adapter": adapter.name, "merged": merged, **describe_units(cfg, units, layers),
        "train": last_metrics(d), "align": last_metrics(run_dir / "align") if c.align_steps else None,
        "run_dir": str(run_dir), "model_dir": str(run_dir / "model"), "pruned_model_dir": str(d / "model"),
    }
    if is_main_process():
        write_json_atomic(run_dir / "loram.json", summary)
    return summary


def choose_units(c: LoRAMConfig, model_path: str, run_cfg: TrainConfig, dense, blocks: Blocks | HostBlocks, layers,
                 placement: Placement, run_dir: Path, record: dict, resume: bool) -> dict:
    """The kept heads / channels (RUN_DIR/units.json; read back on --resume)."""
    path = run_dir / "units.json"
    if resume and path.exists():
        return json.loads(path.read_text())
    cfg, unit = dense.config, c.attn_unit
    criterion = STRUCTURED.get(c.prune_method)
    if criterion.iterative:
        d, again = stage_dir(run_dir, "prune", record, resume)
        # the float base: --quantize-base is QLoRAM's, for the LoRA stage on the pruned model
        pcfg = dataclasses.replace(run_cfg, out=str(d), steps=c.prune_steps or run_cfg.steps, quantize_base="none")
        # W0 is on the host already: LoRA may go on `dense`
        s = setup_lora(model_path, pcfg, model=dense, kernel_mesh=placement.kernel_mesh())
        opts = LoRAPruneOptions(prune_every=c.prune_every, beta=c.beta)
        hooks = loraprune_hooks(cfg, unit, layers, pcfg.steps, c.ratio, opts, pcfg.lora_scale, placement.put)
        masks = to_host(run_training(loraprune_job(s, hooks, pcfg), pcfg, placement, d, resume=again).state.masks)
    else:
        dense.remat = run_cfg.remat
        graphdef, frozen, trainable, masks = partition(dense)
        s = SimpleNamespace(model=dense, graphdef=graphdef, frozen=frozen, trainable=trainable, masks=masks,
                            blocks=blocks)
        masks, _ = one_shot_masks(criterion, s, c.ratio, unit, layers, placement, calib_samples=c.calib_samples,
                               calib_len=c.calib_len, calib_batch=None, seed=run_cfg.seed)
    units = units_from_masks(masks)
    if is_main_process():
        write_json_atomic(path, units)
    return units


def align(c: LoRAMConfig, run_cfg: TrainConfig, small, blocks: Blocks | HostBlocks, tok, placement: Placement, run_dir: Path, record: dict,
          resume: bool):
    """W^P* = W^P + ΔW: full-rank training of the pruned model (float; RUN_DIR/align/model on --resume)."""
    d, again = stage_dir(run_dir, "align", record, resume)
    if again and checkpoint.is_checkpoint(d / "model"):
        return checkpoint.load_model(d / "model")
    acfg = dataclasses.replace(run_cfg, out=str(d), text=c.align_text or run_cfg.text, steps=c.align_steps,
                               lr=c.align_lr, quantize_base="none")
    graphdef, frozen, trainable, masks = partition_align(small)
    job = TrainJob(graphdef, frozen, trainable, masks, blocks, make_optimizer(acfg.optim()),
                   head_dim=small.config.head_dim)
    aligned = run_training(job, acfg, placement, d, resume=again).model
    if is_main_process():
        checkpoint.save_model(aligned, d / "model", tokenizer=tok, overwrite=True, extra_meta={"loram_stage": "align"})
    return aligned
