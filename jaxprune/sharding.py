"""Placing every array of a run on a device mesh (the mesh and rules: ``meshes.py``), and multi-host setup.

Every array of a run (base weights, LoRA factors, masks, optimizer state, pruner state, batches) is
placed by one function, ``tree_shardings``. Each NNX Variable carries the logical axes it was
created with (``layers.py``: ``Linear(..., axes=("embed", "heads"))`` gives ``lora_b`` the axes
``("lora_rank", "heads")``); the rules map them to mesh axes::

    Variable metadata  logical_axes=("lora_rank", "heads")
         --(ShardingRules.axis_rules)--> mesh axes  PartitionSpec(None, "tensor")

Optimizer state is built by ``jax.tree.map`` over the parameters, so Adam's ``mu`` / ``nu`` keep the
Variables (and their axes) and follow the same rules with no extra code. Arrays without logical
axes (pruner state, scalars) are replicated. A leaf whose *path* (``layers.3.self_attn.q_proj.lora_b``)
matches one of ``ShardingRules.overrides`` (regex searched in the path, first match wins) takes that
PartitionSpec instead (big_vision-style).

The mesh always has the three axes ``data`` (pure data parallel), ``fsdp`` (data parallel whose
weights are sharded along ``embed``) and ``tensor`` (heads, MLP channels, vocabulary); axes not
named on the command line have size 1, so the same rules serve every mesh shape.

Uneven dimensions (3 KV heads on tensor=2; MLP widths that differ per layer after pruning) never
shard silently across a head or leave a remainder: such a dimension falls back to *replicated*
along that mesh axis, and the fallback is reported (``Placement.fallbacks``; the CLI prints one
line). Batches must divide by data×fsdp; a training batch that does not is refused.

The Pallas kernels are not partitioned by XLA: they run under ``shard_map`` on the run's mesh with the same
rules (``ops/sharded.py``); commands pass ``Placement.kernel_mesh()`` to ``weights.set_linear_impl``.
"""

from __future__ import annotations

import dataclasses

import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from .errors import UserError, field_ref
from .layers import logical_axes_of
from .meshes import ShardingRules, default_mesh_spec, logical_dims, make_mesh, mesh_size, spec_entry
from .ops.sharded import KernelMesh

# ---- placing pytrees ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """A mesh + rules, and the fallbacks met while placing trees (for one report line). Immutable:
    :meth:`with_head_dim` gives the same mesh, rules and report for a model's head size."""
    mesh: jax.sharding.Mesh
    rules: ShardingRules = field(default_factory=ShardingRules)
    head_dim: int | None = None  # heads / kv_heads dims shard only on whole heads
    fallbacks: list[str] = field(default_factory=list)

    def with_head_dim(self, head_dim: int | None) -> "Placement":
        """This placement for a model whose heads are ``head_dim`` wide (heads shard only whole); the fallback
        report is shared."""
        return dataclasses.replace(self, head_dim=head_dim)

    def spec(self, path: str, shape: tuple[int, ...], axes: tuple | None = None) -> P:
        """The PartitionSpec of one leaf at ``path`` with logical ``axes`` (see the module docstring)."""
        for pattern, spec in self.rules.overrides:
            if re.search(pattern, path):
                self._check_override(path, shape, spec)
                return spec
        dims, fallbacks = logical_dims(self.mesh.shape, self.rules.axis_rules, shape, axes, self.head_dim)
        for _, name, units, axis in fallbacks:
            self.fallbacks.append(f"{path}: {units} {name} on {axis}={self.mesh.shape[axis]}")
        entries = [spec_entry(a) for a in dims]
        while entries and entries[-1] is None:
            entries.pop()
        return P(*entries)

    def _check_override(self, path, shape, spec):
        if len(spec) > len(shape):
            raise UserError(f"{field_ref('shard_rules')} gives {len(spec)} axes for {path} of rank {len(shape)}",
                            field="shard_rules")
        for size, axes in zip(shape, spec):
            n = mesh_size(self.mesh, (axes,) if isinstance(axes, str) else tuple(axes or ()))
            if size % n:
                raise UserError(f"{path} dimension {size} does not divide by {n}", field="shard_rules")

    def sharding(self, path: str, shape, axes: tuple | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(path, tuple(shape), axes))

    def tree_shardings(self, tree):
        """A pytree of NamedShardings matching ``tree`` (arrays or ShapeDtypeStructs), from each leaf's
        Variable metadata (its logical axes) and path (the overrides)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        axes = leaf_logical_axes(tree)
        return jax.tree_util.tree_unflatten(treedef, [
            self.sharding(path_string(p), getattr(x, "shape", np.shape(x)), a) for (p, x), a in zip(flat, axes)])

    def put(self, tree):
        """Place a pytree (host or device arrays, identical on every process) onto the mesh."""
        return jax.tree.map(put_global, tree, self.tree_shardings(tree))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch_sharding(self, shape: tuple[int, ...], batch_dim: int, *, strict: bool = True) -> NamedSharding:
        """Tokens [..., B, ...] split over the ``batch`` rule's mesh axes along ``batch_dim``.

        A batch that does not divide: a UserError when ``strict`` (training), else replicated (eval).
        """
        axes = tuple(a for a in self.rules.axis_rules["batch"] if self.mesh.shape[a] > 1)
        n = mesh_size(self.mesh, axes)
        if shape[batch_dim] % n:
            if strict:
                raise UserError(f"batch size {shape[batch_dim]} does not divide by the {'×'.join(axes)} "
                                f"mesh axes ({n} devices); pick a multiple of {n}")
            return self.replicated()
        dims = [None] * len(shape)
        dims[batch_dim] = spec_entry(axes)
        return NamedSharding(self.mesh, P(*dims))

    def put_batch(self, batch: np.ndarray, batch_dim: int, *, strict: bool = True) -> jax.Array:
        """A global batch, identical on every process, as a global array (each process feeds only
        the rows that live on its own devices). A batch whose rows are spread over the hosts
        (``data.HostRows``) lays itself out (``to_global``)."""
        sharding = self.batch_sharding(tuple(batch.shape), batch_dim, strict=strict)
        if hasattr(batch, "to_global"):
            return batch.to_global(sharding)
        return put_global(batch, sharding)

    def kernel_mesh(self) -> KernelMesh:
        """This mesh and its rules for the Pallas kernels under ``shard_map`` (``ops.sharded``,
        ``weights.set_linear_impl(mesh=...)``)."""
        return KernelMesh.of(self.mesh, self.rules.axis_rules, self.head_dim)

    def report(self) -> str | None:
        """One line about replicated fallbacks, or None."""
        if not self.fallbacks:
            return None
        uniq = sorted(set(self.fallbacks))
        return (f"sharding: {len(uniq)} array(s) replicated along a mesh axis their dimension does not "
                f"divide by, e.g. {uniq[0]}")


def leaf_logical_axes(tree) -> list[tuple | None]:
    """The logical axes of every array leaf of ``tree`` (in ``jax.tree.leaves`` order): the metadata of the
    NNX Variable holding it, or None."""
    out: list = []

    def visit(node):
        axes = logical_axes_of(node)
        out.extend([axes] * len(jax.tree.leaves(node)))
        return node
    jax.tree.map(visit, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return out


def path_string(path) -> str:
    """A jax key path -> ``layers.0.self_attn.q_proj.kernel`` (``.value`` of NNX Variables dropped)."""
    s = jax.tree_util.keystr(path, simple=True, separator=".")
    return s[: -len(".value")] if s.endswith(".value") else s


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same full value on every process) as a global array with ``sharding``."""
    if isinstance(x, jax.Array):  # a local array, or a global one to reshard
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(tree):
    """Every leaf as a full numpy array on every process (all-gathers across hosts when needed)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def scalar(x) -> float:
    """A replicated scalar as a float, on any process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return float(x.addressable_data(0))
    return float(x)


# ---- multi-host ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeshConfig:
    """Where a run goes: the mesh, rule changes, and the multi-host setup (``--mesh`` and friends)."""
    mesh: str | None = None
    axis_rules: tuple[str, ...] = ()
    shard_rules: tuple[str, ...] = ()
    distributed: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def init_distributed(mc: MeshConfig) -> None:
    """jax.distributed.initialize from the flags (explicit) or the environment (--distributed)."""
    explicit = [mc.coordinator, mc.num_processes, mc.process_id]
    if not mc.distributed and all(v is None for v in explicit):
        return
    if any(v is None for v in explicit) and not all(v is None for v in explicit):
        raise UserError(f"multi-host: give all of {field_ref('coordinator')}, {field_ref('num_processes')} and "
                        f"{field_ref('process_id')}, or none (with {field_ref('distributed')} to auto-detect)")
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _native_stdout_to_stderr()
    try:
        jax.distributed.initialize(mc.coordinator, mc.num_processes, mc.process_id)
    except Exception as e:  # jax raises RuntimeError/ValueError with long messages
        raise UserError(f"jax.distributed.initialize failed: {str(e).splitlines()[0]}") from None


def _native_stdout_to_stderr() -> None:
    """Gloo prints "[Gloo] Rank ... connected" on the C-level stdout; send native writes to stderr and
    keep Python's ``sys.stdout`` on the real stdout, so ``--json`` output stays parseable."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", buffering=1)


def _cpu_only() -> bool:
    """True when no accelerator plugin is importable (decided without starting a backend)."""
    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def placement_for(mc: MeshConfig, batch_shape: tuple[int, int, int], head_dim: int | None = None) -> Placement:
    """The run's Placement: mesh from ``mc.mesh`` (else $JAXPRUNE_MESH, else ``default_mesh_spec``) and the
    rules. Checks here, before anything is written, that the batch [grad_accum, batch_size, seq_len] divides."""
    rules = ShardingRules.from_strings(list(mc.axis_rules), list(mc.shard_rules))
    spec = mc.mesh or os.environ.get("JAXPRUNE_MESH") or default_mesh_spec(batch_shape[1])
    placement = Placement(make_mesh(spec), rules, head_dim)
    placement.batch_sharding(tuple(batch_shape), 1)
    return placement


def is_main_process() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def log(msg: str) -> None:
    """A line on stderr from process 0 only."""
    if is_main_process():
        print(msg, file=sys.stderr)

