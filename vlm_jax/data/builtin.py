"""`skimage_photos`: an offline few-shot dataset of real photos that scikit-image ships.

What it is: a toy pipeline check for `:runlocal` configs and tests, not a benchmark. Each class is ONE
photo bundled in `skimage/data` (the astronaut, Chelsea the cat, a coffee cup, ...); its examples are
deterministic random square crops (position, scale 35-85% of the short side, horizontal flip) resized to
`image_size`. Train / val / test crops use different random streams but come from the same photo, so
they overlap in content: accuracy here says that the pipeline (decode -> preprocess -> model -> method ->
evaluator) is wired correctly and that a real CLIP separates these classes, nothing about generalisation.
No download: the files are part of the scikit-image wheel (a declared dependency).
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
from PIL import Image

from vlm_jax.data import datasets_meta as meta
from vlm_jax.data.types import DatasetError, Example, FewShotDataset
from vlm_jax.data.preprocess import load_image

# (file in skimage/data, class name, CuPL-style descriptions). Ten visually distinct photos: 8 colour,
# 2 grayscale (turned into RGB like any grayscale dataset image).
_PHOTOS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("astronaut.png", "astronaut", (
        "An astronaut wears an orange space suit with mission patches.",
        "A photo of an astronaut posing in front of a flag.",
        "An astronaut is a person trained to travel into space.")),
    ("chelsea.png", "cat", (
        "A cat is a small furry animal with whiskers, pointed ears and striped fur.",
        "A tabby cat looks at the camera with green eyes.",
        "A close-up photo of a domestic cat.")),
    ("coffee.png", "cup of coffee", (
        "A cup of coffee is a red cup on a saucer filled with light brown coffee.",
        "A top-down photo of a coffee cup with a spoon.",
        "Hot coffee served in a ceramic cup.")),
    ("rocket.jpg", "rocket", (
        "A rocket stands on the launch pad next to its service tower.",
        "A tall white launch vehicle ready for lift-off.",
        "A rocket is a vehicle that carries satellites or people into space.")),
    ("motorcycle_left.png", "motorcycle", (
        "A motorcycle is a two-wheeled motor vehicle with handlebars.",
        "A photo of a parked motorbike seen from the side.",
        "A red motorcycle with a large engine and chrome parts.")),
    ("hubble_deep_field.jpg", "galaxy", (
        "Galaxies appear as small bright spirals and smudges on a black sky.",
        "A deep-field telescope image full of distant galaxies.",
        "A galaxy is a huge system of stars seen from far away.")),
    ("ihc.png", "stained tissue sample", (
        "A stained tissue sample under the microscope shows brown and blue cells.",
        "An immunohistochemistry slide of human tissue.",
        "A microscope image of a tissue section with stained nuclei.")),
    ("retina.jpg", "retina", (
        "A photo of the retina shows an orange disc with branching red blood vessels.",
        "A fundus photograph of the back of the human eye.",
        "The retina seen through an ophthalmoscope, with the optic disc.")),
    ("coins.png", "coin", (
        "Coins are small round metal discs with embossed faces and numbers.",
        "A grayscale photo of old coins lying on a table.",
        "A collection of metal coins arranged in rows.")),
    ("brick.png", "brick wall", (
        "A brick wall is made of rectangular bricks held together by mortar.",
        "A grayscale close-up of a wall of bricks.",
        "A textured surface of stacked bricks.")),
)

_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}

# Shaped like the CoOp datasets' sets: one hand-crafted prompt for the baselines (as Tip-Adapter's), and
# DualAdapter's list adds a second positive template.
TEMPLATE_SETS = {"tip_adapter": ["a photo of a {}."],
                 "dualadapter": ["a photo of a {}.", "a close-up photo of the {}."]}


@functools.lru_cache(maxsize=None)
def _photo(filename: str) -> Image.Image:
    path = resources.files("skimage") / "data" / filename
    if not path.is_file():
        raise DatasetError(f"skimage_photos: {path} is missing; reinstall scikit-image (it ships this photo)")
    photo = load_image(str(path))
    # Crops end up at ~96 px: shrinking the few large photos once makes building the set ~3x faster.
    if max(photo.size) > 512:
        scale = 512 / max(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
    return photo


def _crops(photo: Image.Image, count: int, image_size: int, seed: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    short = min(photo.size)
    out = []
    for _ in range(count):
        side = int(round(short * rng.uniform(0.35, 0.85)))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(crop, np.uint8).copy()
        arr.setflags(write=False)  # shared by every call through the cache below
        out.append(arr)
    return out


@functools.lru_cache(maxsize=4)
def _build(image_size: int, counts: tuple[int, int, int]) -> dict[str, tuple[Example, ...]]:
    splits: dict[str, list[Example]] = {s: [] for s in _SPLIT_SEEDS}
    for label, (filename, classname, _) in enumerate(_PHOTOS):
        photo = _photo(filename)
        for (split, split_seed), count in zip(_SPLIT_SEEDS.items(), counts):
            for arr in _crops(photo, count, image_size, (label, split_seed)):
                splits[split].append(Example(None, label, classname, arr))
    return {s: tuple(v) for s, v in splits.items()}


def builtin_dataset(name: str = "skimage_photos", *, image_size: int = 96, train_per_class: int = 16,
                    val_per_class: int = 8, test_per_class: int = 8) -> FewShotDataset:
    """The offline toy dataset: 10 classes, each the crops of one scikit-image photo.

    Args:
      name: only 'skimage_photos'.
      image_size: side of the stored u8[image_size, image_size, 3] crops.
      train_per_class: train crops per class (enough for 16-shot sampling by default).
      val_per_class: val crops per class.
      test_per_class: test crops per class.

    Returns:
      A `FewShotDataset` of in-memory examples (`Example.array` set, `path` None), the template sets of
      `TEMPLATE_SETS` ('a photo of a {}.' style), and three CuPL-style sentences per class. Deterministic: the
      same arguments give identical arrays (cached, read-only).
    """
    if name != "skimage_photos":
        raise DatasetError(f"unknown builtin dataset {name!r}; available: skimage_photos")
    splits = _build(image_size, (train_per_class, val_per_class, test_per_class))
    return FewShotDataset(
        name=name,
        classnames=[c for _, c, _ in _PHOTOS],
        templates=list(TEMPLATE_SETS["dualadapter"]),
        template_sets={k: list(v) for k, v in TEMPLATE_SETS.items()},
        train=list(splits["train"]), val=list(splits["val"]), test=list(splits["test"]),
        cupl_prompts=[list(d) for _, _, d in _PHOTOS],
        class_subset=None,
        negative_templates=list(meta.DEFAULT_NEGATIVE_TEMPLATES),
    )
