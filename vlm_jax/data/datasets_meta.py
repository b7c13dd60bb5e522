"""Facts about the CoOp few-shot datasets: folder layout, class-name fixes, prompt templates.

Sources (read for facts, not copied): CoOp's `DATASETS.md` and `datasets/*.py` (layout, split files,
class-name fixes), Tip-Adapter (one hand-crafted template per dataset, 7 for ImageNet) and DualAdapter's
`datasets/*.py` (extra positive templates for EuroSAT, StanfordCars, UCF101 and ImageNet, and the
negative templates). Everything here is data; the loaders live in `fewshot.py`.
"""

from __future__ import annotations

import dataclasses

from vlm_jax.errors import UserError


class DatasetError(UserError):
    """A dataset cannot be named, loaded or sampled; the one-line message says what is missing and what to do.

    A `UserError` (hence a `ValueError`): the launcher prints it as one line.
    """

# The instructions every "missing file" error points to.
COOP_DATA_DOC = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclasses.dataclass(frozen=True)
class CoOpLayout:
    """Where a dataset lives under the CoOp data root.

    Attributes:
      dataset_dir: folder under the root (CoOp's `dataset_dir`).
      image_dir: folder under `dataset_dir` that split paths are relative to ('' = `dataset_dir` itself).
      split_file: CoOp's fixed split json under `dataset_dir`, or None (FGVC and the ImageNet family).
      doc_section: the section of CoOp's DATASETS.md that explains how to prepare it.
    """
    dataset_dir: str
    image_dir: str
    split_file: str | None
    doc_section: str


COOP_LAYOUTS: dict[str, CoOpLayout] = {
    "imagenet": CoOpLayout("imagenet", "images", None, "ImageNet"),
    "caltech101": CoOpLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "Caltech101"),
    "oxford_pets": CoOpLayout("oxford_pets", "images", "split_zhou_OxfordPets.json", "OxfordPets"),
    "stanford_cars": CoOpLayout("stanford_cars", "", "split_zhou_StanfordCars.json", "StanfordCars"),
    "oxford_flowers": CoOpLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "Flowers102"),
    "food101": CoOpLayout("food-101", "images", "split_zhou_Food101.json", "Food101"),
    "fgvc_aircraft": CoOpLayout("fgvc_aircraft", "images", None, "FGVCAircraft"),
    "sun397": CoOpLayout("sun397", "SUN397", "split_zhou_SUN397.json", "SUN397"),
    "dtd": CoOpLayout("dtd", "images", "split_zhou_DescribableTextures.json", "DTD"),
    "eurosat": CoOpLayout("eurosat", "2750", "split_zhou_EuroSAT.json", "EuroSAT"),
    "ucf101": CoOpLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "UCF101"),
    # Test-only domain-generalisation sets, labelled in ImageNet's 1000-class space.
    "imagenetv2": CoOpLayout("imagenetv2", "imagenetv2-matched-frequency-format-val", None, "ImageNetV2"),
    "imagenet_sketch": CoOpLayout("imagenet-sketch", "images", None, "ImageNet-Sketch"),
    "imagenet_a": CoOpLayout("imagenet-adversarial", "imagenet-a", None, "ImageNet-A"),
    "imagenet_r": CoOpLayout("imagenet-rendition", "imagenet-r", None, "ImageNet-R"),
}

IMAGENET_FAMILY = ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# ImageNet-A and -R cover 200 of the 1000 classes: their logits are sliced to that subset.
SUBSET_DATASETS = ("imagenet_a", "imagenet_r")

# Names the references use for our datasets (DualAdapter / Tip-Adapter yaml names, CoOp's class names, CuPL's file
# names). Case, '-', '_' and spaces never matter (`canonical_name` compares letters and digits only), so 'FGVC',
# 'Food-101', 'OxfordPets', 'stanford cars' and 'ImageNet-Sketch' need no entry here.
DATASET_ALIASES: dict[str, str] = {
    "fgvc": "fgvc_aircraft", "flowers102": "oxford_flowers", "describabletextures": "dtd",
    "imagenetv2matchedfrequency": "imagenetv2", "builtin": "skimage_photos",
}

# Every dataset name `canonical_name` returns: the CoOp datasets and the offline built-in photos ('tfds:NAME'
# passes through unchanged).
KNOWN_DATASETS: tuple[str, ...] = (*COOP_LAYOUTS, "skimage_photos")


def _compact(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_NAME_OF: dict[str, str] = {**{_compact(n): n for n in KNOWN_DATASETS},
                            **{_compact(a): n for a, n in DATASET_ALIASES.items()}}


def canonical_name(name: str) -> str:
    """The one name of a dataset, for its loader, its presets, its templates and its caches.

    'fgvc', 'FGVC-Aircraft', 'flowers102', 'Food-101', 'oxfordpets', 'StanfordCars', 'EuroSAT', 'DTD',
    'ImageNet-R', 'builtin' ... all map to the name the loader and the presets use. 'tfds:NAME' is returned
    unchanged (NAME is TFDS's own).

    Raises:
      DatasetError: an unknown name (one line listing the known ones).
    """
    name = name.strip()
    if name.lower().startswith("tfds:"):
        return "tfds:" + name[len("tfds:"):]
    try:
        return _NAME_OF[_compact(name)]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)} (or builtin), tfds:NAME; "
                           f"case, '-' and '_' do not matter, and fgvc, flowers102 are accepted") from None


# CuPL's GPT-3 descriptions, as DualAdapter ships them: gpt3_prompts/<file> (`load_cupl` accepts the folder).
CUPL_FILES: dict[str, str] = {
    "imagenet": "CuPL_prompts_imagenet.json", "caltech101": "CuPL_prompts_caltech101.json",
    "oxford_pets": "CuPL_prompts_oxfordpets.json", "stanford_cars": "CuPL_prompts_stanfordcars.json",
    "oxford_flowers": "CuPL_prompts_flowers102.json", "food101": "CuPL_prompts_food101.json",
    "fgvc_aircraft": "CuPL_prompts_fgvcaircraft.json", "sun397": "CuPL_prompts_sun397.json",
    "dtd": "CuPL_prompts_dtd.json", "eurosat": "CuPL_prompts_eurosat.json", "ucf101": "CuPL_prompts_ucf101.json",
}

# CoOp's EuroSAT NEW_CNAMES (folder name -> natural name).
EUROSAT_NEW_CLASSNAMES: dict[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

# CoOp's Caltech101 NEW_CNAMES (it also drops BACKGROUND_Google and Faces_easy when it builds the split).
CALTECH101_NEW_CLASSNAMES: dict[str, str] = {
    "airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike",
}

_CLASSNAME_FIXES = {"eurosat": EUROSAT_NEW_CLASSNAMES, "caltech101": CALTECH101_NEW_CLASSNAMES}


def clean_classname(dataset: str, name: str) -> str:
    """The text-ready class name: CoOp's per-dataset renames, then '_' -> ' '.

    CoOp's published split files were written after its renames, so the maps are usually no-ops; applying
    them again makes raw folder names (a split regenerated without them) come out the same. Underscores
    become spaces as in CoOp's prompt learner and DualAdapter's text encoder (`classname.replace('_', ' ')`).
    """
    name = name.strip()
    name = _CLASSNAME_FIXES.get(dataset, {}).get(name, name)
    return " ".join(name.replace("_", " ").split())


# Tip-Adapter: one hand-crafted template per dataset, CLIP's 7 selected templates for ImageNet.
IMAGENET_TEMPLATES_TIP = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

TIP_ADAPTER_TEMPLATES: dict[str, list[str]] = {
    "imagenet": IMAGENET_TEMPLATES_TIP,
    "caltech101": ["a photo of a {}."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "stanford_cars": ["a photo of a {}."],
    "oxford_flowers": ["a photo of a {}, a type of flower."],
    "food101": ["a photo of {}, a type of food."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft."],
    "sun397": ["a photo of a {}."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "ucf101": ["a photo of a person doing {}."],
}

# DualAdapter = Tip-Adapter's templates plus a few extra positive ones (its datasets/*.py).
DUALADAPTER_TEMPLATES: dict[str, list[str]] = {
    **TIP_ADAPTER_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES_TIP + ["An image of a {} with bright and natural lighting."],
    "stanford_cars": ["a photo of a {}.", "A {} featuring a wide range of color options for easy selection."],
    "eurosat": ["a centered satellite photo of {}.", "A top-down view of {} arranged in a pattern."],
    "ucf101": ["a photo of a person doing {}.", "A black and white photo of a {} in motion."],
}

# DualAdapter's negative templates, verbatim from its datasets/*.py (`negative_template`). They build the
# negative text classifier W_neg ("a photo without {}."). Reference quirk kept as is: UCF101's second
# negative template is identical to its positive one.
_IMAGENET_NEGATIVE = [
    "itap without any {}.",
    "a bad photo with no {} in it.",
    "a origami piece that isn't a {}.",
    "a photo with no large {}.",
    "a video game scene without a {}.",
    "art that doesn't include a {}.",
    "a photo with no small {}.",
    "A landscape devoid of any {}.",
    "An image completely lacking a {}.",
    "A scene with no trace of {}.",
    "An empty space without any {}.",
    "A picture where {} is conspicuously absent.",
    "A setting that is free from any {}.",
    "A photo without a single {} in sight.",
]

NEGATIVE_TEMPLATES: dict[str, list[str]] = {
    "imagenet": _IMAGENET_NEGATIVE,
    "caltech101": ["a photo without {}."],
    "oxford_pets": ["a photo without {}, a type of pet."],
    "stanford_cars": ["a photo of no {}.", "A non-{} featuring a wide range of color options for easy selection."],
    "oxford_flowers": ["a photo without {}, a type of flower."],
    "food101": ["a photo without {}, a type of food."],
    "fgvc_aircraft": ["a photo without {}, a type of aircraft."],
    "sun397": ["a photo without {}."],
    "dtd": ["not {} texture."],
    "eurosat": ["a centered satellite photo without {}.", "A top-down view without {} arranged in a pattern."],
    "ucf101": ["a photo of a person not doing {}.", "A black and white photo of a {} in motion."],
}
# Default negative templates for datasets DualAdapter never saw (builtin, TFDS).
DEFAULT_NEGATIVE_TEMPLATES = ["a photo without {}."]

# The domain-generalisation sets reuse ImageNet's prompts (their classes are ImageNet classes).
for _name in ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
    TIP_ADAPTER_TEMPLATES[_name] = TIP_ADAPTER_TEMPLATES["imagenet"]
    DUALADAPTER_TEMPLATES[_name] = DUALADAPTER_TEMPLATES["imagenet"]
    NEGATIVE_TEMPLATES[_name] = NEGATIVE_TEMPLATES["imagenet"]
    CUPL_FILES[_name] = CUPL_FILES["imagenet"]

# The positive template lists a method can use (`configs/dualadapter.py`: config.templates): 'tip_adapter' is
# what the official Tip-Adapter code scores both its zero-shot CLIP and its Tip-Adapter(-F) rows with (CLIP's
# hand-crafted prompt per dataset as CoOp lists them, CLIP's 7 selected templates for ImageNet); 'dualadapter'
# adds DualAdapter's extra positive templates.
TEMPLATE_SETS: dict[str, dict[str, list[str]]] = {
    "dualadapter": DUALADAPTER_TEMPLATES, "tip_adapter": TIP_ADAPTER_TEMPLATES,
}
