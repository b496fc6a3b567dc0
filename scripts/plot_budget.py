"""Perplexity against parameters removed, every structured recipe of the budget benchmarks on one model (issue 31).

Reads the ``summary`` rows of ``bench_pruning.py`` JSONs (default: SmolLM2's ``benchmarks/budget_*.json``), one
point per recipe (method + spec options: widths, ratio), two panels: retraining-free (``recover-steps=0``) and
after the same LoRA recovery. Filled markers: uniform widths (a stock transformers model); open: per-layer widths.

    python scripts/plot_budget.py                                   # -> benchmarks/budget_frontier.png
    python scripts/plot_budget.py --inputs benchmarks/budget_gemma3_*.json --out benchmarks/budget_gemma3.png
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = ["budget_free.json", "budget_free2.json", "budget_recovered.json", "budget_seeds.json",
           "budget_slimgpt_free.json", "budget_slimgpt_recovered.json"]


def points(paths: list[Path]) -> tuple[list[dict], float | None]:
    """One entry per (recipe, retraining-free?) across ``paths``: the one with the most seeds wins."""
    best: dict = {}
    dense = None
    for p in paths:
        d = json.loads(p.read_text())
        dense = d.get("dense", {}).get("ppl", dense)
        for s in d.get("summary", []):
            free = "recover-steps=0" in s["method"]
            name = s["method"].replace("+recover-steps=0", "")
            uniform = "widths=uniform" in name  # bench_pruning.py passes --widths layerwise unless a spec says
            key = (name, free)
            if key not in best or len(s["seeds"]) > len(best[key]["seeds"]):
                best[key] = {**s, "name": name, "free": free, "uniform": uniform}
    return list(best.values()), dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", nargs="*", default=None, help="bench_pruning.py JSONs (default: SmolLM2's)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "budget_frontier.png"))
    a = ap.parse_args()
    paths = [Path(p) for x in a.inputs for p in glob.glob(x)] if a.inputs else \
        [REPO / "benchmarks" / n for n in SMOLLM2 if (REPO / "benchmarks" / n).exists()]
    if not paths:
        raise SystemExit("error: no benchmark JSON found (run scripts/bench_pruning.py first)")
    pts, dense = points(paths)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, free in zip(axes, (True, False)):
        for p in sorted((p for p in pts if p["free"] == free), key=lambda p: p["name"]):
            ax.errorbar(p["params_removed_fraction"], p["ppl_mean"], yerr=p["ppl_std"] or 0.0, capsize=3,
                        fmt="o", mfc=None if p["uniform"] else "none", label=p["name"])
        if dense:
            ax.axhline(dense, color="gray", ls="--", label="dense")
        ax.set_title("retraining-free" if free else "after equal LoRA recovery")
        ax.set_xlabel("fraction of all parameters removed")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("held-out perplexity (mean ± std over seeds)")
    fig.suptitle("filled: uniform widths (stock transformers); open: per-layer widths", fontsize=9)
    fig.tight_layout()
    out = Path(a.out)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    print(f"wrote {out} ({len(pts)} points from {len(paths)} files)")


if __name__ == "__main__":
    main()
