"""`jaxprune finetune`: LoRA fine-tuning of a frozen base, with resume and merge.

    RUN_DIR/
      run.json        the arguments and the base model (resume checks them)
      checkpoints/    orbax CheckpointManager: trainable, optimizer state, masks, pruner state
      metrics.jsonl   one line per step; loss.png at the end
      model/          the result as a jaxprune checkpoint (LoRA merged with --merge)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from .errors import UserError

from .sharding import MESH_RESUME_FREE

# Arguments that may differ on --resume without changing the trajectory (a checkpoint restores
# onto whatever mesh the resumed run has).
RESUME_FREE = {"resume", "json", "overwrite", "progress", "config", "fn", "command", "quick", "argv",
               *MESH_RESUME_FREE}


def add_run_args(p: argparse.ArgumentParser, *, steps: int, lr: float = 2e-4, frozen_base: bool = False) -> None:
    """Arguments shared by every command that trains low-rank factors (finetune, prune, pretrain);
    ``frozen_base`` adds the flags of commands whose base weights stay frozen (finetune, prune)."""
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); flags given on the command line override it")
    p.add_argument("--text", help="training text: a .txt file or a directory of them")
    p.add_argument("--out", help="run directory")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj",
                   help="regex over layer paths that get LoRA")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--val-blocks", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run dir")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="base weight dtype")
    if frozen_base:
        from .quantize import QUANTIZE_CHOICES
        p.add_argument("--quantize-base", choices=QUANTIZE_CHOICES, default="none",
                       help="int8: store the frozen decoder linears as int8 with one fp32 scale per output "
                            "channel (absmax/127, as the official LoRAPrune's load_in_8bit); ~1/4 of the fp32 "
                            "base memory. Only for methods that never differentiate the base")
    from .sharding import add_mesh_args
    add_mesh_args(p)


def apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser, argv_flags: set[str]) -> None:
    """Fill args from --config YAML where the flag was not given on the command line."""
    if not getattr(args, "config", None):
        return
    path = Path(args.config)
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: a recipe is a mapping of option: value")
    options = {a.dest: a for a in parser._actions if a.option_strings}
    for key, value in recipe.items():
        dest = str(key).replace("-", "_")
        action = options.get(dest)
        if action is None or dest in ("help", "config"):
            raise UserError(f"{path}: unknown key {key!r}")
        # YAML reads `2e-4` as a string (YAML 1.1 floats need a dot): convert like the command line does
        if action.type is not None and value is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise UserError(f"{path}: {key}: {value!r} is not a valid {action.type.__name__}") from None
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


def prepare_run_dir(args, kind: str) -> tuple[Path, dict | None]:
    """Create / validate RUN_DIR. Returns (run_dir, previous run.json on --resume).

    Every process runs the checks (reads only, so all fail alike); process 0 alone writes."""
    from .sharding import barrier, is_main_process
    from .train import save_json_atomic

    barrier("run_dir:enter")
    run_dir, prev, record = _check_run_dir(args, kind)
    barrier("run_dir:checked")
    if prev is None and is_main_process():
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir()
        save_json_atomic(run_dir / "run.json", record)
    barrier("run_dir:ready")
    return run_dir, prev


def _check_run_dir(args, kind: str) -> tuple[Path, dict | None, dict]:
    import json

    if not args.out:
        raise UserError("--out RUN_DIR is required")
    run_dir = Path(args.out)
    record = {k: v for k, v in vars(args).items() if k not in RESUME_FREE}
    record["kind"] = kind
    if args.resume:
        run_file = run_dir / "run.json"
        if not run_file.exists():
            raise UserError(f"{run_dir}: nothing to resume (no run.json)")
        prev = json.loads(run_file.read_text())
        diff = {k: (prev.get(k), v) for k, v in record.items() if prev.get(k) != v}
        if diff:
            k, (old, new) = next(iter(diff.items()))
            raise UserError(f"--resume with a different {k!r} ({old!r} -> {new!r}); runs must match to resume")
        return run_dir, prev, record
    if run_dir.exists() and not args.overwrite:
        raise UserError(f"{run_dir}: run dir already exists (pass --resume to continue or --overwrite)")
    if not run_dir.parent.exists():
        raise UserError(f"{run_dir.parent}: parent directory does not exist")
    return run_dir, None, record


@dataclass
class RunSetup:
    """What every LoRA-training command builds before its loop."""
    model: object
    tokenizer: object
    graphdef: object
    frozen: object
    trainable: object
    masks: object
    blocks: object
    lora_paths: list


def setup_lora_run(args, model=None) -> RunSetup:
    from . import load
    from .data import Blocks, token_stream
    from .partition import add_lora, partition

    if not args.text:
        raise UserError("--text FILE is required")
    model = model if model is not None else load.load_model(args.model, args.dtype)
    if getattr(args, "quantize_base", "none") == "int8":
        from .quantize import quantize_base
        quantize_base(model)
    tok = load.load_tokenizer(args.model)
    paths = add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=args.targets, seed=args.seed)
    graphdef, frozen, trainable, masks = partition(model)
    blocks = Blocks.from_stream(token_stream(args.text, tok), args.seq_len, seed=args.seed)
    return RunSetup(model, tok, graphdef, frozen, trainable, masks, blocks, paths)


def placed_state(args, s: RunSetup, placement, optimizer, run_dir: Path, prev, *, frozen=None, masks=None,
                 hook_state=()):
    """-> (frozen, TrainState, start step): everything on ``placement``'s mesh, restored from the latest
    checkpoint on --resume (onto this run's mesh, whichever mesh saved it)."""
    from .train import place_train_state, restore_latest

    placement.head_dim = s.model.config.head_dim
    frozen = placement.put(s.frozen) if frozen is None else frozen
    state = place_train_state(placement, optimizer, s.trainable, s.masks if masks is None else masks, hook_state)
    state, start = restore_latest(run_dir, state) if prev is not None else (state, 0)
    report_fallbacks(args, placement)
    return frozen, state, start


def report_fallbacks(args, placement) -> None:
    """The one stderr line about arrays replicated along an axis they do not divide by (not with --json)."""
    if (line := placement.report()) is not None and not getattr(args, "json", False):
        from .sharding import log
        log(line)


def final_model(graphdef, frozen, state):
    """The trained model with every array gathered to this host (all processes take part); an int8
    base comes back dequantised (float, as every saved model is)."""
    from .partition import combine
    from .quantize import dequantize_base
    from .sharding import to_host

    frozen, trainable, masks = to_host((frozen, state.trainable, state.masks))
    as_jax = lambda t: jax.tree.map(jnp.asarray, t)  # noqa: E731
    model = combine(graphdef, as_jax(frozen), as_jax(trainable), as_jax(masks))
    dequantize_base(model)
    return model


def optim_config(args):
    from .train import OptimConfig
    return OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps, total_steps=args.steps,
                       weight_decay=args.weight_decay, clip_norm=args.clip_norm)


def loop_config(args):
    from .train import LoopConfig
    return LoopConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      save_every=args.save_every, keep=args.keep, val_every=args.val_every,
                      val_blocks=args.val_blocks, progress=args.progress)


def compute_dtype(args):
    return jnp.bfloat16 if args.compute_dtype == "bfloat16" else None


def cmd_finetune(args) -> dict:
    from . import checkpoint
    from .partition import tree_size
    from .sharding import init_distributed, is_main_process, placement_from_args
    from .train import make_eval_step, make_optimizer, make_train_step, plot_metrics, state_shardings_of, train_loop

    init_distributed(args)
    placement = placement_from_args(args, None)  # a bad --mesh fails before anything is written
    run_dir, prev = prepare_run_dir(args, "finetune")
    model = None
    if getattr(args, "keep_sparsity", False):  # element masks: kept from a checkpoint, else W != 0
        from . import load
        from .prune.posttraining import attach_sparsity_masks
        model = load.load_model(args.model, args.dtype)
        attach_sparsity_masks(model)
    s = setup_lora_run(args, model)
    optimizer = make_optimizer(optim_config(args))
    frozen, state, start = placed_state(args, s, placement, optimizer, run_dir, prev)
    step_fn = make_train_step(s.graphdef, optimizer, compute_dtype=compute_dtype(args),
                              state_shardings=state_shardings_of(state))
    eval_fn = make_eval_step(s.graphdef, compute_dtype(args))
    state = train_loop(state, frozen, step_fn, eval_fn, s.blocks, run_dir, loop_config(args), start_step=start,
                       placement=placement)
    model = final_model(s.graphdef, frozen, state)
    if args.merge:
        model = merge_lora(model)
    if is_main_process():
        plot_metrics(run_dir)
        checkpoint.save_model(model, run_dir / "model", tokenizer=s.tokenizer, overwrite=True)
    metrics = _last_metrics(run_dir)
    return {"run_dir": str(run_dir), "trainable_params": tree_size(state.trainable), **metrics}


def merge_lora(model):
    """A new model with s·A@B folded into W and weight masks applied (masks kept as Variables)."""
    from .weights import merged_arrays, model_from_arrays, weight_mask_paths

    arrays = merged_arrays(model)
    return model_from_arrays(model.config, arrays, dtype=model.dtype, weight_masks=weight_mask_paths(model))


def _last_metrics(run_dir: Path) -> dict:
    import json
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    vals = [json.loads(l)["val_ppl"] for l in lines if "val_ppl" in l]
    return {"final_loss": last.get("loss"), "val_ppl": vals[-1] if vals else None}


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="LoRA fine-tuning on a frozen base")
    p.add_argument("model")
    add_run_args(p, steps=200, frozen_base=True)
    p.add_argument("--merge", action="store_true", help="fold LoRA into the base weights in RUN_DIR/model")
    p.add_argument("--keep-sparsity", action="store_true",
                   help="train through (W + s·A@B) ⊙ M: masks from the checkpoint, else M = (W != 0)")
    p.set_defaults(fn=_with_config(cmd_finetune, p))


def _with_config(fn, parser):
    def run(args):
        apply_config_file(args, parser, cli_dests(parser, getattr(args, "argv", sys.argv[1:])))
        return fn(args)
    return run
