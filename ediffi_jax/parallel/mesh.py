"""Device mesh and the one logical-axis rules table.

Parameters and the main activations carry logical axis names (models/layers.py); this table maps
them onto the mesh axes (data, fsdp, tensor). The batch is split over data x fsdp, parameters are
sharded over fsdp (ZeRO-3 style), attention heads, MLP widths and vocabularies over tensor.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),  # text encoders' token embeddings (T5-XXL's is 132 M params)
    ("conv_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    ("tokens", None),
    ("height", None),
    ("width", None),
    ("act_channels", None),
)



@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """The context in which the models' nn.with_logical_constraint calls act: `mesh` (as an
    abstract mesh, so it may be entered inside a traced function, where jax.set_mesh may not)
    and the logical-axis rules. Outside it they are no-ops and XLA alone picks the
    activations' layout."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def with_activation_rules(fn, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """`fn` traced inside activation_rules(mesh): jit the result, and however it is called or
    lowered (the trainer, the dry run, an AOT compile) the activation constraints are in it."""

    @functools.wraps(fn)
    def constrained(*args, **kwargs):
        with activation_rules(mesh, rules):
            return fn(*args, **kwargs)

    return constrained


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill a single -1 with what is left; the product must equal the device count."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape must give {len(MESH_AXES)} sizes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh shape {dict(zip(MESH_AXES, shape))} cannot fit {num_devices} devices: "
                f"{num_devices} is not a multiple of {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"but {num_devices} are available"
        )
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh in Auto mode (a conv U-Net does not want Explicit sharding)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
    """Map logical names to mesh axes; a dim the mesh axes do not divide stays replicated."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree of nn.LogicallyPartitioned leaves (e.g. jax.eval_shape of init);
    plain leaves are replicated."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, _spec_for(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Shard the leading (batch) axis over data x fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharded_init(boxed_init_fn, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Run `boxed_init_fn()` (returning nn.LogicallyPartitioned leaves) under jit so each device
    materialises only its shard (no full host-side copy). Returns (params, shardings)."""
    abstract = jax.eval_shape(boxed_init_fn)
    shardings = logical_shardings(abstract, mesh, rules)
    params = jax.jit(lambda: nn.meta.unbox(boxed_init_fn()), out_shardings=shardings)()
    return params, shardings
