"""End-to-end: `configs/vitask.py:runlocal` (toy CLIP TSM + toy LLaVA on the built-in photos) runs offline on CPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("TSM", "vanilla (L_van)", "VITask w/o EP", "VITask w/ EP")


def test_vitask_runlocal(tmp_path):
    workdir = tmp_path / "tmp"
    env = dict(os.environ, VLM_JAX_CACHE=str(tmp_path / "tmp" / "cache"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "launch/main.py", "--config=configs/vitask.py:runlocal",
                           f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((workdir / "results.json").read_text())
    assert set(ROWS) <= set(out["results"]), out["results"].keys()
    for name in ROWS:
        row = out["results"][name]
        for metric in ("accuracy", "macro_f1"):
            assert 0.0 <= row[metric] <= 100.0, (name, metric, row)
    for name in ROWS[1:]:  # the LVLM rows again, from greedy answers matched to the label set
        row = out["results"][f"{name} [generated]"]
        assert 0.0 <= row["accuracy"] <= 100.0 - row["unmatched"] + 1e-9, row  # unmatched answers count as wrong
    sha = out["connector_sha256"]
    assert sha["stage1"] and sha["stage1"] == sha["stage2"], sha  # the connector is frozen in stage 2
    assert out["history"]["stage2"] and "train_crt" in out["history"]["stage2"][0]
    assert (workdir / "results.md").exists() and (workdir / "metrics.jsonl").exists()


@pytest.mark.parametrize("config, override", [
    ("configs/vitask.py:runlocal", "--config.model.checkpoint=/nonexistent/llava"),
    ("configs/vitask.py:runlocal", "--config.tsm.checkpoint=/nonexistent/clip"),
    ("configs/discriminative.py:runlocal", "--config.model.checkpoint=/nonexistent/llava"),
    ("configs/discriminative.py:runlocal", "--config.clip_checkpoint=/nonexistent/clip"),
])
def test_missing_checkpoint_is_one_line_before_any_work(tmp_path, config, override):
    workdir = tmp_path / "run"
    env = dict(os.environ, VLM_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "launch/main.py", f"--config={config}", f"--workdir={workdir}", override],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "/nonexistent/" in last and config.split(":")[0] in last, last
    assert not workdir.exists()  # nothing half-written, no model trained for nothing
