"""Batched, jit-compiled feature extraction with an on-disk cache.

Few-shot CLIP methods never change the backbone, so every image is encoded once per (checkpoint, dataset,
split, shots, seed, augmentation) and kept in a `.npz` file; a second run with other hyperparameters reads
the cache and never touches the backbone.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.runtime import workdir as workdir_lib
from vlm_jax.runtime.metrics import Progress

_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2))


def load_all(load: Callable[[Any], np.ndarray], items: Sequence[Any]) -> np.ndarray:
    """np.stack of `load(item)` for all items, decoded in a thread pool (PIL releases the GIL), in order."""
    return np.stack(map_all(load, items))


def map_all(load: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """[load(item) for item in items], decoded in the same thread pool, in order (e.g. dicts of vision arrays)."""
    return list(_POOL.map(load, items))


_MIB = 1 << 20


def _content_hash(path: str) -> str:
    """sha256 of a file's first and last MiB plus 64 evenly spaced 16 KiB blocks (the whole file if small).

    Hashing a multi-GB checkpoint on every run would cost seconds to minutes, so the key samples it: the first
    MiB holds a safetensors file's header (every tensor's name, dtype, shape and offset) and the first
    tensors, the samples and the last MiB the rest. With the file's size this tells apart any two real
    checkpoints short of an in-place edit of a few bytes; unlike an mtime it does not change when the same
    bytes are written again (two runs racing to write the built-in checkpoint).
    """
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= 4 * _MIB:
            h.update(f.read())
            return h.hexdigest()
        for offset in [0, *(size * i // 65 for i in range(1, 65)), size - _MIB]:
            f.seek(offset)
            h.update(f.read(_MIB if offset in (0, size - _MIB) else 16384))
    return h.hexdigest()


def checkpoint_fingerprint(checkpoint_dir: str) -> dict[str, Any]:
    """Identifies a checkpoint by its path and its weight files' and config's sizes and content hashes.

    Also removes the temporary directories that a run killed while writing a built-in checkpoint left next
    to it (`.<name>.tmp-*`, older than this run).
    """
    workdir_lib.remove_stale(os.path.dirname(os.path.abspath(checkpoint_dir)),
                             (f".{os.path.basename(os.path.normpath(checkpoint_dir))}.tmp-*",))
    files = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith((".safetensors", "config.json")))
    stats = {f: [os.path.getsize(os.path.join(checkpoint_dir, f)), _content_hash(os.path.join(checkpoint_dir, f))]
             for f in files}
    return {"path": os.path.realpath(checkpoint_dir), "files": stats}


_CHECK = "__sha256__"


def _digest(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """u8[32]: sha256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(json.dumps([k, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return np.frombuffer(h.digest(), np.uint8)


def _read_entry(path: str) -> dict[str, np.ndarray] | None:
    """The arrays of a cache entry, or None (with one warning) if it is missing, unreadable or fails its check."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in f.files}
        check = out.pop(_CHECK, None)
        if check is None or not np.array_equal(check, _digest(out)):
            raise ValueError("its content does not match the checksum stored with it")
        return out
    except Exception as e:  # noqa: BLE001 - truncated, empty, bit-flipped: BadZipFile, EOFError, zlib.error ...
        first = str(e).splitlines()[0][:200] if str(e) else ""
        logging.warning("features: ignoring damaged cache entry %s (%s: %s); recomputing it", path,
                        type(e).__name__, first)
        return None


def _write_entry(path: str, arrays: Mapping[str, np.ndarray], key: Mapping[str, Any]) -> None:
    """Writes the entry (with its checksum) and its readable `.json` sidecar, each atomically and durably."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with workdir_lib.atomic_file(path, suffix=".tmp.npz") as f:
            np.savez(f, **arrays, **{_CHECK: _digest(arrays)})
        with workdir_lib.atomic_file(path[:-4] + ".json") as f:
            f.write(json.dumps(key, indent=1, sort_keys=True, default=str).encode())
    except OSError as e:
        workdir_lib.raise_if_write_failure(e, "the feature cache", "--config.feature_cache_dir")
        raise


_SWEPT: set[str] = set()   # cache directories this process already cleaned of stale temp files


def cached(cache_dir: str | None, key: Mapping[str, Any], compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Returns `compute()`, memoised on disk under a hash of `key` (a JSON-able mapping).

    An entry carries a checksum of its arrays: one that cannot be read back whole (a truncated, empty or
    bit-flipped file) is reported in one warning and recomputed. Entries are written to a temporary name,
    fsynced and renamed (`workdir.atomic_file`), so a crash leaves the old entry or the new one; temp files
    that killed runs left are removed. A `.json` sidecar with the key makes the cache directory readable by
    a person.

    With several processes `compute` is collective (every process must run it), so the processes agree on
    a hit first: the cache is used only if every process can read it (a cache directory on a shared file
    system); otherwise all recompute. Only process 0 writes.
    """
    if not cache_dir:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"{key.get('kind', 'features')}-{digest}.npz")
    if mesh_lib.is_primary() and cache_dir not in _SWEPT:
        _SWEPT.add(cache_dir)
        workdir_lib.remove_stale(cache_dir, ("*.tmp.npz", ".*.tmp.npz", ".*.json.*.tmp"))
    out = _read_entry(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if not np.all(multihost_utils.process_allgather(np.array(out is not None))):
            out = None
    if out is not None:
        logging.info("features: cache hit %s", path)
        return out
    out = compute()
    if mesh_lib.is_primary():
        _write_entry(path, out, key)
    return out


def map_batches(
    fn: Callable[[Any, np.ndarray], jax.Array],
    params: Any,
    items: Sequence[Any],
    load: Callable[[Any], np.ndarray],
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    desc: str = "features",
) -> np.ndarray:
    """Applies a jitted `fn(params, x f32[B, ...]) -> f32[B, D]` to all `items`, batched and sharded.

    Args:
      fn: jitted function of (params, batch).
      params: model parameters, already placed (replicated) on the mesh.
      items: anything `load` turns into one input array (an image path + augmentation seed, a token row ...).
      load: item -> np.ndarray; runs in a thread pool, in order, so results are deterministic.
      batch_size: global batch size; rounded up to a multiple of the mesh's data axes. The last batch is
        padded (by repeating its first item) so that `fn` is compiled for one shape only.

    With several processes each process loads only the items its devices hold (`mesh.addressable_rows`) and
    every process gets the whole result: outputs sharded across processes are gathered (`mesh.to_host`).

    Returns:
      np.float32[len(items), D], the same on every process.
    """
    div = mesh_lib.batch_divisor(mesh)
    batch_size = max(div, -(-batch_size // div) * div)
    rows = mesh_lib.addressable_rows(mesh, batch_size)  # all rows with one process
    outs = []
    progress = Progress(len(items), what=desc, every_s=15.0)
    pending = None
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        n = len(chunk)
        if len(rows) == batch_size:
            arrays = list(_POOL.map(load, chunk))
            batch = np.stack(arrays + [arrays[0]] * (batch_size - n))
        else:  # several processes: decode only the rows this one's devices hold; the rest is never read
            arrays = list(_POOL.map(load, [chunk[r] if r < n else chunk[0] for r in rows]))
            batch = np.zeros((batch_size, *arrays[0].shape), arrays[0].dtype)
            batch[rows] = np.stack(arrays)
        x = mesh_lib.shard_batch(batch, mesh)
        y = fn(params, x)  # dispatch is async: the next batch is decoded while this one runs
        if pending is not None:
            outs.append(mesh_lib.to_host(pending[0])[:pending[1]])
        pending = (y, n)
        progress.update(start + n)
    if pending is not None:
        outs.append(mesh_lib.to_host(pending[0])[:pending[1]])
    if not outs:
        raise ValueError(f"{desc}: nothing to encode")
    return np.concatenate(outs).astype(np.float32)


def l2_normalize(x: np.ndarray | jax.Array, axis: int = -1):
    norm = np.linalg.norm(x, axis=axis, keepdims=True) if isinstance(x, np.ndarray) else jax.numpy.linalg.norm(
        x, axis=axis, keepdims=True)
    return x / norm


def padded_chunks(rows: Sequence[int], batch: int):
    """(idx, n): `rows` in chunks of `batch`, the last padded with its first row (one compiled shape)."""
    rows = list(rows)
    for i in range(0, len(rows), batch):
        idx = rows[i:i + batch]
        n = len(idx)
        yield np.asarray(idx + [idx[0]] * (batch - n)), n
