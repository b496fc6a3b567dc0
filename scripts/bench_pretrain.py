"""Pretraining a tiny LLaMA from random init: full rank vs low rank vs SLTrain vs SLoPe vs LOST vs SwitchLoRA vs S-STE.

Same model (configs/pretrain_1m.yaml), same tokens (the training plays, same seeded batches), same
steps for every method:

1. `jaxprune pretrain --config configs/pretrain_1m.yaml --method M [flags of the spec]` (in-process, the CLI
   code): validation perplexity every `val-every` steps (the held-out tail of the training stream);
2. held-out perplexity of RUN_DIR/model (dense) on Hamlet, Macbeth and The Tempest (README protocol,
   seq-len 128, the first `--eval-tokens` tokens);
3. in one process, per spec: trainable parameters, optimizer-state bytes, compiled train-step memory
   (`jax.jit(step).lower(...).compile().memory_analysis()`), and seconds per step, the methods timed
   round-robin (so a shared machine's load hits all alike) and reported as a ratio to full rank.
   (The timed step is the jitted train step; SwitchLoRA's switch and SLoPe's mask refresh run between
   steps and are not in it.)

    python scripts/bench_pretrain.py --seeds 0,1               # 7 methods, configs/pretrain_1m.yaml
    python scripts/bench_pretrain.py --steps 40 --methods full,sltrain --out /tmp/p.json
    python scripts/bench_pretrain.py --resume --methods sltrain:lora-alpha=32,sltrain:sltrain-b-init=uniform \
        --time-rounds 0                                         # a sweep: METHOD:flag=value... beside them
Writes benchmarks/pretrain.json (atomically, after every run; `--resume` keeps the finished runs) and
benchmarks/pretrain.png (validation curves, the mean over seeds).
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
from jaxprune.pretrain.methods import PRETRAIN  # noqa: E402  (importing methods registers every built-in)

METHODS = PRETRAIN.names()


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

    from jaxprune.load import DTYPES
    from jaxprune.weights import set_linear_impl

    cfg = model_config(args, load_tokenizer(args.tokenizer))
    model = build_model(cfg, method_config(args), seed=args.seed,
                        dtype=DTYPES[args.dtype] if args.dtype else jnp.float32)
    set_linear_impl(model, args.impl)  # as `jaxprune pretrain` does
    graphdef, frozen, trainable, masks = partition_pretrain(model)
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

    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for spec in dict.fromkeys(r["spec"] for r in results):  # the mean curve over a spec's seeds
        rows = [r for r in results if r["spec"] == spec]
        steps = [s for s, _ in rows[0]["val_curve"]]
        ppl = np.mean([[p for _, p in r["val_curve"]] for r in rows], axis=0)
        ax.plot(steps, ppl, "o-", ms=3, label=f"{spec} ({rows[0]['trainable_params'] / 1e6:.2f}M trainable, "
                f"{len(rows)} seed{'s' if len(rows) > 1 else ''})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """``METHOD[:flag=value...]`` -> (method, extra CLI flags); e.g. ``sltrain:lr=1e-2:lora-alpha=32``."""
    method, *overrides = spec.split(":")
    if method not in METHODS:
        raise SystemExit(f"error: {spec!r}: unknown method {method!r} (expected one of {', '.join(METHODS)})")
    flags = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq or not key:
            raise SystemExit(f"error: {spec!r}: {o!r} is not flag=value")
        flags += [f"--{key}", value]
    return method, flags


TIMING = ("step_memory", "step_time_s", "step_time_vs_full")  # per spec, from the timing pass


def summarize(results: list[dict], timed: dict | None = None) -> list[dict]:
    """Per spec: val / held-out perplexity mean ± std (ddof 1) over its seeds (and the timing fields an
    earlier invocation measured, ``timed[spec]``)."""
    import numpy as np

    out = []
    for spec in dict.fromkeys(r["spec"] for r in results):
        rows = sorted((r for r in results if r["spec"] == spec), key=lambda r: r["seed"])
        val, held = [r["val_ppl"] for r in rows], [r["heldout_ppl"] for r in rows]
        std = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else None)
        out.append({"spec": spec, "method": rows[0]["method"], "seeds": [r["seed"] for r in rows],
                    "trainable_params": rows[0]["trainable_params"],
                    "val_ppl_mean": float(np.mean(val)), "val_ppl_std": std(val),
                    "heldout_ppl_mean": float(np.mean(held)), "heldout_ppl_std": std(held),
                    **(timed or {}).get(spec, {})})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "pretrain_1m.yaml"))
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="METHOD[:flag=value...], comma-separated (e.g. sltrain:lr=1e-2:lora-alpha=32)")
    ap.add_argument("--seeds", default="0", help="model init, SLTrain support and batch order; comma-separated")
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--text", default=None, help="default: the training plays fixture")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--time-rounds", type=int, default=8, help="0: no step timing / compiled memory")
    ap.add_argument("--runs-dir", default=None, help="keep the run dirs here (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "pretrain.json"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out (same recipe and budget)")
    a = ap.parse_args()

    from jaxprune import load
    from jaxprune.evaluate import perplexity, tokenize_text
    from jaxprune.fixtures import fixture_paths

    paths = fixture_paths()
    text = a.text or str(paths.train_text)
    specs = [m for m in a.methods.split(",") if m]
    parsed = {spec: parse_spec(spec) for spec in specs}
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    tmp = None if a.runs_dir else tempfile.TemporaryDirectory(prefix="bench-pretrain-")
    runs = Path(a.runs_dir or tmp.name)
    runs.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    extra = ["--steps", str(a.steps)] if a.steps else []
    base = ["pretrain", "--config", a.config, "--text", text, *extra]
    args0 = pretrain_args([*base, "--method", "full", "--out", "x"])
    command = "python scripts/bench_pretrain.py" + "".join(f" {x}" for x in sys.argv[1:])
    result = {"benchmark": "pretrain", "command": command, "config": Path(a.config).name,
              "model": {k: getattr(args0, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                                       "num_kv_heads", "tie_word_embeddings", "tokenizer")},
              "budget": {"steps": args0.steps, "batch_size": args0.batch_size, "seq_len": args0.seq_len,
                         "tokens": args0.steps * args0.batch_size * args0.grad_accum * args0.seq_len,
                         "lr": args0.lr, "warmup_steps": args0.warmup_steps, "clip_norm": args0.clip_norm},
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
    if a.resume and out.exists():
        old = json.loads(out.read_text())
        if (old.get("budget"), old.get("model"), old.get("config")) != (result["budget"], result["model"],
                                                                          result["config"]):
            raise SystemExit(f"error: --resume: {out} has another recipe or budget; use another --out")
        result["results"] = old.get("results", [])
        result["command"] = f"{old.get('command')} ; {command}"
        timed = {s["spec"]: {k: s[k] for k in TIMING if k in s} for s in old.get("summary", [])}
    else:
        timed = {}
    done = {(r["spec"], r["seed"]) for r in result["results"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    heldout_text = paths.heldout_text.read_text()

    for spec in specs:
        method, flags = parsed[spec]
        for seed in seeds:
            if (spec, seed) in done:
                continue
            run_dir = runs / f"{spec.replace(':', '_').replace('=', '')}-s{seed}"
            t0 = time.perf_counter()
            res = train([*base, "--method", method, *flags, "--seed", str(seed), "--out", str(run_dir),
                         "--overwrite", "--no-progress", "--json", "--save-every", str(args0.steps)])
            wall = time.perf_counter() - t0
            recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
            heldout = tokenize_text(load.load_tokenizer(run_dir / "model"), heldout_text)
            ev = perplexity(load.load_model(run_dir), heldout, seq_len=128, batch_size=8, max_tokens=a.eval_tokens,
                            progress=False)
            row = {k: res[k] for k in ("method", "trainable_params", "params_stored", "linear_params_dense",
                                       "linear_params_stored", "opt_state_bytes", "final_loss", "val_ppl")}
            row.update(spec=spec, seed=seed, heldout_ppl=ev["ppl"], train_wall_s=wall,
                       val_curve=[[r["step"], r["val_ppl"]] for r in recs if "val_ppl" in r])
            result["results"].append(row)
            result["summary"] = summarize(result["results"], timed)
            print(f"{spec} seed {seed}: val ppl {row['val_ppl']:.2f}, held-out ppl {ev['ppl']:.2f}, "
                  f"{row['trainable_params']:,} trainable, {wall:.0f}s", flush=True)
            write_json_atomic(out, result)
            plot(result["results"], out.with_suffix(".png"))
    result["summary"] = summarize(result["results"], timed)

    if a.time_rounds > 0:
        setups = {spec: step_setup(pretrain_args([*base, "--method", parsed[spec][0], *parsed[spec][1],
                                                  "--out", "x"])) for spec in specs}
        times = time_steps(setups, a.time_rounds)
        ref = next((s for s in specs if parsed[s][0] == "full"), None)
        for row in result["summary"]:
            if row["spec"] in setups:
                row["step_memory"] = compiled_memory(*setups[row["spec"]])
                row["step_time_s"] = times[row["spec"]]
                row["step_time_vs_full"] = times[row["spec"]] / times[ref] if ref else None
                opt = next(r["opt_state_bytes"] for r in result["results"] if r["spec"] == row["spec"])
                print(f"{row['spec']}: step {row['step_time_s']:.3f}s ({row['step_time_vs_full'] or 0:.2f}x full), "
                      f"compiled step {row['step_memory']['total'] / 2**20:.1f} MiB, "
                      f"optimizer state {opt / 2**20:.1f} MiB", flush=True)
    write_json_atomic(out, result)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
