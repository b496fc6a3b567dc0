"""`jaxprune loram`: LoRAM (``prune/loram.py``): structured pruning, optional full-rank alignment of the
pruned model, LoRA on the pruned model, recovery of the factors to the full shape, the original model with
the recovered LoRA.

    RUN_DIR/ run.json       the run's arguments (``--resume`` refuses different ones)
             prune/         --prune-method loraprune: the LoRAPrune run that picks the units (run dir)
             units.json     the kept query heads / MLP channels per layer (the pruning's result)
             align/         --align-steps K: full-rank training of the pruned model (run dir); align/model
             train/         LoRA on the (aligned, optionally int8) pruned model (run dir); train/model: pruned + LoRA
             model/         the ORIGINAL model with the recovered LoRA (merged with --merge)
             loram.json     parameter counts, trainable parameters, units, final metrics of each stage

Each stage is one ``runs.run_training``; ``--resume`` skips finished stages and resumes the stage that was
running from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from .. import checkpoint, load
from ..data import Blocks, token_stream
from ..errors import UserError
from ..fileio import write_json_atomic
from ..partition import partition, tree_size
from ..prune.groups import prunable_layers
from ..prune.loram import (check_dense, describe_units, host_arrays, partition_align, pruned_model,
                           recover_full_model, units_from_masks)
from ..prune.loraprune import LoRAPruneOptions
from ..prune.pipeline import loraprune_hooks, loraprune_job, one_shot_masks
from ..prune.registry import STRUCTURED
from ..runs import TrainConfig, TrainJob, last_metrics, prepare_run_dir, run_training, setup_lora, stage_dir
from ..sharding import Placement, init_distributed, is_main_process, placement_for, to_host
from ..train import make_optimizer
from ..weights import merge_lora
from .common import add_run_args, mesh_config, run_record, train_config, with_config
from .flags import FRACTION_BELOW_1, NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, SEQ_LEN


def add_loram_parser(sub) -> None:
    p = sub.add_parser("loram", help="LoRAM: LoRA trained on a pruned model, recovered into the full model")
    p.add_argument("model")
    add_run_args(p, steps=200, frozen_base=True)
    g = p.add_argument_group("pruning (which units the small model keeps)")
    g.add_argument("--prune-method", choices=STRUCTURED.names(), default="llm-pruner",
                   help="structured pruning criterion (the paper's LoRAM-Stru uses LLM-Pruner)")
    g.add_argument("--ratio", type=FRACTION_BELOW_1, default=0.5, help="per-layer fraction of units pruned")
    g.add_argument("--attn-unit", choices=("kv_group", "q_head"), default="kv_group")
    g.add_argument("--exclude-layers", default="default",
                   help="layers never pruned: comma-separated indices, 'none', or 'default' (layers < int(0.1·L) "
                        "and the last one)")
    g.add_argument("--calib-samples", type=POSITIVE_INT, default=10, help="llm-pruner: calibration sequences")
    g.add_argument("--calib-len", type=SEQ_LEN, default=64, help="llm-pruner: calibration sequence length")
    g.add_argument("--prune-steps", type=POSITIVE_INT, default=None,
                   help="loraprune: steps of the LoRAPrune run that picks the units (default: --steps); its LoRA "
                        "is discarded, the pruned base is P(W0)")
    g.add_argument("--prune-every", type=POSITIVE_INT, default=10, help="loraprune: steps between mask updates")
    g.add_argument("--beta", type=FRACTION_BELOW_1, default=0.9, help="loraprune: importance moving average")
    g = p.add_argument_group("alignment (full-rank training of the pruned model before LoRA)")
    g.add_argument("--align-steps", type=NONNEG_INT, default=0, help="0: no alignment")
    g.add_argument("--align-text", default=None, help="general text for alignment (default: --text)")
    g.add_argument("--align-lr", type=POSITIVE_FLOAT, default=5e-5, help="alignment learning rate (the paper's)")
    p.add_argument("--merge", action="store_true", help="fold the recovered LoRA into W0 in RUN_DIR/model")
    p.set_defaults(fn=with_config(cmd_loram, p))


def cmd_loram(args: argparse.Namespace) -> dict:
    run_cfg, mc = train_config(args), mesh_config(args)
    if not run_cfg.text:
        raise UserError("--text FILE is required")
    if not 0.0 <= args.ratio < 1.0:
        raise UserError(f"--ratio {args.ratio}: must be in [0, 1)")
    init_distributed(mc)
    placement = placement_for(mc, run_cfg.batch_shape)  # a bad --mesh fails before anything is written
    dense = load.load_model(args.model, run_cfg.dtype)
    check_dense(dense)
    cfg, dtype = dense.config, dense.dtype
    tok = load.load_tokenizer(args.model)
    layers = prunable_layers(cfg.num_layers, args.exclude_layers)
    blocks = Blocks.from_stream(token_stream(run_cfg.text, tok), run_cfg.seq_len, seed=run_cfg.seed)
    align_blocks = None
    if args.align_steps:
        align_blocks = Blocks.from_stream(token_stream(args.align_text or run_cfg.text, tok), run_cfg.seq_len,
                                          seed=run_cfg.seed)
    w0 = host_arrays(dense)  # W0 stays on the host while the small model trains
    record = run_record(args, "loram")
    run_dir, prev = prepare_run_dir(run_cfg.out, record, resume=run_cfg.resume,
                                    overwrite=run_cfg.overwrite)  # after the checks above: bad input leaves no run dir
    resume = prev is not None

    units = choose_units(args, run_cfg, dense, blocks, layers, placement, run_dir, record, resume)
    del dense
    small = pruned_model(cfg, w0, units, dtype)
    if args.align_steps:
        small = align(args, run_cfg, small, align_blocks, tok, placement, run_dir, record, resume)
    d, again = stage_dir(run_dir, "train", record, resume)
    lora_cfg = dataclasses.replace(run_cfg, out=str(d))
    s = setup_lora(args.model, lora_cfg, model=small, mesh_devices=placement.mesh.size)
    job = TrainJob(s.graphdef, s.frozen, s.trainable, s.masks, s.blocks, make_optimizer(lora_cfg.optim()),
                   head_dim=cfg.head_dim)
    result = run_training(job, lora_cfg, placement, d, resume=again)
    full = recover_full_model(cfg, w0, result.model, units, dtype)
    if args.merge:
        full = merge_lora(full)
    meta = {"loram_from": str(args.model), "prune_method": args.prune_method, "ratio": args.ratio}
    if is_main_process():
        checkpoint.save_model(result.model, d / "model", tokenizer=tok, overwrite=True, extra_meta=meta)
        checkpoint.save_model(full, run_dir / "model", tokenizer=tok, overwrite=True, extra_meta=meta)
    summary = {
        "prune_method": args.prune_method, "ratio": args.ratio, "attn_unit": args.attn_unit, "prunable_layers": layers,
        "params_full": cfg.num_params(), "params_pruned": small.config.num_params(),
        "trainable_params": tree_size(result.state.trainable), "quantize_base": run_cfg.quantize_base,
        "impl": s.impl, "merged": bool(args.merge), **describe_units(cfg, units, layers),
        "train": last_metrics(d), "align": last_metrics(run_dir / "align") if args.align_steps else None,
        "run_dir": str(run_dir), "model_dir": str(run_dir / "model"), "pruned_model_dir": str(d / "model"),
    }
    if is_main_process():
        write_json_atomic(run_dir / "loram.json", summary)
    if not args.json and is_main_process():
        print(f"loram {args.prune_method} ratio {args.ratio}: LoRA trained on {summary['params_pruned']:,} of "
              f"{summary['params_full']:,} parameters; full model with recovered LoRA in {run_dir / 'model'}",
              file=sys.stderr)
    return {k: v for k, v in summary.items() if k not in ("kept_heads", "kept_channels")}


def choose_units(args, run_cfg: TrainConfig, dense, blocks: Blocks, layers, placement: Placement, run_dir: Path,
                 record: dict, resume: bool) -> dict:
    """The kept heads / channels (RUN_DIR/units.json; read back on --resume)."""
    path = run_dir / "units.json"
    if resume and path.exists():
        return json.loads(path.read_text())
    cfg, unit = dense.config, args.attn_unit
    criterion = STRUCTURED.get(args.prune_method)
    if criterion.iterative:
        d, again = stage_dir(run_dir, "prune", record, resume)
        # the float base: --quantize-base is QLoRAM's, for the LoRA stage on the pruned model
        pcfg = dataclasses.replace(run_cfg, out=str(d), steps=args.prune_steps or run_cfg.steps, quantize_base="none")
        # W0 is on the host already: LoRA may go on `dense`
        s = setup_lora(args.model, pcfg, model=dense, mesh_devices=placement.mesh.size)
        opts = LoRAPruneOptions(prune_every=args.prune_every, beta=args.beta)
        hooks = loraprune_hooks(cfg, unit, layers, pcfg.steps, args.ratio, opts, pcfg.lora_scale, placement.put)
        masks = to_host(run_training(loraprune_job(s, hooks, pcfg), pcfg, placement, d, resume=again).state.masks)
    else:
        dense.remat = run_cfg.remat
        graphdef, frozen, trainable, masks = partition(dense)
        s = SimpleNamespace(model=dense, graphdef=graphdef, frozen=frozen, trainable=trainable, masks=masks,
                            blocks=blocks)
        masks = one_shot_masks(criterion, s, args.ratio, unit, layers, placement, calib_samples=args.calib_samples,
                               calib_len=args.calib_len, calib_batch=None, seed=args.seed)
    units = units_from_masks(masks)
    if is_main_process():
        write_json_atomic(path, units)
    return units


def align(args, run_cfg: TrainConfig, small, blocks: Blocks, tok, placement: Placement, run_dir: Path, record: dict,
          resume: bool):
    """W^P* = W^P + ΔW: full-rank training of the pruned model (float; RUN_DIR/align/model on --resume)."""
    d, again = stage_dir(run_dir, "align", record, resume)
    if again and checkpoint.is_checkpoint(d / "model"):
        return checkpoint.load_model(d / "model")
    acfg = dataclasses.replace(run_cfg, out=str(d), text=args.align_text or run_cfg.text, steps=args.align_steps,
                               lr=args.align_lr, quantize_base="none")
    graphdef, frozen, trainable, masks = partition_align(small)
    job = TrainJob(graphdef, frozen, trainable, masks, blocks, make_optimizer(acfg.optim()),
                   head_dim=small.config.head_dim)
    aligned = run_training(job, acfg, placement, d, resume=again).model
    if is_main_process():
        checkpoint.save_model(aligned, d / "model", tokenizer=tok, overwrite=True, extra_meta={"loram_stage": "align"})
    return aligned
