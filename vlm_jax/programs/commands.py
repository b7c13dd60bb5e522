"""What the entry points of the `vlm-jax` subcommands (`vlm_jax/cli.py`) share: the absl flag parser that reports
a bad flag in one line, the filter for orbax's INFO chatter, `--help` with the subcommand's own doc and flags, user
errors as one `error:` line with exit code 2, the multi-process flags (`--distributed`, `--coordinator_address`,
...) of train, eval and predict, and the `--config.KEY=VALUE` overrides eval and predict accept.
"""

from __future__ import annotations

import functools
import logging as std_logging
import sys
import types
from collections.abc import Callable, Sequence


def one_line(e: BaseException) -> str:
    """An exception message as one line; for a wrapped traceback, just its last line (the error itself)."""
    lines = [l.strip() for l in str(e).replace("\\n", "\n").splitlines() if l.strip()]
    if any(l.startswith("Traceback") for l in lines):
        lines = lines[-1:]
    return " ".join(l.replace("\\'", "'").strip("'\"") for l in lines)


def flag_error(e: BaseException) -> str:
    """The one line for an error absl or ml_collections' config_flags raised while parsing flags."""
    from absl import flags

    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    # absl wraps the config's own error; the first non-absl one says what is wrong.
    inner = next((c for c in chain if not isinstance(c, flags.Error)), e)
    what = "unknown config key" if isinstance(inner, (AttributeError, KeyError)) else "bad flag"
    return f"{what}: {one_line(inner)}"


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
        print(f"error: {flag_error(e)}", file=sys.stderr)
        sys.exit(2)


def quiet_libraries(record) -> bool:
    """absl log filter: orbax logs every step of every save at INFO; keep its warnings, drop the chatter."""
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def run_absl(fn: Callable[..., None], argv: list[str], doc: str | None, config_overrides: bool = False) -> None:
    """`absl.app.run(fn)` on `argv` with `parse_flags`; --help prints `doc` (the subcommand module's docstring)
    and the flags that module defines (absl's own --help shows the __main__ module's: the console script's), with
    the shared multi-process flags when it uses them.

    config_overrides: the `--config.KEY=VALUE` arguments are taken out of `argv` before absl parses it and
      passed on: `fn(argv, overrides)` (eval and predict, which have no --config flag; see `split_config_overrides`).
    """
    from absl import app, flags

    if any(a in ("-h", "--help", "-?") for a in argv[1:]):
        shared = flags.FLAGS.module_help(__name__) if _DISTRIBUTED is not None else ""
        print(f"{doc or ''}\n\nflags:\n{flags.FLAGS.module_help(fn.__module__)}\n{shared}".rstrip())
        sys.exit(0)
    main = fn
    if config_overrides:
        argv, overrides = split_config_overrides(argv)
        main = functools.partial(fn, overrides=overrides)
    app.run(main, argv=argv, flags_parser=parse_flags)


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without the `--config.KEY=VALUE` arguments, those arguments), in their order."""
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    return [argv[0], *(a for a in argv[1:] if not a.startswith("--config."))], overrides


# ----------------------------------------------------------------------------------------------------------
# Several processes: the flags train, eval and predict share.

_DISTRIBUTED: types.SimpleNamespace | None = None


def shared_flag(module: str, define, name: str, *args, **kwargs):
    """The holder of flag `name` on absl's FLAGS, defined with `define(name, *args, **kwargs)` unless another
    subcommand module already defined it (--workdir, --out: the modules may be imported into one process, e.g.
    a test's, where a second definition is absl's DuplicateFlagError); either way listed in `module`'s --help."""
    from absl import flags

    if name not in flags.FLAGS:
        return define(name, *args, **kwargs)
    flag = flags.FLAGS[name]
    flags.FLAGS.register_flag_by_module(module, flag)
    return flags.FlagHolder(flags.FLAGS, flag)


def distributed_flags() -> types.SimpleNamespace:
    """The multi-process flags, defined once on absl's FLAGS by whichever subcommand module asks first (this
    module is where they live: the subcommands, which may be imported together, share one definition).

    Returns:
      The flag holders: .mode (--distributed), .coordinator_address, .num_processes, .process_id.
    """
    global _DISTRIBUTED
    if _DISTRIBUTED is None:
        from absl import flags

        _DISTRIBUTED = types.SimpleNamespace(
            mode=flags.DEFINE_enum(
                "distributed", "auto", ["auto", "on", "off"],
                "jax.distributed.initialize() first: auto = when the environment shows a multi-process job "
                "(SLURM_NTASKS>1, Open MPI, a TPU pod slice, JAX_COORDINATOR_ADDRESS) or the flags below are given; "
                "on = always (JAX auto-detects the cluster); off = never (one process)."),
            coordinator_address=flags.DEFINE_string(
                "coordinator_address", None,
                "host:port of process 0's coordinator (same on every process); default: detected."),
            num_processes=flags.DEFINE_integer("num_processes", None, "Number of processes; default: detected.",
                                               lower_bound=1),
            process_id=flags.DEFINE_integer(
                "process_id", None, "This process's id in [0, num_processes); default: detected.", lower_bound=0))
    return _DISTRIBUTED


def initialize_distributed() -> bool:
    """`runtime.distributed.initialize` with the values of `distributed_flags` (call it before anything touches a
    JAX backend); returns whether this is one of several processes.

    Raises:
      UserError: contradicting flags, or jax's own check of the detected or given values.
    """
    from vlm_jax import errors
    from vlm_jax.runtime import distributed

    f = distributed_flags()
    try:
        return distributed.initialize(f.mode.value, coordinator_address=f.coordinator_address.value,
                                      num_processes=f.num_processes.value, process_id=f.process_id.value)
    except ValueError as e:
        raise errors.UserError(one_line(e)) from None


def is_writer() -> bool:
    """Whether this process writes the command's outputs: process 0 of a multi-process job (all compute alike)."""
    import jax

    return jax.process_index() == 0


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
