"""`vlm-jax eval --workdir=DIR [--out=DIR]`: the run's configured evaluation on its kept checkpoints, no training.

The workdir's program runs again on its config.json, in a scratch workdir that sees the run's checkpoints and
feature cache (`trained.scratch_workdir`), with the trainer restoring every finished training instead of
training (`trainer.restore_only`): the numbers come from the same code as the run's results.json. A training
that did not finish, or one the run never did, is one `error:` line; nothing is trained or saved.

Training-free few-shot methods (zero-shot CLIP, Tip-Adapter, DualAdapter) have no checkpoint: their classifiers
and caches are rebuilt from the config, as the run built them (the data must still be where the run read it).

Every fit is read back first (`trained.restore_fit`): a damaged newest checkpoint is one line that says to retrain
from the newest good step, never a silent evaluation of an older, unfinished one.

Data moved since training, or other hardware: `--config.KEY=VALUE` overrides of the keys that do not change what
was trained (`runtime.workdir.RESUME_EXEMPT`: `--config.data.root=/new/place`, `--config.mesh.data=8`,
`--config.data.eval_batch_size=64`, ...); any other key is one `error:` line. Several processes: the same
`--distributed` / `--coordinator_address` / `--num_processes` / `--process_id` flags as `vlm-jax train`; all
processes evaluate, process 0 writes.

Writes eval_results.json and eval_results.md into the workdir (the run's results.json is left as it is), or
results.json / results.md into --out; prints the table.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from absl import flags

from vlm_jax import errors
from vlm_jax.programs import commands

_WORKDIR = commands.shared_flag(__name__, flags.DEFINE_string, "workdir", None,
                                "The workdir of a run (`vlm-jax train --workdir`).")
_OUT = commands.shared_flag(__name__, flags.DEFINE_string, "out", None,
                            "Directory for results.json / results.md (default: eval_results.json / "
                            ".md in the workdir).")
flags.mark_flags_as_required(["workdir"])
_DISTRIBUTED = commands.distributed_flags()   # the same multi-process flags as vlm-jax train

OUTPUTS = ("results.json", "results.md", "accuracy_vs_shots.png")   # what a program may write as its results


def evaluate(workdir: str, out: str | None = None, overrides: Sequence[str] = ()) -> dict[str, str]:
    """Reruns the evaluation of `workdir` without training; returns {output name: path written} (empty on a
    process other than 0 of a multi-process job: they compute, process 0 writes).

    Args:
      workdir: the run's workdir.
      out: the directory for the results (default: eval_results.* in the workdir).
      overrides: `--config.KEY=VALUE` arguments (`trained.with_overrides`).

    Raises:
      UserError: not a workdir, another version's config, an override of a trained key, a damaged, unfinished or
        missing training (one line).
    """
    from vlm_jax.programs import trained

    run = trained.read_run(workdir)   # before anything imports jax: a bad --workdir is one quick line
    run = trained.with_overrides(run, overrides)
    for name in trained.fit_names(run.workdir):   # the newest step of each, or one line (see the module)
        trained.restore_fit(run.workdir, name)
    from vlm_jax.train import trainer

    program = trained.program_module(run)
    with (trained.scratch_workdir(run, run.config if overrides else None) as tmp, trainer.restore_only(),
          trained.version_errors(run)):
        program.run(run.config, tmp)
        return _copy_results(tmp, run.workdir, out) if commands.is_writer() else {}


def _copy_results(tmp: str, workdir: str, out: str | None) -> dict[str, str]:
    written = {}
    try:
        if out is not None:
            os.makedirs(out, exist_ok=True)
        for name in OUTPUTS:
            if os.path.exists(os.path.join(tmp, name)):
                dest = os.path.join(out, name) if out is not None else os.path.join(workdir, "eval_" + name)
                shutil.copyfile(os.path.join(tmp, name), dest)
                written[name] = dest
    except OSError as e:
        raise errors.UserError(f"{out or workdir} cannot be written ({e.strerror or e}): pass another --out") from None
    return written


def _main(argv: list[str], overrides: list[str]) -> None:
    def body():
        if len(argv) > 1:
            raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])} (vlm-jax eval takes flags only)")
        commands.initialize_distributed()
        out = None if _OUT.value is None else os.path.abspath(os.path.expanduser(_OUT.value))
        for name, path in evaluate(_WORKDIR.value, out, overrides).items():
            print(f"wrote {path}")
    commands.run_user_command(body, _OUT.value or _WORKDIR.value)


def main(argv: list[str]) -> None:
    """Runs the command line `argv` (argv[0]: the program name)."""
    commands.run_absl(_main, argv, __doc__, config_overrides=True)
