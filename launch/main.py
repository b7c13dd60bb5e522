"""The one entry point: `python launch/main.py --config=configs/<method>.py[:args] --workdir=DIR`.

Dotted overrides work for every key: `--config.model.checkpoint=/ckpt/clip --config.data.root=/data/coop`.
The config's `program` names the module in `vlm_jax.programs` that runs it. Errors that a user can fix (a
missing checkpoint, data root, split file, an unknown config key) end the run with one line and exit code 2.
"""

import importlib
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:args]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the resolved config, metrics, checkpoints, results.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries(record) -> bool:
    # orbax logs every step of every save at INFO; keep its warnings, drop the chatter.
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_quiet_libraries)
    from vlm_jax import errors  # after flag parsing: keeps --help fast

    config = _CONFIG.value
    if config.get("distributed", False):
        import jax
        jax.distributed.initialize()
    program = importlib.import_module(f"vlm_jax.programs.{config.program}")
    try:
        program.run(config, os.path.abspath(os.path.expanduser(_WORKDIR.value)))
    except errors.UserError as e:
        logging.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
