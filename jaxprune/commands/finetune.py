"""`jaxprune finetune`: adapter fine-tuning of a frozen base (LoRA, DoRA, ...: ``--adapter``), with resume and merge.

    RUN_DIR/ run.json, checkpoints/, metrics.jsonl, loss.png   (``runs.py``)
             model/   the result as a jaxprune checkpoint (the adapter merged with --merge, and always for an
                      adapter the checkpoint format cannot record unmerged: ``Adapter.saves_unmerged``)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import checkpoint, load
from ..adapters import ADAPTERS, attach_adapter
from ..errors import UserError
from ..partition import partition, tree_size
from ..prune.element_teacher import restore_pruned_weights, rezero_pruned_weights
from ..prune.posttraining import attach_sparsity_masks
from ..runs import TrainJob, last_metrics, prepare_run_dir, run_training, setup_lora
from ..sharding import init_distributed, is_main_process, log, placement_for
from ..train import make_optimizer
from ..weights import merge_lora
from .common import add_distill_args, add_run_args, mesh_config, run_record, train_config, with_config



def cmd_finetune(args: argparse.Namespace) -> dict:
    cfg, mc = train_config(args), mesh_config(args)
    init_distributed(mc)
    placement = placement_for(mc, cfg.batch_shape)  # a bad --mesh fails before anything is written
    if args.teacher and not args.distill:
        raise UserError("--teacher applies to --distill")
    if args.distill and args.quantize_base != "none":
        raise UserError(f"finetune --distill with --quantize-base {args.quantize_base}: the int8 scales would be taken "
                        "over the teacher's restored weights too, changing the pruned model; use a float base")
    if args.distill and not args.keep_sparsity:
        raise UserError("finetune --distill distils an element-wise pruned model into its sparsity: pass "
                        "--keep-sparsity (structured pruning distils in `prune --distill`)")
    adapter = ADAPTERS.get(args.adapter)
    adapter.check(distill=args.distill, int8=args.quantize_base == "int8", keep_sparsity=args.keep_sparsity,
                  pallas=args.impl == "pallas")
    model = None
    if args.keep_sparsity:  # element masks: kept from a checkpoint, else W != 0
        model = load.load_model(args.model, cfg.dtype)
        attach_sparsity_masks(model)
        if args.distill:  # the base holds the teacher's weights under the masks: the teacher costs no memory
            args.teacher = teacher_path(args)
            restored = restore_pruned_weights(model, load.load_model(args.teacher, cfg.dtype), args.teacher)
            if not cfg.quiet:
                log(f"distilling from {args.teacher}: its {restored:,} pruned weights restored under the masks")
    s = setup_lora(args.model, cfg, model, mesh_devices=placement.mesh.size)
    if adapter.convert is not None:  # LoRA is attached (same draws at one seed); the adapter's layers replace it
        attach_adapter(s.model, adapter.name, seed=cfg.seed)
        s.graphdef, s.frozen, s.trainable, s.masks = partition(s.model)
    run_dir, prev = prepare_run_dir(cfg.out, run_record(args, "finetune"), resume=cfg.resume,
                                    overwrite=cfg.overwrite)  # after the checks above: bad input leaves no run dir
    job = TrainJob(s.graphdef, s.frozen, s.trainable, s.masks, s.blocks, make_optimizer(cfg.optim()),
                   head_dim=s.model.config.head_dim)
    result = run_training(job, cfg, placement, run_dir, resume=prev is not None)
    merge = args.merge or not adapter.saves_unmerged
    if merge and not args.merge and not cfg.quiet:
        log(f"{run_dir / 'model'}: the {adapter.name} adapter is merged into the weights (a checkpoint records "
            "LoRA factors only)")
    model = merge_lora(result.model) if merge else result.model
    if args.distill:
        rezero_pruned_weights(model)  # saved element-masked models keep their pruned weights at 0
    if is_main_process():
        checkpoint.save_model(model, run_dir / "model", tokenizer=s.tokenizer, overwrite=True)
    return {"run_dir": str(run_dir), "impl": s.impl, "adapter": adapter.name, "merged": merge,
            "trainable_params": tree_size(result.state.trainable), **last_metrics(run_dir)}


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="adapter (LoRA, DoRA, ...) fine-tuning on a frozen base")
    p.add_argument("model")
    add_run_args(p, steps=200, frozen_base=True)
    p.add_argument("--adapter", choices=ADAPTERS.names(), default="lora",
                   help="what trains on the frozen base (names as PEFT's): "
                        + "; ".join(f"{a.name}: {a.summary}" for a in ADAPTERS)
                        + ". --lora-rank / --lora-alpha / --targets set every adapter's A, B")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights in RUN_DIR/model")
    p.add_argument("--keep-sparsity", action="store_true",
                   help="train through (W + s·A@B) ⊙ M: masks from the checkpoint, else M = (W != 0)")
    add_distill_args(p, "with --keep-sparsity: recover a magnitude / Wanda model on (1-a)·CE + a·T²·KL to the "
                        "model it was pruned from (--teacher), computed in the same step from the frozen base, "
                        "which holds the teacher's weights under the masks (no second copy)")
    p.add_argument("--teacher", default=None,
                   help="--distill: the unpruned model (default: the checkpoint's 'pruned_from')")
    p.set_defaults(fn=with_config(cmd_finetune, p))


def teacher_path(args: argparse.Namespace) -> str:
    """--teacher, else the 'pruned_from' that `prune --sparsity` wrote into the checkpoint; as an absolute path."""
    if args.teacher:
        return str(Path(args.teacher).resolve())
    kind, path = load.resolve(args.model)
    origin = checkpoint.read_meta(path).get("pruned_from") if kind == "checkpoint" else None
    if origin is None or not Path(origin).exists():
        raise UserError(f"finetune --distill: pass --teacher MODEL (the unpruned model; {args.model} names "
                        f"{'none' if origin is None else f'{origin}, which does not exist here'})")
    return str(Path(origin).resolve())
