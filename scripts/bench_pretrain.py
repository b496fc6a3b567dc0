"""Pretraining a tiny LLaMA from random init: full rank vs low rank vs SLTrain vs SLoPe vs LOST vs SwitchLoRA vs S-STE.

Same model (configs/pretrain_tiny.yaml), same tokens (the training plays, same seeded batches), same
steps for every method:

1. `jaxprune pretrain --config configs/pretrain_tiny.yaml --method M --steps N` (in-process, the CLI
   code): validation perplexity every `val-every` steps (the held-out tail of the training stream);
2. held-out perplexity of RUN_DIR/model (dense) on Hamlet, Macbeth and The Tempest (README protocol,
   seq-len 128, the first `--eval-tokens` tokens);
3. in one process, per method: trainable parameters, optimizer-state bytes, compiled train-step memory
   (`jax.jit(step).lower(...).compile().memory_analysis()`), and seconds per step, the methods timed
   round-robin (so a shared machine's load hits all alike) and reported as a ratio to full rank.
   (The timed step is the jitted train step; SwitchLoRA's switch and SLoPe's mask refresh run between
   steps and are not in it.)

    python scripts/bench_pretrain.py                     # 7 methods, the recipe's steps
    python scripts/bench_pretrain.py --steps 40 --methods full,sltrain --out /tmp/p.json
Writes benchmarks/pretrain.json (atomically, after every method) and benchmarks/pretrain.png.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402

METHODS = ("full", "lowrank", "sltrain", "slope", "lost", "switchlora", "sste")


def pretrain_args(argv: list[str]):
    """`jaxprune pretrain` arguments exactly as the CLI reads them (recipe applied, flags win)."""
    from jaxprune.commands.pretrain import add_pretrain_parser
    from jaxprune.commands.common import apply_config_file, cli_dests

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_pretrain_parser(sub)
    args = parser.parse_args(argv)
    apply_config_file(args, sub.choices["pretrain"], cli_dests(sub.choices["pretrain"], argv[1:]))
    return args


def train(argv: list[str]) -> dict:
    from jaxprune.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"pretrain failed ({code}): {' '.join(argv)}")
    return json.loads(out.getvalue().splitlines()[-1])


def step_setup(args):
    """(jitted step, its arguments) for one method at the run's shapes, with real random weights."""
    import jax.numpy as jnp
    import numpy as np

    from jaxprune.commands.pretrain import load_tokenizer, method_config, model_config
    from jaxprune.pretrain.methods import build_model, make_pretrain_optimizer, partition_pretrain
    from jaxprune.train import make_train_step
    from jaxprune.commands.common import train_config

    cfg = model_config(args, load_tokenizer(args.tokenizer))
    graphdef, frozen, trainable, masks = partition_pretrain(build_model(cfg, method_config(args), seed=args.seed))
    optimizer = make_pretrain_optimizer(train_config(args).optim(), trainable)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.batch_size, args.seq_len)),
                        jnp.int32)
    return make_train_step(graphdef, optimizer), [trainable, optimizer.init(trainable), (), frozen, masks, batch]


def compiled_memory(step, state) -> dict:
    import jax.numpy as jnp

    ma = step.lower(*state, jnp.int32(0)).compile().memory_analysis()
    out = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["total"] = out["argument"] + out["output"] + out["temp"]
    return out


def time_steps(setups: dict, rounds: int) -> dict:
    """Median seconds per step, the methods interleaved round-robin (one warm-up step each first)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    times = {m: [] for m in setups}
    for r in range(rounds + 1):
        for m, (step, state) in setups.items():
            t = time.perf_counter()
            tr, opt, hook, metrics = step(*state[:3], *state[3:], jnp.int32(r))
            jax.block_until_ready(metrics)
            if r:
                times[m].append(time.perf_counter() - t)
            state[:3] = [tr, opt, hook]
    return {m: float(np.median(v)) for m, v in times.items()}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results:
        steps, ppl = zip(*r["val_curve"])
        ax.plot(steps, ppl, "o-", ms=3, label=f"{r['method']} ({r['trainable_params'] / 1e6:.2f}M trainable)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "pretrain_tiny.yaml"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--text", default=None, help="default: the training plays fixture")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--time-rounds", type=int, default=8)
    ap.add_argument("--runs-dir", default=None, help="keep the run dirs here (default: a temp dir)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "pretrain.json"))
    a = ap.parse_args()

    from jaxprune import load
    from jaxprune.evaluate import perplexity, tokenize_text
    from jaxprune.fixtures import fixture_paths

    paths = fixture_paths()
    text = a.text or str(paths.train_text)
    methods = [m for m in a.methods.split(",") if m]
    runs = Path(a.runs_dir or tempfile.mkdtemp(prefix="bench-pretrain-"))
    runs.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    extra = ["--steps", str(a.steps)] if a.steps else []
    base = ["pretrain", "--config", a.config, "--text", text, *extra]
    args0 = pretrain_args([*base, "--method", "full", "--out", "x"])
    command = "python scripts/bench_pretrain.py" + "".join(f" {x}" for x in sys.argv[1:])
    result = {"benchmark": "pretrain", "command": command,
              "model": {k: getattr(args0, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                                       "num_kv_heads", "tie_word_embeddings")},
              "budget": {"steps": args0.steps, "batch_size": args0.batch_size, "seq_len": args0.seq_len,
                         "tokens": args0.steps * args0.batch_size * args0.grad_accum * args0.seq_len,
                         "lr": args0.lr, "warmup_steps": args0.warmup_steps},
              "methods": {"lowrank_sltrain_rank": args0.lora_rank, "lora_alpha": args0.lora_alpha,
                          "sltrain_delta": args0.sparse_ratio, "slope_adapter_rank": args0.adapter_rank,
                          "slope_adapter_frac": args0.adapter_frac, "slope_mask_change_freq": args0.mask_change_freq,
                          "slope_mask_refresh_frac": args0.mask_refresh_frac,
                          "lost_channel_ratio": args0.lost_channel_ratio, "switch_interval": args0.switch_interval,
                          "switch_descent_ratio": args0.switch_descent_ratio,
                          "switch_freeze_steps": args0.switch_freeze_steps},
              "eval": {"text": "held-out plays (Hamlet, Macbeth, The Tempest)", "seq_len": 128,
                       "max_tokens": a.eval_tokens},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": []}
    tok = load.load_tokenizer(paths.hf_dir)
    heldout = tokenize_text(tok, paths.heldout_text.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)

    for m in methods:
        run_dir = runs / m
        t0 = time.perf_counter()
        res = train([*base, "--method", m, "--out", str(run_dir), "--overwrite", "--no-progress", "--json",
                     "--save-every", str(args0.steps)])
        wall = time.perf_counter() - t0
        recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        ev = perplexity(load.load_model(run_dir), heldout, seq_len=128, batch_size=8, max_tokens=a.eval_tokens,
                        progress=False)
        row = {k: res[k] for k in ("method", "trainable_params", "params_stored", "linear_params_dense",
                                   "linear_params_stored", "opt_state_bytes", "final_loss", "val_ppl")}
        row.update(heldout_ppl=ev["ppl"], train_wall_s=wall,
                   val_curve=[[r["step"], r["val_ppl"]] for r in recs if "val_ppl" in r])
        result["results"].append(row)
        print(f"{m}: val ppl {row['val_ppl']:.2f}, held-out ppl {ev['ppl']:.2f}, "
              f"{row['trainable_params']:,} trainable, {wall:.0f}s", flush=True)
        write_json_atomic(out, result)
        plot(result["results"], out.with_suffix(".png"))

    setups = {m: step_setup(pretrain_args([*base, "--method", m, "--out", "x"])) for m in methods}
    for row in result["results"]:
        row["step_memory"] = compiled_memory(*setups[row["method"]])
    times = time_steps(setups, a.time_rounds)
    for row in result["results"]:
        row["step_time_s"] = times[row["method"]]
        row["step_time_vs_full"] = times[row["method"]] / times["full"] if "full" in times else None
    write_json_atomic(out, result)
    for row in result["results"]:
        print(f"{row['method']}: step {row['step_time_s']:.3f}s ({row['step_time_vs_full'] or 0:.2f}x full), "
              f"compiled step {row['step_memory']['total'] / 2**20:.1f} MiB, "
              f"optimizer state {row['opt_state_bytes'] / 2**20:.1f} MiB", flush=True)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
