"""The one generic trainer: optimizer from config, train state, jit step with donation, epoch loop.

The trainer knows no method by name. A method hands it
  * `loss_fn(params, batch, rng) -> (loss, metrics)`, where `params` is the full tree (trainable and frozen);
  * the parameter tree, of which the config's `param_groups` — big_vision's list of (regex, lr multiplier or
    None) — picks what trains. Frozen leaves are split off before differentiation, so they get neither
    gradients nor optimizer state: the backward pass through a frozen backbone is never built.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from vlm_jax.train import mesh as mesh_lib
from vlm_jax.train.metrics import MetricWriter, Progress

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


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, rng: jax.Array):
    """Returns jit(step)(state, frozen, batch) -> (state, metrics); the state's buffers are donated."""

    def step(state: TrainState, frozen: PyTree, batch: Mapping[str, jax.Array]):
        step_rng = jax.random.fold_in(rng, state.step)

        def loss_of(trainable):
            return loss_fn(merge(trainable, frozen), batch, step_rng)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, donate_argnums=0)


# ----------------------------------------------------------------------------------------------------------
# The epoch loop.

def _best(params: PyTree, metric: float, epoch: int) -> dict[str, Any]:
    # 0-d arrays, not numpy scalars: orbax checkpoints arrays only.
    return {"params": jax.device_get(params), "metric": np.array(metric, np.float32),
            "epoch": np.array(epoch, np.int32)}


@dataclasses.dataclass
class FitResult:
    state: TrainState
    best_params: PyTree          # trainable params of the best epoch (last epoch when there is no eval)
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]


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
) -> FitResult:
    """Trains for `num_epochs`, evaluating after each epoch and keeping the best epoch's parameters.

    Args:
      loss_fn: (full params, batch, rng) -> (scalar loss, metrics).
      params: the full parameter tree; `param_groups` picks the trainable part.
      epoch_batches: epoch index -> iterable of host batches (numpy, global batch on one process). Making the
        epoch's data a pure function of its index is what lets a resumed run see the same data.
      eval_fn: trainable params -> metrics; `select` names the one to maximise (best epoch, as the
        DualAdapter / Tip-Adapter-F references do on the val split).
      workdir: if set, an orbax checkpoint is written after each epoch to workdir/checkpoints/<name> and a run
        restarted with the same workdir resumes from it.
    """
    labels = param_labels(params, param_groups)
    trainable, frozen = partition(params, labels)
    total_steps = num_epochs * steps_per_epoch
    tx = make_optimizer(optim, labels, total_steps)
    repl = mesh_lib.replicated(mesh)
    trainable = jax.device_put(trainable, repl)
    frozen = jax.device_put(frozen, repl)
    state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                    out_shardings=repl)(trainable)
    best = _best(state.params, -np.inf, -1)
    start_epoch, history = 0, []

    manager = None
    if workdir is not None:
        manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints", name)),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        if manager.latest_step() is not None:
            restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(
                {"state": state, "best": best}))
            state = jax.device_put(restored["state"], repl)
            best = restored["best"]
            start_epoch = int(state.step) // steps_per_epoch
            logging.info("%s: resumed from %s at epoch %d", name, manager.directory, start_epoch)

    train_step = make_train_step(loss_fn, tx, rng)
    progress = Progress(total_steps, what=name, every_s=log_every_s, start=start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, num_epochs):
        sums, n = {}, 0
        for batch in epoch_batches(epoch):
            state, metrics = train_step(state, frozen, mesh_lib.shard_batch(batch, mesh))
            metrics = jax.device_get(metrics)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            progress.update(int(state.step), {"loss": metrics["loss"]})
        if not n:
            raise ValueError(f"{name}: epoch {epoch} produced no batch")
        row = {"epoch": epoch, **{f"train_{k}": v / n for k, v in sums.items()}}
        if eval_fn is not None:
            row.update({f"val_{k}": float(v) for k, v in eval_fn(state.params).items()})
            metric = row[f"val_{select}"]
            if metric > best["metric"]:   # strict: ties keep the earlier epoch, as the references do
                best = _best(state.params, metric, epoch)
        else:
            best = _best(state.params, 0.0, epoch)
        history.append(row)
        if writer is not None:
            writer.write(int(state.step), {k: v for k, v in row.items() if k != "epoch"}, prefix=f"{name}/")
        if not all(np.isfinite(v) for v in row.values()):
            raise FloatingPointError(f"{name}: non-finite metrics at epoch {epoch}: {row}; the last good "
                                     "checkpoint is kept")
        if manager is not None:
            manager.save(int(state.step), args=ocp.args.StandardSave({"state": state, "best": best}))
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    progress.update(int(state.step), force=True)
    best_metrics = next((r for r in history if r["epoch"] == int(best["epoch"])), {})
    return FitResult(state=state, best_params=best["params"], best_epoch=int(best["epoch"]),
                     best_metrics=best_metrics, history=history)
