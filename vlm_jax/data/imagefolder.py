"""Image-folder classification datasets: `<root>/{train,val,test}/<class>/*.{png,jpg,...}`.

`load_image_folder(root)` lists the files (nothing is decoded) and returns an `ImageFolderDataset` of
`fewshot.Example(path, label, classname)`, usable wherever MedMNIST or CoOp examples are (VITask's
`data.name=folder:<root>`).

Layout rules (each violation is one `DatasetError` line naming the folder or file):
- `train/` and `test/` are required; `val/` is optional (an empty split when absent).
- Classes are the sub-folders of `train/` (hidden ones skipped), sorted by folder name; label k is the k-th.
  The class name is the folder name with '_' turned into ' ' ('basal_cell_carcinoma' -> 'basal cell carcinoma').
- A class folder of `val/` / `test/` must also exist in `train/`; a class may be absent from `val/` / `test/`.
- Images are the files with an extension in `IMAGE_EXTENSIONS` (any case); other files are ignored. A class
  folder without any image is an error (a typo in a folder name, or an unfinished copy).
- `check_images=True` opens every file's header (cheap: no pixel decode) so a file that is no image fails now,
  naming the file, rather than hours into training; a file that only fails to decode later still fails with its
  name (`preprocess.load_image`).
Single-label only: one image, one class folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from PIL import Image

from vlm_jax.data.types import DatasetError, Example

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
REQUIRED = ("train", "test")
LAYOUT = "expected <root>/{train,val,test}/<class>/*.png|jpg|... (val optional)"


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFolderDataset:
    """A folder dataset: `classnames[k]` is label k; `folders[k]` is its folder name."""
    name: str
    root: str
    classnames: list[str]
    folders: list[str]
    train: Sequence[Example]
    val: Sequence[Example]
    test: Sequence[Example]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def class_name(folder: str) -> str:
    """'basal_cell_carcinoma' -> 'basal cell carcinoma' (whitespace collapsed)."""
    return " ".join(folder.replace("_", " ").split())


def _subdirs(path: str) -> list[str]:
    return sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))


def _images(folder: str) -> list[str]:
    return sorted(e.path for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")
                  and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def _check_image(path: str) -> None:
    try:
        with Image.open(path) as img:  # lazy: reads the header only
            img.size  # noqa: B018
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"image folder: cannot read image {path}: {type(e).__name__}: {e}") from None


def load_image_folder(root: str | os.PathLike, *, name: str | None = None,
                      check_images: bool = True) -> ImageFolderDataset:
    """Lists an image-folder dataset.

    Args:
      root: the folder holding `train/`, `test/` (and optionally `val/`).
      name: the dataset's name (default: the root folder's base name).
      check_images: open each image's header now (see the module doc).

    Returns:
      The dataset; examples of each split sorted by (class, file name).

    Raises:
      DatasetError: missing root / split folder, no class folders, an empty or unknown class folder, two folders
        that give one class name, or an unreadable image (one line).
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise DatasetError(f"image folder: {root} does not exist or is not a folder; {LAYOUT}")
    for split in REQUIRED:
        if not os.path.isdir(os.path.join(root, split)):
            raise DatasetError(f"image folder: missing split folder {os.path.join(root, split)}; {LAYOUT}")
    folders = _subdirs(os.path.join(root, "train"))
    names = [class_name(f) for f in folders]  # (no folders: the split loop below says so)
    for i, n in enumerate(names):
        if not n:
            raise DatasetError(f"image folder: class folder {folders[i]!r} gives an empty class name")
        if names.index(n) != i:
            raise DatasetError(f"image folder: class folders {folders[names.index(n)]!r} and {folders[i]!r} both "
                               f"give the class name {n!r}")
    label = {f: k for k, f in enumerate(folders)}
    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        path = os.path.join(root, split)
        splits[split] = []
        if not os.path.isdir(path):
            continue  # only val can be missing here
        subdirs = _subdirs(path)
        if not subdirs and split in REQUIRED:
            raise DatasetError(f"image folder: {path} has no class folders; {LAYOUT}")
        for f in subdirs:
            if f not in label:
                raise DatasetError(f"image folder: {os.path.join(path, f)} is a class that train/ does not have "
                                   f"(train classes: {', '.join(folders)})")
            files = _images(os.path.join(path, f))
            if not files:
                raise DatasetError(f"image folder: {os.path.join(path, f)} holds no image "
                                   f"({'/'.join(IMAGE_EXTENSIONS)}); remove it or add images")
            for file in files:
                if check_images:
                    _check_image(file)
                splits[split].append(Example(file, label[f], names[label[f]]))
    return ImageFolderDataset(name=name or os.path.basename(root.rstrip(os.sep)), root=root, classnames=names,
                              folders=folders, train=splits["train"], val=splits["val"], test=splits["test"])
