"""`jaxprune pretrain`: a tiny LLaMA from random init, full-rank / low-rank / SLTrain / SLoPe.

    RUN_DIR/ run.json, checkpoints/, metrics.jsonl, loss.png   (as finetune)
             support/       SLTrain's frozen supports (orbax), restored on --resume
             pretrain.json  method, parameter counts, optimizer-state bytes, final metrics
             model/         the result as a DENSE jaxprune checkpoint (merged weights), so
                            `jaxprune eval RUN_DIR` and `jaxprune export RUN_DIR OUT` work unchanged
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from ..errors import UserError
from .methods import METHODS, MethodConfig


def add_pretrain_parser(sub) -> None:
    from ..train_cli import _with_config, add_run_args

    p = sub.add_parser("pretrain", help="pretrain a tiny LLaMA from random init: full, lowrank, sltrain or slope")
    add_run_args(p, steps=200, lr=3e-3)
    # add_run_args' LoRA flags name the low-rank factors here: --lora-rank r, --lora-alpha α (s = α / r),
    # --targets the decoder linears that get the method. Defaults: configs/pretrain_tiny.yaml's model.
    p.set_defaults(lora_rank=32, lora_alpha=8.0, seq_len=128, batch_size=4)
    p.add_argument("--method", choices=METHODS, default="sltrain")
    p.add_argument("--tokenizer", default=None,
                   help="dir with tokenizer.json (default: the cached SmolLM2 fixture); sets the vocab size")
    g = p.add_argument_group("model (LLaMA, random init)")
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--intermediate-size", type=int, default=352)
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--num-heads", type=int, default=4)
    g.add_argument("--num-kv-heads", type=int, default=4)
    g.add_argument("--head-dim", type=int, default=None, help="default: hidden-size / num-heads")
    g.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="share embed_tokens and lm_head (SmolLM2 does); --no-tie-word-embeddings unties")
    g = p.add_argument_group("sltrain")
    g.add_argument("--sparse-ratio", type=float, default=0.03, help="δ: the support holds ⌊δ·in·out⌋ entries")
    g = p.add_argument_group("slope")
    g.add_argument("--adapter-rank", type=int, default=16, help="lazy adapter rank r (0: none)")
    g.add_argument("--adapter-frac", type=float, default=0.01, help="fraction of final steps with adapters")
    g.add_argument("--mask-change-freq", type=int, default=100, help="steps between mask refreshes")
    g.add_argument("--mask-refresh-frac", type=float, default=0.1,
                   help="fraction of initial steps during which the forward 2:4 mask is refreshed too")
    g.add_argument("--max-aspect-ratio", type=float, default=5.0, help="layers thinner than this stay dense")
    p.set_defaults(fn=_with_config(cmd_pretrain, p))


def method_config(args) -> MethodConfig:
    return MethodConfig(method=args.method, rank=args.lora_rank, alpha=args.lora_alpha, delta=args.sparse_ratio,
                        targets=args.targets, adapter_rank=args.adapter_rank, max_aspect_ratio=args.max_aspect_ratio)


def slope_schedule(args):
    from .slope import SLoPeSchedule
    return SLoPeSchedule(args.steps, args.mask_change_freq, args.mask_refresh_frac, args.adapter_frac)


def load_tokenizer(path):
    from ..fixtures import fixture_paths
    from ..hf import load_tokenizer as hf_tokenizer

    p = Path(path) if path else fixture_paths().hf_dir
    if not p.is_dir():
        raise UserError(f"{p}: no such tokenizer dir" + ("" if path else
                        " (pass --tokenizer DIR, or run scripts/fixtures.py for the SmolLM2 one)"))
    tok = hf_tokenizer(p)
    if tok is None:
        raise UserError(f"{p}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return tok


def model_config(args, tokenizer):
    """The random-init model's ModelConfig; the vocabulary is the tokenizer's."""
    from ..config import ModelConfig

    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    head_dim = args.head_dim or args.hidden_size // args.num_heads
    return ModelConfig(vocab_size=max(len(tokenizer), tokenizer.vocab_size), hidden_size=args.hidden_size,
                       intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                       num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=head_dim,
                       max_position_embeddings=max(2048, args.seq_len), rms_norm_eps=1e-5,
                       tie_word_embeddings=bool(args.tie_word_embeddings), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def save_support(run_dir: Path, frozen) -> None:
    """SLTrain's supports (the only frozen arrays of a pretraining run) next to the checkpoints."""
    from ..checkpoint import save_pytree
    from ..train import _leaves_dict

    if jax.tree.leaves(frozen):
        save_pytree(run_dir / "support", _leaves_dict(frozen))


def restore_support(run_dir: Path, frozen):
    """``frozen`` with every leaf read back from RUN_DIR/support: the support never changes on resume."""
    from ..checkpoint import restore_pytree
    from ..train import _leaves_dict

    leaves, treedef = jax.tree.flatten(frozen)
    if not leaves:
        return frozen
    if not (run_dir / "support").exists():
        raise UserError(f"{run_dir}: support/ is missing; cannot resume an SLTrain run without it")
    saved = restore_pytree(run_dir / "support", {k: jax.ShapeDtypeStruct(x.shape, x.dtype)
                                                 for k, x in _leaves_dict(frozen).items()})
    return jax.tree.unflatten(treedef, [jnp.asarray(saved[k]) for k in sorted(saved)])


def cmd_pretrain(args) -> dict:
    from .. import checkpoint
    from ..data import Blocks, token_stream
    from ..partition import tree_bytes
    from ..sharding import init_distributed, is_main_process, placement_from_args
    from ..train import (LoopCallbacks, make_eval_step, make_train_step, place_train_state, plot_metrics,
                         restore_latest, save_json_atomic, state_shardings_of, train_loop)
    from ..train_cli import (_last_metrics, compute_dtype, final_model, loop_config, optim_config, prepare_run_dir,
                             report_fallbacks)
    from ..load import DTYPES
    from .methods import build_model, dense_model, make_pretrain_optimizer, param_summary, partition_pretrain
    from .slope import initial_masks, make_after_step

    init_distributed(args)
    placement = placement_from_args(args)  # a bad --mesh or batch fails before anything is written
    mc = method_config(args)
    schedule = slope_schedule(args) if mc.method == "slope" else None
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be >= 1")
    if not args.text:
        raise UserError("--text FILE is required")
    tok = load_tokenizer(args.tokenizer)
    cfg = model_config(args, tok)
    blocks = Blocks.from_stream(token_stream(args.text, tok), args.seq_len, seed=args.seed)
    model = build_model(cfg, mc, seed=args.seed, dtype=DTYPES[args.dtype] if args.dtype else jnp.float32)
    summary = param_summary(model, cfg, mc)
    graphdef, frozen, trainable, masks = partition_pretrain(model)
    run_dir, prev = prepare_run_dir(args, "pretrain")  # after the checks above: bad input leaves no run dir

    optimizer = make_pretrain_optimizer(optim_config(args), trainable)
    placement.head_dim = cfg.head_dim
    state = place_train_state(placement, optimizer, trainable, masks)
    start = 0
    if prev is None:
        if is_main_process():
            save_support(run_dir, frozen)
    else:
        frozen = restore_support(run_dir, frozen)
    frozen = placement.put(frozen)
    if prev is not None:
        state, start = restore_latest(run_dir, state)
    report_fallbacks(args, placement)

    callbacks = None
    if schedule is not None:
        if start == 0:
            state = state._replace(masks=placement.put(initial_masks(graphdef, frozen, state.trainable, state.masks,
                                                                     schedule)))
        slope_step = make_after_step(graphdef, frozen, schedule)

        def after_step(step, st):  # new masks go back to the mesh's shardings (one compile per run)
            st = slope_step(step, st)
            return st._replace(masks=placement.put(st.masks))
        callbacks = LoopCallbacks(after_step=after_step)

    step_fn = make_train_step(graphdef, optimizer, compute_dtype=compute_dtype(args),
                              state_shardings=state_shardings_of(state))
    eval_fn = make_eval_step(graphdef, compute_dtype(args))
    state = train_loop(state, frozen, step_fn, eval_fn, blocks, run_dir, loop_config(args), start_step=start,
                       callbacks=callbacks, placement=placement)
    dense = dense_model(final_model(graphdef, frozen, state))
    if is_main_process():
        plot_metrics(run_dir)
        checkpoint.save_model(dense, run_dir / "model", tokenizer=tok, overwrite=True,
                              extra_meta={"pretrain_method": mc.method})
    result = {"method": mc.method, "run_dir": str(run_dir), "model_dir": str(run_dir / "model"), **summary,
              "opt_state_bytes": tree_bytes(state.opt_state), **_last_metrics(run_dir)}
    if schedule is not None:
        result["adapter_start_step"] = schedule.adapter_start
    if is_main_process():
        save_json_atomic(run_dir / "pretrain.json", result)
    if not args.json and is_main_process():
        print(f"pretrained {mc.method}: {summary['trainable_params']:,} trainable parameters, "
              f"val ppl {result['val_ppl']}; dense model in {run_dir / 'model'}", file=sys.stderr)
    return result
