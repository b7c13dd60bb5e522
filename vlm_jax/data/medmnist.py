"""MedMNIST v2 (2D) for VITask: official npz loading, instruction / response text, answer matching, metrics.

`load_medmnist(name, root)` reads the official `<name>.npz` (28x28) or `<name>_<size>.npz` (MedMNIST+,
64 / 128 / 224) with the official train / val / test splits and returns a `MedMNISTDataset` of
`MedExample`s holding views into the in-memory arrays (nothing is copied or decoded per example).
`MedExample` has the `path` / `label` / `classname` / `array` fields of `fewshot.Example`, so
`fewshot.batches` and `fewshot.sample_few_shot` accept it (grayscale [H, W] arrays become RGB there).

Text (VITask, arXiv 2410.06456, METHODS.md 'VITask'):
- `instruction(name)`: 'Analyze the given {modality} image. The possible diagnoses are: {l1}, {l2}, ....'
  (label names in label order, joined with ', '); `include_labels=False` gives the incomplete-instruction
  variant 'Analyze the given {modality} image.'
- `response(names)`: '{label}.'. ChestMNIST is multi-label: the positive labels in label order joined with
  ', ' ('effusion, mass.'), or 'normal.' when none is positive (ChestMNIST has no 'normal' class; an
  all-zero row means no finding). `MedExample.classname` is this answer text without the final '.'.
- `match_answer(text, names)` maps a generated answer back to one label index (or None = wrong);
  `match_label_set(text, names)` maps a multi-label answer ('effusion, mass.' / 'normal.') to a set of labels.
- Metrics: `accuracy` / `macro_f1` (single-label); `multilabel_accuracy` (exact match of the label set) /
  `multilabel_macro_f1` (mean over labels of the binary F1 of the positive class) for ChestMNIST.

Label names are the official MedMNIST v2 `INFO[...]['label']` wording (lower/mixed case kept as in INFO).
RetinaMNIST's official labels are the grades '0'..'4' (ordinal regression); ChestMNIST's 'pleural' is the
official (truncated) name of 'pleural thickening'.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from vlm_jax.data.types import DatasetError
from vlm_jax.data.preprocess import load_image

MULTI_CLASS = "multi-class"
BINARY = "binary-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"

NO_FINDING = "normal"  # ChestMNIST response when no label is positive.
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
HOWTO = ("download the official npz from the MedMNIST release (https://zenodo.org/records/10519652, or "
         "`pip install medmnist` and its downloader) and pass the folder that holds it")


@dataclasses.dataclass(frozen=True)
class MedMNISTInfo:
    """Metadata of one MedMNIST 2D dataset: `task`, prompt `modality` and `labels` in label order."""
    task: str
    modality: str
    labels: tuple[str, ...]


_ORGAN = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
          "lung-right", "pancreas", "spleen")

MEDMNIST: dict[str, MedMNISTInfo] = {
    "pathmnist": MedMNISTInfo(MULTI_CLASS, "colon pathology", (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
        "cancer-associated stroma", "colorectal adenocarcinoma epithelium")),
    "chestmnist": MedMNISTInfo(MULTI_LABEL, "chest X-ray", (
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia", "pneumothorax",
        "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia")),
    "dermamnist": MedMNISTInfo(MULTI_CLASS, "dermatoscope", (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
        "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions")),
    "octmnist": MedMNISTInfo(MULTI_CLASS, "retinal OCT", (
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal")),
    "pneumoniamnist": MedMNISTInfo(BINARY, "chest X-ray", ("normal", "pneumonia")),
    "retinamnist": MedMNISTInfo(ORDINAL, "fundus camera", ("0", "1", "2", "3", "4")),
    "breastmnist": MedMNISTInfo(BINARY, "breast ultrasound", ("malignant", "normal, benign")),
    "bloodmnist": MedMNISTInfo(MULTI_CLASS, "blood cell microscope", (
        "basophil", "eosinophil", "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
        "neutrophil", "platelet")),
    "tissuemnist": MedMNISTInfo(MULTI_CLASS, "kidney cortex microscope", (
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
        "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
        "Thick Ascending Limb")),
    "organamnist": MedMNISTInfo(MULTI_CLASS, "abdominal CT", _ORGAN),
    "organcmnist": MedMNISTInfo(MULTI_CLASS, "abdominal CT", _ORGAN),
    "organsmnist": MedMNISTInfo(MULTI_CLASS, "abdominal CT", _ORGAN),
}


@dataclasses.dataclass(frozen=True)
class MedExample:
    """One MedMNIST image, compatible with `fewshot.Example` (path is always None).

    Attributes:
      array: u8[H, W] (grayscale) or u8[H, W, 3], a view into the split's array.
      label: the class index; -1 for ChestMNIST (multi-label: see `multi_hot`).
      classname: the answer text without the final '.' (`response(...)[:-1]`).
      multi_hot: i32[14] for ChestMNIST, else None.
    """
    array: np.ndarray = dataclasses.field(compare=False, repr=False)
    label: int
    classname: str
    multi_hot: np.ndarray | None = dataclasses.field(default=None, compare=False)
    path: None = None

    def image(self):
        """The image as a PIL RGB image."""
        return load_image(self.array)


@dataclasses.dataclass(frozen=True, eq=False)
class MedMNISTDataset:
    """A MedMNIST 2D dataset with the official splits; `classnames` are `MEDMNIST[name].labels`."""
    name: str
    task: str
    modality: str
    classnames: list[str]
    train: Sequence[MedExample]
    val: Sequence[MedExample]
    test: Sequence[MedExample]
    size: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def multi_label(self) -> bool:
        return self.task == MULTI_LABEL


def _info(name: str) -> tuple[str, MedMNISTInfo]:
    key = name.strip().lower()
    if key not in MEDMNIST:
        raise DatasetError(f"unknown MedMNIST dataset {name!r}; known 2D datasets: {', '.join(MEDMNIST)}")
    return key, MEDMNIST[key]


def response(label_names: Sequence[str], *, none: str = NO_FINDING) -> str:
    """The target answer: '{label}.'; several names (ChestMNIST positives) join with ', '; none -> 'normal.'."""
    return (", ".join(label_names) if label_names else none) + "."


def format_instruction(modality: str, label_names: Sequence[str], *, include_labels: bool = True) -> str:
    """'Analyze the given {modality} image. The possible diagnoses are: {l1}, {l2}, ....' (any dataset)."""
    text = f"Analyze the given {modality} image."
    if include_labels:
        text += f" The possible diagnoses are: {', '.join(label_names)}."
    return text


def instruction(name: str, *, include_labels: bool = True) -> str:
    """VITask's instruction for dataset `name`; `include_labels=False` drops the label set (incomplete variant)."""
    _, info = _info(name)
    return format_instruction(info.modality, info.labels, include_labels=include_labels)


def _split_examples(key: str, info: MedMNISTInfo, path: str, images: np.ndarray, labels: np.ndarray,
                    split: str) -> list[MedExample]:
    c = len(info.labels)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise DatasetError(f"{key}: {path} {split}_images must be uint8 [N, H, W] or [N, H, W, 3], got "
                           f"{images.dtype}{list(images.shape)}; {HOWTO}")
    want = (len(images), c) if info.task == MULTI_LABEL else (len(images), 1)
    if labels.ndim == 1 and info.task != MULTI_LABEL:
        labels = labels[:, None]
    if labels.shape != want:
        raise DatasetError(f"{key}: {path} {split}_labels has shape {list(labels.shape)}, expected {list(want)} "
                           f"for {len(images)} images; {HOWTO}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= (2 if info.task == MULTI_LABEL else c)):
        raise DatasetError(f"{key}: {path} {split}_labels out of range [{labels.min()}, {labels.max()}] for "
                           f"{c} classes; {HOWTO}")
    if info.task == MULTI_LABEL:
        hot = labels.astype(np.int32)
        return [MedExample(images[i], -1, response([info.labels[j] for j in np.flatnonzero(hot[i])])[:-1], hot[i])
                for i in range(len(images))]
    return [MedExample(images[i], int(y), info.labels[int(y)]) for i, y in enumerate(labels[:, 0])]


def load_medmnist(name: str, root: str | os.PathLike | None, *, size: int | None = None) -> MedMNISTDataset:
    """Loads MedMNIST v2 2D dataset `name` from the official npz in folder `root`.

    Args:
      name: one of `MEDMNIST` (case-insensitive).
      root: the folder holding `<name>.npz` (size None or 28) or `<name>_<size>.npz`.
      size: None / 28 (the 28x28 release) or 64, 128, 224 (MedMNIST+).

    Returns:
      The dataset with the official train / val / test splits, in file order.

    Raises:
      DatasetError: unknown name or size, missing folder / file / key, or malformed arrays (one line).
    """
    key, info = _info(name)
    if size not in (None, *SIZES):
        raise DatasetError(f"{key}: size must be one of {SIZES} (or None for 28), got {size!r}")
    if root is None:
        raise DatasetError(f"{key}: no MedMNIST folder given; {HOWTO}")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    filename = f"{key}.npz" if size in (None, 28) else f"{key}_{size}.npz"
    path = os.path.join(root, filename)
    if not os.path.isfile(path):
        raise DatasetError(f"{key}: {filename} not found: {path}; {HOWTO}")
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            needed = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
            missing = [k for k in needed if k not in keys]
            if missing:
                raise DatasetError(f"{key}: {path} lacks key(s) {', '.join(missing)} (has {', '.join(sorted(keys))}); "
                                   f"{HOWTO}")
            arrays = {k: npz[k] for k in needed}
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{key}: cannot read {path} ({type(e).__name__}: {e}); {HOWTO}") from None
    splits = {s: _split_examples(key, info, path, arrays[f"{s}_images"], arrays[f"{s}_labels"], s) for s in SPLITS}
    return MedMNISTDataset(name=key, task=info.task, modality=info.modality, classnames=list(info.labels),
                           train=splits["train"], val=splits["val"], test=splits["test"], size=size)


# ---------------------------------------------------------------------------------------------------------
# Answers and metrics


def normalize(text: str) -> str:
    """Lowercase, punctuation -> space, whitespace collapsed: 'Femur-Left.' -> 'femur left'."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def _contains(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "  # whole words only


def match_answer(text: str, label_names: Sequence[str]) -> int | None:
    """The label a generated answer names, or None (unmatched or ambiguous; score it as wrong).

    After `normalize`: (1) the answer equals one label; else (2) exactly one label occurs in the answer as
    whole words (a label contained in another matching label, e.g. 'lung' in 'lung left', yields to the
    longer one); else (3) the answer occurs as whole words in exactly one label ('basal cell' ->
    'basal cell carcinoma'). Several candidates at the deciding step -> None.
    """
    t = normalize(text)
    if not t:
        return None
    names = [normalize(n) for n in label_names]
    exact = [i for i, n in enumerate(names) if n == t]
    if len(exact) == 1:
        return exact[0]
    if exact:
        return None  # duplicate label names
    inside = [i for i, n in enumerate(names) if _contains(t, n)]
    inside = [i for i in inside if not any(j != i and names[j] != names[i] and _contains(names[j], names[i])
                                           for j in inside)]
    if inside:
        return inside[0] if len(inside) == 1 else None
    around = [i for i, n in enumerate(names) if _contains(n, t)]
    return around[0] if len(around) == 1 else None


def match_answers(texts: Sequence[str], label_names: Sequence[str]) -> np.ndarray:
    """`match_answer` over many answers: i32[N], -1 where unmatched."""
    out = [match_answer(t, label_names) for t in texts]
    return np.array([-1 if m is None else m for m in out], np.int32)


def match_label_set(text: str, label_names: Sequence[str], *, none: str = NO_FINDING) -> np.ndarray | None:
    """The label set a generated multi-label answer names: bool[C], or None (unmatched; score it as wrong).

    After `normalize`: the `none` answer ('normal') is the empty set; an answer equal to one label is that label;
    otherwise the answer is split at ',' and ';' (and a piece that matches no label at ' and ') and every
    non-empty piece must `match_answer` one label, else the whole answer is unmatched. Label names that contain
    ',' or ' and ' are therefore only recognised whole (ChestMNIST's contain neither).
    """
    t = normalize(text)
    out = np.zeros(len(label_names), bool)
    if not t:
        return None
    if t == normalize(none):
        return out
    whole = match_answer(text, label_names)
    if whole is not None and normalize(label_names[whole]) == t:
        out[whole] = True
        return out
    for piece in re.split(r"[,;]", text):
        if not normalize(piece):
            continue
        k = match_answer(piece, label_names)
        if k is not None:
            out[k] = True
            continue
        for part in re.split(r"\band\b", piece, flags=re.IGNORECASE):
            if not normalize(part):
                continue
            k = match_answer(part, label_names)
            if k is None:
                return None
            out[k] = True
    return out


def _check(pred, true) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, np.int64).reshape(-1), np.asarray(true, np.int64).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true differ in length: {pred.shape[0]} vs {true.shape[0]}")
    return pred, true


def accuracy(pred, true) -> float:
    """Fraction of pred == true; unmatched predictions (-1) are wrong. 0.0 for empty input."""
    pred, true = _check(pred, true)
    return float(np.mean(pred == true)) if true.size else 0.0


def macro_f1(pred, true, num_classes: int) -> float:
    """Unweighted mean over classes 0..num_classes-1 of per-class F1 = 2 TP / (2 TP + FP + FN).

    Unmatched predictions (-1, or any value outside 0..C-1) are false negatives of their true class and
    false positives of no class. A class with no true and no predicted sample scores 0 (sklearn's
    f1_score(true, pred, labels=range(C), average='macro', zero_division=0)).
    """
    pred, true = _check(pred, true)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if true.size and (true.min() < 0 or true.max() >= num_classes):
        raise ValueError(f"true labels must be in 0..{num_classes - 1}, got [{true.min()}, {true.max()}]")
    classes = np.arange(num_classes)[:, None]
    tp = np.sum((pred == classes) & (true == classes), axis=1)
    fp = np.sum((pred == classes) & (true != classes), axis=1)
    fn = np.sum((pred != classes) & (true == classes), axis=1)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def _check_hot(pred, true) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred and true must be bool[N, C] of one shape, got {pred.shape} and {true.shape}")
    return pred, true


def multilabel_accuracy(pred, true, valid=None) -> float:
    """Exact-match (subset) accuracy: fraction of rows whose predicted label set equals the true one.

    Args:
      pred, true: bool[N, C] label sets; valid: bool[N] or None; an invalid row (unmatched answer) is wrong.
    """
    pred, true = _check_hot(pred, true)
    hit = np.all(pred == true, axis=1)
    if valid is not None:
        hit &= np.asarray(valid, bool).reshape(-1)
    return float(np.mean(hit)) if hit.size else 0.0


def multilabel_macro_f1(pred, true) -> float:
    """Unweighted mean over the C labels of the binary F1 of each label's positive class.

    bool[N, C] each. A label with no true and no predicted positive scores 0 (sklearn's
    f1_score(true, pred, average='macro', zero_division=0) on multi-hot arrays). Give unmatched answers an
    all-False row: their true labels become false negatives.
    """
    pred, true = _check_hot(pred, true)
    tp = np.sum(pred & true, axis=0)
    fp = np.sum(pred & ~true, axis=0)
    fn = np.sum(~pred & true, axis=0)
    denom = 2 * tp + fp + fn
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))) if pred.shape[1] else 0.0
