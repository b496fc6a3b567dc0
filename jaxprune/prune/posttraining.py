"""Post-training element-wise pruning (issue 9): magnitude, Wanda, SparseGPT; unstructured or N:M.

Every linear (q, k, v, o, gate, up, down; never ``lm_head`` / embeddings) of every decoder layer not
in ``--exclude-layers`` (default for these methods: none excluded, as in the papers) gets a boolean
``weight_mask`` (:class:`jaxprune.layers.Mask`, so it lands in the ``masks`` pytree of
``partition(model)``) and its kernel is zeroed where the mask is 0, so the model computes
``x @ ((W + s·A@B) ⊙ M)`` and stays sparse through LoRA recovery and merging. An excluded layer
keeps every weight and gets an all-ones mask.

Layout. Our kernels are ``W [in, out]`` (``y = x @ W``). The papers write ``W [out, in]``
(``y = W x``): their "row" (one output neuron) is our *column*, their input "column" j is
our *row* j.

Patterns. ``unstructured`` at sparsity ``s``, or ``N:M``: at most ``N`` non-zeros in every
group of ``M`` consecutive inputs of each output (the hardware meaning: 2:4 keeps 2 of 4;
sparsity is then ``1 - N/M``). Counts are exact and ties are broken by index (stable sort).

* **magnitude**: score ``|W_ij|``; unstructured compares the whole layer, prunes
  ``floor(s·in·out)`` entries.
* **Wanda** (Sun et al. 2023, arXiv 2306.11695): score ``S_ij = |W_ij| · ‖X_j‖₂`` with
  ``X_j`` input feature j over all calibration tokens; compared *per output* (each column
  prunes ``floor(s·in)``), N:M inside groups of M consecutive inputs of a column.
* **SparseGPT** (Frantar & Alistarh 2023, arXiv 2301.00774): layer-wise OBS reconstruction
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

Sequential calibration (the papers' protocol): calibration sequences go through the embedding;
then, per decoder layer, one jitted pass of the layer on the current hidden states collects the
statistics of every linear's input (q/k/v: input-norm output; o: attention output before
``o_proj``; gate/up: post-attention-norm output; down: ``act(gate)·up``) — ``Σ_t x_t²``
(Wanda) or ``Σ_t x_t x_tᵀ`` (SparseGPT), accumulated over chunks in float64 — the layer's
seven linears are pruned, and the layer is run again (jitted) with the pruned weights to give
the next layer its input. Magnitude needs no calibration.
"""

from __future__ import annotations

import math
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import UserError
from ..layers import Linear, Mask

POSTTRAINING_METHODS = ("magnitude", "wanda", "sparsegpt")
#: (module, attribute) of the seven pruned linears of a decoder layer, and whose input they read
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
INPUT_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
            "up_proj": "gate_up", "down_proj": "down"}
TAPS = {"qkv": ("self_attn", "q_proj"), "o": ("self_attn", "o_proj"), "gate_up": ("mlp", "gate_proj"),
        "down": ("mlp", "down_proj")}


def _floor(x: float) -> int:
    """floor with a guard against 0.3·10 = 2.9999999999999996."""
    return int(math.floor(x + 1e-9))


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'unstructured' / None -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if pattern in (None, "unstructured"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        hint = " (YAML 1.1 reads an unquoted 2:4 as the number 124: quote it)" if isinstance(pattern, int) else ""
        raise UserError(f"--pattern {pattern!r}: expected 'unstructured' or N:M with 0 < N < M (e.g. 2:4){hint}")
    return int(m.group(1)), int(m.group(2))


def resolve_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """The sparsity a (--sparsity, --pattern) pair means; N:M fixes it to 1 - N/M."""
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise UserError(f"--sparsity {sparsity} contradicts --pattern {nm[0]}:{nm[1]} "
                            f"(which means sparsity {implied:g}); drop --sparsity or make them agree")
        return implied
    if sparsity is None:
        raise UserError("--sparsity is required for unstructured pruning")
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity {sparsity}: must be in [0, 1)")
    return float(sparsity)


# ---- masks (True = keep) -----------------------------------------------------------------------
# Selection runs on the host in numpy: np.partition finds a threshold in O(n), where an XLA sort of a
# 1536×576 kernel takes ~0.5 s on CPU. Ties are broken by position (lower index pruned first), the same
# order as a stable sort, so the counts are exact.
def _keep_not_lowest(scores: np.ndarray, k: int, axis: int | None) -> np.ndarray:
    """Keep-mask pruning exactly the ``k`` lowest scores, over the whole array (axis None) or per column."""
    x = np.asarray(scores, np.float32)
    if axis is None:
        return _keep_not_lowest(x.reshape(-1, 1), k, 0).reshape(x.shape)
    if k <= 0:
        return np.ones(x.shape, bool)
    if k >= x.shape[0]:
        return np.zeros(x.shape, bool)
    t = np.partition(x, k - 1, axis=0)[k - 1]              # k-th smallest per column
    below, ties = x < t, x == t
    need = k - below.sum(axis=0)                           # how many of the ties go, first ones first
    return ~(below | (ties & (np.cumsum(ties, axis=0) <= need)))


def _rank_small_axis(x: np.ndarray, axis: int) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=axis, kind="stable"), axis=axis, kind="stable")


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask [in, out] keeping the ``n`` highest scores in every group of ``m`` consecutive inputs
    (rows) of each column."""
    x = np.asarray(scores, np.float32)
    i, o = x.shape
    return (_rank_small_axis(x.reshape(i // m, m, o), 1) >= m - n).reshape(i, o)


def _check_nm(shape, nm) -> None:
    if nm is not None and shape[0] % nm[1]:
        raise UserError(f"pattern {nm[0]}:{nm[1]}: input width {shape[0]} is not a multiple of {nm[1]}")


def select_mask(scores, sparsity: float, nm: tuple[int, int] | None, *, per_output: bool) -> np.ndarray:
    """Keep-mask from scores [in, out]: N:M per group, else the ``sparsity`` lowest per layer
    (``floor(s·in·out)``) or per output column (``floor(s·in)`` each)."""
    x = np.asarray(scores, np.float32)
    _check_nm(x.shape, nm)
    if nm is not None:
        return nm_mask(x, *nm)
    if per_output:
        return _keep_not_lowest(x, _floor(sparsity * x.shape[0]), 0)
    return _keep_not_lowest(x, _floor(sparsity * x.size), None)


def magnitude_mask(w, sparsity: float, nm=None) -> np.ndarray:
    """Keep-mask from ``|W|``, compared over the whole layer (or per N:M group)."""
    return select_mask(np.abs(np.asarray(w, np.float32)), sparsity, nm, per_output=False)


def wanda_scores(w, sq_norms) -> np.ndarray:
    """Wanda's ``S_ij = |W_ij| · ‖X_j‖₂`` in our [in, out] layout; ``sq_norms[j] = Σ_t x_tj²``."""
    return np.abs(np.asarray(w, np.float32)) * np.sqrt(np.asarray(sq_norms, np.float64)).astype(np.float32)[:, None]


def wanda_mask(w, sq_norms, sparsity: float, nm=None) -> np.ndarray:
    """Keep-mask from Wanda scores, compared per output (column) / per N:M group."""
    return select_mask(wanda_scores(w, sq_norms), sparsity, nm, per_output=True)


# ---- in-jit selection for SparseGPT (its masks depend on weights updated inside the sweep) --------
def _jnp_keep_not_lowest(x: jax.Array, k) -> jax.Array:
    """jnp version of ``_keep_not_lowest`` along axis 0 (same stable tie order); k may be traced."""
    srt = jnp.sort(x, axis=0)
    t = jnp.take(srt, jnp.clip(k - 1, 0, x.shape[0] - 1), axis=0)
    below, ties = x < t, x == t
    need = k - below.sum(axis=0)
    prune = (below | (ties & (jnp.cumsum(ties, axis=0) <= need))) & (k > 0)
    return ~prune


def _jnp_rank(x: jax.Array, axis: int) -> jax.Array:
    return jnp.argsort(jnp.argsort(x, axis=axis, stable=True), axis=axis, stable=True)


# ---- SparseGPT -----------------------------------------------------------------------------------
@jax.jit
def _hinv_upper(h: jax.Array, damp) -> jax.Array:
    """Upper Cholesky factor U of ``(H + damp·I)⁻¹ = UᵀU`` (NaN where the factorisation fails)."""
    n = h.shape[0]
    eye = jnp.eye(n, dtype=h.dtype)
    low = jnp.linalg.cholesky(h + damp * eye)
    hinv = jax.scipy.linalg.cho_solve((low, True), eye)
    hinv = 0.5 * (hinv + hinv.T)
    return jnp.linalg.cholesky(hinv).T


def _block_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Entries pruned per block of rows so every block is as near ``sparsity`` as possible and the
    layer total is exactly ``floor(sparsity · rows · cols)``."""
    out, prev = [], 0
    for i2 in range(blocksize, rows + blocksize, blocksize):
        cum = _floor(sparsity * min(i2, rows) * cols)
        out.append(cum - prev)
        prev = cum
    return out


@partial(jax.jit, static_argnames=("blocksize", "nm", "counts", "fixed"))
def _sparsegpt_core(w, u, keep_fixed, *, blocksize: int, nm, counts: tuple, fixed: bool):
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
            prune1 = ~_jnp_keep_not_lowest((w1 ** 2 / d[:, None] ** 2).reshape(-1, 1), counts[b]).reshape(w1.shape)
        else:
            prune1 = jnp.zeros(w1.shape, jnp.bool_)

        def step(i, carry, d=d, u1=u1):
            w1, err1, prune1 = carry
            if nm is not None and not fixed:  # at each group start: prune the M-N lowest w²/U_ii² per column
                n, m = nm

                def select(p):
                    wg = jax.lax.dynamic_slice_in_dim(w1, i, m, 0)
                    g = wg ** 2 / jax.lax.dynamic_slice_in_dim(d, i, m)[:, None] ** 2
                    return jax.lax.dynamic_update_slice_in_dim(p, _jnp_rank(g, 0) < m - n, i, 0)
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
    _check_nm(w.shape, nm)
    if nm is not None and blocksize % nm[1]:
        blocksize = (blocksize // nm[1] + 1) * nm[1]
    w = jnp.where(jnp.asarray(factor.dead)[:, None], 0.0, w)
    counts = tuple(_block_counts(rows, w.shape[1], blocksize, sparsity)) if nm is None and keep is None else ()
    fixed = keep is not None
    keep_arr = jnp.asarray(keep, jnp.bool_) if fixed else jnp.ones(w.shape, jnp.bool_)
    w_new, keep_out = _sparsegpt_core(w, factor.u, keep_arr, blocksize=blocksize, nm=nm, counts=counts, fixed=fixed)
    return w_new, keep_out, {"damp": factor.damp, "retries": factor.retries}


# ---- sequential calibration --------------------------------------------------------------------
class _Tap:
    """Wraps a Linear inside a traced forward and records its input."""

    def __init__(self, inner, sink: dict, key: str):
        self.inner, self.sink, self.key = inner, sink, key

    def __call__(self, x):
        self.sink[self.key] = x
        return self.inner(x)


def _stat(x: jax.Array, kind: str) -> jax.Array:
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return x.T @ x if kind == "sparsegpt" else jnp.sum(x * x, axis=0)


@partial(jax.jit, static_argnums=(0, 5))
def _capture(graphdef, state, h, cos, sin, kind: str) -> dict:
    """One decoder layer on hidden states h [B, S, hidden] -> input statistics of its linears."""
    layer = nnx.merge(graphdef, state)
    sink: dict = {}
    for key, (mod, attr) in TAPS.items():
        parent = getattr(layer, mod)
        setattr(parent, attr, _Tap(getattr(parent, attr), sink, key))
    layer(h, cos, sin)
    return {k: _stat(x, kind) for k, x in sink.items()}


@partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, h, cos, sin):
    return nnx.merge(graphdef, state)(h, cos, sin)[0]


def _compiled_bytes(fn, *args, **kwargs) -> int:
    """Peak memory XLA reports for ``fn(*args)`` compiled (arguments + outputs + temporaries)."""
    try:
        m = fn.lower(*args, **kwargs).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # memory_analysis is optional on some backends
        return 0


def _linear(layer, mod: str, attr: str) -> Linear:
    return getattr(getattr(layer, mod), attr)


@partial(jax.jit, static_argnames=("dtype",))
def _apply_keep(kernel, keep, dtype):
    return jnp.where(keep, kernel.astype(dtype), jnp.zeros((), dtype))


def _kernel_f32(lin: Linear) -> jax.Array:
    """``W ⊙ M`` (no LoRA: merged before pruning) in fp32."""
    mask = lin.weight_mask[...] if lin.weight_mask is not None else np.ones(lin.kernel[...].shape, bool)
    return _apply_keep(lin.kernel[...], mask, jnp.dtype(jnp.float32))


def set_weight_mask(lin: Linear, kernel: jax.Array, keep: jax.Array) -> None:
    """Install ``keep`` as the linear's ``weight_mask`` and ``kernel ⊙ keep`` as its kernel."""
    keep = jnp.asarray(keep, jnp.bool_)
    lin.kernel.set_value(_apply_keep(jnp.asarray(kernel), keep, jnp.dtype(lin.kernel[...].dtype)))
    if lin.weight_mask is None:
        lin.weight_mask = Mask(keep)
    else:
        lin.weight_mask.set_value(keep)


def _prune_layer(layer, li: int, chunks, rope, *, method: str, sparsity: float, nm, blocksize: int, percdamp: float,
                 warn, n_tokens: int, report: dict, measure: bool) -> tuple[dict, int]:
    """Prune the seven linears of one decoder layer in place, calibrated on ``chunks`` (its input hidden
    states; None for magnitude). Returns ({linear: sparsity}, peak compiled bytes of its passes if ``measure``)."""
    peak = 0
    stats = {}
    if chunks is not None:
        graphdef, state = nnx.split(layer)
        for h in chunks:
            cos, sin = rope(*h.shape[:2])
            if measure and not stats:
                peak = max(peak, _compiled_bytes(_capture, graphdef, state, h, cos, sin, method))
            for k, v in _capture(graphdef, state, h, cos, sin, method).items():
                v = np.asarray(v, np.float64)
                stats[k] = stats[k] + v if k in stats else v
    row, factors = {}, {}
    for mod, attr in LINEARS:
        lin = _linear(layer, mod, attr)
        w = _kernel_f32(lin)
        if w.size == 0:
            continue
        name = f"layers.{li}.{mod}.{attr}"
        if method in ("magnitude", "wanda"):  # host numpy selection, no compiled pass
            keep = (magnitude_mask(w, sparsity, nm) if method == "magnitude"
                    else wanda_mask(w, stats[INPUT_OF[attr]], sparsity, nm))
            new_w = w
        else:
            key = INPUT_OF[attr]
            if key not in factors:  # one factorisation per input: q/k/v and gate/up share theirs
                factors[key] = hessian_factor(2.0 * stats[key] / n_tokens, percdamp=percdamp, name=name, warn=warn)
                report["damp_retries"] += factors[key].retries
            new_w, keep, _ = sparsegpt(w, sparsity=sparsity, nm=nm, blocksize=blocksize, factor=factors[key])
            if measure:
                counts = tuple(_block_counts(w.shape[0], w.shape[1], blocksize, sparsity)) if nm is None else ()
                bs = blocksize if nm is None or blocksize % nm[1] == 0 else (blocksize // nm[1] + 1) * nm[1]
                peak = max(peak, _compiled_bytes(_sparsegpt_core, w, factors[key].u, jnp.asarray(keep),
                                                 blocksize=bs, nm=nm, counts=counts, fixed=False))
        set_weight_mask(lin, new_w, keep)
        row[attr] = 1.0 - float(np.asarray(keep).mean())
    return row, peak


def prune_model(model, calib: np.ndarray | None, *, method: str, sparsity: float, nm=None, batch_size: int = 8,
                blocksize: int = 128, percdamp: float = 0.01, progress: bool = True, warn=None,
                measure_memory: bool = False, layers=None) -> dict:
    """Prune every decoder linear of ``model`` in place (sequentially, layer by layer). Returns a report.

    ``calib`` [n, S] int tokens (not needed for magnitude). LoRA factors, if any, must be merged first.
    ``layers``: indices of the decoder layers to prune (None: all). The others keep every weight (an
    all-ones ``weight_mask`` unless they have one already) and still run, unpruned, in the sequential
    calibration, so a later layer is calibrated on what the final model feeds it.
    """
    from tqdm import tqdm

    from ..rope import rope_tables

    if method not in POSTTRAINING_METHODS:
        raise UserError(f"unknown post-training method {method!r}")
    if any(l.has_lora for _, l in _all_linears(model)):
        raise UserError("post-training pruning needs a model without LoRA factors (merge them first)")
    needs_data = method != "magnitude"
    num_layers = len(model.layers)
    prune_set = set(range(num_layers)) if layers is None else {int(i) for i in layers}
    if any(not 0 <= i < num_layers for i in prune_set):
        raise UserError(f"layers to prune {sorted(prune_set)}: out of range 0..{num_layers - 1}")
    t0 = time.perf_counter()
    peak = 0
    report = {"method": method, "sparsity": sparsity, "pattern": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}",
              "layers": [], "damp_retries": 0,
              "excluded_layers": [i for i in range(num_layers) if i not in prune_set]}
    chunks, rope, n_tokens = None, None, 0
    if needs_data:
        calib = np.asarray(calib, np.int32)
        if calib.ndim != 2 or len(calib) == 0:
            raise UserError("calibration data is empty")
        emb = model.embed_tokens[...]
        chunks = [jnp.take(emb, jnp.asarray(calib[i:i + batch_size]), axis=0) for i in range(0, len(calib), batch_size)]
        n_tokens = calib.size
        tables = {}

        def rope(b, s):
            if (b, s) not in tables:
                pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
                tables[(b, s)] = jax.jit(lambda p: rope_tables(model.config, p, s))(pos)
            return tables[(b, s)]
    first = min(prune_set, default=-1)  # the compiled passes' memory is measured on the first pruned layer
    for li, layer in enumerate(tqdm(model.layers, desc=f"prune {method}", unit="layer", disable=not progress)):
        measure = measure_memory and li == first
        if li not in prune_set:  # excluded: every weight stays; an all-ones mask records "kept dense"
            row = {}
            for mod, attr in LINEARS:
                lin = _linear(layer, mod, attr)
                if lin.weight_mask is None:
                    lin.weight_mask = Mask(jnp.ones(lin.kernel[...].shape, jnp.bool_))
                row[attr] = 1.0 - float(np.asarray(lin.weight_mask[...]).mean())
        else:
            row, layer_peak = _prune_layer(layer, li, chunks, rope, method=method, sparsity=sparsity, nm=nm,
                                           blocksize=blocksize, percdamp=percdamp, warn=warn, n_tokens=n_tokens,
                                           report=report, measure=measure)
            peak = max(peak, layer_peak)
        report["layers"].append(row)
        if needs_data and any(j > li for j in prune_set):  # this layer's (pruned) output feeds the next one
            graphdef, state = nnx.split(layer)
            if measure:
                peak = max(peak, _compiled_bytes(_forward, graphdef, state, chunks[0], *rope(*chunks[0].shape[:2])))
            chunks = [_forward(graphdef, state, h, *rope(*h.shape[:2])) for h in chunks]
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    report["seconds"] = time.perf_counter() - t0
    if measure_memory:
        report["peak_compiled_bytes"] = peak
    report["sparsity_measured"] = sparsity_of(model)
    return report


def _all_linears(model):
    from ..weights import linears
    return linears(model)


def sparsity_of(model) -> float:
    """Fraction of zero mask entries over all weight-masked linears."""
    total = zeros = 0
    for _, lin in _all_linears(model):
        if lin.weight_mask is not None:
            m = np.asarray(lin.weight_mask[...])
            total += m.size
            zeros += int(m.size - m.sum())
    return zeros / total if total else 0.0


# ---- keep-sparsity fine-tuning -----------------------------------------------------------------
def attach_sparsity_masks(model) -> list[str]:
    """Give every decoder linear without a ``weight_mask`` the mask ``W != 0`` (kept masks stay).

    Returns the paths that got a new mask. Used by ``finetune --keep-sparsity`` for inputs that
    carry no masks (an HF dir exported from a pruned model)."""
    added = []
    for li, layer in enumerate(model.layers):
        for mod, attr in LINEARS:
            lin = _linear(layer, mod, attr)
            if lin.weight_mask is None:
                lin.weight_mask = Mask(lin.kernel[...] != 0)
                added.append(f"layers.{li}.{mod}.{attr}")
    return added


# ---- CLI -----------------------------------------------------------------------------------------
def add_posttraining_args(p) -> None:
    """Options of `jaxprune prune` for magnitude / wanda / sparsegpt element-wise pruning."""
    p.add_argument("--sparsity", type=float, default=None,
                   help="element-wise pruning: fraction of every decoder linear's weights set to zero "
                        "(selects the unstructured path for magnitude; N:M patterns imply it); every decoder "
                        "layer is pruned unless --exclude-layers lists indices (its 'default' means none here)")
    p.add_argument("--pattern", default=None,
                   help="element-wise pattern: 'unstructured' (default) or N:M, e.g. 2:4, 4:8 (N kept of M)")
    p.add_argument("--calib", default=None, help="calibration text (.txt or dir; default: --text)")
    p.add_argument("--blocksize", type=int, default=128, help="sparsegpt: lazy-update block of input rows")
    p.add_argument("--percdamp", type=float, default=0.01, help="sparsegpt: dampening λ = percdamp·mean(diag H)")
    p.add_argument("--calib-batch", type=int, default=8, help="calibration sequences per jitted pass")


def is_posttraining(args) -> bool:
    return (args.method in ("wanda", "sparsegpt") or getattr(args, "sparsity", None) is not None
            or getattr(args, "pattern", None) is not None)


def posttraining_layers(num_layers: int, exclude) -> list[int]:
    """The decoder layers element-wise pruning prunes for ``--exclude-layers``: comma-separated indices, 'none'
    or 'default' -- which here means *no* layer excluded, the protocol of the Wanda and SparseGPT papers
    (structured pruning's default keeps layers < int(0.1·L) and the last one dense; list them to get that)."""
    from .cli import prunable_layers

    return prunable_layers(num_layers, "none" if exclude in (None, "default") else exclude)


def calibration_tokens(path, tokenizer, n: int, length: int, seed: int = 0) -> np.ndarray:
    """n windows of ``length`` tokens from the text at ``path`` ([n, length], seeded)."""
    from ..data import Blocks, token_stream

    if n < 1 or length < 2:
        raise UserError("--calib-samples must be >= 1 and --calib-len >= 2")
    blocks = Blocks.from_stream(token_stream(path, tokenizer), length, seed=seed)
    return blocks.calibration(n, length, seed=seed)


def cmd_prune_posttraining(args) -> dict:
    """`jaxprune prune MODEL --method {magnitude,wanda,sparsegpt} --sparsity S --pattern P --out CKPT`."""
    from .. import checkpoint, load
    from ..hf import check_output_dir
    from ..train_cli import merge_lora

    if args.method not in POSTTRAINING_METHODS:
        raise UserError(f"--sparsity / --pattern apply to {', '.join(POSTTRAINING_METHODS)}, "
                        f"not --method {args.method}")
    nm = parse_pattern(args.pattern)
    sparsity = resolve_sparsity(args.sparsity, nm)
    if not args.out:
        raise UserError("--out DIR is required")
    if args.blocksize < 1:
        raise UserError("--blocksize must be >= 1")
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    calib_path = args.calib or args.text
    if args.method != "magnitude" and not calib_path:
        raise UserError(f"--method {args.method} needs calibration text: --calib FILE (or --text)")
    model = load.load_model(args.model, args.dtype)
    layers = posttraining_layers(model.config.num_layers, getattr(args, "exclude_layers", None))
    if any(l.has_lora for _, l in _all_linears(model)):
        model = merge_lora(model)
    tok = load.load_tokenizer(args.model, required=args.method != "magnitude")
    calib = None
    if args.method != "magnitude":
        calib = calibration_tokens(calib_path, tok, args.calib_samples, args.calib_len, args.seed)
    report = prune_model(model, calib, method=args.method, sparsity=sparsity, nm=nm, batch_size=args.calib_batch,
                         blocksize=args.blocksize, percdamp=args.percdamp, progress=args.progress, layers=layers)
    meta = {"pruned_from": str(args.model), "method": args.method, "sparsity": sparsity,
            "pattern": report["pattern"], "excluded_layers": report["excluded_layers"]}
    checkpoint.save_model(model, out, tokenizer=tok, overwrite=args.overwrite, extra_meta=meta)
    summary = {**meta, "model_dir": str(out), "sparsity_measured": report["sparsity_measured"],
               "seconds": report["seconds"], "damp_retries": report["damp_retries"],
               "calib_tokens": 0 if calib is None else int(calib.size)}
    if not args.json:
        excl = report["excluded_layers"]
        print(f"pruned {args.method} {report['pattern']} sparsity {sparsity:g}: "
              f"{100 * report['sparsity_measured']:.2f}% of decoder linear weights are zero"
              f"{f' (layers {excl} excluded, kept dense)' if excl else ''}; model in {out}", file=sys.stderr)
    return summary
