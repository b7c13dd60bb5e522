"""Helpers for `configs/*.py`: big_vision-style argument strings (`configs/x.py:dataset=eurosat,shots=4`)."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses 'a=1,b=foo,flag' against `defaults`; a bare name sets a boolean to True.

    Values are converted to the type of their default, so `shots=4` is an int. An unknown name is an error
    that lists the known ones.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        name, eq, value = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ValueError(f"unknown config argument {name!r}; known: {', '.join(sorted(defaults))}")
        default = defaults[name]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {name!r} needs a value ({name}=...)")
            out[name] = True
        elif isinstance(default, bool):
            out[name] = value.lower() in ("1", "true", "yes", "y")
        elif isinstance(default, (int, float)):
            out[name] = type(default)(ast.literal_eval(value))
        else:
            out[name] = value
    return out


def check_ranges(config: ml_collections.ConfigDict, minimums: dict[str, float],
                 choices: dict[str, tuple] | None = None) -> None:
    """Refuses config values out of range before a program does any work: one UserError line naming the key.

    Args:
      config: the resolved config.
      minimums: dotted key -> smallest allowed value (inclusive).
      choices: dotted key -> allowed values.
    """
    from vlm_jax.errors import UserError

    def get(key):
        node = config
        for part in key.split("."):
            node = node[part]
        return node

    for key, low in minimums.items():
        value = get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
            raise UserError(f"--config.{key}={value!r} is out of range: it must be a number >= {low}")
    for key, allowed in (choices or {}).items():
        value = get(key)
        if value not in allowed:
            raise UserError(f"--config.{key}={value!r} is not one of {', '.join(map(repr, allowed))}")


# Keys and config files that were renamed (one word for one thing across the configs): the old name is refused
# in one line that names the new one, before absl's generic "unknown key".
RENAMED_KEYS = {
    "method.microbatches": "train.grad_cache_chunks",
    "method.chat_template": "model.chat_template",
    "data.chat_template": "model.chat_template",
    "data.batch_size": "data.eval_batch_size",
}
RENAMED_CONFIGS = {"configs/discriminative.py": "configs/vladva.py"}


def renamed_flag(argv) -> str | None:
    """The one-line message for the first command-line flag that uses a renamed key or config file, else None."""
    for arg in argv:
        if arg.startswith("--config="):
            path = arg[len("--config="):].split(":", 1)[0]
            for old, new in RENAMED_CONFIGS.items():
                if path == old or path.endswith("/" + old):
                    return f"{old} was renamed to {new}: use --config={new}{arg[len('--config=') + len(path):]}"
        elif arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if key in RENAMED_KEYS:
                return f"--config.{key} was renamed to --config.{RENAMED_KEYS[key]}"
    return None

