"""Model FLOP utilisation of the LoRAPrune step on this machine.

Peak: the best FLOP/s of a large square fp32 ``jnp.dot`` (jitted, median of runs) at a few sizes:
what this backend's matmul reaches here, the ceiling for a step that is all matmuls.

Step: the jitted LoRAPrune train step on the SmolLM2-135M shape (random weights; speed does not depend
on their values): forward, backward w.r.t. the LoRA factors, the importance EMA and AdamW. Its model
FLOPs per step, counted from the shapes (the frozen base needs no weight gradient):

    forward   2·P·T + 2·L·B·H·D·S²      (P: matmul parameters incl. lm_head; T = B·S tokens; causal
                                         attention: scores and probs·V at half of S×S each)
    backward  input gradients only: the forward's FLOPs again (LoRA's own terms are negligible)

so model FLOPs ≈ 2 × forward. MFU = model FLOPs / step time / peak. XLA's own count
(``compiled.cost_analysis()['flops']``) is reported beside it.

    python scripts/bench_mfu.py [--batch 4 --seq-len 128 --steps 5]
Writes benchmarks/mfu.json.
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


def median_time(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(sizes, iters: int, dtype) -> dict:
    import jax

    out = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        dot = jax.jit(lambda x, y: x @ y)
        t = median_time(lambda: jax.block_until_ready(dot(a, b)), iters)
        out[n] = 2 * n ** 3 / t
    return out


def model_flops(cfg, batch: int, seq: int) -> float:
    """2 × (forward matmul FLOPs + causal attention FLOPs) for one step of batch x seq tokens."""
    tokens = batch * seq
    per_layer = 0
    for i in range(cfg.num_layers):
        q, kv = cfg.heads(i) * cfg.head_dim, cfg.kv_heads(i) * cfg.head_dim
        per_layer += 2 * tokens * (2 * cfg.hidden_size * q + 2 * cfg.hidden_size * kv
                                   + 3 * cfg.hidden_size * cfg.mlp_width(i))
        per_layer += 2 * 2 * batch * cfg.heads(i) * cfg.head_dim * seq * seq / 2  # scores + probs·V, causal half
    head = 2 * tokens * cfg.hidden_size * cfg.vocab_size
    return 2 * (per_layer + head)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--sizes", default="1024,2048,3072", help="square matmul sizes for the peak")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights, activations and the peak's matmul (bfloat16: the GPU/TPU row)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "mfu.json"))
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_pruning_memory import SHAPES
    from jaxprune.config import ModelConfig
    from jaxprune.model import LlamaForCausalLM
    from jaxprune.partition import add_lora, partition
    from jaxprune.prune.loraprune import importance_hook, init_importance
    from jaxprune.train import OptimConfig, make_optimizer, make_train_step

    dtype = jnp.dtype(a.dtype)
    peaks = matmul_peak([int(s) for s in a.sizes.split(",")], iters=5, dtype=dtype)
    peak = max(peaks.values())
    print("matmul peak: " + ", ".join(f"{n}: {f / 1e9:.1f} GFLOP/s" for n, f in peaks.items()), flush=True)

    cfg = ModelConfig(**SHAPES["smollm2-135m"], max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    model.remat = a.remat
    add_lora(model, rank=8, alpha=16)
    graphdef, frozen, trainable, masks = partition(model)
    opt = make_optimizer(OptimConfig())
    opt_state = opt.init(trainable)
    hook_state = init_importance(cfg, "kv_group")
    step = make_train_step(graphdef, opt, grad_hook=importance_hook(cfg, "kv_group", 2.0), donate=False)
    tokens = jax.random.randint(jax.random.key(0), (1, a.batch, a.seq_len), 0, cfg.vocab_size)
    args = (trainable, opt_state, hook_state, frozen, masks, tokens, jnp.int32(0))
    xla_flops = float(step.lower(*args).compile().cost_analysis().get("flops", float("nan")))
    t = median_time(lambda: jax.block_until_ready(step(*args)), a.steps)
    flops = model_flops(cfg, a.batch, a.seq_len)
    result = {
        "benchmark": "mfu", "model_shape": "SmolLM2-135M (random weights)", "step": f"LoRAPrune ({a.dtype}, rank 8)",
        "batch": a.batch, "seq_len": a.seq_len, "remat": a.remat, "dtype": a.dtype,
        "matmul_peak_flops": {str(n): f for n, f in peaks.items()}, "peak_flops": peak,
        "step_s": t, "tokens_per_s": a.batch * a.seq_len / t,
        "model_flops_per_step": flops, "xla_flops_per_step": xla_flops,
        "achieved_model_flops": flops / t, "mfu": flops / t / peak,
        "achieved_xla_flops": xla_flops / t, "xla_flops_utilisation": xla_flops / t / peak,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "loadavg": os.getloadavg()[0],
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/bench_mfu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json_atomic(Path(a.out), result)
    print(f"LoRAPrune step {a.batch}x{a.seq_len}: {t:.3f} s, model {flops / 1e9:.1f} GFLOP "
          f"({flops / t / 1e9:.1f} GFLOP/s, MFU {flops / t / peak:.1%}); XLA counts {xla_flops / 1e9:.1f} GFLOP "
          f"({xla_flops / t / peak:.1%} of peak)")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
