"""The `vlm-jax` command: its subcommands, bad input to eval / predict as one `error:` line (child processes), and
eval's --config overrides (in process).

What eval and predict compute is tested on trained workdirs in test_runlocal.py (few-shot CLIP), test_pairs.py
(VladVA) and test_vitask_runlocal.py (VITask).
"""

import importlib.util
import json
import os
import subprocess
import sys
import tomllib

import pytest

from vlm_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vlm_jax(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "vlm_jax.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_console_script_and_help_list_every_subcommand():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"] == {"vlm-jax": "vlm_jax.cli:main"}
    proc = _vlm_jax("--help")
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "eval", "predict", "export", "plan"):
        assert f"\n  {name} " in proc.stdout, proc.stdout
    proc = _vlm_jax("eval", "--help")   # the subcommand's own doc and flags
    assert proc.returncode == 0 and "--workdir" in proc.stdout and "eval_results.json" in proc.stdout, proc.stdout


def _one_error_line(proc, expected: str):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("W", "I"))]
    assert lines == [f"error: {expected}"] or (len(lines) == 1 and expected in lines[0]), proc.stderr


def _workdir(tmp_path, config):
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    return str(tmp_path / "run")


@pytest.mark.parametrize("args, expected", [
    (["frobnicate"], "unknown command 'frobnicate'; known: train, eval, predict, export, plan"),
    (["eval", "--workdir=/nonexistent/run"], "--workdir /nonexistent/run is not a directory"),
    (["eval", "--workdir={tmp}"], "is not the workdir of a run: it has no config.json"),
    (["eval", "--workdir={old}"], "names program 'discriminative', which this version of vlm_jax cannot evaluate"),
    (["eval", "--workdir={fewshot}"], "config.json lacks a key this version of vlm_jax reads"),
    (["predict", "--workdir={fewshot}"], "give image files or --folder=DIR (one of the two)"),
    (["predict", "--workdir={fewshot}", "/nonexistent/a.png", "/nonexistent/b.png"],
     "no image file /nonexistent/a.png (and 1 more)"),
    (["predict", "--workdir={fewshot}", "--folder={tmp}"], "holds no image file"),
    (["eval"], "Flag --workdir must have a value other than None"),
    (["eval", "--workdir={tmp}", "extra"], "unexpected arguments: extra (vlm-jax eval takes flags only)"),
    # The multi-process flags of vlm-jax train: --distributed=off is accepted (the workdir is what fails) ...
    (["eval", "--workdir=/nonexistent/run", "--distributed=off"], "--workdir /nonexistent/run is not a directory"),
    (["predict", "--workdir={fewshot}", "--distributed=off", "--process_id=1", "a.png"],
     "--distributed=off contradicts --process_id"),
    # ... and the config overrides, taken out of absl's flags (in process below).
    (["predict", "--workdir={fewshot}", "--config.data.root=/x", "a.png"],
     "unknown config key: --config.data.root is not a key of {fewshot}/config.json"),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    dirs = {"tmp": str(tmp_path), "old": _workdir(tmp_path / "o", {"program": "discriminative"}),
            # A config.json without the keys this version reads (as another version would have written it).
            "fewshot": _workdir(tmp_path / "f", {"program": "fewshot_clip"})}
    _one_error_line(_vlm_jax(*[a.format(**dirs) for a in args]), expected.format(**dirs))


def test_a_subcommand_missing_from_the_build_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "export", ("vlm_jax.programs.no_such_module", "not built"))
    with pytest.raises(SystemExit) as e:
        cli.main(["vlm-jax", "export", "--workdir=x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: vlm-jax export is not available in this build\n"


def open_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _coop_eurosat(root, classes=("Forest", "River", "SeaLake")):
    """A tiny EuroSAT in CoOp's layout (split_zhou_EuroSAT.json + 2750/<class>/*.png), 2 images per split and class."""
    import numpy as np
    from PIL import Image

    split = {s: [[f"{c}/{s}_{k}.png", i, c] for i, c in enumerate(classes) for k in range(2)]
             for s in ("train", "val", "test")}
    rng = np.random.default_rng(0)
    for rel, label, _ in (e for entries in split.values() for e in entries):
        os.makedirs(os.path.dirname(root / "eurosat" / "2750" / rel), exist_ok=True)
        pixels = np.clip(rng.normal(60 * label + 40, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "eurosat" / "2750" / rel)
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))


def test_eval_takes_a_moved_data_root_and_refuses_a_trained_key(tmp_path):
    """In process: a zero-shot CLIP run (training-free, so nothing but config.json and results) on a tiny EuroSAT;
    the data moved, `eval` with --config.data.root=<the new place> gives back results.json's accuracies; without it
    the data is not found; a key that changes what was trained is refused."""
    from vlm_jax import errors
    from vlm_jax.programs import evaluate, fewshot_clip

    spec = importlib.util.spec_from_file_location("dualadapter_config", os.path.join(ROOT, "configs", "dualadapter.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("dataset=eurosat,shots=1,protocol=paper")
    config.model.checkpoint, config.methods, config.data.root = "builtin:tiny-clip", "zeroshot", str(tmp_path / "data")
    config.feature_cache_dir = ""   # the workdir's own: eval sees it, the moved data is what it looks up
    _coop_eurosat(tmp_path / "data")
    workdir = str(tmp_path / "run")
    fewshot_clip.run(config, workdir)
    os.rename(tmp_path / "data", tmp_path / "moved")
    with pytest.raises(errors.UserError, match=str(tmp_path / "data")):
        evaluate.evaluate(workdir, str(tmp_path / "out"))
    with pytest.raises(errors.UserError, match=r"--config.model.checkpoint would change what the run trained: eval "
                                               r"and predict take only keys matching train.resume, mesh.\*, "):
        evaluate.evaluate(workdir, str(tmp_path / "out"), ["--config.model.checkpoint=builtin:tiny-clip"])
    written = evaluate.evaluate(workdir, str(tmp_path / "out"), [f"--config.data.root={tmp_path / 'moved'}"])
    (want,), (got,) = (json.loads(open_text(p))["runs"] for p in (os.path.join(workdir, "results.json"),
                                                                   written["results.json"]))
    assert got["methods"]["zeroshot"]["test_accuracy"] == want["methods"]["zeroshot"]["test_accuracy"]
    assert json.loads(open_text(os.path.join(workdir, "config.json")))["data"]["root"] == str(tmp_path / "data")
