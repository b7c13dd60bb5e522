"""What the entry points of the `vlm-jax` subcommands (`vlm_jax/cli.py`) share: the absl flag parser that reports
a bad flag in one line, the filter for orbax's INFO chatter, `--help` with the subcommand's own doc and flags, and
user errors as one `error:` line with exit code 2.
"""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Callable


def one_line(e: BaseException) -> str:
    """An exception message as one line; for a wrapped traceback, just its last line (the error itself)."""
    lines = [l.strip() for l in str(e).replace("\\n", "\n").splitlines() if l.strip()]
    if any(l.startswith("Traceback") for l in lines):
        lines = lines[-1:]
    return " ".join(l.replace("\\'", "'").strip("'\"") for l in lines)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a bad flag (unknown config key, bad argument string) reported as one line, exit 2."""
    from absl import flags

    from vlm_jax import config_utils

    renamed = config_utils.renamed_flag(argv[1:])
    if renamed:
        print(f"error: {renamed}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # config_flags raises AttributeError/KeyError/ValueError, absl flags.Error
        chain = [e]
        while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        # absl wraps the config's own error; the first non-absl one says what is wrong.
        inner = next((c for c in chain if not isinstance(c, flags.Error)), e)
        what = "unknown config key" if isinstance(inner, (AttributeError, KeyError)) else "bad flag"
        print(f"error: {what}: {one_line(inner)}", file=sys.stderr)
        sys.exit(2)


def quiet_libraries(record) -> bool:
    """absl log filter: orbax logs every step of every save at INFO; keep its warnings, drop the chatter."""
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def run_absl(fn: Callable[[list[str]], None], argv: list[str], doc: str | None) -> None:
    """`absl.app.run(fn)` on `argv` with `parse_flags`; --help prints `doc` (the subcommand module's docstring)
    and the flags that module defines (absl's own --help shows the __main__ module's: the console script's)."""
    from absl import app, flags

    if any(a in ("-h", "--help", "-?") for a in argv[1:]):
        print(f"{doc or ''}\n\nflags:\n{flags.FLAGS.module_help(fn.__module__)}")
        sys.exit(0)
    app.run(fn, argv=argv, flags_parser=parse_flags)


def run_user_command(fn: Callable[[], None], workdir: str | None = None) -> None:
    """Runs `fn`; a `UserError` or a failure to write storage is one `error:` line and exit code 2."""
    from absl import logging

    from vlm_jax import errors

    logging.get_absl_handler().addFilter(quiet_libraries)
    try:
        fn()
    except errors.UserError as e:
        logging.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - storage failures anywhere are one line
        from vlm_jax.runtime import workdir as workdir_lib   # imports jax: only when needed

        message = workdir_lib.write_failure(e, "the output", "--out", under=workdir)
        if message is None:
            raise
        logging.flush()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
