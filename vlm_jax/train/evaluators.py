"""Evaluators declared in the config, big_vision style:

    config.evals = {"val": {"type": "selection", "every_steps": 50}, "test": {"type": "test", "every_steps": 100}}

Each entry is one named evaluator of a `type` the program offers (a factory: options -> trainable params ->
{metric: float}); the trainer runs it every `every_steps` steps (0: only at the end) and once after the last
step, and writes its metrics as `<name>/<metric>`. Undeclared (the default `{}`), a program evaluates as it
always has (its per-epoch selection). An unknown type or key is one line.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from vlm_jax import errors

EvalFn = Callable[[Any], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A named evaluator, run every `every_steps` steps (0: never during training) and once after the last step.

    Attributes:
      name: the metrics' prefix in the MetricWriter (`<name>/<metric>`) and the key in `FitResult.evals`.
      fn: trainable params -> {metric: float}.
      every_steps: period in steps.
    """
    name: str
    fn: EvalFn
    every_steps: int = 0


def from_config(evals: Mapping[str, Any] | None, factories: Mapping[str, Callable[..., EvalFn]],
                key: str = "evals") -> list[Evaluator]:
    """The evaluators of `config.evals` built from the program's `factories` (type -> (**options) -> fn).

    Raises:
      UserError: one line for an unknown type, an option the type does not take, or a bad every_steps.
    """
    return [Evaluator(name, factories[kind](**options), every)
            for name, kind, every, options in check(evals, factories, key)]


def check(evals: Mapping[str, Any] | None, factories: Mapping[str, Callable[..., EvalFn]],
          key: str = "evals") -> list[tuple[str, str, int, dict[str, Any]]]:
    """[(name, type, every_steps, options)] of `config.evals`, checked against `factories` without calling them
    (a program checks its config before any work, and builds the evaluators once their inputs exist).

    Raises:
      UserError: as `from_config`.
    """
    out = []
    for name, spec in (evals or {}).items():
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in factories:
            raise errors.UserError(f"{key}.{name}.type={kind!r} is not an evaluator of this program: use one of "
                                   f"{', '.join(sorted(factories))}")
        every = spec.pop("every_steps", 0)
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise errors.UserError(f"{key}.{name}.every_steps={every!r}: use an integer >= 0 (0: only at the end)")
        takes = list(inspect.signature(factories[kind]).parameters)
        unknown = sorted(set(spec) - set(takes))
        if unknown:
            raise errors.UserError(f"{key}.{name}: unknown key {unknown[0]!r} for type {kind!r}; its keys: "
                                   f"{', '.join(['type', 'every_steps', *takes])}")
        out.append((str(name), kind, every, spec))
    return out
