"""Checkpoints that verify themselves, for `trainer.fit`.

tensorstore keeps no checksum of the arrays it writes, so a flipped byte restores silently. Each step's `meta`
item therefore carries a checksum of the state (and of the best parameters) computed on device before the
save; a resume restores the newest step that reads back whole and matches it, skipping (and deleting) damaged
ones with one warning each. Storage failures of orbax/tensorstore (full, read-only) become one `WriteFailed`
line instead of a page of tracebacks from its background threads.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging as std_logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vlm_jax import errors
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.runtime import workdir as workdir_lib

PyTree = Any


# ----------------------------------------------------------------------------------------------------------
# Checksums.

def _leaf_checksum(x: jax.Array) -> jax.Array:
    """u32[]: sum over elements of (the element's bits * an odd weight of its position), modulo 2**32.

    The weight is odd, so changing any one element always changes the sum; integer sums are exact in any
    order, so the value does not depend on the mesh the leaf is sharded over.
    """
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)   # 8-byte leaves: [..., 2]
    bits = bits.reshape(-1)
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    weight = index * jnp.uint32(0x9E3779B1) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)


def _checksums(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    sums = jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return sums, jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


@functools.lru_cache(maxsize=8)
def _jitted_checksums(mesh: jax.sharding.Mesh):
    repl = mesh_lib.replicated(mesh)   # the same values on every process
    return jax.jit(_checksums, out_shardings=(repl, repl))


def tree_checksum(tree: PyTree, mesh: jax.sharding.Mesh) -> tuple[list[int], bool]:
    """(one u32 checksum per leaf, whether every floating-point leaf is finite), the same on every process."""
    sums, finite = _jitted_checksums(mesh)(jax.tree.leaves(tree))
    return [int(v) for v in mesh_lib.to_host(sums)], bool(mesh_lib.to_host(finite))


# ----------------------------------------------------------------------------------------------------------
# Storage failures.

@contextlib.contextmanager
def _quiet_closed_event_loop() -> Iterator[None]:
    """Hides the 'Event loop is closed' noise tensorstore's callbacks print after orbax gave up on a read."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
                unraisable.exc_value)):
            previous(unraisable)
    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        raise   # keep the filter: the late callbacks fire while the error is being reported
    else:
        sys.unraisablehook = previous


class _DropWriteFailures(std_logging.Filter):
    """Drops orbax's own error records about a failed write: `guarded` reports the failure in one line."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno < std_logging.ERROR or "/orbax/" not in record.pathname:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (workdir_lib.write_failure(Exception(record.getMessage()))
                    or (exc is not None and workdir_lib.write_failure(exc)))


@contextlib.contextmanager
def quiet_write_failures() -> Iterator[None]:
    """While the block runs, orbax's error logs of a failed write and tensorstore's late-callback noise are
    dropped: one `WriteFailed` line says what happened."""
    logger, flt = std_logging.getLogger("absl"), _DropWriteFailures()
    logger.addFilter(flt)
    try:
        with _quiet_closed_event_loop():
            yield
    finally:
        logger.removeFilter(flt)


def remove_unfinished(directory: str) -> None:
    """Deletes orbax's unfinished step folders (`<step>.orbax-checkpoint-tmp*`) in `directory` (process 0)."""
    if jax.process_index() != 0:
        return
    for path in glob.glob(os.path.join(glob.escape(directory), "*.orbax-checkpoint-tmp*")):
        shutil.rmtree(path, ignore_errors=True)


def guarded(fn: Callable[[], Any], manager: ocp.CheckpointManager | None, directory: str) -> Any:
    """Runs `fn` (a manager call); a storage failure becomes `WriteFailed` after cleaning up the partial save.

    Args:
      fn: e.g. `lambda: manager.save(...)`.
      manager: closed (errors ignored) on a storage failure, so no background save outlives it; may be None.
      directory: the checkpoint directory, for the message and the cleanup.
    """
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - orbax wraps tensorstore's status in ValueError, others in OSError
        message = workdir_lib.write_failure(e, "checkpoints", "--workdir", path=directory)
        if message is None:
            raise
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()
        with contextlib.suppress(OSError):
            remove_unfinished(directory)
        raise workdir_lib.WriteFailed(message) from None


# ----------------------------------------------------------------------------------------------------------
# Save and verified restore.

def save(manager: ocp.CheckpointManager, step: int, state: PyTree, best_params: PyTree | None,
         meta: Mapping[str, Any], mesh: jax.sharding.Mesh) -> None:
    """Saves `state` (+ `best_params`) at `step`, with `meta` plus the checksums `restore_newest` verifies."""
    sums, finite = tree_checksum(state, mesh)
    checksum = {"state": sums}
    items = {"state": ocp.args.StandardSave(state)}
    if best_params is not None:
        checksum["best"] = tree_checksum(best_params, mesh)[0]
        items["best"] = ocp.args.StandardSave(best_params)
    items["meta"] = ocp.args.JsonSave({**meta, "checksum": checksum, "finite": finite})
    guarded(lambda: manager.save(step, args=ocp.args.Composite(**items)), manager, str(manager.directory))


def _all_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (collective with several processes)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _try_restore(manager, step: int, state: PyTree, best: PyTree | None, mesh, check_meta: Callable[[dict], None]
                 ) -> tuple[dict[str, Any] | None, str]:
    """({'meta', 'state', 'best'}, '') if `step` reads back whole and verifies, else (None, why not)."""
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored, items, why = None, {}, ""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        assert isinstance(meta, dict), "meta is not a mapping"
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises
        meta, why = None, f"its meta item cannot be read ({_one_line(e)})"
    if meta is not None:
        check_meta(meta)   # a config mismatch is the user's to fix, not damage: raises
        items = {"state": ocp.args.StandardRestore(abstract(state))}
        if best is not None and meta.get("best_epoch", -1) >= 0:
            items["best"] = ocp.args.StandardRestore(abstract(best))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            restored, why = None, f"its arrays cannot be read ({_one_line(e)})"
    if not _all_ok(meta is not None and restored is not None):
        return None, why or "another process cannot read it"
    got = {"meta": meta, "state": restored["state"], "best": restored["best"] if "best" in items else None}
    if "checksum" not in meta:   # written before checksums existed: nothing to verify against
        logging.info("checkpoint step %d in %s has no checksum (an older run's): restored unverified", step,
                     manager.directory)
        return got, ""
    for key in ("state", "best"):
        if got[key] is not None:
            sums, finite = tree_checksum(got[key], mesh)
            if sums != meta["checksum"].get(key):
                return None, f"its {key} does not match the checksum written with it"
            if key == "state" and not finite:
                return None, "its state holds non-finite values"
    return got, ""


def restore_newest(manager: ocp.CheckpointManager, state: PyTree, best: PyTree | None, mesh: jax.sharding.Mesh,
                   check_meta: Callable[[dict], None], name: str, delete_damaged: bool = True
                   ) -> tuple[int, dict[str, Any]] | None:
    """(step, {'meta', 'state', 'best'}) of the newest step that reads back whole and verifies; None if none.

    Damaged newer steps get one warning each and are deleted (a resumed run saves those step numbers again).

    Args:
      manager: the run's checkpoint manager.
      state, best: targets giving the shapes, dtypes and shardings to restore onto (best: None if not kept).
      mesh: for the checksums.
      check_meta: raises a UserError when a step's meta does not fit this run (e.g. steps per epoch).
      name: the run's name, for the messages.
      delete_damaged: False: leave the damaged steps where they are (a read-only command: `trainer.restore_only`).

    Raises:
      UserError: checkpoints exist but none is usable.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    damaged = []
    with _quiet_closed_event_loop():
        for step in steps:
            got, why = _try_restore(manager, step, state, best, mesh, check_meta)
            if got is not None:
                for bad in damaged if delete_damaged else ():
                    manager.delete(bad)
                return step, got
            logging.warning("%s: checkpoint step %d in %s is damaged: %s; skipping it", name, step,
                            manager.directory, why)
            damaged.append(step)
    raise errors.UserError(
        f"{name}: no checkpoint in {manager.directory} reads back whole (steps {', '.join(map(str, steps))} are "
        "damaged, see the warnings): delete that directory to start this training over, or use a new --workdir")


def newest_good_step(manager: ocp.CheckpointManager, state: PyTree, best: PyTree | None,
                     mesh: jax.sharding.Mesh) -> int | None:
    """The newest step that reads back whole, verifies and is finite (nothing deleted), or None."""
    with _quiet_closed_event_loop():
        for step in sorted(manager.all_steps(), reverse=True):
            if _try_restore(manager, step, state, best, mesh, lambda meta: None)[0] is not None:
                return step
    return None
