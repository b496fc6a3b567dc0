"""Compiled memory of the LoRAPrune step vs the LLM-Pruner importance step (no weights allocated).

Every step is AOT-compiled on ``jax.ShapeDtypeStruct`` inputs and measured with
``compiled.memory_analysis()`` (arguments + temporaries + outputs − aliased; deterministic).

* ``loraprune``: forward + backward w.r.t. the LoRA factors, the LoRA-guided importance moving
  average and the AdamW update, in one jit. Its base may be float or int8 (``--quantize-base int8``:
  one int8 per weight + one fp32 scale per output channel, as the official code's ``load_in_8bit``).
* ``llm_pruner_materialised``: returns ∂L/∂W for every base weight, as the official PyTorch code
  holds every ``.grad`` at once before scoring (its reference configuration: float base, no remat);
* ``llm_pruner_fused``: returns only unit scores, so XLA may free each layer's gradient after
  scoring it (what a JAX port of LLM-Pruner would do at best).

LLM-Pruner differentiates the base, so it cannot use an int8 base. ``remat`` rematerialises each
decoder layer in the backward pass (either method may use it).

    python scripts/bench_pruning_memory.py [--models smollm2-135m,llama-7b] [--batch 1 --seq 512]
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
from jaxprune.prune.llm_pruner import taylor_importance_step  # noqa: E402
from jaxprune.prune.loraprune import importance_hook, init_importance  # noqa: E402
from jaxprune.quantize import quantize_base  # noqa: E402
from jaxprune.train import OptimConfig, make_loss_fn, make_optimizer, make_train_step  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                     num_kv_heads=32, head_dim=128, tie_word_embeddings=False),
}


def abstract_pytrees(cfg: ModelConfig, dtype, rank: int, remat: bool, quantized: bool):
    def build():
        m = LlamaForCausalLM(cfg, dtype=dtype)
        m.remat = remat
        if quantized:
            quantize_base(m)
        add_lora(m, rank=rank, alpha=2 * rank)
        return m
    return partition(nnx.eval_shape(build))


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def compile_step(step: str, cfg: ModelConfig, dtype, batch: int, seq: int, rank: int, remat: bool,
                 quantized: bool, unit: str = "q_head", chunk: int | None = None):
    """The compiled ``step`` ('loraprune', 'llm_pruner_materialised', 'llm_pruner_fused'); ``chunk``: the fused
    step's sequences per pass."""
    graphdef, frozen, trainable, masks = abstract_pytrees(cfg, dtype, rank, remat, quantized)
    if step == "loraprune":
        tokens = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
        opt = make_optimizer(OptimConfig())
        opt_state = jax.eval_shape(opt.init, trainable)
        hook_state = jax.eval_shape(lambda: init_importance(cfg, unit))
        fn = make_train_step(graphdef, opt, grad_hook=importance_hook(cfg, unit, 2.0), donate=True)
        return fn.lower(trainable, opt_state, hook_state, frozen, masks, tokens,
                        jax.ShapeDtypeStruct((), jnp.int32)).compile()
    calib = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    if step == "llm_pruner_fused":
        return taylor_importance_step(graphdef, cfg, unit, chunk).lower(frozen, trainable, masks, calib).compile()
    loss_fn = make_loss_fn(graphdef)
    grads_step = jax.jit(lambda fr, tr, mk, b: jax.grad(lambda f: loss_fn(tr, f, mk, b)[0])(fr))
    return grads_step.lower(frozen, trainable, masks, calib).compile()


def parse_variant(text: str) -> tuple[str, str, bool]:
    """'loraprune:int8:remat' -> (step, base, remat); base is 'float' or 'int8'."""
    step, base, remat = (text.split(":") + ["", ""])[:3]
    if step not in STEPS or base not in ("float", "int8") or remat not in ("remat", "noremat"):
        sys.exit(f"--variants {text!r}: expected STEP:{{float,int8}}:{{remat,noremat}}, STEP one of "
                 f"{', '.join(STEPS)}")
    if base == "int8" and step != "loraprune":
        sys.exit(f"--variants {text!r}: LLM-Pruner differentiates the base, so it has no int8 variant")
    return step, base, remat == "remat"


STEPS = ("loraprune", "llm_pruner_materialised", "llm_pruner_fused")
REFERENCE = ("llm_pruner_materialised", "float", False)  # the official LLM-Pruner: every .grad held, no remat
DEFAULT_VARIANTS = ("llm_pruner_materialised:float:noremat,llm_pruner_materialised:float:remat,"
                    "llm_pruner_fused:float:remat,loraprune:float:noremat,loraprune:float:remat,"
                    "loraprune:int8:remat")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma-separated STEP:BASE:REMAT, BASE float|int8, REMAT remat|noremat")
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                    help="float dtype of the base and activations. The paper's runs are fp16 on GPU; on CPU keep "
                         "float32: XLA:CPU upcasts bf16 dots to f32 and keeps those copies, which inflates bf16 "
                         "temporaries by a float32 copy of the weights")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "pruning_memory.json"))
    a = ap.parse_args()
    variants = [parse_variant(v) for v in a.variants.split(",")]
    if REFERENCE not in variants:
        variants.insert(0, REFERENCE)
    dtype = jnp.dtype(a.dtype)
    out = {"benchmark": "pruning_memory", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                      "jax": jax.__version__, "backend": jax.default_backend()},
           "dtype": str(dtype), "batch": a.batch, "seq_len": a.seq, "lora_rank": a.rank, "results": []}
    gib = lambda b: b / 2**30  # noqa: E731
    for name in a.models.split(","):
        cfg = ModelConfig(**SHAPES[name], max_position_embeddings=4096)
        rows = []
        for step, base, remat in variants:
            t = time.time()
            mem = memory(compile_step(step, cfg, dtype, a.batch, a.seq, a.rank, remat, base == "int8"))
            rows.append({"model": name, "step": step, "base": str(dtype) if base == "float" else f"int8+{dtype}",
                         "remat": remat, "base_params": cfg.num_params(), **mem, "compile_s": time.time() - t})
            ref = next(r for r in rows if (r["step"], r["base"], r["remat"]) == (REFERENCE[0], str(dtype), False))
            rows[-1]["ratio_vs_reference"] = rows[-1]["total_bytes"] / ref["total_bytes"]
            print(f"{name} {step:24s} base {rows[-1]['base']:14s} remat {'on ' if remat else 'off'}: "
                  f"{gib(mem['total_bytes']):7.2f} GiB (args {gib(mem['argument_bytes']):.2f}, temps "
                  f"{gib(mem['temp_bytes']):.2f}, outputs {gib(mem['output_bytes']):.2f}) = "
                  f"{rows[-1]['ratio_vs_reference']:.2f}x the official LLM-Pruner step  "
                  f"[{rows[-1]['compile_s']:.0f} s]", flush=True)
            out["results"] = [r for r in out["results"] if r["model"] != name] + rows
            write_json_atomic(a.out, out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
