"""`vlm-jax train --config=configs/<method>.py[:args] --workdir=DIR` (from a checkout: `python launch/main.py ...`).

Dotted overrides work for every key: `--config.model.checkpoint=/ckpt/clip --config.data.root=/data/coop`.
The config's `program` names the module in `vlm_jax.programs` that runs it. Errors that a user can fix (a
missing checkpoint, data root, split file, an unknown config key) end the run with one line and exit code 2.
SIGTERM during training saves a checkpoint and exits with 143; the same command resumes.

Failures to write the workdir or the feature cache (a full disk, a read-only or foreign directory) are one
`error:` line with exit code 2 as well; so is a workdir that holds checkpoints of a different config (see
`--config.train.resume`).

Multi-host: the same command runs on every host (launch/tpu_pod.sh, launch/slurm.sbatch), and
`jax.distributed.initialize()` runs first when the environment shows a multi-process job (`--distributed=auto`:
SLURM with several tasks, Open MPI, a TPU pod slice, JAX_COORDINATOR_ADDRESS). For a plain or custom cluster,
e.g. two processes on one machine:
  python launch/main.py ... --coordinator_address=localhost:12345 --num_processes=2 --process_id=0   # and =1
Every process first checks that it sees the same workdir (one `error:` line on every process otherwise);
SIGTERM stops the job in any phase (exit 143); a process that dies makes the others stop with a line naming it.
"""

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vlm_jax.programs import commands

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:args]", lock_config=True)
_WORKDIR = commands.shared_flag(__name__, flags.DEFINE_string, "workdir", None,
                                "Directory for the resolved config, metrics, checkpoints, results.")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = commands.distributed_flags()   # --distributed, --coordinator_address, ...: shared with eval, predict


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(commands.quiet_libraries)
    # Before anything touches a JAX backend (loading the config does not).
    from vlm_jax import errors
    from vlm_jax.runtime import distributed  # after flag parsing: keeps --help fast
    try:
        multiprocess = commands.initialize_distributed()
    except errors.UserError as e:  # contradicting flags, or jax's own check of the detected/given values
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    if multiprocess:
        import jax
        distributed.watch_preemption()
        if jax.process_index() == 0:
            logging.info("multi-host: %s", distributed.describe())
        try:
            distributed.check_shared_workdir(workdir)
        except errors.UserError as e:   # raised on every process alike: they all exit together
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    try:
        config = _CONFIG.value
        config.keys()  # forces the load
    except OSError as e:  # config_flags reports a missing/broken config file only on first access
        print(f"error: {commands.one_line(e)}", file=sys.stderr)
        sys.exit(2)
    program = importlib.import_module(f"vlm_jax.programs.{config.program}")
    from vlm_jax.runtime import workdir as workdir_lib
    from vlm_jax.train import trainer
    try:
        program.run(config, workdir)
    except errors.UserError as e:
        logging.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except trainer.Preempted as e:
        # SIGTERM (a scheduler's preemption notice): the state is saved. 143 = 128 + SIGTERM, the status a
        # killed job has, so schedulers that requeue preempted jobs (SLURM --requeue, k8s) treat it as one.
        logging.flush()
        print(str(e), file=sys.stderr)
        sys.exit(143)
    except Exception as e:  # noqa: BLE001 - storage failures anywhere (metrics, results, TensorBoard) are one line
        message = workdir_lib.write_failure(e, "the workdir", "--workdir", under=workdir)
        if message is not None:
            logging.flush()
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        if multiprocess:
            distributed.report_lost_peers(e)   # exits when a peer is gone; returns for an ordinary failure
        raise


def main(argv: list[str]) -> None:
    """Runs the command line `argv` (argv[0]: the program name); exits with the codes above."""
    commands.run_absl(_main, argv, __doc__)
