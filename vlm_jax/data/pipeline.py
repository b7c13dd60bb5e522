"""The one input pipeline of the trainer, on grain: epoch batches as a `MapDataset`, prefetched to the device.

An epoch is a grain `MapDataset` over its batch indices: batch i of epoch e is `make(rows, e, i)`, `rows` the
i-th slice of a permutation of the n training rows that is a pure function of (seed, e) (numpy's
`default_rng([*seed, e])`, the order the programs have always used). So any position (epoch, batch) can be
reopened without reading what came before it: a resumed run slices the dataset at the checkpointed batch
(`ds[start:]`), nothing is decoded twice, and the batches it sees are the ones the uninterrupted run saw.

Per host: with several processes a host builds only the rows of the global batch its devices hold
(`mesh.addressable_rows`; `make` must then be row-wise, i.e. a row's data depends only on that row), the other
rows stay zero and `shard_batch` never reads them. Decoding runs in grain's read threads ahead of the step,
and `device_iterator` places each batch on the mesh (`mesh.shard_batch`) a few batches ahead.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from vlm_jax.runtime import mesh as mesh_lib

MakeBatch = Callable[[np.ndarray, int, int], Any]


def epoch_order(n: int, seed: Sequence[int], epoch: int) -> np.ndarray:
    """i64[n]: the epoch's permutation of the rows, a pure function of (seed, epoch)."""
    return np.random.default_rng([*seed, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class EpochBatches:
    """The trainer's `epoch_batches` as grain datasets.

    Attributes:
      n: rows in the training set.
      sizes: the batch sizes of one epoch (all equal but possibly the last); rows beyond their sum are dropped.
      seed: the permutation's seed (with the epoch appended).
      make: (rows i64[b], epoch, batch index) -> a pytree of arrays with leading dimension b.
      mesh: where the batches go; with several processes only this host's rows are built.
      rowwise: `make` of a subset of the rows gives those rows of the whole batch (required for per-host rows;
        False builds the whole global batch on every host).
      read_threads: grain's threads that build batches ahead of the step (1: one batch at a time).
      device_ahead: batches placed on the devices ahead of the step.
    """
    n: int
    sizes: tuple[int, ...]
    seed: tuple[int, ...]
    make: MakeBatch
    mesh: Any = None
    rowwise: bool = True
    read_threads: int = 1
    device_ahead: int = 2

    def __len__(self) -> int:
        return len(self.sizes)

    def dataset(self, epoch: int) -> grain.MapDataset:
        """The epoch's batches as a MapDataset (random access: `ds[i]` builds batch i only)."""
        order = epoch_order(self.n, self.seed, epoch)
        starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        local = self._local_rows()

        def build(i: int):
            rows = order[starts[i]:starts[i + 1]]
            if local is None:
                return self.make(rows, epoch, i)
            mine = local(len(rows))
            return _scatter(self.make(rows[mine], epoch, i), mine, len(rows))
        return grain.MapDataset.range(len(self.sizes)).map(build)

    def __call__(self, epoch: int) -> Iterator[Any]:
        """Host batches of the epoch, in order, each built when asked for (the plain `epoch_batches` contract)."""
        ds = self.dataset(epoch)
        return (ds[i] for i in range(len(ds)))

    def device_iterator(self, epoch: int, start: int, mesh) -> Iterator[Any]:
        """Batches `start`, `start` + 1, ... of the epoch, built in grain's read threads and placed on `mesh`
        `device_ahead` batches ahead of the consumer."""
        ds = self.dataset(epoch)[start:]
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                                  prefetch_buffer_size=max(2, self.read_threads)))
        return prefetch_to_device(iter(it), mesh, self.device_ahead)

    def _local_rows(self) -> Callable[[int], np.ndarray] | None:
        if not self.rowwise or self.mesh is None or jax.process_count() == 1:
            return None
        return lambda b: mesh_lib.addressable_rows(self.mesh, b)


def epoch_batches(n: int, bs: int, seed: Sequence[int], make: MakeBatch, *, mesh=None, rowwise: bool = True,
                  read_threads: int = 1) -> EpochBatches:
    """n // bs full batches of `bs` rows per epoch (the last partial batch dropped)."""
    return EpochBatches(n, (bs,) * (n // bs), tuple(int(s) for s in seed), make, mesh, rowwise, read_threads)


def _scatter(part: Any, rows: np.ndarray, size: int) -> Any:
    """A global batch of `size` rows whose `rows` are `part`'s and the rest zeros (never read by shard_batch)."""
    def one(x):
        x = np.asarray(x)
        out = np.zeros((size, *x.shape[1:]), x.dtype)
        out[rows] = x
        return out
    return jax.tree.map(one, part)


def prefetch_to_device(batches: Iterator[Any], mesh, ahead: int = 2) -> Iterator[Any]:
    """Yields `batches` placed on `mesh` (`shard_batch`), `ahead` of them dispatched before they are consumed.

    The transfer is asynchronous: placing batch t + 1 while step t runs hides the host-to-device copy.
    """
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(mesh_lib.shard_batch(batch, mesh))
        if len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
