"""Tests for MedMNIST v2 2D loading, VITask prompts, answer matching and metrics (tiny fake npz files)."""

import numpy as np
import pytest

from vlm_jax.data import medmnist as mm
from vlm_jax.data.fewshot import DatasetError, batches, sample_few_shot
from vlm_jax.data.medmnist import (MEDMNIST, accuracy, instruction, load_medmnist, macro_f1, match_answer,
                                   match_answers, response)


def _write(path, *, rgb=False, classes=3, multi=0, n=(4, 2, 3), hw=5, drop=(), labels_1d=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, hw, hw, 3) if rgb else (k, hw, hw)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if multi:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (k, multi)).astype(np.uint8)
        else:
            y = (np.arange(k) % classes).astype(np.uint8)
            arrays[f"{split}_labels"] = y if labels_1d else y[:, None]
    for key in drop:
        del arrays[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def test_metadata():
    assert len(MEDMNIST) == 12
    counts = {k: len(v.labels) for k, v in MEDMNIST.items()}
    assert counts == dict(pathmnist=9, chestmnist=14, dermamnist=7, octmnist=4, pneumoniamnist=2, retinamnist=5,
                          breastmnist=2, bloodmnist=8, tissuemnist=8, organamnist=11, organcmnist=11, organsmnist=11)
    assert sum(counts.values()) - 2 * 11 == 70  # VITask's 70-way TSM head: the three Organ sets share 11 labels
    assert MEDMNIST["chestmnist"].task == mm.MULTI_LABEL and MEDMNIST["retinamnist"].task == mm.ORDINAL
    assert len({v.modality for v in MEDMNIST.values()}) == 9  # VITask: 9 modalities


def test_load_grayscale_multiclass(tmp_path):
    arrays = _write(tmp_path / "pathmnist.npz", classes=9)
    ds = load_medmnist("PathMNIST", tmp_path)
    assert (ds.name, ds.num_classes, ds.multi_label, ds.modality) == ("pathmnist", 9, False, "colon pathology")
    assert [len(ds.train), len(ds.val), len(ds.test)] == [4, 2, 3]
    ex = ds.test[2]
    assert ex.array.shape == (5, 5) and ex.array.dtype == np.uint8 and ex.path is None
    np.testing.assert_array_equal(ex.array, arrays["test_images"][2])
    assert (ex.label, ex.classname, ex.multi_hot) == (2, "debris", None)
    assert ex.image().mode == "RGB" and ex.image().size == (5, 5)
    # Works with the few-shot helpers.
    assert len(sample_few_shot(ds.train, 1)) == 4
    (images, labels, valid), = list(batches(ds.val, 4, lambda im: np.asarray(im, np.float32), num_workers=1))
    assert images.shape == (4, 5, 5, 3) and labels.tolist() == [0, 1, 0, 0] and valid.tolist() == [1, 1, 0, 0]


def test_load_rgb_sized_and_1d_labels(tmp_path):
    _write(tmp_path / "bloodmnist_64.npz", rgb=True, classes=8, labels_1d=True)
    ds = load_medmnist("bloodmnist", tmp_path, size=64)
    assert ds.size == 64 and ds.train[0].array.shape == (5, 5, 3) and ds.train[3].label == 3
    with pytest.raises(DatasetError, match="bloodmnist.npz not found"):
        load_medmnist("bloodmnist", tmp_path)  # 28x28 file absent


def test_load_chest_multilabel(tmp_path):
    arrays = _write(tmp_path / "chestmnist.npz", multi=14, n=(6, 1, 1))
    arrays["train_labels"][0] = 0
    arrays["train_labels"][1] = 0
    arrays["train_labels"][1, [2, 4]] = 1
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    ds = load_medmnist("chestmnist", tmp_path)
    assert ds.multi_label and ds.num_classes == 14
    assert ds.train[0].label == -1 and ds.train[0].classname == "normal"
    assert ds.train[0].multi_hot.tolist() == [0] * 14
    assert ds.train[1].classname == "effusion, mass" and ds.train[1].multi_hot.sum() == 2


def test_load_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"dermamnist\.npz not found: .*MedMNIST release.*pip install medmnist"):
        load_medmnist("dermamnist", tmp_path)
    with pytest.raises(DatasetError, match="unknown MedMNIST dataset 'foo'"):
        load_medmnist("foo", tmp_path)
    with pytest.raises(DatasetError, match="size must be one of"):
        load_medmnist("dermamnist", tmp_path, size=32)
    with pytest.raises(DatasetError, match="no MedMNIST folder"):
        load_medmnist("dermamnist", None)
    _write(tmp_path / "octmnist.npz", classes=4, drop=("val_labels",))
    with pytest.raises(DatasetError, match=r"octmnist\.npz lacks key\(s\) val_labels"):
        load_medmnist("octmnist", tmp_path)
    _write(tmp_path / "octmnist.npz", classes=6, n=(6, 2, 3))  # labels 4, 5 out of range
    with pytest.raises(DatasetError, match="out of range"):
        load_medmnist("octmnist", tmp_path)
    _write(tmp_path / "chestmnist.npz", classes=2)  # [N, 1] labels for the multi-label set
    with pytest.raises(DatasetError, match=r"train_labels has shape \[4, 1\], expected \[4, 14\]"):
        load_medmnist("chestmnist", tmp_path)
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="cannot read"):
        load_medmnist("breastmnist", tmp_path)
    assert issubclass(DatasetError, ValueError)


def test_prompts():
    assert instruction("pneumoniamnist") == \
        "Analyze the given chest X-ray image. The possible diagnoses are: normal, pneumonia."
    assert instruction("octmnist", include_labels=False) == "Analyze the given retinal OCT image."
    assert instruction("organamnist").startswith("Analyze the given abdominal CT image. The possible diagnoses "
                                                 "are: bladder, femur-left, ")
    assert response(["melanoma"]) == "melanoma."
    assert response(["effusion", "mass"]) == "effusion, mass."
    assert response([]) == "normal."


def test_match_answer():
    organ = MEDMNIST["organamnist"].labels
    derma = MEDMNIST["dermamnist"].labels
    assert match_answer("Femur-Left.", organ) == 1
    assert match_answer("  KIDNEY right ", organ) == 5
    assert match_answer("The organ is the liver.", organ) == 6  # label inside answer
    assert match_answer("kidney", organ) is None  # substring of two labels: ambiguous
    assert match_answer("liver or spleen", organ) is None  # two labels inside the answer
    assert match_answer("basal cell", derma) == 1  # answer inside one label
    assert match_answer("melanoma.", derma) == 4
    assert match_answer("lesions", derma) is None  # in two labels
    assert match_answer("melano", derma) is None  # whole words only
    assert match_answer("", derma) is None and match_answer("...", derma) is None
    assert match_answer("normal, benign.", MEDMNIST["breastmnist"].labels) == 1
    assert match_answer("normal", MEDMNIST["breastmnist"].labels) == 1
    assert match_answer("3", MEDMNIST["retinamnist"].labels) == 3
    assert match_answer("grade 3 of 4", MEDMNIST["retinamnist"].labels) is None
    assert match_answer("immature granulocytes", MEDMNIST["bloodmnist"].labels) == 3
    assert match_answer("lymphocyte", MEDMNIST["bloodmnist"].labels) == 4
    # A label contained in another matching label yields to the longer one.
    assert match_answer("it is lung left", ["lung", "lung left", "heart"]) == 1
    assert match_answers(["heart.", "x", "liver"], organ).tolist() == [3, -1, 6]
    # Every label's own response round-trips, for all datasets.
    for info in MEDMNIST.values():
        for i, name in enumerate(info.labels):
            assert match_answer(response([name]), info.labels) == i


def test_metrics_hand_computed():
    true = np.array([0, 0, 1, 1, 2, 2], np.int32)
    pred = np.array([0, 1, 1, -1, 2, 0], np.int32)
    assert accuracy(pred, true) == pytest.approx(3 / 6)
    # class 0: TP1 FP1 FN1 -> 0.5; class 1: TP1 FP1 FN1 -> 0.5; class 2: TP1 FP0 FN1 -> 2/3
    assert macro_f1(pred, true, 3) == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    # An absent class (3) scores 0 (zero_division=0 over labels=range(C)).
    assert macro_f1(pred, true, 4) == pytest.approx((0.5 + 0.5 + 2 / 3) / 4)
    assert macro_f1(true, true, 3) == 1.0 and accuracy(true, true) == 1.0
    assert macro_f1(np.full(6, -1), true, 3) == 0.0 and accuracy(np.full(6, -1), true) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        accuracy(pred[:2], true)
    with pytest.raises(ValueError, match="true labels"):
        macro_f1(pred, true, 2)


def test_macro_f1_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    true = rng.integers(0, 5, 200)
    pred = np.where(rng.random(200) < 0.1, -1, rng.integers(0, 5, 200))
    want = sklearn_metrics.f1_score(true, pred, labels=list(range(5)), average="macro", zero_division=0)
    assert macro_f1(pred, true, 5) == pytest.approx(want)


def test_match_label_set():
    chest = MEDMNIST["chestmnist"].labels
    names = lambda hot: None if hot is None else [chest[i] for i in np.flatnonzero(hot)]
    assert names(mm.match_label_set("Effusion, Mass.", chest)) == ["effusion", "mass"]
    assert names(mm.match_label_set("mass, effusion", chest)) == ["effusion", "mass"]  # order-free
    assert names(mm.match_label_set("effusion and mass; hernia", chest)) == ["effusion", "mass", "hernia"]
    assert names(mm.match_label_set("normal.", chest)) == []
    assert names(mm.match_label_set("No finding", chest, none="no finding")) == []
    assert names(mm.match_label_set("normal", chest, none="no finding")) is None  # not a label, not the none text
    assert names(mm.match_label_set("effusion, tumour", chest)) is None  # one unmatched piece: the whole answer
    assert names(mm.match_label_set("", chest)) is None and names(mm.match_label_set(" , ", chest)) is None
    assert names(mm.match_label_set("the finding is pleural", chest)) == ["pleural"]
    # Every response round-trips.
    rng = np.random.default_rng(0)
    for _ in range(20):
        hot = rng.random(14) < 0.2
        got = mm.match_label_set(response([chest[i] for i in np.flatnonzero(hot)]), chest)
        np.testing.assert_array_equal(got, hot)
    # A label that holds ' and ' is still recognised whole.
    derma = MEDMNIST["dermamnist"].labels
    assert names(mm.match_label_set(derma[0] + ".", derma)) is not None


def test_instruction_any_modality_and_no_finding_response():
    assert mm.format_instruction("brain MRI", ["glioma", "no tumor"]) == \
        "Analyze the given brain MRI image. The possible diagnoses are: glioma, no tumor."
    assert mm.format_instruction("brain MRI", ["glioma"], include_labels=False) == "Analyze the given brain MRI image."
    assert response([], none="no finding") == "no finding."


def test_multilabel_metrics():
    true = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 0]], bool)
    pred = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0]], bool)
    assert mm.multilabel_accuracy(pred, true) == pytest.approx(0.5)
    assert mm.multilabel_accuracy(pred, true, valid=[True, False, True, True]) == pytest.approx(0.25)
    # label 0: TP1 FP1 FN1 -> .5; label 1: TP1 FN1 -> 2/3; label 2: TP1 -> 1
    assert mm.multilabel_macro_f1(pred, true) == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    with pytest.raises(ValueError, match="one shape"):
        mm.multilabel_macro_f1(pred[:, :2], true)
    rng = np.random.default_rng(2)
    true, pred = rng.random((100, 14)) < 0.15, rng.random((100, 14)) < 0.15
    true[:, 13] = pred[:, 13] = False  # a label never present: 0 (zero_division=0)
    ref = []  # per label: 2 TP / (2 TP + FP + FN), by a loop
    for c in range(14):
        tp = int(np.sum(pred[:, c] & true[:, c]))
        denom = 2 * tp + int(np.sum(pred[:, c] ^ true[:, c]))
        ref.append(2 * tp / denom if denom else 0.0)
    assert mm.multilabel_macro_f1(pred, true) == pytest.approx(np.mean(ref))
    assert mm.multilabel_accuracy(pred, true) == pytest.approx(np.mean([(p == t).all() for p, t in zip(pred, true)]))
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert mm.multilabel_macro_f1(pred, true) == pytest.approx(
        sklearn_metrics.f1_score(true, pred, average="macro", zero_division=0))
    assert mm.multilabel_accuracy(pred, true) == pytest.approx(sklearn_metrics.accuracy_score(true, pred))
