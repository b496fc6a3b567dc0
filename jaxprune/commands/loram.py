"""`jaxprune loram`: flags -> ``prune.loram_recipe.LoRAMConfig`` -> ``run_loram`` (the stages and the run dir's
layout are described there)."""

from __future__ import annotations

import argparse
import sys
import dataclasses

from ..adapters import ADAPTERS
from ..prune.groups import ATTN_UNITS
from ..prune.loram_recipe import LoRAMConfig, run_loram
from ..prune.registry import STRUCTURED
from .common import add_run_args, mesh_config, run_record, train_config, with_config
from .flags import FRACTION_BELOW_1, NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, SEQ_LEN

def add_loram_parser(sub) -> None:
    p = sub.add_parser("loram", help="LoRAM: LoRA trained on a pruned model, recovered into the full model")
    p.add_argument("model")
    add_run_args(p, steps=200, frozen_base=True)
    g = p.add_argument_group("pruning (which units the small model keeps)")
    g.add_argument("--prune-method", choices=STRUCTURED.names(), default=LoRAMConfig.prune_method,
                   help="structured pruning criterion (the paper's LoRAM-Stru uses LLM-Pruner)")
    g.add_argument("--ratio", type=FRACTION_BELOW_1, default=0.5, help="per-layer fraction of units pruned")
    g.add_argument("--attn-unit", choices=ATTN_UNITS, default="auto",
                   help="kv_group (a KV head with its query heads), q_head, or auto: kv_group unless a layer has a "
                        "single KV head (MQA), then q_head")
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
    p.add_argument("--adapter", choices=ADAPTERS.names(), default="lora",
                   help="what trains on the pruned model and is recovered into the full one (as `finetune "
                        "--adapter`; --lora-rank / --lora-alpha / --targets set it): "
                        + ", ".join(ADAPTERS.names()) + ". Each is recovered exactly: its update on the kept units, "
                        "W0 on the pruned ones (prune/loram.py); every adapter but lora is saved merged")
    p.add_argument("--merge", action="store_true", help="fold the recovered LoRA into W0 in RUN_DIR/model")
    p.set_defaults(fn=with_config(cmd_loram, p))


def cmd_loram(args: argparse.Namespace) -> dict:
    fields = {f.name for f in dataclasses.fields(LoRAMConfig)}
    c = LoRAMConfig(**{k: v for k, v in vars(args).items() if k in fields})
    summary = run_loram(args.model, c, train_config(args), mesh_config(args), record=run_record(args, "loram"))
    if not args.json:
        print(f"loram {c.prune_method} ratio {c.ratio}: {c.adapter} trained on {summary['params_pruned']:,} of "
              f"{summary['params_full']:,} parameters; full model with the recovered {c.adapter} in "
              f"{summary['model_dir']}", file=sys.stderr)
    return {k: v for k, v in summary.items() if k not in ("kept_heads", "kept_channels")}
