"""RUN_DIR/loss.png from RUN_DIR/metrics.jsonl (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def plot_metrics(run_dir: Path) -> Path | None:
    """loss (and validation perplexity) against step, as RUN_DIR/loss.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train loss")
    val = [(r["step"], math.log(r["val_ppl"])) for r in recs if "val_ppl" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="val NLL")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
