"""Compiled memory of the LoRAPrune step vs the LLM-Pruner importance step (no weights allocated).

Both steps are AOT-compiled on ``jax.ShapeDtypeStruct`` inputs and measured with
``compiled.memory_analysis()`` (arguments + temporaries + outputs; deterministic).

* LoRAPrune step: forward + backward w.r.t. the LoRA factors, the LoRA-guided importance
  moving average and the AdamW update, in one jit.
* LLM-Pruner step, two variants:
  - ``materialised``: returns ∂L/∂W for every base weight, as the official PyTorch code holds
    every ``.grad`` at once before scoring;
  - ``fused``: returns only unit scores, so XLA may free each layer's gradient after scoring it
    (what a JAX port of LLM-Pruner would do at best).

    python scripts/bench_pruning_memory.py [--models smollm2,llama7b] [--batch 1 --seq 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxprune.config import ModelConfig  # noqa: E402
from jaxprune.fileio import write_json_atomic  # noqa: E402
from jaxprune.model import LlamaForCausalLM  # noqa: E402
from jaxprune.partition import add_lora, partition  # noqa: E402
from jaxprune.prune.cli import taylor_importance_step  # noqa: E402
from jaxprune.prune.loraprune import importance_hook, init_importance  # noqa: E402
from jaxprune.train import OptimConfig, make_loss_fn, make_optimizer, make_train_step  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                     num_kv_heads=32, head_dim=128, tie_word_embeddings=False),
}


def abstract_pytrees(cfg: ModelConfig, dtype, rank: int, remat: bool):
    def build():
        m = LlamaForCausalLM(cfg, dtype=dtype)
        m.remat = remat
        add_lora(m, rank=rank, alpha=2 * rank)
        return m
    return partition(nnx.eval_shape(build))


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def measure(name: str, dtype, batch: int, seq: int, rank: int, remat: bool) -> dict:
    cfg = ModelConfig(**SHAPES[name], max_position_embeddings=4096)
    graphdef, frozen, trainable, masks = abstract_pytrees(cfg, dtype, rank, remat)
    tokens = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
    opt = make_optimizer(OptimConfig())
    opt_state = jax.eval_shape(opt.init, trainable)
    unit = "q_head"
    hook_state = jax.eval_shape(lambda: init_importance(cfg, unit))
    res = {"model": name, "base_dtype": str(jnp.dtype(dtype)), "batch": batch, "seq_len": seq, "lora_rank": rank,
           "remat": remat, "base_params": cfg.num_params()}

    t = time.time()
    step = make_train_step(graphdef, opt, grad_hook=importance_hook(cfg, unit, 2.0), donate=True)
    res["loraprune"] = memory(step.lower(trainable, opt_state, hook_state, frozen, masks, tokens,
                                         jax.ShapeDtypeStruct((), jnp.int32)).compile())
    calib = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    res["llm_pruner_fused"] = memory(taylor_importance_step(graphdef, cfg, unit).lower(
        frozen, trainable, masks, calib).compile())
    loss_fn = make_loss_fn(graphdef)
    grads_step = jax.jit(lambda fr, tr, mk, b: jax.grad(lambda f: loss_fn(tr, f, mk, b)[0])(fr))
    res["llm_pruner_materialised"] = memory(grads_step.lower(frozen, trainable, masks, calib).compile())
    res["compile_s"] = time.time() - t
    for k in ("llm_pruner_materialised", "llm_pruner_fused"):
        res[f"ratio_vs_{k}"] = res["loraprune"]["total_bytes"] / res[k]["total_bytes"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--remat", default="off,on", help="per-layer rematerialisation settings to measure")
    ap.add_argument("--llama-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="base dtype of the LLaMA-7B shape (XLA:CPU upcasts bf16 dots to f32, which inflates "
                         "temporaries on CPU; float32 avoids that distortion)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "pruning_memory.json"))
    a = ap.parse_args()
    rows = []
    settings = [(name, remat == "on") for name in a.models.split(",") for remat in a.remat.split(",")]
    for name, remat in settings:
        dtype = jnp.float32 if name.startswith("smollm2") else jnp.dtype(a.llama_dtype)
        r = measure(name, dtype, a.batch, a.seq, a.rank, remat)
        rows.append(r)
        gib = lambda b: b / 2**30  # noqa: E731
        print(f"{name} ({r['base_dtype']} base, remat {'on' if remat else 'off'}, batch {a.batch} x {a.seq}): "
              f"LoRAPrune step {gib(r['loraprune']['total_bytes']):.2f} GiB; LLM-Pruner step materialised "
              f"{gib(r['llm_pruner_materialised']['total_bytes']):.2f} GiB (ratio "
              f"{r['ratio_vs_llm_pruner_materialised']:.2f}), fused {gib(r['llm_pruner_fused']['total_bytes']):.2f}"
              f" GiB (ratio {r['ratio_vs_llm_pruner_fused']:.2f})", flush=True)
    out = {"benchmark": "pruning_memory", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                      "jax": jax.__version__, "backend": jax.default_backend()},
           "results": rows}
    write_json_atomic(a.out, out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
