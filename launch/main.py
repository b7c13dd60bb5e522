"""The one entry point from a checkout: `python launch/main.py --config=configs/<method>.py[:args] --workdir=DIR`.

The same as `vlm-jax train ...` (the installed console script, `vlm_jax/cli.py`); the flags, the one-line errors
and the exit codes are documented in `vlm_jax/programs/train.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from vlm_jax.programs import train  # noqa: E402  (after the path)

if __name__ == "__main__":
    train.main(sys.argv)
