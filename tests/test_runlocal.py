"""End to end: the launcher on the offline `:runlocal` config, on 1 and on 8 fake CPU devices, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from launch_inprocess import assert_one_line_error, launch_main

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


# The refusals below run launch/main.py's main in this process (tests/launch_inprocess.py: a child would spend
# ~8 s importing before each); test_bad_config_argument_and_missing_config_file runs the real child once.

@pytest.mark.parametrize("arg, override, expected", [
    ("runlocal", "--config.model.checkpoint=/nonexistent/clip", "/nonexistent/clip"),
    ("runlocal", "--config.model.checkpoint=someone/not-in-cache", "someone/not-in-cache"),
    ("dataset=EuroSAT", "--config.model.checkpoint=builtin:tiny-clip", "no data root for dataset 'eurosat'"),
    ("runlocal", "--config.data.name=eurosat", "took the presets"),
    ("runlocal", "--config.data.shots=1000", "shots"),
    ("runlocal", "--config.data.rooot=/data", 'Did you mean "root"'),
    ("dataset=mnist", "--config.data.root=/data", "unknown dataset 'mnist'; known: imagenet"),
])
def test_bad_input_is_one_line_and_no_results(tmp_path, capsys, monkeypatch, arg, override, expected):
    workdir = tmp_path / "bad"
    code, lines = launch_main([f"--config=configs/dualadapter.py:{arg}", f"--workdir={workdir}", override], capsys,
                              monkeypatch, env={"VLM_JAX_CACHE": str(workdir / "cache")})
    assert_one_line_error(code, lines, expected)
    assert not (workdir / "results.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--config=configs/discriminative.py:runlocal"], "configs/discriminative.py was renamed to configs/vladva.py: "
                                                      "use --config=configs/vladva.py:runlocal"),
    (["--config=configs/vladva.py:runlocal", "--config.method.microbatches=2"],
     "--config.method.microbatches was renamed to --config.train.grad_cache_chunks"),
    (["--config=configs/dualadapter.py:runlocal", "--config.data.batch_size=8"],
     "--config.data.batch_size was renamed to --config.data.eval_batch_size"),
])
def test_renamed_keys_and_configs_are_one_line(tmp_path, capsys, monkeypatch, flags, message):
    code, lines = launch_main([*flags, f"--workdir={tmp_path}/w"], capsys, monkeypatch)
    assert code == 2 and lines == [f"error: {message}"], lines[-20:]
    assert not (tmp_path / "w").exists()


def test_bad_config_argument_and_missing_config_file(tmp_path, capsys, monkeypatch):
    """The missing config file runs as a real child process: the one proof for launch/main.py that a refusal is
    exactly one `error:` line on stderr and exit code 2, from the command line to the process's end."""
    code, lines = launch_main(["--config=configs/dualadapter.py:runlocl", f"--workdir={tmp_path / 'bad'}"], capsys,
                              monkeypatch)
    assert_one_line_error(code, lines, "unknown config argument 'runlocl'")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"), "--config=configs/nothere.py",
                           f"--workdir={tmp_path}/w"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "configs/nothere.py" in proc.stderr
    assert proc.stderr.startswith("error: ") and not (tmp_path / "w").exists()


@pytest.mark.parametrize("arg, overrides, message", [
    ("runlocal,shots=0", [], "shots must be a whole number >= 1, got 0"),
    ("runlocal", ["--config.data.shots=-3"], "shots must be a whole number >= 1, got -3"),
    ("runlocal", ["--config.dualadapter.train.epochs=0"], "--config.dualadapter.train.epochs=0 is out of range"),
])
def test_bad_values_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, arg, overrides, message):
    workdir = tmp_path / "run"
    code, lines = launch_main([f"--config=configs/dualadapter.py:{arg}", f"--workdir={workdir}", *overrides], capsys,
                              monkeypatch, env={"VLM_JAX_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(code, lines, message)
    assert not workdir.exists()


# ----------------------------------------------------------------------------------------------------------
# After training: `vlm-jax eval` and `vlm-jax predict` on the trained workdir.

def _vlm_jax(workdir, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT,
               VLM_JAX_CACHE=os.path.join(workdir, "cache"))
    return subprocess.run([sys.executable, "-m", "vlm_jax.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def _tree(workdir):
    return sorted(os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs)


def test_eval_reproduces_results_without_training(runlocal):
    workdir, _ = runlocal
    results = open(os.path.join(workdir, "results.json")).read()
    checkpoints = _tree(os.path.join(workdir, "checkpoints"))
    proc = _vlm_jax(workdir, "eval", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {workdir}/eval_results.json" in proc.stdout
    # The features come from the run's feature cache (this replaces a test that reran the launcher to see it).
    assert "cache hit" in proc.stderr and "cache features" not in proc.stderr
    assert open(os.path.join(workdir, "results.json")).read() == results   # the run's own results are kept
    assert _tree(os.path.join(workdir, "checkpoints")) == checkpoints       # nothing trained or saved
    (want,), (got,) = json.loads(results)["runs"], json.load(open(os.path.join(workdir, "eval_results.json")))["runs"]
    for protocol in ("methods", "realistic"):
        assert set(got[protocol]) == METHODS
        for name, res in want[protocol].items():
            for key in ("test_accuracy", "val_accuracy", "hparams", "best_epoch"):
                assert got[protocol][name].get(key) == res.get(key), (protocol, name, key)


def test_predict_gives_the_classes_of_the_evaluation(runlocal, tmp_path):
    """predict on the test images (as files) reproduces each method's evaluated test accuracy."""
    from PIL import Image

    from vlm_jax.data import builtin

    workdir, _ = runlocal
    ds = builtin.builtin_dataset()
    os.makedirs(tmp_path / "images")
    for i, ex in enumerate(ds.test):
        Image.fromarray(ex.array).save(tmp_path / "images" / f"{i:03d}.png")   # lossless: the evaluated pixels
    # Zero-shot, a cache rebuilt from the config, fine-tuned residuals restored from a checkpoint.
    methods = ("zeroshot", "tip_adapter", "dualadapter_f")
    proc = _vlm_jax(workdir, "predict", f"--workdir={workdir}", f"--folder={tmp_path / 'images'}", "--protocol=paper",
                    f"--methods={','.join(methods)}", f"--out={tmp_path / 'predictions.json'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| image | zeroshot (paper) | tip_adapter (paper) | dualadapter_f (paper) |" in proc.stdout, proc.stdout
    got = json.load(open(tmp_path / "predictions.json"))
    assert got["classnames"] == ds.classnames and len(got["images"]) == len(ds.test)
    (run,) = json.load(open(os.path.join(workdir, "results.json")))["runs"]
    for name in methods:
        top1 = [im["predictions"][f"{name} (paper)"][0]["class"] for im in got["images"]]
        accuracy = 100.0 * np.mean([c == ex.classname for c, ex in zip(top1, ds.test)])
        np.testing.assert_allclose(accuracy, run["methods"][name]["test_accuracy"], atol=1e-6, err_msg=name)
        scores = [p["score"] for p in got["images"][0]["predictions"][f"{name} (paper)"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-3
