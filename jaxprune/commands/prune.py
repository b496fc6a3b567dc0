"""`jaxprune prune`: LoRAPrune (iterative, during LoRA fine-tuning) and one-shot baselines
(LLM-Pruner, magnitude, random) followed by the same LoRA recovery, then physical shrink; or
element-wise post-training pruning (magnitude, Wanda, SparseGPT; unstructured or N:M).

    RUN_DIR/ run.json, checkpoints/, metrics.jsonl, loss.png   (as finetune)
             prune.json   method, ratio, parameter counts, fraction removed, per-layer widths
             model/       the shrunk model (jaxprune checkpoint, LoRA merged)
    --sparsity / --pattern / wanda / sparsegpt:  OUT is a checkpoint with element masks
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

from .. import checkpoint, load
from ..errors import UserError
from ..fileio import check_output_dir, write_json_atomic
from ..partition import tree_size
from ..prune.groups import WIDTHS, check_attn_unit, structured_layers
from ..prune.loraprune import ATTN_SCORES, importance_hook, init_importance, scheduled_mask_update
from ..prune.masks import structured_sparsity, update_structured_masks
from ..prune.oneshot import one_shot_scores
from ..prune.posttraining import POSTTRAINING_METHODS, calibration_tokens, posttraining_layers, prune_model
from ..prune.schedule import CubicSchedule
from ..prune.select import parse_pattern, resolve_sparsity
from ..prune.shrink import describe_widths, shrink
from ..runs import TrainJob, last_metrics, prepare_run_dir, run_training, setup_lora, stage_dir
from ..sharding import init_distributed, is_main_process, placement_for, to_host
from ..train import LoopCallbacks, make_optimizer
from ..weights import linears, merge_lora
from .common import add_distill_args, add_run_args, mesh_config, run_record, train_config, with_config
from .flags import FRACTION_BELOW_1, NONNEG_FLOAT, POSITIVE_INT, SEQ_LEN

METHODS = ("loraprune", "llm-pruner", "magnitude", "random", "wanda", "sparsegpt")


def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="structured pruning: LoRAPrune or a one-shot baseline + LoRA recovery")
    p.add_argument("model")
    add_run_args(p, steps=200, frozen_base=True)
    p.add_argument("--method", choices=METHODS, default="loraprune")
    p.add_argument("--ratio", type=FRACTION_BELOW_1, default=0.5, help="per-layer fraction of units pruned")
    p.add_argument("--attn-unit", choices=("kv_group", "q_head"), default="kv_group",
                   help="attention unit: a whole KV group, or query heads (same count per group)")
    p.add_argument("--widths", choices=WIDTHS, default="uniform",
                   help="structured: 'uniform' prunes every layer to the same widths, so `export` writes a stock "
                        "transformers model as small as the pruned one; 'layerwise' keeps --exclude-layers at full "
                        "width (the papers' protocol; export then needs --format gguf|vllm or --pad)")
    p.add_argument("--exclude-layers", default="default",
                   help="comma-separated layer indices never pruned, 'none', or 'default' "
                        "(structured methods with --widths layerwise: layers < int(0.1·L) and the last one; "
                        "element-wise --sparsity/--pattern, wanda, sparsegpt: none, as in their papers)")
    p.add_argument("--prune-every", type=POSITIVE_INT, default=10, help="LoRAPrune: steps between mask updates")
    p.add_argument("--warmup-frac", type=FRACTION_BELOW_1, default=0.1,
                   help="LoRAPrune: fraction of steps before pruning")
    p.add_argument("--cooldown-frac", type=FRACTION_BELOW_1, default=0.1, help="LoRAPrune: final fine-tuning fraction")
    p.add_argument("--beta", type=FRACTION_BELOW_1, default=0.9, help="LoRAPrune: importance moving-average factor")
    p.add_argument("--attn-score", choices=ATTN_SCORES, default="ema",
                   help="LoRAPrune: rank attention units by the moving average at the prune step (ema, the "
                        "paper's) or by the mean score over every step so far (mean)")
    p.add_argument("--calib-samples", type=POSITIVE_INT, default=10, help="baselines: calibration sequences")
    p.add_argument("--calib-len", type=SEQ_LEN, default=64, help="baselines: calibration sequence length")
    p.add_argument("--recover-steps", type=POSITIVE_INT, default=None,
                   help="baselines (and LoRAPrune with --select-steps): LoRA recovery steps (default: --steps)")
    p.add_argument("--select-steps", type=POSITIVE_INT, default=None,
                   help="LoRAPrune: select the units in a run of this many steps (RUN_DIR/select), freeze the "
                        "masks, then recover with fresh LoRA for --recover-steps at the baselines' schedule "
                        "(the fair comparison with one-shot methods); default: prune during the one run")
    p.add_argument("--select-lora-rank", type=POSITIVE_INT, default=None,
                   help="LoRAPrune --select-steps: LoRA rank of the selection run (default: --lora-rank)")
    add_distill_args(p, "structured methods: recover (and, for LoRAPrune, prune) on (1-a)·CE + a·T²·KL to the "
                        "unpruned model, computed in the same step from the frozen base (Minitron); element-wise "
                        "models distil in `finetune --keep-sparsity --distill`")
    add_posttraining_args(p)  # wanda / sparsegpt / magnitude --sparsity: element masks, out = a checkpoint
    p.set_defaults(fn=with_config(cmd_prune, p))


def cmd_prune(args: argparse.Namespace) -> dict:
    if args.quantize_base != "none" and (args.method != "loraprune" or is_posttraining(args)):
        raise UserError(f"--quantize-base {args.quantize_base}: only --method loraprune keeps the base frozen "
                        f"(--method {args.method} reads base-weight gradients or rewrites the weights)")
    if is_posttraining(args):
        if args.distill:
            raise UserError("--distill: element-wise pruning writes a checkpoint without recovery; recover it with "
                            "`jaxprune finetune CKPT --keep-sparsity --distill --text FILE --out RUN_DIR`")
        return cmd_prune_posttraining(args)
    if not 0.0 <= args.ratio < 1.0:
        raise UserError(f"--ratio {args.ratio}: must be in [0, 1)")
    split = args.method == "loraprune" and args.select_steps is not None
    if args.method != "loraprune" and (args.select_steps or args.select_lora_rank):
        raise UserError("--select-steps / --select-lora-rank apply to --method loraprune")
    if args.recover_steps is not None and (args.method != "loraprune" or split):
        args.steps = args.recover_steps
    run_cfg, mc = train_config(args), mesh_config(args)
    init_distributed(mc)
    placement = placement_for(mc, run_cfg.batch_shape)
    s = setup_lora(args.model, run_cfg, mesh_devices=placement.mesh.size)
    cfg, unit = s.model.config, args.attn_unit
    placement.head_dim = cfg.head_dim
    layers = structured_layers(cfg.num_layers, args.exclude_layers, args.widths)
    check_attn_unit([cfg.kv_heads(i) for i in layers], unit, args.ratio)
    record = run_record(args, "prune")
    run_dir, prev = prepare_run_dir(run_cfg.out, record, resume=run_cfg.resume,
                                    overwrite=run_cfg.overwrite)  # after the checks above: bad input leaves no run dir
    frozen = placement.put(s.frozen)

    if split:  # LoRAPrune picks the units in its own run; recovery below is the baselines' (fresh LoRA)
        hook, hook_state, after_step = None, (), None
        # the selection run trains host copies of s's LoRA (its step donates them), so s.trainable stays fresh
        masks = select_with_loraprune(args, run_cfg, s, layers, placement, run_dir, record, prev is not None)
    elif args.method == "loraprune":
        hook = importance_hook(cfg, unit, run_cfg.lora_scale, args.beta)
        hook_state = init_importance(cfg, unit, track_sum=args.attn_score == "mean")
        schedule = CubicSchedule(args.steps, args.ratio, warmup=args.warmup_frac, cooldown=args.cooldown_frac,
                                 every=args.prune_every)
        after_step = scheduled_mask_update(cfg, unit, layers, schedule, placement.put, args.attn_score)
        masks = s.masks
    else:
        hook, hook_state, after_step = None, (), None
        calib = None
        if args.method == "llm-pruner":
            length = min(args.calib_len, s.blocks.train.shape[1])  # --seq-len below 64 shortens the samples too
            calib = placement.put_batch(s.blocks.calibration(args.calib_samples, length, seed=args.seed), 0,
                                        strict=False)
        scores = to_host(one_shot_scores(args.method, cfg, unit, frozen=frozen, graphdef=s.graphdef,
                                         trainable=placement.put(s.trainable), masks=placement.put(s.masks),
                                         calib=calib, seed=args.seed, calib_batch=args.calib_batch))
        masks = update_structured_masks(to_host(s.masks), scores, args.ratio, cfg, unit, layers)

    def callbacks(_frozen, _placement):
        return LoopCallbacks(after_step=after_step, describe=describe_sparsity(cfg, layers))
    job = TrainJob(s.graphdef, frozen, s.trainable, masks, s.blocks, make_optimizer(run_cfg.optim()),
                   head_dim=cfg.head_dim, grad_hook=hook, hook_state=hook_state, callbacks=callbacks)
    result = run_training(job, run_cfg, placement, run_dir, resume=prev is not None)
    state = result.state
    small = shrink(result.model)
    if is_main_process():
        checkpoint.save_model(small, run_dir / "model", tokenizer=s.tokenizer, overwrite=True,
                              extra_meta={"pruned_from": str(args.model), "method": args.method})
    before, after = cfg.num_params(), small.config.num_params()
    summary = {
        "method": args.method, "ratio": args.ratio, "attn_unit": unit, "impl": s.impl, "widths_mode": args.widths,
        "prunable_layers": layers,
        "params_before": before, "params_after": after, "params_removed_fraction": 1 - after / before,
        **structured_sparsity(to_host(state.masks), cfg, layers), "trainable_params": tree_size(state.trainable),
        "widths": describe_widths(small), "run_dir": str(run_dir), "model_dir": str(run_dir / "model"),
        "distill": {"alpha": args.distill_alpha, "temperature": args.distill_temp} if args.distill else None,
        "select_steps": args.select_steps if split else None,
        "attn_score": args.attn_score if args.method == "loraprune" else None,
        "select": last_metrics(run_dir / "select") if split else None,
    }
    if is_main_process():
        write_json_atomic(run_dir / "prune.json", summary)
    if not args.json and is_main_process():
        print(f"pruned {args.method} ratio {args.ratio}: {before:,} -> {after:,} parameters "
              f"({100 * summary['params_removed_fraction']:.1f}% of all removed); model in {run_dir / 'model'}",
              file=sys.stderr)
    return {k: v for k, v in summary.items() if k != "widths"}


def select_with_loraprune(args, run_cfg, s, layers, placement, run_dir, record, resume: bool):
    """LoRAPrune's selection run in RUN_DIR/select (--select-steps, rank --select-lora-rank): its final masks
    (host); its LoRA is discarded."""
    d, again = stage_dir(run_dir, "select", record, resume)
    rank = args.select_lora_rank or run_cfg.lora_rank
    scfg = dataclasses.replace(run_cfg, out=str(d), steps=args.select_steps, lora_rank=rank, distill=False)
    sel = s if rank == run_cfg.lora_rank else setup_lora(args.model, scfg, mesh_devices=placement.mesh.size)
    cfg, unit = sel.model.config, args.attn_unit
    schedule = CubicSchedule(args.select_steps, args.ratio, warmup=args.warmup_frac, cooldown=args.cooldown_frac,
                             every=args.prune_every)
    after_step = scheduled_mask_update(cfg, unit, layers, schedule, placement.put, args.attn_score)
    job = TrainJob(sel.graphdef, placement.put(sel.frozen), jax.tree.map(np.array, sel.trainable),
                   jax.tree.map(np.array, sel.masks), sel.blocks, make_optimizer(scfg.optim()),
                   head_dim=cfg.head_dim, grad_hook=importance_hook(cfg, unit, scfg.lora_scale, args.beta),
                   hook_state=init_importance(cfg, unit, track_sum=args.attn_score == "mean"),
                   callbacks=lambda _f, _p: LoopCallbacks(after_step=after_step,
                                                          describe=describe_sparsity(cfg, layers)))
    return to_host(run_training(job, scfg, placement, d, resume=again).state.masks)


def describe_sparsity(cfg, layers):
    """The loop's per-step record of the MLP channels pruned so far (metrics.jsonl 'sparsity')."""
    return lambda st: {"sparsity": structured_sparsity(to_host(st.masks), cfg, layers)["channels_pruned"]}


def add_posttraining_args(p) -> None:
    """Options of `jaxprune prune` for magnitude / wanda / sparsegpt element-wise pruning."""
    p.add_argument("--sparsity", type=FRACTION_BELOW_1, default=None,
                   help="element-wise pruning: fraction of every decoder linear's weights set to zero "
                        "(selects the unstructured path for magnitude; N:M patterns imply it); every decoder "
                        "layer is pruned unless --exclude-layers lists indices (its 'default' means none here)")
    p.add_argument("--pattern", default=None,
                   help="element-wise pattern: 'unstructured' (default) or N:M, e.g. 2:4, 4:8 (N kept of M)")
    p.add_argument("--calib", default=None, help="calibration text (.txt or dir; default: --text)")
    p.add_argument("--blocksize", type=POSITIVE_INT, default=128, help="sparsegpt: lazy-update block of input rows")
    p.add_argument("--percdamp", type=NONNEG_FLOAT, default=0.01, help="sparsegpt: dampening λ = percdamp·mean(diag H)")
    p.add_argument("--calib-batch", type=POSITIVE_INT, default=8,
                   help="calibration sequences per jitted pass (llm-pruner, wanda, sparsegpt)")


def is_posttraining(args) -> bool:
    return (args.method in ("wanda", "sparsegpt") or getattr(args, "sparsity", None) is not None
            or getattr(args, "pattern", None) is not None)


def cmd_prune_posttraining(args) -> dict:
    """`jaxprune prune MODEL --method {magnitude,wanda,sparsegpt} --sparsity S --pattern P --out CKPT`."""
    if args.method not in POSTTRAINING_METHODS:
        raise UserError(f"--sparsity / --pattern apply to {', '.join(POSTTRAINING_METHODS)}, "
                        f"not --method {args.method}")
    nm = parse_pattern(args.pattern)
    sparsity = resolve_sparsity(args.sparsity, nm)
    if not args.out:
        raise UserError("--out DIR is required")
    if args.blocksize < 1:
        raise UserError("--blocksize must be >= 1")
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    calib_path = args.calib or args.text
    if args.method != "magnitude" and not calib_path:
        raise UserError(f"--method {args.method} needs calibration text: --calib FILE (or --text)")
    model = load.load_model(args.model, args.dtype)
    layers = posttraining_layers(model.config.num_layers, getattr(args, "exclude_layers", None))
    if any(l.has_lora for _, l in linears(model)):
        model = merge_lora(model)
    tok = load.load_tokenizer(args.model, required=args.method != "magnitude")
    calib = None
    if args.method != "magnitude":
        calib = calibration_tokens(calib_path, tok, args.calib_samples, args.calib_len, args.seed)
    report = prune_model(model, calib, method=args.method, sparsity=sparsity, nm=nm, batch_size=args.calib_batch,
                         blocksize=args.blocksize, percdamp=args.percdamp, progress=args.progress, layers=layers)
    meta = {"pruned_from": str(Path(args.model).resolve()), "method": args.method, "sparsity": sparsity,
            "pattern": report["pattern"], "excluded_layers": report["excluded_layers"]}
    checkpoint.save_model(model, out, tokenizer=tok, overwrite=args.overwrite, extra_meta=meta)
    summary = {**meta, "model_dir": str(out), "sparsity_measured": report["sparsity_measured"],
               "seconds": report["seconds"], "damp_retries": report["damp_retries"],
               "calib_tokens": 0 if calib is None else int(calib.size)}
    if not args.json:
        excl = report["excluded_layers"]
        print(f"pruned {args.method} {report['pattern']} sparsity {sparsity:g}: "
              f"{100 * report['sparsity_measured']:.2f}% of decoder linear weights are zero"
              f"{f' (layers {excl} excluded, kept dense)' if excl else ''}; model in {out}", file=sys.stderr)
    return summary
