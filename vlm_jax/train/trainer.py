"""The one generic trainer: optimizer from config, train state, jit step with donation, epoch loop.

The trainer knows no method by name. A method hands it
  * `loss_fn(params, batch, rng) -> (loss, metrics)`, where `params` is the full tree (trainable and frozen);
  * the parameter tree, of which the config's `param_groups` — big_vision's list of (regex, lr multiplier or
    None) — picks what trains. Frozen leaves are split off before differentiation, so they get neither
    gradients nor optimizer state: the backward pass through a frozen backbone is never built.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import os
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from vlm_jax import errors
from vlm_jax.train import checkpoints as ckpt_lib
from vlm_jax.train.evaluators import Evaluator
from vlm_jax.runtime import distributed
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.runtime.metrics import MetricWriter, Progress

PyTree = Any
LossFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


# ----------------------------------------------------------------------------------------------------------
# Trainable / frozen split.

def _flat(tree: PyTree) -> dict[str, Any]:
    return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def param_labels(params: PyTree, groups: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Maps each '/'-joined parameter path to its lr multiplier (float) or None (frozen).

    The first regex in `groups` that fully matches a path wins; unmatched paths are frozen, so a config
    names what trains rather than what does not.
    """
    compiled = [(re.compile(rx), mult) for rx, mult in groups]
    labels = {}
    for path in _flat(params):
        labels[path] = next((m for rx, m in compiled if rx.fullmatch(path)), None)
    return labels


def partition(params: PyTree, labels: Mapping[str, Any]) -> tuple[PyTree, PyTree]:
    """Splits `params` into (trainable, frozen) nested dicts by `labels` (None = frozen)."""
    flat = _flat(params)
    trainable = {k: v for k, v in flat.items() if labels[k] is not None}
    frozen = {k: v for k, v in flat.items() if labels[k] is None}
    return traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of `partition`."""
    return traverse_util.unflatten_dict({**_flat(frozen), **_flat(trainable)}, sep="/")


# ----------------------------------------------------------------------------------------------------------
# Optimizer.

def make_schedule(lr: float, total_steps: int, decay_type: str = "cosine", warmup_steps: int = 0):
    """Learning-rate schedule. 'cosine' equals torch's CosineAnnealingLR(T_max=total_steps, eta_min=0)."""
    if decay_type == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
    elif decay_type in ("constant", "none"):
        decay = optax.constant_schedule(lr)
    elif decay_type == "linear":
        decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1))
    else:
        raise ValueError(f"unknown schedule decay_type {decay_type!r}: use 'cosine', 'linear' or 'constant'")
    if warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])
    return decay


def make_optimizer(optim: Mapping[str, Any], labels: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """One optax transformation over the *trainable* tree; each lr multiplier is its own group.

    Args:
      optim: {'name': 'adamw'|'adam'|'sgd', 'lr', 'b1', 'b2', 'eps', 'weight_decay', 'momentum', 'decay_type',
        'warmup_steps', 'grad_clip_norm'}.
      labels: from `param_labels`.
      total_steps: length of the schedule.
    """
    optim = dict(optim)
    name = optim.pop("name", "adamw")
    lr = float(optim.pop("lr"))
    sched_kw = {k: optim.pop(k) for k in ("decay_type", "warmup_steps") if k in optim}
    clip = optim.pop("grad_clip_norm", None)

    def build(mult: float) -> optax.GradientTransformation:
        sched = make_schedule(lr * mult, total_steps, **sched_kw)
        if name == "adamw":
            tx = optax.adamw(sched, b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999), eps=optim.get("eps", 1e-8),
                             weight_decay=optim.get("weight_decay", 0.0))
        elif name == "adam":
            tx = optax.adam(sched, b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999), eps=optim.get("eps", 1e-8))
        elif name == "sgd":
            tx = optax.sgd(sched, momentum=optim.get("momentum"))
        else:
            raise ValueError(f"unknown optimizer {name!r}: use 'adamw', 'adam' or 'sgd'")
        return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx

    mults = sorted({m for m in labels.values() if m is not None})
    if not mults:
        raise ValueError("config.train.param_groups leaves no parameter trainable")
    names = {m: f"lr_x{m:g}" for m in mults}
    trainable_labels = traverse_util.unflatten_dict(
        {k: names[m] for k, m in labels.items() if m is not None}, sep="/")
    return optax.multi_transform({names[m]: build(m) for m in mults}, trainable_labels)


# ----------------------------------------------------------------------------------------------------------
# State and step.

@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree          # trainable parameters only
    opt_state: PyTree


def _microbatches(batch: Mapping[str, jax.Array], k: int) -> Mapping[str, jax.Array]:
    """[B, ...] leaves -> [k, B/k, ...]; microbatch i holds rows i, i + k, i + 2k, ...

    Strided rather than contiguous on purpose: the batch is sharded over devices in contiguous blocks, so the
    rows of one strided microbatch are spread over every device (a contiguous split would put microbatch i on
    only 1/k of them and serialise the step).
    """
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"gradient accumulation over {k} microbatches needs a batch size divisible by {k}, "
                             f"got a leaf of shape {x.shape}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, rng: jax.Array, *, accum_steps: int = 1,
                    state_shardings: PyTree | None = None):
    """Returns jit(step)(state, frozen, batch) -> (state, metrics); the state's buffers are donated.

    Args:
      loss_fn: (full params, batch, rng) -> (scalar loss, metrics).
      tx: the optimizer over the trainable tree.
      rng: the run's key; step t uses fold_in(rng, t), so a resumed run draws the same randomness.
      accum_steps: k > 1 splits the batch into k microbatches (`_microbatches`), runs forward + backward on each
        in a `lax.scan` (activation memory of one microbatch) and applies the mean gradient once. For a loss
        that is a mean over examples this equals the full-batch step; a batch-coupled loss (InfoNCE, whose
        negatives are the rest of the batch) becomes the mean of per-microbatch losses instead.
      state_shardings: a TrainState of shardings; pins the new state's layout (FSDP-sharded parameters stay
        sharded after the update instead of whatever layout the partitioner would pick).
    """

    def grads_of(params, frozen, batch, step_rng):
        def loss_of(trainable):
            return loss_fn(merge(trainable, frozen), batch, step_rng)
        return jax.value_and_grad(loss_of, has_aux=True)(params)

    def step(state: TrainState, frozen: PyTree, batch: Mapping[str, jax.Array]):
        step_rng = jax.random.fold_in(rng, state.step)
        if accum_steps == 1:
            (loss, metrics), grads = grads_of(state.params, frozen, batch, step_rng)
        else:
            def body(grad_sum, xs):
                i, micro = xs
                (loss, metrics), grads = grads_of(state.params, frozen, micro, jax.random.fold_in(step_rng, i))
                return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grad_sum, (losses, metrics) = jax.lax.scan(
                body, zeros, (jnp.arange(accum_steps), _microbatches(batch, accum_steps)))
            grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
            loss, metrics = jnp.mean(losses), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    metrics_sharding = jax.tree.leaves(state_shardings.step)[0]   # replicated
    return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, metrics_sharding))


# ----------------------------------------------------------------------------------------------------------
# Placement.

def placed_shardings(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """Each leaf's sharding: kept where the leaf is already a jax.Array laid out on `mesh` (e.g. FSDP-sharded
    by `mesh.shard_params`), replicated otherwise (host arrays, arrays on another mesh or a single device)."""
    repl = mesh_lib.replicated(mesh)

    def one(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
            return s
        return repl
    return jax.tree.map(one, tree)


def state_shardings(tx: optax.GradientTransformation, trainable_shardings: PyTree, abstract_params: PyTree,
                    mesh: jax.sharding.Mesh) -> TrainState:
    """The TrainState's shardings: optimizer moments follow their parameter, scalars (counts) are replicated."""
    repl = mesh_lib.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # multi_transform's inner states hold a MaskedNode where another group's parameter is: keep those as they are.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt = optax.tree_utils.tree_map_params(tx, lambda v, s: v if masked(v) else s, abstract_opt, trainable_shardings,
                                           transform_non_params=lambda _: repl, is_leaf=masked)
    return TrainState(step=repl, params=trainable_shardings, opt_state=opt)


# ----------------------------------------------------------------------------------------------------------
# Faults.

class TrainingDiverged(errors.UserError):
    """A non-finite loss or metric: the run stops, the last good checkpoint stays on disk."""


class Preempted(Exception):
    """SIGTERM (or a multi-host preemption notice) arrived: the state was saved; rerun the command to resume."""

    def __init__(self, step: int, directory: str | None):
        self.step, self.directory = step, directory
        where = f"checkpoint saved at step {step} in {directory}" if directory else "no workdir, nothing saved"
        super().__init__(f"preempted: {where}; rerun the same command to resume")


@contextlib.contextmanager
def _sigterm_flag(enabled: bool, grace_s: float = distributed.SIGTERM_GRACE_S):
    """Yields an Event set by SIGTERM while the block runs (the previous handler is restored after).

    The loop checks the event after each step, saves and raises `Preempted`. A run that does not get there
    within `grace_s` (stuck in a checkpoint wait or a slow evaluation), or a second SIGTERM, ends the process
    at once with status 143: SIGTERM is honoured in every phase.
    """
    flag = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag   # signal handlers can only be installed from the main thread
        return

    timers = []

    def handler(*_):
        if flag.is_set():
            distributed.exit_now("preempted: a second SIGTERM: exiting without waiting for the step to end", 143)
        flag.set()
        timers.append(threading.Timer(grace_s, distributed.exit_now, (
            f"preempted: SIGTERM {grace_s:.0f} s ago and the step did not end: exiting without saving", 143)))
        timers[-1].daemon = True
        timers[-1].start()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
        for t in timers:   # the loop saw the flag: the caller reports Preempted and exits
            t.cancel()


# ----------------------------------------------------------------------------------------------------------
# The epoch loop.

# Inside `restore_only()`, `fit` returns a workdir's finished training and never trains (`vlm-jax eval`/`predict`).
_RESTORE_ONLY = contextvars.ContextVar("restore_only", default=False)


@contextlib.contextmanager
def restore_only():
    """Within the block, `fit` restores the kept state of a finished training from its workdir and trains no
    step: a fit without a checkpoint, or whose checkpoint is short of the last step, is a UserError."""
    token = _RESTORE_ONLY.set(True)
    try:
        yield
    finally:
        _RESTORE_ONLY.reset(token)


def _no_checkpoint(name: str, where: str) -> errors.UserError:
    return errors.UserError(f"{name}: no checkpoint in {where}: this workdir's run never trained it (a config or a "
                            "version that differs from the run's?)")


@dataclasses.dataclass
class FitResult:
    state: TrainState
    best_params: PyTree          # trainable params of the best epoch (last epoch when there is no eval)
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    evals: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)  # name -> [{step, ...}]


def fit(
    *,
    loss_fn: LossFn,
    params: PyTree,
    param_groups: Sequence[Sequence[Any]],
    optim: Mapping[str, Any],
    num_epochs: int,
    steps_per_epoch: int,
    epoch_batches: Callable[[int], Iterable[Mapping[str, np.ndarray]]],
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    eval_fn: Callable[[PyTree], Mapping[str, float]] | None = None,
    select: str = "accuracy",
    workdir: str | None = None,
    writer: MetricWriter | None = None,
    name: str = "train",
    log_every_s: float = 10.0,
    checkpoint_every_steps: int = 0,
    accum_steps: int = 1,
    max_to_keep: int = 2,
    handle_sigterm: bool = True,
    evals: Sequence[Evaluator] = (),
) -> FitResult:
    """Trains for `num_epochs`, evaluating after each epoch and keeping the best epoch's parameters.

    Args:
      loss_fn: (full params, batch, rng) -> (scalar loss, metrics).
      params: the full parameter tree; `param_groups` picks the trainable part, which is trained in float32
        (master weights; bf16 / fp16 leaves are upcast) while frozen leaves keep their dtype. Leaves already
        laid out on `mesh` (FSDP / tensor-parallel, from `mesh.shard_params`) keep their sharding, and so do
        their optimizer moments; everything else is replicated.
      epoch_batches: epoch index -> exactly `steps_per_epoch` host batches (the global batch), best a
        `data.pipeline.EpochBatches` (`_placed_batches`). The epoch's data being a pure function of its index, the
        checkpointed (epoch, batch) is the whole data position: a resumed run reopens the epoch at that batch.
      eval_fn: trainable params -> metrics; `select` names the one to maximise (the best epoch is kept).
      evals: run every `every_steps` steps and after the last, written as `<name>/<evaluator>/<metric>` (a resumed
        run's `FitResult.evals` holds the evaluations it ran itself); they select nothing (`eval_fn` does).
      workdir: if set, orbax checkpoints (async; visible only once complete) go to workdir/checkpoints/<name> after
        each epoch, every `checkpoint_every_steps` steps (0: epoch ends only) and on SIGTERM (then `Preempted` is
        raised). A run restarted with the same workdir resumes from the latest one.

    Raises:
      TrainingDiverged: a non-finite loss (watched on the device every step, reported at the next log step, save
        or epoch end, with the step where it happened) or epoch metric; nothing of the bad step is saved.
      Preempted: after SIGTERM or a jax.distributed preemption notice (hosts agree on the step), once saved.
    """
    total_steps = num_epochs * steps_per_epoch
    tx, state, frozen, shardings = _initial_state(params, param_groups, optim, total_steps, mesh)
    run = _Run(name, steps_per_epoch, mesh, _Checkpoints.open(workdir, name, max_to_keep), evals, writer)
    if run.ckpt is not None:
        state = run.restore(state, eval_fn is not None, total_steps)
    train_step = make_train_step(loss_fn, tx, rng, accum_steps=accum_steps, state_shardings=shardings)
    progress = Progress(total_steps, what=name, every_s=log_every_s, start=run.step)
    multihost = jax.process_count() > 1
    with (_sigterm_flag(handle_sigterm and workdir is not None and not multihost) as sigterm,
          ckpt_lib.quiet_write_failures(), distributed.training_loop()):
        def preempted() -> bool:
            # Multi-host: orbax's check syncs the hosts (all must call it at the same step) so they stop together.
            if multihost:
                return run.ckpt is not None and run.ckpt.manager.reached_preemption(run.step)
            return sigterm.is_set()

        start_epoch, skip = divmod(run.step, steps_per_epoch)
        for epoch in range(start_epoch, num_epochs):
            step_fn = lambda st, batch: train_step(st, frozen, batch)  # noqa: E731
            state, n = run.epoch(state, _placed_batches(epoch_batches, epoch, skip, mesh), skip, step_fn, progress,
                                 preempted, checkpoint_every_steps)
            if n != steps_per_epoch:
                raise ValueError(f"{name}: epoch {epoch} produced {n} batches, expected steps_per_epoch="
                                 f"{steps_per_epoch}")
            skip = 0
            run.end_epoch(state, epoch, n, eval_fn, select, writer)
            if epoch + 1 < num_epochs and preempted():
                run.stop(Preempted(run.step, run.ckpt.manager.directory))
        run.evaluate(state, final=True)
        run.finish()
    progress.update(run.step, force=True)
    return run.result(state, eval_fn is not None, num_epochs)


def _placed_batches(epoch_batches, epoch: int, skip: int, mesh) -> Iterator[Any]:
    """The epoch's batches from batch `skip` on (a mid-epoch resume: the first ones are in the restored state),
    on the mesh. An `epoch_batches` with `device_iterator(epoch, start, mesh)` (`data.pipeline.EpochBatches`;
    duck-typed: train/ does not import data/) opens the epoch at `skip` without building the batches before it,
    and builds and places the next ones ahead of the step; a plain callable's batches are built and dropped up
    to `skip`, then each is built and placed when its step comes (nothing ahead)."""
    if hasattr(epoch_batches, "device_iterator"):
        return epoch_batches.device_iterator(epoch, skip, mesh)
    return (mesh_lib.shard_batch(b, mesh) for b in itertools.islice(epoch_batches(epoch), skip, None))


def _initial_state(params, param_groups, optim, total_steps: int, mesh):
    """(optimizer, step-0 TrainState of the trainable part, frozen part, state shardings), placed on `mesh`."""
    labels = param_labels(params, param_groups)
    trainable, frozen = partition(params, labels)
    # float32 master weights whatever the storage dtype of the model: bf16 weights would round small updates
    # away. The model's compute dtype (its `dtype`) is untouched, so a bf16 model computes in bf16 and its
    # frozen weights may stay bf16 (half the memory); the gradients arrive in float32 through the casts.
    trainable = jax.tree.map(_master, trainable)
    tx = make_optimizer(optim, labels, total_steps)
    trainable = jax.device_put(trainable, placed_shardings(trainable, mesh))
    frozen = jax.device_put(frozen, placed_shardings(frozen, mesh))
    shardings = state_shardings(tx, placed_shardings(trainable, mesh), trainable, mesh)
    state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                    out_shardings=shardings)(trainable)
    return tx, state, frozen, shardings


@jax.jit
def _accumulate(sums, watch, metrics, step):
    """Device-side running sums of the step metrics, and the first non-finite loss as (step, value) (-1: none)."""
    sums = {k: sums[k] + jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    bad = ~jnp.isfinite(metrics["loss"]) & (watch[0] < 0)
    return sums, (jnp.where(bad, step, watch[0]), jnp.where(bad, jnp.asarray(metrics["loss"], jnp.float32),
                                                              watch[1]))


@dataclasses.dataclass
class _Checkpoints:
    """The run's orbax manager (async saves; a save becomes visible only once complete)."""
    manager: ocp.CheckpointManager

    @classmethod
    def open(cls, workdir: str | None, name: str, max_to_keep: int) -> "_Checkpoints | None":
        directory = os.path.abspath(os.path.join(workdir or "<no workdir>", "checkpoints", name))
        if _RESTORE_ONLY.get() and not os.path.isdir(directory):   # before opening, which would create it
            raise _no_checkpoint(name, directory)
        if workdir is None:
            return None
        # cleanup_tmp_directories: a save that a crash or a full disk interrupted leaves a tmp folder behind.
        return cls(ckpt_lib.guarded(lambda: ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)), None, directory))

    def finish(self) -> None:
        # Pending saves are of good states: let them land.
        ckpt_lib.guarded(self.manager.wait_until_finished, self.manager, str(self.manager.directory))
        self.manager.close()


class _Run:
    """The epoch loop's bookkeeping: step, epoch sums (on the device), best epoch, history, checkpoints."""

    def __init__(self, name: str, steps_per_epoch: int, mesh, ckpt: _Checkpoints | None,
                 evals: Sequence[Evaluator] = (), writer: MetricWriter | None = None):
        self.name, self.steps_per_epoch, self.mesh, self.ckpt = name, steps_per_epoch, mesh, ckpt
        self.evals, self.writer = tuple(evals), writer
        self.evals_log: dict[str, list[dict[str, float]]] = {ev.name: [] for ev in self.evals}
        self.step = 0
        self.best = {"params": None, "metric": -np.inf, "epoch": -1}
        self.history: list[dict[str, float]] = []
        self.sums: dict[str, Any] = {}
        self.watch = (jnp.int32(-1), jnp.float32(0))

    def restore(self, state, with_best: bool, total_steps: int):
        manager = self.ckpt.manager
        state, self.best, self.history, sums = _restore(manager, state, self.best, with_best, self.steps_per_epoch,
                                                        self.name, self.mesh)
        self.sums = {k: jnp.float32(v) for k, v in sums.items()}
        self.step = int(state.step)
        if _RESTORE_ONLY.get() and self.step < total_steps:   # restore only: a finished training, or one line
            self.stop(_no_checkpoint(self.name, manager.directory) if self.step == 0 else errors.UserError(
                f"{self.name}: the checkpoint in {manager.directory} is at step {self.step} of {total_steps}: the "
                "training did not finish; rerun the same train command to finish it"))
        if self.step:
            logging.info("%s: resumed from %s at step %d (epoch %d, batch %d)", self.name, manager.directory,
                         self.step, *divmod(self.step, self.steps_per_epoch))
        return state

    def accumulate(self, metrics) -> None:
        if not self.sums:
            self.sums = {k: jnp.float32(0) for k in metrics}
        self.sums, self.watch = _accumulate(self.sums, self.watch, dict(metrics), self.step)

    def check(self, state) -> None:
        """Raises TrainingDiverged if a step since the last check had a non-finite loss (one device fetch)."""
        bad_step, value = (x.item() for x in jax.device_get(self.watch))
        if bad_step >= 0:
            self.stop(TrainingDiverged(self._diverged("loss", value, bad_step, (bad_step - 1) // self.steps_per_epoch,
                                                      state)))

    def host_sums(self) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(self.sums).items()}

    def save(self, state, epoch_sums: dict[str, float] | None = None) -> None:
        self.check(state)   # nothing of a diverged step is ever saved
        if self.ckpt is None:
            return
        # (epoch, batch) is the input pipeline's whole state: an epoch's batches are a pure function of its index
        # (`data.pipeline.EpochBatches` reopens the epoch at `batch`), so nothing else of the iterator is saved.
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        meta = {"epoch": epoch, "batch": batch, "steps_per_epoch": self.steps_per_epoch,
                "sums": self.host_sums() if epoch_sums is None else epoch_sums, "history": self.history,
                "best_metric": float(self.best["metric"]), "best_epoch": self.best["epoch"]}
        ckpt_lib.save(self.ckpt.manager, self.step, state, self.best["params"], meta, self.mesh)

    def epoch(self, state, batches, skip: int, step_fn, progress, preempted, checkpoint_every_steps: int):
        """One epoch's steps from batch `skip` on (a mid-epoch resume); returns (state, batches seen in the epoch)."""
        n = skip   # `batches` starts at batch `skip` (`_placed_batches`)
        for batch in batches:
            state, metrics = step_fn(state, batch)
            self.step, n = self.step + 1, n + 1
            self.accumulate(metrics)  # on the device: nothing is fetched per step
            self.evaluate(state)
            if progress.due(self.step):
                self.check(state)
                progress.update(self.step, {"loss": jax.device_get(metrics["loss"])})
            end_of_epoch = n == self.steps_per_epoch
            if not end_of_epoch and preempted():   # at an epoch end, the epoch-end save comes first
                self.save(state)
                self.stop(Preempted(self.step, self.ckpt.manager.directory))
            if checkpoint_every_steps and self.step % checkpoint_every_steps == 0 and not end_of_epoch:
                self.save(state)
        return state, n

    def result(self, state, selected: bool, num_epochs: int) -> FitResult:
        """The fit's result: the best epoch's parameters (`selected`: by eval_fn), else the last epoch's."""
        best = self.best if selected else {"params": state.params, "metric": 0.0, "epoch": num_epochs - 1}
        best_metrics = next((r for r in self.history if r["epoch"] == int(best["epoch"])), {})
        return FitResult(state=state, best_params=best["params"], best_epoch=int(best["epoch"]),
                         best_metrics=best_metrics, history=self.history, evals=self.evals_log)

    def evaluate(self, state, final: bool = False) -> None:
        """Runs the evaluators due at this step (all of them when `final`), each at most once per step."""
        for ev in self.evals:
            log = self.evals_log[ev.name]
            due = final or (ev.every_steps > 0 and self.step % ev.every_steps == 0)
            if not due or (log and log[-1]["step"] == self.step):
                continue
            self.check(state)   # a diverged state is reported, not evaluated
            metrics = {k: float(v) for k, v in ev.fn(state.params).items()}
            log.append({"step": self.step, **metrics})
            if self.writer is not None:
                self.writer.write(self.step, metrics, prefix=f"{self.name}/{ev.name}/")

    def end_epoch(self, state, epoch: int, n: int, eval_fn, select: str, writer) -> None:
        """The epoch's row (mean train metrics, val metrics), the best epoch, the epoch-end checkpoint."""
        self.check(state)
        row = {"epoch": epoch, **{f"train_{k}": v / n for k, v in self.host_sums().items()}}
        self.sums = {}
        if eval_fn is not None:
            row.update({f"val_{k}": float(v) for k, v in eval_fn(state.params).items()})
            metric = row[f"val_{select}"]
            if metric > self.best["metric"]:   # strict: ties keep the earlier epoch, as the references do
                self.best = {"params": jax.tree.map(jnp.copy, state.params), "metric": metric, "epoch": epoch}
        bad = {k: v for k, v in row.items() if not np.isfinite(v)}
        if bad:
            self.stop(TrainingDiverged(self._diverged("epoch metrics", bad, self.step, epoch, state)))
        self.history.append(row)
        if writer is not None:
            writer.write(self.step, {k: v for k, v in row.items() if k != "epoch"}, prefix=f"{self.name}/")
        self.save(state, {})

    def finish(self) -> None:
        if self.ckpt is not None:
            self.ckpt.finish()

    def stop(self, exc: Exception):
        self.finish()
        raise exc

    def _diverged(self, what, value, step, epoch, state) -> str:
        manager = None if self.ckpt is None else self.ckpt.manager
        return _diverged_message(self.name, what, value, step, epoch, manager, state, self.best, self.mesh)


def _master(x):
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4:
        return x.astype(jnp.float32)
    return x


def _restore(manager, state, best, with_best: bool, steps_per_epoch: int, name: str, mesh):
    """(state, best, history, epoch sums) from the newest checkpoint that verifies, onto `state`'s shardings;
    the inputs unchanged when there is none."""
    def check_meta(meta):
        if meta["steps_per_epoch"] != steps_per_epoch:
            raise errors.UserError(
                f"{name}: the checkpoint in {manager.directory} was written with {meta['steps_per_epoch']} steps "
                f"per epoch, this run has {steps_per_epoch} (a different dataset or batch size): use a new --workdir")

    # Under restore_only (vlm-jax eval / predict) the workdir is read, never changed: damaged steps stay.
    found = ckpt_lib.restore_newest(manager, state, state.params if with_best else None, mesh, check_meta, name,
                                    delete_damaged=not _RESTORE_ONLY.get())
    if found is None:
        return state, best, [], {}
    step, got = found
    meta = got["meta"]
    if int(got["state"].step) != meta["epoch"] * steps_per_epoch + meta["batch"]:
        raise errors.UserError(f"{name}: checkpoint {step} in {manager.directory} is inconsistent (step "
                               f"{int(got['state'].step)} vs position {meta['epoch']}/{meta['batch']}); delete it or "
                               "use a new --workdir")
    if got["best"] is not None:
        best = {"params": got["best"], "metric": meta["best_metric"], "epoch": meta["best_epoch"]}
    return got["state"], best, meta["history"], dict(meta["sums"])


def _diverged_message(name, what, value, step, epoch, manager, state, best, mesh) -> str:
    if manager is not None:
        ckpt_lib.guarded(manager.wait_until_finished, manager, str(manager.directory))
        # The newest step that reads back and verifies, not merely the newest: a rerun resumes from that one.
        last = ckpt_lib.newest_good_step(manager, state, state.params if best["params"] is not None else None, mesh)
        kept = (f"the last good checkpoint (step {last}) in {manager.directory} is kept and a rerun resumes from it"
                if last is not None else f"no good checkpoint was written yet in {manager.directory}")
    else:
        kept = "no workdir, so no checkpoint"
    return (f"{name}: non-finite {what} ({value}) at step {step}, epoch {epoch}; training stopped, {kept}. "
            "Lower the learning rate, set optim.grad_clip_norm, or check the data.")
