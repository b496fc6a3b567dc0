"""Masked low-rank matmul ``y = x @ ((W + s·(A @ B)) ⊙ M)`` without materialising the merged weight
(issue 7, part 2; the SLTrain / LoRAPrune "sparse + low-rank" layer).

Shapes: ``x [..., K]``, ``W [K, N]``, ``A [K, r]``, ``B [r, N]``, ``M [K, N]`` bool, scale ``s``.
Structured special case: ``mask_rows [K]`` / ``mask_cols [N]`` (``M = rows[:, None] & cols[None, :]``)
with no ``[K, N]`` mask in memory.

Each kernel step loads a ``W`` tile ``[bk, bn]``, the matching rows of ``A`` ``[bk, r]``, columns of
``B`` ``[r, bn]`` and mask tile, merges ``W' = (W + s·A@B) ⊙ M`` in VMEM/SRAM (float32) and
accumulates ``x_tile @ W'`` in float32.

Backward (``jax.custom_vjp``; ``W`` and ``M`` are frozen, i.e. zero cotangent, and the API applies
``stop_gradient`` to ``W`` so that the XLA path agrees)::

    W' = (W + s·A@B) ⊙ M,    G = (xᵀ dy) ⊙ M
    dx = dy W'ᵀ               (tile-wise kernel, W' merged per tile again)
    dA = s · G Bᵀ,  dB = s · Aᵀ G   (one kernel: each program builds one G tile [bk, bn] from
                                     x and dy, then emits partial dA [bk, r] and dB [r, bn];
                                     partials are summed by XLA -- G is never materialised)

Kernel flavours: ``tpu`` (3-D grid with the reduction axis last and BlockSpec tiling) and ``gpu``
(Triton style: 2-D grid, reduction loop inside the kernel).  Both run in interpret mode on CPU.

Padding: ``M``/``K``/``N`` are zero-padded to tile multiples and ``r`` to the flavour's rank multiple
(``block_sizes.pad_rank``); padded mask entries are 0, so padding never leaks into results.
Tile sizes are shrunk for small dimensions by ``block_sizes.fit_tile`` (powers of 2 for Triton).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import reference
from .block_sizes import TileSizes, fit_tile, pad_rank, pad_to, resolve_impl, round_up, tile_sizes

F32 = jnp.float32


class _Cfg(NamedTuple):
    """Static configuration (nondiff argument of the custom VJP)."""

    variant: str  # "tpu" | "gpu"
    interpret: bool
    tiles: TileSizes
    r_pad: int
    scale: float
    kind: str  # "dense" | "rowcol"
    k: int  # unpadded contraction size K
    r: int  # unpadded rank r


# --------------------------------------------------------------------------------------------
# Tile math shared by every kernel
# --------------------------------------------------------------------------------------------


def _keep(masks):
    """Bool tile ``[bk, bn]`` from ``(mask [bk, bn],)`` or ``(rows [bk, 1], cols [1, bn])`` (int8)."""
    if len(masks) == 1:
        return masks[0] != 0
    return (masks[0] != 0) & (masks[1] != 0)


def _merged_tile(w, a, b, masks, scale):
    """``W'_tile = (W_tile + s · A_rows @ B_cols) ⊙ M_tile`` in float32, ``[bk, bn]``."""
    merged = w.astype(F32) + scale * jnp.dot(a, b, preferred_element_type=F32)
    return jnp.where(_keep(masks), merged, 0.0)


def _dot_nt(a, b):
    """``a @ bᵀ`` with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_tn(a, b):
    """``aᵀ @ b`` with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _grad_partials(g_acc, a, b, masks, scale):
    """From ``xᵀdy`` tile ``[bk, bn]``: ``G = (xᵀdy) ⊙ M``; return ``(s·G Bᵀ [bk, r], s·Aᵀ G [r, bn])``."""
    g = jnp.where(_keep(masks), g_acc, 0.0)
    return scale * _dot_nt(g, b.astype(F32)), scale * _dot_tn(a.astype(F32), g)


# --------------------------------------------------------------------------------------------
# tpu flavour: 3-D grid, reduction axis last, one tile per operand per step
# --------------------------------------------------------------------------------------------


def _weight_specs(kn, t: TileSizes, r: int, kind: str):
    """BlockSpecs of ``W, A, B, *masks`` at weight tile ``kn(*grid_idx) = (k, n)``."""
    spec = lambda shape, f: pl.BlockSpec(shape, lambda *g: f(*kn(*g)))  # noqa: E731
    specs = [spec((t.bk, t.bn), lambda k, n: (k, n)), spec((t.bk, r), lambda k, n: (k, 0)),
             spec((r, t.bn), lambda k, n: (0, n))]
    if kind == "dense":
        return specs + [spec((t.bk, t.bn), lambda k, n: (k, n))]
    return specs + [spec((t.bk, 1), lambda k, n: (k, 0)), spec((1, t.bn), lambda k, n: (0, n))]


def _tpu_params(interpret, sem):
    return None if interpret else pltpu.CompilerParams(dimension_semantics=sem)


def _fwd_kernel_tpu(x_ref, w_ref, a_ref, b_ref, *rest, scale):
    """Step ``(i, j, k)``: ``y[i, j] += x[i, k] @ W'[k, j]``."""
    *m_refs, o_ref = rest

    @pl.when(pl.program_id(2) == 0)
    def _init():
        o_ref[...] = jnp.zeros_like(o_ref)

    wm = _merged_tile(w_ref[...], a_ref[...], b_ref[...], [r[...] for r in m_refs], scale)
    o_ref[...] += jnp.dot(x_ref[...], wm.astype(x_ref.dtype), preferred_element_type=F32)


def _fwd_tpu(cfg: _Cfg, xp, wp, ap, bp, masks):
    t, (mp, kp), np_ = cfg.tiles, xp.shape, wp.shape[1]
    return pl.pallas_call(
        functools.partial(_fwd_kernel_tpu, scale=cfg.scale),
        out_shape=jax.ShapeDtypeStruct((mp, np_), F32), grid=(mp // t.bm, np_ // t.bn, kp // t.bk),
        in_specs=[pl.BlockSpec((t.bm, t.bk), lambda i, j, k: (i, k)),
                  *_weight_specs(lambda i, j, k: (k, j), t, cfg.r_pad, cfg.kind)],
        out_specs=pl.BlockSpec((t.bm, t.bn), lambda i, j, k: (i, j)), interpret=cfg.interpret,
        compiler_params=_tpu_params(cfg.interpret, ("parallel", "parallel", "arbitrary")),
    )(xp, wp, ap, bp, *masks)


def _dx_kernel_tpu(dy_ref, w_ref, a_ref, b_ref, *rest, scale):
    """Step ``(i, k, n)``: ``dx[i, k] += dy[i, n] @ W'[k, n]ᵀ``."""
    *m_refs, o_ref = rest

    @pl.when(pl.program_id(2) == 0)
    def _init():
        o_ref[...] = jnp.zeros_like(o_ref)

    wm = _merged_tile(w_ref[...], a_ref[...], b_ref[...], [r[...] for r in m_refs], scale)
    o_ref[...] += _dot_nt(dy_ref[...], wm.astype(dy_ref.dtype))


def _dx_tpu(cfg: _Cfg, dyp, wp, ap, bp, masks):
    t, (mp, np_), kp = cfg.tiles, dyp.shape, wp.shape[0]
    return pl.pallas_call(
        functools.partial(_dx_kernel_tpu, scale=cfg.scale),
        out_shape=jax.ShapeDtypeStruct((mp, kp), F32), grid=(mp // t.bm, kp // t.bk, np_ // t.bn),
        in_specs=[pl.BlockSpec((t.bm, t.bn), lambda i, k, n: (i, n)),
                  *_weight_specs(lambda i, k, n: (k, n), t, cfg.r_pad, cfg.kind)],
        out_specs=pl.BlockSpec((t.bm, t.bk), lambda i, k, n: (i, k)), interpret=cfg.interpret,
        compiler_params=_tpu_params(cfg.interpret, ("parallel", "parallel", "arbitrary")),
    )(dyp, wp, ap, bp, *masks)


def _dab_kernel_tpu(x_ref, dy_ref, a_ref, b_ref, *rest, scale):
    """Step ``(k, n, m)``: ``acc += x[m, k]ᵀ dy[m, n]``; at the last m emit the dA / dB partials."""
    *m_refs, da_ref, db_ref, acc_ref = rest
    m = pl.program_id(2)

    @pl.when(m == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += _dot_tn(x_ref[...], dy_ref[...])

    @pl.when(m == pl.num_programs(2) - 1)
    def _emit():
        da, db = _grad_partials(acc_ref[...], a_ref[...], b_ref[...], [r[...] for r in m_refs], scale)
        da_ref[...], db_ref[...] = da, db


def _dab_tpu(cfg: _Cfg, xp, dyp, ap, bp, masks):
    t, (mp, kp), np_, r = cfg.tiles, xp.shape, dyp.shape[1], cfg.r_pad
    kb, nb = kp // t.bk, np_ // t.bn
    w_specs = _weight_specs(lambda k, n, m: (k, n), t, r, cfg.kind)
    return pl.pallas_call(
        functools.partial(_dab_kernel_tpu, scale=cfg.scale),
        out_shape=(jax.ShapeDtypeStruct((nb, kp, r), F32), jax.ShapeDtypeStruct((kb, r, np_), F32)),
        grid=(kb, nb, mp // t.bm),
        in_specs=[pl.BlockSpec((t.bm, t.bk), lambda k, n, m: (m, k)),
                  pl.BlockSpec((t.bm, t.bn), lambda k, n, m: (m, n)), *w_specs[1:]],
        out_specs=(pl.BlockSpec((None, t.bk, r), lambda k, n, m: (n, k, 0)),
                   pl.BlockSpec((None, r, t.bn), lambda k, n, m: (k, 0, n))),
        scratch_shapes=[pltpu.VMEM((t.bk, t.bn), F32)], interpret=cfg.interpret,
        compiler_params=_tpu_params(cfg.interpret, ("parallel", "parallel", "arbitrary")),
    )(xp, dyp, ap, bp, *masks)


# --------------------------------------------------------------------------------------------
# gpu flavour: 2-D grid, reduction loop inside the kernel (Triton style)
# --------------------------------------------------------------------------------------------


def _rows(ref, i, size):
    return ref[pl.ds(pl.multiple_of(i * size, size), size), :]


def _cols(ref, i, size):
    return ref[:, pl.ds(pl.multiple_of(i * size, size), size)]


def _full(a):
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _fwd_kernel_gpu(x_ref, w_ref, a_ref, b_ref, *rest, scale, bk):
    """Program ``(i, j)``: ``y[i, j] = sum_k x[i, k] @ W'[k, j]`` (refs: x row strip, W column strip)."""
    *m_refs, o_ref = rest
    dense = len(m_refs) == 1

    def body(k, acc):
        masks = [_rows(m_refs[0], k, bk)] if dense else [_rows(m_refs[0], k, bk), m_refs[1][...]]
        wm = _merged_tile(_rows(w_ref, k, bk), _rows(a_ref, k, bk), b_ref[...], masks, scale)
        return acc + jnp.dot(_cols(x_ref, k, bk), wm.astype(x_ref.dtype), preferred_element_type=F32)

    o_ref[...] = jax.lax.fori_loop(0, w_ref.shape[0] // bk, body, jnp.zeros(o_ref.shape, F32))


def _fwd_gpu(cfg: _Cfg, xp, wp, ap, bp, masks):
    t, (mp, kp), np_ = cfg.tiles, xp.shape, wp.shape[1]
    col = lambda rows: pl.BlockSpec((rows, t.bn), lambda i, j: (0, j))  # noqa: E731
    m_specs = [col(kp)] if cfg.kind == "dense" else [_full(masks[0]), col(1)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel_gpu, scale=cfg.scale, bk=t.bk),
        out_shape=jax.ShapeDtypeStruct((mp, np_), F32), grid=(mp // t.bm, np_ // t.bn),
        in_specs=[pl.BlockSpec((t.bm, kp), lambda i, j: (i, 0)), col(kp), _full(ap), col(cfg.r_pad),
                  *m_specs],
        out_specs=pl.BlockSpec((t.bm, t.bn), lambda i, j: (i, j)), interpret=cfg.interpret,
    )(xp, wp, ap, bp, *masks)


def _dx_kernel_gpu(dy_ref, w_ref, a_ref, b_ref, *rest, scale, bn):
    """Program ``(i, k)``: ``dx[i, k] = sum_n dy[i, n] @ W'[k, n]ᵀ`` (refs: dy row strip, W row strip)."""
    *m_refs, o_ref = rest
    dense = len(m_refs) == 1

    def body(n, acc):
        masks = [_cols(m_refs[0], n, bn)] if dense else [m_refs[0][...], _cols(m_refs[1], n, bn)]
        wm = _merged_tile(_cols(w_ref, n, bn), a_ref[...], _cols(b_ref, n, bn), masks, scale)
        return acc + _dot_nt(_cols(dy_ref, n, bn), wm.astype(dy_ref.dtype))

    o_ref[...] = jax.lax.fori_loop(0, w_ref.shape[1] // bn, body, jnp.zeros(o_ref.shape, F32))


def _dx_gpu(cfg: _Cfg, dyp, wp, ap, bp, masks):
    t, (mp, np_), kp = cfg.tiles, dyp.shape, wp.shape[0]
    row = lambda cols: pl.BlockSpec((t.bk, cols), lambda i, k: (k, 0))  # noqa: E731
    m_specs = [row(np_)] if cfg.kind == "dense" else [row(1), _full(masks[1])]
    return pl.pallas_call(
        functools.partial(_dx_kernel_gpu, scale=cfg.scale, bn=t.bn),
        out_shape=jax.ShapeDtypeStruct((mp, kp), F32), grid=(mp // t.bm, kp // t.bk),
        in_specs=[pl.BlockSpec((t.bm, np_), lambda i, k: (i, 0)), row(np_), row(cfg.r_pad), _full(bp),
                  *m_specs],
        out_specs=pl.BlockSpec((t.bm, t.bk), lambda i, k: (i, k)), interpret=cfg.interpret,
    )(dyp, wp, ap, bp, *masks)


def _dab_kernel_gpu(x_ref, dy_ref, a_ref, b_ref, *rest, scale, bm):
    """Program ``(k, n)``: ``G = sum_m x[m, k]ᵀ dy[m, n]``; emit ``s·(G⊙M) Bᵀ`` and ``s·Aᵀ (G⊙M)``."""
    *m_refs, da_ref, db_ref = rest

    def body(m, acc):
        return acc + _dot_tn(_rows(x_ref, m, bm), _rows(dy_ref, m, bm))

    g = jax.lax.fori_loop(0, x_ref.shape[0] // bm, body, jnp.zeros((x_ref.shape[1], dy_ref.shape[1]), F32))
    da, db = _grad_partials(g, a_ref[...], b_ref[...], [r[...] for r in m_refs], scale)
    da_ref[...], db_ref[...] = da, db


def _dab_gpu(cfg: _Cfg, xp, dyp, ap, bp, masks):
    t, (mp, kp), np_, r = cfg.tiles, xp.shape, dyp.shape[1], cfg.r_pad
    kb, nb = kp // t.bk, np_ // t.bn
    w_specs = [pl.BlockSpec(s.block_shape, lambda k, n, f=s.index_map: f(k, n, 0))
               for s in _weight_specs(lambda k, n, m: (k, n), t, r, cfg.kind)]
    return pl.pallas_call(
        functools.partial(_dab_kernel_gpu, scale=cfg.scale, bm=t.bm),
        out_shape=(jax.ShapeDtypeStruct((nb, kp, r), F32), jax.ShapeDtypeStruct((kb, r, np_), F32)),
        grid=(kb, nb),
        in_specs=[pl.BlockSpec((mp, t.bk), lambda k, n: (0, k)), pl.BlockSpec((mp, t.bn), lambda k, n: (0, n)),
                  *w_specs[1:]],
        out_specs=(pl.BlockSpec((None, t.bk, r), lambda k, n: (n, k, 0)),
                   pl.BlockSpec((None, r, t.bn), lambda k, n: (k, 0, n))),
        interpret=cfg.interpret,
    )(xp, dyp, ap, bp, *masks)


_KERNELS = {"tpu": (_fwd_tpu, _dx_tpu, _dab_tpu), "gpu": (_fwd_gpu, _dx_gpu, _dab_gpu)}

# --------------------------------------------------------------------------------------------
# Padding + custom_vjp
# --------------------------------------------------------------------------------------------


def _pad_operands(cfg: _Cfg, x2, w, a, b, masks):
    """Zero-pad to tile multiples; masks become int8 (``[Kp, Np]`` or ``[Kp, 1]`` + ``[1, Np]``)."""
    t = cfg.tiles
    (m, k), n = x2.shape, w.shape[1]
    mp, kp, np_ = round_up(m, t.bm), round_up(k, t.bk), round_up(n, t.bn)
    i8 = lambda v: jnp.asarray(v).astype(jnp.int8)  # noqa: E731
    if cfg.kind == "dense":
        mk = (pad_to(i8(masks[0]), (kp, np_)),)
    else:
        mk = (pad_to(i8(masks[0])[:, None], (kp, 1)), pad_to(i8(masks[1])[None, :], (1, np_)))
    return (pad_to(x2, (mp, kp)), pad_to(w, (kp, np_)), pad_to(a, (kp, cfg.r_pad)),
            pad_to(b, (cfg.r_pad, np_)), mk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mlr(cfg: _Cfg, x2, w, a, b, masks):
    return _mlr_fwd(cfg, x2, w, a, b, masks)[0]


def _mlr_fwd(cfg: _Cfg, x2, w, a, b, masks):
    xp, wp, ap, bp, mk = _pad_operands(cfg, x2, w, a, b, masks)
    y = _KERNELS[cfg.variant][0](cfg, xp, wp, ap, bp, mk)
    return y[: x2.shape[0], : w.shape[1]].astype(x2.dtype), (xp, wp, ap, bp, mk)


def _mlr_bwd(cfg: _Cfg, res, dy):
    """``dx = dy W'ᵀ``; ``dA = s·G Bᵀ``, ``dB = s·Aᵀ G`` with ``G = (xᵀ dy) ⊙ M``; W, M: zero cotangent."""
    xp, wp, ap, bp, mk = res
    (m, n), k, r = dy.shape, cfg.k, cfg.r
    _, dx_kernel, dab_kernel = _KERNELS[cfg.variant]
    dyp = pad_to(dy.astype(xp.dtype), (xp.shape[0], wp.shape[1]))
    dx = dx_kernel(cfg, dyp, wp, ap, bp, mk)[:m, :k].astype(xp.dtype)
    da_part, db_part = dab_kernel(cfg, xp, dyp, ap, bp, mk)
    da = da_part.sum(0)[:k, :r].astype(ap.dtype)
    db = db_part.sum(0)[:r, :n].astype(bp.dtype)
    return dx, None, da, db, tuple(None for _ in mk)


_mlr.defvjp(_mlr_fwd, _mlr_bwd)

# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def _as_tiles(block_sizes, backend=None) -> TileSizes:
    if block_sizes is None:
        return tile_sizes(backend)
    if isinstance(block_sizes, dict):
        return tile_sizes(backend, **block_sizes)
    return TileSizes(*block_sizes)


def _prepare(x, w, a, b, mask, scale, mask_rows, mask_cols, impl, interpret, block_sizes):
    """Checks, then ``(cfg | None, masks)``: ``cfg`` None for the XLA path; ``masks`` as the kernels take them."""
    (k, n), r = w.shape, a.shape[1]
    if x.shape[-1] != k or a.shape[0] != k or b.shape != (r, n):
        raise ValueError(f"shape mismatch: x {x.shape}, W {w.shape}, A {a.shape}, B {b.shape}")
    if mask is not None and (mask_rows is not None or mask_cols is not None):
        raise ValueError("pass either an element mask or mask_rows/mask_cols, not both")
    variant, interpret = resolve_impl(impl, interpret)
    if variant == "xla":
        return None, None
    if mask is not None:
        kind, masks = "dense", (jnp.asarray(mask, bool),)
    else:
        kind = "rowcol"
        masks = (jnp.ones((k,), bool) if mask_rows is None else jnp.asarray(mask_rows, bool),
                 jnp.ones((n,), bool) if mask_cols is None else jnp.asarray(mask_cols, bool))
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    t = _as_tiles(block_sizes)
    t = TileSizes(fit_tile(t.bm, m, variant), fit_tile(t.bk, k, variant), fit_tile(t.bn, n, variant))
    # r is padded as the kernel flavour needs it, also in interpret mode (exercises the padding).
    return _Cfg(variant, interpret, t, pad_rank(r, variant), float(scale), kind, k, r), masks


def _xla(x, w, a, b, mask, scale, mask_rows, mask_cols):
    if mask is None:
        return reference.masked_lowrank_rowcol_ref(x, w, a, b, mask_rows, mask_cols, scale)
    return reference.masked_lowrank_matmul_ref(x, w, a, b, mask, scale)


def masked_lowrank_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, mask=None,
                          scale: float = 1.0, *, mask_rows=None, mask_cols=None, impl: str = "auto",
                          interpret: bool | None = None, block_sizes=None) -> jax.Array:
    """``y [..., N] = x [..., K] @ ((W + scale·A@B) ⊙ M)``, differentiable in ``x``, ``A``, ``B``.

    Args:
      x: ``[..., K]``; leading dims are flattened to rows.
      w: ``[K, N]`` frozen base weight (``stop_gradient`` is applied).
      a, b: low-rank factors ``[K, r]``, ``[r, N]``.
      mask: ``[K, N]`` bool element mask, or None.
      scale: Python float ``s`` (static).
      mask_rows, mask_cols: ``[K]`` / ``[N]`` bool structured masks (exclusive with ``mask``);
        when everything is None the mask is all-ones (plain LoRA).
      impl, interpret: see :func:`jaxprune.kernels.block_sizes.resolve_impl`.
      block_sizes: ``TileSizes``, ``(bm, bk, bn)`` or a dict of overrides; default per backend.
        Tiles are clamped to the (16-rounded) problem size; shapes are zero-padded to tile multiples.

    Returns ``[..., N]`` in ``x.dtype`` (float32 accumulation).
    """
    w = jax.lax.stop_gradient(w)
    cfg, masks = _prepare(x, w, a, b, mask, scale, mask_rows, mask_cols, impl, interpret, block_sizes)
    if cfg is None:
        return _xla(x, w, a, b, mask, scale, mask_rows, mask_cols)
    (k, n) = w.shape
    y = _mlr(cfg, x.reshape(-1, k), w, a, b, masks)
    return y.reshape(*x.shape[:-1], n)


def masked_lowrank_matmul_vjp(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, mask, scale: float,
                              dy: jax.Array, *, mask_rows=None, mask_cols=None, impl: str = "auto",
                              interpret: bool | None = None, block_sizes=None):
    """The cotangents ``(dx [..., K], dA [K, r], dB [r, N])`` of :func:`masked_lowrank_matmul` at ``dy [..., N]``,
    computed by the backward kernels alone (``W``, ``M`` frozen: no cotangent); same arguments as
    :func:`masked_lowrank_matmul`. For callers that reduce the pieces themselves: under ``shard_map``
    (``jaxprune.ops.sharded``) ``dA`` and ``dB`` are partial sums over the rows this device holds."""
    w = jax.lax.stop_gradient(w)
    cfg, masks = _prepare(x, w, a, b, mask, scale, mask_rows, mask_cols, impl, interpret, block_sizes)
    if cfg is None:
        _, vjp = jax.vjp(lambda x, a, b: _xla(x, w, a, b, mask, scale, mask_rows, mask_cols), x, a, b)
        return vjp(dy.astype(x.dtype))
    (k, n) = w.shape
    res = _pad_operands(cfg, x.reshape(-1, k), w, a, b, masks)
    dx, _, da, db, _ = _mlr_bwd(cfg, res, dy.reshape(-1, n))
    return dx.reshape(x.shape), da, db
