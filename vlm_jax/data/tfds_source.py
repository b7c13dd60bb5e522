"""Few-shot datasets from a classification dataset prepared with tensorflow-datasets (no TensorFlow).

Reads with `tfds.data_source`, i.e. random access into array_record files; TensorFlow is not needed, but
the dataset must have been prepared in the array_record format (`tfds build NAME --file_format=array_record`).
Examples are materialised lazily: a split is a `TfdsExamples` sequence whose items decode their image
(PIL) only when indexed, which `batches` does inside its worker threads.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from vlm_jax.data import datasets_meta as meta
from vlm_jax.data.fewshot import DatasetError, Example, FewShotDataset, load_cupl
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


def _howto(name: str, data_dir: str) -> str:
    return f"prepare it with `tfds build {name} --data_dir={data_dir} --file_format=array_record`"


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
    import tensorflow_datasets as tfds  # local: importing tfds costs ~0.5 s and only this path needs it.

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
