"""`jaxprune prune`: LoRAPrune (iterative, during LoRA fine-tuning) and one-shot baselines
(LLM-Pruner, magnitude, random) followed by the same LoRA recovery, then physical shrink.

    RUN_DIR/ run.json, checkpoints/, metrics.jsonl, loss.png   (as finetune)
             prune.json   method, ratio, parameter counts, fraction removed, per-layer widths
             model/       the shrunk model (jaxprune checkpoint, LoRA merged)
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import UserError
from .groups import excluded_layers_default

METHODS = ("loraprune", "llm-pruner", "magnitude", "random", "wanda", "sparsegpt")


def add_prune_parser(sub) -> None:
    from ..train_cli import _with_config, add_run_args

    p = sub.add_parser("prune", help="structured pruning: LoRAPrune or a one-shot baseline + LoRA recovery")
    p.add_argument("model")
    add_run_args(p, steps=200, frozen_base=True)
    p.add_argument("--method", choices=METHODS, default="loraprune")
    p.add_argument("--ratio", type=float, default=0.5, help="per-layer fraction of units pruned")
    p.add_argument("--attn-unit", choices=("kv_group", "q_head"), default="kv_group",
                   help="attention unit: a whole KV group, or query heads (same count per group)")
    p.add_argument("--exclude-layers", default="default",
                   help="comma-separated layer indices never pruned, 'none', or 'default' "
                        "(structured methods: layers < int(0.1·L) and the last one; element-wise "
                        "--sparsity/--pattern, wanda, sparsegpt: none, as in their papers)")
    p.add_argument("--prune-every", type=int, default=10, help="LoRAPrune: steps between mask updates")
    p.add_argument("--warmup-frac", type=float, default=0.1, help="LoRAPrune: fraction of steps before pruning")
    p.add_argument("--cooldown-frac", type=float, default=0.1, help="LoRAPrune: final fine-tuning fraction")
    p.add_argument("--beta", type=float, default=0.9, help="LoRAPrune: importance moving-average factor")
    p.add_argument("--calib-samples", type=int, default=10, help="baselines: calibration sequences")
    p.add_argument("--calib-len", type=int, default=64, help="baselines: calibration sequence length")
    p.add_argument("--recover-steps", type=int, default=None,
                   help="baselines: LoRA recovery steps (default: --steps, the LoRAPrune budget)")
    from .posttraining import add_posttraining_args
    add_posttraining_args(p)  # wanda / sparsegpt / magnitude --sparsity: element masks, out = a checkpoint
    p.set_defaults(fn=_with_config(cmd_prune, p))


def prunable_layers(num_layers: int, exclude: str) -> list[int]:
    if exclude == "default":
        excluded = set(excluded_layers_default(num_layers))
    elif exclude in ("none", ""):
        excluded = set()
    else:
        try:
            excluded = {int(x) for x in str(exclude).split(",") if x.strip()}
        except ValueError:
            raise UserError(f"--exclude-layers {exclude!r}: expected comma-separated integers, "
                            "'none' or 'default'") from None
        bad = [i for i in excluded if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"--exclude-layers: layer {bad[0]} out of range 0..{num_layers - 1}")
    return [i for i in range(num_layers) if i not in excluded]


def taylor_importance_step(graphdef, cfg, unit):
    """LLM-Pruner's importance step: base-weight gradients on a calibration batch [n, S] -> unit scores."""
    from ..train import make_loss_fn
    from .importance import taylor_importance

    loss_fn = make_loss_fn(graphdef)

    @jax.jit
    def step(frozen, trainable, masks, batch):
        grads = jax.grad(lambda fr: loss_fn(trainable, fr, masks, batch)[0])(frozen)
        return taylor_importance(cfg, nnx.to_pure_dict(frozen), nnx.to_pure_dict(grads), unit)
    return step


def one_shot_scores(method: str, s, cfg, unit, args, placement, frozen):
    """Unit scores of a one-shot baseline; ``frozen`` is the base already on ``placement``'s mesh."""
    from .importance import magnitude_importance, random_importance

    if method == "magnitude":
        return magnitude_importance(cfg, nnx.to_pure_dict(frozen), unit)
    if method == "random":
        return random_importance(cfg, unit, args.seed)
    length = min(args.calib_len, s.blocks.train.shape[1])  # --seq-len below 64 shortens the samples too
    calib = placement.put_batch(s.blocks.calibration(args.calib_samples, length, seed=args.seed), 0, strict=False)
    return taylor_importance_step(s.graphdef, cfg, unit)(frozen, placement.put(s.trainable),
                                                         placement.put(s.masks), calib)


def cmd_prune(args) -> dict:
    from .. import checkpoint
    from ..partition import tree_size
    from ..sharding import init_distributed, is_main_process, placement_from_args, to_host
    from ..train import (LoopCallbacks, make_eval_step, make_optimizer, make_train_step, plot_metrics,
                         save_json_atomic, state_shardings_of, train_loop)
    from ..train_cli import (compute_dtype, final_model, loop_config, optim_config, placed_state, prepare_run_dir,
                             setup_lora_run)
    from .loraprune import importance_hook, init_importance
    from .masks import structured_sparsity, update_structured_masks
    from .schedule import CubicSchedule
    from .posttraining import cmd_prune_posttraining, is_posttraining
    from .shrink import describe_widths, shrink

    if args.quantize_base != "none" and (args.method != "loraprune" or is_posttraining(args)):
        raise UserError(f"--quantize-base {args.quantize_base}: only --method loraprune keeps the base frozen "
                        f"(--method {args.method} reads base-weight gradients or rewrites the weights)")
    if is_posttraining(args):
        return cmd_prune_posttraining(args)
    if not 0.0 <= args.ratio < 1.0:
        raise UserError(f"--ratio {args.ratio}: must be in [0, 1)")
    if args.method != "loraprune" and args.recover_steps is not None:
        args.steps = args.recover_steps
    init_distributed(args)
    placement = placement_from_args(args, None)
    s = setup_lora_run(args)
    cfg, unit = s.model.config, args.attn_unit
    placement.head_dim = cfg.head_dim
    layers = prunable_layers(cfg.num_layers, args.exclude_layers)
    run_dir, prev = prepare_run_dir(args, "prune")  # after the checks above: bad input leaves no run dir
    optimizer = make_optimizer(optim_config(args))
    lora_scale = args.lora_alpha / args.lora_rank
    frozen = placement.put(s.frozen)

    if args.method == "loraprune":
        hook = importance_hook(cfg, unit, lora_scale, args.beta)
        hook_state = init_importance(cfg, unit)
        schedule = CubicSchedule(args.steps, args.ratio, warmup=args.warmup_frac, cooldown=args.cooldown_frac,
                                 every=args.prune_every)

        def after_step(step, st):  # on the host, between jitted steps; masks go back onto the mesh
            t = step + 1
            if schedule.is_prune_step(t):
                scores, masks = to_host(((st.hook_state.attn, st.hook_state.mlp), st.masks))
                masks = update_structured_masks(masks, scores, schedule.ratio(t), cfg, unit, layers)
                st = st._replace(masks=placement.put(masks))
            return st
        masks = s.masks
    else:
        hook, hook_state, after_step = None, (), None
        scores = to_host(one_shot_scores(args.method, s, cfg, unit, args, placement, frozen))
        masks = update_structured_masks(to_host(s.masks), scores, args.ratio, cfg, unit, layers)

    frozen, state, start = placed_state(args, s, placement, optimizer, run_dir, prev, frozen=frozen, masks=masks,
                                        hook_state=hook_state)

    step_fn = make_train_step(s.graphdef, optimizer, grad_hook=hook, compute_dtype=compute_dtype(args),
                              state_shardings=state_shardings_of(state))
    eval_fn = make_eval_step(s.graphdef, compute_dtype(args))
    callbacks = LoopCallbacks(after_step=after_step,
                              describe=lambda st: {"sparsity": structured_sparsity(to_host(st.masks), cfg, layers)
                                                   ["channels_pruned"]})
    state = train_loop(state, frozen, step_fn, eval_fn, s.blocks, run_dir, loop_config(args), start_step=start,
                       callbacks=callbacks, placement=placement)
    small = shrink(final_model(s.graphdef, frozen, state))
    if is_main_process():
        plot_metrics(run_dir)
        checkpoint.save_model(small, run_dir / "model", tokenizer=s.tokenizer, overwrite=True,
                              extra_meta={"pruned_from": str(args.model), "method": args.method})
    before, after = cfg.num_params(), small.config.num_params()
    summary = {
        "method": args.method, "ratio": args.ratio, "attn_unit": unit, "prunable_layers": layers,
        "params_before": before, "params_after": after, "params_removed_fraction": 1 - after / before,
        **structured_sparsity(to_host(state.masks), cfg, layers), "trainable_params": tree_size(state.trainable),
        "widths": describe_widths(small), "run_dir": str(run_dir), "model_dir": str(run_dir / "model"),
    }
    if is_main_process():
        save_json_atomic(run_dir / "prune.json", summary)
    if not args.json and is_main_process():
        print(f"pruned {args.method} ratio {args.ratio}: {before:,} -> {after:,} parameters "
              f"({100 * summary['params_removed_fraction']:.1f}% of all removed); model in {run_dir / 'model'}",
              file=sys.stderr)
    return {k: v for k, v in summary.items() if k != "widths"}
