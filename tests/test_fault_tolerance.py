"""Fault tolerance of `trainer.fit`: SIGKILL / SIGTERM mid-training, a crash during a save, damaged checkpoints,
a NaN loss, and gradient accumulation. Each run is a real child process (tests/ft_child.py) so the signals and
the files are real."""

import glob
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vlm_jax.errors import UserError
from vlm_jax.programs import trained
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "ft_child.py")


def _child(workdir, out, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, CHILD, str(workdir), str(out), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _params(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _steps(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "train", "*"))
                  if os.path.basename(p).isdigit())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """(workdir, final params) of an uninterrupted run that keeps its last 5 checkpoints (steps 20-24)."""
    d = tmp_path_factory.mktemp("full")
    proc = _child(d / "w", d / "p.npz", "--keep", 5)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr[-3000:]
    return d / "w", _params(d / "p.npz")


@pytest.fixture(scope="module")
def uninterrupted(full_run):
    return full_run[1]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigkill_mid_epoch_then_restart_equals_uninterrupted(tmp_path, uninterrupted):
    killed = _child(tmp_path / "w", tmp_path / "p.npz", "--kill-at", 13, "--every", 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "p.npz").exists()
    assert max(_steps(tmp_path / "w")) in (12, 13)     # 13's async save may not have landed before the kill
    resumed = _child(tmp_path / "w", tmp_path / "p.npz", "--every", 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "(epoch 1, batch" in resumed.stderr
    _assert_same(_params(tmp_path / "p.npz"), uninterrupted)


def test_sigkill_with_the_grain_pipeline_then_restart_equals_the_plain_uninterrupted_run(tmp_path, uninterrupted):
    """The grain pipeline (batches built and placed ahead; the epoch reopened at the checkpointed batch) trains
    bit-identically to the plain generator, also across a SIGKILL: (epoch, batch) is the iterator's whole state."""
    killed = _child(tmp_path / "w", tmp_path / "p.npz", "--kill-at", 14, "--every", 1, "--grain")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert 8 <= max(_steps(tmp_path / "w")) <= 14   # the batch of step 15 is built a few steps ahead
    resumed = _child(tmp_path / "w", tmp_path / "p.npz", "--every", 1, "--grain")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _assert_same(_params(tmp_path / "p.npz"), uninterrupted)


def test_sigterm_saves_and_exits_then_resumes(tmp_path, uninterrupted):
    # No periodic checkpoints: the only mid-epoch checkpoint is the one SIGTERM triggers.
    term = _child(tmp_path / "w", tmp_path / "p.npz", "--term-at", 10, "--every", 0)
    assert term.returncode == 143 and "PREEMPTED 11" in term.stdout, (term.stdout, term.stderr[-2000:])
    assert _steps(tmp_path / "w")[-1] == 11        # saved at the step where the signal was seen, mid-epoch 1
    resumed = _child(tmp_path / "w", tmp_path / "p.npz", "--every", 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 11 (epoch 1, batch 3)" in resumed.stderr
    _assert_same(_params(tmp_path / "p.npz"), uninterrupted)


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path, uninterrupted):
    ckpts = tmp_path / "w" / "checkpoints" / "train"
    first = _child(tmp_path / "w", tmp_path / "p.npz", "--kill-at", 5, "--every", 1)
    assert first.returncode == -signal.SIGKILL
    # Whatever the kill interrupted, plus an unfinished save of a later step as orbax leaves one (written to a
    # temporary name, renamed only when complete): the restart must ignore both and resume from a whole one.
    partial = ckpts / "9.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 100)
    resumed = _child(tmp_path / "w", tmp_path / "p.npz", "--every", 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _assert_same(_params(tmp_path / "p.npz"), uninterrupted)


def _array_files(step_dir):
    """The data files of a step's state (tensorstore OCDBT), largest last."""
    return sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def _flip_bytes(path, n=16):
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 2, len(data) // 2 + n):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_damaged_checkpoints_are_skipped_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, full_run):
    workdir, reference = full_run
    shutil.copytree(workdir, tmp_path / "w")
    ckpts = tmp_path / "w" / "checkpoints" / "train"
    assert _steps(tmp_path / "w") == [20, 21, 22, 23, 24]
    for f in _array_files(ckpts / "24"):                      # truncated array files
        os.truncate(f, os.path.getsize(f) // 2)
    _flip_bytes(_array_files(ckpts / "23")[-1])               # 16 flipped bytes: tensorstore reads them silently
    (ckpts / "22" / "state" / "_METADATA").unlink()          # deleted metadata, of the arrays ...
    (ckpts / "21" / "meta" / "metadata").unlink()            # ... and of the trainer's own item
    # eval / predict / export read the newest step only (an older one is an unfinished training): one line that
    # says what the resume below does.
    with pytest.raises(UserError) as e:
        trained.restore_fit(str(tmp_path / "w"), "train")
    assert str(e.value).startswith(f"checkpoint step 24 in {ckpts} is damaged (") and str(e.value).endswith(
        f": rerun `vlm-jax train` with the run's --config and --workdir={tmp_path / 'w'} to retrain from the newest "
        "good step, then run this command again"), e.value
    # The trainer under restore_only (what eval runs) reads the workdir and never changes it: the damaged steps stay.
    proc = _child(tmp_path / "w", tmp_path / "p.npz", "--restore-only")
    assert proc.returncode == 2 and "error: " in proc.stderr, proc.stderr[-3000:]
    assert _steps(tmp_path / "w") == [20, 21, 22, 23, 24]
    proc = _child(tmp_path / "w", tmp_path / "p.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert [w.split("checkpoint step ")[1].split()[0] for w in warnings] == ["24", "23", "22", "21"], warnings
    assert "checksum" in warnings[1]
    assert "at step 20 (epoch 2, batch 4)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _steps(tmp_path / "w")[-1] == 24                  # the damaged steps were replaced by good ones
    _assert_same(_params(tmp_path / "p.npz"), reference)
    fit = trained.restore_fit(str(tmp_path / "w"), "train")  # ... which is what eval then reads
    assert fit.step == 24
    _assert_same(fit.params["mlp"], reference)


def test_no_readable_checkpoint_is_one_error_line(tmp_path, full_run):
    shutil.copytree(full_run[0], tmp_path / "w")
    for step in _steps(tmp_path / "w"):
        os.remove(tmp_path / "w" / "checkpoints" / "train" / str(step) / "state" / "_METADATA")
    proc = _child(tmp_path / "w", tmp_path / "p.npz")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint" in errors[0] and "reads back whole" in errors[0], errors
    assert "Traceback" not in proc.stderr


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = _child(tmp_path / "w", tmp_path / "p.npz", "--nan-at", 7, "--every", 2)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss (nan) at step 7" in proc.stdout and "last good checkpoint (step 6)" in proc.stdout
    assert _steps(tmp_path / "w")[-1] == 6
    with ocp.CheckpointManager(os.path.abspath(tmp_path / "w" / "checkpoints" / "train")) as m:
        restored = m.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))


def test_sigterm_during_a_wait_that_never_ends_exits_after_the_grace_period():
    """SIGTERM is honoured in every phase: a loop stuck where it cannot check the flag (a hung checkpoint wait)
    is ended once the grace period is over, with one line and the preemption status."""
    code = ("import os, signal, time\nfrom vlm_jax.train import trainer\n"
            "with trainer._sigterm_flag(True, grace_s=1.0):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "preempted: SIGTERM 1 s ago and the step did not end: exiting without saving")


# ----------------------------------------------------------------------------------------------------------
# Gradient accumulation, in process.

def _mlp_problem(seed=0, n=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.normal(size=(n,)).astype(np.float32)
    params = {"w1": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32), "w2": jnp.asarray(rng.normal(size=(8,)),
                                                                                         jnp.float32)}

    def loss_fn(p, batch, rng):
        del rng
        err = jnp.mean((jnp.tanh(batch["x"] @ p["w1"]) @ p["w2"] - batch["y"]) ** 2)
        return err, {"mse": err}
    return loss_fn, params, {"x": x, "y": y}


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_equals_the_large_batch(k):
    loss_fn, params, batch = _mlp_problem()
    labels = trainer.param_labels(params, [(".*", 1.0)])
    tx = trainer.make_optimizer({"name": "adamw", "lr": 0.01}, labels, 10)
    outs = []
    for accum in (1, k):
        step = trainer.make_train_step(loss_fn, tx, jax.random.key(0), accum_steps=accum)
        p = jax.tree.map(jnp.copy, params)        # the step donates its state
        state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
        for _ in range(3):
            state, metrics = step(state, {}, batch)
        outs.append((state.params, metrics))
    (p1, m1), (pk, mk) = outs
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, pk)
    np.testing.assert_allclose(m1["loss"], mk["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], mk["grad_norm"], rtol=1e-5)


def test_gradient_accumulation_rejects_an_indivisible_batch():
    loss_fn, params, batch = _mlp_problem(n=6)
    labels = trainer.param_labels(params, [(".*", 1.0)])
    tx = trainer.make_optimizer({"name": "adamw", "lr": 0.01}, labels, 10)
    step = trainer.make_train_step(loss_fn, tx, jax.random.key(0), accum_steps=4)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    with pytest.raises(ValueError, match="divisible by 4"):
        step(state, {}, batch)


def test_a_changed_steps_per_epoch_is_refused_on_resume(tmp_path):
    loss_fn, params, batch = _mlp_problem()

    def run(steps):
        return trainer.fit(loss_fn=loss_fn, params=params, param_groups=[(".*", 1.0)],
                           optim={"name": "adam", "lr": 0.01}, num_epochs=2, steps_per_epoch=steps,
                           epoch_batches=lambda e: [batch] * steps, mesh=mesh_lib.make_mesh(),
                           rng=jax.random.key(0), workdir=str(tmp_path))
    run(2)
    with pytest.raises(trainer.errors.UserError, match="written with 2 steps per epoch, this run has 3"):
        run(3)
