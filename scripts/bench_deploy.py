"""How fast the pruned SmolLM2-135M runs in llama.cpp, where users run it, and what 4-bit costs there (issue 32).

Prunes SmolLM2-135M with --method (default: prune's default, SlimGPT; retraining-free) at one ratio in both width layouts
(`--widths uniform` -> llama arch, `--widths layerwise` -> deci), exports the dense and the pruned models
with `export --format gguf` as f16 and as 4-bit (q4_0, q4_k_m: llama.cpp's own quantizer), then in llama.cpp (the CPU
extension of llama-cpp-cffi, `jaxprune.llamacpp`):

* perplexity on held-out play text (non-overlapping windows, the `jaxprune eval` protocol) for every file:
  the 4-bit cost is its perplexity over the f16 file's;
* prompt processing (one batch of --n-prompt tokens) and generation (--n-gen single-token decodes) in
  tokens/s with --threads threads: every file is timed in each of --rounds rounds, round-robin, so all
  ratios come from one run under the same machine load; the median round counts.

    python scripts/bench_deploy.py [--ratio 0.5] [--steps 0] [--threads 2] [--rounds 5]
Writes benchmarks/deploy.json; the GGUF files stay in --runs (default runs/bench_deploy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402


def tensor_types(path: Path) -> dict[str, float]:
    """{ggml type: fraction of the file's weight elements stored in it}."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--method", default=None, help="structured method (default: prune's default)")
    ap.add_argument("--steps", type=int, default=0, help="LoRA recovery steps after pruning (0: retraining-free)")
    ap.add_argument("--quant", default="q4_0,q4_k_m",
                    help="4-bit --outtype values, comma-separated (SmolLM2's 576-wide rows do not split into "
                         "k-quant 256-blocks, so llama.cpp stores most q4_k_m tensors as q5_0 / q8_0; q4_0 is 4-bit "
                         "throughout)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows of --seq-len for perplexity")
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench_deploy"))
    ap.add_argument("--reuse", action="store_true", help="keep pruned runs already in --runs (same settings)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "deploy.json"))
    a = ap.parse_args()

    from jaxprune import gguf_io, llamacpp, load
    from jaxprune.cli import build_parser
    from jaxprune.evaluate import tokenize_text
    from jaxprune.fixtures import fixture_paths
    from jaxprune.prune.pipeline import DEFAULT_METHOD

    method = a.method or DEFAULT_METHOD

    llamacpp.require()
    paths = fixture_paths()
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    tok = load.load_tokenizer(paths.hf_dir)
    heldout = tokenize_text(tok, paths.heldout_text.read_text())[: a.eval_windows * a.seq_len]
    t_start, load_start = time.time(), os.getloadavg()

    models = {"dense": {"dir": paths.hf_dir, "widths": None}}
    for widths in ("uniform", "layerwise"):
        run = runs / f"{method}-{widths}"
        argv = ["prune", str(paths.hf_dir), "--method", method, "--ratio", str(a.ratio), "--widths", widths, "--text",
                str(paths.train_text), "--seq-len", "128",
                "--batch-size", "4", "--recover-steps", str(a.steps), "--out", str(run), "--overwrite", "--json",
                "--no-progress"]
        if a.reuse and (run / "prune.json").exists():
            summary = json.loads((run / "prune.json").read_text())
        else:
            print(f"[deploy] jaxprune {' '.join(argv[:1] + argv[2:])}", flush=True)
            args = build_parser().parse_args(argv)
            summary = args.fn(args)
        models[widths] = {"dir": run / "model", "widths": widths,
                          "heads_pruned": summary["heads_pruned"], "channels_pruned": summary["channels_pruned"]}

    files = {}
    for name, m in models.items():
        model = load.load_model(m["dir"])
        m["params"] = model.config.num_params()
        for outtype in ("f16", *a.quant.split(",")):
            path = runs / f"{name}-{outtype}.gguf"
            info = gguf_io.export_gguf(model, path, tokenizer=tok, outtype=outtype, overwrite=True)
            m["arch"] = info["arch"]
            files[(name, outtype)] = {"model": name, "outtype": outtype, "arch": info["arch"], "bytes": info["bytes"],
                                      "tensor_types": tensor_types(path), "path": str(path)}
            print(f"[deploy] {path.name}: {info['arch']}, {info['bytes'] / 1e6:.1f} MB", flush=True)

    windows = heldout.reshape(-1, a.seq_len)
    for f in files.values():  # perplexity does not depend on threads; one thread suffers least from a busy machine
        with llamacpp.LlamaCpp(f["path"], n_ctx=a.seq_len, n_threads=1) as m:
            f["ppl"] = m.perplexity(windows.reshape(-1), a.seq_len)["ppl"]
        print(f"[deploy] {Path(f['path']).name}: llama.cpp perplexity {f['ppl']:.3f}", flush=True)

    # speed: every file at --threads (wall clock, as users see it) and at 1 thread (also per CPU second: the
    # compute itself, which other jobs on a shared machine do not change), round-robin
    threads = sorted({a.threads, 1}, reverse=True)
    rounds = llamacpp.speed_rounds(
        {k: f["path"] for k, f in files.items()}, rounds=a.rounds, n_prompt=a.n_prompt, n_gen=a.n_gen,
        threads=threads, on_round=lambda r, rd: print(f"[deploy] round {r + 1}/{a.rounds}: " + ", ".join(
            f"{k[0]}-{k[1]}@{t} pp {v['pp_tokens_per_s']:.0f} tg {v['tg_tokens_per_s']:.1f}"
            for (k, t), v in rd.items()), flush=True))

    results = []
    for (name, outtype), f in files.items():
        row = {k: v for k, v in f.items() if k != "path"}
        row["ppl_over_f16"] = f["ppl"] / files[(name, "f16")]["ppl"]
        row["params"] = models[name]["params"]
        row["speed"] = {}
        for t in threads:
            sp = {}
            for key in ("pp_tokens_per_s", "tg_tokens_per_s", "pp_tokens_per_cpu_s", "tg_tokens_per_cpu_s"):
                if "cpu" in key and t != 1:
                    continue
                sp[key] = float(np.median([rd[((name, outtype), t)][key] for rd in rounds]))
                # over dense in the same type, round by round (same machine load), median over rounds
                sp[key.replace("tokens", "speedup")] = float(np.median(
                    [rd[((name, outtype), t)][key] / rd[(("dense", outtype), t)][key] for rd in rounds]))
            row["speed"][f"threads_{t}"] = sp
        results.append(row)

    result = {"benchmark": "deploy", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
              "llama_cpp": llamacpp.WHEEL,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                          "loadavg_end": os.getloadavg()},
              "budget": {"method": method, "ratio": a.ratio, "recover_steps": a.steps, "threads": a.threads,
                         "rounds": a.rounds, "n_prompt": a.n_prompt, "n_gen": a.n_gen, "seq_len": a.seq_len,
                         "eval_tokens": int(windows.size), "quant": a.quant},
              "models": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()}
                         for k, v in models.items()},
              "results": results, "wall_s": time.time() - t_start}
    write_json_atomic(Path(a.out), result)
    for r in results:
        s2, s1 = r["speed"][f"threads_{a.threads}"], r["speed"]["threads_1"]
        print(f"{r['model']:10s} {r['outtype']:7s} {r['arch']:5s} {r['bytes'] / 1e6:6.1f} MB  ppl {r['ppl']:8.2f} "
              f"({r['ppl_over_f16']:.3f}x f16)  {a.threads} threads: pp {s2['pp_speedup_per_s']:.2f}x "
              f"tg {s2['tg_speedup_per_s']:.2f}x  1 thread per CPU s: pp {s1['pp_speedup_per_cpu_s']:.2f}x "
              f"tg {s1['tg_speedup_per_cpu_s']:.2f}x")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
