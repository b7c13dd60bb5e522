"""The data types every data source returns, in a module of their own so sources and loaders import
them without importing each other: `Example`, `FewShotDataset`, `DatasetError`, and CuPL's class
descriptions (`load_cupl`), which every source attaches the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from vlm_jax.data import datasets_meta as meta
from vlm_jax.data.preprocess import load_image

# Defined beside the name table (which raises it too); re-exported here, where the loaders raise it.
DatasetError = meta.DatasetError


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled image: a file `path`, or an in-memory `array` u8[H, W, 3] (then `path` may be None)."""
    path: str | None
    label: int
    classname: str
    array: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def image(self):
        """The image as a PIL RGB image (decoded now)."""
        return load_image(self.array if self.array is not None else self.path)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields make == ambiguous.
class FewShotDataset:
    """A classification dataset with its prompts.

    Attributes:
      name: canonical dataset name ('eurosat', 'imagenet_a', ...).
      classnames: text-ready class names; label i is `classnames[i]`.
      templates: positive prompt templates with one '{}' for the class name.
      train, val, test: the splits (full train split; sample it with `sample_few_shot`).
      cupl_prompts: per class, CuPL sentences (None when no CuPL file was given).
      class_subset: i32[S] sorted labels the test set covers, for ImageNet-A/-R (None: all classes).
        Labels stay in the full label space; evaluate on `logits[:, class_subset]`.
      negative_templates: DualAdapter's negative templates ('a photo without {}.').
      template_sets: set name ('dualadapter', 'tip_adapter': `meta.TEMPLATE_SETS`) -> that paper's positive
        templates for this dataset; None: the dataset has one list (`templates`) for every method (TFDS).
    """
    name: str
    classnames: list[str]
    templates: list[str]
    train: Sequence[Example]
    val: Sequence[Example]
    test: Sequence[Example]
    cupl_prompts: list[list[str]] | None = None
    class_subset: np.ndarray | None = None
    negative_templates: list[str] = dataclasses.field(default_factory=lambda: list(meta.DEFAULT_NEGATIVE_TEMPLATES))
    template_sets: dict[str, list[str]] | None = None

    def templates_of(self, template_set: str) -> list[str]:
        """The positive templates of `template_set` ('dualadapter' or 'tip_adapter') for this dataset.

        Raises:
          DatasetError: an unknown set name, or a set this dataset does not define.
        """
        if template_set not in meta.TEMPLATE_SETS:
            raise DatasetError(f"unknown template set {template_set!r}; known: {', '.join(meta.TEMPLATE_SETS)}")
        if self.template_sets is None:
            return list(self.templates)
        if template_set not in self.template_sets:
            raise DatasetError(f"{self.name} has no {template_set!r} templates; it has: "
                               f"{', '.join(self.template_sets)}")
        return list(self.template_sets[template_set])

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def _norm_key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def load_cupl(path: str | os.PathLike, classnames: Sequence[str], dataset: str | None = None) -> list[list[str]]:
    """Reads CuPL's GPT-3 descriptions (a json: class name -> list of sentences) in label order.

    Names match case-insensitively, with '_' and ' ' (and repeated spaces) treated alike, so CuPL's keys
    ('Annual Crop Land', 'american_bulldog') meet our cleaned names.

    Args:
      path: the CuPL json (e.g. DualAdapter's gpt3_prompts/CuPL_prompts_<dataset>.json), or a folder holding
        the official files (DualAdapter's `gpt3_prompts/`): then `dataset`'s file is read (`meta.CUPL_FILES`).
      classnames: the dataset's class names, label order.
      dataset: canonical dataset name; needed when `path` is a folder.

    Returns:
      One non-empty list of sentences per class.

    Raises:
      DatasetError: the file is missing or malformed, or a class has no (or empty) entry.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if dataset not in meta.CUPL_FILES:
            raise DatasetError(f"CuPL path {path} is a folder, but {dataset or 'this dataset'} has no official CuPL "
                               f"file name (known for {', '.join(sorted(set(meta.CUPL_FILES)))}); pass the json")
        folder, path = path, os.path.join(path, meta.CUPL_FILES[dataset])
        if not os.path.exists(path):
            raise DatasetError(f"CuPL folder {folder} has no {meta.CUPL_FILES[dataset]} (the file of {dataset}); "
                               f"use DualAdapter's gpt3_prompts/ folder or pass the json itself")
    if not os.path.exists(path):
        raise DatasetError(f"CuPL prompt file not found: {path}; pass the CuPL json of this dataset "
                           f"(DualAdapter ships them as gpt3_prompts/CuPL_prompts_<dataset>.json)")
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise TypeError("top level is not an object")
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise DatasetError(f"CuPL prompt file {path} is not a json object of class name -> sentences ({e})") from None
    table = {_norm_key(k): v for k, v in raw.items()}
    prompts = []
    for name in classnames:
        sentences = table.get(_norm_key(name))
        if not sentences or not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise DatasetError(f"CuPL prompt file {path} has no sentences for class {name!r} "
                               f"({len(raw)} entries); use the CuPL file that matches this dataset")
        prompts.append(list(sentences))
    return prompts
