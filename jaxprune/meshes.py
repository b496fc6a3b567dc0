"""Device meshes and the logical-axis rules that map model dimensions onto them (no model, no placement).

    parse_mesh("fsdp=-1,tensor=2", 8) -> {"data": 1, "fsdp": 4, "tensor": 2}
    ShardingRules.from_strings(["embed=none"], ["lm_head=replicate"])   # the --axis-rule / --shard-rule forms

``sharding.Placement`` applies the rules to a model's arrays (see ``sharding``'s docstring for the scheme).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import jax
from jax.sharding import PartitionSpec as P

from .errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> candidate mesh axes, in order: a dimension shards over the longest prefix of its
# candidates that are still free in this array (a mesh axis is used once per array), of size > 1,
# and divide it. Dimensions claim axes in the order of this table, so ``embed`` takes ``fsdp`` first
# and ``heads`` / ``mlp`` / ``vocab`` take ``tensor``, plus ``fsdp`` where no ``embed`` dimension took
# it (e.g. LoRA's B [rank, heads·head_dim]): under pure FSDP every sizeable array is split.
DEFAULT_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor", "fsdp"),
    "heads": ("tensor", "fsdp"),
    "kv_heads": ("tensor", "fsdp"),
    "mlp": ("tensor", "fsdp"),
    "lora_rank": (),
    "norm": (),
    "unit_mask": (),
}

@dataclass(frozen=True)
class ShardingRules:
    """Logical -> mesh axis rules plus per-path overrides ``[(regex, PartitionSpec)]``."""
    axis_rules: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_AXIS_RULES))
    overrides: tuple[tuple[str, P], ...] = ()

    @classmethod
    def from_strings(cls, axis_rules: list[str] | None = None, overrides: list[str] | None = None):
        """``axis_rules``: ``LOGICAL=MESH[+MESH]|none``; ``overrides``: ``REGEX=AXES`` where AXES is
        ``replicate`` or one comma-separated entry per dimension (``fsdp,none``, ``data+fsdp,tensor``)."""
        rules = dict(DEFAULT_AXIS_RULES)
        for item in axis_rules or []:
            name, _, value = item.partition("=")
            if not _ or name not in rules:
                raise UserError(f"expected LOGICAL=MESH with LOGICAL one of {', '.join(rules)}",
                                field="axis_rules", value=item)
            rules[name] = _mesh_axes(value, "axis_rules", item)
        parsed = []
        for item in overrides or []:
            pattern, _, value = item.rpartition("=")
            if not _ or not pattern:
                raise UserError("expected REGEX=AXES (e.g. 'lm_head=replicate')", field="shard_rules", value=item)
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"bad regex ({e})", field="shard_rules", value=item) from None
            if value.strip() == "replicate":
                parsed.append((pattern, P()))
            else:
                dims = [_mesh_axes(v, "shard_rules", item) for v in value.split(",")]
                parsed.append((pattern, P(*map(spec_entry, dims))))
        return cls(rules, tuple(parsed))


def logical_dims(mesh_shape, axis_rules, shape: tuple[int, ...], axes: tuple | None = None,
                 head_dim: int | None = None):
    """The mesh axes each dimension of an array of ``shape`` with logical ``axes`` splits over, by ``axis_rules``
    (see ``DEFAULT_AXIS_RULES``; ``mesh_shape``: axis name -> size), and the fallbacks met.

    Returns ``(dims, fallbacks)``: ``dims`` one tuple of mesh axes per dimension (``()``: not split);
    ``fallbacks`` ``[(dim, logical name, units, first candidate axis)]`` for the dimensions none of whose
    candidates divided (they stay unsplit). ``heads`` / ``kv_heads`` dimensions split only on whole heads of
    ``head_dim``. The one place the rules are applied: ``sharding.Placement.spec`` (where arrays go) and
    ``ops.sharded`` (how a Pallas kernel is partitioned under shard_map) both call it.
    """
    names = tuple(axes) if axes is not None and len(axes) == len(shape) else (None,) * len(shape)
    keys = list(axis_rules)
    order = sorted(range(len(shape)), key=lambda d: keys.index(names[d]) if names[d] in keys else len(keys))
    used: set[str] = set()
    dims: list[tuple[str, ...]] = [()] * len(shape)
    fallbacks = []
    for d in order:
        name, size = names[d], shape[d]
        if not name:
            continue
        cands = tuple(a for a in axis_rules.get(name, ()) if a not in used and mesh_shape[a] > 1)
        units = size // head_dim if name in ("heads", "kv_heads") and head_dim else size
        chosen = next((cands[:k] for k in range(len(cands), 0, -1)
                       if units % math.prod(mesh_shape[a] for a in cands[:k]) == 0), ())
        if cands and not chosen:
            fallbacks.append((d, name, units, cands[0]))
        used.update(chosen)
        dims[d] = chosen
    return tuple(dims), fallbacks


def spec_entry(axes: tuple[str, ...]):
    """One PartitionSpec entry for a dimension split over ``axes``: None, ``"fsdp"`` or ``("tensor", "fsdp")``."""
    return axes[0] if len(axes) == 1 else (axes or None)


def _mesh_axes(value: str, field: str, item: str) -> tuple[str, ...]:
    value = value.strip()
    if value in ("none", "-", ""):
        return ()
    axes = tuple(a.strip() for a in value.split("+"))
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
        raise UserError(f"unknown mesh axis {bad[0]!r} (axes: {', '.join(MESH_AXES)})", field=field, value=item)
    return axes


# ---- meshes -------------------------------------------------------------------------------------
def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> {data: 2, fsdp: 2, tensor: 2}; one size may be -1 (the rest).

    Missing axes get size 1. The product must equal the number of devices, or (one process only)
    be smaller: the mesh then takes the first devices.
    """
    n = jax.device_count() if num_devices is None else num_devices
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise UserError(f"unknown axis {name!r} (axes: {', '.join(MESH_AXES)})", field="mesh", value=spec)
        if name in seen:
            raise UserError(f"axis {name!r} given twice", field="mesh", value=spec)
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UserError(f"size of {name!r} is not an integer", field="mesh", value=spec) from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise UserError(f"size of {name!r} must be positive (or -1 for the rest)", field="mesh", value=spec)
    wild = [k for k, v in sizes.items() if v == -1]
    if len(wild) > 1:
        raise UserError("at most one axis may be -1", field="mesh", value=spec)
    known = math.prod(v for v in sizes.values() if v != -1)
    if wild:
        if n % known:
            raise UserError(f"{n} devices do not divide by {known}", field="mesh", value=spec)
        sizes[wild[0]] = n // known
    total = math.prod(sizes.values())
    if total > n or (total < n and jax.process_count() > 1):
        raise UserError(f"has {total} devices, but {n} are available "
                        f"({jax.process_count()} process(es) × {jax.local_device_count()} local)",
                        field="mesh", value=spec)
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None) -> jax.sharding.Mesh:
    """A mesh with axes (data, fsdp, tensor) over the first prod(sizes) devices; ``None`` -> all on ``data``."""
    sizes = parse_mesh(spec or f"data={jax.device_count()}") if not isinstance(spec, dict) else spec
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=jax.devices()[: math.prod(shape)])


def default_mesh_spec(batch_size: int) -> str:
    """No --mesh: every device on ``data``, or (one process) the first gcd(devices, batch) devices when
    the batch does not divide; that choice is said on stderr."""
    n = jax.device_count()
    if batch_size % n == 0 or jax.process_count() > 1:
        return f"data={n}"
    d = math.gcd(n, batch_size)
    log(f"sharding: batch {batch_size} does not divide by {n} devices; using data={d} (the first {d}); "
        "pass --mesh to choose")
    return f"data={d}"


def mesh_size(mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


# ---- activations --------------------------------------------------------------------------------
def activation_mesh(mesh: jax.sharding.Mesh | None):
    """A context in which the model splits its activations' batch dimension over ``mesh`` (``constrain_batch``):
    JAX's abstract-mesh context, usable inside a jitted function while it is traced. ``None``: no change."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def mesh_of(tree) -> jax.sharding.Mesh | None:
    """The device mesh ``tree``'s arrays (or shardings) are placed on (the first ``NamedSharding``'s), None when
    none is (numpy or abstract leaves, single-device arrays): what a jitted pass over placed inputs hands
    ``activation_mesh``."""
    for leaf in jax.tree.leaves(tree):
        sharding = leaf if isinstance(leaf, jax.sharding.Sharding) else getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def constrain_batch(x: jax.Array, batch_dim: int = 0) -> jax.Array:
    """``x`` with its ``batch_dim`` split over the active mesh's batch axes (``DEFAULT_AXIS_RULES["batch"]``,
    data and fsdp, those of size > 1), the other dimensions left to XLA (unconstrained: a tensor-split vocabulary
    stays split). The active mesh is JAX's abstract-mesh context (``activation_mesh``, ``jax.set_mesh``).

    Without an active mesh, on a mesh with no batch axis, or for a batch that does not divide: ``x`` unchanged.
    Why: XLA's sharding propagation gives an fsdp mesh's activations the weights' layout, not the batch's, so
    without this every chip held the whole batch's activations and logits [B, S, vocab]."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.ndim == 0:
        return x
    shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = tuple(a for a in DEFAULT_AXIS_RULES["batch"] if shape.get(a, 1) > 1)
    if not axes or x.shape[batch_dim] % math.prod(shape[a] for a in axes):
        return x
    if any(t != jax.sharding.AxisType.Auto for a, t in zip(mesh.axis_names, mesh.axis_types) if a in axes):
        return x  # inside shard_map (manual axes) or on explicit axes: the caller placed x already
    spec = [P.UNCONSTRAINED] * x.ndim
    spec[batch_dim] = spec_entry(axes)
    return jax.lax.with_sharding_constraint(x, P(*spec))
