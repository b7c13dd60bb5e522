"""The few-shot CLIP program's protocol choices, each against an outside reference.

Dataset names and their presets (the official yaml values the issue quotes), the official two-subset draw
(Dassl's generate_fewshot_dataset, transcribed below), each baseline's templates (Tip-Adapter's and DualAdapter's
datasets/*.py), Tip-Adapter-F's test selection (the official main.py's rule), food101's eps (its yaml), CuPL's
folder, and the realistic protocol, which must never read the val split.
"""

import collections
import dataclasses
import importlib.util
import json
import os
import random

import jax
import numpy as np
import pytest

from vlm_jax.data import datasets_meta as meta
from vlm_jax.data import fewshot
from vlm_jax.data.builtin import builtin_dataset
from vlm_jax.data.fewshot import DatasetError, Example
from vlm_jax.methods import dualadapter as da
from vlm_jax.methods import tip_adapter as tip
from vlm_jax.programs import fewshot_clip
from vlm_jax.programs import fewshot_methods as fm
from vlm_jax.programs import fewshot_realistic
from vlm_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("dualadapter_config", os.path.join(ROOT, "configs", "dualadapter.py"))
da_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(da_config)

# ------------------------------------------------------------------------------------ dataset names -> presets

# alias or case variant -> canonical name, as the references and users spell them.
ALIASES = {
    "fgvc": "fgvc_aircraft", "FGVC": "fgvc_aircraft", "fgvc_aircraft": "fgvc_aircraft",
    "FGVCAircraft": "fgvc_aircraft", "fgvc-aircraft": "fgvc_aircraft",
    "flowers102": "oxford_flowers", "Flowers102": "oxford_flowers", "oxford_flowers": "oxford_flowers",
    "OxfordFlowers": "oxford_flowers", "food-101": "food101", "Food101": "food101", "oxfordpets": "oxford_pets",
    "OxfordPets": "oxford_pets", "oxford-pets": "oxford_pets", "stanfordcars": "stanford_cars",
    "StanfordCars": "stanford_cars", "EuroSAT": "eurosat", "DTD": "dtd", "DescribableTextures": "dtd",
    "ImageNet": "imagenet", "Caltech101": "caltech101", "caltech-101": "caltech101", "SUN397": "sun397",
    "UCF101": "ucf101", " ucf101 ": "ucf101",
}


@pytest.mark.parametrize("alias, name", ALIASES.items())
def test_every_alias_gets_its_datasets_presets(alias, name):
    c = da_config.get_config(f"dataset={alias}")
    assert c.data.name == c.data.preset == name
    p, t = da.PRESETS[name], tip.PRESETS[name]
    assert c.dualadapter.train.optim.lr == p["lr"] and c.dualadapter.train.epochs == p["train_epoch"]
    assert (c.dualadapter.init.alpha, c.dualadapter.init.beta) == (p["init_alpha"], p["init_beta"])
    assert c.dualadapter.search.beta.stop == p["search_scale2"][0]
    assert (c.tip_adapter.init.alpha, c.tip_adapter.search.alpha.stop) == (t["init_alpha"], t["search_scale"][1])


def test_fgvc_gets_the_official_fgvc_yaml():
    # DualAdapter's configs/fgvc.yaml, as the issue quotes it: lr 5e-4, init alpha/beta 8/3, beta grid [0, 20).
    c = da_config.get_config("dataset=fgvc")
    assert c.dualadapter.train.optim.lr == 5e-4
    assert (c.dualadapter.init.alpha, c.dualadapter.init.beta) == (8.0, 3.0)
    assert (c.dualadapter.search.beta.start, c.dualadapter.search.beta.stop) == (0.0, 20.0)


def test_unknown_dataset_is_one_line_listing_the_known_ones():
    with pytest.raises(DatasetError) as err:
        da_config.get_config("dataset=mnist")
    msg = str(err.value)
    assert "unknown dataset 'mnist'" in msg and "\n" not in msg
    assert all(name in msg for name in ("fgvc_aircraft", "oxford_flowers", "eurosat", "tfds:NAME"))
    assert meta.canonical_name("tfds:Oxford_IIIT_Pet") == "tfds:Oxford_IIIT_Pet"  # TFDS's own name, untouched


def test_data_name_changed_after_the_presets_is_refused():
    c = da_config.get_config("runlocal")
    c.data.name = "fgvc"
    with pytest.raises(fewshot_clip.errors.UserError, match="took the presets .* of 'skimage_photos'"):
        fewshot_clip.load_data(c.data)


# ------------------------------------------------------------------------------------ the two official subsets

def dassl_generate_fewshot_dataset(data_source, num_shots, repeat=True):
    """Transcription of Dassl's DatasetBase.generate_fewshot_dataset for one data source (module `random`)."""
    tracker = collections.defaultdict(list)  # split_dataset_by_label
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for label, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        else:
            sampled_items = random.choices(items, k=num_shots) if repeat else items
        dataset.extend(sampled_items)
    return dataset


def _by_class(examples):
    out = collections.defaultdict(list)
    for ex in examples:
        out[ex.label].append(ex)
    return dict(out)


def _train_split():
    # Classes of different sizes, interleaved, label 3 first: first-appearance order is not label order.
    sizes = {3: 9, 0: 12, 4: 7, 1: 10, 2: 8}
    rng = np.random.default_rng(0)
    items = [Example(f"/img/{y}_{k}.jpg", y, f"class {y}") for y, n in sizes.items() for k in range(n)]
    order = [0] + list(1 + rng.permutation(len(items) - 1))
    return [items[i] for i in order]


@pytest.mark.parametrize("shots", [1, 2, 4])
def test_dualadapter_f_trains_on_the_official_second_draw(shots):
    train = _train_split()
    config = da_config.get_config("dataset=eurosat")
    for seed in (1, 2):
        few, train_few = fewshot_clip.training_subsets(config, train, shots, seed)
        random.seed(seed)  # extract_features.py: random.seed(1), then build_dataset -> the cache subset
        cache_ref = dassl_generate_fewshot_dataset(train, shots)
        random.seed(3407 + seed - 1)  # main.py: random.seed(cfg['seed']) = 3407, then the training loader's subset
        train_ref = dassl_generate_fewshot_dataset(train, shots)
        assert _by_class(few) == _by_class(cache_ref) and [e.label for e in few] == sorted(e.label for e in few)
        assert _by_class(train_few) == _by_class(train_ref)
        distinct = {(e.label, e.path) for e in few + train_few}
        assert len(distinct) <= 2 * shots * 5
        if shots > 1:
            assert train_few != few  # a second draw, not the cache's shots
    config.dualadapter.train.data = "cache"
    few, train_few = fewshot_clip.training_subsets(config, train, 4, 1)
    assert train_few is few
    config.dualadapter.train.data = "both"
    with pytest.raises(fewshot_clip.errors.UserError, match="second_draw' or 'cache'"):
        fewshot_clip.training_subsets(config, train, 4, 1)


# ------------------------------------------------------------------------------------ templates per method

# Tip-Adapter's datasets/*.py `template` (and CLIP's 7 ImageNet templates), DualAdapter's datasets/*.py.
TIP_ADAPTER_TEMPLATES = {
    "eurosat": ["a centered satellite photo of {}."], "dtd": ["{} texture."],
    "oxford_pets": ["a photo of a {}, a type of pet."], "food101": ["a photo of {}, a type of food."],
    "imagenet": ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}."],
}
DUALADAPTER_TEMPLATES = {
    "eurosat": ["a centered satellite photo of {}.", "A top-down view of {} arranged in a pattern."],
    "dtd": ["{} texture."],
    "imagenet": TIP_ADAPTER_TEMPLATES["imagenet"] + ["An image of a {} with bright and natural lighting."],
}


class _RecordingBackbone:
    """Stands in for `fewshot_clip.Backbone`: each classifier is the index of the prompt list that built it."""
    fingerprint, pp = {}, {}

    def __init__(self):
        self.calls = []

    def text_classifier(self, prompts_per_class, batch_size):
        self.calls.append(prompts_per_class)
        return np.full((len(prompts_per_class), 4), float(len(self.calls) - 1), np.float32)


def _eurosat(root, classes=("Forest", "River")):
    base = root / "eurosat"
    split = {s: [[f"{c}/{s}.png", i, c] for i, c in enumerate(classes)] for s in ("train", "val", "test")}
    for s in split.values():
        for rel, _, _ in s:
            (base / "2750" / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / "2750" / rel).write_bytes(b"")
    (base / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return fewshot.load_dataset("eurosat", root)


def test_each_method_scores_with_its_papers_templates(tmp_path):
    for name, want in TIP_ADAPTER_TEMPLATES.items():
        assert meta.TEMPLATE_SETS["tip_adapter"][name] == want, name
    for name, want in DUALADAPTER_TEMPLATES.items():
        assert meta.TEMPLATE_SETS["dualadapter"][name] == want, name
    ds = _eurosat(tmp_path)
    config = da_config.get_config("dataset=eurosat")
    bb = _RecordingBackbone()
    text = fewshot_clip.text_features(bb, ds, config.data, [config.templates[m] for m in config.templates], None)
    w = fm.text_weights(config, text)

    def prompts(classifier):
        return bb.calls[int(classifier[0, 0])]

    assert prompts(w["zeroshot"]) == [["a centered satellite photo of Forest."],
                                      ["a centered satellite photo of River."]]
    assert prompts(w["tip"]) == prompts(w["zeroshot"])
    assert prompts(w["template"])[1] == [t.format("River") for t in DUALADAPTER_TEMPLATES["eurosat"]]
    assert prompts(w["negative"])[0][0] == "a centered satellite photo without Forest."
    config.templates.zeroshot = "clip_80"
    with pytest.raises(DatasetError, match="unknown template set 'clip_80'"):
        ds.templates_of(config.templates.zeroshot)


# ------------------------------------------------------------------------------------ paper protocol, fits spied

class _Writer:
    def write(self, *a, **k):
        pass


def _features(rng, n, d=8):
    f = rng.normal(size=(n, d)).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _problem(num_classes=3, shots=2, d=8):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), shots).astype(np.int32)
    text = {k: _features(rng, num_classes, d)
            for k in ("template/tip_adapter", "template/dualadapter", "negative", "cupl")}
    split = lambda n: {"features": _features(rng, n, d), "labels": rng.integers(0, num_classes, n).astype(np.int32)}
    return text, {"keys": _features(rng, len(labels), d), "labels": labels}, split(12), split(9)


def _small(config):
    for m in ("dualadapter", "tip_adapter"):
        for g in config[m].search.values():
            g.steps = 3
    return config


def _fake_finetune(record, selection_accuracy=99.0):
    def finetune(bb, few, tc, **kw):
        record.append(dict(kw, few=few, tc=tc))
        hist = [{"epoch": e, "val_accuracy": 50.0 + e} for e in range(tc.epochs)]
        return trainer.FitResult(state=None, best_params={"adapter": kw["adapter"]}, best_epoch=tc.epochs - 1,
                                 best_metrics={"val_accuracy": selection_accuracy}, history=hist)
    return finetune


@pytest.mark.parametrize("selection", ["val", "test"])
def test_tip_adapter_f_selection_and_dualadapter_f_data(monkeypatch, selection):
    text, cache, val, test = _problem()
    config = _small(da_config.get_config("dataset=food101"))
    config.tip_adapter.train.selection = selection
    fits = []
    monkeypatch.setattr(fm, "finetune", _fake_finetune(fits))
    few = [Example(f"/c{y}_{i}", int(y), "c") for i, y in enumerate(cache["labels"])]
    train_few = [Example(f"/d{y}_{i}", int(y), "c") for i, y in enumerate(cache["labels"])]
    ds = dataclasses.replace(builtin_dataset(), classnames=["a", "b", "c"])
    out = fm.run_paper(config, ["tip_adapter_f", "dualadapter_f"], None, ds, few, train_few, text, val,
                       {"test": (test, None)}, cache, shots=1, seed=1, workdir=None, writer=_Writer(),
                       rng=jax.random.key(0))
    tip_fit, dual_fit = fits
    assert tip_fit["select_on"] is (test if selection == "test" else val)
    assert tip_fit["few"] is few and dual_fit["few"] is train_few and dual_fit["select_on"] is val
    # food101.yaml: "eps: 0.001 # 0.01 for 1/2-shot, 0.001 for others".
    assert dual_fit["optim"]["eps"] == 0.01 and fm.dualadapter_optim(config.dualadapter.train, 4)["eps"] == 0.001
    assert out["dualadapter_f"]["distinct_images"] == len(few) + len(train_few)  # disjoint fakes here
    res = out["tip_adapter_f"]
    assert res["selection"] == selection
    # The official main.py prints max(best test epoch's accuracy, the searched accuracy) under selection on test.
    assert (res["test_accuracy"] == 99.0) == (selection == "test")
    marks, notes = fewshot_clip.result_notes(config, ["tip_adapter_f"], ds, realistic=False)
    assert ("tip_adapter_f" in marks) == (selection == "test")
    assert any("selected on the *test* split" in n for n in notes) == (selection == "test")


# ------------------------------------------------------------------------------------ CuPL

def test_missing_cupl_is_one_line_in_results(tmp_path):
    ds = _eurosat(tmp_path / "data")
    config = da_config.get_config("dataset=eurosat")
    for cupl, methods in ((None, ["dualadapter"]), (None, ["dualadapter_f"]), ([["x"], ["y"]], ["dualadapter"]),
                          (None, ["tip_adapter"])):
        _, notes = fewshot_clip.result_notes(config, methods, dataclasses.replace(ds, cupl_prompts=cupl), False)
        assert sum("without CuPL" in n for n in notes) == (cupl is None and methods != ["tip_adapter"])


# ------------------------------------------------------------------------------------ realistic protocol

class _Poisoned(list):
    """A val split that fails on any read, its length included."""

    def _fail(self, *a, **k):
        raise AssertionError("the realistic protocol read the val split")

    __len__ = __iter__ = __getitem__ = __bool__ = _fail


def test_realistic_protocol_never_reads_val(tmp_path, monkeypatch):
    config = da_config.get_config("runlocal,protocol=realistic")
    config.feature_cache_dir = str(tmp_path / "features")
    for m in ("dualadapter", "tip_adapter"):
        config[m].train.epochs = 2
    ds = builtin_dataset()
    poisoned = dataclasses.replace(ds, val=_Poisoned())
    monkeypatch.setattr(fewshot_clip, "load_data", lambda dc: poisoned)
    fits, seen = [], {}
    monkeypatch.setattr(fm, "finetune", _fake_finetune(fits))
    real = fewshot_realistic.run_realistic

    def spy(*args, **kw):
        seen["args"], seen["kw"] = args, kw
        return real(*args, **kw)

    monkeypatch.setattr(fewshot_realistic, "run_realistic", spy)
    out = fewshot_clip.run(config, str(tmp_path / "run"))
    (run,) = out["runs"]
    assert "methods" not in run and set(run["realistic"]) == set(da_config.METHODS) and out["val_size"] is None
    # What the protocol received: the support set (the K cache shots), the tests, nothing of val.
    _, _, _, _, few, _, support, tests, cache = seen["args"]
    assert list(tests) == ["test"] and len(few) == 10 * config.data.shots
    assert np.array_equal(support["labels"], [e.label for e in few])
    train_ids = {id(e) for e in ds.train}
    for fit in fits:  # 2 folds + the final fit, for Tip-Adapter-F and DualAdapter-F
        assert {id(e) for e in fit["few"]} <= {id(e) for e in few} <= train_ids
        if fit["select_on"] is not None:  # a fold: selection on its held-out support shots
            rows = fit["select_on"]["features"]
            assert len(rows) == len(few) // 2 and all((support["features"] == r).all(1).any() for r in rows)
        else:
            assert fit["keep_epoch"] == 1 and len(fit["few"]) == len(few)  # pooled curve 50, 51: epoch 1
    assert len(fits) == 6
    assert all(r["folds"] == 2 for r in run["realistic"].values())
    assert "4-shot" in open(tmp_path / "run" / "results.md").read()


def test_protocol_choices_are_checked_before_any_work():
    config = da_config.get_config("runlocal")
    fewshot_clip.check_choices(config)
    for key, value in (("protocol", "val"), ("selection", "best")):
        bad = da_config.get_config("runlocal")
        if key == "protocol":
            bad.protocol = value
        else:
            bad.tip_adapter.train.selection = value
        with pytest.raises(fewshot_clip.errors.UserError, match=f"got '{value}'"):
            fewshot_clip.check_choices(bad)
    with pytest.raises(ValueError, match="protocol must be one of paper, realistic, both"):
        da_config.get_config("protocol=cv")
