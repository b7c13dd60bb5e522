"""Argument parsing for the small subcommands (`vlm-jax export`, `vlm-jax plan`): argparse whose every error is
one `error: ...` line with exit status 2, like the launcher's."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vlm_jax.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser that raises UserError instead of printing the usage and exiting."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def run(body: Callable[[Sequence[str]], None], argv: Sequence[str] | None) -> None:
    """Runs `body(argv[1:])` for a subcommand's `main(argv)` (argv[0]: the program name, as absl passes it; the
    `vlm-jax` console script passes 'vlm-jax <command>'); a UserError becomes one `error:` line on stderr and exit
    status 2."""
    argv = list(sys.argv if argv is None else argv)
    try:
        body(argv[1:])
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
