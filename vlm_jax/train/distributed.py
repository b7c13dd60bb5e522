"""Multi-process start-up: decide whether this run is one of several processes, and `jax.distributed.initialize`.

JAX's own runtime does the work (it finds the coordinator, the process count and id on SLURM, Open MPI and
Cloud TPU); this module only decides *whether* to call it, passes explicit overrides for a plain or custom
cluster, and picks gloo for cross-process collectives on CPU. It must run before anything touches a JAX
backend (`jax.devices()`, a `device_put`, a computation): launch/main.py calls `initialize` first thing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from absl import logging

MODES = ("auto", "on", "off")


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "") or 0)
    except ValueError:
        return 0


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the environment looks like one process of a multi-process job (a short phrase), or None.

    Recognised: SLURM with SLURM_NTASKS > 1 (an `srun` step), Open MPI with OMPI_COMM_WORLD_SIZE > 1, a TPU pod
    slice (TPU_WORKER_HOSTNAMES with several hosts, multi-slice MEGASCALE_COORDINATOR_ADDRESS, or a Cloud TPU
    worker's CLOUD_TPU_TASK_ID), and JAX_COORDINATOR_ADDRESS set by hand.
    """
    env = os.environ if environ is None else environ
    if _int(env, "SLURM_NTASKS") > 1:
        return f"SLURM job {env.get('SLURM_JOB_ID', '?')} with SLURM_NTASKS={env['SLURM_NTASKS']}"
    if _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI with OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU pod slice with {len(hosts)} workers (TPU_WORKER_HOSTNAMES)"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
    if env.get("CLOUD_TPU_TASK_ID", "") != "":
        return f"Cloud TPU worker (CLOUD_TPU_TASK_ID={env['CLOUD_TPU_TASK_ID']})"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']}"
    return None


def initialize(mode: str = "auto", *, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` when the run is multi-process; returns whether it did.

    Args:
      mode: 'on' always initialises (JAX auto-detects what is not given), 'off' never, 'auto' when
        `detect_cluster` recognises the environment or an explicit argument below is given.
      coordinator_address, num_processes, process_id: overrides for a localhost or custom cluster (all
        processes pass the same address and count, each its own id); None: JAX's auto-detection.
      environ: for tests; defaults to os.environ.

    Raises:
      ValueError: an unknown mode, or explicit arguments with mode 'off'.
    """
    env = os.environ if environ is None else environ
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
    explicit = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is not None}
    if mode == "off":
        if explicit:
            raise ValueError(f"--distributed=off contradicts --{' --'.join(explicit)}")
        return False
    why = ("--" + ", --".join(f"{k}={v}" for k, v in explicit.items())) if explicit else detect_cluster(env)
    if mode == "auto" and why is None:
        return False
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
        # Cross-process collectives on CPU (a CPU-only cluster, or several local processes for testing); the
        # GPU and TPU backends ignore this option.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize: %s", why or "--distributed=on")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def describe() -> str:
    """'process i of n, d local / D global devices (platform)': what the run sees, for the log."""
    return (f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local / "
            f"{jax.device_count()} global {jax.devices()[0].platform} devices")
