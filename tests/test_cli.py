"""The `vlm-jax` command: its subcommands, and bad input to eval / predict as one `error:` line (child processes).

What eval and predict compute is tested on trained workdirs in test_runlocal.py (few-shot CLIP), test_pairs.py
(VladVA) and test_vitask_runlocal.py (VITask).
"""

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
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    dirs = {"tmp": str(tmp_path), "old": _workdir(tmp_path / "o", {"program": "discriminative"}),
            # A config.json without the keys this version reads (as another version would have written it).
            "fewshot": _workdir(tmp_path / "f", {"program": "fewshot_clip"})}
    _one_error_line(_vlm_jax(*[a.format(**dirs) for a in args]), expected)


def test_a_subcommand_missing_from_the_build_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "export", ("vlm_jax.programs.no_such_module", "not built"))
    with pytest.raises(SystemExit) as e:
        cli.main(["vlm-jax", "export", "--workdir=x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: vlm-jax export is not available in this build\n"
