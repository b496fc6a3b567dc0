"""What every command shares: flags, YAML recipes, and the translation of flags into typed configs.

Only the command layer reads argparse. ``train_config(args)`` and ``mesh_config(args)`` turn a
namespace into the library's typed configs (``runs.TrainConfig``, ``sharding.MeshConfig``);
``run_record(args, kind)`` is what run.json stores (``--resume`` compares it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


from ..errors import UserError
from ..partition import DEFAULT_LORA_TARGETS
from ..quantize import QUANTIZE_CHOICES
from ..runs import TrainConfig
from ..sharding import MeshConfig
from ..weights import IMPL_CHOICES
from .flags import (FRACTION, NONNEG_FLOAT, NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, SEQ_LEN, read_recipe,
                    recipe_value)

# options that may change on --resume without changing the trajectory (a checkpoint restores onto
# whatever mesh the resumed run has)
MESH_RESUME_FREE = {"mesh", "axis_rule", "shard_rule", "distributed", "coordinator", "num_processes", "process_id"}
RESUME_FREE = {"resume", "json", "overwrite", "progress", "config", "fn", "parser", "command", "quick", "argv", "remat",
               *MESH_RESUME_FREE}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight / compute dtype (default: as stored; GGUF: float32)")


def add_run_args(p: argparse.ArgumentParser, *, steps: int, lr: float = 2e-4, frozen_base: bool = False) -> None:
    """Arguments shared by every command that trains low-rank factors (finetune, prune, pretrain);
    ``frozen_base`` adds the flags of commands whose base weights stay frozen (finetune, prune)."""
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); flags given on the command line override it")
    p.add_argument("--text", help="training text: a .txt file or a directory of them")
    p.add_argument("--out", help="run directory")
    p.add_argument("--lora-rank", type=POSITIVE_INT, default=8)
    p.add_argument("--lora-alpha", type=POSITIVE_FLOAT, default=16.0)
    p.add_argument("--targets", default=DEFAULT_LORA_TARGETS,
                   help="regex over layer paths that get LoRA")
    p.add_argument("--steps", type=POSITIVE_INT, default=steps)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=4)
    p.add_argument("--grad-accum", type=POSITIVE_INT, default=1)
    p.add_argument("--seq-len", type=SEQ_LEN, default=256)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=lr)
    p.add_argument("--warmup-steps", type=NONNEG_INT, default=10)
    p.add_argument("--weight-decay", type=NONNEG_FLOAT, default=0.0)
    p.add_argument("--clip-norm", type=NONNEG_FLOAT, default=1.0)
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--save-every", type=POSITIVE_INT, default=50)
    p.add_argument("--keep", type=POSITIVE_INT, default=2, help="checkpoints kept")
    p.add_argument("--val-every", type=NONNEG_INT, default=50)
    p.add_argument("--val-blocks", type=POSITIVE_INT, default=8)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run dir")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="base weight dtype")
    if frozen_base:
        p.add_argument("--quantize-base", choices=QUANTIZE_CHOICES, default="none",
                       help="int8: store the frozen decoder linears as int8 with one fp32 scale per output "
                            "channel (absmax/127, as the official LoRAPrune's load_in_8bit); 0.41x of the fp32 "
                            "model's bytes on SmolLM2 (benchmarks/int8_base.json). Only for methods that never "
                            "differentiate the base")
        add_impl_arg(p)  # pretrain adds its own --impl (SLoPe's masked products)
        p.add_argument("--remat", action="store_true",
                       help="recompute each decoder layer in the backward pass: activation memory of one layer "
                            "instead of all (~1.3x the step's compute; same gradients)")
    add_mesh_args(p)


def add_distill_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--distill`` (``what`` says what it does in this command), ``--distill-alpha``, ``--distill-temp``."""
    p.add_argument("--distill", action="store_true", help=what)
    p.add_argument("--distill-alpha", type=FRACTION, default=0.5, help="--distill: weight a of the KL term")
    p.add_argument("--distill-temp", type=POSITIVE_FLOAT, default=1.0, help="--distill: temperature T")


def add_impl_arg(p: argparse.ArgumentParser, what: str = "element-masked linears ((W + s·A@B) ⊙ M: "
                 "--sparsity/--pattern models, --keep-sparsity)") -> None:
    """``--impl`` on ``p`` (a parser or one of its argument groups); ``what`` says which products it routes."""
    p.add_argument("--impl", choices=IMPL_CHOICES, default="auto",
                   help=f"{what}: the Pallas masked low-rank kernel or XLA; auto = the kernel on GPU/TPU, XLA on "
                        "CPU; pallas on CPU runs interpret mode (slow, for checks)")


def add_mesh_args(p) -> None:
    """--mesh, sharding rule overrides and multi-host flags (shared by finetune / prune / pretrain)."""
    g = p.add_argument_group("devices and hosts")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. 'data=2,fsdp=2,tensor=2' or 'fsdp=-1' (default: $JAXPRUNE_MESH, "
                        "else all devices on data)")
    g.add_argument("--axis-rule", action="append", default=None, metavar="LOGICAL=MESH",
                   help="map a logical axis to mesh axes, e.g. 'embed=none', 'batch=data+fsdp' (repeatable)")
    g.add_argument("--shard-rule", action="append", default=None, metavar="REGEX=AXES",
                   help="arrays whose path matches REGEX get AXES, e.g. 'lm_head=replicate', "
                        "'embed_tokens=tensor,fsdp' (repeatable; first match wins)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (auto-detects TPU pods, SLURM, Open MPI)")
    g.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
    g.add_argument("--num-processes", type=POSITIVE_INT, default=None, help="multi-host: number of processes")
    g.add_argument("--process-id", type=NONNEG_INT, default=None, help="multi-host: this process's index")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The flags every training command shares, as a ``runs.TrainConfig``."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"quiet"}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**values, quiet=bool(getattr(args, "json", False)))


def mesh_config(args: argparse.Namespace) -> MeshConfig:
    """--mesh, --axis-rule, --shard-rule and the multi-host flags as a ``sharding.MeshConfig``."""
    return MeshConfig(mesh=args.mesh, axis_rules=tuple(args.axis_rule or ()), shard_rules=tuple(args.shard_rule or ()),
                      distributed=args.distributed, coordinator=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)


def run_record(args: argparse.Namespace, kind: str) -> dict:
    """run.json's content: every argument that changes the trajectory, and the command."""
    record = {k: v for k, v in vars(args).items() if k not in RESUME_FREE}
    record["kind"] = kind
    return record


def apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser, argv_flags: set[str]) -> None:
    """Fill args from --config YAML where the flag was not given on the command line."""
    if not getattr(args, "config", None):
        return
    path = Path(args.config)
    recipe = read_recipe(path)
    options = {a.dest: a for a in parser._actions if a.option_strings}
    for key, value in recipe.items():
        dest = str(key).replace("-", "_")
        action = options.get(dest)
        if action is None or dest in ("help", "config"):
            raise UserError(f"{path}: unknown key {key!r}")
        try:
            value = recipe_value(action, value)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{path}: {key}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        if dest not in argv_flags:
            setattr(args, dest, value)


def cli_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options explicitly present on the command line."""
    dests = set()
    for action in parser._actions:
        if any(a == s or a.startswith(s + "=") for a in argv for s in action.option_strings):
            dests.add(action.dest)
    return dests


def with_config(fn, parser):
    """``fn(args)`` after filling args from ``--config`` where the flag was not given explicitly."""
    def run(args):
        apply_config_file(args, parser, cli_dests(parser, getattr(args, "argv", sys.argv[1:])))
        return fn(args)
    return run
