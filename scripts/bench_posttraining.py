"""Post-training element-wise pruning on SmolLM2-135M: dense vs magnitude vs Wanda vs SparseGPT,
50% unstructured and 2:4, before and after sparsity-preserving LoRA recovery.

For each (pattern, method): load the dense model, prune every decoder linear (q, k, v, o, gate, up,
down) of every layer (the papers' protocol: no layer excluded) with `--calib-samples` × `--calib-len`
calibration tokens from the training plays (sequential, layer by layer; magnitude uses none), measure
held-out perplexity (Hamlet, Macbeth, The Tempest; seq-len 256, first `--eval-tokens` tokens), the
pruning wall time and the peak memory XLA reports for the compiled pruning passes (arguments + outputs
+ temporaries of the largest one); then `finetune --keep-sparsity --merge` for `--recover-steps` LoRA
steps on the training plays, measure perplexity again and check that the merged model's zeros are
exactly the pruning masks' zeros. The dense model gets the same LoRA fine-tuning as a control (the
training plays are in-domain for the held-out plays, so LoRA lowers the dense perplexity too).
With `--distill`, magnitude and Wanda models are also recovered by `finetune --keep-sparsity --distill`
(KL to the unpruned model mixed with the LM loss, same steps and tokens; SparseGPT is refused there).

    python scripts/bench_posttraining.py
    python scripts/bench_posttraining.py --calib-samples 4 --recover-steps 0 --eval-tokens 2048   # smoke run
    python scripts/bench_posttraining.py --plot-only     # redraw benchmarks/posttraining.png from the JSON
    python scripts/bench_posttraining.py --methods magnitude,wanda --distill --out benchmarks/posttraining_distill.json
Writes benchmarks/posttraining.json (after every run, atomically) and benchmarks/posttraining.png.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402
from jaxprune.prune.registry import ELEMENTWISE  # noqa: E402

PATTERNS = ("unstructured", "2:4")
METHODS = ELEMENTWISE.names()
COLORS = {"magnitude": "tab:red", "wanda": "tab:blue", "sparsegpt": "tab:green"}  # others: matplotlib's cycle


def plot(result: dict, path: Path) -> None:
    """Held-out perplexity per pattern and method: pruned (light) and after LoRA recovery (dark); log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / max(1, len(methods))
    for mi, method in enumerate(methods):
        for pi, pattern in enumerate(patterns):
            r = next((r for r in rows if r["method"] == method and r["pattern"] == pattern), None)
            if r is None:
                continue
            x = pi + (mi - (len(methods) - 1) / 2) * width
            c = COLORS.get(method, "gray")
            ax.bar(x, r["ppl"], width * 0.9, color=c, alpha=0.35, label=f"{method} pruned" if pi == 0 else None)
            text = f"{r['ppl']:.0f}"
            if "ppl_recovered" in r:
                ax.bar(x, r["ppl_recovered"], width * 0.5, color=c,
                       label=f"{method} + LoRA recovery" if pi == 0 else None)
                text += f"\n→{r['ppl_recovered']:.0f}"
            ax.text(x, r["ppl"] * 1.03, text, ha="center", va="bottom", fontsize=6)
    dense = result["dense"]
    ax.axhline(dense["ppl"], color="black", ls="--", lw=1, label=f"dense {dense['ppl']:.1f}")
    if "ppl_recovered" in dense:
        ax.axhline(dense["ppl_recovered"], color="black", ls=":", lw=1,
                   label=f"dense + same LoRA {dense['ppl_recovered']:.1f}")
    sparsity = {r["pattern"]: r["sparsity"] for r in rows}
    ax.set_xticks(range(len(patterns)), [f"{p} {sparsity[p]:.0%}" if p == "unstructured" else f"{p} (50%)"
                                         for p in patterns])
    vals = [v for r in rows for v in (r["ppl"], r.get("ppl_recovered")) if v] + [dense["ppl"]]
    ax.set_ylim(min(vals) / 1.3, max(vals) * 2.5)  # room for the labels above the bars
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M, one-shot element-wise pruning", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def zeros_are_masks(pruned, recovered) -> bool:
    """Every decoder linear of ``recovered`` has the same mask as ``pruned`` and zeros exactly at its 0s."""
    import numpy as np

    from jaxprune.prune.posttraining import LINEARS

    for lp, lr in zip(pruned.layers, recovered.layers):
        for mod, attr in LINEARS:
            a, b = getattr(getattr(lp, mod), attr), getattr(getattr(lr, mod), attr)
            keep = np.asarray(a.weight_mask[...])
            if b.weight_mask is None or not np.array_equal(np.asarray(b.weight_mask[...]), keep):
                return False
            if not np.array_equal(np.asarray(b.kernel[...]) == 0, ~keep):
                return False
    return True


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
    ap.add_argument("--no-dense-recovery", dest="dense_recovery", action="store_false",
                    help="skip the dense model's LoRA fine-tuning control")
    ap.add_argument("--distill", action="store_true",
                    help="also recover magnitude / Wanda models with `finetune --distill` (teacher: the dense model)")
    ap.add_argument("--distill-alpha", type=float, default=0.5, help="--distill: weight of the KL term")
    ap.add_argument("--base", default=None,
                    help="the dense model to prune (and the --distill teacher); default: SmolLM2 as shipped. E.g. "
                         "the teacher-corrected model bench_pruning.py --teacher-correction caches")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. why the budget was reduced)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "posttraining.json"))
    ap.add_argument("--plot-only", action="store_true", help="only redraw the PNG from the existing --out JSON")
    a = ap.parse_args()
    t_start = time.time()
    if a.plot_only:
        import json
        plot(json.loads(Path(a.out).read_text()), Path(a.out).with_suffix(".png"))
        return

    import jax

    from jaxprune import checkpoint, load
    from jaxprune.cli import main as cli_main
    from jaxprune.evaluate import perplexity, tokenize_text
    from jaxprune.fixtures import fixture_paths
    from jaxprune.prune.posttraining import calibration_tokens, prune_model, sparsity_of
    from jaxprune.prune.select import parse_pattern

    paths = fixture_paths()
    tok = load.load_tokenizer(paths.hf_dir)
    base = Path(a.base) if a.base else paths.hf_dir
    heldout = tokenize_text(tok, paths.heldout_text.read_text())

    def ppl(model) -> float:
        return perplexity(model, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens, progress=False)["ppl"]

    def recover(model, keep_sparsity: bool, distill: bool = False):
        """LoRA fine-tuning (+ merge) of ``model`` (``distill``: from the dense model); (merged model, seconds)."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, run = Path(tmp) / "pruned", Path(tmp) / "run"
            checkpoint.save_model(model, ckpt, tokenizer=tok)
            t = time.time()
            code = cli_main(["finetune", str(ckpt), "--text", str(paths.train_text),
                             *(["--keep-sparsity"] if keep_sparsity else []),
                             *(["--distill", "--teacher", str(base), "--distill-alpha", str(a.distill_alpha)]
                               if distill else []),
                             "--merge", "--steps", str(a.recover_steps), "--seq-len", str(a.recover_seq_len),
                             "--batch-size", str(a.recover_batch_size), "--save-every", str(a.recover_steps),
                             "--val-every", "0", "--out", str(run), "--no-progress"])
            if code != 0:
                raise SystemExit("recovery finetune failed")
            return load.load_model(run), time.time() - t

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "posttraining", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
              "command": "python scripts/bench_posttraining.py " + shlex.join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "device": str(jax.devices()[0]), "loadavg_start": os.getloadavg()[0]},
              "budget": {"calib_samples": a.calib_samples, "calib_len": a.calib_len,
                         "recover_steps": a.recover_steps, "recover_seq_len": a.recover_seq_len,
                         "recover_batch_size": a.recover_batch_size, "eval_tokens": a.eval_tokens,
                         "eval_seq_len": 256, "distill_alpha": a.distill_alpha if a.distill else None,
                         "base": str(base)},
              "note": a.note, "dense": {}, "results": []}

    def save():
        result["wall_s"] = time.time() - t_start
        result["machine"]["loadavg_end"] = os.getloadavg()[0]
        write_json_atomic(out, result)
        plot(result, out.with_suffix(".png"))

    dense = load.load_model(base)
    result["dense"]["ppl"] = ppl(dense)
    save()
    print(f"dense: ppl {result['dense']['ppl']:.2f}", flush=True)
    if a.recover_steps > 0 and a.dense_recovery:
        recovered, secs = recover(dense, keep_sparsity=False)
        result["dense"].update(ppl_recovered=ppl(recovered), recover_s=secs)
        save()
        print(f"dense + LoRA: ppl {result['dense']['ppl_recovered']:.2f} ({secs:.0f} s)", flush=True)
    del dense
    calib = calibration_tokens(paths.train_text, tok, a.calib_samples, a.calib_len, seed=0)
    for pattern in a.patterns.split(","):
        nm = parse_pattern(pattern)
        sparsity = 1 - nm[0] / nm[1] if nm else a.sparsity
        for method in a.methods.split(","):
            model = load.load_model(base)
            report = prune_model(model, None if method == "magnitude" else calib, method=method, sparsity=sparsity,
                                 nm=nm, batch_size=a.calib_batch, progress=False, measure_memory=True)
            row = {"method": method, "pattern": pattern, "sparsity": sparsity,
                   "sparsity_measured": report["sparsity_measured"], "ppl": ppl(model),
                   "prune_s": report["seconds"], "peak_compiled_bytes": report["peak_compiled_bytes"],
                   "damp_retries": report["damp_retries"],
                   "calib_tokens": 0 if method == "magnitude" else int(calib.size),
                   "loadavg": os.getloadavg()[0]}
            if a.recover_steps > 0:
                recovered, secs = recover(model, keep_sparsity=True)
                row.update(ppl_recovered=ppl(recovered), recover_s=secs,
                           sparsity_after_recovery=sparsity_of(recovered),
                           zeros_are_masks=zeros_are_masks(model, recovered))
                if a.distill and method != "sparsegpt":
                    distilled, secs = recover(model, keep_sparsity=True, distill=True)
                    row.update(ppl_recovered_distill=ppl(distilled), recover_distill_s=secs,
                               zeros_are_masks_distill=zeros_are_masks(model, distilled))
            result["results"].append(row)
            save()
            rec = (f"  recovered {row['ppl_recovered']:8.2f} (zeros kept: {row['zeros_are_masks']})"
                   if "ppl_recovered" in row else "")
            rec += (f"  distilled {row['ppl_recovered_distill']:8.2f} (zeros kept: {row['zeros_are_masks_distill']})"
                    if "ppl_recovered_distill" in row else "")
            print(f"{method:10s} {pattern:12s}: ppl {row['ppl']:8.2f}{rec}  sparsity {row['sparsity_measured']:.3f}  "
                  f"prune {row['prune_s']:.1f} s  peak {row['peak_compiled_bytes'] / 2**20:.1f} MiB", flush=True)
    print(f"wrote {out} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
