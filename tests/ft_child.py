"""A child process for tests/test_fault_tolerance.py: a small MLP with dropout trained by `trainer.fit`.

  python tests/ft_child.py WORKDIR OUT.npz [--kill-at STEP] [--term-at STEP] [--nan-at STEP] [--every N]
                           [--keep K] [--hidden H] [--grain] [--restore-only]

--kill-at / --term-at send SIGKILL / SIGTERM to this process when the batch after STEP is requested (for
--kill-at the async save of STEP has just been issued, so the kill usually lands mid-save); --nan-at poisons
that step's batch; --keep is the number of checkpoints kept; --hidden the MLP's width (the default 256 makes
tensorstore write the arrays to data files, where a flipped byte goes unnoticed, not inline in its index).
--grain feeds the same batches through `data.pipeline.EpochBatches` (built ahead in grain's threads, so a signal
sent while building batch STEP lands a few steps earlier). --restore-only runs the fit under
`trainer.restore_only()`, as `vlm-jax eval` does. The final trainable params go to OUT.npz. A UserError
(a damaged workdir, a full disk) is one `error:` line and exit code 2, as launch/main.py reports it.
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from vlm_jax import errors  # noqa: E402
from vlm_jax.data import pipeline  # noqa: E402
from vlm_jax.runtime import mesh as mesh_lib  # noqa: E402
from vlm_jax.train import trainer  # noqa: E402

N, BATCH, EPOCHS = 64, 8, 3
STEPS = N // BATCH


def loss_fn(params, batch, rng):
    h = jax.nn.gelu(batch["x"] @ params["mlp"]["w1"])
    keep = jax.random.bernoulli(rng, 0.8, h.shape)          # dropout: the resumed run must draw the same masks
    pred = (jnp.where(keep, h / 0.8, 0.0) @ params["mlp"]["w2"])[:, 0] * params["frozen"]["scale"]
    err = jnp.mean((pred - batch["y"]) ** 2)
    return err, {"mse": err}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("out")
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--term-at", type=int, default=-1)
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--grain", action="store_true")
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--restore-only", action="store_true")
    a = ap.parse_args()
    logging.set_verbosity(logging.INFO)   # the test reads the 'resumed from' line

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype(np.float32)
    y = np.sin(x @ np.array([1.0, -2.0, 0.5, 0.3], np.float32)).astype(np.float32)

    def make(idx, epoch, b):
        step = epoch * STEPS + b          # the step this batch will produce is step + 1
        if step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == a.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        xb = x[idx].copy()
        if step + 1 == a.nan_at:
            xb[0, 0] = np.nan
        return {"x": xb, "y": y[idx]}

    def epoch_batches(epoch):
        order = np.random.default_rng(epoch).permutation(N)
        for b in range(STEPS):
            yield make(order[b * BATCH:(b + 1) * BATCH], epoch, b)

    if a.grain:   # default_rng([epoch]) is default_rng(epoch): the same order
        epoch_batches = pipeline.EpochBatches(N, (BATCH,) * STEPS, (), make, read_threads=2)  # noqa: F811

    params = {"mlp": {"w1": jnp.asarray(rng.normal(size=(4, a.hidden)) * 0.5, jnp.float32),
                      "w2": jnp.zeros((a.hidden, 1), jnp.float32)},
              "frozen": {"scale": jnp.ones(())}}
    import contextlib
    try:
        with trainer.restore_only() if a.restore_only else contextlib.nullcontext():
            result = trainer.fit(
                loss_fn=loss_fn, params=params, param_groups=[("mlp/.*", 1.0)],
                optim={"name": "adamw", "lr": 0.05, "weight_decay": 0.01}, num_epochs=EPOCHS, steps_per_epoch=STEPS,
                epoch_batches=epoch_batches, mesh=mesh_lib.make_mesh(), rng=jax.random.key(1), workdir=a.workdir,
                checkpoint_every_steps=a.every, accum_steps=a.accum, log_every_s=1e9, max_to_keep=a.keep)
    except trainer.Preempted as e:
        print(f"PREEMPTED {e.step}", flush=True)
        sys.exit(143)
    except trainer.TrainingDiverged as e:
        print(f"DIVERGED {e}", flush=True)
        sys.exit(3)
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    np.savez(a.out, **{k: np.asarray(v) for k, v in result.state.params["mlp"].items()})
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
