"""Tests for the few-shot data layer: CoOp layouts, CuPL, sampling, batches, builtin and TFDS sources."""

import collections
import functools
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import datasets_meta as meta
from vlm_jax.data import fewshot
from vlm_jax.data.builtin import builtin_dataset
from vlm_jax.data.fewshot import DatasetError, Example, batches, load_cupl, load_dataset, sample_few_shot
from vlm_jax.data.preprocess import augment, clip_preprocess


def _png(path, value=0, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1] + (3,), value, np.uint8)).save(path)


def _coop_split_dataset(root, dataset_dir, image_dir, split_file, classes, per_split=(3, 2, 2)):
    """Writes images and a split_zhou json with raw class names; returns the dataset folder."""
    base = root / dataset_dir
    split = {}
    for s, n in zip(("train", "val", "test"), per_split):
        split[s] = []
        for label, name in enumerate(classes):
            for k in range(n):
                rel = f"{name}/{s}_{k}.png"
                _png(base / image_dir / rel, value=10 * label + k)
                split[s].append([rel, label, name])
    (base / split_file).write_text(json.dumps(split))
    return base


def test_eurosat_classname_fix_and_templates(tmp_path):
    _coop_split_dataset(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json", ["AnnualCrop", "Forest", "SeaLake"])
    ds = load_dataset("eurosat", tmp_path)
    assert ds.classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]
    assert ds.templates[0] == "a centered satellite photo of {}." and len(ds.templates) == 2
    assert ds.negative_templates[0] == "a centered satellite photo without {}."
    assert [len(s) for s in (ds.train, ds.val, ds.test)] == [9, 6, 6]
    assert ds.train[0].classname == "Annual Crop Land" and ds.train[0].path.endswith("2750/AnnualCrop/train_0.png")
    assert ds.class_subset is None and ds.cupl_prompts is None
    tip = load_dataset("eurosat", tmp_path, template_set="tip_adapter")
    assert tip.templates == ["a centered satellite photo of {}."]


def test_oxford_pets_underscores_and_cupl(tmp_path):
    _coop_split_dataset(tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json",
                        ["abyssinian", "american_bulldog"])
    cupl = tmp_path / "CuPL_prompts_oxfordpets.json"
    cupl.write_text(json.dumps({"Abyssinian": ["a slim cat."], "American Bulldog": ["a stocky dog.", "b."]}))
    ds = load_dataset("oxford_pets", tmp_path, cupl_path=cupl)
    assert ds.classnames == ["abyssinian", "american bulldog"]
    assert ds.templates == ["a photo of a {}, a type of pet."]
    assert ds.cupl_prompts == [["a slim cat."], ["a stocky dog.", "b."]]
    assert ds.num_classes == 2


def test_fgvc_aircraft(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    base.mkdir()
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    image_id = 1000
    for split in ("train", "val", "test"):
        lines = []
        for v in variants:
            for _ in range(2):
                _png(base / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {v}")
                image_id += 1
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset("fgvc", tmp_path)  # DualAdapter's config name is an alias
    assert ds.name == "fgvc_aircraft" and ds.classnames == variants
    assert [ex.label for ex in ds.test] == [0, 0, 1, 1, 2, 2]
    assert ds.train[4].classname == "Cessna 172" and ds.train[4].path.endswith("images/1004.jpg")
    assert ds.templates == ["a photo of a {}, a type of aircraft."]


IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
IMAGENET_NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]


def _imagenet(root):
    base = root / "imagenet"
    base.mkdir(parents=True)
    (base / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(IMAGENET_WNIDS, IMAGENET_NAMES)))
    for label, wnid in enumerate(IMAGENET_WNIDS):
        for k in range(4):
            _png(base / "images" / "train" / wnid / f"{wnid}_{k}.JPEG", value=label)
        _png(base / "images" / "val" / wnid / f"ILSVRC2012_val_{label}.JPEG", value=label)
    return base


def test_imagenet_val_is_test(tmp_path):
    _imagenet(tmp_path)
    ds = load_dataset("imagenet", tmp_path)
    assert ds.classnames == IMAGENET_NAMES and len(ds.templates) == 8  # Tip-Adapter's 7 + DualAdapter's 1
    assert len(ds.negative_templates) == 14
    assert len(ds.train) == 16 and ds.val is ds.test and len(ds.test) == 4
    assert [ex.label for ex in ds.test] == [0, 1, 2, 3]
    assert load_dataset("imagenet", tmp_path, template_set="tip_adapter").templates == meta.IMAGENET_TEMPLATES_TIP


def test_imagenet_a_subset_in_imagenet_label_space(tmp_path):
    _imagenet(tmp_path)  # classnames.txt is only in imagenet/: the variant falls back to it
    base = tmp_path / "imagenet-adversarial" / "imagenet-a"
    for wnid in (IMAGENET_WNIDS[3], IMAGENET_WNIDS[1]):
        for k in range(2):
            _png(base / wnid / f"{k}.jpg")
    (base / "README.txt").write_text("ignored: not a folder")
    ds = load_dataset("imagenet-a", tmp_path)
    assert ds.name == "imagenet_a" and ds.classnames == IMAGENET_NAMES  # the full space
    np.testing.assert_array_equal(ds.class_subset, [1, 3])
    assert [ex.label for ex in ds.test] == [1, 1, 3, 3] and ds.test[0].classname == "goldfish"
    assert ds.train == [] and ds.val == []
    assert ds.templates == meta.DUALADAPTER_TEMPLATES["imagenet"]


def test_imagenetv2_numeric_folders(tmp_path):
    base = tmp_path / "imagenetv2"
    base.mkdir()
    (base / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(IMAGENET_WNIDS, IMAGENET_NAMES)))
    for label in (0, 2):
        _png(base / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg")
    ds = load_dataset("imagenetv2", tmp_path)
    assert [(ex.label, ex.classname) for ex in ds.test] == [(0, "tench"), (2, "great white shark")]
    assert ds.class_subset is None


def test_missing_root_dir_and_split_errors(tmp_path):
    with pytest.raises(DatasetError, match="data root not found") as err:
        load_dataset("eurosat", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "DATASETS.md" in str(err.value)
    with pytest.raises(DatasetError, match="dataset folder not found") as err:
        load_dataset("dtd", tmp_path)
    assert str(tmp_path / "dtd") in str(err.value) and "'DTD'" in str(err.value)
    (tmp_path / "eurosat" / "2750").mkdir(parents=True)
    with pytest.raises(DatasetError) as err:
        load_dataset("eurosat", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "eurosat" / "split_zhou_EuroSAT.json") in msg and "prepare it as in CoOp" in msg
    assert "\n" not in msg and isinstance(err.value, ValueError)
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(
        json.dumps({"train": [["Forest/x.png", 0, "Forest"]], "val": [], "test": []}))
    with pytest.raises(DatasetError, match="missing image.*Forest/x.png"):
        load_dataset("eurosat", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "imagenet").mkdir()
    with pytest.raises(DatasetError, match="classnames.txt not found"):
        load_dataset("imagenet", tmp_path)


def _examples(counts):
    return [Example(f"/img/{label}_{k}.png", label, f"class {label}")
            for k in range(max(counts)) for label, n in enumerate(counts) if k < n]  # classes interleaved


def test_sample_few_shot_counts_order_and_determinism():
    examples = _examples([10, 7, 12])
    a = sample_few_shot(examples, 4, seed=1)
    assert a == sample_few_shot(examples, 4, seed=1)
    assert a != sample_few_shot(examples, 4, seed=2)
    assert [ex.label for ex in a] == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(a)) == 12  # without replacement
    # Same draw as CoOp's generate_fewshot_dataset after random.seed(1) (classes in first-seen order).
    random.seed(1)
    tracker = collections.defaultdict(list)
    for ex in examples:
        tracker[ex.label].append(ex)
    coop = {label: random.sample(items, 4) for label, items in tracker.items()}
    assert a == [ex for label in sorted(coop) for ex in coop[label]]


def test_sample_few_shot_not_enough_images():
    with pytest.raises(DatasetError, match=r"class 'class 1' \(label 1\) has only 3 images but shots=4") as err:
        sample_few_shot(_examples([5, 3, 8]), 4)
    assert "shots <= 3" in str(err.value)
    with pytest.raises(ValueError):
        sample_few_shot(_examples([5]), 0)


def test_load_cupl_matching_and_errors(tmp_path):
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps({"sea or lake": ["water."], "Annual_Crop_Land": ["fields."]}))
    assert load_cupl(path, ["Annual Crop Land", "Sea  or Lake"]) == [["fields."], ["water."]]
    with pytest.raises(DatasetError, match="no sentences for class 'Forest'"):
        load_cupl(path, ["Forest"])
    with pytest.raises(DatasetError, match="not found.*nope.json"):
        load_cupl(tmp_path / "nope.json", ["Forest"])
    path.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="json object"):
        load_cupl(path, ["Forest"])


def test_batches_padding_and_mask(tmp_path):
    examples = []
    for i in range(5):
        _png(tmp_path / f"{i}.png", value=40 * i, size=(20, 30))
        examples.append(Example(str(tmp_path / f"{i}.png"), i % 3, "x"))
    examples.append(Example(None, 2, "mem", np.full((30, 20, 3), 255, np.uint8)))  # in-memory example
    transform = functools.partial(clip_preprocess, size=16, crop_size=16)
    out = list(batches(examples, 4, transform, num_workers=2))
    assert len(out) == 2
    images, labels, valid = out[1]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32 and labels.tolist() == [1, 2, 0, 0]
    assert valid.tolist() == [True, True, False, False]
    assert np.all(images[2:] == 0)
    np.testing.assert_array_equal(out[0][0][1], transform(tmp_path / "1.png"))
    assert len(list(batches(examples, 4, transform, drop_remainder=True))) == 1
    assert list(batches([], 4, transform)) == []


def test_batches_seeded_augmentation_is_deterministic(tmp_path):
    examples = [Example(None, k, "x", np.random.RandomState(k).randint(0, 256, (40, 50, 3), np.uint8))
                for k in range(3)]
    transform = functools.partial(augment, size=24)
    run = lambda seed, workers: next(batches(examples, 3, transform, seed=seed, num_workers=workers))[0]
    np.testing.assert_array_equal(run(5, 1), run(5, 3))  # independent of thread scheduling
    assert not np.array_equal(run(5, 2), run(6, 2))
    np.testing.assert_array_equal(run(5, 1)[2], augment(examples[2].array, np.random.default_rng([5, 2]), size=24))


def test_builtin_dataset_real_photos_deterministic():
    ds = builtin_dataset()
    assert ds.name == "skimage_photos" and ds.num_classes == 10 and "cat" in ds.classnames
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        counts = collections.Counter(ex.label for ex in getattr(ds, split))
        assert counts == {c: n for c in range(10)}
    ex = ds.train[0]
    assert ex.path is None and ex.array.shape == (96, 96, 3) and ex.array.dtype == np.uint8
    # Real photos, not noise or flat colour: textured, and classes differ in their colour statistics.
    means = np.array([np.mean([e.array.mean((0, 1)) for e in ds.test if e.label == c], 0) for c in range(10)])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(10, 1)]
    assert np.std(ex.array) > 10 and distances.min() > 3
    again = load_dataset("skimage_photos", None)
    assert all(np.array_equal(a.array, b.array) for a, b in zip(ds.train + ds.test, again.train + again.test))
    assert len(ds.cupl_prompts) == 10 and all(len(p) == 3 for p in ds.cupl_prompts)
    assert len(sample_few_shot(ds.train, 16)) == 160
    assert not np.array_equal(ds.train[0].array, ds.val[0].array)
    small = builtin_dataset(image_size=32, train_per_class=2, val_per_class=1, test_per_class=1)
    assert len(small.train) == 20 and small.train[0].array.shape == (32, 32, 3)


# --------------------------------------------------------------------------------------------------------
# TFDS (array_record, built offline in tmp_path; no TensorFlow needed)


def _tiny_tfds(data_dir, num_train=6):
    import tensorflow_datasets as tfds

    class TinyPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["red_square", "blue_square"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(num_train), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                img = np.zeros((8, 10, 3), np.uint8)
                img[..., 0 if i % 2 == 0 else 2] = 200
                buf = io.BytesIO()  # pre-encoded PNG: encoding an array would need TensorFlow
                Image.fromarray(img).save(buf, format="PNG")
                yield i, {"image": io.BytesIO(buf.getvalue()), "label": i % 2}

    TinyPhotos(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "tiny_photos"


def test_tfds_dataset_array_record(tmp_path):
    from vlm_jax.data.tfds_source import tfds_dataset
    name = _tiny_tfds(tmp_path)
    ds = tfds_dataset(name, tmp_path)
    assert ds.classnames == ["red square", "blue square"] and ds.val is ds.test  # no val split -> test
    assert len(ds.train) == 6 and len(ds.test) == 2
    ex = ds.train[0]
    assert ex.path is None and ex.array.shape == (8, 10, 3) and ex.classname == ds.classnames[ex.label]
    assert ex.array[0, 0, 0 if ex.label == 0 else 2] == 200
    assert sorted(ds.train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    few = sample_few_shot(ds.train, 2, seed=0)
    assert [e.label for e in few] == [0, 0, 1, 1]
    images, labels, valid = next(batches(few, 4, functools.partial(clip_preprocess, size=8, crop_size=8)))
    assert images.shape == (4, 8, 8, 3) and labels.tolist() == [0, 0, 1, 1] and valid.all()
    via_load = load_dataset(f"tfds:{name}", tmp_path)
    assert via_load.name == f"tfds:{name}" and len(via_load.train) == 6
    with pytest.raises(DatasetError, match="no split 'validation'"):
        tfds_dataset(name, tmp_path, val_split="validation")


def test_tfds_errors(tmp_path):
    from vlm_jax.data.tfds_source import tfds_dataset
    with pytest.raises(DatasetError, match="not found.*file_format=array_record") as err:
        tfds_dataset("no_such_dataset_xyz", tmp_path)
    assert "\n" not in str(err.value)
    name = _tiny_tfds(tmp_path, num_train=2)
    info_path = next(tmp_path.glob(f"{name}/*/dataset_info.json"))
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"  # what a default `tfds build` writes; reading it needs TensorFlow
    info_path.write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="stored as tfrecord.*array_record"):
        tfds_dataset(name, tmp_path)
    with pytest.raises(DatasetError, match="no feature 'img'"):
        info["fileFormat"] = "array_record"
        info_path.write_text(json.dumps(info))
        tfds_dataset(name, tmp_path, image_key="img")


def test_dataset_aliases():
    from vlm_jax.errors import UserError
    assert issubclass(DatasetError, UserError) and issubclass(DatasetError, ValueError)  # one-line launcher errors
    assert fewshot.canonical_name("ImageNet-R") == "imagenet_r"
    assert load_dataset("builtin", None).name == "skimage_photos"
    assert fewshot.canonical_name("flowers102") == "oxford_flowers"
    assert set(meta.DUALADAPTER_TEMPLATES) == set(meta.NEGATIVE_TEMPLATES) == set(meta.COOP_LAYOUTS)
    assert all(t.count("{}") == 1 for ts in meta.NEGATIVE_TEMPLATES.values() for t in ts)
    assert all(t.count("{}") == 1 for ts in meta.DUALADAPTER_TEMPLATES.values() for t in ts)


# Alias or case variant -> canonical name, as the references (yaml names, CoOp class names, CuPL file names) and
# users spell them.
ALIASES = {
    "fgvc": "fgvc_aircraft", "FGVCAircraft": "fgvc_aircraft", "fgvc-aircraft": "fgvc_aircraft",
    "flowers102": "oxford_flowers", "OxfordFlowers": "oxford_flowers", "food-101": "food101", "Food101": "food101",
    "oxfordpets": "oxford_pets", "OxfordPets": "oxford_pets", "stanfordcars": "stanford_cars",
    "Stanford_Cars": "stanford_cars", "EuroSAT": "eurosat", "DTD": "dtd", "DescribableTextures": "dtd",
    "ImageNet": "imagenet", "caltech-101": "caltech101", "SUN397": "sun397", "UCF101": "ucf101",
    "ImageNet-Sketch": "imagenet_sketch", "ImageNetA": "imagenet_a", "imagenet-v2": "imagenetv2",
    "builtin": "skimage_photos", "tfds:oxford_iiit_pet": "tfds:oxford_iiit_pet",
}


def test_every_alias_and_case_variant_is_one_canonical_name():
    for alias, name in ALIASES.items():
        assert meta.canonical_name(alias) == fewshot.canonical_name(alias) == name, alias
    with pytest.raises(DatasetError) as err:
        meta.canonical_name("cifar10")
    assert "unknown dataset 'cifar10'; known: imagenet, caltech101" in str(err.value) and "\n" not in str(err.value)


def test_template_sets_and_cupl_files_cover_every_dataset():
    for sets in (meta.TEMPLATE_SETS["tip_adapter"], meta.TEMPLATE_SETS["dualadapter"], meta.CUPL_FILES):
        assert set(sets) == set(meta.COOP_LAYOUTS)
    ds = builtin_dataset()
    assert ds.templates_of("tip_adapter") == ["a photo of a {}."] and ds.templates == ds.templates_of("dualadapter")
    with pytest.raises(DatasetError, match="unknown template set 'clip'"):
        ds.templates_of("clip")


def test_cupl_folder_reads_the_datasets_official_file(tmp_path):
    folder = tmp_path / "gpt3_prompts"  # DualAdapter's folder, with its file names
    folder.mkdir()
    (folder / "CuPL_prompts_oxfordpets.json").write_text(json.dumps({"Abyssinian": ["a slim cat."],
                                                                     "american_bulldog": ["a stocky dog."]}))
    _coop_split_dataset(tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json",
                        ["abyssinian", "american_bulldog"])
    ds = load_dataset("OxfordPets", tmp_path, cupl_path=folder)
    assert ds.cupl_prompts == [["a slim cat."], ["a stocky dog."]]
    with pytest.raises(DatasetError, match="has no CuPL_prompts_dtd.json .the file of dtd"):
        load_cupl(folder, ["banded"], dataset="dtd")
    with pytest.raises(DatasetError, match="is a folder, but skimage_photos has no official CuPL file"):
        load_cupl(folder, ["cat"], dataset="skimage_photos")


def test_shot_folds_hold_out_each_shot_once_and_keep_classes_balanced():
    labels = np.array([2, 0, 1, 0, 2, 1, 1, 0, 2, 2, 1, 0])  # 3 classes x 4 shots, interleaved
    folds = fewshot.shot_folds(labels, 3)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(12))
    for tr, h in folds:
        assert sorted(set(tr) | set(h)) == list(range(12)) and not set(tr) & set(h)
        counts = np.bincount(labels[tr], minlength=3)
        assert counts.min() == counts.max()
    # Fold f holds out the shots whose rank within their class is f mod 3: class 0 sits at 1, 3, 7, 11.
    assert [sorted(set(h) & {1, 3, 7, 11}) for _, h in folds] == [[1, 11], [3], [7]]
    with pytest.raises(ValueError):
        fewshot.shot_folds(labels, 5)
