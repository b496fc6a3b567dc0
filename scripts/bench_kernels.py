"""Benchmark the jaxprune Pallas kernels (issue 7) against dense ``jnp.dot`` and the XLA masked merge.

On GPU/TPU: for SmolLM2 layer shapes (576x1536, 1536x576, 576x576) and LLaMA-7B shapes
(4096x11008, 4096x4096) at sparsities 50/75/90 %, time (median of ``--iters`` runs, jitted,
``block_until_ready``):

* ``dense``        ``x @ W`` (jnp.dot, the cost the pruned model would pay without a kernel);
* ``xla_merge``    ``x @ (W ⊙ M)`` resp. ``x @ ((W + s·A@B) ⊙ M)`` merged by XLA each call;
* ``block_sparse`` / ``masked_lowrank``   the Pallas kernels (``impl="pallas"``);

forward and forward+backward, and print the speedups ``dense / kernel`` and ``xla_merge / kernel``.

On CPU there is no meaningful timing (Pallas runs in the Python-level interpreter): the script only
checks interpret-mode correctness on small shapes and says so.  Results go to
``benchmarks/kernels.json`` (atomic write: temp file + ``os.replace``).

``--tiles`` (GPU/TPU) also times each kernel over candidate tile sizes at one SmolLM2 and one LLaMA-7B
shape (90% block sparsity) and stores every candidate tried, with its error if it failed to lower, as
``tiles_tried``: the measured table ``kernels/block_sizes.py`` is to be set from (it holds hand-picked
defaults until a GPU/TPU run exists). On CPU it checks that every candidate gives the reference result.

Usage: ``python scripts/bench_kernels.py [--quick] [--tiles] [--out benchmarks/kernels.json]``
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune import kernels as K  # noqa: E402
from jaxprune.fileio import write_json_atomic  # noqa: E402

SHAPES = {"smollm2": [(576, 1536), (1536, 576), (576, 576)], "llama7b": [(4096, 11008), (4096, 4096)]}
SPARSITIES = (0.5, 0.75, 0.9)
CPU_NOTE = ("CPU backend: Pallas kernels run in interpret mode (a Python-level emulator), so only "
            "correctness is checked here; kernel timings need a GPU or TPU.")


def time_fn(fn, *args, iters: int) -> float:
    """Median wall time (ms) of a jitted ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def block_mask(rng, grid, sparsity):
    """Random block mask with ``round((1 - sparsity) * n)`` live blocks."""
    n = grid[0] * grid[1]
    m = np.zeros(n, bool)
    m[rng.permutation(n)[: int(round((1 - sparsity) * n))]] = True
    return m.reshape(grid)


def problem(k, n, tokens, sparsity, block, rank, dtype, seed=0):
    """Operands for one (shape, sparsity) point; masks are block masks so both kernels see the same."""
    rng = np.random.default_rng(seed)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), dtype)  # noqa: E731
    grid = (-(-k // block[0]), -(-n // block[1]))
    bmask = block_mask(rng, grid, sparsity)
    mask = jnp.asarray(K.reference.expand_block_mask(bmask, block, (k, n)))
    w = arr(k, n)
    return dict(x=arr(tokens, k), w=w, a=arr(k, rank), b=arr(rank, n), mask=mask,
                bsm=K.BlockSparseMatrix.from_dense(w, bmask, block))


def variants(p, scale=0.5):
    """Name -> (forward fn, args, differentiable argnums) for one problem."""
    x, w, a, b, mask, bsm = (p[k] for k in ("x", "w", "a", "b", "mask", "bsm"))
    return {
        "dense": (lambda x, w: x @ w, (x, w), (0, 1)),
        "bs_xla_merge": (lambda x, w: x @ jnp.where(mask, w, 0), (x, w), (0, 1)),
        "block_sparse": (lambda x, v: K.block_sparse_matmul(x, type(bsm)(v, bsm.layout), impl="pallas"),
                         (x, bsm.values), (0, 1)),
        "mlr_xla_merge": (lambda x, a, b: K.masked_lowrank_matmul(x, w, a, b, mask, scale, impl="xla"),
                          (x, a, b), (0, 1, 2)),
        "masked_lowrank": (lambda x, a, b: K.masked_lowrank_matmul(x, w, a, b, mask, scale, impl="pallas"),
                           (x, a, b), (0, 1, 2)),
    }


def fwd_bwd(fn, argnums):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=argnums))


def bench_point(k, n, sparsity, args) -> dict:
    """Timings (ms) and speedups for one (shape, sparsity) on an accelerator."""
    p = problem(k, n, args.tokens, sparsity, (args.block, args.block), args.rank, jnp.bfloat16)
    row = {"shape": [k, n], "tokens": args.tokens, "sparsity": sparsity, "fwd_ms": {}, "fwd_bwd_ms": {}}
    nan = float("nan")
    for name, (fn, fargs, argnums) in variants(p).items():
        for mode, f in (("fwd_ms", jax.jit(fn)), ("fwd_bwd_ms", fwd_bwd(fn, argnums))):
            try:
                row[mode][name] = time_fn(f, *fargs, iters=args.iters)
            except Exception as e:  # a variant a backend cannot lower is a result, not a crash
                row[mode][name] = nan
                row.setdefault("errors", {})[f"{name}:{mode}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                print(f"  {k}x{n} {name} {mode}: {row['errors'][f'{name}:{mode}']}", flush=True)
    for mode in ("fwd_ms", "fwd_bwd_ms"):
        t = row[mode]
        row[mode.replace("_ms", "_speedup")] = {
            "block_sparse_vs_dense": t["dense"] / t["block_sparse"],
            "block_sparse_vs_xla_merge": t["bs_xla_merge"] / t["block_sparse"],
            "masked_lowrank_vs_dense": t["dense"] / t["masked_lowrank"],
            "masked_lowrank_vs_xla_merge": t["mlr_xla_merge"] / t["masked_lowrank"]}
    return row


def check_point(k, n, sparsity, args) -> dict:
    """Interpret-mode correctness of both kernels (value and grads) vs the XLA reference."""
    p = problem(k, n, 64, sparsity, (32, 32), 8, jnp.float32)
    vs = variants(p)
    errs = {}
    for kern, ref in (("block_sparse", "bs_xla_merge"), ("masked_lowrank", "mlr_xla_merge")):
        (fk, ak, nk), (fr, ar, nr) = vs[kern], vs[ref]
        if kern == "block_sparse":  # compare dW on live blocks against the dense gradient's blocks
            ar, nr = (p["x"], p["bsm"].values), (0, 1)
            fr = lambda x, v: x @ type(p["bsm"])(v, p["bsm"].layout).to_dense()  # noqa: E731
        outs_k = [jax.jit(fk)(*ak), *fwd_bwd(fk, nk)(*ak)]
        outs_r = [jax.jit(fr)(*ar), *fwd_bwd(fr, nr)(*ar)]
        errs[kern] = max(float(jnp.abs(o - r).max() / jnp.maximum(jnp.abs(r).max(), 1e-30))
                         for o, r in zip(outs_k, outs_r))
    return {"shape": [k, n], "tokens": 64, "sparsity": sparsity, "max_rel_err": errs,
            "ok": all(e <= 1e-4 for e in errs.values())}




MLR_TILES = [(64, 64, 64), (128, 64, 128), (128, 128, 128), (64, 128, 128), (128, 256, 128), (256, 128, 256)]
BS_BLOCK_M = [32, 64, 128, 256]
TILE_SHAPES = [(576, 1536), (4096, 11008)]


def tiles_tried(args, timed: bool) -> list[dict]:
    """Every candidate tile of both kernels at ``TILE_SHAPES`` (90% sparsity): forward ms (``timed``, on an
    accelerator) or the max relative error against the XLA reference (interpret mode, small stand-in shapes)."""
    out = []
    shapes = TILE_SHAPES if timed else [(96, 160)]
    for k, n in shapes:
        block = (args.block, args.block) if timed else (32, 32)
        p = problem(k, n, args.tokens if timed else 64, 0.9, block, args.rank if timed else 8,
                    jnp.bfloat16 if timed else jnp.float32)
        x, w, a, b, mask, bsm = (p[q] for q in ("x", "w", "a", "b", "mask", "bsm"))
        ref = {"masked_lowrank": K.masked_lowrank_matmul(x, w, a, b, mask, 0.5, impl="xla"),
               "block_sparse": x @ bsm.to_dense()}
        cands = [("masked_lowrank", t, lambda x, t=t: K.masked_lowrank_matmul(x, w, a, b, mask, 0.5, impl="pallas",
                                                                              block_sizes=t)) for t in MLR_TILES]
        cands += [("block_sparse", (bm_, *block), lambda x, bm_=bm_: K.block_sparse_matmul(x, bsm, impl="pallas",
                                                                                         block_m=bm_))
                  for bm_ in BS_BLOCK_M]
        for kernel, tile, fn in cands:
            row = {"kernel": kernel, "shape": [k, n], "tile": list(tile)}
            try:
                if timed:
                    row["fwd_ms"] = time_fn(jax.jit(fn), x, iters=args.iters)
                else:
                    got, want = jax.jit(fn)(x), ref[kernel]
                    row["max_rel_err"] = float(jnp.abs(got - want).max() / jnp.abs(want).max())
            except Exception as e:  # a tile a backend cannot lower is a result, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            out.append(row)
            print(f"  tiles {kernel:14s} {k}x{n} {tuple(tile)}: " + (
                row.get("error") or (f"{row['fwd_ms']:.3f} ms" if timed else f"rel err {row['max_rel_err']:.1e}")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, fewer tokens/iters")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "kernels.json")
    ap.add_argument("--tokens", type=int, default=None, help="rows of x (default 2048; --quick 512)")
    ap.add_argument("--iters", type=int, default=None, help="timed runs per point (default 20; --quick 5)")
    ap.add_argument("--block", type=int, default=128, help="block-sparse block size (square)")
    ap.add_argument("--rank", type=int, default=16, help="low-rank r of the masked low-rank kernel")
    ap.add_argument("--tiles", action="store_true", help="also try every candidate tile size (see the docstring)")
    ap.add_argument("--tiles-only", action="store_true", help="only the tile sweep (GPU/TPU), not the speed-up table")
    args = ap.parse_args(argv)
    args.tokens = args.tokens or (512 if args.quick else 2048)
    args.iters = args.iters or (5 if args.quick else 20)
    backend = jax.default_backend()
    meta = {"backend": backend, "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "python": platform.python_version(), "quick": args.quick}

    if backend not in ("gpu", "tpu"):
        print(CPU_NOTE)
        # Small stand-ins for the real shapes (same aspect ratios / non-square cases).
        small = [(64, 160)] if args.quick else [(64, 160), (160, 64), (96, 96)]
        rows = []
        for (k, n) in small:
            for sp in SPARSITIES:
                rows.append(check_point(k, n, sp, args))
                r = rows[-1]
                print(f"  interpret check {k}x{n} sparsity {sp:.0%}: max rel err "
                      f"block_sparse {r['max_rel_err']['block_sparse']:.1e}, "
                      f"masked_lowrank {r['max_rel_err']['masked_lowrank']:.1e}  {'OK' if r['ok'] else 'FAIL'}")
        tiles = tiles_tried(args, timed=False) if args.tiles else None
        tiles_ok = all(t.get("max_rel_err", 1.0) <= 1e-4 for t in tiles or [])
        write_json_atomic(args.out, {**meta, "mode": "interpret-correctness", "note": CPU_NOTE,
                                     "timings": None, "checks": rows,
                                     **({"tiles_checked": tiles} if tiles is not None else {})})
        print(f"wrote {args.out}")
        return 0 if all(r["ok"] for r in rows) and tiles_ok else 1

    shapes = SHAPES["smollm2"] + ([] if args.quick else SHAPES["llama7b"])

    def save(rows, tiles=None):
        write_json_atomic(args.out, {**meta, "mode": "timing", "dtype": "bfloat16", "block": args.block,
                                     "rank": args.rank, "iters": args.iters, "results": rows,
                                     **({"tiles_tried": tiles} if tiles is not None else {})})

    rows = []
    for (k, n) in ([] if args.tiles_only else shapes):
        for sp in SPARSITIES:
            r = bench_point(k, n, sp, args)
            rows.append(r)
            f, s = r["fwd_ms"], r["fwd_speedup"]
            print(f"{k}x{n} sp={sp:.0%} tokens={args.tokens} fwd ms: dense {f['dense']:.3f} "
                  f"block_sparse {f['block_sparse']:.3f} (x{s['block_sparse_vs_dense']:.2f} vs dense, "
                  f"x{s['block_sparse_vs_xla_merge']:.2f} vs XLA merge) | masked_lowrank "
                  f"{f['masked_lowrank']:.3f} (x{s['masked_lowrank_vs_dense']:.2f} vs dense, "
                  f"x{s['masked_lowrank_vs_xla_merge']:.2f} vs XLA merge)")
        save(rows)  # after every shape: a run cut short still leaves its rows
    tiles = tiles_tried(args, timed=True) if args.tiles or args.tiles_only else None
    save(rows, tiles)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
