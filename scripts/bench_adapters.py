"""Adapters vs LoRA (`finetune --adapter NAME`) at equal trainable parameters: held-out perplexity after the same
tokens over seeds, step time and compiled step memory as ratios to LoRA measured in the same run.

Protocol. LoRA at ``--lora-rank`` r on the default targets (q, k, v, o, gate, up, down of every layer) sets the
budget: its trainable pytree's size. Every other adapter gets the ``--lora-rank`` (its only size flag) whose
trainable count is closest to that budget, counted on the built model's trainable pytree (``partition.tree_size``
after ``add_lora`` + ``attach_adapter``, shapes only). SparseAdapter stores A and B dense (pruned entries stay 0), so
its pytree holds 1/d times its live entries: it is matched on live entries (the paper's "Large-Sparse" budget, at
rank r that is rank 2r at half density) and both counts are recorded. ``--size NAME=RANK`` overrides the choice.
Every adapter then trains ``--steps`` steps of ``--batch-size`` x ``--seq-len`` tokens of the training plays at
each seed (seed: LoRA / adapter init, data order; the same batches for every adapter at one seed), with the CLI's
defaults otherwise (AdamW, warm-up, cosine decay, clip 1, ``--lora-alpha`` 16 for every adapter: Bone ignores it),
and is evaluated on the first ``--eval-tokens`` tokens of the held-out plays (``evaluate.perplexity``, seq 256)
after merging (what ``finetune`` saves for a non-LoRA adapter).

The run mirrors ``commands/finetune.py`` step for step in-process (``add_lora`` at the seed, ``attach_adapter``,
``partition``, ``make_optimizer(TrainConfig.optim())``, ``make_train_step``, ``Blocks.batch(step)``), so that one
compiled step serves an adapter's memory analysis and all its seeds: on a loaded 2-core machine a `finetune`
process per run spends minutes loading, tracing and compiling. ``--check-cli`` runs the real `jaxprune finetune`
for LoRA at the first seed for 3 steps and checks that its losses equal this script's.

Step time: after training, ``--time-rounds`` rounds of every adapter's compiled step in turn (one untimed round
first, ``block_until_ready``), so that a change of the machine's load hits every adapter alike; the median divided
by LoRA's. The training runs' own step times (each step after the first, pooled over seeds) are kept too. Memory: ``jax.jit(step).lower(...).compile().memory_analysis()`` of the donated step at the
training batch; temp + argument bytes, divided by LoRA's.

    python scripts/bench_adapters.py                                      # SmolLM2-135M, every adapter, 3 seeds
    python scripts/bench_adapters.py --steps 2 --eval-tokens 256 --seeds 0 --out /tmp/a.json   # smoke run
    python scripts/bench_adapters.py --model gemma3 --out benchmarks/adapters_gemma3.json
Writes benchmarks/adapters.json after every run (atomically); ``--resume`` keeps the rows of an earlier run with
the same budget and runs the missing ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402

MODELS = {"smollm2": "SmolLM2-135M-Instruct (smollm2-hf, fp32)", "gemma3": "Gemma 3 270M (gemma3-hf, fp32)"}


def parse_sizes(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        name, eq, rank = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --size {item!r}: expected NAME=RANK")
        out[name] = int(rank)
    return out


def uniform_layers(base, targets: str) -> bool:
    """Whether every decoder layer's targeted linears have layer 0's shapes (then one layer's count x layers is the
    model's)."""
    import re

    from jaxprune.weights import linears, path_str

    shapes: dict[str, set] = {}
    for path, lin in linears(base):
        name = path_str(path)
        m = re.match(r"layers\.\d+\.(.*)$", name)
        if m and re.search(targets, name):
            shapes.setdefault(m.group(1), set()).add((lin.in_features, lin.out_features))
    return bool(shapes) and all(len(v) == 1 for v in shapes.values())


def counts(base, name: str, rank: int, alpha: float, targets: str, one_layer: bool = False) -> dict:
    """Trainable counts of adapter ``name`` at ``rank`` on ``base`` (not modified), from shapes only: the trainable
    pytree's size, and its live entries (SparseAdapter: the support of its fixed masks; others: the same).
    ``one_layer``: build on layer 0's targets only and multiply by the layer count (layers of equal shapes: fast)."""
    from flax import nnx

    from jaxprune.adapters import attach_adapter
    from jaxprune.partition import add_lora, partition, tree_size
    from jaxprune.weights import linears

    n_layers = len(base.layers) if one_layer else 1
    only = rf"^layers\.0\..*(?:{targets})" if one_layer else targets

    def build(m):
        add_lora(m, rank=rank, alpha=alpha, targets=only, seed=0)
        attach_adapter(m, name, seed=0)
        return m

    model = nnx.eval_shape(build, base)
    _, frozen, trainable, _ = partition(model)
    size = tree_size(trainable)
    live, pruned = size, 0
    for _, lin in linears(model):
        for attr in ("sparse_mask_a", "sparse_mask_b"):  # the kept count of sparse.random_support
            mask = getattr(lin, attr, None)
            if mask is not None:
                n = math.prod(mask.shape)
                pruned += n - min(n, max(1, round(lin.density * n)))
    return {"trainable_params": size * n_layers, "live_trainable_params": (size - pruned) * n_layers}


def match_rank(base, name: str, target: int, alpha: float, targets: str, key: str, lo: int, hi: int,
               one_layer: bool) -> tuple[int, dict]:
    """The rank in [lo, hi] whose ``counts[key]`` is closest to ``target`` (ties: the larger count). Counts grow with
    the rank for every adapter but RandLoRA (n·r + n·min with n = ⌈min/r⌉ shrinks): bisect on the monotone side
    and look at the neighbours."""
    cache: dict[int, dict] = {}

    def at(r):
        if r not in cache:
            cache[r] = counts(base, name, r, alpha, targets, one_layer)
        return cache[r][key]

    increasing = at(hi) >= at(lo)
    a, b = lo, hi
    while b - a > 1:  # the first rank past the target on the monotone direction
        mid = (a + b) // 2
        if (at(mid) < target) == increasing:
            a = mid
        else:
            b = mid
    near = [r for r in range(a - 2, b + 3) if lo <= r <= hi]
    best = min(near, key=lambda r: (abs(at(r) - target), -at(r)))
    return best, cache[best]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    ap.add_argument("--adapters", default=None, help="comma-separated (default: every registered adapter)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: max(1, steps // 10)")
    ap.add_argument("--lora-rank", type=int, default=8, help="LoRA's rank: the trainable-parameter budget")
    ap.add_argument("--lora-alpha", type=float, default=16.0, help="every adapter's --lora-alpha (CLI default)")
    ap.add_argument("--size", default="", help="NAME=RANK,...: an adapter's --lora-rank instead of the matched one")
    ap.add_argument("--max-rank", type=int, default=256, help="the largest rank the matching looks at")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--time-rounds", type=int, default=8,
                    help="after training: this many rounds of every adapter's step in turn, the step-time ratios' "
                         "source (0: the training runs' own step times, pooled over seeds)")
    ap.add_argument("--check-cli", action="store_true",
                    help="first run `jaxprune finetune` (LoRA, first seed, 3 steps) and check its losses equal ours")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=None, help="default: benchmarks/adapters.json (gemma3: adapters_gemma3.json)")
    ap.add_argument("--resume", action="store_true", help="keep --out's rows (same budget), run the missing ones")
    a = ap.parse_args(argv)
    t_start = time.time()
    out = Path(a.out or REPO / "benchmarks" / ("adapters.json" if a.model == "smollm2" else "adapters_gemma3.json"))
    seeds = [int(s) for s in a.seeds.split(",")]
    warmup = a.warmup_steps if a.warmup_steps is not None else max(1, a.steps // 10)

    import jax
    import jax.numpy as jnp

    from jaxprune import load
    from jaxprune.adapters import ADAPTERS, attach_adapter
    from jaxprune.data import training_blocks
    from jaxprune.evaluate import perplexity, tokenize_text
    from jaxprune.fixtures import fixture_paths
    from jaxprune.partition import DEFAULT_LORA_TARGETS, add_lora, combine, partition, tree_size
    from jaxprune.runs import TrainConfig
    from jaxprune.train import make_optimizer, make_train_step
    from jaxprune.weights import merge_lora, set_linear_impl

    names = a.adapters.split(",") if a.adapters else list(ADAPTERS.names())
    for n in names:
        ADAPTERS.get(n)  # an unknown name fails here, before any work
    if "lora" not in names:
        names = ["lora", *names]  # the reference of every ratio
    names = ["lora", *[n for n in names if n != "lora"]]
    sizes = parse_sizes(a.size)

    paths = fixture_paths()
    model_dir = paths.gemma3_hf_dir if a.model == "gemma3" else paths.hf_dir
    tok = load.load_tokenizer(str(model_dir))
    heldout = tokenize_text(tok, paths.heldout_text.read_text())
    base = load.load_model(str(model_dir))
    cfg = lambda seed, rank: TrainConfig(  # noqa: E731  (finetune's TrainConfig; the flags given here)
        text=str(paths.train_text), steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
        warmup_steps=warmup, lora_rank=rank, lora_alpha=a.lora_alpha, targets=DEFAULT_LORA_TARGETS, seed=seed,
        save_every=a.steps, val_every=0)

    def ppl(model) -> float:
        return perplexity(model, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens, progress=False)["ppl"]

    budget = {"steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
              "tokens": a.steps * a.batch_size * a.seq_len, "lr": a.lr, "warmup_steps": warmup,
              "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha, "targets": "default (q,k,v,o,gate,up,down)",
              "eval_tokens": a.eval_tokens, "eval_seq_len": 256, "seeds": seeds}
    result = {"benchmark": "adapters", "model": MODELS[a.model],
              "command": "python scripts/bench_adapters.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
                          "device": str(jax.devices()[0]), "loadavg_start": os.getloadavg()[0]},
              "budget": budget, "note": a.note,
              "protocol": "equal trainable parameters (LoRA rank r's trainable pytree; SparseAdapter: live entries); "
                          "same batches per seed; held-out ppl after merging; step time = median of --time-rounds "
                          "interleaved rounds of the compiled steps (else of the training steps after the first, "
                          "over seeds); memory = compiled step temp + argument bytes",
              "base_ppl": None, "adapters": {}, "results": [], "summary": []}
    if a.resume and out.exists():
        old = json.loads(out.read_text())
        if {k: v for k, v in old["budget"].items() if k != "seeds"} != {k: v for k, v in budget.items()
                                                                         if k != "seeds"}:
            raise SystemExit(f"--resume: {out} has another budget: {old['budget']}")
        result.update(base_ppl=old["base_ppl"], adapters=old["adapters"], results=old["results"],
                      command=old["command"] + " ; " + result["command"])
        result["machine"]["loadavg_start"] = old["machine"].get("loadavg_start")
        if "timing" in old:  # replaced when this invocation times the steps again (--time-rounds)
            result["timing"] = old["timing"]
        t_start -= old.get("wall_s", 0.0)  # wall_s: every invocation's together
        result["budget"]["seeds"] = sorted(set(old["budget"]["seeds"]) | set(seeds))

    def save():
        result["summary"] = summarise(result)
        result["wall_s"] = time.time() - t_start
        result["machine"]["loadavg_end"] = os.getloadavg()[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)

    if result["base_ppl"] is None:
        result["base_ppl"] = ppl(base)
        print(f"base: ppl {result['base_ppl']:.2f}", flush=True)
        save()

    # ---- sizes: equal trainable parameters -------------------------------------------------------------------------
    one_layer = uniform_layers(base, DEFAULT_LORA_TARGETS)  # else every count builds the whole model (slow)
    lora_counts = counts(base, "lora", a.lora_rank, a.lora_alpha, DEFAULT_LORA_TARGETS, one_layer)
    target = lora_counts["trainable_params"]
    for name in names:
        info = result["adapters"].get(name)
        if info is not None and (name not in sizes or info["rank"] == sizes[name]):
            continue
        key = "live_trainable_params" if name == "sparse" else "trainable_params"
        if name == "lora":
            rank, c = a.lora_rank, lora_counts
        elif name in sizes:
            rank, c = sizes[name], counts(base, name, sizes[name], a.lora_alpha, DEFAULT_LORA_TARGETS, one_layer)
        else:
            rank, c = match_rank(base, name, target, a.lora_alpha, DEFAULT_LORA_TARGETS, key, 1, a.max_rank,
                                 one_layer)
        result["adapters"][name] = {"rank": rank, "size_flag": f"--lora-rank {rank}", **c, "matched_on": key,
                                    "vs_lora_params": c[key] / target - 1.0, "chosen": "--size" if name in sizes
                                    else ("budget" if name == "lora" else "closest count")}
        print(f"{name:9s} --lora-rank {rank:3d}: trainable {c['trainable_params']:>10,d}  live "
              f"{c['live_trainable_params']:>10,d}  ({result['adapters'][name]['vs_lora_params']:+.1%} vs LoRA)",
              flush=True)
    save()

    if a.check_cli:
        check_cli(a, paths, model_dir, seeds[0], warmup, base, cfg, names)

    # ---- one compiled step per adapter: memory analysis + every seed ----------------------------------------------
    blocks = {}
    steps_of = {}

    def setup(name: str, seed: int):
        """finetune's model at ``seed``: a fresh copy of the base, LoRA attached, the adapter's layers, split."""
        c = cfg(seed, result["adapters"][name]["rank"])
        model = merge_lora(base)  # a LoRA-free copy
        set_linear_impl(model, c.impl)
        model.remat = c.remat
        add_lora(model, rank=c.lora_rank, alpha=c.lora_alpha, targets=c.targets, seed=c.seed)
        if ADAPTERS.get(name).convert is not None:
            attach_adapter(model, name, seed=c.seed)
        return c, partition(model)

    def compiled_step(name: str, c, graphdef, frozen, trainable, masks):
        if name not in steps_of:
            optimizer = make_optimizer(c.optim())
            step = make_train_step(graphdef, optimizer)
            abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
            t0 = time.perf_counter()
            compiled = step.lower(abstract(trainable), jax.eval_shape(optimizer.init, abstract(trainable)), (),
                                  abstract(frozen), abstract(masks),
                                  jax.ShapeDtypeStruct((1, a.batch_size, a.seq_len), jnp.int32),
                                  jax.ShapeDtypeStruct((), jnp.int32)).compile()
            compile_s = time.perf_counter() - t0
            ma = compiled.memory_analysis()
            mem = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
            mem["step_bytes"] = mem["temp"] + mem["argument"]
            mem["compile_s"] = compile_s
            result["adapters"][name]["memory"] = mem
            steps_of[name] = (compiled, optimizer)
            save()
            print(f"{name:9s} step compiled in {compile_s:.0f} s: temp + argument {mem['step_bytes'] / 2**20:.1f} MiB",
                  flush=True)
        return steps_of[name]

    done = {(r["adapter"], r["seed"]) for r in result["results"]}
    for seed in seeds:  # adapters interleaved within a seed: a change of machine load hits all alike
        for name in names:
            if (name, seed) in done:
                continue
            t_run = time.time()
            c, (graphdef, frozen, trainable, masks) = setup(name, seed)
            if tree_size(trainable) != result["adapters"][name]["trainable_params"]:  # the count's check
                raise SystemExit(f"{name}: the built model trains {tree_size(trainable):,} parameters, the count "
                                 f"was {result['adapters'][name]['trainable_params']:,}")
            compiled, optimizer = compiled_step(name, c, graphdef, frozen, trainable, masks)
            if seed not in blocks:
                blocks[seed] = training_blocks(c.text, tok, c.seq_len, seed=seed)
            opt_state = optimizer.init(trainable)
            losses, times = [], []
            for step in range(a.steps):
                batch = jnp.asarray(blocks[seed].batch(step, a.batch_size).reshape(1, a.batch_size, -1))
                t0 = time.perf_counter()
                trainable, opt_state, _, m = compiled(trainable, opt_state, (), frozen, masks, batch, jnp.int32(step))
                jax.block_until_ready((trainable, m))
                times.append(time.perf_counter() - t0)
                losses.append(float(m["loss"]))
                if not math.isfinite(losses[-1]):
                    break
            model = merge_lora(combine(graphdef, frozen, trainable, masks))
            p = ppl(model) if math.isfinite(losses[-1]) else float("nan")
            row = {"adapter": name, "seed": seed, "rank": c.lora_rank, "ppl": p,
                   "trainable_params": tree_size(trainable), "final_loss": losses[-1],
                   "first_loss": losses[0], "step_s_median": statistics.median(times[1:]) if len(times) > 1 else None,
                   "step_s": times, "loss": losses, "wall_s": time.time() - t_run, "loadavg": os.getloadavg()[0]}
            result["results"].append(row)
            save()
            print(f"seed {seed} {name:9s}: ppl {p:8.3f}  loss {losses[0]:.3f} -> {losses[-1]:.3f}  step "
                  f"{row['step_s_median'] or float('nan'):.2f} s  ({row['wall_s']:.0f} s, load "
                  f"{row['loadavg']:.1f})", flush=True)
            del model
    if a.time_rounds:
        interleaved_timing(a, names, seeds[0], setup, compiled_step, blocks, tok, result)
    save()
    for s in result["summary"]:
        std = f" ± {s['ppl_std']:.3f}" if s["ppl_std"] is not None else ""
        print(f"{s['adapter']:9s} r={s['rank']:3d} params {s['params']:>10,d}: ppl {s['ppl_mean']:.3f}{std} "
              f"(n={s['n']})  time x{s['step_time_vs_lora'] or float('nan'):.2f}  "
              f"memory x{s['step_memory_vs_lora'] or float('nan'):.3f}")
    print(f"wrote {out} ({time.time() - t_start:.0f} s)")
    return 0


def interleaved_timing(a, names, seed, setup, compiled_step, blocks, tok, result) -> None:
    """Every adapter's compiled step in turn, ``--time-rounds`` rounds after one untimed round, on the same batch:
    the machine's load changes hit every adapter alike (the training runs' own step times are taken minutes
    apart). Medians in ``result["timing"]``."""
    import jax
    import jax.numpy as jnp

    from jaxprune.data import training_blocks

    states, times = {}, {n: [] for n in names}
    for name in names:
        c, (graphdef, frozen, trainable, masks) = setup(name, seed)
        compiled, optimizer = compiled_step(name, c, graphdef, frozen, trainable, masks)
        states[name] = [compiled, trainable, optimizer.init(trainable), frozen, masks]
    if seed not in blocks:
        blocks[seed] = training_blocks(str(fixture_text()), tok, a.seq_len, seed=seed)
    batch = jnp.asarray(blocks[seed].batch(0, a.batch_size).reshape(1, a.batch_size, -1))
    for rnd in range(a.time_rounds + 1):
        for name in names:
            compiled, trainable, opt_state, frozen, masks = states[name]
            t0 = time.perf_counter()
            trainable, opt_state, _, m = compiled(trainable, opt_state, (), frozen, masks, batch, jnp.int32(rnd))
            jax.block_until_ready((trainable, m))
            if rnd:
                times[name].append(time.perf_counter() - t0)
            states[name][1:3] = [trainable, opt_state]
    result["timing"] = {"rounds": a.time_rounds, "seed": seed, "loadavg": os.getloadavg()[0],
                        "step_s": times, "median_s": {n: statistics.median(t) for n, t in times.items()}}
    print("interleaved step time: " + ", ".join(f"{n} {statistics.median(t):.2f} s" for n, t in times.items()),
          flush=True)


def fixture_text():
    from jaxprune.fixtures import fixture_paths
    return fixture_paths().train_text


def summarise(result: dict) -> list[dict]:
    """Per adapter: perplexity mean ± std (ddof 1) over seeds, pooled median step time and compiled step memory, both
    over LoRA's."""
    import numpy as np

    def pooled_median(name):
        ts = [t for r in result["results"] if r["adapter"] == name for t in r["step_s"][1:]]
        return float(np.median(ts)) if ts else None

    timing = result.get("timing", {}).get("median_s", {})
    lora_t = pooled_median("lora")
    lora_ti = timing.get("lora")
    lora_m = result["adapters"].get("lora", {}).get("memory", {}).get("step_bytes")
    out = []
    for name, info in result["adapters"].items():
        rs = [r for r in result["results"] if r["adapter"] == name]
        ppl = np.array([r["ppl"] for r in rs], float)
        t = pooled_median(name)
        m = info.get("memory", {}).get("step_bytes")
        lora_rs = {r["seed"]: r["ppl"] for r in result["results"] if r["adapter"] == "lora"}
        paired = [r["ppl"] / lora_rs[r["seed"]] for r in rs if r["seed"] in lora_rs] if name != "lora" else []
        out.append({"adapter": name, "rank": info["rank"], "size_flag": info["size_flag"],
                    "params": info[info["matched_on"]], "trainable_params": info["trainable_params"],
                    "live_trainable_params": info["live_trainable_params"], "vs_lora_params": info["vs_lora_params"],
                    "n": len(rs), "seeds": [r["seed"] for r in rs],
                    "ppl_mean": float(ppl.mean()) if len(rs) else None,
                    "ppl_std": float(ppl.std(ddof=1)) if len(rs) > 1 else None, "ppl_each": ppl.tolist(),
                    "ppl_vs_lora_same_seed": paired,
                    "lower_than_lora_on": f"{sum(x < 1 for x in paired)} of {len(paired)} seeds" if paired else None,
                    "step_s_median_training": t,
                    "step_time_vs_lora_training": t / lora_t if t and lora_t else None,
                    "step_s_median_interleaved": timing.get(name),
                    "step_time_vs_lora": (timing[name] / lora_ti if timing.get(name) and lora_ti else
                                          t / lora_t if t and lora_t else None),
                    "step_time_from": "interleaved" if timing.get(name) and lora_ti else "training",
                    "step_bytes": m, "step_memory_vs_lora": m / lora_m if m and lora_m else None})
    return out


def check_cli(a, paths, model_dir, seed, warmup, base, cfg, names) -> None:
    """`jaxprune finetune` (LoRA, ``seed``, 3 steps) in-process vs this script's step: the same losses."""
    import jax.numpy as jnp
    import numpy as np

    from jaxprune.cli import build_parser
    from jaxprune.data import training_blocks
    from jaxprune.partition import add_lora, partition
    from jaxprune.train import make_optimizer, make_train_step
    from jaxprune.weights import merge_lora

    steps = 3
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["finetune", str(model_dir), "--text", str(paths.train_text), "--steps", str(steps), "--seq-len",
                str(a.seq_len), "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--warmup-steps", str(warmup),
                "--lora-rank", str(a.lora_rank), "--lora-alpha", str(a.lora_alpha), "--seed", str(seed),
                "--save-every", str(steps), "--val-every", "0", "--no-progress", "--json", "--out", f"{tmp}/run"]
        args = build_parser().parse_args(argv)
        args.argv = argv
        args.fn(args)
        cli = [json.loads(l)["loss"] for l in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    c = dataclasses.replace(cfg(seed, a.lora_rank), steps=steps)
    model = merge_lora(base)
    add_lora(model, rank=c.lora_rank, alpha=c.lora_alpha, targets=c.targets, seed=seed)
    graphdef, frozen, trainable, masks = partition(model)
    optimizer = make_optimizer(c.optim())
    step = make_train_step(graphdef, optimizer)
    opt_state, blocks, ours = optimizer.init(trainable), training_blocks(c.text, load_tok(model_dir), c.seq_len,
                                                                           seed=seed), []
    for i in range(steps):
        batch = jnp.asarray(blocks.batch(i, a.batch_size).reshape(1, a.batch_size, -1))
        trainable, opt_state, _, m = step(trainable, opt_state, (), frozen, masks, batch, jnp.int32(i))
        ours.append(float(m["loss"]))
    print(f"--check-cli: finetune losses {cli}, ours {ours}", flush=True)
    if not np.allclose(cli, ours, rtol=1e-5, atol=1e-5):
        raise SystemExit("--check-cli: this script's steps differ from `jaxprune finetune`")


def load_tok(model_dir):
    from jaxprune import load
    return load.load_tokenizer(str(model_dir))


if __name__ == "__main__":
    sys.exit(main())
