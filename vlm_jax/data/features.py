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
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from vlm_jax.train import mesh as mesh_lib
from vlm_jax.train.metrics import Progress

_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2))


def load_all(load: Callable[[Any], np.ndarray], items: Sequence[Any]) -> np.ndarray:
    """np.stack of `load(item)` for all items, decoded in a thread pool (PIL releases the GIL), in order."""
    return np.stack(list(_POOL.map(load, items)))


def checkpoint_fingerprint(checkpoint_dir: str) -> dict[str, Any]:
    """Identifies a checkpoint by its config and the sizes/mtimes of its weight files (cheap, no hashing)."""
    files = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith((".safetensors", "config.json")))
    stats = {f: [os.path.getsize(os.path.join(checkpoint_dir, f)),
                 int(os.path.getmtime(os.path.join(checkpoint_dir, f)))] for f in files}
    return {"path": os.path.realpath(checkpoint_dir), "files": stats}


def cached(cache_dir: str | None, key: Mapping[str, Any], compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Returns `compute()`, memoised on disk under a hash of `key` (a JSON-able mapping).

    The file is written to a temporary name and renamed, so an interrupted run never leaves a truncated
    cache entry behind. A `.json` sidecar with the key makes the cache directory readable by a person.

    With several processes `compute` is collective (every process must run it), so the processes agree on
    a hit first: the cache is used only if every process can read it (a cache directory on a shared file
    system); otherwise all recompute. Only process 0 writes.
    """
    if not cache_dir:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"{key.get('kind', 'features')}-{digest}.npz")
    out = None
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                out = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:  # a corrupt entry is recomputed, not trusted
            logging.warning("features: ignoring unreadable cache entry %s (%s)", path, e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if not np.all(multihost_utils.process_allgather(np.array(out is not None))):
            out = None
    if out is not None:
        logging.info("features: cache hit %s", path)
        return out
    out = compute()
    if mesh_lib.is_primary():
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp.npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **out)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        with open(path[:-4] + ".json", "w", encoding="utf-8") as f:
            json.dump(key, f, indent=1, sort_keys=True, default=str)
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
