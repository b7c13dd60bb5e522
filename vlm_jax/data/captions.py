"""Caption data for discriminative LVLM fine-tuning (VladVA, arXiv 2412.04378) and its evaluations.

Host-side readers only: they return image paths and strings; nothing is decoded here (use
`vlm_jax.data.preprocess.load_image` on the paths). Relative image paths are joined to an image root;
statting every file of a large split is slow, so only the first image of each reader's output is checked
(that catches a wrong root), and a missing one is a one-line `DatasetError` naming the path.

Formats:
- Training manifest (JSONL): one object per line, {"image": path, "short_caption": str, "long_caption": str},
  at least one caption per line (VladVA trains on short and long captions of the same image).
- Karpathy splits (dataset_flickr30k.json / dataset_coco.json): {"images": [{"filename", "filepath" (COCO
  only: 'val2014' ...), "split": 'train' | 'val' | 'test' | 'restval', "sentences": [{"raw": ...}]}]}.
  Test sets: Flickr30k 1,000 images, COCO 5,000 images, ~5 captions each.
- SugarCrepe: one JSON per category (replace_obj.json, ...): {"<id>": {"filename", "caption",
  "negative_caption"}}; images are COCO val2017.
- Winoground: examples.jsonl with id, image_0, image_1, caption_0, caption_1 (and tags); images are
  '<image_0>.png' in its images folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from vlm_jax.data.types import DatasetError

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class CaptionPair:
    """One training image with its captions (at least one is not None)."""
    image: str
    short_caption: str | None = None
    long_caption: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: an array field makes == ambiguous.
class RetrievalSet:
    """An image-text retrieval test set (Karpathy split).

    Attributes:
      image_paths: I image files.
      captions: T captions, grouped by image in image order.
      caption_to_image: i32[T] index into `image_paths` of each caption.
      image_to_captions: per image, the indices into `captions` of its captions.
    """
    image_paths: list[str]
    captions: list[str]
    caption_to_image: np.ndarray
    image_to_captions: list[list[int]]


class SugarCrepeItem(NamedTuple):
    """(image_path, positive caption, negative caption): unpacks as a 3-tuple."""
    image: str
    caption: str
    negative_caption: str


@dataclasses.dataclass(frozen=True)
class WinogroundItem:
    """One Winoground example: caption_j describes image_j, the two captions use the same words."""
    id: int | str
    image_0: str
    image_1: str
    caption_0: str
    caption_1: str
    tag: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _resolve(root: str | None, path: str) -> str:
    path = os.path.expanduser(path)
    return path if root is None or os.path.isabs(path) else os.path.join(root, path)


def _root(image_root: PathLike | None, what: str) -> str | None:
    if image_root is None:
        return None
    root = os.path.expanduser(os.fspath(image_root))
    if not os.path.isdir(root):
        raise DatasetError(f"{what}: image folder not found: {root}")
    return root


def _require_file(path: PathLike, what: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise DatasetError(f"{what} not found: {path}")
    return path


def _check_image(path: str, what: str, hint: str) -> None:
    if not os.path.exists(path):
        raise DatasetError(f"{what} refers to a missing image: {path}; {hint}")


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{what} {path} is not valid JSON ({e})") from None


def _jsonl(path: str, what: str) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line; a bad line is an error naming it."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: bad JSON in {what} ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{lineno}: {what} line must be a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _text(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    """obj[key] as a stripped non-empty string; absent / null / blank -> None (or an error if required)."""
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DatasetError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    value = value.strip() if value else None
    if required and not value:
        raise DatasetError(f"{where}: missing or empty '{key}'")
    return value or None


# ---------------------------------------------------------------------------------------------------------
# Readers


def read_manifest(path: PathLike, image_root: PathLike | None = None) -> list[CaptionPair]:
    """Reads a JSONL training manifest of images with a short and/or a long caption.

    Args:
      path: the manifest; one JSON object per line: {"image": path, "short_caption": optional str,
        "long_caption": optional str}. Blank lines are skipped; other keys are ignored.
      image_root: folder that relative image paths are joined to (default: the manifest's folder).
        Absolute paths are kept.

    Returns:
      One `CaptionPair` per line, in file order, with resolved image paths and stripped captions.

    Raises:
      DatasetError: the file or root is missing, a line is not a JSON object, has no 'image' or no
        non-empty caption ('path:line: ...'), the manifest is empty, or the first image does not exist.
    """
    path = _require_file(path, "caption manifest")
    root = _root(image_root, "caption manifest") if image_root is not None else os.path.dirname(path)
    pairs, first_line = [], 0
    for lineno, obj in _jsonl(path, "caption manifest"):
        first_line = first_line or lineno
        where = f"{path}:{lineno}"
        image = _text(obj, "image", where)
        short, long = _text(obj, "short_caption", where, False), _text(obj, "long_caption", where, False)
        if short is None and long is None:
            raise DatasetError(f"{where}: no caption; give 'short_caption' and/or 'long_caption'")
        pairs.append(CaptionPair(_resolve(root, image), short, long))
    if not pairs:
        raise DatasetError(f"caption manifest {path} has no entries")
    _check_image(pairs[0].image, f"caption manifest {path}:{first_line}",
                 "relative image paths are joined to image_root (default: the manifest's folder)")
    return pairs


def read_karpathy(path: PathLike, image_root: PathLike, split: str | Sequence[str] = "test", *,
                  captions_per_image: int | None = None) -> RetrievalSet:
    """Reads one split of a Karpathy-split file (dataset_flickr30k.json, dataset_coco.json).

    Captions are the 'raw' sentences, stripped but otherwise untouched (lower-casing or punctuation
    removal, as ALBEF's `pre_caption` does, belongs to the tokenizer side). Images keep the file order.

    Args:
      path: the Karpathy JSON.
      image_root: Flickr30k: the folder of the jpgs (`root/filename`); COCO: the folder that holds
        'train2014' and 'val2014' (`root/filepath/filename`).
      split: 'test' (Flickr30k 1,000 / COCO 5,000 images), 'val', 'train', 'restval', or several, e.g.
        ('train', 'restval') for the usual 113k-image COCO training set.
      captions_per_image: keep only the first n sentences of each image (a few COCO images have 6 or 7;
        None keeps all, as ALBEF does).

    Returns:
      The `RetrievalSet`.

    Raises:
      DatasetError: the file is missing or malformed, the split is empty (lists the splits present), an
        image has no sentence, or the first image does not exist.
    """
    path = _require_file(path, "Karpathy split file")
    root = _root(image_root, f"Karpathy split file {path}")
    splits = {split} if isinstance(split, str) else set(split)
    raw = _read_json(path, "Karpathy split file")
    images = raw.get("images") if isinstance(raw, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"Karpathy split file {path} has no 'images' list; use dataset_flickr30k.json or "
                           f"dataset_coco.json from Karpathy's splits")
    image_paths, captions, c2i, i2c = [], [], [], []
    for n, entry in enumerate(images):
        where = f"{path}: images[{n}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} is not an object")
        if entry.get("split") not in splits:
            continue
        filename = _text(entry, "filename", where)
        filepath = _text(entry, "filepath", where, required=False)
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise DatasetError(f"{where} ({filename}): 'sentences' must be a list of {{'raw': str}}")
        texts = [_text(s if isinstance(s, dict) else {}, "raw", f"{where} ({filename}) sentence {j}")
                 for j, s in enumerate(sentences)]
        texts = texts[:captions_per_image] if captions_per_image is not None else texts
        if not texts:
            raise DatasetError(f"{where} ({filename}) has no sentences")
        index = len(image_paths)
        image_paths.append(os.path.join(root, filepath, filename) if filepath else os.path.join(root, filename))
        i2c.append(list(range(len(captions), len(captions) + len(texts))))
        captions += texts
        c2i += [index] * len(texts)
    if not image_paths:
        present = sorted({str(e.get("split")) for e in images if isinstance(e, dict)})
        raise DatasetError(f"Karpathy split file {path} has no images in split {sorted(splits)}; "
                           f"splits present: {present}")
    _check_image(image_paths[0], f"Karpathy split file {path}",
                 "image_root must be the Flickr30k image folder, or for COCO the folder holding val2014/")
    return RetrievalSet(image_paths, captions, np.asarray(c2i, np.int32), i2c)


def read_sugarcrepe(dir_or_files: PathLike | Sequence[PathLike],
                    image_root: PathLike) -> dict[str, list[SugarCrepeItem]]:
    """Reads SugarCrepe's per-category JSON files.

    Args:
      dir_or_files: a folder (every '*.json' in it, sorted by name), one JSON file, or a list of them.
        The category is the file name without '.json' ('replace_obj', 'swap_att', ...).
      image_root: the COCO val2017 folder that 'filename' is joined to.

    Returns:
      category -> [(image_path, positive caption, negative caption)] as `SugarCrepeItem`s, in file order.

    Raises:
      DatasetError: a file or folder is missing, a file is malformed or empty (an entry error names the
        file and id), or the first image of a category does not exist.
    """
    if isinstance(dir_or_files, (str, os.PathLike)):
        source = os.path.expanduser(os.fspath(dir_or_files))
        if os.path.isdir(source):
            files = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".json"))
            if not files:
                raise DatasetError(f"SugarCrepe folder {source} has no .json files (expected replace_obj.json, ...)")
        else:
            files = [source]
    else:
        files = [os.fspath(f) for f in dir_or_files]
    root = _root(image_root, "SugarCrepe")
    out: dict[str, list[SugarCrepeItem]] = {}
    for file in files:
        file = _require_file(file, "SugarCrepe file")
        category = os.path.splitext(os.path.basename(file))[0]
        raw = _read_json(file, "SugarCrepe file")
        if not isinstance(raw, dict) or not raw:
            raise DatasetError(f"SugarCrepe file {file} must be a non-empty object of id -> "
                               f"{{filename, caption, negative_caption}}")
        items = []
        for key, entry in raw.items():
            where = f"{file}: id {key}"
            if not isinstance(entry, dict):
                raise DatasetError(f"{where} is not an object")
            items.append(SugarCrepeItem(_resolve(root, _text(entry, "filename", where)),
                                        _text(entry, "caption", where), _text(entry, "negative_caption", where)))
        _check_image(items[0].image, f"SugarCrepe {category}", "image_root must be COCO's val2017 folder")
        out[category] = items
    return out


def read_winoground(path: PathLike, image_root: PathLike) -> list[WinogroundItem]:
    """Reads Winoground's examples.jsonl.

    Args:
      path: the JSONL (fields id, image_0, image_1, caption_0, caption_1; 'tag' is kept if present).
      image_root: Winoground's images folder; image 'ex_0_img_0' is `image_root/ex_0_img_0.png`.

    Returns:
      One `WinogroundItem` per line, in file order, with resolved image paths.

    Raises:
      DatasetError: the file or folder is missing, a line is bad JSON or lacks a field ('path:line: ...'),
        the file is empty, or the first images do not exist.
    """
    path = _require_file(path, "Winoground file")
    root = _root(image_root, "Winoground")
    items, first_line = [], 0
    for lineno, obj in _jsonl(path, "Winoground"):
        first_line = first_line or lineno
        where = f"{path}:{lineno}"
        if obj.get("id") is None:
            raise DatasetError(f"{where}: missing 'id'")
        images = [_text(obj, f"image_{j}", where) for j in (0, 1)]
        images = [_resolve(root, im if im.endswith(".png") else im + ".png") for im in images]
        items.append(WinogroundItem(obj["id"], images[0], images[1], _text(obj, "caption_0", where),
                                    _text(obj, "caption_1", where), _text(obj, "tag", where, required=False)))
    if not items:
        raise DatasetError(f"Winoground file {path} has no examples")
    for image in (items[0].image_0, items[0].image_1):
        _check_image(image, f"Winoground {path}:{first_line}", "image_root must be Winoground's images folder")
    return items
