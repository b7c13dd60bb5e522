"""Few-shot CLIP methods as plugins: one face per method, found by the name it has everywhere.

A method's name is the same in the config (`config.methods`, its config block), in the module that registers it
and in the results (results.json, the tables of `eval.report`). Its face (`FewShotMethod`) says what it needs and
runs it under the two hyperparameter protocols of `programs/fewshot_clip` (the papers': choices on the val split;
the realistic one: choices on the K shots only) on the `Context` the program hands it. A face never opens a
file, builds a mesh or prints: what needs the backbone or the workdir (fine-tuning through the frozen CLIP,
features of augmented views) reaches it as a callable on the context.

Faces live in `vlm_jax/methods/fewshot/`, one module per method family (a module may register several related
methods, e.g. Tip-Adapter and Tip-Adapter-F). Every public module there is imported on the first lookup, so a
new method is a new module there (plus its config block and its tests), with no list to edit.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from vlm_jax import errors
from vlm_jax.eval import classification

# What a face may ask the runner for (`FewShotMethod.needs`).
NEEDS = frozenset({
    "cache",     # Context.caches: the K shots' augmented cache (Tip-Adapter's keys / values, DualAdapter's extras)
    "training",  # Context.finetune: the generic trainer with the frozen CLIP inside each step
    "views",     # Context.views: features of augmented views of the K shots
})


@dataclasses.dataclass(frozen=True)
class Context:
    """What a face gets for one (shots, seed) under one protocol.

    Attributes:
      config: the run's config (a face reads its own block, `FewShotMethod.config_block`).
      protocol: 'paper' or 'realistic'.
      shots, seed: the run; tag: '<shots>shot-seed<seed>', the stem of fit names.
      num_classes: C.
      text: the text classifiers f32[C, D] (`fewshot_methods.text_weights`): 'zeroshot', 'tip', 'template',
        'cupl' (None without CuPL), 'negative', 'positive'.
      few: the K-shot support set (the cache subset), sorted by label.
      cache: {'keys' f32[N, D], 'labels' i32[N]}: the augmented cache keys of `few`, same order.
      caches: `dualadapter.Caches` of `cache` (None unless a method needs 'cache').
      tests: name -> (features dict, class_subset or None): where the final classifier is scored ('test' first).
      finetune: (few, train config, **kw) -> trainer.FitResult: `fewshot_methods.finetune` on this run's backbone,
        seed, workdir, writer and rng (None unless a method needs 'training').
      views: n -> {'features' f32[n * N, D], 'labels' i32[n * N]}: n augmented views of each image of `few`,
        view-major (None unless a method needs 'views').
      train_few: (paper) DualAdapter-F's training examples; None under the realistic protocol.
      val: (paper) {'features', 'labels'} of the val split; None under the realistic protocol, which never reads it.
      support: (realistic) `few` through the evaluation transform, {'features', 'labels'}, same order.
      folds: (realistic) [(train index, held-out index)] over `few`; [] below realistic.min_shots and in paper.
    """

    config: Any
    protocol: str
    shots: int
    seed: int
    num_classes: int
    text: Mapping[str, Any]
    few: Sequence[Any]
    cache: Mapping[str, np.ndarray]
    caches: Any
    tests: Mapping[str, tuple[Mapping[str, np.ndarray], Any]]
    finetune: Callable[..., Any] | None = None
    views: Callable[[int], Mapping[str, np.ndarray]] | None = None
    train_few: Sequence[Any] | None = None
    val: Mapping[str, np.ndarray] | None = None
    support: Mapping[str, np.ndarray] | None = None
    folds: Sequence[tuple[np.ndarray, np.ndarray]] = ()

    @property
    def tag(self) -> str:
        return f"{self.shots}shot-seed{self.seed}"


class FewShotMethod(Protocol):
    """The face of one few-shot CLIP method.

    Attributes:
      name: the method's name in config.methods, in results.json and in the metrics.
      display_name: its row label in the report's tables.
      order: its row position in the tables (ascending; the papers' order, baselines first).
      config_block: the config block it reads (Tip-Adapter-F reads 'tip_adapter'); None: none.
      templates: the keys of config.templates whose classifiers it reads.
      needs: what the runner must put on the context, a subset of `NEEDS`.
    """

    name: str
    display_name: str
    order: int
    config_block: str | None
    templates: tuple[str, ...]
    needs: frozenset[str]

    def check(self, config: Any) -> None:
        """Raises a one-line `errors.UserError` for a bad value in the method's config block."""

    def run_paper(self, ctx: Context) -> dict[str, Any]:
        """The papers' protocol. Returns {'val_accuracy', 'test_accuracy', '<test>_accuracy', ...}."""

    def run_realistic(self, ctx: Context) -> dict[str, Any]:
        """The realistic protocol (never reads val). Returns {'test_accuracy', '<test>_accuracy', 'hparams', ...}."""


_REGISTRY: dict[str, FewShotMethod] = {}
_DISCOVERED = False
FACES_PACKAGE = "vlm_jax.methods.fewshot"


def register(method: FewShotMethod) -> FewShotMethod:
    """Adds `method` under `method.name` (a module of `FACES_PACKAGE` calls this at import)."""
    if method.name in _REGISTRY and type(_REGISTRY[method.name]) is not type(method):
        raise ValueError(f"few-shot method {method.name!r} is registered twice "
                         f"({type(_REGISTRY[method.name]).__module__} and {type(method).__module__})")
    if not set(method.needs) <= NEEDS:
        raise ValueError(f"few-shot method {method.name!r} needs {sorted(set(method.needs) - NEEDS)}; "
                         f"the runner provides {sorted(NEEDS)}")
    _REGISTRY[method.name] = method
    return method


def _discover() -> None:
    """Imports every public module of `FACES_PACKAGE` once: each registers its faces."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module(FACES_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{FACES_PACKAGE}.{info.name}")
    _DISCOVERED = True


def names() -> list[str]:
    """The registered method names in table order."""
    _discover()
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n))


def display_names() -> dict[str, str]:
    """name -> display name, in table order (`eval.report.METHOD_NAMES`)."""
    return {n: _REGISTRY[n].display_name for n in names()}


def get(name: str) -> FewShotMethod:
    """The face of `name`; an unknown name is one UserError line that lists the known ones."""
    _discover()
    if name not in _REGISTRY:
        raise errors.UserError(f"unknown few-shot method {name!r} in config.methods; known: {', '.join(names())}")
    return _REGISTRY[name]


def check(config: Any, methods: Sequence[str]) -> list[FewShotMethod]:
    """The faces of `methods`, each with its config block and templates checked (one UserError line each)."""
    faces = [get(m) for m in methods]
    for face in faces:
        if face.config_block is not None and face.config_block not in config:
            raise errors.UserError(f"few-shot method {face.name!r} needs the config block "
                                   f"config.{face.config_block} (see configs/dualadapter.py)")
        for key in face.templates:
            if key not in config.templates:
                raise errors.UserError(f"few-shot method {face.name!r} needs config.templates.{key}")
        face.check(config)
    return faces


# ----------------------------------------------------------------------------------------------------------
# Helpers the faces share.

def evaluate(res: dict[str, Any], logits_fn: Callable[..., Any], args: tuple, tests) -> None:
    """Adds '<name>_accuracy' (percent) for every test set to `res`: `logits_fn(features, *args)` scored.

    A set without 'labels' (the images of `vlm-jax predict`) adds its logits f32[N, C] as '<name>_logits' instead:
    the prediction is the evaluated classifier itself.
    """
    for name, (split, subset) in tests.items():
        logits = logits_fn(jnp.asarray(split["features"]), *args)
        if "labels" not in split:
            res[f"{name}_logits"] = np.asarray(logits)
            continue
        res[f"{name}_accuracy"] = float(classification.accuracy(logits, split["labels"], class_subset=subset))

