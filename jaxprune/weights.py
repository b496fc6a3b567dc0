"""Building a model from named arrays and reading named arrays back out.

Paths are tuples as NNX flattens them, e.g. ``('layers', 3, 'self_attn', 'q_proj', 'kernel')``.
Building goes through ``nnx.eval_shape`` so no random weights are ever allocated.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import kernels
from .config import ModelConfig
from .errors import UserError
from .layers import Linear, Mask
from .model import LlamaForCausalLM
from .ops.blocks import block_grid, block_shape_of
from .ops.sharded import KernelMesh

KeyPath = tuple  #: an NNX key path, e.g. ('layers', 3, 'self_attn', 'q_proj', 'kernel')


def linears(model: nnx.Module):
    """(path, Linear) for every Linear in the model, in a stable order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            yield tuple(path), node


def replace_linear(model: nnx.Module, path: KeyPath, new: Linear) -> None:
    """Put ``new`` where :func:`linears` found a ``Linear`` at ``path``, in place (adapters swap their layers in)."""
    node = model
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    setattr(node, path[-1], new)


IMPL_CHOICES = ("auto", "xla", "pallas")


def set_linear_impl(model: nnx.Module, impl: str = "auto", *, inference: bool = False,
                    mesh: KernelMesh | None = None, backend: str | None = None) -> str:
    """Route every element-masked ``Linear`` (``(W + s·A@B) ⊙ M``) through the Pallas masked low-rank kernel
    (``"pallas"``) or XLA (``"xla"``). ``"auto"`` takes the kernel where it is compiled (GPU, TPU: one device or
    a mesh) and XLA elsewhere; ``"pallas"`` on CPU runs the kernel in interpret mode (slow: for checks). Returns
    the path chosen, ``"xla"`` or ``"pallas"`` (:func:`choose_impl`).

    ``inference`` (eval, generate, lm-eval: nothing trains): each element-masked layer takes its fastest
    inference form. With the Pallas path, a layer whose mask is whole square blocks (``prune --pattern
    block:BxB``, found by ``ops.blocks.block_shape_of``) is converted to its live blocks and runs
    ``kernels.block_sparse_matmul``, which never loads or multiplies a pruned block: with ``"pallas"`` always,
    with ``"auto"`` where :func:`block_sparse_pays`. Every other masked layer with a float kernel is baked:
    ``(W + s·A@B) ⊙ M`` computed once and stored as a plain kernel (LoRA and mask dropped), so the forward is a
    dense matmul — the same numbers as the masked path — except under an explicit ``"pallas"``, which keeps the
    masked low-rank kernel (for checks). Measured on an H200 (benchmarks/kernels_gpu.json, 4096x11008, bf16):
    dense 0.51 ms, the masked kernel 1.94 ms, XLA's per-call masked merge 4.7 ms.

    On a mesh of several devices the kernels run under ``shard_map`` (``ops/sharded.py``: which operand is split
    on which mesh axis, where partial sums are psum'd): XLA's SPMD partitioner cannot split a compiled Pallas
    call. ``mesh``: the run's ``KernelMesh`` (``sharding.Placement.kernel_mesh()``); None or one device: no
    ``shard_map``. The head size for the rules comes from ``model.config``. ``backend``: default ``jax.default_backend()``."""
    chosen = choose_impl(impl, backend)
    if mesh is not None and (mesh.size == 1 or chosen == "xla"):
        mesh = None
    if mesh is not None:
        mesh = mesh.with_head_dim(getattr(getattr(model, "config", None), "head_dim", None))
    for _, lin in linears(model):
        lin.impl = chosen
        lin.kernel_mesh = mesh
        if not inference or lin.weight_mask is None:
            continue
        mask = np.asarray(lin.weight_mask[...])
        if chosen == "pallas" and (b := block_shape_of(mask)) is not None:
            grid = block_grid(mask, b)
            if impl == "pallas" or block_sparse_pays(1.0 - grid.mean(), mask.shape):
                lin.set_block_sparse(kernels.BlockSparseMatrix.from_dense(lin.merged_kernel(), grid, b))
                continue
        if impl != "pallas" and lin.kernel_scale is None:
            lin.bake_weight_mask()
    return chosen


def block_sparse_pays(sparsity: float, shape: tuple[int, int]) -> bool:
    """Whether ``--impl auto`` runs a block-masked layer of ``shape`` [in, out] at block ``sparsity`` through the
    block-sparse kernel rather than a dense matmul of the baked weight. From one H200 run (bench_kernels.py,
    benchmarks/kernels_gpu.json, bf16, 2048 tokens, 128x128 blocks; kernel over dense, forward / fwd+bwd):
    4096x11008 at 50%: 1.13 / 1.02, 75%: 1.39 / 1.56, 90%: 1.99 / 2.30; 4096x4096 at 75%: 1.26 / 1.37; the
    SmolLM2 shapes (576-wide) at 50-75%: 0.62-1.03, at 90%: 1.02-1.70. So: 90% and more, or 75% and more on
    layers of at least 16M weights."""
    return sparsity >= 0.9 or (sparsity >= 0.75 and shape[0] * shape[1] >= 16 * 2**20)


def choose_impl(impl: str = "auto", backend: str | None = None) -> str:
    """``"xla"`` or ``"pallas"`` for ``--impl`` on ``backend`` (default ``jax.default_backend()``), whatever the
    mesh: ``auto`` -> ``"pallas"`` on GPU / TPU (one device or a mesh: the kernels run under ``shard_map``),
    ``"xla"`` elsewhere; ``pallas`` -> ``"pallas"`` everywhere (interpret mode on CPU)."""
    variant, _ = kernels.resolve_impl(impl, backend=backend)
    return "xla" if variant == "xla" else "pallas"


def block_sparse_linears(model: nnx.Module) -> dict[str, str]:
    """{linear path: 'live/total blocks of BKxBN'} for the layers running the block-sparse kernel."""
    out = {}
    for path, lin in linears(model):
        if (lay := lin.block_layout) is not None:
            bk, bn = lay.block_size
            out[path_str(path)] = f"{lay.n_live}/{lay.grid[0] * lay.grid[1]} blocks of {bk}x{bn}"
    return out


def path_str(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32, lora: Mapping[str, tuple[int, float]] | None = None,
                   weight_masks: list[str] | None = None) -> LlamaForCausalLM:
    """A model of ShapeDtypeStructs with LoRA / weight masks attached where named."""
    def build():
        m = LlamaForCausalLM(cfg, dtype=dtype)
        rngs = nnx.Rngs(0)
        for path, lin in linears(m):
            name = path_str(path)
            if lora and name in lora:
                lin.add_lora(int(lora[name][0]), float(lora[name][1]), rngs)
            if weight_masks and name in weight_masks:
                lin.set_weight_mask(jnp.ones((lin.in_features, lin.out_features), jnp.bool_))
        return m
    return nnx.eval_shape(build)


def model_from_arrays(cfg: ModelConfig, arrays: Mapping[KeyPath, np.ndarray], *, dtype=jnp.float32,
                      lora=None, weight_masks=None, source: str = "weights") -> LlamaForCausalLM:
    """Fill a model of ``cfg`` from ``arrays`` (path -> array). Masks not given start all-True.

    Float arrays are cast to ``dtype``; a missing or mis-shaped weight is a UserError.
    """
    graphdef, state = nnx.split(abstract_model(cfg, dtype, lora, weight_masks))
    flat = []
    for path, var in nnx.to_flat_state(state):
        want = var.get_value()
        if path in arrays:
            arr = arrays[path]
            if tuple(arr.shape) != tuple(want.shape):
                raise UserError(f"{source}: {path_str(path)} has shape {tuple(arr.shape)}, "
                                f"expected {tuple(want.shape)}")
            val = jnp.asarray(arr, want.dtype)
        elif isinstance(var, Mask):
            val = jnp.ones(want.shape, jnp.bool_)
        else:
            raise UserError(f"{source}: weight {path_str(path)} is missing")
        flat.append((path, var.replace(val)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_arrays(model: nnx.Module) -> dict[KeyPath, jax.Array]:
    """Every Variable of the model as path -> array."""
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def merged_arrays(model: nnx.Module) -> dict[KeyPath, jax.Array]:
    """Every Variable but the LoRA factors (and int8 scales), each kernel replaced by ``(W + s·A@B) ⊙ M``."""
    arrays = {p: v for p, v in model_arrays(model).items() if p[-1] not in ("lora_a", "lora_b", "kernel_scale")}
    for path, lin in linears(model):
        arrays[path + ("kernel",)] = lin.merged_kernel()
    return arrays


def lora_spec(model: nnx.Module) -> dict[str, tuple[int, float]]:
    """{linear path: (rank, alpha)} for the layers that carry LoRA."""
    return {path_str(p): (int(l.lora_a[...].shape[1]), l.lora_scale * int(l.lora_a[...].shape[1]))
            for p, l in linears(model) if l.has_lora}


def weight_mask_paths(model: nnx.Module) -> list[str]:
    return [path_str(p) for p, l in linears(model) if l.weight_mask is not None]


def dense_arrays(model: LlamaForCausalLM) -> dict[KeyPath, jax.Array]:
    """Base-only arrays with LoRA merged and every mask folded into the weights (exact).

    A pruned head's output is zero before ``o_proj``, so zeroing its ``o_proj`` input rows is
    the same function; likewise a pruned MLP channel's ``down_proj`` row.
    """
    out: dict[KeyPath, jax.Array] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not isinstance(var, nnx.LoRAParam) and path[-1] != "kernel_scale":
            out[tuple(path)] = var.get_value()
    for path, lin in linears(model):
        out[path + ("kernel",)] = lin.merged_kernel()
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.num_heads:
            rows = jnp.repeat(attn.head_mask[...], attn.head_dim)[:, None]
            k = ("layers", i, "self_attn", "o_proj", "kernel")
            out[k] = jnp.where(rows, out[k], 0)
        k = ("layers", i, "mlp", "down_proj", "kernel")
        out[k] = jnp.where(mlp.channel_mask[...][:, None], out[k], 0)
    return out


def merge_lora(model: nnx.Module) -> LlamaForCausalLM:
    """A new model with s·A@B folded into W and weight masks applied (masks kept as Variables)."""
    return model_from_arrays(model.config, merged_arrays(model), dtype=model.dtype,
                             weight_masks=weight_mask_paths(model))
