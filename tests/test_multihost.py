"""Multi-process JAX on one machine: 2 processes x 2 fake CPU devices under `jax.distributed` (gloo collectives).

The 2-process run checks `mesh.shard_batch` placement and `mesh.to_host`, then trains a small MLP regression
with `trainer.fit(workdir=...)` on a mesh over all 4 devices, its hidden layer split across the processes. A 1-process run then (a) calls `fit` with the same
workdir and number of epochs, which must restore the checkpoint and train nothing, and (b) trains the same
problem uninterrupted from scratch; both must give the 2-process parameters to ~1e-6.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, os, sys
    mode, out_dir = sys.argv[1], sys.argv[2]
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from vlm_jax.runtime import distributed
    if mode == "worker":
        port, pid = sys.argv[3], int(sys.argv[4])
        assert distributed.initialize("auto", coordinator_address=f"localhost:{port}", num_processes=2,
                                      process_id=pid)
    import jax.numpy as jnp, numpy as np
    from vlm_jax.runtime import mesh as mesh_lib
    from vlm_jax.train import trainer

    def log(*a):
        print(f"[{mode} {jax.process_index()}]", *a, flush=True)

    log(distributed.describe())

    # ---- shard_batch places the right slices (every process passes the same global batch).
    if mode == "worker":
        assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
        mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2})
        x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
        g = mesh_lib.shard_batch({"x": x, "i": np.arange(8)}, mesh)["x"]
        assert g.shape == (8, 3) and not g.is_fully_addressable
        flat = mesh.devices.reshape(-1)   # device k of the ('data', 'fsdp') order holds rows 2k, 2k+1
        seen = []
        for shard in g.addressable_shards:
            k = list(flat).index(shard.device)
            np.testing.assert_array_equal(np.asarray(shard.data), x[2 * k:2 * k + 2])
            np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
            seen.append(k)
        rows = mesh_lib.addressable_rows(mesh, 8)
        np.testing.assert_array_equal(rows, np.concatenate([np.arange(2 * k, 2 * k + 2) for k in sorted(seen)]))
        assert len(rows) == 4   # half the batch per process
        y = jax.jit(lambda a: a * 2.0 + 1.0)(g)   # batch-sharded output spanning both processes
        np.testing.assert_array_equal(mesh_lib.to_host(y), x * 2.0 + 1.0)
        total = jax.jit(jnp.sum, out_shardings=mesh_lib.replicated(mesh))(g)
        assert float(total) == float(x.sum())
        log("shard_batch OK, rows", rows.tolist())
    else:
        mesh = mesh_lib.make_mesh()

    # ---- a small MLP regression, the same data on every process and in every mode.
    rng = np.random.default_rng(0)
    n, d, h = 64, 5, 16
    xs = rng.normal(size=(n, d)).astype(np.float32)
    ys = np.tanh(xs @ rng.normal(size=(d,))).astype(np.float32)[:, None]
    requested = []

    def epoch_batches(epoch):
        requested.append(epoch)
        order = np.random.default_rng([1, epoch]).permutation(n)
        for i in range(0, n, 16):
            idx = order[i:i + 16]
            yield {"x": xs[idx], "y": ys[idx]}

    def loss_fn(params, batch, rng):
        del rng
        p = params["mlp"]
        hid = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])
        err = jnp.mean((hid @ p["w2"] + p["b2"] - batch["y"]) ** 2)
        return err, {"mse": err}

    k = np.random.default_rng(1)
    params = {"mlp": {"w1": (0.3 * k.normal(size=(d, h))).astype(np.float32), "b1": np.zeros(h, np.float32),
                      "w2": (0.3 * k.normal(size=(h, 1))).astype(np.float32), "b2": np.zeros(1, np.float32)}}
    if mode == "worker":
        # The hidden dimension split over all 4 devices (FSDP-like): each process holds half of these weights and
        # of their optimizer moments, and writes its own shards of the checkpoint.
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
        params["mlp"]["w1"] = jax.device_put(params["mlp"]["w1"], split)
        params["mlp"]["b1"] = jax.device_put(params["mlp"]["b1"], mesh_lib.batch_sharding(mesh))
        params["mlp"]["w2"] = jax.device_put(params["mlp"]["w2"], mesh_lib.batch_sharding(mesh))
        assert not params["mlp"]["w1"].is_fully_addressable
    epochs = 3
    workdir = os.path.join(out_dir, "workdir") if mode != "fresh" else None
    if mode == "worker":   # what launch/main.py checks first: both processes see the same workdir
        distributed.check_shared_workdir(workdir)
        log("workdir shared")
    result = trainer.fit(loss_fn=loss_fn, params=params, param_groups=[("mlp/.*", 1.0)],
                         optim={"name": "adam", "lr": 0.05, "decay_type": "cosine"}, num_epochs=epochs,
                         steps_per_epoch=4, epoch_batches=epoch_batches, mesh=mesh, rng=jax.random.key(0),
                         workdir=workdir, log_every_s=1e9)
    if mode == "worker":
        log("w1 after training:", result.state.params["mlp"]["w1"].sharding.spec)
    got = {k: v.tolist() for k, v in mesh_lib.to_host(result.state.params["mlp"]).items()}
    out = {"params": got, "step": int(mesh_lib.to_host(result.state.step)), "requested_epochs": requested,
           "history": result.history}
    if mesh_lib.is_primary():
        with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
            json.dump(out, f)
    log("done, step", out["step"], "epochs requested", requested)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}")


def _report(procs) -> str:
    return "\n".join(f"--- {name}: rc={rc}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
                     for name, rc, out, err in procs)


def _run_two_processes(script: str, out_dir: str, timeout: float = 90):
    """Starts 2 worker processes on localhost; returns [(name, rc, stdout, stderr)] once both ended."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, script, "worker", out_dir, str(port), str(i)], cwd=ROOT,
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    deadline = time.monotonic() + timeout
    results = []
    for i, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
            results.append((f"process {i} (killed after {timeout:.0f} s)", -9, out, err))
            continue
        results.append((f"process {i}", p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("multihost"))
    script = os.path.join(out_dir, "script.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    workers = _run_two_processes(script, out_dir)
    assert all(rc == 0 for _, rc, _, _ in workers), "2-process run failed:\n" + _report(workers)
    singles = []
    for mode in ("resume", "fresh"):
        p = subprocess.run([sys.executable, script, mode, out_dir], cwd=ROOT, env=_env(1), capture_output=True,
                           text=True, timeout=90)
        singles.append((mode, p.returncode, p.stdout, p.stderr))
        assert p.returncode == 0, f"1-process {mode} run failed:\n" + _report(singles)
    loaded = {}
    for mode in ("worker", "resume", "fresh"):
        with open(os.path.join(out_dir, f"{mode}.json")) as f:
            loaded[mode] = json.load(f)
    return loaded, workers


def test_two_processes_see_four_devices_and_shard_the_batch(runs):
    _, workers = runs
    out = "".join(o for _, _, o, _ in workers)
    assert out.count("workdir shared") == 2
    assert "[worker 0] process 0 of 2, 2 local / 4 global cpu devices" in out
    assert "[worker 1] process 1 of 2, 2 local / 4 global cpu devices" in out
    assert out.count("shard_batch OK") == 2
    # Each process holds a different half of the batch.
    assert "[worker 0] shard_batch OK, rows [0, 1, 2, 3]" in out
    assert "[worker 1] shard_batch OK, rows [4, 5, 6, 7]" in out


def test_two_process_training_restores_in_one_process_and_equals_one_process_training(runs):
    loaded, _ = runs
    worker, resume, fresh = loaded["worker"], loaded["resume"], loaded["fresh"]
    assert worker["step"] == resume["step"] == fresh["step"] == 12
    assert worker["requested_epochs"] == [0, 1, 2]
    assert resume["requested_epochs"] == []        # restored at the end: nothing trained again
    assert fresh["requested_epochs"] == [0, 1, 2]
    assert worker["history"][-1]["train_loss"] < worker["history"][0]["train_loss"]
    for name in worker["params"]:
        w = np.asarray(worker["params"][name])
        np.testing.assert_array_equal(np.asarray(resume["params"][name]), w, err_msg=name)
        np.testing.assert_allclose(np.asarray(fresh["params"][name]), w, rtol=1e-6, atol=1e-6, err_msg=name)


def test_cluster_detection():
    from vlm_jax.runtime import distributed

    assert distributed.detect_cluster({}) is None
    assert distributed.detect_cluster({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is None
    assert "SLURM" in distributed.detect_cluster({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t1v-0"}) is None
    assert "TPU pod" in distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"})
    assert "MEGASCALE" in distributed.detect_cluster({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"})
    assert "CLOUD_TPU_TASK_ID" in distributed.detect_cluster({"CLOUD_TPU_TASK_ID": "0"})
    assert "JAX_COORDINATOR_ADDRESS" in distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1234"})
    assert "Open MPI" in distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "2"})
    # auto without a cluster, and off, never call jax.distributed.initialize.
    assert distributed.initialize("auto", environ={}) is False
    assert distributed.initialize("off", environ={"SLURM_NTASKS": "8"}) is False
    with pytest.raises(ValueError, match="contradicts"):
        distributed.initialize("off", num_processes=2)
    with pytest.raises(ValueError, match="must be one of"):
        distributed.initialize("maybe")


def test_launcher_rejects_contradicting_flags(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"),
                           "--config=configs/dualadapter.py:runlocal", f"--workdir={tmp_path}", "--distributed=off",
                           "--num_processes=2"], cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --distributed=off contradicts --num_processes" in proc.stderr


def test_two_processes_with_different_workdirs_exit_2_within_a_minute(tmp_path):
    """A node-local workdir: each process sees its own directory. Every process says so in one line and exits."""
    port, start = _free_port(), time.monotonic()
    env = dict(_env(1), VLM_JAX_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "main.py"),
                               "--config=configs/dualadapter.py:runlocal", f"--workdir={tmp_path / f'host{i}'}",
                               f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    for i, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(1.0, 60 - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
        results.append((f"process {i}", p.returncode, out, err))
    elapsed = time.monotonic() - start
    assert [rc for _, rc, _, _ in results] == [2, 2], _report(results)
    assert elapsed < 60
    for i, (_, _, _, err) in enumerate(results):
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "process 1 of 2 does not see the file process 0 wrote" in errors[0], errors
        assert str(tmp_path / f"host{i}") in errors[0]
