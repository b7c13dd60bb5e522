"""The workdir and the feature cache as storage: atomic writes, one-line write failures, stale temp files, and
the config a workdir remembers.

Every program calls `prepare(workdir, config)` where it used to write config.json. On a workdir that already
holds checkpoints, a config that differs in anything that changes the result is refused (one line listing
the keys) unless `--config.train.resume=force`: a resumed run must not mix two configs' training.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import jax
from absl import logging

from vlm_jax import errors

# A temp file older than the start of this run belongs to a run that died (a writer renames its temp file
# seconds after creating it); newer ones may belong to a run that shares the directory and are left alone.
# Taken at import, which happens before the run writes anything.
RUN_START = time.time()

# Config keys that do not change what a resumed run computes (fnmatch patterns over dotted keys).
RESUME_EXEMPT = (
    "train.resume",                     # the switch itself
    "mesh.*", "mesh_rules",             # the layout: results are the same on any mesh
    "*checkpoint_every_steps",          # how often the state is saved, not what it is
    "feature_cache_dir", "*root", "*_data_dir",   # where inputs live, not what they are
    "methods",                          # which fewshot_clip methods run: each has its own checkpoints
    "log.*",                            # where metrics are logged besides the workdir (W&B)
    # Evaluation only: nothing that is trained depends on these.
    "evals", "evals.*",
    "data.extra_test", "data.test_limit", "data.eval_batch_size", "method.eval_mode", "clip_checkpoint",
    "data.retrieval_*", "data.sugarcrepe*", "data.winoground*", "data.classification*",
)
RESUME_MODES = ("check", "force")

# errno -> (what happened, what to do; {flag} names the flag that moves the directory).
_ADVICE = {
    errno.ENOSPC: ("no space left on the device", "free space and rerun the same command (it resumes), or pass "
                   "another {flag}"),
    errno.EDQUOT: ("disk quota exceeded", "free space and rerun the same command (it resumes), or pass another {flag}"),
    errno.EROFS: ("read-only file system", "pass a {flag} on a writable disk"),
    errno.EACCES: ("permission denied", "make it writable or pass another {flag}"),
    errno.EPERM: ("operation not permitted", "make it writable or pass another {flag}"),
    errno.ENOTDIR: ("a parent of it is a file, not a directory", "pass another {flag}"),
    errno.EEXIST: ("a file is in the way", "pass another {flag}"),
}
# tensorstore (under orbax) reports the OS error inside its own status text, e.g. "RESOURCE_EXHAUSTED: ...
# Failed writing: "/w/d/x": ... No space left on device [os_error_code='28']".
_TS_CODE = re.compile(r"os_error_code='?(\d+)")
_TS_TEXT = {"No space left on device": errno.ENOSPC, "RESOURCE_EXHAUSTED": errno.ENOSPC, "Disk quota exceeded":
            errno.EDQUOT, "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}
_TS_PATH = re.compile(r'"(/[^"]+)"')


class WriteFailed(errors.UserError):
    """The workdir or the cache cannot be written (full, read-only, no permission)."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def write_failure(exc: BaseException, what: str = "", flag: str = "", path: str | None = None,
                  under: str | None = None) -> str | None:
    """One line (path, reason, what to do) if `exc` or one it wraps is a failure to write storage, else None.

    Args:
      exc: any exception: an OSError, or orbax/tensorstore's ValueError carrying the OS error in its text.
      what: what the path is ('the workdir', 'the feature cache'), for the message.
      flag: the flag or config key that moves it ('--workdir'), for the message.
      path: the path to name; default: the one in the error.
      under: if given, an error that reading could raise too (permission denied, not a directory) counts only
        for a path inside this directory; a full or read-only disk counts anywhere.
    """
    for e in _chain(exc):
        code, where = None, None
        if isinstance(e, OSError) and e.errno in _ADVICE:
            code, where = e.errno, e.filename
        elif not isinstance(e, OSError):
            text = str(e)
            m = _TS_CODE.search(text)
            code = int(m.group(1)) if m and int(m.group(1)) in _ADVICE else next(
                (c for t, c in _TS_TEXT.items() if t in text), None)
            paths = _TS_PATH.findall(text) if code else []
            where = paths[-1] if paths else None
        inside = under is None or (where is not None and os.path.abspath(where).startswith(os.path.abspath(under)))
        if code is not None and (inside or code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
            reason, todo = _ADVICE[code]
            return (f"cannot write {what + ' ' if what else ''}at {path or where or '?'}: {reason}; "
                    f"{todo.format(flag=flag or 'directory')}")
    return None


def raise_if_write_failure(exc: BaseException, what: str = "", flag: str = "", path: str | None = None) -> None:
    """Raises `WriteFailed` (from `exc`) when `write_failure` recognises `exc`; returns otherwise."""
    msg = write_failure(exc, what, flag, path)
    if msg is not None:
        raise WriteFailed(msg) from exc


def fsync_dir(directory: str) -> None:
    """Makes a rename in `directory` durable (a crash right after it keeps the new name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """Yields a binary file that becomes `path` on success: write, fsync, rename, fsync the directory.

    A crash at any point leaves either the old `path` or the new one, whole, plus at most a temp file
    (`.<name>.<random><suffix>` in the same directory) that `remove_stale` deletes on a later run.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale(directory: str, patterns: tuple[str, ...], *, empty_only: tuple[str, ...] = ()) -> list[str]:
    """Deletes temp files/dirs matching `patterns` in `directory` that are older than this run; returns them.

    Args:
      directory: where to look (a missing directory is fine).
      patterns: glob patterns relative to `directory`.
      empty_only: patterns whose matches are deleted only when empty (a 0-byte file a failed run left).
    """
    removed = []
    for pattern, only_empty in [(p, False) for p in patterns] + [(p, True) for p in empty_only]:
        for path in glob.glob(os.path.join(glob.escape(directory), pattern)):
            try:
                if os.lstat(path).st_mtime >= RUN_START or (only_empty and os.path.getsize(path)):
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed.append(path)
            except OSError:   # gone meanwhile, or not ours to delete: a cleanup never fails a run
                continue
    if removed:
        logging.info("removed %d stale temporary file(s) a killed run left in %s", len(removed), directory)
    return removed


# ----------------------------------------------------------------------------------------------------------
# The config a workdir remembers.

def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two JSON config trees, except `RESUME_EXEMPT` ones."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [k for k in keys if not any(fnmatch.fnmatchcase(k, p) for p in RESUME_EXEMPT)]


def _has_checkpoints(workdir: str) -> bool:
    return any(os.path.isdir(d) and os.listdir(d)
               for d in glob.glob(os.path.join(glob.escape(workdir), "checkpoints", "*")))


def _describe(key: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    a, b = _flat(old).get(key, "<absent>"), _flat(new).get(key, "<absent>")
    text = f"{key} ({json.dumps(a)} -> {json.dumps(b)})"
    return text if len(text) <= 80 else key


def prepare(workdir: str, config) -> None:
    """Creates `workdir`, checks a resumed one was made by the same config, writes config.json (process 0).

    Also removes temp files that killed runs left (`remove_stale`): half-written results, orbax's unfinished
    checkpoint folders, 0-byte TensorBoard files of a run that could not write.

    Args:
      workdir: the run's directory.
      config: the run's ConfigDict; `config.train.resume` ('check' or 'force') says what to do when it
        differs from the config.json of a workdir that has checkpoints.

    Raises:
      UserError: a changed config on a workdir with checkpoints ('check'), or an unknown resume mode.
      WriteFailed: the workdir cannot be written.
    """
    mode = config.get("train", {}).get("resume", "check")
    if mode not in RESUME_MODES:
        raise errors.UserError(f"config.train.resume must be one of {', '.join(RESUME_MODES)}, got {mode!r}")
    path = os.path.join(workdir, "config.json")
    try:
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(path) and _has_checkpoints(workdir):
            _check_resume(workdir, path, json.loads(config.to_json_best_effort()), mode)
        if jax.process_index() != 0:   # the same check on every process; one writer
            return
        remove_stale(workdir, (".*.tmp", "*.tmp", "checkpoints/*/*.orbax-checkpoint-tmp*"),
                     empty_only=("tensorboard/events.out.tfevents.*",))
        with atomic_file(path) as f:
            f.write(config.to_json_best_effort(indent=1).encode())
    except OSError as e:
        raise_if_write_failure(e, "the workdir", "--workdir")
        raise


def _check_resume(workdir: str, path: str, new: Mapping[str, Any], mode: str) -> None:
    """Raises a UserError when the workdir's config.json differs from `new` in a key that matters ('check')."""
    force = "--config.train.resume=force to resume them under this config anyway"
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except ValueError as e:
        if mode != "force":
            raise errors.UserError(f"workdir {workdir} holds checkpoints but its config.json cannot be read ({e}): "
                                   f"use a new --workdir, or {force}") from None
        return
    diff = config_diff(old, new)
    if diff and mode != "force":
        shown = ", ".join(_describe(k, old, new) for k in diff[:8]) + (
            f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise errors.UserError(f"workdir {workdir} holds checkpoints of a different config: {shown}. Use a new "
                               f"--workdir, or {force}")
    if diff:
        logging.warning("resuming %s under a changed config (train.resume=force): %s", workdir, ", ".join(diff))
