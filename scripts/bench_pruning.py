"""LoRAPrune vs LLM-Pruner vs magnitude vs random on SmolLM2-135M, same data and step budget.

For each (method, ratio): prune (LoRAPrune: iteratively during `--steps` LoRA steps; baselines:
one shot on `--calib-samples` x 64 tokens, then `--steps` LoRA recovery steps), shrink, and
measure perplexity on the held-out plays, the fraction of all parameters removed and forward
tokens/s relative to the dense model measured in the same process.

    python scripts/bench_pruning.py                       # ratios 0.2,0.5, all methods
    python scripts/bench_pruning.py --ratios 0.5 --steps 30 --eval-tokens 8192
Writes benchmarks/pruning.json (after every run, atomically) and benchmarks/pruning.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402

RUNS = [("loraprune", "q_head"), ("loraprune", "kv_group"), ("llm-pruner", "q_head"), ("magnitude", "q_head"),
        ("random", "q_head")]




def plot(rows, dense_ppl, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label in sorted({(r["method"], r["attn_unit"]) for r in rows}):
        pts = sorted((r["params_removed_fraction"], r["ppl"]) for r in rows if (r["method"], r["attn_unit"]) == label)
        ax.plot(*zip(*pts), "o-", label=f"{label[0]} ({label[1]})")
    ax.axhline(dense_ppl, color="gray", ls="--", label="dense")
    ax.set_xlabel("fraction of all parameters removed")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--methods", default=",".join(f"{m}:{u}" for m, u in RUNS),
                    help="METHOD:UNIT[:int8], comma-separated (':int8' = --quantize-base int8, LoRAPrune only)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (both methods)")
    ap.add_argument("--prune-every", type=int, default=10, help="LoRAPrune: steps between mask updates")
    ap.add_argument("--seed", type=int, default=0, help="data order and LoRA init (both methods)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "pruning.json"))
    a = ap.parse_args()

    from jaxprune import load
    from jaxprune.cli import build_parser
    from jaxprune.evaluate import forward_speedup, forward_throughput, perplexity, tokenize_text
    from jaxprune.fixtures import fixture_paths

    paths = fixture_paths()
    dense = load.load_model(paths.hf_dir)
    tok = load.load_tokenizer(paths.hf_dir)
    heldout = tokenize_text(tok, paths.heldout_text.read_text())
    dense_ppl = perplexity(dense, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens, progress=False)["ppl"]
    dense_tps = forward_throughput(dense, batch_size=4, seq_len=256)
    print(f"dense: ppl {dense_ppl:.2f}, {dense_tps:.0f} tokens/s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "pruning", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "budget": {"steps": a.steps, "seq_len": a.seq_len, "batch_size": a.batch_size,
                         "grad_accum": a.grad_accum, "prune_every": a.prune_every, "seed": a.seed,
                         "eval_tokens": a.eval_tokens, "eval_seq_len": 256},
              "dense": {"ppl": dense_ppl, "tokens_per_s": dense_tps}, "results": []}
    for ratio in [float(r) for r in a.ratios.split(",")]:
        for spec in a.methods.split(","):
            method, unit, *base = spec.split(":")  # loraprune:kv_group:int8 -> --quantize-base int8
            quant = ["--quantize-base", base[0]] if base else []
            with tempfile.TemporaryDirectory() as tmp:
                run = Path(tmp) / "run"
                argv = ["prune", str(paths.hf_dir), "--method", method, "--attn-unit", unit, "--ratio", str(ratio),
                        "--text", str(paths.train_text), "--steps", str(a.steps), "--seq-len", str(a.seq_len),
                        "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
                        "--prune-every", str(a.prune_every), "--seed", str(a.seed), *quant, "--widths", "layerwise",
                        "--save-every", str(a.steps), "--val-every", "0",
                        "--out", str(run), "--json", "--no-progress"]
                t = time.time()
                args = build_parser().parse_args(argv)
                summary = args.fn(args)
                wall = time.time() - t
                pruned = load.load_model(run / "model")
            ppl = perplexity(pruned, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens,
                             progress=False)["ppl"]
            speedup, tps = forward_speedup(pruned, dense, batch_size=4, seq_len=256)  # interleaved with dense
            row = {"method": method, "attn_unit": unit, "base": base[0] if base else "float", "ratio": ratio,
                   "ppl": ppl,
                   "params_after": summary["params_after"],
                   "params_removed_fraction": summary["params_removed_fraction"],
                   "heads_pruned": summary["heads_pruned"], "channels_pruned": summary["channels_pruned"],
                   "tokens_per_s": tps, "speedup_vs_dense": speedup, "wall_s": wall}
            result["results"].append(row)
            write_json_atomic(out, result)
            print(f"{method:10s} {unit:8s} {row['base']:5s} ratio {ratio}: ppl {ppl:8.2f}  removed "
                  f"{row['params_removed_fraction']:.1%}  speed {row['speedup_vs_dense']:.2f}x  ({wall:.0f} s)",
                  flush=True)
    plot(result["results"], dense_ppl, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
