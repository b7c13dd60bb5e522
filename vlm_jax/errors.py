"""Errors a user can fix. The launcher prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what to do."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


class MissingExtra(UserError):
    """An optional dependency is not installed: the message names the pip extra that brings it."""


def import_extra(module: str, extra: str, purpose: str):
    """Imports `module` of an optional extra; one-line `MissingExtra` naming `pip install 'vlm_jax[extra]'` when
    it is not installed.

    Args:
      module: e.g. 'tensorflow_datasets'.
      extra: the pyproject extra that installs it, e.g. 'tfds'.
      purpose: what needs it, e.g. "TFDS datasets (data.name='tfds:...')".

    Returns:
      The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}, which the core install leaves out: "
                           f"pip install 'vlm_jax[{extra}]' (or pip install -e '.[{extra}]' in a checkout)") from None
