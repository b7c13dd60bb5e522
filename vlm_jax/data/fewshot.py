"""Few-shot classification data: CoOp dataset loaders, CuPL prompts, k-shot sampling, padded batches.

`load_dataset(name, root)` reads the 11 CoOp datasets (and the ImageNet domain-generalisation test sets)
from the folder layout of CoOp's DATASETS.md, applies CoOp's class-name fixes and attaches the prompt
templates of Tip-Adapter / DualAdapter. It returns a `FewShotDataset` of `Example`s (paths, labels, class
names); nothing is decoded until `batches` runs a transform over them in a small thread pool.

Split choices (documented because they change numbers):
- CoOp datasets: train / val / test exactly as in `split_zhou_*.json` (FGVC: `images_variant_*.txt`).
  The val split is the full CoOp val split (DualAdapter searches its hyper-parameters on it); CoOp's own
  trainer additionally subsamples val to min(shots, 4) per class, which we leave to the caller.
- ImageNet has no val split in CoOp: like CoOp, Tip-Adapter and DualAdapter we use the official
  validation set as test *and* as val (`val is test`). Hyper-parameters searched on it are therefore
  tuned on the test set, as in those papers.
- ImageNet-V2 / -Sketch / -A / -R are test only (`train == val == []`). Their labels live in ImageNet's
  1000-class space and `classnames` are all 1000 ImageNet names, so ImageNet classifiers apply unchanged.
  ImageNet-A and -R contain 200 classes: `class_subset` lists them (sorted ImageNet indices) and an
  evaluator scores `logits[:, class_subset]`, mapping the argmax back with `class_subset[argmax]`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import numpy as np

from vlm_jax.data import datasets_meta as meta
from vlm_jax.data.preprocess import load_image


from vlm_jax.data.types import DatasetError, Example, FewShotDataset, load_cupl  # noqa: F401 (re-exported)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _howto(name: str) -> str:
    section = meta.COOP_LAYOUTS[name].doc_section
    return f"prepare it as in CoOp's DATASETS.md, section '{section}' ({meta.COOP_DATA_DOC})"


def _require(path: str, what: str, name: str) -> str:
    if not os.path.exists(path):
        raise DatasetError(f"{name}: {what} not found: {path}; {_howto(name)}")
    return path


def _list_files(folder: str) -> list[str]:
    # Sorted (unlike CoOp's os.listdir order) so that sampling is reproducible across file systems.
    return sorted(f.name for f in os.scandir(folder) if f.is_file() and not f.name.startswith("."))


def _list_dirs(folder: str) -> list[str]:
    return sorted(f.name for f in os.scandir(folder) if f.is_dir() and not f.name.startswith("."))


def _check_first_image(name: str, splits: dict[str, list[Example]]) -> None:
    # Statting every file of a 100k-image split is slow; one per split catches a wrong image folder.
    for split, examples in splits.items():
        if examples and examples[0].path and not os.path.exists(examples[0].path):
            raise DatasetError(f"{name}: {split} split refers to a missing image: {examples[0].path}; "
                               f"{_howto(name)}")


def _classnames_from_labels(name: str, splits: dict[str, list[Example]]) -> list[str]:
    by_label: dict[int, str] = {}
    for examples in splits.values():
        for ex in examples:
            if by_label.setdefault(ex.label, ex.classname) != ex.classname:
                raise DatasetError(f"{name}: label {ex.label} has two class names, {by_label[ex.label]!r} and "
                                   f"{ex.classname!r}; the split file is inconsistent, {_howto(name)}")
    missing = sorted(set(range(len(by_label))) - set(by_label))
    if not by_label or missing or min(by_label) < 0:
        raise DatasetError(f"{name}: labels must be 0..C-1 (got {len(by_label)} labels, missing {missing[:5]}); "
                           f"{_howto(name)}")
    return [by_label[i] for i in range(len(by_label))]


def _read_split_json(name: str, dataset_dir: str) -> dict[str, list[Example]]:
    layout = meta.COOP_LAYOUTS[name]
    split_path = _require(os.path.join(dataset_dir, layout.split_file), "split file", name)
    image_dir = _require(os.path.join(dataset_dir, layout.image_dir), "image folder", name)
    try:
        with open(split_path) as f:
            raw = json.load(f)
        return {split: [Example(os.path.join(image_dir, p), int(y), meta.clean_classname(name, c))
                        for p, y, c in raw[split]] for split in ("train", "val", "test")}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{name}: cannot parse split file {split_path} ({type(e).__name__}: {e}); "
                           f"it must map train/val/test to [impath, label, classname] lists; "
                           f"{_howto(name)}") from None


def _read_fgvc(name: str, dataset_dir: str) -> tuple[list[str], dict[str, list[Example]]]:
    image_dir = _require(os.path.join(dataset_dir, "images"), "image folder", name)
    with open(_require(os.path.join(dataset_dir, "variants.txt"), "class list", name)) as f:
        classnames = [line.strip() for line in f if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for split in ("train", "val", "test"):
        path = _require(os.path.join(dataset_dir, f"images_variant_{split}.txt"), "split file", name)
        examples = []
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                image_id, variant = line.strip().split(" ", 1)  # variants may contain spaces
                if variant not in label_of:
                    raise DatasetError(f"{name}: variant {variant!r} in {path} is not in variants.txt; "
                                       f"{_howto(name)}")
                examples.append(Example(os.path.join(image_dir, image_id + ".jpg"), label_of[variant], variant))
        splits[split] = examples
    return [meta.clean_classname(name, c) for c in classnames], splits


def _read_imagenet_classnames(path: str) -> dict[str, str]:
    """CoOp's classnames.txt: one 'wnid class name' per line, in label order."""
    names: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                wnid, _, classname = line.strip().partition(" ")
                names[wnid] = classname.strip()
    return names


def _read_class_folders(name: str, folder: str, label_of: dict[str, int], classnames: list[str]) -> list[Example]:
    examples = []
    for sub in _list_dirs(folder):
        if sub not in label_of:
            raise DatasetError(f"{name}: folder {os.path.join(folder, sub)} is not a class of classnames.txt; "
                               f"{_howto(name)}")
        y = label_of[sub]
        examples += [Example(os.path.join(folder, sub, f), y, classnames[y])
                     for f in _list_files(os.path.join(folder, sub))]
    return examples


def _load_imagenet_family(name: str, root: str) -> dict:
    layout = meta.COOP_LAYOUTS[name]
    dataset_dir = _require(os.path.join(root, layout.dataset_dir), "dataset folder", name)
    # CoOp copies imagenet/classnames.txt next to each variant; accept either place.
    candidates = [os.path.join(dataset_dir, "classnames.txt"), os.path.join(root, "imagenet", "classnames.txt")]
    names_path = next((p for p in candidates if os.path.exists(p)), None)
    if names_path is None:
        raise DatasetError(f"{name}: classnames.txt not found: {candidates[0]} (nor {candidates[1]}); "
                           f"{_howto(name)}")
    wnid_to_name = _read_imagenet_classnames(names_path)
    wnids = list(wnid_to_name)
    # Labels are positions in classnames.txt (sorted wnids), which equals CoOp's enumerate(sorted folders)
    # when all 1000 folders exist, and stays right when only some do.
    label_of = {w: i for i, w in enumerate(wnids)}
    classnames = [meta.clean_classname(name, wnid_to_name[w]) for w in wnids]
    image_dir = _require(os.path.join(dataset_dir, layout.image_dir), "image folder", name)
    out = dict(classnames=classnames, class_subset=None)
    if name == "imagenet":
        train_dir = _require(os.path.join(image_dir, "train"), "train folder", name)
        val_dir = _require(os.path.join(image_dir, "val"), "val folder (class sub-folders)", name)
        test = _read_class_folders(name, val_dir, label_of, classnames)
        out.update(train=_read_class_folders(name, train_dir, label_of, classnames), val=test, test=test)
        return out
    if name == "imagenetv2":
        # Folders are the labels themselves, '0'..'999'.
        test = []
        for sub in _list_dirs(image_dir):
            if not sub.isdigit() or int(sub) >= len(classnames):
                raise DatasetError(f"{name}: unexpected folder {os.path.join(image_dir, sub)} (expected 0..999); "
                                   f"{_howto(name)}")
            y = int(sub)
            test += [Example(os.path.join(image_dir, sub, f), y, classnames[y])
                     for f in _list_files(os.path.join(image_dir, sub))]
    else:
        test = _read_class_folders(name, image_dir, label_of, classnames)
    if not test:
        raise DatasetError(f"{name}: no images under {image_dir}; {_howto(name)}")
    if name in meta.SUBSET_DATASETS:
        out["class_subset"] = np.array(sorted({ex.label for ex in test}), np.int32)
    out.update(train=[], val=[], test=test)
    return out


def canonical_name(name: str) -> str:
    """Maps aliases and case variants ('fgvc', 'Food-101', 'ImageNet-R', ...) to the canonical dataset name.

    Raises:
      DatasetError: an unknown name (see `datasets_meta.canonical_name`).
    """
    return meta.canonical_name(name)


def load_dataset(name: str, root: str | os.PathLike | None, *, cupl_path: str | os.PathLike | None = None,
                 template_set: str = "dualadapter") -> FewShotDataset:
    """Loads a CoOp few-shot dataset from its CoOp folder layout under `root`.

    Args:
      name: one of `meta.COOP_LAYOUTS` (imagenet, caltech101, oxford_pets, stanford_cars, oxford_flowers,
        food101, fgvc_aircraft, sun397, dtd, eurosat, ucf101, imagenetv2, imagenet_sketch, imagenet_a,
        imagenet_r) or an alias; also 'skimage_photos' (the offline builtin set, `root` ignored) and
        'tfds:NAME' (a TFDS array_record dataset, `root` is its data_dir).
      root: the CoOp data root ($DATA in CoOp's DATASETS.md).
      cupl_path: optional CuPL json (class name -> sentences) for `cupl_prompts`, or the folder of them
        (DualAdapter's `gpt3_prompts/`), from which the dataset's file (`meta.CUPL_FILES`) is read.
      template_set: the set that fills `templates`: 'dualadapter' (DualAdapter's templates) or 'tip_adapter'
        (one per dataset, 7 for ImageNet); `template_sets` holds both either way.

    Returns:
      The `FewShotDataset` with full train / val / test splits.

    Raises:
      DatasetError: one line naming the missing folder or file and pointing at CoOp's DATASETS.md.
    """
    if name.startswith("tfds:"):
        from vlm_jax.data.tfds_source import tfds_dataset  # local: keeps tfds off the CoOp path.
        return tfds_dataset(name[len("tfds:"):], None if root is None else os.fspath(root), cupl_path=cupl_path)
    key = canonical_name(name)
    if template_set not in meta.TEMPLATE_SETS:
        raise ValueError(f"template_set must be one of {list(meta.TEMPLATE_SETS)}, got {template_set!r}")
    if key == "skimage_photos":
        from vlm_jax.data.builtin import builtin_dataset
        ds = builtin_dataset(key)
        ds = dataclasses.replace(ds, templates=ds.templates_of(template_set))
        return ds if cupl_path is None else dataclasses.replace(
            ds, cupl_prompts=load_cupl(cupl_path, ds.classnames, dataset=key))
    if root is None:
        raise DatasetError(f"{key}: no data root given; {_howto(key)}")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise DatasetError(f"{key}: data root not found: {root}; {_howto(key)}")
    class_subset = None
    if key in meta.IMAGENET_FAMILY:
        parts = _load_imagenet_family(key, root)
        classnames, class_subset = parts["classnames"], parts["class_subset"]
        splits = {s: parts[s] for s in ("train", "val", "test")}
    else:
        dataset_dir = _require(os.path.join(root, meta.COOP_LAYOUTS[key].dataset_dir), "dataset folder", key)
        if key == "fgvc_aircraft":
            classnames, splits = _read_fgvc(key, dataset_dir)
        else:
            splits = _read_split_json(key, dataset_dir)
            classnames = _classnames_from_labels(key, splits)
    _check_first_image(key, splits)
    return FewShotDataset(
        name=key, classnames=classnames, templates=list(meta.TEMPLATE_SETS[template_set][key]),
        train=splits["train"], val=splits["val"], test=splits["test"],
        cupl_prompts=None if cupl_path is None else load_cupl(cupl_path, classnames, dataset=key),
        class_subset=class_subset, negative_templates=list(meta.NEGATIVE_TEMPLATES[key]),
        template_sets={k: list(v[key]) for k, v in meta.TEMPLATE_SETS.items()})


# ---------------------------------------------------------------------------------------------------------
# Sampling and batching


def _labels_of(examples: Sequence[Example]) -> np.ndarray:
    # Lazy sequences (TFDS) expose `.labels` so that sampling does not decode every image.
    labels = getattr(examples, "labels", None)
    return np.asarray(labels if labels is not None else [ex.label for ex in examples], np.int64)


def sample_few_shot(examples: Sequence[Example], shots: int, seed: int = 1) -> list[Example]:
    """Draws `shots` examples per class without replacement, as CoOp / DualAdapter do.

    The draw reproduces CoOp's `generate_fewshot_dataset` after `random.seed(seed)`: classes are visited in
    order of first appearance in `examples` and each draws `random.sample(items, shots)` from a
    `random.Random(seed)`; with the same example order (the split file's) the selected images are the
    ones of the reference code (DualAdapter uses seed 1). The result is then sorted by (label, draw order).

    Args:
      examples: the full train split.
      shots: images per class (>= 1).
      seed: the seed of the draw.

    Returns:
      num_classes * shots examples, sorted by label.

    Raises:
      DatasetError: a class has fewer than `shots` examples (names it, with counts).
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    labels = _labels_of(examples)
    by_label: dict[int, list[int]] = collections.defaultdict(list)
    for i, y in enumerate(labels.tolist()):
        by_label[y].append(i)
    short = {y: len(idx) for y, idx in by_label.items() if len(idx) < shots}
    if short:
        y = min(short, key=lambda k: (short[k], k))
        classname = examples[by_label[y][0]].classname
        raise DatasetError(f"class {classname!r} (label {y}) has only {short[y]} images but shots={shots} "
                           f"({len(short)} of {len(by_label)} classes have fewer than {shots}); "
                           f"use shots <= {short[y]}")
    rng = random.Random(seed)
    chosen = {y: rng.sample(idx, shots) for y, idx in by_label.items()}
    return [examples[i] for y in sorted(chosen) for i in chosen[y]]


def shot_folds(labels: Sequence[int] | np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k-fold cross-validation over a K-shot support set, splitting the shots of every class.

    Shot s of a class (its s-th example in `labels` order) is held out in fold s % folds, so every fold keeps
    K - |held out| shots of *every* class (caches stay balanced, as `dualadapter.build_caches` needs) and
    every example is held out exactly once.

    Args:
      labels: i[N] labels of the support set (K shots per class, any order).
      folds: number of folds, 2 <= folds <= K.

    Returns:
      One (train indices i64[N_train], held-out indices i64[N_held]) pair per fold, indices into `labels`.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    shots = int(counts[counts > 0].min()) if labels.size else 0
    if not 2 <= folds <= shots:
        raise ValueError(f"folds must be in [2, shots={shots}], got {folds}")
    rank = np.zeros(labels.shape[0], np.int64)  # position of each example among its class's examples
    seen: dict[int, int] = collections.defaultdict(int)
    for i, y in enumerate(labels.tolist()):
        rank[i], seen[y] = seen[y], seen[y] + 1
    fold_of = rank % folds
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(folds)]


Transform = Callable[..., np.ndarray]


def _load_one(examples: Sequence[Example], index: int, transform: Transform, seed: int | None):
    ex = examples[index]  # indexing may decode (lazy TFDS sequences): do it in the worker.
    image = load_image(ex.array if ex.array is not None else ex.path)
    if seed is None:
        return transform(image), ex.label
    # One generator per (seed, example index): the output does not depend on thread scheduling.
    return transform(image, np.random.default_rng([seed, index])), ex.label


def batches(examples: Sequence[Example], batch_size: int, transform: Transform, *,
            drop_remainder: bool = False, num_workers: int | None = None,
            seed: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decodes and transforms examples into fixed-shape batches, in order.

    A thread pool (PIL decoding and resizing release the GIL) prepares the next batch while the caller
    uses the current one. The last batch is padded to `batch_size` with zero images, label 0 and
    valid=False, so a jitted step sees a single shape; metrics must use the `valid` mask.

    Args:
      examples: what to load (paths or in-memory arrays).
      batch_size: B.
      transform: `transform(pil_image) -> f32[H, W, 3]`, e.g. `functools.partial(clip_preprocess, size=224)`;
        with `seed` set it is called as `transform(pil_image, rng)`, e.g. `augment`.
      drop_remainder: drop the last partial batch instead of padding it.
      num_workers: decoding threads (default min(8, cpu count)).
      seed: when set, example i gets the generator `np.random.default_rng([seed, i])`; use a new seed
        per augmentation pass (e.g. seed * 1000 + epoch).

    Yields:
      (images f32[B, H, W, 3], labels i32[B], valid bool[B]).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(examples)
    stop = n - n % batch_size if drop_remainder else n
    starts = list(range(0, stop, batch_size))
    if not starts:
        return
    workers = num_workers or min(8, os.cpu_count() or 1)
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm_jax_batches")

    def submit(start: int) -> list[futures.Future]:
        return [pool.submit(_load_one, examples, i, transform, seed) for i in range(start, min(start + batch_size, n))]

    try:
        pending = submit(starts[0])
        for k in range(len(starts)):
            upcoming = submit(starts[k + 1]) if k + 1 < len(starts) else []
            results = [f.result() for f in pending]
            first = np.asarray(results[0][0], np.float32)
            images = np.zeros((batch_size,) + first.shape, np.float32)
            labels = np.zeros((batch_size,), np.int32)
            valid = np.zeros((batch_size,), bool)
            for j, (image, label) in enumerate(results):
                images[j], labels[j], valid[j] = image, label, True
            yield images, labels, valid
            pending = upcoming
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
