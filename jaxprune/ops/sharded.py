"""The Pallas kernels under ``jax.shard_map``: masked low-rank and block-sparse matmuls on data / fsdp / tensor meshes.

XLA's SPMD partitioner cannot split a compiled ``pallas_call`` (Mosaic: "cannot be automatically partitioned";
Triton likewise), so on a mesh of more than one device every kernel call runs once per device inside
``shard_map``, on the slices the rules below give it, and the partial sums are reduced by hand with ``psum``.
Forward and backward are one ``jax.custom_vjp`` whose halves are each one ``shard_map`` (the backward calls the
kernels' backward pieces, ``kernels.*_vjp``), so every collective is written here, none is left to inference.
On CPU the kernels run in interpret mode inside the same ``shard_map`` (8 host devices in the tests).

Where the mesh comes from: a ``Linear`` holds a :class:`KernelMesh` (static, in the graphdef), given by
``weights.set_linear_impl``: the run's (``sharding.Placement.kernel_mesh()``, passed by every command that
places a model). One device (or none): no ``shard_map``, the kernel is called as it is.

Partition rules
---------------
Notation: ``R`` = the *row axes*: the mesh axes of the ``batch`` logical rule (default ``data``, ``fsdp``) of
size > 1, when x's leading (batch) dimension divides by their product (else ``()``: every device computes all
rows). For a weight ``W [K, N]`` of a ``Linear`` with logical axes ``(in, out)``, ``meshes.logical_dims`` (the
same call that places W, with the run's axis rules and head size) gives the mesh axes of each dimension; of
those, the batch axes are dropped (the weight is all-gathered over them at the ``shard_map`` boundary, which is
what FSDP does before a matmul) and the others are kept: ``Kₘ`` (model axes of K) and ``Nₘ`` (of N); with the
default rules that is ``tensor`` on a ``heads`` / ``mlp`` dimension (when whole heads / channels divide by it).

Masked low-rank ``y = x @ ((W + s·A@B) ⊙ M)`` (``Linear`` with an element mask, SLoPe):

=========  ===========  =============================  ===============================================
operand    shape        split (PartitionSpec)           per device
=========  ===========  =============================  ===============================================
x          [B, ..., K]  P(R, ..., Kₘ)                   [B/|R|, ..., K/|Kₘ|]
W, M       [K, N]       P(Kₘ, Nₘ)                       [K/|Kₘ|, N/|Nₘ|]
A          [K, r]       P(Kₘ, None)                     [K/|Kₘ|, r]
B          [r, N]       P(None, Nₘ)                     [r, N/|Nₘ|]
y, dy      [B, ..., N]  P(R, ..., Nₘ)                   [B/|R|, ..., N/|Nₘ|]
=========  ===========  =============================  ===============================================

Each device runs the kernel on its slices (``W' = (W + s·A@B) ⊙ M`` restricted to a block of W is the merge of
the matching blocks of W, A, B and M, so the tile-wise merge stays exact). Reductions, with
``G = (xᵀ dy) ⊙ M`` on the local block:

* forward   ``y  = psum over Kₘ      of  x W'``        (row-parallel layers: ``o_proj``, ``down_proj`` on tensor)
* backward  ``dx = psum over Nₘ      of  dy W'ᵀ``      (column-parallel: ``q/k/v/gate/up_proj`` on tensor)
*           ``dA = psum over R + Nₘ  of  s·G Bᵀ``
*           ``dB = psum over R + Kₘ  of  s·Aᵀ G``
* W and M get no cotangent (frozen, as in the kernel).

The psums run in the operands' dtype (under ``--compute-dtype bfloat16`` each device's partial is rounded to
bf16 once before the sum; float32 runs equal one device to float rounding: 1e-5 in the tests).

So on ``fsdp=4,data=2``: R = (data, fsdp), Kₘ = Nₘ = (): each device takes 1/8 of the rows and the whole
(gathered) W, M, A, B; the forward has no collective; dA and dB are psum'd over (data, fsdp). On
``tensor=2,data=4``: R = (data,); a column-parallel layer (``embed`` -> ``heads`` / ``mlp``) has Nₘ = (tensor,):
W [K, N/2], B [r, N/2], y [B/4, ..., N/2], dx psum'd over tensor, dA over (data, tensor), dB over data; a
row-parallel one (``heads`` / ``mlp`` -> ``embed``) has Kₘ = (tensor,): x [B/4, ..., K/2], W [K/2, N],
A [K/2, r], y psum'd over tensor, dA over data, dB over (data, tensor).

SLoPe's two masked products are this wrapper with a zero rank-1 adapter: the forward ``x @ (W ⊙ M)`` with the
layer's axes, the backward ``dy @ (W ⊙ M ⊙ M₂)ᵀ`` with the transposed weight and the axes swapped (a
column-parallel layer's backward product is row-parallel: psum over tensor); ``∂L/∂W`` stays an XLA matmul.

Block-sparse ``y = x @ W`` (inference form of a block mask, ``Linear.set_block_sparse``): the live blocks
``values [n_live, bk, bn]`` carry no logical axes (``Placement`` replicates them), so x is ``P(R, ..., None)``,
values ``P()`` (every device holds every live block), y ``P(R, ..., None)``: no collective in the forward; the
backward's ``dx`` is local and ``dvalues = psum over R``. (Splitting the live blocks over ``tensor`` would give
every device a different, ragged block layout: not done.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
from jax.sharding import Mesh, PartitionSpec as P

from .. import kernels
from ..meshes import DEFAULT_AXIS_RULES, logical_dims, spec_entry

try:  # jax >= 0.7
    _shard_map = jax.shard_map
except AttributeError:  # older jax
    from jax.experimental.shard_map import shard_map as _old_shard_map

    def _shard_map(f, *, mesh, in_specs, out_specs, check_vma):
        return _old_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)

Axes = tuple  # tuple[str, ...]: mesh axes


@dataclass(frozen=True)
class KernelMesh:
    """The mesh the kernels run on under ``shard_map`` and the logical-axis rules that place the weights
    (hashable: a static attribute of a ``Linear``). Build with :meth:`of`."""
    mesh: Mesh
    axis_rules: tuple[tuple[str, Axes], ...]
    head_dim: int | None = None

    @classmethod
    def of(cls, mesh: Mesh, axis_rules=None, head_dim: int | None = None) -> "KernelMesh":
        """``axis_rules``: logical name -> mesh axes (``meshes.ShardingRules.axis_rules``; default rules)."""
        rules = DEFAULT_AXIS_RULES if axis_rules is None else axis_rules
        return cls(mesh, tuple((k, tuple(v)) for k, v in rules.items()), head_dim)

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def batch_axes(self) -> Axes:
        """The mesh axes rows are split over: the ``batch`` rule's axes of size > 1."""
        return tuple(a for a in dict(self.axis_rules).get("batch", ()) if self.mesh.shape[a] > 1)

    def row_axes(self, rows: int) -> Axes:
        """``R`` for a leading dimension of ``rows``: the batch axes when it divides by them, else ``()``."""
        axes = self.batch_axes
        return axes if rows % math.prod(self.mesh.shape[a] for a in axes) == 0 else ()

    def model_axes(self, shape: tuple[int, int], axes) -> tuple[Axes, Axes]:
        """``(Kₘ, Nₘ)`` of a weight ``[K, N]`` with logical ``axes`` ``(in, out)``: the mesh axes the rules split
        each dimension over, less the batch axes (gathered, FSDP-style)."""
        dims, _ = logical_dims(self.mesh.shape, dict(self.axis_rules), tuple(shape), axes, self.head_dim)
        batch = set(self.batch_axes)
        k, n = (tuple(a for a in d if a not in batch) for d in dims)
        return k, n

    def with_head_dim(self, head_dim: int | None) -> "KernelMesh":
        return KernelMesh(self.mesh, self.axis_rules, head_dim)


def _psum(x, axes: Axes):
    return jax.lax.psum(x, axes) if axes else x


def _entry(axes: Axes):
    return spec_entry(tuple(axes))


def _act_spec(ndim: int, rows: Axes, last: Axes) -> P:
    """``P(R, None, ..., last)`` for an activation of rank ``ndim`` >= 2."""
    return P(_entry(rows), *([None] * (ndim - 2)), _entry(last))


# ---- masked low-rank ------------------------------------------------------------------------------
class MaskedLowRankPlan(NamedTuple):
    """Static partition of one masked low-rank call (see the module docstring)."""
    mesh: Mesh
    rows: Axes
    k_axes: Axes
    n_axes: Axes
    x: P
    w: P
    a: P
    b: P
    y: P
    impl: str


def masked_lowrank_plan(kernel_mesh: KernelMesh, x_shape, w_shape, axes, impl: str = "pallas") -> MaskedLowRankPlan:
    """The specs of ``x [..., K]``, ``W [K, N]`` (and M), ``A``, ``B``, ``y`` on ``kernel_mesh``."""
    k_axes, n_axes = kernel_mesh.model_axes(tuple(w_shape), axes)
    rows = kernel_mesh.row_axes(x_shape[0]) if len(x_shape) >= 2 else ()
    ndim = max(len(x_shape), 2)
    return MaskedLowRankPlan(kernel_mesh.mesh, rows, k_axes, n_axes, _act_spec(ndim, rows, k_axes),
                             P(_entry(k_axes), _entry(n_axes)), P(_entry(k_axes), None), P(None, _entry(n_axes)),
                             _act_spec(ndim, rows, n_axes), impl)


def masked_lowrank_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, mask: jax.Array, scale: float,
                          kernel_mesh: KernelMesh | None = None, axes=(None, None), *,
                          impl: str = "pallas") -> jax.Array:
    """``y [..., N] = x [..., K] @ ((W + scale·A@B) ⊙ M)`` by ``kernels.masked_lowrank_matmul``, under ``shard_map``
    on ``kernel_mesh`` (partition rules: module docstring) when it has more than one device; differentiable in
    x, A, B (W, M frozen). ``axes``: W's logical axes ``(in, out)``, e.g. ``("embed", "mlp")``."""
    if kernel_mesh is None or kernel_mesh.size == 1:
        return kernels.masked_lowrank_matmul(x, w, a, b, mask, scale, impl=impl)
    squeeze = x.ndim == 1
    x = x[None] if squeeze else x
    plan = masked_lowrank_plan(kernel_mesh, x.shape, w.shape, axes, impl)
    y = _mlr(plan, float(scale), x, jax.lax.stop_gradient(w), a, b, mask)
    return y[0] if squeeze else y


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mlr(plan: MaskedLowRankPlan, scale: float, x, w, a, b, mask):
    return _mlr_fwd(plan, scale, x, w, a, b, mask)[0]


def _mlr_fwd(plan, scale, x, w, a, b, mask):
    def local(x, w, a, b, mask):  # y = psum over Kₘ of x W'
        return _psum(kernels.masked_lowrank_matmul(x, w, a, b, mask, scale, impl=plan.impl), plan.k_axes)

    y = _shard_map(local, mesh=plan.mesh, in_specs=(plan.x, plan.w, plan.a, plan.b, plan.w), out_specs=plan.y,
                   check_vma=False)(x, w, a, b, mask)
    return y, (x, w, a, b, mask)


def _mlr_bwd(plan, scale, res, dy):
    x, w, a, b, mask = res

    def local(x, w, a, b, mask, dy):  # partial sums of this device's rows and blocks, reduced as documented
        dx, da, db = kernels.masked_lowrank_matmul_vjp(x, w, a, b, mask, scale, dy, impl=plan.impl)
        return (_psum(dx, plan.n_axes), _psum(da, plan.rows + plan.n_axes), _psum(db, plan.rows + plan.k_axes))

    dx, da, db = _shard_map(local, mesh=plan.mesh, in_specs=(plan.x, plan.w, plan.a, plan.b, plan.w, plan.y),
                            out_specs=(plan.x, plan.a, plan.b), check_vma=False)(x, w, a, b, mask, dy)
    return dx, None, da, db, None


_mlr.defvjp(_mlr_fwd, _mlr_bwd)


# ---- block-sparse ---------------------------------------------------------------------------------
class BlockSparsePlan(NamedTuple):
    """Static partition of one block-sparse call: rows over ``rows``, the live blocks replicated."""
    mesh: Mesh
    rows: Axes
    x: P
    y: P
    layout: "kernels.BlockLayout"


def block_sparse_matmul(x: jax.Array, bsm: "kernels.BlockSparseMatrix",
                        kernel_mesh: KernelMesh | None = None) -> jax.Array:
    """``y [..., N] = x [..., K] @ W`` by ``kernels.block_sparse_matmul`` (Pallas), under ``shard_map`` on
    ``kernel_mesh`` when it has more than one device: rows split over R, the live blocks replicated (module
    docstring); differentiable in x and ``bsm.values``."""
    if kernel_mesh is None or kernel_mesh.size == 1:
        return kernels.block_sparse_matmul(x, bsm, impl="pallas")
    squeeze = x.ndim == 1
    x = x[None] if squeeze else x
    rows = kernel_mesh.row_axes(x.shape[0])
    spec = _act_spec(x.ndim, rows, ())
    y = _bsmm(BlockSparsePlan(kernel_mesh.mesh, rows, spec, spec, bsm.layout), x, bsm.values)
    return y[0] if squeeze else y


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bsmm(plan: BlockSparsePlan, x, values):
    return _bsmm_fwd(plan, x, values)[0]


def _bsmm_fwd(plan, x, values):
    def local(x, values):
        return kernels.block_sparse_matmul(x, kernels.BlockSparseMatrix(values, plan.layout), impl="pallas")

    y = _shard_map(local, mesh=plan.mesh, in_specs=(plan.x, P()), out_specs=plan.y, check_vma=False)(x, values)
    return y, (x, values)


def _bsmm_bwd(plan, res, dy):
    x, values = res

    def local(x, values, dy):  # dx: this device's rows; dvalues: a partial sum over them
        dx, dv = kernels.block_sparse_matmul_vjp(x, kernels.BlockSparseMatrix(values, plan.layout), dy,
                                                 impl="pallas")
        return dx, _psum(dv, plan.rows)

    return _shard_map(local, mesh=plan.mesh, in_specs=(plan.x, P(), plan.y), out_specs=(plan.x, P()),
                      check_vma=False)(x, values, dy)


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)
