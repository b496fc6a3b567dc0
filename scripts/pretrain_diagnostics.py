"""Where a pretraining run's linear weights ended up: how much of full rank's learned update a rank-r factor
could hold, and how SLTrain splits its weight between the low-rank and the sparse part.

For every attention / MLP linear of a finished `jaxprune pretrain` run (its last checkpoint, rebuilt
from run.json):

* full / any method with a dense weight: ``ΔW = W_T − W_0`` (W_0 the seed's init, rebuilt bitwise) and
  ``top_r_energy(ΔW) = Σ_{i≤r} σ_i² / Σ σ_i²``, the share of the update's squared Frobenius norm in its
  best rank-r approximation (Eckart-Young), r = the recipe's --lora-rank. A value far below 1 means the
  update full rank learns is not low rank at this budget: a rank-r method cannot represent it, whatever
  its optimiser does.
* sltrain / lowrank: ``‖s·A@B‖_F``, ``‖S‖_F`` (sltrain) and their ratio, per linear, averaged by name.

    python scripts/pretrain_diagnostics.py RUN_DIR [RUN_DIR ...] --out benchmarks/pretrain_diagnostics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402


def top_r_energy(dw: np.ndarray, r: int) -> float:
    """Σ_{i≤r} σ_i² / Σ σ_i² of ``dw`` [in, out] (1.0 for a zero matrix)."""
    s2 = np.linalg.svd(np.asarray(dw, np.float64), compute_uv=False) ** 2
    return float(s2[:r].sum() / s2.sum()) if s2.sum() > 0 else 1.0


def restore_run(run_dir: Path):
    """(args, model at the last checkpoint, model at init) of a pretraining run dir."""
    import jax.numpy as jnp

    from jaxprune.commands.pretrain import load_tokenizer, method_config, model_config
    from jaxprune.partition import combine
    from jaxprune.pretrain.methods import build_model, make_pretrain_optimizer, partition_pretrain
    from jaxprune.load import DTYPES
    from jaxprune.pretrain.sltrain import restore_support
    from jaxprune.runs import IMPLIED_BEFORE_RECORDED
    from jaxprune.train import OptimConfig, TrainCheckpoints, TrainState

    # runs recorded before a flag existed had its old value (the rule --resume uses)
    args = argparse.Namespace(**{**IMPLIED_BEFORE_RECORDED, **json.loads((run_dir / "run.json").read_text())})
    cfg = model_config(args, load_tokenizer(args.tokenizer))
    init = build_model(cfg, method_config(args), seed=args.seed,
                       dtype=DTYPES[args.dtype] if args.dtype else jnp.float32)
    graphdef, frozen, trainable, masks = partition_pretrain(init)  # split leaves ``init`` as it is
    frozen = restore_support(run_dir, frozen)  # the saved support (bitwise the rebuilt one)
    like = TrainState(trainable, make_pretrain_optimizer(OptimConfig(), trainable).init(trainable), (), masks)
    ckpts = TrainCheckpoints(run_dir / "checkpoints")  # read only: never removes a checkpoint it cannot read
    try:
        step = ckpts.manager.latest_step()
        if step is None:
            raise SystemExit(f"error: {run_dir}: no checkpoint")
        state, _ = ckpts.restore(step, like)
    finally:
        ckpts.close()
    return args, combine(graphdef, frozen, state.trainable, state.masks), init, step


def diagnose(run_dir: Path) -> dict:
    from jaxprune.model import DECODER_LINEARS
    from jaxprune.pretrain.sltrain import SparseLowRankLinear

    args, model, init, step = restore_run(run_dir)
    per_name: dict[str, dict[str, list[float]]] = {}
    for i in range(len(model.layers)):
        for block, name in DECODER_LINEARS:
            lin, lin0 = getattr(getattr(model.layers[i], block), name), getattr(getattr(init.layers[i], block), name)
            w, w0 = np.asarray(lin.merged_kernel()), np.asarray(lin0.merged_kernel())
            d = per_name.setdefault(name, {})
            d.setdefault("update_top_r_energy", []).append(top_r_energy(w - w0, args.lora_rank))
            d.setdefault("weight_top_r_energy", []).append(top_r_energy(w, args.lora_rank))
            d.setdefault("weight_fro", []).append(float(np.linalg.norm(w)))
            if isinstance(lin, SparseLowRankLinear):  # lowrank / sltrain: W = s·A@B (+ S)
                lr = np.asarray(lin.lora_scale * (lin.lora_a[...] @ lin.lora_b[...]))
                d.setdefault("lowrank_fro", []).append(float(np.linalg.norm(lr)))
                if getattr(lin, "sparse_values", None) is not None:
                    sn = float(np.linalg.norm(np.asarray(lin.sparse_values[...])))
                    d.setdefault("sparse_fro", []).append(sn)
                    d.setdefault("sparse_over_lowrank", []).append(sn / max(float(np.linalg.norm(lr)), 1e-30))
    means = {name: {k: float(np.mean(v)) for k, v in d.items()} for name, d in per_name.items()}
    overall = {k: float(np.mean([m[k] for m in means.values() if k in m]))
               for k in dict.fromkeys(k for m in means.values() for k in m)}
    return {"run_dir": str(run_dir), "method": args.method, "seed": args.seed, "step": int(step),
            "rank": args.lora_rank, "overall": overall, "per_linear": means}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    results = []
    for run_dir in a.runs:
        r = diagnose(run_dir)
        results.append(r)
        o = r["overall"]
        extra = "".join(f", {k} {o[k]:.3f}" for k in ("lowrank_fro", "sparse_fro", "sparse_over_lowrank") if k in o)
        print(f"{run_dir.name} ({r['method']}, step {r['step']}): rank-{r['rank']} share of the update's energy "
              f"{o['update_top_r_energy']:.3f}, of the weight's {o['weight_top_r_energy']:.3f}{extra}", flush=True)
    if a.out:
        write_json_atomic(Path(a.out), {"benchmark": "pretrain_diagnostics",
                                        "command": "python scripts/pretrain_diagnostics.py " + " ".join(sys.argv[1:]),
                                        "results": results})


if __name__ == "__main__":
    main()
