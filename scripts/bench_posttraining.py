"""Post-training element-wise pruning on SmolLM2-135M: dense vs magnitude vs Wanda vs SparseGPT,
50% unstructured and 2:4, before and after sparsity-preserving LoRA recovery.

For each (pattern, method): load the dense model, prune every decoder linear (q, k, v, o, gate, up,
down) with `--calib-samples` × `--calib-len` calibration tokens from the training plays (sequential,
layer by layer; magnitude uses none), measure held-out perplexity (Hamlet, Macbeth, The Tempest;
seq-len 256, first `--eval-tokens` tokens), the pruning wall time and the peak memory XLA reports for
the compiled pruning passes (arguments + outputs + temporaries of the largest one); then
`finetune --keep-sparsity --merge` for `--recover-steps` LoRA steps on the training plays and
measure perplexity again (and that every zero survived the merge).

    python scripts/bench_posttraining.py
    python scripts/bench_posttraining.py --calib-samples 4 --recover-steps 0 --eval-tokens 2048   # smoke run
Writes benchmarks/posttraining.json (after every run, atomically).
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

PATTERNS = ("unstructured", "2:4")
METHODS = ("magnitude", "wanda", "sparsegpt")




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (2:4 is always 0.5)")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--recover-steps", type=int, default=100, help="LoRA recovery steps (0: skip recovery)")
    ap.add_argument("--recover-seq-len", type=int, default=256)
    ap.add_argument("--recover-batch-size", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "posttraining.json"))
    a = ap.parse_args()

    import jax

    from jaxprune import checkpoint, load
    from jaxprune.cli import main as cli_main
    from jaxprune.evaluate import perplexity, tokenize_text
    from jaxprune.fixtures import fixture_paths
    from jaxprune.prune.posttraining import calibration_tokens, parse_pattern, prune_model, sparsity_of

    paths = fixture_paths()
    tok = load.load_tokenizer(paths.hf_dir)
    heldout = tokenize_text(tok, paths.heldout_text.read_text())

    def ppl(model) -> float:
        return perplexity(model, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens, progress=False)["ppl"]

    dense_ppl = ppl(load.load_model(paths.hf_dir))
    print(f"dense: ppl {dense_ppl:.2f}", flush=True)
    calib = calibration_tokens(paths.train_text, tok, a.calib_samples, a.calib_len, seed=0)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "posttraining", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "device": str(jax.devices()[0])},
              "budget": {"calib_samples": a.calib_samples, "calib_len": a.calib_len,
                         "recover_steps": a.recover_steps, "recover_seq_len": a.recover_seq_len,
                         "recover_batch_size": a.recover_batch_size, "eval_tokens": a.eval_tokens,
                         "eval_seq_len": 256},
              "dense": {"ppl": dense_ppl}, "results": []}
    write_json_atomic(out, result)
    for pattern in a.patterns.split(","):
        nm = parse_pattern(pattern)
        sparsity = 1 - nm[0] / nm[1] if nm else a.sparsity
        for method in a.methods.split(","):
            model = load.load_model(paths.hf_dir)
            report = prune_model(model, None if method == "magnitude" else calib, method=method, sparsity=sparsity,
                                 nm=nm, batch_size=a.calib_batch, progress=False, measure_memory=True)
            row = {"method": method, "pattern": pattern, "sparsity": sparsity,
                   "sparsity_measured": report["sparsity_measured"], "ppl": ppl(model),
                   "prune_s": report["seconds"], "peak_compiled_bytes": report["peak_compiled_bytes"],
                   "damp_retries": report["damp_retries"]}
            if a.recover_steps > 0:
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt, run = Path(tmp) / "pruned", Path(tmp) / "run"
                    checkpoint.save_model(model, ckpt, tokenizer=tok)
                    t = time.time()
                    code = cli_main(["finetune", str(ckpt), "--text", str(paths.train_text), "--keep-sparsity",
                                     "--merge", "--steps", str(a.recover_steps), "--seq-len", str(a.recover_seq_len),
                                     "--batch-size", str(a.recover_batch_size), "--save-every", str(a.recover_steps),
                                     "--val-every", "0", "--out", str(run), "--no-progress"])
                    if code != 0:
                        raise SystemExit(f"recovery finetune failed for {method} {pattern}")
                    recovered = load.load_model(run)
                    row.update(ppl_recovered=ppl(recovered), recover_s=time.time() - t,
                               sparsity_after_recovery=sparsity_of(recovered))
            result["results"].append(row)
            write_json_atomic(out, result)
            rec = f"  recovered {row['ppl_recovered']:8.2f}" if "ppl_recovered" in row else ""
            print(f"{method:10s} {pattern:12s}: ppl {row['ppl']:8.2f}{rec}  sparsity {row['sparsity_measured']:.3f}  "
                  f"prune {row['prune_s']:.1f} s  peak {row['peak_compiled_bytes'] / 2**20:.1f} MiB", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
