"""Multi-process start-up: decide whether this run is one of several processes, and `jax.distributed.initialize`.

JAX's own runtime does the work (it finds the coordinator, the process count and id on SLURM, Open MPI and
Cloud TPU); this module only decides *whether* to call it, passes explicit overrides for a plain or custom
cluster, and picks gloo for cross-process collectives on CPU. It must run before anything touches a JAX
backend (`jax.devices()`, a `device_put`, a computation): launch/main.py calls `initialize` first thing.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping

import jax
from absl import logging

from vlm_jax import errors
from vlm_jax.runtime import workdir as workdir_lib

MODES = ("auto", "on", "off")
# After SIGTERM, how long a training loop gets to reach the end of its step, save and stop by itself.
SIGTERM_GRACE_S = 120.0
# How long the other processes look for the token file process 0 wrote into the workdir.
WORKDIR_WAIT_S = 5.0
# jax's preemption sync manager sets this coordination-service key when any process gets SIGTERM.
_PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


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


# ----------------------------------------------------------------------------------------------------------
# Faults of a multi-process job: an unshared workdir, SIGTERM outside the training loop, a lost peer.

def _client():
    """jax.distributed's coordination-service client (key-value store, barriers); None in one process.

    Private API, as orbax uses it too: JAX exposes no public handle on the store.
    """
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def exit_now(message: str, status: int) -> None:
    """Prints `message` as one line and ends the process at once.

    No atexit handlers run, in particular not jax.distributed's shutdown barrier, which waits for every
    process, including one that is gone.
    """
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    os._exit(status)


def check_shared_workdir(workdir: str, wait_s: float = WORKDIR_WAIT_S) -> None:
    """Every process checks that it sees the workdir process 0 sees (one shared directory).

    Process 0 creates the workdir and writes a token file into it; each other process looks for the file for
    up to `wait_s` seconds (a shared file system may show it late); all then compare notes through the
    coordination service, so every process raises the same error.

    Raises:
      UserError: on every process, when one of them does not see the token (e.g. a node-local workdir), or
        process 0 cannot write the workdir.
    """
    client, pid, n = _client(), jax.process_index(), jax.process_count()
    timeout_ms = int((wait_s + 60) * 1000)
    if pid == 0:
        token = os.urandom(8).hex()
        try:
            os.makedirs(workdir, exist_ok=True)
            with workdir_lib.atomic_file(os.path.join(workdir, f".shared-check-{token}")) as f:
                f.write(token.encode())
        except OSError as e:
            token = "!" + (workdir_lib.write_failure(e, "the workdir", "--workdir") or f"cannot write {workdir}: {e}")
        client.key_value_set("vlm_jax/workdir_token", token)
    token = client.blocking_key_value_get("vlm_jax/workdir_token", timeout_ms)
    problem = token[1:] if token.startswith("!") else ""
    path = os.path.join(workdir, f".shared-check-{token}")
    deadline = time.monotonic() + wait_s
    while not problem and pid != 0:
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as f:
            if f.read() == token:
                break
        if time.monotonic() > deadline:
            problem = "missing"
            break
        time.sleep(0.2)
    client.key_value_set(f"vlm_jax/workdir_seen/{pid}", problem or "ok")
    client.wait_at_barrier("vlm_jax_workdir_check", timeout_ms)
    seen = dict(client.key_value_dir_get("vlm_jax/workdir_seen/"))
    if pid == 0 and not problem:
        with contextlib.suppress(OSError):
            os.remove(path)
    if token.startswith("!"):
        raise workdir_lib.WriteFailed(token[1:])
    missing = sorted(int(k.rsplit("/", 1)[-1]) for k, v in seen.items() if v != "ok")
    if missing:
        raise errors.UserError(
            f"process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {n} "
            f"{'do' if len(missing) > 1 else 'does'} not see the file process 0 wrote into --workdir={workdir} (waited "
            f"{wait_s:.0f} s): every process needs the same "
            "workdir on a file system all hosts share (NFS, a GCS/S3 mount), not a node-local disk")


_TRAINING = threading.Event()   # trainer.fit's step loop runs: it handles a preemption notice by itself
_ENDING = threading.Event()     # an exception left that loop: the launcher is reporting it and exiting


@contextlib.contextmanager
def training_loop() -> Iterator[None]:
    """Marks the block as trainer.fit's step loop for `watch_preemption`."""
    _TRAINING.set()
    try:
        yield
    except BaseException:
        _ENDING.set()
        raise
    finally:
        _TRAINING.clear()


def watch_preemption(grace_s: float = SIGTERM_GRACE_S, poll_s: float = 1.0) -> None:
    """Makes SIGTERM end a multi-process job in every phase, not only at a training step.

    With jax.distributed, SIGTERM goes to jax's preemption notifier, which only tells the coordination
    service; `trainer.fit` acts on it at its next step (all processes save the same step and stop). Outside
    the step loop (loading, feature extraction, evaluation, the workdir check) nothing would. This starts a
    daemon thread that polls the notice and, outside the loop, ends the process at once (status 143); inside
    it the loop gets `grace_s` seconds (a checkpoint wait that hangs does not hold the job forever). A
    coordinator that stops answering is reported as a lost process 0.
    """
    client = _client()
    if client is None:
        return
    done = threading.Event()
    # Registered after jax.distributed's own atexit shutdown, so it runs first: an orderly exit is not a lost
    # coordinator.
    atexit.register(done.set)

    def run():
        noticed, failures = None, 0
        while not done.wait(poll_s):
            try:
                client.key_value_try_get(_PREEMPTION_NOTICE_KEY)
                noticed = noticed or time.monotonic()
                failures = 0
            except Exception as e:  # noqa: BLE001 - NOT_FOUND until a SIGTERM; anything else: the service is gone
                failures = 0 if "NOT_FOUND" in str(e) else failures + 1
                if failures >= 3:
                    exit_now("error: lost process 0 (the coordinator of this job stopped answering); the last "
                             "checkpoint is kept, rerun the job to resume", 1)
            if noticed is not None:
                busy = _TRAINING.is_set() or _ENDING.is_set()
                if not busy or time.monotonic() - noticed > grace_s:
                    where = (f"the training step did not end within {grace_s:.0f} s" if busy else
                             "outside the training loop")
                    exit_now(f"preempted: a process of this job got SIGTERM ({where}): exiting without a new "
                             "checkpoint; rerun the same command to resume from the last one", 143)

    threading.Thread(target=run, name="vlm_jax-preemption-watch", daemon=True).start()


_PEER_FAILURE = ("Connection reset", "Connection closed", "connection refused", "Socket closed", "UNAVAILABLE",
                 "heartbeat", "NCCL", "Gloo", "peer")


def report_lost_peers(exc: BaseException, wait_s: float = 5.0) -> None:
    """After `exc` ended this process's run: if other processes do not check in within `wait_s`, says which
    in one line and exits (status 1) without the shutdown barrier that would wait for them; else returns.

    A process that died makes its peers' next collective fail (gloo: 'Connection reset by peer'); without
    this the survivors would print that traceback, then wait in jax.distributed's shutdown barrier until the
    coordination service's heartbeat timeout and abort with a fatal-error dump.
    """
    client, pid, n = _client(), jax.process_index(), jax.process_count()
    try:
        client.key_value_set(f"vlm_jax/failed/{pid}", type(exc).__name__, allow_overwrite=True)
        deadline = time.monotonic() + wait_s
        while True:
            reported = {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get("vlm_jax/failed/")}
            if len(reported) == n or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        lost = sorted(set(range(n)) - reported)
    except Exception:  # noqa: BLE001 - the coordination service itself is gone: process 0 hosted it
        lost = [0]
    if not lost:
        return
    text = " ".join(str(exc).split())[:200]
    peer = any(p.lower() in text.lower() for p in _PEER_FAILURE)
    if not peer:
        logging.exception("process %d failed", pid, exc_info=exc)
    if pid == 0:
        time.sleep(1.0)   # the coordination service lives here: let the other survivors read it first
    exit_now(f"error: lost process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {n} (no word from "
             f"{'them' if len(lost) > 1 else 'it'} within {wait_s:.0f} s: dead, or stuck waiting for this one); this "
             f"process ({pid}) stopped on {type(exc).__name__}: {text}", 1)
