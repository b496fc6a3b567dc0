"""LoRAPrune vs LLM-Pruner (vs l2, random) on SmolLM2-135M: same tokens, same recovery, several seeds.

Protocol (issue 19, "fair"): LoRAPrune selects its units in a run of `--select-steps` LoRA steps
(masks set every `--prune-every` steps on the cubic schedule), then freezes the masks and every method
recovers with fresh LoRA for `--steps` steps at the same schedule on its final shape. LLM-Pruner scores
its units once on `--calib-samples` sequences of `--seq-len` tokens; by default as many tokens as
LoRAPrune's selection run sees, so both pick their units from the same number of tokens.
`--select-steps 0` is the old protocol (LoRAPrune prunes during the `--steps` run).
A method spec `METHOD:UNIT[:int8][:distill][:attnmean][:flag=value...]` adds `--quantize-base int8`,
`--distill`, (LoRAPrune) `--attn-score mean`, or any `prune` flag (`llm-pruner:kv_group:distill:distill-alpha=1`).
`--teacher-correction N` first fine-tunes the dense model on the training plays for N LoRA steps and merges it
(Minitron's teacher correction: the teacher then knows the distillation data's domain); every method then prunes
that model and `--distill` distils from it.
Each (seed, ratio, method) is one row (seed: calibration draw, batch order, LoRA init); the table
rows are mean ± std over seeds. Memory: the compiled memory (`memory_analysis()`) of the method's
importance pass at the shapes run here (LoRAPrune: one selection step; LLM-Pruner: one calibration
pass of `--calib-batch` sequences, gradients summed over passes).

    python scripts/bench_pruning.py                       # seeds 0,1,2; ratios 0.2,0.5
    python scripts/bench_pruning.py --seeds 0 --ratios 0.5 --steps 20 --eval-tokens 8192
Writes benchmarks/pruning.json (after every run, atomically) and benchmarks/pruning.png.
"""

from __future__ import annotations

import argparse
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

RUNS = ["loraprune:kv_group", "loraprune:kv_group:distill", "llm-pruner:kv_group", "llm-pruner:kv_group:distill"]
OPTIONS = {"int8": ["--quantize-base", "int8"], "distill": ["--distill"], "attnmean": ["--attn-score", "mean"]}


def option_flags(option: str) -> list[str]:
    """CLI flags of one spec option: a name in OPTIONS or ``flag=value``."""
    if option in OPTIONS:
        return OPTIONS[option]
    key, eq, value = option.partition("=")
    if not eq or not key:
        raise SystemExit(f"error: spec option {option!r}: expected one of {', '.join(OPTIONS)} or flag=value")
    return [f"--{key}", value]




def label(r: dict) -> str:
    return r["method"] + "".join(f"+{o}" for o in r.get("options", []))


LOCAL_TASKS = {"shakespeare_next_line": "acc_norm", "shakespeare_last_word": "acc"}  # task: the metric reported
ACCURACY = {task: f"{task.removeprefix('shakespeare_')}_{metric}" for task, metric in LOCAL_TASKS.items()}  # row keys


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std (ddof 1) of perplexity over seeds, per (method + options, unit, ratio)."""
    import numpy as np
    groups: dict = {}
    for r in rows:
        groups.setdefault((label(r), r["attn_unit"], r["ratio"]), []).append(r)
    out = []
    for (name, unit, ratio), rs in groups.items():
        ppl = np.array([r["ppl"] for r in rs])
        out.append({"method": name, "attn_unit": unit, "ratio": ratio, "seeds": [r["seed"] for r in rs],
                    "ppl_mean": float(ppl.mean()), "ppl_std": float(ppl.std(ddof=1)) if len(rs) > 1 else None,
                    "ppl_each": ppl.tolist(), "params_removed_fraction": rs[0]["params_removed_fraction"],
                    "importance_pass_bytes": rs[0].get("importance_pass_bytes"),
                    "wall_s_mean": float(np.mean([r["wall_s"] for r in rs])),
                    **{f"{k}_mean": float(np.mean([r[k] for r in rs])) for k in ACCURACY.values()
                       if all(k in r for r in rs)},
                    **paired_with_base(rs, rows)})
    return out


def paired_with_base(rs: list[dict], rows: list[dict]) -> dict:
    """For a method with options (e.g. +distill): its perplexity over the same method without options at the
    same seed and ratio, and on how many seeds it is lower by more than 0.1%. For options that change the
    recovery only (+distill) the same units are picked, so seed-to-seed noise in the selection cancels; +int8
    and +attnmean may change the selection too. ``{}`` for a plain method or when no seed has both."""
    import numpy as np

    if not rs[0].get("options"):
        return {}
    base = {(r["seed"], r["ratio"]): r["ppl"] for r in rows
            if r["method"] == rs[0]["method"] and r["attn_unit"] == rs[0]["attn_unit"] and not r.get("options")}
    ratios = [r["ppl"] / base[(r["seed"], r["ratio"])] for r in rs if (r["seed"], r["ratio"]) in base]
    if not ratios:
        return {}
    return {"vs": rs[0]["method"], "ppl_ratio_vs_plain_each": ratios, "ppl_ratio_vs_plain_mean": float(np.mean(ratios)),
            "lower_than_plain_on": f"{sum(x < 0.999 for x in ratios)} of {len(ratios)} seeds"}  # by > 0.1%


def plot(summary, dense_ppl, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in sorted({(s["method"], s["attn_unit"]) for s in summary}):
        pts = sorted((s["params_removed_fraction"], s["ppl_mean"], s["ppl_std"] or 0.0) for s in summary
                     if (s["method"], s["attn_unit"]) == name)
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, fmt="o-", capsize=3, label=f"{name[0]} ({name[1]})")
    ax.axhline(dense_ppl, color="gray", ls="--", label="dense")
    ax.set_xlabel("fraction of all parameters removed")
    ax.set_ylabel("held-out perplexity (mean ± std over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def importance_pass_bytes(method: str, unit: str, a) -> int | None:
    """Compiled bytes of one importance pass at this run's shapes (SmolLM2-135M, float32, no remat)."""
    import jax.numpy as jnp

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_pruning_memory import SHAPES, compile_step, memory
    from jaxprune.config import ModelConfig

    cfg = ModelConfig(**SHAPES["smollm2-135m"], max_position_embeddings=4096)
    if method == "loraprune":
        step, batch = "loraprune", a.batch_size
    elif method == "llm-pruner":
        step, batch = "llm_pruner_fused", a.calib_samples
    else:
        return None
    compiled = compile_step(step, cfg, jnp.float32, batch, a.seq_len, a.lora_rank, False, False, unit=unit,
                            chunk=a.calib_batch)
    return memory(compiled)["total_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--methods", default=",".join(RUNS),
                    help="METHOD:UNIT[:int8][:distill][:attnmean][:flag=value...], comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draw, data order and LoRA init, comma-separated")
    ap.add_argument("--steps", type=int, default=30, help="LoRA recovery steps on the final shape (every method)")
    ap.add_argument("--select-steps", type=int, default=20,
                    help="LoRAPrune: selection-run steps before the masks freeze (0: prune during --steps)")
    ap.add_argument("--prune-every", type=int, default=4, help="LoRAPrune: steps between mask updates")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (every method)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="LLM-Pruner calibration sequences of --seq-len tokens (default: LoRAPrune's selection tokens)")
    ap.add_argument("--calib-batch", type=int, default=None,
                    help="LLM-Pruner: calibration sequences per pass (default: --batch-size, LoRAPrune's per step)")
    ap.add_argument("--teacher-correction", type=int, default=0,
                    help="fine-tune the dense model for this many LoRA steps (merged) before pruning: the base and "
                         "teacher of every method (0: the model as shipped)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--speed", action="store_true", help="also time each pruned forward against the dense one "
                                                         "(meaningful on an idle machine only)")
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2",
                    help="SmolLM2-135M (GQA 9/3 heads) or Gemma 3 270M (MQA: 4 query heads on one KV head)")
    ap.add_argument("--depth-first", default=None, metavar="METHOD:RATIO",
                    help="a mixed recipe: first remove RATIO of the layers with depth METHOD (shortgpt|replaceme, "
                         "no recovery, same calibration and seed), then run every spec on that model; rows report "
                         "parameters removed from the original model")
    ap.add_argument("--lm-eval-limit", type=int, default=0, metavar="N",
                    help="also score every model on the local lm-eval tasks (shakespeare_next_line acc_norm, "
                         "shakespeare_last_word acc) over their first N documents (0: perplexity only)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "pruning.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out (same budget) and run only the missing ones")
    a = ap.parse_args()
    if a.calib_samples is None:
        a.calib_samples = max(a.select_steps, 1) * a.batch_size * a.grad_accum
    a.calib_batch = a.calib_batch or a.batch_size
    seeds = [int(x) for x in a.seeds.split(",")]
    specs = []
    for spec in a.methods.split(","):
        method, unit, *opts = spec.split(":")
        for o in opts:
            option_flags(o)  # exits with one line on a malformed option
        specs.append((method, unit, opts))

    from jaxprune import load
    from jaxprune.cli import build_parser
    from jaxprune.evaluate import forward_speedup, forward_throughput, perplexity, tokenize_text
    from jaxprune.fixtures import fixture_paths

    paths = fixture_paths()
    model_dir = paths.gemma3_hf_dir if a.model == "gemma3" else paths.hf_dir
    if a.teacher_correction and a.model != "smollm2":
        sys.exit("error: --teacher-correction is for --model smollm2")
    base = corrected_base(a, paths, build_parser) if a.teacher_correction else model_dir
    tok = load.load_tokenizer(model_dir)
    heldout = tokenize_text(tok, paths.heldout_text.read_text())
    ppl_of = lambda m: perplexity(m, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens,  # noqa: E731
                                  progress=False)["ppl"]
    shipped_ppl = ppl_of(load.load_model(paths.hf_dir)) if a.teacher_correction else None
    dense = load.load_model(base)
    dense_ppl = ppl_of(dense)
    dense_tps = forward_throughput(dense, batch_size=4, seq_len=256) if a.speed else None
    print(f"dense: ppl {dense_ppl:.2f}" + (f" (teacher-corrected; as shipped {shipped_ppl:.2f})"
                                           if a.teacher_correction else ""), flush=True)
    memory = {(m, u): importance_pass_bytes(m, u, a) for m, u, _ in specs}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = {"benchmark": "pruning", "model": {"smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
                                                "gemma3": "Gemma 3 270M (Q4_K_M GGUF, dequantised)"}[a.model],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "loadavg_start": os.getloadavg()[0]},
              "protocol": "select" if a.select_steps else "during",
              "budget": {"steps": a.steps, "select_steps": a.select_steps, "seq_len": a.seq_len,
                         "batch_size": a.batch_size, "grad_accum": a.grad_accum, "prune_every": a.prune_every,
                         "lora_rank": a.lora_rank, "calib_samples": a.calib_samples, "calib_len": a.seq_len,
                         "calib_batch": a.calib_batch, "seeds": seeds, "eval_tokens": a.eval_tokens,
                         "eval_seq_len": 256, **({"teacher_correction": a.teacher_correction}
                                                 if a.teacher_correction else {}),
                         **({"depth_first": a.depth_first} if a.depth_first else {}),
                         **({"lm_eval_limit": a.lm_eval_limit} if a.lm_eval_limit else {})},
              "dense": {"ppl": dense_ppl, "tokens_per_s": dense_tps, **local_accuracy(a, base, build_parser),
                        **({"ppl_as_shipped": shipped_ppl} if a.teacher_correction else {})},
              "results": [], "summary": [],
              "command": "python scripts/bench_pruning.py " + " ".join(sys.argv[1:])}
    if a.resume and out.exists():
        old = json.loads(out.read_text())
        if old.get("budget", {}) | {"seeds": seeds} != result["budget"]:
            sys.exit(f"--resume: {out} was run with another budget: {old.get('budget')}")
        result["results"], result["budget"]["seeds"] = old["results"], sorted(set(old["budget"]["seeds"]) | set(seeds))
        result["command"] = old["command"] + " ; " + result["command"]
    result["summary"] = summarise(result["results"])
    done = {(r["seed"], r["ratio"], label(r), r["attn_unit"]) for r in result["results"]}
    ran = False
    for seed in seeds:
        for ratio in [float(r) for r in a.ratios.split(",")]:
            for method, unit, opts in specs:
                if (seed, ratio, label({"method": method, "options": opts}), unit) in done:
                    continue
                start = depth_first(a, base, paths, seed, build_parser) if a.depth_first else base
                row = run_one(a, start, paths, heldout, dense, method, unit, opts, ratio, seed, build_parser, load,
                              perplexity, forward_speedup)
                if a.depth_first:  # the fraction of the original model's parameters, not of the depth-pruned one
                    row["params_removed_fraction"] = 1.0 - row["params_after"] / dense.config.num_params()
                row["importance_pass_bytes"] = memory[(method, unit)]
                result["results"].append(row)
                ran = True
                result["summary"] = summarise(result["results"])
                result["wall_s"] = time.time() - t0
                result["machine"]["loadavg_end"] = os.getloadavg()[0]
                write_json_atomic(out, result)
                print(f"seed {seed} {label(row):22s} {unit:8s} ratio {ratio}: ppl {row['ppl']:8.2f}  removed "
                      f"{row['params_removed_fraction']:.1%}  ({row['wall_s']:.0f} s)", flush=True)
    if not ran and a.resume and out.exists():  # nothing new: refresh the summary only, keep the run's record
        result = {**json.loads(out.read_text()), "summary": summarise(result["results"])}
    result["summary"] = summarise(result["results"])
    write_json_atomic(out, result)
    plot(result["summary"], dense_ppl, out.with_suffix(".png"))
    for s_ in result["summary"]:
        std = f" ± {s_['ppl_std']:.2f}" if s_["ppl_std"] is not None else ""
        vs = (f"  {s_['ppl_ratio_vs_plain_mean']:.4f}x {s_['vs']} at the same seeds "
              f"(lower on {s_['lower_than_plain_on']})" if "vs" in s_ else "")
        print(f"{s_['method']:22s} ratio {s_['ratio']}: {s_['ppl_mean']:.2f}{std}  (n={len(s_['seeds'])}){vs}")
    print(f"wrote {out}")


def corrected_base(a, paths, build_parser) -> Path:
    """The dense model after ``--teacher-correction`` LoRA steps on the training plays (seed 0, merged),
    cached in the fixture cache (deterministic: one run per step count)."""
    from jaxprune.checkpoint import is_checkpoint
    from jaxprune.fixtures import cache_dir

    run = (cache_dir() / "bench"
           / f"teacher-correction-{a.teacher_correction}-{a.batch_size}x{a.seq_len}-r{a.lora_rank}")
    if not is_checkpoint(run / "model"):
        argv = ["finetune", str(paths.hf_dir), "--text", str(paths.train_text), "--steps", str(a.teacher_correction),
                "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--lora-rank", str(a.lora_rank),
                "--merge", "--val-every", "0", "--save-every", str(a.teacher_correction), "--out", str(run),
                "--overwrite", "--json", "--no-progress"]
        run.parent.mkdir(parents=True, exist_ok=True)
        args = build_parser().parse_args(argv)
        args.fn(args)
    return run / "model"


def depth_first(a, base, paths, seed, build_parser) -> Path:
    """``--depth-first METHOD:RATIO``: the base model with RATIO of its layers removed by METHOD (retraining-free,
    this seed's calibration draw), cached in the fixture cache per (method, ratio, seed, calibration)."""
    from jaxprune.checkpoint import is_checkpoint
    from jaxprune.fixtures import cache_dir

    method, _, ratio = a.depth_first.partition(":")
    run = (cache_dir() / "bench" / f"depth-first-{method}-{ratio}-seed{seed}-{a.calib_samples}x{a.seq_len}"
           f"-{Path(base).parent.name if Path(base).name == 'model' else Path(base).name}")
    if not is_checkpoint(run / "model"):
        argv = ["prune", str(base), "--method", method, "--ratio", ratio, "--recover-steps", "0",
                "--text", str(paths.train_text), "--seed", str(seed), "--calib-samples", str(a.calib_samples),
                "--calib-len", str(a.seq_len), "--calib-batch", str(a.calib_batch),
                "--out", str(run), "--overwrite", "--json", "--no-progress"]
        run.parent.mkdir(parents=True, exist_ok=True)
        args = build_parser().parse_args(argv)
        args.fn(args)
    return run / "model"


def run_one(a, base, paths, heldout, dense, method, unit, opts, ratio, seed, build_parser, load, perplexity,
            forward_speedup) -> dict:
    """Prune + recover one model in a temporary run dir; its held-out perplexity and counts."""
    extra = [x for o in opts for x in option_flags(o)]
    if method == "loraprune" and a.select_steps:
        extra += ["--select-steps", str(a.select_steps), "--recover-steps", str(a.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        from jaxprune.prune.registry import DEPTH

        # depth methods remove whole layers (--ratio: the fraction of layers): no attention unit, no widths
        shape = [] if method in DEPTH.names() else ["--attn-unit", unit, "--widths", "layerwise"]
        argv = ["prune", str(base), "--method", method, *shape[:2], "--ratio", str(ratio),
                "--text", str(paths.train_text), "--steps", str(a.steps), "--seq-len", str(a.seq_len),
                "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
                "--lora-rank", str(a.lora_rank), "--prune-every", str(a.prune_every), "--seed", str(seed),
                "--calib-samples", str(a.calib_samples), "--calib-len", str(a.seq_len),
                "--calib-batch", str(a.calib_batch), *shape[2:], *extra,  # a spec's flags win
                "--save-every", str(max(a.steps, a.select_steps)), "--val-every", "0",
                "--out", str(run), "--json", "--no-progress"]
        t = time.time()
        args = build_parser().parse_args(argv)
        summary = args.fn(args)
        wall = time.time() - t
        pruned = load.load_model(run / "model")
        accuracy = local_accuracy(a, run / "model", build_parser)
    ppl = perplexity(pruned, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens, progress=False)["ppl"]
    speedup = forward_speedup(pruned, dense, batch_size=4, seq_len=256) if a.speed else (None, None)
    return {"method": method, "attn_unit": unit, "options": opts, "base": "int8" if "int8" in opts else "float",
            "ratio": ratio, "seed": seed, "ppl": ppl, "params_after": summary["params_after"],
            "params_removed_fraction": summary["params_removed_fraction"],
            "heads_pruned": summary.get("heads_pruned"), "channels_pruned": summary.get("channels_pruned"),
            "layers_removed": summary.get("layers_removed"),
            "tokens_per_s": speedup[1], "speedup_vs_dense": speedup[0], "wall_s": wall, **accuracy}



def local_accuracy(a, model_dir, build_parser) -> dict:
    """``--lm-eval-limit N``: the local lm-eval tasks' accuracy on their first N documents (``jaxprune lm-eval``;
    README: lm-eval), as ``{next_line_acc_norm, last_word_acc}``; ``{}`` when N is 0."""
    if not a.lm_eval_limit:
        return {}
    args = build_parser().parse_args(["lm-eval", str(model_dir), "--tasks", ",".join(LOCAL_TASKS), "--limit",
                                      str(a.lm_eval_limit), "--bootstrap-iters", "0", "--json"])
    tasks = args.fn(args)["tasks"]
    return {ACCURACY[task]: tasks[task][metric] for task, metric in LOCAL_TASKS.items()}


if __name__ == "__main__":
    main()
