"""Held-out perplexity of SmolLM2-135M with its decoder linears as an int8 base vs float.

The int8 base is what ``--quantize-base int8`` trains on (``jaxprune/quantize.py``: one int8 per
weight, one fp32 scale per output channel). Both models see the same held-out tokens.

    python scripts/bench_int8_base.py [--eval-tokens 8192] [--seq-len 256]
Writes benchmarks/int8_base.json atomically.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "int8_base.json"))
    a = ap.parse_args()

    from flax import nnx

    from jaxprune import load
    from jaxprune.evaluate import perplexity, tokenize_text
    from jaxprune.fixtures import fixture_paths
    from jaxprune.partition import tree_bytes
    from jaxprune.quantize import quantize_base

    paths = fixture_paths()
    heldout = tokenize_text(load.load_tokenizer(paths.hf_dir), paths.heldout_text.read_text())
    model = load.load_model(paths.hf_dir)
    rows = []
    for base in ("float32", "int8"):
        if base == "int8":
            quantize_base(model)
        ppl = perplexity(model, heldout, seq_len=a.seq_len, batch_size=4, max_tokens=a.eval_tokens,
                         progress=False)["ppl"]
        rows.append({"base": base, "ppl": ppl, "param_bytes": tree_bytes(nnx.state(model, nnx.Param))})
        print(f"{base:8s} held-out ppl {ppl:.2f}  parameter bytes {rows[-1]['param_bytes']:,}", flush=True)
    write_json_atomic(a.out, {"benchmark": "int8_base", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
                              "eval_tokens": a.eval_tokens, "seq_len": a.seq_len,
                              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                              "results": rows})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
