"""LoRAM vs LoRA on SmolLM2-135M at equal LoRA-training tokens: held-out perplexity and train-step memory.

    python scripts/bench_loram.py [--steps 16] [--ratio 0.5] [--align-steps 0] [--eval-tokens 4096]

Four models, perplexity on the held-out plays (never trained on):

  (a) base         SmolLM2-135M as loaded
  (b) LoRA         `jaxprune finetune` on the full model, --steps steps
  (c) pruned+LoRA  LoRAM's small model with its LoRA (RUN/train/model of `jaxprune loram`)
  (d) LoRAM        the full model with the recovered LoRA (RUN/model of the same run)

(b) and the LoRA stage of LoRAM see the same batches (same --seed, --steps, batch, seq-len). Both runs are
the CLI commands, in-process. Memory: XLA's `compiled.memory_analysis()` of one LoRA train step
(`train.make_train_step`, AdamW, donated state) on the full model vs on LoRAM's pruned model (fp32, and
QLoRAM's int8 pruned base), at the training batch; peak = argument + output + temp - alias, as in
`bench_memory.py`. Writes benchmarks/loram.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_memory import memory_of  # noqa: E402
from jaxprune import load  # noqa: E402
from jaxprune.cli import build_parser  # noqa: E402
from jaxprune.evaluate import perplexity, tokenize_text  # noqa: E402
from jaxprune.fileio import write_json_atomic  # noqa: E402
from jaxprune.fixtures import fixture_paths  # noqa: E402
from jaxprune.partition import add_lora, partition, tree_size  # noqa: E402
from jaxprune.quantize import quantize_base  # noqa: E402
from jaxprune.train import OptimConfig, make_optimizer, make_train_step  # noqa: E402
from jaxprune.weights import merge_lora  # noqa: E402


def run_cli(argv: list[str]) -> tuple[dict, float]:
    args = build_parser().parse_args(argv)
    args.argv = argv
    t = time.time()
    out = args.fn(args)
    return out, time.time() - t


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def step_memory(model, rank: int, alpha: float, batch: int, seq_len: int, *, int8: bool = False) -> dict:
    """Compiled memory of one LoRA train step on ``model``'s base (LoRA-free, float): a copy gets int8 /
    LoRA; only shapes reach the compiler."""
    model = merge_lora(model)  # a fresh LoRA-free copy
    if int8:
        quantize_base(model)
    add_lora(model, rank=rank, alpha=alpha)
    graphdef, frozen, trainable, masks = partition(model)
    optimizer = make_optimizer(OptimConfig())
    step = make_train_step(graphdef, optimizer)
    mem = memory_of(step, abstract(trainable), jax.eval_shape(optimizer.init, abstract(trainable)), (),
                    abstract(frozen), abstract(masks), jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32),
                    jax.ShapeDtypeStruct((), jnp.int32))
    mem.update(trainable_params=tree_size(trainable), base_params=model.config.num_params())
    return mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="LoRA steps of (b) and of LoRAM's LoRA stage")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--prune-method", default="llm-pruner")
    ap.add_argument("--attn-unit", default="q_head")
    ap.add_argument("--align-steps", type=int, default=0, help="LoRAM's full-rank alignment steps (0: none)")
    ap.add_argument("--align-lr", type=float, default=5e-5)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "loram.json"))
    ap.add_argument("--reuse-baselines", default=None, metavar="JSON",
                    help="take (a), (b) and (b)'s step memory from this earlier result (same budget: checked) "
                         "instead of recomputing them, e.g. for a second LoRAM variant")
    a = ap.parse_args(argv)

    paths = fixture_paths()
    model_dir, text = str(paths.hf_dir), str(paths.train_text)
    tok = load.load_tokenizer(model_dir)
    heldout = tokenize_text(tok, paths.heldout_text.read_text())

    def ppl(model) -> float:
        return perplexity(model, heldout, seq_len=256, batch_size=4, max_tokens=a.eval_tokens, progress=False)["ppl"]

    common = ["--text", text, "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--batch-size",
              str(a.batch_size), "--lr", str(a.lr), "--lora-rank", str(a.lora_rank), "--lora-alpha",
              str(2.0 * a.lora_rank), "--seed", str(a.seed), "--save-every", str(a.steps), "--val-every", "0",
              "--no-progress", "--json"]
    budget = {"lora_steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
              "lora_tokens": a.steps * a.batch_size * a.seq_len, "lr": a.lr, "lora_rank": a.lora_rank,
              "lora_alpha": 2.0 * a.lora_rank, "seed": a.seed, "eval_tokens": a.eval_tokens, "eval_seq_len": 256}
    t0 = time.time()
    base = load.load_model(model_dir)
    prev = json.loads(Path(a.reuse_baselines).read_text()) if a.reuse_baselines else None
    if prev is not None:
        if {k: prev["budget"].get(k) for k in budget} != budget:
            raise SystemExit(f"{a.reuse_baselines}: another budget ({prev['budget']}), cannot reuse its baselines")
        rows = [dict(r, reused_from=Path(a.reuse_baselines).name) for r in prev["results"][:2]]
    with tempfile.TemporaryDirectory() as tmp:
        if prev is None:
            rows = [{"model": "(a) base", "ppl": ppl(base), "params": base.config.num_params(), "train_s": None}]
            print(f"(a) base: ppl {rows[-1]['ppl']:.2f}", flush=True)
            ft, ft_s = run_cli(["finetune", model_dir, *common, "--out", f"{tmp}/lora"])
            lora = load.load_model(f"{tmp}/lora")
            rows.append({"model": "(b) LoRA on the full model", "ppl": ppl(lora), "params": lora.config.num_params(),
                         "trainable_params": ft["trainable_params"], "train_s": ft_s})
            print(f"(b) LoRA: ppl {rows[-1]['ppl']:.2f} ({ft_s:.0f} s)", flush=True)
        lm, lm_s = run_cli(["loram", model_dir, *common, "--prune-method", a.prune_method, "--ratio", str(a.ratio),
                            "--attn-unit", a.attn_unit, "--align-steps", str(a.align_steps), "--align-lr",
                            str(a.align_lr), "--out", f"{tmp}/loram"])
        small = load.load_model(f"{tmp}/loram/train")
        full = load.load_model(f"{tmp}/loram")
        rows.append({"model": "(c) pruned model + its LoRA", "ppl": ppl(small), "params": small.config.num_params(),
                     "trainable_params": lm["trainable_params"], "train_s": None})
        rows.append({"model": "(d) LoRAM: full model + recovered LoRA", "ppl": ppl(full),
                     "params": full.config.num_params(), "trainable_params": lm["trainable_params"], "train_s": lm_s})
        print(f"(c) pruned+LoRA: ppl {rows[-2]['ppl']:.2f}; (d) LoRAM: ppl {rows[-1]['ppl']:.2f} ({lm_s:.0f} s)",
              flush=True)
        memory = {"lora_full": prev["memory"]["lora_full"] if prev is not None else
                  step_memory(base, a.lora_rank, 2.0 * a.lora_rank, a.batch_size, a.seq_len),
                  "loram_pruned": step_memory(small, a.lora_rank, 2.0 * a.lora_rank, a.batch_size, a.seq_len),
                  "qloram_pruned_int8": step_memory(small, a.lora_rank, 2.0 * a.lora_rank, a.batch_size, a.seq_len,
                                                    int8=True)}
    for k, m in memory.items():
        print(f"{k:20s} base {m['base_params']:>11,d}  trainable {m['trainable_params']:>9,d}  "
              f"peak {m['peak_estimate'] / 2**20:8.1f} MiB", flush=True)
    peak = {k: m["peak_estimate"] for k, m in memory.items()}
    record = {
        "benchmark": "loram", "command": "python scripts/bench_loram.py " + " ".join(argv or sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (smollm2-hf, fp32)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend()},
        "budget": {**budget, "align_steps": a.align_steps, "align_lr": a.align_lr,
                   "align_tokens": a.align_steps * a.batch_size * a.seq_len,
                   "align_text": "the LoRA text (train plays)" if a.align_steps else None},
        "loram": {"prune_method": a.prune_method, "ratio": a.ratio, "attn_unit": a.attn_unit,
                  "heads_pruned": lm["heads_pruned"], "channels_pruned": lm["channels_pruned"],
                  "params_full": lm["params_full"], "params_pruned": lm["params_pruned"]},
        "results": rows, "memory": memory,
        "memory_ratio_lora_over_loram": peak["lora_full"] / peak["loram_pruned"],
        "memory_ratio_lora_over_qloram": peak["lora_full"] / peak["qloram_pruned_int8"],
        "wall_s": time.time() - t0,
    }
    write_json_atomic(a.out, record)
    print(f"wrote {a.out} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
