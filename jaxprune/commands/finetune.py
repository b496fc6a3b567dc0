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
from ..adapters.rank_allocation import (RANK_ALLOCATIONS, RankAllocationConfig, attach_rank_masks,
                                        finalize_rank_masks, training_hooks)
from ..errors import UserError
from ..partition import partition, tree_size
from ..prune.element_teacher import restore_pruned_weights, rezero_pruned_weights
from ..prune.posttraining import attach_sparsity_masks
from ..runs import TrainJob, last_metrics, prepare_run_dir, run_training, setup_lora
from ..sharding import init_distributed, is_main_process, log, placement_for
from ..train import LoopCallbacks, make_optimizer
from ..weights import merge_lora
from .common import add_distill_args, add_run_args, mesh_config, run_record, train_config, with_config
from .flags import NONNEG_INT, POSITIVE_INT



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
    alloc = rank_allocation_config(args, cfg)
    if alloc.kind != "fixed" and adapter.name != "lora":
        raise UserError(f"--rank-allocation {alloc.kind} masks LoRA's rank components (A[:, j], B[j, :]): not with "
                        f"--adapter {adapter.name}; use --adapter lora")
    model = None
    if args.keep_sparsity:  # element masks: kept from a checkpoint, else W != 0
        model = load.load_model(args.model, cfg.dtype)
        attach_sparsity_masks(model)
        if args.distill:  # the base holds the teacher's weights under the masks: the teacher costs no memory
            args.teacher = teacher_path(args)
            restored = restore_pruned_weights(model, load.load_model(args.teacher, cfg.dtype), args.teacher)
            if not cfg.quiet:
                log(f"distilling from {args.teacher}: its {restored:,} pruned weights restored under the masks")
    s = setup_lora(args.model, cfg, model, kernel_mesh=placement.kernel_mesh())
    if adapter.convert is not None:  # LoRA is attached (same draws at one seed); the adapter's layers replace it
        attach_adapter(s.model, adapter.name, seed=cfg.seed)
        s.graphdef, s.frozen, s.trainable, s.masks = partition(s.model)
    extra = {}
    if alloc.kind != "fixed":  # a rank mask per LoRA layer (the masks pytree) and the schedule's hooks
        layers = attach_rank_masks(s.model, alloc)
        s.graphdef, s.frozen, s.trainable, s.masks = partition(s.model)
        allocator, extra = training_hooks(alloc, s.trainable, layers)
        extra["callbacks"] = lambda frozen, placement: LoopCallbacks(after_step=allocator.after_step,
                                                                     describe=allocator.describe)
    run_dir, prev = prepare_run_dir(cfg.out, run_record(args, "finetune"), resume=cfg.resume,
                                    overwrite=cfg.overwrite)  # after the checks above: bad input leaves no run dir
    job = TrainJob(s.graphdef, s.frozen, s.trainable, s.masks, s.blocks, make_optimizer(cfg.optim()),
                   head_dim=s.model.config.head_dim, **extra)
    result = run_training(job, cfg, placement, run_dir, resume=prev is not None)
    ranks = finalize_rank_masks(result.model) if alloc.kind != "fixed" else None  # masked components dropped
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
            "trainable_params": tree_size(result.state.trainable), "rank_allocation": alloc.kind,
            **({"ranks_kept": sum(ranks.values())} if ranks is not None else {}), **last_metrics(run_dir)}


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="adapter (LoRA, DoRA, ...) fine-tuning on a frozen base")
    p.add_argument("model")
    add_run_args(p, steps=200, frozen_base=True)
    p.add_argument("--adapter", choices=ADAPTERS.names(), default="lora",
                   help="what trains on the frozen base (names as PEFT's): "
                        + "; ".join(f"{a.name}: {a.summary}" for a in ADAPTERS)
                        + ". --lora-rank / --lora-alpha / --targets set every adapter's A, B")
    p.add_argument("--rank-allocation", choices=RANK_ALLOCATIONS, default="fixed",
                   help="how many of LoRA's --lora-rank components each layer keeps (adapters/rank_allocation.py): "
                        "fixed: all; adalora: sensitivity-scored components masked globally down a cubic budget "
                        "schedule to --rank-target per layer on average; increlora: layers start at --rank-init and "
                        "the highest-scoring grow by one every --rank-every steps up to --rank-target on average; "
                        "dylora: each step trains a random rank b <= r (scale α/b), any rank works afterwards")
    p.add_argument("--rank-target", type=POSITIVE_INT, default=None,
                   help="adalora / increlora: the average rank per layer at the end (default: --lora-rank / 2)")
    p.add_argument("--rank-init", type=POSITIVE_INT, default=1, help="increlora: each layer's starting rank")
    p.add_argument("--rank-tinit", type=NONNEG_INT, default=0,
                   help="adalora / increlora: steps before the first allocation (AdaLoRA's t_init)")
    p.add_argument("--rank-tfinal", type=NONNEG_INT, default=0,
                   help="adalora / increlora: final steps with the ranks fixed (AdaLoRA's t_final)")
    p.add_argument("--rank-every", type=POSITIVE_INT, default=1,
                   help="adalora / increlora: steps between allocations (AdaLoRA's ΔT, IncreLoRA's interval)")
    p.add_argument("--rank-grow", type=POSITIVE_INT, default=1,
                   help="increlora: layers that grow by one rank per increment")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights in RUN_DIR/model")
    p.add_argument("--keep-sparsity", action="store_true",
                   help="train through (W + s·A@B) ⊙ M: masks from the checkpoint, else M = (W != 0)")
    add_distill_args(p, "with --keep-sparsity: recover a magnitude / Wanda model on (1-a)·CE + a·T²·KL to the "
                        "model it was pruned from (--teacher), computed in the same step from the frozen base, "
                        "which holds the teacher's weights under the masks (no second copy)")
    p.add_argument("--teacher", default=None,
                   help="--distill: the unpruned model (default: the checkpoint's 'pruned_from')")
    p.set_defaults(fn=with_config(cmd_finetune, p))


def rank_allocation_config(args: argparse.Namespace, cfg) -> RankAllocationConfig:
    """--rank-* flags -> a checked ``RankAllocationConfig`` (one UserError for a schedule that cannot run)."""
    target = args.rank_target if args.rank_target is not None else max(1, cfg.lora_rank // 2)
    c = RankAllocationConfig(kind=args.rank_allocation, rank=cfg.lora_rank, target=target, init=args.rank_init,
                             tinit=args.rank_tinit, tfinal=args.rank_tfinal, every=args.rank_every,
                             grow=args.rank_grow, total=cfg.steps, seed=cfg.seed)
    c.check()
    return c


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
