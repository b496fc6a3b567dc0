"""Forward throughput: jaxprune (jitted JAX) vs transformers' torch model on SmolLM2-135M, fp32.

Both run in this one process on the same random token batch (default 4 x 256): warm-up runs
first (compilation included there), then the median of N timed runs, then `--rounds` back-to-back
pairs whose median time ratio is the number to trust when other work shares the machine. Writes
benchmarks/forward.json atomically (temp file + os.replace) with machine info.

    python scripts/bench_forward.py [--batch 4] [--seq-len 256] [--iters 5] [--warmup 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402


def timed(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="back-to-back (jaxprune, torch) pairs for the ratio")
    p.add_argument("--model", default=None, help="HF dir (default: the SmolLM2-135M fixture)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "forward.json"))
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from jaxprune.fixtures import fixture_paths
    from jaxprune.hf import load_hf_dir

    model_dir = Path(a.model) if a.model else fixture_paths().hf_dir
    if not (model_dir / "config.json").exists():
        print(f"bench_forward: error: {model_dir}: no HF model (run scripts/fixtures.py)", file=sys.stderr)
        return 2

    ours, cfg = load_hf_dir(model_dir, dtype=jnp.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(a.batch, a.seq_len), dtype=np.int32)

    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    x = jnp.asarray(tokens)
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state, x))
    compile_s = time.perf_counter() - t0
    jax_times = timed(lambda: jax.block_until_ready(fwd(state, x)), a.iters, a.warmup)

    xt = torch.as_tensor(tokens).long()

    def torch_fwd():
        with torch.inference_mode():
            return ref(xt).logits

    torch_times = timed(torch_fwd, a.iters, a.warmup)
    # back to back, so that load from other processes hits both alike: the ratio to trust on a shared machine
    pairs = [(timed(lambda: jax.block_until_ready(fwd(state, x)), 1, 0)[0], timed(torch_fwd, 1, 0)[0])
             for _ in range(a.rounds)]
    ratio_pairs = statistics.median(tt / tj for tj, tt in pairs)

    # same function: the two logits agree (guards against timing two different computations)
    with torch.inference_mode():
        diff = float(np.abs(np.asarray(fwd(state, x)) - ref(xt).logits.float().numpy()).max())

    n = a.batch * a.seq_len
    jax_tps = n / statistics.median(jax_times)
    torch_tps = n / statistics.median(torch_times)
    result = {
        "benchmark": "forward",
        "model": model_dir.name,
        "params": cfg.num_params(),
        "dtype": "float32",
        "batch": a.batch,
        "seq_len": a.seq_len,
        "iters": a.iters,
        "warmup": a.warmup,
        "jaxprune_tokens_per_s": round(jax_tps, 1),
        "torch_tokens_per_s": round(torch_tps, 1),
        "ratio_jaxprune_over_torch": round(jax_tps / torch_tps, 3),
        "ratio_back_to_back_median": round(ratio_pairs, 3),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jaxprune_times_s": [round(t, 4) for t in jax_times],
        "torch_times_s": [round(t, 4) for t in torch_times],
        "jaxprune_compile_s": round(compile_s, 2),
        "max_abs_logit_diff": diff,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__,
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/bench_forward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(a.out)
    write_json_atomic(out, result)
    print(f"forward {a.batch}x{a.seq_len} fp32 on {jax.default_backend()}: jaxprune {jax_tps:.0f} tokens/s, "
          f"torch {torch_tps:.0f} tokens/s, ratio {jax_tps / torch_tps:.2f}x, back-to-back {ratio_pairs:.2f}x "
          f"(max |logit diff| {diff:.2e})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
