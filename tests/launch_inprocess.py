"""`python launch/main.py ARGS` run inside the test process, for the one-line-error tests.

A child process costs ~8 s of imports (jax, transformers, torch) before it reaches the line that refuses the
input; these tests check the refusal itself (the `error:` line, exit code 2, nothing written), which is the same
code in process. One real child per entry point still proves the whole path (tests/test_runlocal.py::
test_bad_config_argument_and_missing_config_file for launch/main.py, tests/test_cli.py for `vlm-jax`).
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_main(args, capsys, monkeypatch, env=None):
    """Runs launch/main.py's `train.main` on `args` from the repository root, with `env` set.

    Args:
      args: the command line after the program name, e.g. ["--config=configs/vladva.py:runlocal", ...].
      capsys, monkeypatch: the test's fixtures (stderr is read from capsys; cwd and env are restored after).
      env: environment variables to set for the run (e.g. VLM_JAX_CACHE).

    Returns:
      (exit code, the lines of stderr, stripped).
    """
    from absl import flags

    from vlm_jax.programs import train

    monkeypatch.chdir(ROOT)   # the configs are named relative to the checkout, as the child's cwd was
    argv = ["launch/main.py", *args]
    monkeypatch.setattr(sys, "argv", argv)   # config_flags finds the --config.a.b overrides in sys.argv
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    _reset_flags(flags.FLAGS)
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
    finally:
        _reset_flags(flags.FLAGS)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def _reset_flags(fv):
    """absl's global FLAGS keep the last parse: every run starts from the defaults, without the `config.a.b`
    override flags that config_flags defined for the last run's config (it defines them again)."""
    for name in [n for n in fv if n.startswith("config.")]:
        delattr(fv, name)
    fv.unparse_flags()


def assert_one_line_error(code, lines, message):
    """Exit code 2 and a last stderr line `error: ...` that contains `message`."""
    assert code == 2, (code, lines[-20:])
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], lines[-20:]
