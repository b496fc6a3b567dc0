"""`jaxprune pretrain`: a tiny LLaMA from random init, full-rank / low-rank / SLTrain / SLoPe / LOST /
SwitchLoRA / S-STE.

    RUN_DIR/ run.json, checkpoints/, metrics.jsonl, loss.png   (as finetune)
             support/       the frozen arrays (SLTrain supports, LOST channels, SwitchLoRA candidate pools,
                            S-STE scales; orbax), restored on --resume
             pretrain.json  method, parameter counts, optimizer-state bytes, final metrics
             model/         the result as a DENSE jaxprune checkpoint (merged weights), so
                            `jaxprune eval RUN_DIR` and `jaxprune export RUN_DIR OUT` work unchanged
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp

from .. import checkpoint
from ..config import ModelConfig
from ..data import Blocks, token_stream
from ..errors import UserError
from ..fileio import write_json_atomic
from ..fixtures import PLAYS_TOKENIZER, fixture_paths, named_tokenizer_dir
from ..hf import load_tokenizer as hf_tokenizer
from ..load import DTYPES
from ..partition import tree_bytes
from ..pretrain.methods import (METHODS, MethodConfig, build_model, dense_model, make_pretrain_optimizer,
                                param_summary, partition_pretrain)
from ..pretrain.slope import SLoPeSchedule, initial_masks, make_after_step
from ..pretrain.sltrain import restore_support, save_support
from ..pretrain.switchlora import SwitchSchedule
from ..pretrain.switchlora import make_after_step as switchlora_after_step
from ..runs import TrainJob, last_metrics, prepare_run_dir, run_training
from ..sharding import init_distributed, is_main_process, placement_for
from ..train import LoopCallbacks
from ..weights import set_linear_impl
from .common import add_impl_arg, add_run_args, mesh_config, run_record, train_config, with_config
from .flags import AT_LEAST_1, FRACTION, NONNEG_INT, OPEN_FRACTION, POSITIVE_INT, float_range

FRACTION_ABOVE_0 = float_range(0.0, 1.0, lo_open=True)  # (0, 1]


def add_pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a tiny LLaMA from random init: full, lowrank, sltrain, slope, lost, "
                       "switchlora or sste")
    add_run_args(p, steps=200, lr=3e-3)
    # add_run_args' LoRA flags name the low-rank factors here: --lora-rank r, --lora-alpha α (s = α / r),
    # --targets the decoder linears that get the method. Defaults: configs/pretrain_tiny.yaml's model.
    # --lora-rank is also LOST's and SwitchLoRA's rank; --lora-alpha is lowrank / sltrain only (LOST's
    # SVD factors have no scale, SwitchLoRA's is the official 1 / r).
    p.set_defaults(lora_rank=32, lora_alpha=8.0, seq_len=128, batch_size=4)
    p.add_argument("--method", choices=METHODS, default="sltrain",
                   help="full | lowrank (s·A@B) | sltrain (+ random sparse S) | slope (2:4, double-pruned backward) | "
                   "lost (SVD low rank + sparse channels) | switchlora (switched LoRA vectors, W frozen) | "
                   "sste (continuous 2:4 soft-threshold, frozen β, straight-through; no flags of its own)")
    p.add_argument("--tokenizer", default=None,
                   help="dir with tokenizer.json, or a cached one by name: smollm2 (the default, 49,152 tokens) or "
                   f"{PLAYS_TOKENIZER} (the plays' own BPE); sets the vocab size")
    g = p.add_argument_group("model (LLaMA, random init)")
    g.add_argument("--hidden-size", type=POSITIVE_INT, default=128)
    g.add_argument("--intermediate-size", type=POSITIVE_INT, default=352)
    g.add_argument("--num-layers", type=POSITIVE_INT, default=4)
    g.add_argument("--num-heads", type=POSITIVE_INT, default=4)
    g.add_argument("--num-kv-heads", type=POSITIVE_INT, default=4)
    g.add_argument("--head-dim", type=POSITIVE_INT, default=None, help="default: hidden-size / num-heads")
    g.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="share embed_tokens and lm_head (SmolLM2 does); --no-tie-word-embeddings unties")
    g = p.add_argument_group("sltrain")
    g.add_argument("--sparse-ratio", type=OPEN_FRACTION, default=0.03, help="δ: the support holds ⌊δ·in·out⌋ entries")
    g.add_argument("--sltrain-b-init", choices=("zero", "uniform"), default="zero",
                   help="the up factor B at init: zero (the official code: W starts as S alone) or U(±1/√r) "
                   "(as the low-rank baseline)")
    g = p.add_argument_group("slope")
    g.add_argument("--adapter-rank", type=NONNEG_INT, default=16, help="lazy adapter rank r (0: none)")
    g.add_argument("--adapter-frac", type=FRACTION, default=0.01, help="fraction of final steps with adapters")
    g.add_argument("--mask-change-freq", type=POSITIVE_INT, default=100, help="steps between mask refreshes")
    g.add_argument("--mask-refresh-frac", type=FRACTION, default=0.1,
                   help="fraction of initial steps during which the forward 2:4 mask is refreshed too")
    g.add_argument("--max-aspect-ratio", type=AT_LEAST_1, default=5.0, help="layers thinner than this stay dense")
    add_impl_arg(g, "SLoPe's 2:4 products x @ (W ⊙ M) and the double-pruned dy @ (W ⊙ M ⊙ M₂)ᵀ")
    g = p.add_argument_group("lost (low-rank from the init's top-r SVD + sparse input channels of the rest)")
    g.add_argument("--lost-channel-ratio", type=FRACTION_ABOVE_0, default=0.03,
                   help="ρ: the sparse part holds ⌈ρ·in⌉ input channels (0.03 = SLTrain's δ budget)")
    g = p.add_argument_group("switchlora (LoRA vectors switched from candidate pools; W frozen)")
    g.add_argument("--switch-interval", type=POSITIVE_INT, default=40,
                   help="interval₀: r / interval₀ vectors per side switch per step at the start (official 40)")
    g.add_argument("--switch-descent-ratio", type=FRACTION_ABOVE_0, default=0.1,
                   help="the switching rate falls to 0.3x its start at this fraction of the steps (official 0.1)")
    g.add_argument("--switch-freeze-steps", type=NONNEG_INT, default=5,
                   help="steps a switched vector's counterpart stays frozen, moments reset (official 5)")
    p.set_defaults(fn=with_config(cmd_pretrain, p))


def method_config(args) -> MethodConfig:
    return MethodConfig(method=args.method, rank=args.lora_rank, alpha=args.lora_alpha, delta=args.sparse_ratio,
                        targets=args.targets, adapter_rank=args.adapter_rank, max_aspect_ratio=args.max_aspect_ratio,
                        channel_ratio=args.lost_channel_ratio, sltrain_b_init=args.sltrain_b_init)


def slope_schedule(args):
    return SLoPeSchedule(args.steps, args.mask_change_freq, args.mask_refresh_frac, args.adapter_frac)


def switch_schedule(args):
    return SwitchSchedule(args.steps, args.switch_interval, args.switch_descent_ratio, args.switch_freeze_steps)


def load_tokenizer(path):
    """The tokenizer of DIR, or of a cached fixture by name (``smollm2``, ``plays-bpe-4096``)."""
    named = named_tokenizer_dir(path) if path and not Path(path).is_dir() else None
    p = (named or Path(path)) if path else fixture_paths().hf_dir
    if not p.is_dir():
        raise UserError(f"{p}: no such tokenizer dir" + ("" if path and not named else
                        " (run scripts/fixtures.py to build the cached tokenizers, or pass --tokenizer DIR)"))
    tok = hf_tokenizer(p)
    if tok is None:
        raise UserError(f"{p}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return tok


def model_config(args, tokenizer):
    """The random-init model's ModelConfig; the vocabulary is the tokenizer's."""
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


def cmd_pretrain(args: argparse.Namespace) -> dict:
    run_cfg, mc = train_config(args), mesh_config(args)
    init_distributed(mc)
    placement = placement_for(mc, run_cfg.batch_shape)  # a bad --mesh or batch fails before anything is written
    method = method_config(args)
    schedule = slope_schedule(args) if method.method == "slope" else None
    switching = switch_schedule(args) if method.method == "switchlora" else None
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be >= 1")
    if not args.text:
        raise UserError("--text FILE is required")
    tok = load_tokenizer(args.tokenizer)
    cfg = model_config(args, tok)
    blocks = Blocks.from_stream(token_stream(args.text, tok), args.seq_len, seed=args.seed)
    model = build_model(cfg, method, seed=args.seed, dtype=DTYPES[args.dtype] if args.dtype else jnp.float32)
    summary = param_summary(model, cfg, method)
    # a static attribute of the graphdef: set before the split
    impl = set_linear_impl(model, args.impl, mesh_devices=placement.mesh.size)
    graphdef, frozen, trainable, masks = partition_pretrain(model)
    run_dir, prev = prepare_run_dir(run_cfg.out, run_record(args, "pretrain"), resume=run_cfg.resume,
                                    overwrite=run_cfg.overwrite)  # after the checks above: bad input leaves no run dir
    if prev is None:
        if is_main_process():
            save_support(run_dir, frozen)
    else:
        frozen = restore_support(run_dir, frozen)

    job = TrainJob(graphdef, frozen, trainable, masks, blocks, make_pretrain_optimizer(run_cfg.optim(), trainable),
                   head_dim=cfg.head_dim)
    if schedule is not None:
        def on_start(state, frozen, start):  # adapters already on when the schedule starts them at step 0
            if start:
                return state
            return state._replace(masks=placement.put(initial_masks(graphdef, frozen, state.trainable, state.masks,
                                                                    schedule)))

        def callbacks(frozen, placement):
            slope_step = make_after_step(graphdef, frozen, schedule)

            def after_step(step, st):  # new masks go back to the mesh's shardings (one compile per run)
                st = slope_step(step, st)
                return st._replace(masks=placement.put(st.masks))
            return LoopCallbacks(after_step=after_step)
        job.on_start, job.callbacks = on_start, callbacks
    if switching is not None:
        job.callbacks = switchlora_callbacks(graphdef, switching, method.rank, args.seed)
    result = run_training(job, run_cfg, placement, run_dir, resume=prev is not None)
    dense = dense_model(result.model)
    if is_main_process():
        checkpoint.save_model(dense, run_dir / "model", tokenizer=tok, overwrite=True,
                              extra_meta={"pretrain_method": method.method})
    out = {"method": method.method, "impl": impl if method.method == "slope" else None,  # only SLoPe's products
           "run_dir": str(run_dir), "model_dir": str(run_dir / "model"), **summary,
           "opt_state_bytes": tree_bytes(result.state.opt_state), **last_metrics(run_dir)}
    if schedule is not None:
        out["adapter_start_step"] = schedule.adapter_start
    if switching is not None:
        out["switches_scheduled"] = switching.total(args.steps - 2, method.rank)  # per side, per layer (upper bound)
    if is_main_process():
        write_json_atomic(run_dir / "pretrain.json", out)
    if not args.json and is_main_process():
        print(f"pretrained {method.method}: {summary['trainable_params']:,} trainable parameters, "
              f"val ppl {out['val_ppl']}; dense model in {run_dir / 'model'}", file=sys.stderr)
    return out


def switchlora_callbacks(graphdef, schedule: SwitchSchedule, rank: int, seed: int):
    """``TrainJob.callbacks`` for SwitchLoRA: switch after each step, the new state back on the mesh."""
    def callbacks(frozen, placement):
        switch_step = switchlora_after_step(graphdef, frozen, schedule, rank, seed)

        def after_step(step, st):
            new = switch_step(step, st)
            if new is st:
                return st
            return new._replace(trainable=placement.put(new.trainable), masks=placement.put(new.masks),
                                opt_state=placement.put(new.opt_state))
        return LoopCallbacks(after_step=after_step)
    return callbacks
