"""How closely jaxprune's forward reproduces transformers' on the real fixtures (SmolLM2-135M, Gemma 3 270M).

For each model, read from its GGUF by jaxprune (`load.load_model`, as every command reads it) and from the dequantised HF dir by transformers (both fp32, same
weights): the largest |logit difference| and the largest |logit| on --windows windows of --seq-len held-out tokens,
both perplexities and their relative difference, and whether --greedy greedy tokens after a 12-token prompt agree.
The README's parity figures come from the JSON this writes.

    python scripts/bench_parity.py [--models smollm2,gemma3] [--out benchmarks/parity.json]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402


def nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
    """Σ next-token negative log-likelihood of ``ids`` [T] under ``logits`` [T, V] (float64)."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def parity(name: str, gguf: Path, hf_dir: Path, text: str, seq_len: int, windows: int, greedy: int) -> dict:
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from jaxprune.evaluate import tokenize_text
    from jaxprune.generate import generate
    from jaxprune.hf import load_tokenizer
    from jaxprune.load import load_model

    model = load_model(gguf)  # what every command reads a GGUF with
    cfg = model.config
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = tokenize_text(load_tokenizer(hf_dir), text)[: windows * seq_len].reshape(windows, seq_len)
    max_diff = max_logit = 0.0
    nll_ours = nll_ref = 0.0
    for w in tokens:  # one window at a time: seq_len x 262k fp32 logits are large
        ours = np.asarray(model(jnp.asarray(w[None]))[0], np.float32)
        with torch.no_grad():
            want = ref(torch.as_tensor(w[None]).long()).logits[0].float().numpy()
        max_diff = max(max_diff, float(np.abs(ours - want).max()))
        max_logit = max(max_logit, float(np.abs(want).max()))
        nll_ours, nll_ref = nll_ours + nll_sum(ours, w), nll_ref + nll_sum(want, w)
    n = windows * (seq_len - 1)
    ppl_ours, ppl_ref = float(np.exp(nll_ours / n)), float(np.exp(nll_ref / n))
    prompt = tokens[0, :12].tolist()
    with torch.no_grad():
        want_tokens = ref.generate(torch.tensor([prompt]), max_new_tokens=greedy, min_new_tokens=greedy,
                                   do_sample=False)[0, 12:].tolist()
    got_tokens = np.asarray(generate(model, prompt, max_new_tokens=greedy)).tolist()
    same = sum(int(a == b) for a, b in zip(got_tokens, want_tokens))
    row = {"model": name, "model_type": cfg.model_type, "params": cfg.num_params(), "seq_len": seq_len,
           "windows": windows, "max_abs_logit_diff": max_diff, "max_abs_logit": max_logit,
           "max_abs_logit_diff_relative": max_diff / max_logit, "ppl_jaxprune": ppl_ours, "ppl_transformers": ppl_ref,
           "ppl_relative_diff": abs(ppl_ours / ppl_ref - 1), "greedy_tokens": greedy, "greedy_equal": same}
    print(f"[parity] {name}: max |dlogit| {max_diff:.2e} (logits up to {max_logit:.1f}), perplexity "
          f"{ppl_ours:.4f} vs {ppl_ref:.4f} (rel. {row['ppl_relative_diff']:.1e}), greedy {same}/{greedy}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--seq-len", type=int, default=640, help="640 > Gemma 3's 512-token sliding window")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--greedy", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "parity.json"))
    a = ap.parse_args()

    import jax
    import transformers

    from jaxprune.fixtures import fixture_paths

    paths = fixture_paths()
    sources = {"smollm2": (paths.gguf, paths.hf_dir), "gemma3": (paths.gemma3_gguf, paths.gemma3_hf_dir)}
    text = paths.play_text.read_text()
    rows = [parity(m, *sources[m], text, a.seq_len, a.windows, a.greedy) for m in a.models.split(",")]
    write_json_atomic(a.out, {
        "benchmark": "parity", "results": rows, "text": paths.play_text.name,
        "command": "python scripts/bench_parity.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
                    "transformers": transformers.__version__}})
    print(f"[parity] wrote {a.out}")


if __name__ == "__main__":
    main()
