"""SlimGPT (Ling et al., NeurIPS 2024, arXiv 2412.18110): layer-wise structured Optimal Brain Surgeon on the
input channels of ``o_proj`` (attention heads) and ``down_proj`` (MLP channels), the remaining channels of the
same linear compensated. No official repository is public; the port follows the authors' code as vendored in
aden9460/EdgeVAR ``slimgpt_pub/slim_utils/slimgpt.py`` (``SlimGPT.struct_prune``) and ``prune.py`` (sequential
layer loop, ``log_increase`` non-uniform sparsity).

Per layer, on the calibration inputs X [in, N] of the linear (our W [in, out]: input channel j is row j)::

    H = 2 X Xᵀ / n  (+ λ·mean diag H · I)              H⁻¹ from its Cholesky factor
    error_j = Σ_out W[j, :]² / d_j                     d_j = [H⁻¹]_jj (MLP channels), or per head the squared
                                                       diagonal of chol([H⁻¹]_head block) (grouped Cholesky)
    Batched Greedy Pruning: the lowest-error unit (heads: one per round) or the ``cnt`` lowest-error channels
    (Dynamic Group Size: cnt = min(left, max(b, 64), 1024), b = (target − 512) // 2, halving towards 64 after
    each round) go; with U = chol(H⁻¹ permuted so they come first, upper), column by column i < cnt:
        E_i = W_i / U_ii,  W_{i..cnt} −= E_i U_{i, i..cnt}                  (local update)
    then W_rest −= E U_{:cnt, rest} (global update); pruned rows of H become the identity; repeat.

Sequential: heads of layer l are chosen on ``o_proj``'s inputs given layers < l already pruned and compensated;
the layer is run again with its heads pruned to collect ``down_proj``'s inputs; its output feeds layer l + 1.

Incremental Pruning Ratio (``--widths incremental``, ``masks.incremental_ratios``): layer k of n keeps a ratio
rising as ln(1 + k), mean = --ratio (their LLaMA-7B 20% run: 0.0625 … 0.25). Measured on SmolLM2-135M (README,
"The best pruned model for a budget") it is no better than ``layerwise`` (74.25 vs 73.98 retraining-free at ~31%
of the parameters), and both need per-layer widths, so SlimGPT's default is ``--widths uniform``: a stock
transformers model, 72.26 after 30 LoRA steps at 30.1% removed — ``prune``'s default recipe.

GQA: ``--attn-unit kv_group`` removes a KV head with its G query heads (a unit is their G·D ``o_proj`` rows);
``q_head`` removes the same number of query heads from every KV group (a full group's heads leave the race).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.linalg import lapack, solve_triangular
from tqdm import tqdm

from ..errors import UserError
from ..partition import combine
from ..sharding import to_host
from .groups import head_mask_from_units
from .masks import masks_replaced
from .posttraining import capture_input_stats, forward_layer, rope_tables
from .registry import STRUCTURED, ScoreInputs, StructuredCriterion, option


@dataclass(frozen=True)
class SlimGPTOptions:
    percdamp: float = option(0.01, "dampening λ added to the diagonal of H = 2XXᵀ/n, a fraction of its mean "
                                   "diagonal", lo=0.0)


def _cholesky_inverse(h: np.ndarray) -> np.ndarray:
    """H⁻¹ through Cholesky (torch.cholesky_inverse(torch.linalg.cholesky(H))): LAPACK potrf + potri."""
    lo, info = lapack.dpotrf(h, lower=True)
    if info != 0:
        raise np.linalg.LinAlgError("not positive definite")
    inv, info = lapack.dpotri(lo, lower=True)
    if info != 0:
        raise np.linalg.LinAlgError("singular")
    return np.tril(inv) + np.tril(inv, -1).T


def obs_prune(w: np.ndarray, h: np.ndarray, n_units: int, unit_size: int, *, groups: np.ndarray | None = None,
              per_group: int | None = None, percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """SlimGPT's ``struct_prune`` on one linear: w [in, out], h [in, in] (2XXᵀ/n of its input). Removes ``n_units``
    units of ``unit_size`` consecutive input rows (unit_size 1: Dynamic Group Size batches; > 1: one unit per
    round). ``groups`` [in // unit_size] with ``per_group``: at most that many units of each group (GQA q_head).
    Returns (compensated w [in, out] float64 with pruned rows zero, pruned unit mask [in // unit_size] bool).

    Where the authors refactor H⁻¹ and the permuted H⁻¹ every round (O(in³)), this keeps H⁻¹ and updates it:
    with P the pruned inputs and R the rest, the round's upper Cholesky rows are U_PP = chol(H⁻¹_PP)ᵀ and
    U_PR = U_PP⁻ᵀ H⁻¹_PR, and the inverse of H with P's rows and columns set to the identity is
    H⁻¹_RR − U_PRᵀ U_PR (a Schur complement), O(in²·|P|) — the same numbers to rounding."""
    W = np.array(w, np.float64)  # [in, out]: input channel j is row j (their column j)
    H = np.array(h, np.float64)
    cols = W.shape[0]
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    if percdamp > 0:
        H[np.diag_indices(cols)] += percdamp * np.mean(np.diag(H))
    try:
        hinv = _cholesky_inverse(H)
    except np.linalg.LinAlgError:
        raise UserError("SlimGPT: the calibration inputs' H is not positive definite; raise the dampening",
                        field="percdamp", value=percdamp) from None
    n_all = cols // unit_size
    pruned = np.zeros(cols, bool)
    target = n_units * unit_size
    block = (target - 512) // 2
    while pruned.sum() < target:
        if unit_size > 1:
            blocks = np.stack([hinv[i:i + unit_size, i:i + unit_size] for i in range(0, cols, unit_size)])
            d = np.diagonal(np.linalg.cholesky(blocks), axis1=-2, axis2=-1).reshape(-1) ** 2
        else:
            d = np.diag(hinv)
        err = (W ** 2 / d[:, None]).sum(axis=1)
        err[pruned] = np.inf
        if unit_size > 1:
            unit_err = err.reshape(n_all, unit_size).sum(axis=1)
            if groups is not None:
                counts = np.bincount(groups[pruned.reshape(n_all, unit_size)[:, 0]], minlength=groups.max() + 1)
                unit_err[counts[groups] >= per_group] = np.inf
            order = np.argsort(unit_err, kind="stable")
            sort_idx = (order[:, None] * unit_size + np.arange(unit_size)).reshape(-1)
            cnt = unit_size
        else:
            sort_idx = np.argsort(err, kind="stable")
            cnt = int(min(target - pruned.sum(), max(block, 64), 1024))
        idx, rest = sort_idx[:cnt], sort_idx[cnt:cols - int(pruned.sum())]  # the pruned ones sort last
        lower = np.linalg.cholesky(hinv[np.ix_(idx, idx)])
        u_pp = lower.T
        u_pr = np.linalg.solve(lower, hinv[np.ix_(idx, rest)])
        # the authors' row-by-row local update (E_i = W1_i / U_ii; W1_{i:} -= U_{i,i:}ᵀ E_i) is forward
        # substitution: Uᵀ E = W1, one triangular solve
        E = solve_triangular(lower, W[idx], lower=True, check_finite=False)
        W[idx] = 0.0
        W[rest] -= u_pr.T @ E  # global update
        hinv[np.ix_(rest, rest)] -= u_pr.T @ u_pr
        hinv[idx, :] = 0.0
        hinv[:, idx] = 0.0
        hinv[idx, idx] = 1.0
        pruned[idx] = True
        if unit_size == 1:
            block = (block - 512) // 2
    return W, pruned.reshape(n_all, unit_size)[:, 0]


def _attention_units(cfg, i: int, unit: str, ratio: float):
    """(unit_size in o_proj rows, n_units, groups, per_group) of layer i's heads at ``ratio``."""
    H, KV, D = cfg.heads(i), cfg.kv_heads(i), cfg.head_dim
    G = H // KV
    if unit == "kv_group":
        return G * D, int(ratio * KV), None, None
    per = int(ratio * G)
    return D, per * KV, np.repeat(np.arange(KV), G), per


def slimgpt_select(x: ScoreInputs, ratios: dict[int, float], progress: bool | None = None):
    """Masks of every layer in ``ratios`` ({layer: fraction of units removed}) chosen by sequential structured OBS;
    the compensated ``o_proj`` / ``down_proj`` kernels are left in ``x.cache['slimgpt']`` for
    :func:`slimgpt_updates`. Returns the host masks (``nnx.State`` like ``x.masks``)."""
    if x.calib is None:
        raise UserError("slimgpt needs calibration samples")
    progress = x.progress if progress is None else progress
    opts = x.options or SlimGPTOptions()
    cfg = x.cfg
    host = jax.tree.map(jnp.asarray, to_host((x.frozen, x.trainable, x.masks)))
    model = combine(x.graphdef, *host)
    model.remat = False
    calib = np.asarray(x.calib, np.int32)
    step = x.calib_batch or len(calib)
    chunks = [model.embed(jnp.asarray(calib[i:i + step])) for i in range(0, len(calib), step)]
    rope = rope_tables(model)
    new_kernels = {}
    last = max(ratios, default=-1)
    for li, layer in enumerate(tqdm(model.layers[:last + 1], desc="prune slimgpt", unit="layer", disable=not progress)):
        r = ratios.get(li)
        if r is not None and cfg.heads(li):
            hess = capture_input_stats(layer, chunks, rope(li), "o", "xtx")
            size, n, groups, per = _attention_units(cfg, li, x.unit, r)
            if n:
                w, gone = obs_prune(layer.self_attn.o_proj.kernel[...], 2 * hess / calib.size, n, size,
                                    groups=groups, per_group=per, percdamp=opts.percdamp)
                head_mask = np.asarray(head_mask_from_units(jnp.asarray(~gone), cfg.heads(li),
                                                            cfg.kv_heads(li), x.unit))
                _set(layer.self_attn.o_proj.kernel, w)
                layer.self_attn.head_mask.set_value(jnp.asarray(head_mask & np.asarray(layer.self_attn.head_mask[...])))
                new_kernels[(li, "self_attn", "o_proj")] = w
        if r is not None and cfg.mlp_width(li):
            hess = capture_input_stats(layer, chunks, rope(li), "down", "xtx")
            n = int(r * cfg.mlp_width(li))
            if n:
                w, gone = obs_prune(layer.mlp.down_proj.kernel[...], 2 * hess / calib.size, n, 1,
                                    percdamp=opts.percdamp)
                _set(layer.mlp.down_proj.kernel, w)
                layer.mlp.channel_mask.set_value(jnp.asarray(~gone & np.asarray(layer.mlp.channel_mask[...])))
                new_kernels[(li, "mlp", "down_proj")] = w
        if li < last:
            chunks = forward_layer(layer, chunks, rope(li))
    x.cache["slimgpt"] = new_kernels
    return _masks_of(model, x.masks)


def _set(var, w: np.ndarray) -> None:
    var.set_value(jnp.asarray(w, var[...].dtype))


def _masks_of(model, like):
    """The structured masks now in ``model``, as a host pytree shaped like ``like``."""
    d = to_host(nnx.to_pure_dict(like))
    for i, layer in enumerate(model.layers):
        d["layers"][i]["self_attn"]["head_mask"] = np.asarray(layer.self_attn.head_mask[...])
        d["layers"][i]["mlp"]["channel_mask"] = np.asarray(layer.mlp.channel_mask[...])
    return masks_replaced(like, d)


def slimgpt_updates(x: ScoreInputs, masks) -> dict[tuple, np.ndarray]:
    """{(layer, block, linear, 'kernel'): new − old [in, out]}: the OBS compensation of :func:`slimgpt_select`."""
    frozen = x.frozen_arrays()
    return {(i, block, name, "kernel"): w - np.asarray(frozen["layers"][i][block][name]["kernel"], np.float64)
            for (i, block, name), w in x.cache["slimgpt"].items()}


NAME = "slimgpt"

STRUCTURED.register(StructuredCriterion(
    NAME, "layer-wise structured OBS on o_proj / down_proj inputs (grouped-Cholesky head errors, one head per "
    "round; MLP channels in shrinking batches), remaining rows compensated; log-increasing per-layer ratios",
    None, ("calibration",), SlimGPTOptions,
    citation="Ling et al. 2024, arXiv 2412.18110 (authors' struct_prune as vendored in aden9460/EdgeVAR slimgpt_pub)",
    default_widths="uniform", compensate=slimgpt_updates, compensates=("kernel",), select=slimgpt_select))
