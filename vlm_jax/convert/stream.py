"""Streaming checkpoint loading: tensors read lazily, converted one at a time, placed into their sharding.

`open_tensors` reads only the safetensors headers and returns `LazyTensor`s (file, byte offset,
shape, dtype). `load_table` checks them against a conversion table exactly as `loader.apply_table`
does (a missing, unexpected or mis-shaped tensor is an error naming it, before anything is read),
then builds the params leaf by leaf: for each device (each distinct slice once) it fills the slice that
device holds, in the target dtype, from blocks of the tensor's rows read
from the file (`np.fromfile` at the header's byte offsets, at most `_BLOCK_BYTES` per read) and
converted by the table's transform, transfers it and frees it (`_place`). So each device receives only
its slice, and the host holds one slice plus one block at a time: never the model, nor even a whole
tensor when a mesh splits it.

Why not `safe_open(framework="numpy")` to read: a `safe_open` handle maps the whole file, and every
page it has read stays resident until the handle closes (a 320 MB file read tensor by tensor through
one handle ends at 338 MB RssFile); and slicing a transposed kernel by columns touches all its pages
anyway. Reads at the header's offsets leave nothing mapped and work for every dtype, bfloat16
included (ml_dtypes). `safe_open` still validates each file's header.

Row blocks: every transform sends the tensor's leading (HF) axis to one Flax axis, whole groups of
`unit` rows at a time (`unit` = the sizes split off after it, e.g. head_dim for q/k/v kernels), and
applied to a block of rows it gives the matching slab of the Flax tensor (`_ROW_AXIS`).

Scanned layers: leaves under a `stack` prefix named `layers_{i}` become one leaf `layers` with a
leading layer axis; a device's slice of it is filled layer by layer.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from flax import traverse_util

from vlm_jax.convert import loader
from vlm_jax.convert.loader import CheckpointError, Entry
from vlm_jax.errors import UserError

_LAYER = re.compile(r"layers_(\d+)")
_BLOCK_BYTES = 8 << 20  # most bytes one read brings into host memory


class LazyTensor(NamedTuple):
    """One tensor of a safetensors file, not read yet."""

    path: pathlib.Path
    offset: int  # absolute byte offset of the data in the file
    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the leading axis (the whole tensor by default), read into a new array."""
        if not self.shape:
            return np.fromfile(self.path, self.dtype, count=1, offset=self.offset).reshape(())
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        row = math.prod(self.shape[1:])
        n = max(stop - start, 0) * row
        x = np.fromfile(self.path, self.dtype, count=n, offset=self.offset + start * row * self.dtype.itemsize)
        return x.reshape(max(stop - start, 0), *self.shape[1:])


Tensor = LazyTensor | np.ndarray  # what `load_table` reads from: lazy, or already in memory (tests, tools)


# ----------------------------------------------------------------------------- reading headers


def _corrupt(path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or truncated safetensors file ({why}); re-download or re-export it")


def _header(path: pathlib.Path) -> tuple[dict, int]:
    """(header dict without __metadata__, absolute offset of the data section)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise _corrupt(path, "bad header")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise _corrupt(path, f"header is not JSON: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def open_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """The tensors of one safetensors file, header only (no tensor data is read).

    Raises:
      CheckpointError: the file is corrupt or truncated, or holds a dtype numpy cannot represent.
    """
    from safetensors import safe_open

    path = pathlib.Path(path)
    try:  # the library's own header validation (offsets cover the file exactly, no overlaps)
        with safe_open(path, framework="numpy"):
            pass
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise _corrupt(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    header, base = _header(path)
    size, out = path.stat().st_size, {}
    for name, info in header.items():
        if info.get("dtype") not in loader._ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which vlm_jax cannot "
                                  f"read (supported: {sorted(loader._ST_DTYPES)})")
        dtype = np.dtype(loader._ST_DTYPES[info["dtype"]]).newbyteorder("<")
        start, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if end - start != math.prod(shape) * dtype.itemsize or base + end > size:
            raise _corrupt(path, f"tensor {name!r} does not fit its byte range")
        out[name] = LazyTensor(path, base + start, shape, dtype)
    return out


def open_tensors(ckpt_dir: str | os.PathLike) -> dict[str, LazyTensor]:
    """Every tensor of a checkpoint directory (single file or sharded with an index), header only."""
    return loader.merge_shards(ckpt_dir, open_safetensors)


def array_equal(a: Tensor, b: Tensor) -> bool:
    """Exact equality of two (lazy or in-memory) tensors, read in blocks of rows (never both whole)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    if not isinstance(a, LazyTensor) and not isinstance(b, LazyTensor):
        return bool(np.array_equal(a, b))
    if not a.shape:
        return bool(np.array_equal(_read(a), _read(b)))
    row_bytes = max(math.prod(a.shape[1:]) * np.dtype(a.dtype).itemsize, 1)
    rows = max(_BLOCK_BYTES // row_bytes, 1)
    return all(np.array_equal(_read(a, i, i + rows), _read(b, i, i + rows)) for i in range(0, a.shape[0], rows))


def _read(x: Tensor, start: int = 0, stop: int | None = None) -> np.ndarray:
    if isinstance(x, LazyTensor):
        return x.read(start, stop) if x.shape else x.read()
    return np.asarray(x)[start:stop] if np.ndim(x) else np.asarray(x)


# ----------------------------------------------------------------------------- placing


class _Leaf(NamedTuple):
    """One output leaf: its per-layer table entries (one unless stacked) and where it goes."""

    entries: tuple[Entry, ...]
    layer_shape: tuple[int, ...]  # flax shape of one entry
    stacked: bool
    dtype: np.dtype


def _final_path(path: tuple[str, ...], stack: Sequence[tuple[str, ...]]) -> tuple[tuple[str, ...], int | None]:
    for prefix in stack:
        n = len(prefix)
        m = _LAYER.fullmatch(path[n]) if len(path) > n and path[:n] == tuple(prefix) else None
        if m:
            return (*prefix, "layers", *path[n + 1:]), int(m.group(1))
    return path, None


def _leaves(table: Sequence[Entry], targets: dict, dtype, stack) -> dict[tuple[str, ...], _Leaf]:
    groups: dict[tuple[str, ...], dict[int | None, Entry]] = {}
    for e in table:
        final, layer = _final_path(e.flax_path, stack)
        groups.setdefault(final, {})[layer] = e
    leaves = {}
    for final, by_layer in groups.items():
        stacked = None not in by_layer
        if stacked and sorted(by_layer) != list(range(len(by_layer))):
            raise ValueError(f"{loader._fmt(final)}: layers {sorted(by_layer)} are not 0..N-1 (bug in the table)")
        entries = tuple(by_layer[k] for k in sorted(by_layer, key=lambda k: -1 if k is None else k))
        target = targets[entries[0].flax_path]
        leaves[final] = _Leaf(entries, tuple(target.shape), stacked,
                              np.dtype(dtype if dtype is not None else target.dtype))
    return leaves


# kind -> (Flax shape -> (the Flax axis the HF leading axis lands on, HF rows per index of that axis)).
_ROW_AXIS = {
    "identity": lambda s: (0, 1),
    "split": lambda s: (0, math.prod(s[1:])),
    "transpose": lambda s: (len(s) - 1, 1),
    "conv": lambda s: (3, 1),
    "transpose_split": lambda s: (1, math.prod(s[2:])),
    "transpose_merge": lambda s: (len(s) - 1, 1),
}


def _fill(dst: np.ndarray, x: Tensor, kind: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> None:
    """dst[...] = to_flax(x)[index], reading x in blocks of its leading axis (never all of a big tensor)."""
    to_flax = loader.TRANSFORMS[kind].to_flax
    if not shape:
        dst[...] = to_flax(_read(x), shape)
        return
    axis, unit = _ROW_AXIS[kind](shape)
    start, stop, step = index[axis].indices(shape[axis])
    if step != 1:
        raise ValueError(f"strided slice {index[axis]} of a parameter")
    row_bytes = max(math.prod(x.shape[1:]) * np.dtype(x.dtype).itemsize * unit, 1)
    per_block = max(_BLOCK_BYTES // row_bytes, 1)  # indices of `axis` per read
    rest = index[:axis] + (slice(None),) + index[axis + 1:]
    for b0 in range(start, stop, per_block):
        b1 = min(b0 + per_block, stop)
        block = to_flax(_read(x, b0 * unit, b1 * unit), shape[:axis] + (b1 - b0,) + shape[axis + 1:])
        dst[(slice(None),) * axis + (slice(b0 - start, b1 - start),)] = block[rest]
        del block  # before the next read: one block at a time


def _reader(leaf: _Leaf, tensors: Mapping[str, Tensor]):
    """index (tuple of slices into the output leaf) -> a new host array of that slice, in the leaf's dtype."""
    def read(index):
        index = tuple(index)
        if not leaf.stacked:
            out = np.empty(_sliced(leaf.layer_shape, index), leaf.dtype)
            e = leaf.entries[0]
            _fill(out, tensors[e.hf_name], e.kind, leaf.layer_shape, index)
            return out
        layers = range(len(leaf.entries))[index[0]]
        out = np.empty((len(layers), *_sliced(leaf.layer_shape, index[1:])), leaf.dtype)
        for j, i in enumerate(layers):  # one layer at a time
            e = leaf.entries[i]
            _fill(out[j], tensors[e.hf_name], e.kind, leaf.layer_shape, index[1:])
        return out
    return read


def _sliced(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(len(range(*sl.indices(n))) for sl, n in zip(index, shape))


def _place(shape: tuple[int, ...], sharding, read) -> jax.Array:
    """A global array whose devices each receive `read(their index)`, one distinct slice in host memory at a time.

    Not `jax.make_array_from_callback`: it reads every device's slice before transferring any, so the
    host would hold the whole tensor at once. Devices that hold the same slice (replication) share one read.
    """
    groups: dict[tuple, tuple[tuple[slice, ...], list]] = {}
    index_map = sharding.addressable_devices_indices_map(shape)
    for device, index in index_map.items():
        key = tuple((sl.start, sl.stop, sl.step) for sl in index)
        groups.setdefault(key, (index, []))[1].append(device)
    shards = {}
    for index, devices in groups.values():
        host = read(index)
        placed = [jax.device_put(host, d) for d in devices]
        jax.block_until_ready(placed)  # the transfer is done: `host` can go before the next slice is read
        shards.update(zip(devices, placed))
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, [shards[d] for d in index_map])


def _check_placeable(leaves: dict, shardings: dict) -> None:
    """Every leaf divides evenly over its mesh axes (checked before anything is read)."""
    bad = []
    for path, leaf in leaves.items():
        shape = ((len(leaf.entries),) if leaf.stacked else ()) + leaf.layer_shape
        try:
            shardings[path].shard_shape(shape)
        except ValueError:
            spec = getattr(shardings[path], "spec", shardings[path])
            bad.append(f"{loader._fmt(path)} {shape} by {spec}")
    if bad:
        mesh = next(iter(shardings.values())).mesh
        raise UserError(f"these params cannot be split evenly over the mesh {dict(mesh.shape)}: {bad}; choose mesh "
                        f"sizes that divide them, or map their logical axes to other mesh axes in the rules")


def load_table(table: Sequence[Entry], tensors: Mapping[str, Tensor], target_shapes, *, ignore=(), dtype=None,
               shardings=None, stack: Sequence[tuple[str, ...]] = ()) -> dict:
    """HF tensors -> Flax params on device(s), converted and placed one leaf at a time.

    Args:
      table: conversion entries (per layer, unscanned).
      tensors: HF name -> `LazyTensor` (`open_tensors`) or numpy array.
      target_shapes: the unscanned params tree of `jax.eval_shape(model.init, ...)` (boxed or not):
        the table is checked against it.
      ignore: regexes of HF tensors that may be present and are dropped (see `loader.apply_table`).
      dtype: dtype of every leaf; None keeps each target leaf's dtype. Applied per tensor as it is read.
      shardings: None puts every leaf on the default device (as `jax.device_put`); otherwise the
        `jax.sharding.Sharding` of each output leaf (a tree shaped like the output params, e.g.
        `mesh.param_shardings` of the scanned model): each device receives only its slice.
      stack: Flax path prefixes, e.g. `[('model',)]`, whose `layers_{i}` children are stacked into one
        `layers` leaf with a leading layer axis (the `nn.scan` layout).

    Returns:
      The nested params dict of `jax.Array`s.

    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped tensor (nothing is read then).
      UserError: a leaf does not divide evenly over the mesh axes its sharding names.
    """
    targets = loader._flat(target_shapes)
    problems = loader.table_problems(table, {n: tuple(x.shape) for n, x in tensors.items()}, targets, ignore)
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    leaves = _leaves(table, targets, dtype, stack)
    if shardings is not None:
        shardings = traverse_util.flatten_dict(shardings)
        if set(shardings) != set(leaves):
            raise ValueError(f"shardings do not match the params: only in shardings "
                             f"{sorted(map(loader._fmt, set(shardings) - set(leaves)))}, only in params "
                             f"{sorted(map(loader._fmt, set(leaves) - set(shardings)))}")
        _check_placeable(leaves, shardings)
    params = {}
    for path, leaf in leaves.items():
        shape = ((len(leaf.entries),) if leaf.stacked else ()) + leaf.layer_shape
        read = _reader(leaf, tensors)
        if shardings is None:
            # Waits for each transfer, so that host memory holds one leaf at a time.
            params[path] = jax.block_until_ready(jax.device_put(read((slice(None),) * len(shape))))
        else:
            params[path] = _place(shape, shardings[path], read)
    return traverse_util.unflatten_dict(params)


def abstract_params(model) -> Any:
    """The boxed (logical-axis annotated) `jax.eval_shape` params tree of `model` (no memory allocated)."""
    return jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"]


def shardings_for(model, mesh, rules=None, abstract=None) -> Any:
    """`model`'s param shardings on `mesh` from its logical axis names and `rules`.

    Args:
      model: a Flax module with `init_inputs()`.
      mesh: the `jax.sharding.Mesh`.
      rules: logical axis -> mesh axis rules; None means `vlm_jax.runtime.mesh.DEFAULT_RULES`.
      abstract: `abstract_params(model)` if already at hand (saves a trace).

    Returns:
      A tree of `NamedSharding`s shaped like the (unboxed) params.
    """
    from vlm_jax.runtime import mesh as mesh_lib  # the rule table lives with the mesh

    abstract = abstract_params(model) if abstract is None else abstract
    return mesh_lib.param_shardings(abstract, mesh, mesh_lib.rules_from_config(rules))
