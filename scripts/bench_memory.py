"""Compiled memory of one train step on SmolLM2-135M: full fine-tuning vs LoRA.

    python scripts/bench_memory.py [--config-json PATH] [--batch 4] [--seq-len 256] [--rank 8] [--time]

Both steps are `jaxprune.train.make_train_step` (AdamW, clipping, donated train state), lowered on
ShapeDtypeStructs from `nnx.eval_shape`, so no weights are allocated for the memory numbers:

* full FT: every `nnx.Param` is trainable, the frozen pytree is empty;
* LoRA: rank-r factors on all 7 projections of every layer, the base is frozen.

Memory is XLA's `compiled.memory_analysis()` of the step: argument + output + temp bytes (the sum
asked for; `alias` bytes, the donated inputs reused as outputs, are reported too: the peak is about
argument + output + temp - alias). `--time` also runs a few real LoRA steps (real weights, this
machine's default backend) and reports seconds per step. Results go to benchmarks/memory.json.
"""

from __future__ import annotations

import argparse
import json
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
from jaxprune.fixtures import fixture_paths  # noqa: E402
from jaxprune.layers import Mask  # noqa: E402
from jaxprune.model import LlamaForCausalLM  # noqa: E402
from jaxprune.partition import DEFAULT_LORA_TARGETS, add_lora, partition, tree_bytes, tree_size  # noqa: E402
from jaxprune.train import OptimConfig, make_optimizer, make_train_step  # noqa: E402

MiB = 2 ** 20


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def memory_of(step, trainable, opt_state, hook_state, frozen, masks, batch, step_index) -> dict:
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, hook_state, frozen, masks, batch, step_index).compile()
    ma = compiled.memory_analysis()
    out = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["total"] = out["argument"] + out["output"] + out["temp"]
    out["peak_estimate"] = out["total"] - out["alias"]
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    return out


def full_ft_setup(cfg, optimizer):
    """Abstract (graphdef, trainable = every Param, opt_state, frozen = empty, masks)."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=jnp.float32))
    graphdef, params, masks = nnx.split(model, nnx.Param, Mask)
    frozen = nnx.State({})
    return graphdef, params, jax.eval_shape(optimizer.init, params), frozen, masks


def lora_setup(cfg, optimizer, rank, alpha, model=None):
    """(graphdef, trainable = LoRA factors, opt_state, frozen = base, masks); abstract unless ``model``."""
    if model is None:
        def build():
            m = LlamaForCausalLM(cfg, dtype=jnp.float32)
            add_lora(m, rank=rank, alpha=alpha, targets=DEFAULT_LORA_TARGETS)
            return m
        model = nnx.eval_shape(build)
        graphdef, frozen, trainable, masks = partition(model)
        return graphdef, trainable, jax.eval_shape(optimizer.init, trainable), frozen, masks
    add_lora(model, rank=rank, alpha=alpha, targets=DEFAULT_LORA_TARGETS)
    graphdef, frozen, trainable, masks = partition(model)
    return graphdef, trainable, optimizer.init(trainable), frozen, masks


def time_lora_steps(cfg_dir: Path, optimizer, rank, alpha, batch, seq_len, steps) -> dict:
    from jaxprune import load

    model = load.load_model(cfg_dir)
    graphdef, trainable, opt_state, frozen, masks = lora_setup(model.config, optimizer, rank, alpha, model)
    step = make_train_step(graphdef, optimizer)
    tokens = jax.random.randint(jax.random.key(0), (1, batch, seq_len), 0, model.config.vocab_size, jnp.int32)
    hook_state, times = (), []
    for i in range(steps + 1):  # the first call compiles
        t0 = time.perf_counter()
        trainable, opt_state, hook_state, m = step(trainable, opt_state, hook_state, frozen, masks, tokens,
                                                   jnp.int32(i))
        jax.block_until_ready((trainable, m))
        times.append(time.perf_counter() - t0)
    per_step = sum(times[1:]) / steps
    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "first_call_s": round(times[0], 2), "steps_timed": steps, "step_s": round(per_step, 3),
            "tokens_per_s": round(batch * seq_len / per_step, 1), "loss": float(m["loss"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=fixture_paths().hf_dir,
                   help="HF dir whose config.json is measured (weights are read only with --time)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--time", action="store_true", help="also time real LoRA steps on this machine")
    p.add_argument("--time-steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "memory.json")
    a = p.parse_args(argv)

    cfg = ModelConfig.from_hf_dict(json.loads((a.model_dir / "config.json").read_text()))
    optimizer = make_optimizer(OptimConfig())
    batch = jax.ShapeDtypeStruct((1, a.batch, a.seq_len), jnp.int32)  # [grad_accum, batch, seq]
    step_index = jax.ShapeDtypeStruct((), jnp.int32)

    results = {}
    for name, setup in (("full_ft", lambda: full_ft_setup(cfg, optimizer)),
                        ("lora", lambda: lora_setup(cfg, optimizer, a.rank, a.alpha))):
        graphdef, trainable, opt_state, frozen, masks = setup()
        step = make_train_step(graphdef, optimizer)
        mem = memory_of(step, trainable, opt_state, (), frozen, masks, batch, step_index)
        mem.update(trainable_params=tree_size(trainable), frozen_params=tree_size(frozen),
                   trainable_bytes=tree_bytes(trainable), opt_state_bytes=tree_bytes(opt_state),
                   frozen_bytes=tree_bytes(frozen))
        results[name] = mem
        print(f"{name:8s} trainable {mem['trainable_params']:>11,d}  opt state {mem['opt_state_bytes'] / MiB:8.1f} MiB"
              f"  argument {mem['argument'] / MiB:8.1f}  output {mem['output'] / MiB:8.1f}"
              f"  temp {mem['temp'] / MiB:8.1f}  total {mem['total'] / MiB:8.1f} MiB"
              f"  (alias {mem['alias'] / MiB:.1f}; compile {mem['compile_s']} s)", flush=True)

    ratio = results["full_ft"]["total"] / results["lora"]["total"]
    peak_ratio = results["full_ft"]["peak_estimate"] / results["lora"]["peak_estimate"]
    print(f"full FT / LoRA compiled memory (argument + output + temp): {ratio:.2f}x "
          f"(minus donated aliases: {peak_ratio:.2f}x)")
    record = {"model": str(a.model_dir), "config": {"layers": cfg.num_layers, "hidden": cfg.hidden_size,
                                                   "vocab": cfg.vocab_size, "params": cfg.num_params()},
              "batch": a.batch, "seq_len": a.seq_len, "lora_rank": a.rank, "lora_alpha": a.alpha,
              "optimizer": "AdamW (mu, nu) + global-norm clip", "dtype": "float32",
              "backend": jax.default_backend(), "jax": jax.__version__,
              **results, "ratio_full_over_lora": round(ratio, 3),
              "ratio_full_over_lora_minus_alias": round(peak_ratio, 3)}
    if a.time:
        record["lora_step_time"] = time_lora_steps(a.model_dir, optimizer, a.rank, a.alpha, a.batch, a.seq_len,
                                                   a.time_steps)
        t = record["lora_step_time"]
        print(f"LoRA step on {t['backend']} ({t['device']}): {t['step_s']} s/step, {t['tokens_per_s']} tokens/s "
              f"(first call {t['first_call_s']} s)")
    write_json_atomic(a.out, record)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
