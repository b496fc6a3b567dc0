"""`jaxprune pretrain`: a tiny LLaMA from random init, full-rank / low-rank / SLTrain / SLoPe / LOST /
SwitchLoRA / S-STE. Flags -> ``pretrain.pipeline.PretrainConfig`` -> ``run_pretrain`` (which documents RUN_DIR).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..fixtures import PLAYS_TOKENIZER
from ..pretrain.methods import MethodConfig
from ..pretrain.pipeline import PretrainConfig, TinyModelConfig, load_tokenizer, run_pretrain
from ..pretrain import slope, sltrain
from ..pretrain.registry import PRETRAIN
from ..pretrain.slope import SLoPeOptions
from ..pretrain.switchlora import SwitchOptions
from ..sharding import is_main_process
from .common import add_impl_arg, add_run_args, mesh_config, run_record, train_config, with_config
from .flags import AT_LEAST_1, FRACTION, NONNEG_INT, OPEN_FRACTION, POSITIVE_INT, float_range

__all__ = ["add_pretrain_parser", "cmd_pretrain", "load_tokenizer", "method_config", "model_config", "pretrain_config"]

FRACTION_ABOVE_0 = float_range(0.0, 1.0, lo_open=True)  # (0, 1]


def add_pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help=f"pretrain a tiny LLaMA from random init: {', '.join(PRETRAIN.names())}")
    add_run_args(p, steps=200, lr=3e-3)
    # add_run_args' LoRA flags name the low-rank factors here: --lora-rank r, --lora-alpha α (s = α / r),
    # --targets the decoder linears that get the method. Defaults: configs/pretrain_tiny.yaml's model.
    # --lora-rank is also LOST's and SwitchLoRA's rank; --lora-alpha is lowrank / sltrain only (LOST's
    # SVD factors have no scale, SwitchLoRA's is the official 1 / r).
    p.set_defaults(lora_rank=32, lora_alpha=8.0, seq_len=128, batch_size=4)
    p.add_argument("--method", choices=PRETRAIN.names(), default=sltrain.NAME,
                   help="; ".join(f"{m.name}: {m.summary}" for m in PRETRAIN))
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
    g = p.add_argument_group(sltrain.NAME)
    g.add_argument("--sparse-ratio", type=OPEN_FRACTION, default=0.03, help="δ: the support holds ⌊δ·in·out⌋ entries")
    g.add_argument("--sltrain-b-init", choices=("zero", "uniform"), default="zero",
                   help="the up factor B at init: zero (the official code: W starts as S alone) or U(±1/√r) "
                   "(as the low-rank baseline)")
    g = p.add_argument_group(slope.NAME)
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


def model_shape(args) -> TinyModelConfig:
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    return TinyModelConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                           num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                           head_dim=args.head_dim, tie_word_embeddings=bool(args.tie_word_embeddings))


def model_config(args, tokenizer):
    """The random-init model's ModelConfig; the vocabulary is the tokenizer's."""
    return model_shape(args).model_config(tokenizer, args.seq_len)


def pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    cfg = PretrainConfig(
        run=train_config(args), method=method_config(args), model=model_shape(args), mesh=mesh_config(args),
        slope=SLoPeOptions(args.mask_change_freq, args.mask_refresh_frac, args.adapter_frac),
        switch=SwitchOptions(args.switch_interval, args.switch_descent_ratio, args.switch_freeze_steps),
        tokenizer=args.tokenizer, record=run_record(args, "pretrain"))
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be >= 1")
    if not args.text:
        raise UserError("--text FILE is required")
    return cfg


def cmd_pretrain(args: argparse.Namespace) -> dict:
    out = run_pretrain(pretrain_config(args))
    if not args.json and is_main_process():
        print(f"pretrained {out['method']}: {out['trainable_params']:,} trainable parameters, "
              f"val ppl {out['val_ppl']}; dense model in {out['model_dir']}", file=sys.stderr)
    return out
