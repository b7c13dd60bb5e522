"""End to end: the launcher on the offline `:runlocal` config, on 1 and on 8 fake CPU devices, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"zeroshot", "tip_adapter", "tip_adapter_f", "dualadapter", "dualadapter_f"}


def _launch(workdir, *overrides, devices=1, cache=None, arg="runlocal"):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}",
               VLM_JAX_CACHE=str(cache or os.path.join(workdir, "cache")))
    cmd = [sys.executable, os.path.join(ROOT, "launch", "main.py"), f"--config=configs/dualadapter.py:{arg}",
           f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runlocal(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("runlocal"))
    proc = _launch(workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, proc


def test_runlocal_writes_all_results(runlocal):
    workdir, proc = runlocal
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    (run,) = results["runs"]
    assert set(run["methods"]) == set(run["realistic"]) == METHODS  # both protocols by default
    for name, res in [*run["methods"].items(), *run["realistic"].items()]:
        assert 0.0 <= res["test_accuracy"] <= 100.0, name
    # Eight classes of real photos: the cache-based methods must beat chance (12.5%) by a wide margin even with
    # a random backbone, because crops of one photo share low-level statistics.
    assert run["methods"]["tip_adapter"]["test_accuracy"] > 40.0
    assert run["methods"]["dualadapter"]["test_accuracy"] > 40.0
    for name in ("config.json", "results.md", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert "| method | 4-shot paper | 4-shot realistic |" in proc.stdout  # the printed table, both protocols
    assert all(r["folds"] == 2 for r in run["realistic"].values())


def test_rerun_reads_feature_cache(runlocal, tmp_path):
    workdir, _ = runlocal
    proc = _launch(str(tmp_path / "again"), "--config.methods=dualadapter", cache=os.path.join(workdir, "cache"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cache hit" in proc.stderr
    assert "cache features" not in proc.stderr  # the backbone did not encode the few-shot images again


def test_sweep_writes_table_and_plot(runlocal, tmp_path):
    workdir, _ = runlocal
    out = tmp_path / "sweep"
    proc = _launch(str(out), "--config.methods=zeroshot,tip_adapter,dualadapter", arg="runlocal,sweep",
                   cache=os.path.join(workdir, "cache"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.load(open(out / "results.json"))
    assert sorted((r["shots"], r["seed"]) for r in results["runs"]) == [(s, r) for s in (1, 2, 4) for r in (1, 2)]
    for shots, cell in results["summary"]["dualadapter"].items():
        accs = [r["methods"]["dualadapter"]["test_accuracy"] for r in results["runs"] if r["shots"] == int(shots)]
        np.testing.assert_allclose(cell["mean"], np.mean(accs))
        assert cell["n"] == 2
    assert (out / "accuracy_vs_shots.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "| DualAdapter (training-free) |" in md
    # Both protocols side by side for every method; 1-shot realistic falls back to the presets' initial values.
    assert "| method | 1-shot paper | 1-shot realistic | 2-shot paper | 2-shot realistic |" in md
    assert set(results["summary_realistic"]) == set(results["summary"]) == {"zeroshot", "tip_adapter", "dualadapter"}
    assert {r["shots"]: r["realistic"]["dualadapter"]["folds"] for r in results["runs"]} == {1: 0, 2: 2, 4: 2}


def test_eight_devices_equal_one_device(runlocal, tmp_path):
    workdir, _ = runlocal
    # The papers' protocol: a realistic fold's 20 shots split into other batches on 8 devices (16, the rest dropped).
    proc = _launch(str(tmp_path / "eight"), "--config.protocol=paper", devices=8)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = json.load(open(os.path.join(workdir, "results.json")))["runs"][0]["methods"]
    eight = json.load(open(os.path.join(tmp_path, "eight", "results.json")))["runs"][0]["methods"]
    for name in METHODS:
        np.testing.assert_allclose(eight[name]["test_accuracy"], one[name]["test_accuracy"], atol=1e-6, err_msg=name)
        np.testing.assert_allclose(eight[name]["val_accuracy"], one[name]["val_accuracy"], atol=1e-6, err_msg=name)


@pytest.mark.parametrize("arg, override, expected", [
    ("runlocal", "--config.model.checkpoint=/nonexistent/clip", "/nonexistent/clip"),
    ("runlocal", "--config.model.checkpoint=someone/not-in-cache", "someone/not-in-cache"),
    ("dataset=EuroSAT", "--config.model.checkpoint=builtin:tiny-clip", "no data root for dataset 'eurosat'"),
    ("runlocal", "--config.data.name=eurosat", "took the presets"),
    ("runlocal", "--config.data.shots=1000", "shots"),
    ("runlocal", "--config.data.rooot=/data", 'Did you mean "root"'),
    ("dataset=mnist", "--config.data.root=/data", "unknown dataset 'mnist'; known: imagenet"),
])
def test_bad_input_is_one_line_and_no_results(tmp_path, arg, override, expected):
    workdir = str(tmp_path / "bad")
    proc = _launch(workdir, override, arg=arg)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last
    assert not os.path.exists(os.path.join(workdir, "results.json"))


@pytest.mark.parametrize("flags, message", [
    (["--config=configs/discriminative.py:runlocal"], "configs/discriminative.py was renamed to configs/vladva.py: "
                                                      "use --config=configs/vladva.py:runlocal"),
    (["--config=configs/vladva.py:runlocal", "--config.method.microbatches=2"],
     "--config.method.microbatches was renamed to --config.train.grad_cache_chunks"),
    (["--config=configs/dualadapter.py:runlocal", "--config.data.batch_size=8"],
     "--config.data.batch_size was renamed to --config.data.eval_batch_size"),
])
def test_renamed_keys_and_configs_are_one_line(tmp_path, flags, message):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"), *flags, f"--workdir={tmp_path}/w"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}", proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_bad_config_argument_and_missing_config_file(tmp_path):
    proc = _launch(str(tmp_path / "bad"), arg="runlocl")
    assert proc.returncode == 2 and "unknown config argument 'runlocl'" in proc.stderr.strip().splitlines()[-1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"), "--config=configs/nothere.py",
                           f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "configs/nothere.py" in proc.stderr


@pytest.mark.parametrize("arg, overrides, message", [
    ("runlocal,shots=0", [], "shots must be a whole number >= 1, got 0"),
    ("runlocal", ["--config.data.shots=-3"], "shots must be a whole number >= 1, got -3"),
    ("runlocal", ["--config.dualadapter.train.epochs=0"], "--config.dualadapter.train.epochs=0 is out of range"),
])
def test_bad_values_are_one_line_and_write_nothing(tmp_path, arg, overrides, message):
    workdir = tmp_path / "run"
    proc = _launch(str(workdir), *overrides, arg=arg, cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not workdir.exists()
