"""SLTrain (Han et al. 2024, arXiv 2406.02214): ``W = B (s·A) + S``, S on a fixed random support.

Read off the official code (andyjm3/SLTrain ``splora/splora_linear.py`` and
``sparse-lora/sparse_linear.cpp``), in our ``[in, out]`` layout (torch's is ``[out, in]``)::

    W = s · A @ B  +  scatter(S_values at S_index)          A [in, r], B [r, out], s = α / r
    y = x @ W + b

* ``A ~ U(±1/√d_in)`` (``kaiming_uniform_(a=√5)``), ``B = 0``: the low-rank product starts at zero.
* The support is ``⌊δ · d_in · d_out⌋`` flat indices of ``[in, out]``, drawn uniformly without
  replacement once (``randperm(d_in·d_out)[:nnz]``, sorted) and never changed; the values start
  ``U(±1/√d_in)``. Only A, B and the values train.
* Forward: the dense ``W`` is built by a scatter-add of the values into the low-rank product
  (``W.reshape(-1).scatter_add_(0, di, dv)``). Backward: with ``G = ∂L/∂W = xᵀ·∂L/∂y``,
  ``∂L/∂S_values = G.reshape(-1)[S_index]`` (a gather), ``∂L/∂A = s·G@Bᵀ``, ``∂L/∂B = s·Aᵀ@G``:
  JAX's autodiff of ``.at[idx].add`` is exactly that gather, so no custom rule is needed.
* Parameters per layer: ``r (d_in + d_out) + ⌊δ d_in d_out⌋`` (:func:`sltrain_param_count`).

With ``delta = 0`` the layer is the pure low-rank baseline ``W = s · A @ B``. That baseline starts
with ``B ~ U(±1/√r)`` (``zero_b=False``: torch ``nn.Linear``'s default for the two factor layers):
with ``B = 0`` and no sparse part every attention / MLP output is zero at init and so is every
factor's gradient (the output projections see zero inputs, the input projections zero output
gradients), a saddle the model never leaves.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ..checkpoint import restore_pytree, save_pytree
from ..errors import UserError
from ..layers import Linear
from ..train import leaves_dict
from .registry import PRETRAIN, PretrainMethod


class SparseValues(nnx.LoRAParam):
    """SLTrain's sparse values S [nnz]: trainable, so they land in the ``trainable`` pytree."""


class SparseIndex(nnx.Variable):
    """SLTrain's support: flat int32 indices [nnz] into the ``[in, out]`` weight; frozen, never trained."""


def support_size(d_in: int, d_out: int, delta: float) -> int:
    """``⌊δ · d_in · d_out⌋`` (the official ``int(sp_ratio * total_elements)``)."""
    return int(delta * d_in * d_out)


def sltrain_param_count(d_in: int, d_out: int, rank: int, delta: float) -> int:
    """Trainable scalars of one SLTrain layer: ``r (d_in + d_out) + ⌊δ d_in d_out⌋``."""
    return rank * (d_in + d_out) + support_size(d_in, d_out, delta)


@partial(jax.jit, static_argnums=(1, 2, 3))
def sample_support(key: jax.Array, d_in: int, d_out: int, delta: float) -> jax.Array:
    """A uniform random support without replacement: sorted int32 flat indices [⌊δ·d_in·d_out⌋]."""
    nnz = support_size(d_in, d_out, delta)
    return jnp.sort(jax.random.permutation(key, d_in * d_out)[:nnz]).astype(jnp.int32)


def compose_weight(a: jax.Array, b: jax.Array, scale: float, values: jax.Array | None = None,
                   index: jax.Array | None = None) -> jax.Array:
    """``s · A @ B`` [in, out] with the values scatter-added at the flat ``index`` (if given)."""
    w = scale * (a @ b)
    if values is not None:
        w = w.reshape(-1).at[index].add(values.astype(w.dtype)).reshape(w.shape)
    return w


class SparseLowRankLinear(Linear):
    """``y = x @ (s·A@B + S) + b``: SLTrain (``delta > 0``, ``B = 0``) or the pure low-rank baseline
    (``delta = 0``, ``zero_b=False``).

    There is no dense ``kernel``; ``merged_kernel()`` composes the dense weight [in, out], so the
    generic merge / export code (``weights.dense_arrays``) turns a trained model into a dense one.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, delta: float,
                 rngs: nnx.Rngs, zero_b: bool = True, use_bias: bool = False, dtype=jnp.float32,
                 axes: tuple[str | None, str | None] = (None, None)):
        super().__init__(in_features, out_features, axes=axes, use_bias=use_bias, dtype=dtype, with_kernel=False)
        bound = 1.0 / math.sqrt(in_features)
        a_key = rngs.params()
        a = jax.random.uniform(a_key, (in_features, rank), dtype, -bound, bound)
        if delta > 0:
            self.sparse_index = nnx.data(SparseIndex(sample_support(rngs.params(), in_features, out_features,
                                                                    delta)))
            n = self.sparse_index[...].shape[0]
            self.sparse_values = nnx.data(SparseValues(jax.random.uniform(rngs.params(), (n,), dtype, -bound,
                                                                          bound)))
        else:
            self.sparse_index = nnx.data(None)
            self.sparse_values = nnx.data(None)
        # SLTrain's random B (``--sltrain-b-init uniform``) takes its key from A's, not from the shared
        # stream, so every other draw of the model (A, supports, values) is bitwise the one with B = 0
        b_bound = 1.0 / math.sqrt(rank)
        b_key = jax.random.fold_in(a_key, 1) if delta > 0 else rngs.params()
        b = (jnp.zeros((rank, out_features), dtype) if zero_b else
             jax.random.uniform(b_key, (rank, out_features), dtype, -b_bound, b_bound))
        self.set_lora(a, b, float(alpha) / float(rank))

    def merged_kernel(self) -> jax.Array:
        """``s·A@B + S`` as a dense [in, out] weight."""
        vals = None if self.sparse_values is None else self.sparse_values[...]
        idx = None if self.sparse_index is None else self.sparse_index[...]
        return compose_weight(self.lora_a[...], self.lora_b[...], self.lora_scale, vals, idx)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]. SLTrain forms the dense weight once per call (as the official
        kernel does); the pure low-rank layer computes ``s · (x @ A) @ B`` without it."""
        if self.sparse_values is None:
            a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
            y = self.lora_scale * ((x @ a) @ b)
        else:
            y = x @ self.merged_kernel().astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


# ---- the support on disk (a run's only frozen arrays) ------------------------------------------
def save_support(run_dir: Path, frozen) -> None:
    """SLTrain's supports (the only frozen arrays of a pretraining run) next to the checkpoints."""
    if jax.tree.leaves(frozen):
        save_pytree(run_dir / "support", leaves_dict(frozen))


def restore_support(run_dir: Path, frozen):
    """``frozen`` with every leaf read back from RUN_DIR/support: the support never changes on resume."""
    leaves, treedef = jax.tree.flatten(frozen)
    if not leaves:
        return frozen
    if not (run_dir / "support").exists():
        raise UserError(f"{run_dir}: support/ is missing; cannot resume an SLTrain run without it")
    saved = restore_pytree(run_dir / "support", {k: jax.ShapeDtypeStruct(x.shape, x.dtype)
                                                 for k, x in leaves_dict(frozen).items()})
    return jax.tree.unflatten(treedef, [jnp.asarray(saved[k]) for k in sorted(saved)])


def _build(sparse: bool):
    def build(old: Linear, mc, rngs: nnx.Rngs, dtype) -> "SparseLowRankLinear":
        return SparseLowRankLinear(old.in_features, old.out_features, rank=mc.rank, alpha=mc.alpha,
                                   delta=mc.delta if sparse else 0.0, zero_b=sparse and mc.sltrain_b_init == "zero",
                                   rngs=rngs, use_bias=old.bias is not None, dtype=dtype, axes=old.axes)
    return build


def _check_sltrain(mc) -> None:
    if not 0.0 < mc.delta < 1.0:
        raise UserError("must be in (0, 1)", field="MethodConfig.delta", value=mc.delta)


PRETRAIN.register(PretrainMethod("lowrank", "W = s·A@B on the targeted linears (the pure low-rank baseline)",
                                 _build(False), uses_rank=True))
NAME = "sltrain"

PRETRAIN.register(PretrainMethod(NAME, "W = s·A@B + S, S on a fixed random support of ⌊δ·in·out⌋ entries",
                                 _build(True), uses_rank=True, check=_check_sltrain,
                                 citation="Han et al. 2024, arXiv 2406.02214 (andy-yang-1/SLTrain)"))
