"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774; IST-DASLab/sparsegpt ``SparseGPT.fasterprune``):
layer-wise OBS reconstruction
``min ‖X W − X Ŵ‖²`` with ``H = 2XᵀX/n`` (n calibration tokens), dampening
``H + λI, λ = 0.01·mean(diag H)``, ``U = chol(H⁻¹)`` upper (``H⁻¹ = UᵀU``), inputs processed
in order in lazy blocks of 128. For input row i (paper: column i)::

    mask (per block, or per group of M):   pruned = smallest  W_ij² / U_ii²
    q_i   = W_i ⊙ keep_i                   (row i frozen at its pruned value)
    err_i = (W_i − q_i) / U_ii
    W_k  -= U_ik · err_i      for k > i inside the block  (OBS compensation)
    W_rest -= U_blk,restᵀ · Err_blk        once per block (lazy batch update)

Rows with ``diag H = 0`` (dead inputs) get ``H_jj = 1`` and ``W_j = 0``. A Cholesky that
fails (not positive definite / non-finite) is retried with a 10× larger dampening and a warning
line on stderr. ``U`` is computed once per distinct input (q/k/v share one, gate/up one), in
float64 numpy on CPU (LAPACK is far faster than XLA's CPU Cholesky) and jitted fp32 elsewhere;
the sweep itself is one jitted function per weight shape.

What the update is, exactly (tested): for a fixed mask, when input i is pruned the
not-yet-processed inputs F = {i+1, …} take the least-squares optimal values
``Ŵ_F = argmin ‖X_{≥i} W_{≥i} − X_F Ŵ_F‖²`` (earlier rows frozen). In particular, when every
column's pruned inputs come before its kept ones, the result *is* the global least-squares
optimum ``argmin ‖X W − X Ŵ‖²`` s.t. the pruned entries are 0. Lazy blocks change nothing.

Layout: ours is ``W [in, out]``; the paper's input column i is our row i.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError
from .registry import ELEMENTWISE, ElementwiseMethod, option
from .select import check_nm, floor_count, keep_not_lowest_jnp, rank_jnp


@jax.jit
def _hinv_upper(h: jax.Array, damp) -> jax.Array:
    """Upper Cholesky factor U of ``(H + damp·I)⁻¹ = UᵀU`` (NaN where the factorisation fails)."""
    n = h.shape[0]
    eye = jnp.eye(n, dtype=h.dtype)
    low = jnp.linalg.cholesky(h + damp * eye)
    hinv = jax.scipy.linalg.cho_solve((low, True), eye)
    hinv = 0.5 * (hinv + hinv.T)
    return jnp.linalg.cholesky(hinv).T


def block_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Entries pruned per block of rows so every block is as near ``sparsity`` as possible and the
    layer total is exactly ``floor(sparsity · rows · cols)``."""
    out, prev = [], 0
    for i2 in range(blocksize, rows + blocksize, blocksize):
        cum = floor_count(sparsity * min(i2, rows) * cols)
        out.append(cum - prev)
        prev = cum
    return out


@partial(jax.jit, static_argnames=("blocksize", "nm", "counts", "fixed"))
def sparsegpt_core(w, u, keep_fixed, *, blocksize: int, nm, counts: tuple, fixed: bool):
    """SparseGPT's blockwise OBS sweep over input rows. w [in, out], u = chol(H⁻¹) upper [in, in].

    Returns (Ŵ with pruned entries exactly 0, keep-mask)."""
    rows, cols = w.shape
    keeps = []
    for b, i1 in enumerate(range(0, rows, blocksize)):
        i2 = min(i1 + blocksize, rows)
        w1, u1 = w[i1:i2], u[i1:i2, i1:i2]
        d = jnp.diagonal(u1)
        if fixed:
            prune1 = ~keep_fixed[i1:i2]
        elif nm is None:  # mask for the whole block: the counts[b] lowest w²/U_ii²
            prune1 = ~keep_not_lowest_jnp((w1 ** 2 / d[:, None] ** 2).reshape(-1, 1), counts[b]).reshape(w1.shape)
        else:
            prune1 = jnp.zeros(w1.shape, jnp.bool_)

        def step(i, carry, d=d, u1=u1):
            w1, err1, prune1 = carry
            if nm is not None and not fixed:  # at each group start: prune the M-N lowest w²/U_ii² per column
                n, m = nm

                def select(p):
                    wg = jax.lax.dynamic_slice_in_dim(w1, i, m, 0)
                    g = wg ** 2 / jax.lax.dynamic_slice_in_dim(d, i, m)[:, None] ** 2
                    return jax.lax.dynamic_update_slice_in_dim(p, rank_jnp(g, 0) < m - n, i, 0)
                prune1 = jax.lax.cond(i % m == 0, select, lambda p: p, prune1)
            wi = w1[i]
            q = jnp.where(prune1[i], jnp.zeros((), wi.dtype), wi)
            err = (wi - q) / d[i]
            w1 = w1 - u1[i][:, None] * err[None, :]  # U is upper: rows < i are untouched
            w1 = w1.at[i].set(q)
            return w1, err1.at[i].set(err), prune1

        w1, err1, prune1 = jax.lax.fori_loop(0, i2 - i1, step, (w1, jnp.zeros_like(w1), prune1))
        w = w.at[i1:i2].set(w1)
        if i2 < rows:  # lazy batch update of every later row
            w = w.at[i2:].add(-(u[i1:i2, i2:].T @ err1))
        keeps.append(~prune1)
    keep = jnp.concatenate(keeps, axis=0)
    return jnp.where(keep, w, jnp.zeros((), w.dtype)), keep


def _hinv_upper_host(h: np.ndarray, damp: float) -> np.ndarray | None:
    """numpy float64 ``_hinv_upper`` (LAPACK: ~50× faster than XLA's CPU Cholesky); None if not PD."""
    hd = h + damp * np.eye(h.shape[0])
    try:
        np.linalg.cholesky(hd)  # raises on a matrix that is not positive definite
        hinv = np.linalg.inv(hd)
        u = np.linalg.cholesky(0.5 * (hinv + hinv.T)).T
    except np.linalg.LinAlgError:
        return None
    return u if np.isfinite(u).all() else None


class HessianFactor(NamedTuple):
    """``u`` = chol((H + λI)⁻¹) upper (fp32, on device), the dead inputs, the λ used, the retries it took."""
    u: jax.Array
    dead: np.ndarray
    damp: float
    retries: int


def hessian_factor(h, *, percdamp: float = 0.01, name: str = "layer", warn=None, max_retries: int = 6,
                   backend: str | None = None) -> HessianFactor:
    """Dead inputs (``diag H = 0``) get ``H_jj = 1``; ``λ = percdamp·mean(diag H)``; a failed Cholesky is
    retried with 10× the dampening (a warning line each time). ``backend``: 'numpy' (float64 on the host,
    the default on CPU) or 'jax' (fp32, jitted; the default on accelerators)."""
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    backend = backend or ("numpy" if jax.default_backend() == "cpu" else "jax")
    mean_diag = float(np.mean(np.diag(h)))
    damp = percdamp * mean_diag
    h32 = jnp.asarray(h, jnp.float32) if backend == "jax" else None
    for attempt in range(max_retries + 1):
        if backend == "numpy":
            u = _hinv_upper_host(h, damp)
            u = None if u is None else jnp.asarray(u, jnp.float32)
        else:
            u = _hinv_upper(h32, jnp.float32(damp))
            u = u if bool(jnp.all(jnp.isfinite(u))) else None
        if u is not None:
            return HessianFactor(u, dead, damp, attempt)
        new = max(damp * 10.0, 1e-2 * mean_diag if mean_diag > 0 else 1e-6)
        if attempt == max_retries:
            break
        warn(f"warning: sparsegpt: {name}: Cholesky of H⁻¹ failed with dampening λ={damp:.3g}; "
             f"retrying with λ={new:.3g}")
        damp = new
    raise UserError(f"sparsegpt: {name}: Cholesky of the calibration Hessian failed even with dampening {damp:.3g}")


def sparsegpt(w, h=None, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None, blocksize: int = 128,
              percdamp: float = 0.01, keep=None, name: str = "layer", warn=None, max_retries: int = 6,
              factor: HessianFactor | None = None, backend: str | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """SparseGPT on one linear: W [in, out], H = 2XᵀX/n [in, in] -> (Ŵ [in, out], keep-mask, info).

    ``keep`` fixes the mask (then only the OBS update runs). ``factor`` reuses ``hessian_factor(H)``
    (q/k/v and gate/up share their input, hence H). ``info`` has the dampening used and the retries.
    """
    w = jnp.asarray(w, jnp.float32)
    rows = w.shape[0]
    if factor is None:
        if np.shape(h) != (rows, rows):
            raise ValueError(f"H has shape {np.shape(h)}, expected {(rows, rows)}")
        factor = hessian_factor(h, percdamp=percdamp, name=name, warn=warn, max_retries=max_retries,
                                backend=backend)
    check_nm(w.shape, nm)
    if nm is not None and blocksize % nm[1]:
        blocksize = (blocksize // nm[1] + 1) * nm[1]
    w = jnp.where(jnp.asarray(factor.dead)[:, None], 0.0, w)
    counts = tuple(block_counts(rows, w.shape[1], blocksize, sparsity)) if nm is None and keep is None else ()
    fixed = keep is not None
    keep_arr = jnp.asarray(keep, jnp.bool_) if fixed else jnp.ones(w.shape, jnp.bool_)
    w_new, keep_out = sparsegpt_core(w, factor.u, keep_arr, blocksize=blocksize, nm=nm, counts=counts, fixed=fixed)
    return w_new, keep_out, {"damp": factor.damp, "retries": factor.retries}


@dataclass(frozen=True)
class SparseGPTOptions:
    blocksize: int = option(128, "sparsegpt: lazy-update block of input rows", lo=1)
    percdamp: float = option(0.01, "sparsegpt: dampening λ = percdamp·mean(diag H)", lo=0.0)


ELEMENTWISE.register(ElementwiseMethod(
    "sparsegpt", "layer-wise OBS: prune by W²/[H⁻¹]_ii and update the kept weights (H = 2XᵀX/n)",
    statistic="xtx", compensates=True, options=SparseGPTOptions,
    citation="Frantar & Alistarh 2023, arXiv 2301.00774 (IST-DASLab/sparsegpt fasterprune)"))
