"""The grain input pipeline (`data.pipeline`): the epoch order of the programs, reopening an epoch at a batch
without building the ones before it, per-host rows, batches placed on the mesh."""

import jax
import numpy as np
import pytest

from vlm_jax.data import pipeline
from vlm_jax.runtime import mesh as mesh_lib


def _make(calls):
    def make(idx, epoch, i):
        calls.append((epoch, i, len(idx)))
        return {"rows": np.asarray(idx, np.int32), "x": np.asarray(idx, np.float32)[:, None] * 10 + epoch}
    return make


def test_batches_follow_the_numpy_epoch_permutation_and_drop_the_partial_batch():
    calls = []
    eb = pipeline.epoch_batches(23, 4, [7, 1], _make(calls))
    for epoch in (0, 3):
        # The order the programs used before the pipeline: numpy's generator seeded by (seed..., epoch).
        order = np.random.default_rng([7, 1, epoch]).permutation(23)
        got = [b["rows"] for b in eb(epoch)]
        assert len(got) == 5
        np.testing.assert_array_equal(np.concatenate(got), order[:20])


def test_an_epoch_reopened_at_a_batch_builds_only_the_rest_and_places_them_on_the_mesh():
    mesh = mesh_lib.make_mesh()
    calls = []
    eb = pipeline.epoch_batches(40, 4, [3], _make(calls), read_threads=2)
    full = list(eb(2))
    calls.clear()
    rest = list(eb.device_iterator(2, 6, mesh))
    assert sorted(i for _, i, _ in calls) == [6, 7, 8, 9]      # batches 0-5 never built
    assert len(rest) == 4
    for want, got in zip(full[6:], rest):
        assert isinstance(got["x"], jax.Array) and got["x"].sharding == mesh_lib.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(got["x"]), want["x"])


def test_with_several_hosts_a_host_builds_only_its_rows(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(mesh_lib, "addressable_rows", lambda mesh, b: np.arange(b // 2, b))   # the second host
    calls = []
    eb = pipeline.epoch_batches(16, 8, [0], _make(calls), mesh=object())
    batch = next(eb(0))
    order = np.random.default_rng([0, 0]).permutation(16)
    assert calls == [(0, 0, 4)]
    np.testing.assert_array_equal(batch["rows"][4:], order[4:8])
    assert not batch["rows"][:4].any()                           # other hosts' rows: never read by shard_batch
    calls.clear()
    whole = pipeline.epoch_batches(16, 8, [0], _make(calls), mesh=object(), rowwise=False)
    np.testing.assert_array_equal(next(whole(0))["rows"], order[:8])


@pytest.mark.parametrize("ahead", [0, 2])
def test_prefetch_to_device_keeps_order(ahead):
    mesh = mesh_lib.make_mesh()
    host = [{"x": np.full((2, 3), i, np.float32)} for i in range(5)]
    got = [float(b["x"][0, 0]) for b in pipeline.prefetch_to_device(iter(host), mesh, ahead)]
    assert got == [0, 1, 2, 3, 4]
