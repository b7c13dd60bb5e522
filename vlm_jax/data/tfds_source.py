"""Few-shot datasets from a classification dataset prepared with tensorflow-datasets (no TensorFlow).

Reads with `tfds.data_source`, i.e. random access into array_record files; TensorFlow is not needed, but
the dataset must have been prepared in the array_record format (`tfds build NAME --file_format=array_record`).
Examples are materialised lazily: a split is a `TfdsExamples` sequence whose items decode their image
(PIL) only when indexed, which `batches` does inside its worker threads.

Caption datasets (coco_captions ...): `tfds_caption_pairs` (training pairs) and `tfds_retrieval_set` (every
caption of each image), with lazily decoded `TfdsImage`s (`.array`) for the discriminative LVLM program.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from vlm_jax.data import datasets_meta as meta
from vlm_jax.data.types import DatasetError, Example, FewShotDataset, load_cupl
from vlm_jax.data.preprocess import load_image


class TfdsExamples(Sequence):
    """A lazy, read-only sequence of `Example`s over one TFDS split.

    Indexing reads one record and decodes its image (u8[H, W, 3] in `Example.array`, `path` None).
    `labels` (i32[N]) reads every record once, without decoding images, and is cached; `sample_few_shot`
    uses it instead of indexing every example.
    """

    def __init__(self, source, image_key: str, label_key: str, classnames: list[str], where: str):
        self._source, self._image_key, self._label_key = source, image_key, label_key
        self._classnames, self._where = classnames, where

    def __len__(self) -> int:
        return len(self._source)

    def _example(self, record: dict) -> Example:
        image = record[self._image_key]
        if isinstance(image, (bytes, bytearray)):  # image decoding skipped at read time: decode with PIL
            image = np.asarray(load_image(bytes(image)))
        label = int(record[self._label_key])
        return Example(None, label, self._classnames[label], np.asarray(image))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self._where} ({len(self)} examples)")
        return self._example(self._source[index])

    @functools.cached_property
    def labels(self) -> np.ndarray:
        out = np.empty((len(self),), np.int32)
        step = 1024
        for start in range(0, len(self), step):
            records = self._source.__getitems__(list(range(start, min(start + step, len(self)))))
            out[start:start + len(records)] = [int(r[self._label_key]) for r in records]
        return out


def _tfds():
    """tensorflow_datasets, or a one-line error naming the [tfds] extra."""
    from vlm_jax.errors import import_extra

    return import_extra("tensorflow_datasets", "tfds", "TFDS datasets (data.name='tfds:...')")


def _howto(name: str, data_dir: str) -> str:
    return f"prepare it with `tfds build {name} --data_dir={data_dir} --file_format=array_record`"


def _prepared_builder(name: str, data_dir: str | os.PathLike | None):
    """The TFDS builder of a dataset prepared as array_record in data_dir; else a one-line `DatasetError`."""
    tfds = _tfds()

    shown_dir = os.fspath(data_dir) if data_dir is not None else "~/tensorflow_datasets"
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    except Exception as e:  # DatasetNotFoundError lists every registered dataset: keep one line instead.
        raise DatasetError(f"TFDS dataset {name!r} not found in {shown_dir} ({type(e).__name__}); "
                           f"{_howto(name, shown_dir)}") from None
    if not builder.is_prepared():
        raise DatasetError(f"TFDS dataset {name!r} is not prepared in {builder.data_path}; "
                           f"{_howto(name, shown_dir)}")
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
        raise DatasetError(f"TFDS dataset {name!r} in {builder.data_path} is stored as {file_format}, which needs "
                           f"TensorFlow to read; rebuild it with --file_format=array_record or convert it with "
                           f"`tfds convert_format --dataset_version_dir={builder.data_path} "
                           f"--out_file_format=array_record` where TensorFlow is installed")
    return builder


def tfds_dataset(name: str, data_dir: str | os.PathLike | None = None, *, image_key: str = "image",
                 label_key: str = "label", train_split: str = "train", val_split: str | None = None,
                 test_split: str = "test", templates: Sequence[str] = ("a photo of a {}.",),
                 cupl_path: str | os.PathLike | None = None) -> FewShotDataset:
    """A `FewShotDataset` over a TFDS image-classification dataset stored as array_record.

    Args:
      name: TFDS name, optionally with config/version ('oxford_flowers102', 'imagenette/full-size-v2').
      data_dir: TFDS data dir (default: TFDS's, usually ~/tensorflow_datasets).
      image_key: the image feature.
      label_key: the `ClassLabel` feature; its names (underscores -> spaces) are the class names.
      train_split: split (TFDS slicing allowed, e.g. 'train[:90%]') used as train.
      val_split: split used as val; None picks 'validation' or 'val' if the dataset has one, else the
        test split (as CoOp does for ImageNet: hyper-parameters are then tuned on test, say so in reports).
      test_split: split used as test.
      templates: prompt templates.
      cupl_path: optional CuPL json for `cupl_prompts`.

    Returns:
      The dataset; its splits are lazy `TfdsExamples`.

    Raises:
      DatasetError: the dataset is not prepared in data_dir, is stored as tfrecord (needs TensorFlow), or
        lacks the requested split or features.
    """
    tfds = _tfds()  # local: importing tfds costs ~0.5 s and only this path needs it.

    builder = _prepared_builder(name, data_dir)
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise DatasetError(f"TFDS dataset {name!r} has no feature {key!r} (features: {list(features)})")
    names = getattr(features[label_key], "names", None)
    if not names:
        raise DatasetError(f"TFDS feature {name}/{label_key} is not a ClassLabel with names; pass label_key=")
    classnames = [meta.clean_classname("", c) for c in names]
    available = list(builder.info.splits)
    if val_split is None:
        val_split = next((s for s in ("validation", "val") if s in available), test_split)

    def split(spec: str) -> TfdsExamples:
        if spec.split("[")[0] not in available:
            raise DatasetError(f"TFDS dataset {name!r} has no split {spec!r} (splits: {available})")
        # Skip image decoding at read time: PIL decodes in TfdsExamples, and `labels` never decodes.
        source = builder.as_data_source(split=spec, decoders={image_key: tfds.decode.SkipDecoding()})
        return TfdsExamples(source, image_key, label_key, classnames, f"{name}:{spec}")

    train, test = split(train_split), split(test_split)
    val = test if val_split == test_split else split(val_split)
    return FewShotDataset(
        name=f"tfds:{name}", classnames=classnames, templates=list(templates), train=train, val=val,
        test=test, cupl_prompts=None if cupl_path is None else load_cupl(cupl_path, classnames),
        class_subset=None, negative_templates=list(meta.DEFAULT_NEGATIVE_TEMPLATES))


# ---------------------------------------------------------------------------------------------------------
# Caption datasets (e.g. coco_captions: 'image' and a Sequence 'captions' of {'id', 'text'}).


class TfdsImage:
    """One image of a TFDS split, decoded (u8[H, W, 3]) each time `.array` is read; `path` is None.

    The program's image loader accepts any object with `.array`; decoding happens there (in its worker
    threads), so a list of these costs no image memory.
    """
    path = None

    def __init__(self, source, index: int, image_key: str):
        self._source, self._index, self._image_key = source, index, image_key

    @property
    def array(self) -> np.ndarray:
        image = _get(self._source[self._index], self._image_key)
        if isinstance(image, (bytes, bytearray)):
            image = np.asarray(load_image(bytes(image)))
        return np.asarray(image)

    def __repr__(self) -> str:
        return f"TfdsImage({self._index})"


@dataclasses.dataclass(frozen=True)
class TfdsCaptionPair:
    """A `CaptionPair` whose image is a lazy `TfdsImage` (unpacks like (image, short, long) via fields)."""
    image: TfdsImage
    short_caption: str | None = None
    long_caption: str | None = None


class TfdsRetrievalSet(NamedTuple):
    """(images [I] lazy `TfdsImage`s, captions [T] grouped by image, caption_to_image i32[T]): a 3-tuple."""
    images: list[TfdsImage]
    captions: list[str]
    caption_to_image: np.ndarray


def _get(record, key: str):
    for part in key.split("/"):
        record = record[part]
    return record


def _feature_keys(features, prefix: str = "") -> list[str]:
    """'/'-joined paths of every leaf feature (through Sequences of dicts), e.g. ['image', 'captions/text']."""
    inner = getattr(features, "feature", features)  # Sequence(FeaturesDict) -> its dict
    if not hasattr(inner, "items") or not callable(inner.items):
        return [prefix.rstrip("/")]
    return [k for name, f in inner.items() for k in _feature_keys(f, f"{prefix}{name}/")]


def _texts(value) -> list[str]:
    """A Text feature's value (str / bytes, or an array of them for a Sequence) as stripped non-empty strs."""
    values = [value] if isinstance(value, (str, bytes, bytearray)) or np.ndim(value) == 0 else list(np.ravel(value))
    out = []
    for v in values:
        if isinstance(v, np.generic):
            v = v.item()
        v = bytes(v).decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)
        if v.strip():
            out.append(v.strip())
    return out


def _caption_source(name, data_dir, split, image_key, caption_keys):
    """(data source with image decoding skipped, where) after checking split and feature keys."""
    tfds = _tfds()

    builder = _prepared_builder(name, data_dir)
    available_keys = _feature_keys(builder.info.features)
    for key in (image_key, *caption_keys):
        if key not in available_keys:
            raise DatasetError(f"TFDS dataset {name!r} has no feature {key!r} (features: {available_keys})")
    splits = list(builder.info.splits)
    if split.split("[")[0] not in splits:
        raise DatasetError(f"TFDS dataset {name!r} has no split {split!r} (splits: {splits})")
    decoders: dict = {}
    node = decoders
    *parents, leaf = image_key.split("/")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = tfds.decode.SkipDecoding()  # PIL decodes in TfdsImage.array
    return builder.as_data_source(split=split, decoders=decoders), f"{name}:{split}"


def _records(source, n: int, step: int = 1024):
    for start in range(0, n, step):
        yield from source.__getitems__(list(range(start, min(start + step, n))))


def tfds_caption_pairs(name: str, data_dir: str | os.PathLike | None = None, *, split: str = "train",
                       image_key: str = "image", caption_key: str = "captions/text",
                       long_caption_key: str | None = None,
                       max_examples: int | None = None) -> list[TfdsCaptionPair]:
    """Training pairs from a TFDS caption dataset stored as array_record (e.g. coco_captions).

    Args:
      name: TFDS name, optionally with config/version.
      data_dir: TFDS data dir (default: TFDS's).
      split: split (slicing allowed, 'train[:10%]').
      image_key: the image feature ('/'-joined path for a nested one).
      caption_key: the short-caption Text feature; a '/'-path into a Sequence ('captions/text') takes the
        image's first caption.
      long_caption_key: optional long-caption Text feature (first one if a Sequence).
      max_examples: read only the first N examples.

    Returns:
      One pair per example with at least one caption; images decode lazily (`TfdsImage.array`).
      Captions are read now (one pass over the records, images not decoded).

    Raises:
      DatasetError: dataset missing / tfrecord / no such split or feature (the error lists the features).
    """
    keys = (caption_key,) if long_caption_key is None else (caption_key, long_caption_key)
    source, where = _caption_source(name, data_dir, split, image_key, keys)
    n = len(source) if max_examples is None else min(len(source), max_examples)
    out = []
    for i, record in enumerate(_records(source, n)):
        short = _texts(_get(record, caption_key))
        long = _texts(_get(record, long_caption_key)) if long_caption_key else []
        if short or long:
            out.append(TfdsCaptionPair(TfdsImage(source, i, image_key), short[0] if short else None,
                                       long[0] if long else None))
    if not out:
        raise DatasetError(f"TFDS {where}: no example has a caption in {caption_key!r}")
    return out


def tfds_retrieval_set(name: str, data_dir: str | os.PathLike | None = None, *, split: str = "test",
                       image_key: str = "image", caption_key: str = "captions/text") -> TfdsRetrievalSet:
    """An image-text retrieval set from a TFDS caption dataset: every caption of every image.

    Images without a caption are left out (retrieval needs >= 1 caption per image). Same args and errors as
    `tfds_caption_pairs`; returns (images, captions, caption_to_image i32[T]).
    """
    source, where = _caption_source(name, data_dir, split, image_key, (caption_key,))
    images, texts, owner = [], [], []
    for i, record in enumerate(_records(source, len(source))):
        caps = _texts(_get(record, caption_key))
        if caps:
            owner += [len(images)] * len(caps)
            texts += caps
            images.append(TfdsImage(source, i, image_key))
    if not images:
        raise DatasetError(f"TFDS {where}: no example has a caption in {caption_key!r}")
    return TfdsRetrievalSet(images, texts, np.asarray(owner, np.int32))
