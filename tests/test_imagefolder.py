"""Image-folder datasets (vlm_jax.data.imagefolder): layout, class names, one-line errors."""

import os

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.fewshot import DatasetError
from vlm_jax.data.imagefolder import class_name, load_image_folder
from vlm_jax.data.preprocess import load_image
from vlm_jax.errors import UserError


def _img(path, value=0, ext=".png"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path + ext)


def make_folder(root, layout):
    """layout: {split: {class folder: number of images}}."""
    for split, classes in layout.items():
        for c, n in classes.items():
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                _img(os.path.join(root, split, c, f"img{i}"), 10 * i, ".jpg" if i % 2 else ".png")
    return root


def test_load_layout_and_names(tmp_path):
    root = make_folder(tmp_path / "skin_set", {"train": {"nevus": 2, "basal_cell__carcinoma": 3},
                                                "test": {"nevus": 1}})
    (tmp_path / "skin_set" / "train" / "nevus" / "notes.txt").write_text("ignored")
    (tmp_path / "skin_set" / "train" / ".cache").mkdir()  # hidden folders are not classes
    ds = load_image_folder(root)
    assert ds.name == "skin_set" and ds.folders == ["basal_cell__carcinoma", "nevus"]
    assert ds.classnames == ["basal cell carcinoma", "nevus"]
    assert [e.label for e in ds.train] == [0, 0, 0, 1, 1] and [e.label for e in ds.test] == [1]
    assert ds.val == []  # optional split
    assert ds.train[3].classname == "nevus" and ds.train[3].path.endswith("nevus/img0.png")
    assert ds.train[4].path.endswith("img1.jpg")
    assert np.asarray(load_image(ds.test[0].path)).shape == (6, 6, 3)
    assert class_name("pleural_thickening") == "pleural thickening"


@pytest.mark.parametrize("case, pattern", [
    ("no_root", r"does not exist"),
    ("no_test", r"missing split folder .*/test; expected <root>/\{train,val,test\}"),
    ("no_classes", r"/train has no class folders"),
    ("empty_class", r"/train/cat holds no image"),
    ("unknown_class", r"/test/dog is a class that train/ does not have"),
    ("clash", r"class folders 'a b' and 'a_b' both give the class name 'a b'"),
    ("bad_image", r"cannot read image .*/train/cat/broken\.png"),
])
def test_errors_are_one_line(tmp_path, case, pattern):
    root = tmp_path / "data"
    if case != "no_root":
        make_folder(root, {"train": {"cat": 1}, "test": {"cat": 1}})
    if case == "no_test":
        os.rename(root / "test", root / "val")
    elif case == "no_classes":
        os.rename(root / "train" / "cat", root / "cat")
    elif case == "empty_class":
        for f in os.listdir(root / "train" / "cat"):
            os.remove(root / "train" / "cat" / f)
    elif case == "unknown_class":
        make_folder(root, {"test": {"dog": 1}})
    elif case == "clash":
        make_folder(root, {"train": {"a b": 1, "a_b": 1}})
    elif case == "bad_image":
        (root / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=pattern) as e:
        load_image_folder(root)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
