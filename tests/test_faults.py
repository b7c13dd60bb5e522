"""Storage faults, in real child processes: damaged feature-cache entries, a full / read-only / impossible workdir,
and a workdir reused by a changed config. (Damaged checkpoints: tests/test_fault_tolerance.py; an unshared
multi-host workdir: tests/test_multihost.py.)"""

import glob
import json
import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from vlm_jax import errors
from vlm_jax.runtime import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "ft_child.py")


def _launch(workdir, cache, *overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", VLM_JAX_CACHE=str(cache))
    cmd = [sys.executable, os.path.join(ROOT, "launch", "main.py"), "--config=configs/dualadapter.py:runlocal",
           f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def tip_run(tmp_path_factory):
    """A finished runlocal Tip-Adapter-F run: (workdir with checkpoints, its feature cache root)."""
    d = tmp_path_factory.mktemp("tip")
    proc = _launch(d / "w", d / "cache", "--config.methods=tip_adapter_f")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return d / "w", d / "cache"


def _entry(cache, kind):
    (path,) = glob.glob(os.path.join(cache, "features", f"{kind}-*.npz"))
    return path


def _arrays(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files if not k.startswith("__")}


def test_damaged_cache_entries_are_recomputed_once_and_stale_temp_files_removed(tmp_path, tip_run):
    cache = tip_run[1]   # in place: the cache key holds the checkpoint's path, which a copy would change
    paths = {kind: _entry(cache, kind) for kind in ("text", "val", "test")}
    originals = {kind: _arrays(p) for kind, p in paths.items()}
    os.truncate(paths["text"], os.path.getsize(paths["text"]) // 2)     # a crash mid-write
    open(paths["val"], "wb").close()                                      # a crash after an un-fsynced rename
    data = bytearray(open(paths["test"], "rb").read())                    # bit rot
    data[len(data) // 2:len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 16])
    open(paths["test"], "wb").write(bytes(data))
    # What killed runs leave: the cache's temp files and a half-written built-in checkpoint.
    stale = [cache / "features" / "tmpab12.tmp.npz", cache / "features" / ".val-x.npz.q1.tmp.npz",
             cache / "models" / ".tiny-clip-v2.tmp-k3j"]
    stale[0].write_bytes(b"PK")
    stale[1].write_bytes(b"")
    stale[2].mkdir()
    for p in stale:
        os.utime(p, (time.time() - 3600,) * 2)

    proc = _launch(tmp_path / "w", cache, "--config.methods=zeroshot")
    assert proc.returncode == 0, proc.stderr[-4000:]
    warnings = [line for line in proc.stderr.splitlines() if "ignoring damaged cache entry" in line]
    assert sorted(w.split("cache entry ")[1].split()[0] for w in warnings) == sorted(paths.values()), warnings
    assert "Traceback" not in proc.stderr
    for kind, path in paths.items():   # recomputed, rewritten whole, and equal to what the first run computed
        for k, v in originals[kind].items():
            np.testing.assert_allclose(_arrays(path)[k], v, rtol=1e-6, atol=1e-6, err_msg=f"{kind}/{k}")
    assert not any(p.exists() for p in stale)
    assert not glob.glob(str(cache / "features" / "*tmp*"))


def test_a_changed_learning_rate_on_a_resumed_workdir_is_refused(tip_run):
    workdir, cache = tip_run
    before = (workdir / "config.json").read_text()
    proc = _launch(workdir, cache, "--config.methods=tip_adapter_f", "--config.tip_adapter.train.optim.lr=0.01")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _errors(proc)
    assert "tip_adapter.train.optim.lr (0.001 -> 0.01)" in line and "--config.train.resume=force" in line, line
    assert (workdir / "config.json").read_text() == before


def test_the_cache_key_follows_the_checkpoint_content_not_its_mtimes(tmp_path):
    """Two runs racing to write the built-in checkpoint: the loser renames the same bytes over the winner's files
    (new mtimes, new inodes); the cache key, hence every cache entry, must stay the same."""
    from vlm_jax.data import features

    rng = np.random.default_rng(0)
    files = {"model.safetensors": rng.bytes(6 << 20), "config.json": b'{"model_type": "clip"}'}  # > 4 MiB: sampled

    def write(content):
        for name, data in content.items():
            (tmp_path / f".{name}.tmp").write_bytes(data)
            os.replace(tmp_path / f".{name}.tmp", tmp_path / name)

    write(files)
    before = features.checkpoint_fingerprint(str(tmp_path))
    os.utime(tmp_path / "model.safetensors", (time.time() - 60,) * 2)
    write(files)
    assert features.checkpoint_fingerprint(str(tmp_path)) == before
    changed = bytearray(files["model.safetensors"])
    changed[:8] = b"\x00" * 8   # the header's length field
    write({**files, "model.safetensors": bytes(changed)})
    assert features.checkpoint_fingerprint(str(tmp_path)) != before


# ----------------------------------------------------------------------------------------------------------
# The config a workdir remembers, in process.

def _config(**train):
    c = ml_collections.ConfigDict({"program": "p", "data": {"root": "/a", "name": "x"}, "mesh": {"data": -1},
                                   "train": {"epochs": 3, "resume": "check", "optim": {"lr": 0.1}, **train}})
    return c


def test_config_diff_ignores_paths_layout_and_evaluation_keys():
    old = {"data": {"root": "/a", "name": "x", "test_limit": 0}, "mesh": {"data": -1}, "train": {"epochs": 3}}
    new = {"data": {"root": "/b", "name": "y", "test_limit": 5}, "mesh": {"data": 4}, "train": {"epochs": 2},
           "new_key": 1}
    assert workdir_lib.config_diff(old, new) == ["data.name", "new_key", "train.epochs"]


def test_prepare_refuses_a_changed_config_only_on_a_workdir_with_checkpoints(tmp_path):
    workdir_lib.prepare(str(tmp_path), _config())
    workdir_lib.prepare(str(tmp_path), _config(epochs=4))    # nothing to resume yet: the new config is recorded
    (tmp_path / "checkpoints" / "train").mkdir(parents=True)   # an empty one holds nothing to resume
    workdir_lib.prepare(str(tmp_path), _config(epochs=5))
    workdir_lib.prepare(str(tmp_path), _config(epochs=4))
    (tmp_path / "checkpoints" / "train" / "2").mkdir()
    workdir_lib.prepare(str(tmp_path), _config(epochs=4))    # same config
    with pytest.raises(errors.UserError, match=r"train.epochs \(4 -> 5\).*resume=force"):
        workdir_lib.prepare(str(tmp_path), _config(epochs=5))
    workdir_lib.prepare(str(tmp_path), _config(epochs=5, resume="force"))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 5
    with pytest.raises(errors.UserError, match="train.resume must be one of"):
        workdir_lib.prepare(str(tmp_path), _config(resume="yes"))


def test_storage_failures_are_recognised_with_their_path():
    under_file = None
    try:
        os.makedirs(os.path.join(__file__, "w"))
    except OSError as e:
        under_file = workdir_lib.write_failure(e, "the workdir", "--workdir")
    assert under_file.startswith(f"cannot write the workdir at {os.path.join(__file__, 'w')}: a parent of it is a file")
    # orbax's error for a full disk (from a real run), a tensorstore status inside a ValueError
    status = ValueError('RESOURCE_EXHAUSTED: Error writing "x/0" in OCDBT database at local file "/w/ck/4.tmp/": '
                        'Failed writing: "/w/ck/4.tmp/d/e3f6": Failed to write 510195 bytes to file 4: No space '
                        "left on device [os_error_code='28']")
    assert workdir_lib.write_failure(status, "checkpoints", "--workdir") == (
        "cannot write checkpoints at /w/ck/4.tmp/d/e3f6: no space left on the device; free space and rerun the same "
        "command (it resumes), or pass another --workdir")
    assert workdir_lib.write_failure(ValueError("shape mismatch")) is None


# ----------------------------------------------------------------------------------------------------------
# A full, a read-only and an impossible workdir: one `error:` line, exit 2, nothing half-written left.

def _child(workdir, *args, mount: str = ""):
    """ft_child.py on `workdir`; with `mount`, first runs that shell setup in a private mount namespace and lists
    the leftover orbax temp folders after the child (the mount is gone once the namespace ends)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    argv = [sys.executable, CHILD, str(workdir), os.path.join(os.path.dirname(str(workdir)), "p.npz"), *map(str, args)]
    if mount:
        root = os.path.dirname(str(workdir))
        script = f'{mount} && "$@"; rc=$?; find {root} -name "*orbax-checkpoint-tmp*" | sed "s/^/LEFT /"; exit $rc'
        argv = ["unshare", "-rm", "sh", "-c", script, "sh", *argv]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnt")
    try:
        p = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {d}"],
                           capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no `unshare` here to mount a tmpfs in a private mount namespace")
    if p.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs user namespaces or root): {p.stderr.strip()}")


def _assert_one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _errors(proc)
    assert all(n in line for n in needles), line
    assert "Traceback" not in proc.stderr and "LEFT " not in proc.stdout, (proc.stdout, proc.stderr[-3000:])


def test_a_full_workdir_is_one_error_line(tmp_path, can_mount):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # 4 x 65536 float32 weights with two Adam moments: the first checkpoint needs ~4 MiB of the 3 MiB.
    proc = _child(mnt / "w", "--hidden", 65536, "--every", 4, mount=f"mount -t tmpfs -o size=3m tmpfs {mnt}")
    _assert_one_error_line(proc, f"{mnt}/w/checkpoints/train", "no space left", "rerun the same command")


def test_a_read_only_workdir_is_one_error_line(tmp_path, can_mount):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _child(mnt / "w", mount=f"mount -t tmpfs tmpfs {mnt} && mkdir {mnt}/w && mount -o remount,ro {mnt}")
    _assert_one_error_line(proc, f"{mnt}/w", "read-only file system")


def test_a_workdir_under_a_file_is_one_error_line(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _child(tmp_path / "file" / "w")
    _assert_one_error_line(proc, str(tmp_path / "file" / "w"), "is a file, not a directory")
