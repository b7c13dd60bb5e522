"""Metrics to the workdir (metrics.jsonl + TensorBoard events, optionally Weights & Biases) and a progress line
with steps/s and ETA.

clu's writers and `ReportProgress` import TensorFlow, which vlm_jax does not otherwise need; so the
events go through tensorboardX and the progress line is the few lines below.

W&B (`--config.log.wandb=PROJECT`, the [wandb] extra): one W&B run per workdir, its id derived from the workdir's
path so that a resumed run (the same command again) continues the same W&B run; its files go to
WORKDIR/wandb. WANDB_MODE=offline logs without an account (`wandb sync` uploads later).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging


def _to_float(v: Any) -> float:
    return float(np.asarray(jax.device_get(v)))


def tensorboard_tag(name: str) -> str:
    """`name` with TensorBoard's illegal characters (anything but letters, digits, '_', '-', '.', '/') as '_'.

    tensorboardX makes the same substitution but logs a line for every such scalar of every write; the row
    names of results tables ('VITask w/ EP [generated]') all have spaces. metrics.jsonl keeps the names as they are.
    """
    return re.sub(r"[^-/\w.]", "_", name)


class MetricWriter:
    """Writes scalars as JSON lines (one object per call) and TensorBoard events.

    Only process 0 writes, so a multi-host run has one metrics file.
    """

    def __init__(self, workdir: str | None, *, tensorboard: bool = True, wandb_project: str = "",
                 run_config: Mapping[str, Any] | None = None):
        """Opens the writers.

        Args:
          workdir: where metrics.jsonl, tensorboard/ and wandb/ go; None writes nothing.
          tensorboard: write TensorBoard events too.
          wandb_project: W&B project name ('' = no W&B).
          run_config: the run's config (a plain dict), recorded with the W&B run.
        """
        self._active = workdir is not None and jax.process_index() == 0
        self._file = None
        self._tb = None
        self._wandb = None
        if not self._active:
            return
        if wandb_project:
            self._wandb = _wandb_run(workdir, wandb_project, run_config)
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional: JSONL is the source of truth
                logging.warning("tensorboardX is not installed: writing metrics.jsonl only")

    @classmethod
    def for_run(cls, workdir: str | None, config) -> "MetricWriter":
        """The writer of a program's run: TensorBoard, and W&B when `config.log.wandb` names a project."""
        return cls(workdir, wandb_project=config.log.wandb, run_config=json.loads(config.to_json_best_effort()))

    def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
        if not self._active:
            return
        row = {f"{prefix}{k}": _to_float(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **row}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                self._tb.add_scalar(tensorboard_tag(k), v, int(step))
        if self._wandb is not None:
            self._wandb.log(row, step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None


def _wandb_run(workdir: str, project: str, run_config: Mapping[str, Any] | None):
    """A W&B run for `workdir` (resumed if it exists); one-line UserErrors for a missing package or a failed start."""
    from vlm_jax.errors import UserError, import_extra

    wandb = import_extra("wandb", "wandb", f"--config.log.wandb={project}")
    path = os.path.abspath(workdir)
    try:
        return wandb.init(project=project, name=os.path.basename(path.rstrip(os.sep)), dir=path,
                          id=hashlib.sha1(path.encode()).hexdigest()[:16], resume="allow",
                          config=dict(run_config or {}), reinit="finish_previous")
    except Exception as e:  # noqa: BLE001 - wandb raises its own errors (no API key, network, bad project)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"W&B could not start a run in project {project!r} ({first}); run `wandb login`, or set "
                        f"WANDB_MODE=offline to log locally (upload later with `wandb sync`)") from None


class Progress:
    """Logs 'what: step n/N (p%), x steps/s, ETA h:mm:ss' at most every `every_s` seconds."""

    def __init__(self, total: int, what: str = "train", every_s: float = 10.0, start: int = 0):
        self.total, self.what, self.every_s = int(total), what, every_s
        self._t0 = self._last = time.monotonic()
        self._start = start

    def due(self, step: int) -> bool:
        """Whether `update(step)` would log now (so the caller fetches what it shows only then)."""
        return time.monotonic() - self._last >= self.every_s or step >= self.total

    def update(self, step: int, extra: Mapping[str, Any] | None = None, force: bool = False) -> str | None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s and step < self.total:
            return None
        self._last = now
        done = step - self._start
        rate = done / max(now - self._t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
        line = f"{self.what}: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%), {rate:.2f} steps/s, ETA {eta_s}"
        if extra:
            line += ", " + ", ".join(f"{k}={_to_float(v):.4g}" for k, v in extra.items())
        logging.info(line)
        return line
