"""End-to-end: `configs/vitask.py:runlocal` (toy CLIP TSM + toy LLaVA, jointly on two disjoint halves of the
built-in photos) runs offline on CPU; data errors are one line before any work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from launch_inprocess import assert_one_line_error, launch_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("TSM", "vanilla (L_van)", "VITask w/o EP", "VITask w/ EP")
DATASETS = ("builtin_a", "builtin_b")


def test_vitask_runlocal(tmp_path, optimized_env):
    workdir = tmp_path / "tmp"
    env = dict(optimized_env, VLM_JAX_CACHE=str(tmp_path / "tmp" / "cache"))
    proc = subprocess.run([sys.executable, "launch/main.py", "--config=configs/vitask.py:runlocal",
                           f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((workdir / "results.json").read_text())
    assert [d["name"] for d in out["datasets"]] == list(DATASETS)
    assert [d["test_examples"] for d in out["datasets"]] == [10, 10] and out["num_classes"] == 10
    assert out["datasets"][1]["instruction"].endswith("galaxy, stained tissue sample, retina, coin, brick wall.")
    assert set(ROWS) <= set(out["results"]), out["results"].keys()
    for name in ROWS:
        row = out["results"][name]
        for metric in ("accuracy", "macro_f1"):
            values = [row["datasets"][d][metric] for d in DATASETS]
            assert all(0.0 <= v <= 100.0 for v in values), (name, metric, row)
            assert abs(row["mean"][metric] - sum(values) / 2) < 1e-9, row
    for name in ROWS[1:]:  # the LVLM rows again, from greedy answers matched to the label set
        rows = out["results"][f"{name} [generated]"]["datasets"]
        for d in DATASETS:
            row = rows[d]
            assert 0.0 <= row["accuracy"] <= 100.0 - row["unmatched"] + 1e-9, row  # unmatched answers count as wrong
        # The demo learns: greedy answers name a label of the sample's own dataset (before the toy's selective
        # attention and head LoRA, all 20 answers of every row were unmatched). Equal-sized test sets, so the mean
        # over datasets is the fraction of the 20 answers: < 10% is at most one unmatched answer per row.
        assert np.mean([rows[d]["unmatched"] for d in DATASETS]) < 10.0, (name, rows)
    for name in ROWS[1:]:  # ... and they are right more often than chance (5 labels per dataset: 20%)
        for row in (name, f"{name} [generated]"):
            assert out["results"][row]["mean"]["accuracy"] > 20.0, (row, out["results"][row])
    md = (workdir / "results.md").read_text()
    assert "| model | builtin_a acc | builtin_a F1 | builtin_b acc | builtin_b F1 | mean acc | mean F1 |" in md, md
    sha = out["connector_sha256"]
    assert sha["stage1"] and sha["stage1"] == sha["stage2"], sha  # the connector is frozen in stage 2
    assert out["history"]["stage2"] and "train_crt" in out["history"]["stage2"][0]
    assert (workdir / "metrics.jsonl").exists()
    _predict_gives_the_evaluated_accuracies(tmp_path, env, workdir, out["results"])


def _predict_gives_the_evaluated_accuracies(tmp_path, env, workdir, results):
    """`vlm-jax predict` on builtin_a's test images (the run's own test split, as files): the ranking's top-1
    against the true labels is results.json's 'VITask w/ EP' accuracy of builtin_a, the generated answers' matched
    labels its '[generated]' accuracy (an unmatched answer counts as wrong)."""
    import ml_collections
    from PIL import Image

    from vlm_jax.data import vitask_tasks

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    task = vitask_tasks.load_task(config.data, config.rng_seed)   # the split the run evaluated
    d = DATASETS.index("builtin_a")
    rows = np.flatnonzero(task.test.dataset == d)
    classnames = task.datasets[d].classnames
    os.makedirs(tmp_path / "images")
    for i in rows:   # lossless: the evaluated pixels
        Image.fromarray(task.test.examples[i].array).save(tmp_path / "images" / f"{i:03d}.png")
    proc = subprocess.run([sys.executable, "-m", "vlm_jax.cli", "predict", f"--workdir={workdir}",
                           f"--folder={tmp_path / 'images'}", "--dataset=builtin_a", f"--out={tmp_path / 'p.json'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "p.json").read_text())["images"]
    truth = [classnames[task.test.label[i]] for i in rows]
    assert len(got) == len(truth) == 10
    ranked = 100.0 * np.mean([im["ranking"][0]["class"] == t for im, t in zip(got, truth)])
    generated = 100.0 * np.mean([im["matched"] == t for im, t in zip(got, truth)])
    want = [results[name]["datasets"]["builtin_a"]["accuracy"] for name in ("VITask w/ EP", "VITask w/ EP [generated]")]
    np.testing.assert_allclose([ranked, generated], want, atol=1e-6)


@pytest.mark.parametrize("config, override", [
    ("configs/vitask.py:runlocal", "--config.model.checkpoint=/nonexistent/llava"),
    ("configs/vitask.py:runlocal", "--config.tsm.checkpoint=/nonexistent/clip"),
    ("configs/vladva.py:runlocal", "--config.model.checkpoint=/nonexistent/llava"),
    ("configs/vladva.py:runlocal", "--config.clip_checkpoint=/nonexistent/clip"),
])
def test_missing_checkpoint_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, config, override):
    # In this process (tests/launch_inprocess.py): a child per case spent ~8 s importing before the refusal.
    workdir = tmp_path / "run"
    code, lines = launch_main([f"--config={config}", f"--workdir={workdir}", override], capsys, monkeypatch,
                              env={"VLM_JAX_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(code, lines, "/nonexistent/")
    assert config.split(":")[0] in lines[-1], lines[-1]
    assert not workdir.exists()  # nothing half-written, no model trained for nothing


def _chest(root):
    """A fake chestmnist.npz (multi-label, 14 labels, a few 28x28 images)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 14)) < 0.2).astype(np.uint8)
    np.savez(root / "chestmnist.npz", **arrays)
    return root


@pytest.mark.parametrize("overrides, message", [
    (["--config.data.name=builtin_a,chestmnist", "--config.method.eval_mode=likelihood"],
     "chestmnist is multi-label: label-likelihood ranking scores one label per answer; use "
     "--config.method.eval_mode=generate"),
    (["--config.data.name=builtin_a,folder:/nonexistent/xrays"], "/nonexistent/xrays does not exist"),
    (["--config.data.name=builtin_a,folder:{tmp}/data"], "missing split folder"),
    (["--config.method.eval_mode=rank"], "--config.method.eval_mode='rank' is not one of"),
    (["--config.data.train_limit=1"], "dataset 'builtin_a' has one distinct answer"),   # no CRT negative
    (["--config.train.batch_size=0"], "--config.train.batch_size=0 is out of range: it must be a number >= 1"),
])
def test_data_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, overrides, message):
    _chest(tmp_path / "data")
    workdir = tmp_path / "run"
    args = [o.replace("{tmp}", str(tmp_path)) for o in overrides] + [f"--config.data.root={tmp_path / 'data'}"]
    code, lines = launch_main(["--config=configs/vitask.py:runlocal", f"--workdir={workdir}", *args], capsys,
                              monkeypatch, env={"VLM_JAX_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(code, lines, message)
    assert not workdir.exists() and not (tmp_path / "cache").exists()
