"""Device mesh and the logical-axis → mesh-axis rules (one table, MaxText style).

Parameters carry logical axis names (`logical_axes` metadata, see `models.layers.param`). A rules table,
part of the config, maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated).
A dimension that the mapped mesh axes do not divide is replicated instead (tiny test models), never
padded silently.

Activations follow the same table: a jitted function traces its model under `logical_rules(rules)` (Flax's
logical-axis-rules context), and `constrain` maps an activation's logical axes through the rules in force.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: weights are sharded over fsdp (ZeRO-3 style) and tensor (Megatron style); the batch over
# data and fsdp. Configs may override any entry.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "vision_embed": "fsdp",
    "vision_mlp": "tensor",
    "vision_heads": "tensor",
    "fusion_embed": "fsdp",
    "fusion_inner": "tensor",
    "ssm_state": None,
    "dt_rank": None,
    "conv": None,
    "layers": None,
    "channels": None,
    "patch": None,
    "position": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh ('data', 'fsdp', 'tensor'); one size may be -1 to take the remaining devices. Auto axes."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {sizes}")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known} ({sizes})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping) -> P:
    """PartitionSpec for one array; mesh axes already used by an earlier dimension are not reused."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules")
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules: Mapping | None = None):
    """NamedSharding for every variable of an nnx State (concrete or abstract), same tree structure.

    Variables without logical axes (RNG state, counters, caches) are replicated.
    """
    rules = DEFAULT_RULES if rules is None else rules

    def one(v):
        if not _is_var(v):
            return NamedSharding(mesh, P())
        axes = v.get_metadata().get("logical_axes")
        shape = v.get_value().shape
        spec = logical_to_spec(axes, shape, mesh, rules) if axes else P()
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping | None = None) -> NamedSharding:
    """Sharding for a batch-major array: the leading dimension over the 'batch' rule's mesh axes."""
    rules = DEFAULT_RULES if rules is None else rules
    target = rules.get("batch")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    lead = axes[0] if len(axes) == 1 else (axes or None)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def logical_rules(rules: Mapping):
    """Context in which `constrain` (activation shardings) uses `rules`: enter it inside the traced function,
    so it is in force whenever jit traces the model."""
    return nnx.logical_axis_rules(tuple(rules.items()))


def current_rules() -> dict:
    """The rules of the innermost `logical_rules` context, else DEFAULT_RULES."""
    rules = spmd.get_logical_axis_rules()
    return dict(rules) if rules else DEFAULT_RULES


def constrain(x: jax.Array, axes: Sequence[str | None], mesh) -> jax.Array:
    """Pin activation `x` to the mesh axes its logical `axes` map to under the current rules (a no-op without a
    mesh, or where every dimension stays replicated)."""
    if mesh is None:
        return x
    spec = logical_to_spec(axes, x.shape, mesh, current_rules())
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def rules_with(overrides: Sequence = ()) -> dict:
    """DEFAULT_RULES with `overrides` ((logical_name, mesh_axes), ...) applied (a config's `sharding_rules`)."""
    rules = dict(DEFAULT_RULES)
    for name, axes in overrides:
        rules[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    return rules


def global_batch(batch: Mapping, mesh: Mesh, rules: Mapping | None = None, global_rows: int | None = None) -> dict:
    """Host arrays → global arrays sharded over the batch axes, each process placing its devices' rows (multi-host
    safe). `global_rows` is the global batch size: None infers it from the sharding (every process feeds different
    rows, as in training); the local row count means every process holds the whole batch (as in generation)."""
    def one(v):
        shape = None if global_rows is None else (global_rows, *v.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v, shape)

    return {k: one(v) for k, v in batch.items()}
