"""What the pruned SmolLM2-135M weighs and how fast it runs once it leaves jaxprune (issue 15).

Prunes SmolLM2-135M with LoRAPrune at ratio 0.5 (same tokens, schedule and seed for every row) in
three layouts:
  layerwise        the papers' protocol: layers < int(0.1·L) and the last stay at full width
  uniform          every layer pruned to the same widths (`prune`'s default)
  uniform-matched  uniform, at the ratio whose parameter count is closest to layerwise's
then measures held-out perplexity, exports each to every format that holds it (stock HF, padded HF,
GGUF f32, vLLM DeciLM), records the file bytes, and times stock transformers (torch fp32) on each HF
export against the dense model in the same process, back to back.

    python scripts/bench_export.py [--steps 60] [--eval-tokens 8192]
Writes benchmarks/export.json (after every row, atomically).
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


def matched_uniform_ratio(cfg, target_params: int, unit: str) -> float:
    """The uniform ratio (on a 1/1000 grid) whose pruned parameter count is closest to ``target_params``."""
    L, units = cfg.num_layers, cfg.num_kv_heads if unit == "kv_group" else cfg.num_heads

    def params(r):
        kv_kept = cfg.num_kv_heads - int(r * units) if unit == "kv_group" else cfg.num_kv_heads
        heads = kv_kept * (cfg.num_heads // cfg.num_kv_heads) if unit == "kv_group" else cfg.num_heads - int(r * units)
        m = cfg.intermediate_size - int(r * cfg.intermediate_size)
        return cfg.with_layer_widths([heads] * L, [kv_kept] * L, [m] * L).num_params()
    return min((abs(params(r / 1000) - target_params), r / 1000) for r in range(0, 1000))[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--attn-unit", default="kv_group")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "export.json"))
    a = ap.parse_args()

    from jaxprune import gguf_io, hf, load
    from jaxprune.cli import build_parser
    from jaxprune.evaluate import perplexity, tokenize_text, torch_forward_speedup
    from jaxprune.fixtures import fixture_paths

    paths = fixture_paths()
    dense = load.load_model(paths.hf_dir)
    tok = load.load_tokenizer(paths.hf_dir)
    heldout = tokenize_text(tok, paths.heldout_text.read_text())
    dense_ppl = perplexity(dense, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens, progress=False)["ppl"]
    mb = lambda d: sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))  # noqa: E731
    result = {"benchmark": "export", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "budget": {"method": "loraprune", "attn_unit": a.attn_unit, "steps": a.steps, "seq_len": 128,
                         "batch_size": 4, "eval_tokens": a.eval_tokens, "seed": a.seed},
              "dense": {"ppl": dense_ppl, "params": dense.config.num_params(), "hf_bytes": mb(paths.hf_dir)},
              "results": []}
    out = Path(a.out)
    layouts = [("layerwise", "layerwise", a.ratio), ("uniform", "uniform", a.ratio),
               ("uniform-matched", "uniform", None)]
    for name, widths, ratio in layouts:
        if ratio is None:
            target = next(r["params"] for r in result["results"] if r["layout"] == "layerwise")
            ratio = matched_uniform_ratio(dense.config, target, a.attn_unit)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            argv = ["prune", str(paths.hf_dir), "--method", "loraprune", "--attn-unit", a.attn_unit,
                    "--ratio", str(ratio), "--widths", widths, "--text", str(paths.train_text),
                    "--steps", str(a.steps), "--seq-len", "128", "--batch-size", "4", "--lr", "3e-4",
                    "--seed", str(a.seed), "--save-every", str(a.steps), "--val-every", "0",
                    "--out", str(tmp / "run"), "--json", "--no-progress"]
            t = time.time()
            args = build_parser().parse_args(argv)
            summary = args.fn(args)
            wall = time.time() - t
            model = load.load_model(tmp / "run" / "model")
            ppl = perplexity(model, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens,
                             progress=False)["ppl"]
            uniform = model.config.is_uniform
            hf_dir = hf.export_hf(model, tmp / "hf", tokenizer=tok, pad=not uniform)
            gguf = gguf_io.export_gguf(model, tmp / "m.gguf", tokenizer=tok, outtype="f32")
            vllm = hf.export_vllm(model, tmp / "vllm")
            speedup, tps, dense_tps = torch_forward_speedup(hf_dir, paths.hf_dir, batch_size=4, seq_len=256)
            row = {"layout": name, "ratio": ratio, "ppl": ppl, "params": summary["params_after"],
                   "uniform": uniform, "hf_bytes": mb(hf_dir), "hf_padded": not uniform,
                   "gguf_f32_bytes": gguf["bytes"], "gguf_arch": gguf["arch"], "vllm_bytes": mb(vllm),
                   "transformers_tokens_per_s": tps, "transformers_dense_tokens_per_s": dense_tps,
                   "transformers_speedup": speedup, "wall_s": wall}
        result["results"].append(row)
        write_json_atomic(out, result)
        print(f"{name:16s} ratio {ratio:.3f}: ppl {ppl:7.2f}  params {row['params']:,}  "
              f"HF {row['hf_bytes'] / 1e6:.0f} MB{' (padded)' if not uniform else ''}  "
              f"GGUF {row['gguf_f32_bytes'] / 1e6:.0f} MB  vLLM "
              f"{row['vllm_bytes'] / 1e6:.0f} MB  transformers {speedup:.2f}x dense  ({wall:.0f} s)", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
