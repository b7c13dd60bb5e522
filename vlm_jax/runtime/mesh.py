"""Device mesh, logical-axis rules and batch sharding.

One program for every size: the mesh has the axes ('data', 'fsdp', 'tensor') on a single CPU (all of size 1),
on 8 fake CPU devices, on a GPU node or on a TPU pod slice. Model code only names *logical* axes
(`nn.with_logical_partitioning(init, ('embed', 'mlp'))`); the rule table below, overridable from the
config, maps them onto mesh axes. Batches are sharded over ('data', 'fsdp').

Multi-host (several processes under `jax.distributed`, see launch/main.py) follows one rule: every process
builds the same deterministic *global* host batch, and `shard_batch` turns it into global jax.Arrays of which
each process materialises only its own (addressable) shards. Results come back to the host with `to_host`,
which gathers across processes when an array spans several; only process 0 writes files (`is_primary`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or None: replicated). FSDP shards the embedding dimension of weights,
# tensor parallelism the MLP / heads dimensions, as in MaxText's default rules.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("pos", None),
    ("norm", None),
    ("classes", None),
    ("kv_heads", "tensor"),
    ("layers", None),          # the stacked axis of scanned layers
    ("embed_vision", None),    # the LLaVA projector's input (vision width)
    ("proj", None),
    ("patch_h", None), ("patch_w", None), ("channels", None),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh.

    Args:
      shape: axis name -> size; one axis may be -1 to take all remaining devices. Missing axes are 1,
        except 'data' which defaults to -1 (pure data parallelism).
      devices: defaults to all devices of all processes.

    Returns:
      A `jax.sharding.Mesh`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(a, -1 if a == "data" else 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of total size {fixed}")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, but {len(devices)} are visible")
    # Auto axes: XLA's SPMD partitioner propagates shardings (the model code stays sharding-agnostic); newer
    # JAX defaults make_mesh to Explicit axes, which would need out_sharding annotations on every gather.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """A config's (logical axis, mesh axis | [mesh axes] | None) pairs first, in their order, then the entries of
    `DEFAULT_RULES` they do not name (`config.mesh_rules`: a config names only what it changes; None or empty:
    the defaults). First because flax gives a mesh axis to the first rule that claims it: a config's
    ('layers', 'fsdp') must win over the default ('embed', 'fsdp') on a scanned kernel [layers, embed, mlp].

    Raises:
      UserError: one line for an unknown logical axis, an unknown mesh axis, or an entry that is not a pair.
    """
    table, given = dict(DEFAULT_RULES), {}
    for rule in rules or ():
        if isinstance(rule, str) or len(rule) != 2:
            raise errors.UserError(f"mesh_rules: each rule is a (logical axis, mesh axis or None) pair, got {rule!r}")
        name, axis = str(rule[0]), (tuple(rule[1]) if isinstance(rule[1], (list, tuple)) else rule[1])
        if name not in table:
            raise errors.UserError(f"mesh_rules: unknown logical axis {name!r}; the logical axes are "
                                   f"{', '.join(table)}")
        bad = [a for a in (axis if isinstance(axis, tuple) else (axis,)) if a is not None and a not in MESH_AXES]
        if bad:
            raise errors.UserError(f"mesh_rules: {name!r} -> unknown mesh axis {bad[0]!r}; the mesh axes are "
                                   f"{', '.join(MESH_AXES)} (or None: replicated)")
        given[name] = axis
    return tuple(given.items()) + tuple((k, v) for k, v in DEFAULT_RULES if k not in given)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a (boxed, abstract) parameter tree from its logical axis names.

    Leaves without logical names (plain arrays) are replicated.
    """
    specs = nn.get_partition_spec(abstract_boxed_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be a multiple of this."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a global host batch (numpy pytree) on the mesh, its leading dimension over ('data', 'fsdp').

    Every process passes the same global batch (built deterministically, e.g. from the epoch index); each one
    copies to its devices only the slices they hold (`jax.make_array_from_callback`), so nothing crosses hosts
    and the host-to-device traffic per process is its share of the batch. With one process this is a plain
    sharded `device_put`.

    Args:
      batch: pytree of arrays `[B, ...]`; B must be a multiple of `batch_divisor(mesh)`.

    Returns:
      The same pytree of global jax.Arrays with `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)
    div = batch_divisor(mesh)

    def place(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % div:
            raise ValueError(f"batch leaf of shape {x.shape}: the leading (batch) dimension must be a multiple of "
                             f"{div}, the size of the mesh's {BATCH_AXES} axes")
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, batch)


def addressable_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """i64[k]: the rows of a global batch of `batch_size` that this process's devices hold (sorted).

    All rows with one process. A loader may fill only these rows of the global batch it hands to
    `shard_batch` (the others are never read), so that no host decodes the whole batch.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = set()
    for (sl,) in index_map.values():
        rows.update(range(*sl.indices(batch_size)))
    return np.array(sorted(rows), np.int64)


def to_host(tree: Any) -> Any:
    """Fetches a pytree of (global) jax.Arrays to numpy on every process.

    An array that spans devices of other processes (e.g. a batch-sharded output of a jitted function) is
    gathered across processes (`multihost_utils.process_allgather`, a collective: every process must call
    this in the same order); fully addressable or fully replicated arrays are a local copy. Other leaves
    (numpy, Python scalars) pass through `np.asarray`.
    """
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def is_primary() -> bool:
    """True on the process that writes files (results, plots, caches, metrics): process 0."""
    return jax.process_index() == 0


def sharded_init(model, init_args: Sequence[Any], rng: jax.Array, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Creates `model`'s params already sharded: eval_shape -> shardings -> jit(init, out_shardings).

    No device ever holds the whole model, so a 7B LVLM initialises on a mesh whose devices each hold a slice.

    Returns:
      The unboxed params tree, each leaf a global jax.Array with its NamedSharding.
    """
    abstract = jax.eval_shape(model.init, rng, *init_args)["params"]
    shardings = param_shardings(abstract, mesh, rules)
    init = jax.jit(lambda r: nn.meta.unbox(model.init(r, *init_args)["params"]), out_shardings=shardings)
    with mesh:
        return init(rng)


def shard_params(params: Any, model, init_args: Sequence[Any], mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Places loaded (host) params onto the mesh by the model's logical axis names."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), *init_args)["params"]
    return jax.device_put(params, param_shardings(abstract, mesh, rules))
