"""Classification evaluation: top-1 accuracy and a vectorised hyperparameter grid search.

`search` replaces the reference's nested Python loops over (beta, alpha, lam) (160,000 settings for
DualAdapter) by one jit-compiled program: the logits function is wrapped in one `jax.vmap` per grid axis,
nested in the grid's order, so every intermediate is computed only for the grid axes it depends on (the
cache affinities once per beta, not once per setting); features are processed in blocks by `lax.map` so
memory stays bounded, and only integer correct counts per setting leave the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np


def restrict(logits: jax.Array, class_subset: Any) -> jax.Array:
    """Keeps the columns of a class subset: f32[B, C] -> f32[B, S] (e.g. ImageNet-R's 200 classes)."""
    return jnp.take(logits, jnp.asarray(class_subset), axis=-1)


def _correct(logits: jax.Array, labels: jax.Array, class_subset: Any = None) -> jax.Array:
    # argmax takes the first of tied maxima; the reference's topk(1) leaves ties implementation-defined.
    if class_subset is None:
        pred = jnp.argmax(logits, axis=-1)
    else:
        subset = jnp.asarray(class_subset)
        pred = subset[jnp.argmax(restrict(logits, subset), axis=-1)]
    return pred == labels


def accuracy(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None,
             class_subset: Any = None) -> jax.Array:
    """Top-1 accuracy in percent (reference utils.cls_acc).

    Args:
      logits: f32[B, C].
      labels: i32[B].
      valid: optional bool[B]; padded examples (False) are ignored.
      class_subset: optional i32[S] class ids: the prediction is the best class of the subset (returned as
        its id in [0, C)), labels are ids in [0, C). For labels already in [0, S) use
        `accuracy(restrict(logits, class_subset), labels)`.

    Returns:
      f32[] percentage of correct valid examples (0 if there are none).
    """
    chex.assert_rank([logits, labels], [2, 1])
    correct = _correct(logits, labels, class_subset)
    if valid is None:
        return 100.0 * jnp.mean(correct.astype(jnp.float32))
    valid = jnp.asarray(valid, bool)
    n = jnp.sum(valid)
    return 100.0 * jnp.sum(correct & valid) / jnp.maximum(n, 1)


def grid(start: float, stop: float, steps: int) -> np.ndarray:
    """The reference's search grid: [i * (stop - start) / steps + start for i in range(steps)] (stop excluded).

    Returns:
      f64[steps], computed with Python floats exactly as the reference does.
    """
    return np.asarray([i * (stop - start) / steps + start for i in range(int(steps))], np.float64)


def _nested_vmap(fn: Callable[..., jax.Array], num_axes: int) -> Callable[..., jax.Array]:
    """fn(*scalars) -> fn(*vectors) over the outer product, first argument outermost."""
    for i in reversed(range(num_axes)):
        fn = jax.vmap(fn, in_axes=tuple(0 if j == i else None for j in range(num_axes)))
    return fn


@functools.partial(jax.jit, static_argnames=("logits_fn", "names", "batch_size", "chunk"))
def _grid_counts(logits_fn, names, values, features, labels, valid, args, batch_size, chunk):
    n = labels.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n

    def blocks(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((nb, batch_size) + x.shape[1:])

    feats = jax.tree.map(blocks, features)
    labs, mask = blocks(labels), blocks(valid)

    def count_block(block):
        f, y, m = block

        def one(*params):
            out = logits_fn(f, *args, **dict(zip(names, params)))
            return jnp.sum((jnp.argmax(out, axis=-1) == y) & m, dtype=jnp.int32)

        counts = _nested_vmap(one, len(names))
        if chunk is None or chunk >= values[0].shape[0]:
            return counts(*values)
        # The first axis in chunks of `chunk` values: bounds the memory of the vmapped intermediates.
        first = values[0]
        nc = -(-first.shape[0] // chunk)
        first = jnp.pad(first, (0, nc * chunk - first.shape[0]), mode="edge").reshape(nc, chunk)
        out = jax.lax.map(lambda v: counts(v, *values[1:]), first)
        return out.reshape((nc * chunk,) + out.shape[2:])[: values[0].shape[0]]

    per_block = jax.lax.map(count_block, (feats, labs, mask))
    return per_block.sum(axis=0)


def grid_counts(logits_fn: Callable[..., jax.Array], grids: Mapping[str, Any], features: Any, labels: jax.Array, *,
                args: tuple[Any, ...] = (), valid: jax.Array | None = None, batch_size: int = 64,
                chunk: int | None = None) -> np.ndarray:
    """Correct predictions for every setting of the grid: i64[n_1, ..., n_k] (see `search` for the arguments)."""
    names = tuple(grids)
    if not names:
        raise ValueError("search needs at least one grid axis")
    host_values = [np.asarray(grids[k]).reshape(-1) for k in names]
    if any(v.size == 0 for v in host_values):
        raise ValueError(f"empty grid axis in {dict(zip(names, (v.size for v in host_values)))}")
    values = tuple(jnp.asarray(v, jnp.float32) for v in host_values)
    labels = jnp.asarray(labels)
    valid = jnp.ones(labels.shape, bool) if valid is None else jnp.asarray(valid, bool)
    return np.asarray(_grid_counts(logits_fn, names, values, features, labels, valid, tuple(args),
                                   int(min(batch_size, max(labels.shape[0], 1))), chunk)).astype(np.int64)


def _best(grids: Mapping[str, Any], counts: np.ndarray, n: int) -> tuple[dict[str, float], float, np.ndarray]:
    table = 100.0 * counts / max(n, 1)
    idx = np.unravel_index(int(np.argmax(counts)), counts.shape)  # first maximum in row-major = loop order
    best = {k: float(np.asarray(v).reshape(-1)[i]) for (k, v), i in zip(grids.items(), idx)}
    return best, float(table[idx]), table


def search(logits_fn: Callable[..., jax.Array], grids: Mapping[str, Any], features: Any, labels: jax.Array, *,
           args: tuple[Any, ...] = (), valid: jax.Array | None = None, batch_size: int = 64,
           chunk: int | None = None) -> tuple[dict[str, float], float, np.ndarray]:
    """Exhaustive grid search of hyperparameters by validation accuracy, as the reference's nested loops.

    Ties are broken like the reference's strict '>' update in nested loop order: the first best setting
    when the grid is enumerated with the first key of `grids` outermost (beta, alpha, lam for DualAdapter).
    (If every setting scores 0 the reference keeps its initial zeros; we return the first setting.)

    Args:
      logits_fn: `logits_fn(features_block, *args, **{name: f32[] scalar}) -> f32[b, C]`, row-wise in the
        features, e.g. `lambda f, w_pos, w_neg, caches, beta, alpha, lam: dualadapter.logits(f, w_pos, w_neg,
        caches, alpha=alpha, beta=beta, lam=lam)` with `args=(w_pos, w_neg, caches)`. It is a static argument
        of a jit (hashed by identity: define it once; a new lambda per call recompiles).
      grids: name -> 1-D values, in nested loop order (outermost first).
      features: f32[N, D] (or any pytree of arrays with leading axis N) passed to `logits_fn` in blocks.
      labels: i32[N].
      args: pytree of arrays passed to `logits_fn` unchanged (traced, not baked into the program).
      valid: optional bool[N]; padded examples (False) are not counted.
      batch_size: number of examples per block (memory ~ settings x batch_size x C if XLA cannot fuse).
      chunk: if set, the first grid axis is evaluated `chunk` values at a time (further bounds memory).

    Returns:
      (best: name -> float grid value, best accuracy in percent, table f64[n_1, ..., n_k] of accuracies).
    """
    counts = grid_counts(logits_fn, grids, features, labels, args=args, valid=valid, batch_size=batch_size,
                         chunk=chunk)
    n = int(np.sum(np.asarray(valid))) if valid is not None else int(np.shape(labels)[0])
    return _best(grids, counts, n)


def search_folds(logits_fn: Callable[..., jax.Array], grids: Mapping[str, Any],
                 folds: Sequence[tuple[Any, jax.Array, tuple[Any, ...]]], *, batch_size: int = 64,
                 chunk: int | None = None) -> tuple[dict[str, float], float, np.ndarray]:
    """Cross-validated `search`: the setting with the most correct held-out predictions over all folds.

    Args:
      logits_fn, grids, batch_size, chunk: as in `search`.
      folds: one (held-out features, held-out labels i32[n_f], args) per fold; `args` are that fold's own
        (e.g. a cache built without the held-out shots).

    Returns:
      (best setting, its pooled held-out accuracy in percent, table of pooled accuracies).
    """
    if not folds:
        raise ValueError("search_folds needs at least one fold")
    counts = sum(grid_counts(logits_fn, grids, f, y, args=a, batch_size=batch_size, chunk=chunk)
                 for f, y, a in folds)
    return _best(grids, counts, sum(int(np.shape(y)[0]) for _, y, _ in folds))
