"""VITask tasks (vlm_jax.data.vitask_tasks): joint datasets (MedMNIST npz, ChestMNIST multi-label, image folders,
the builtin halves), joint label space, responses, per-dataset test limits, errors."""

import ml_collections
import numpy as np
import pytest

from vlm_jax.data import medmnist, vitask_tasks
from vlm_jax.errors import UserError

from test_imagefolder import make_folder
from test_medmnist import _write


def _dc(name, root="", **kw):
    return ml_collections.ConfigDict(dict(dict(name=name, root=str(root), size=0, test_limit=0, modality="medical",
                                                no_finding="normal", full_instruction=True), **kw))


def test_builtin_halves_are_disjoint_datasets():
    task = vitask_tasks.load_task(_dc("builtin_a,builtin_b"))
    a, b = task.datasets
    assert a.classnames == ("astronaut", "cat", "cup of coffee", "rocket", "motorcycle")
    assert b.classnames[0] == "galaxy" and task.num_classes == 10
    assert task.offsets.tolist() == [0, 5] and task.sizes.tolist() == [5, 5]
    assert set(task.train.label.tolist()) == set(range(5))  # local labels
    np.testing.assert_array_equal(task.train.targets.argmax(1), task.offsets[task.train.dataset] + task.train.label)
    assert a.instruction() == ("Analyze the given photo image. The possible diagnoses are: astronaut, cat, "
                               "cup of coffee, rocket, motorcycle.")
    assert a.instruction(False) == "Analyze the given photo image."
    assert task.train.responses[task.train.dataset.tolist().index(1)] == "galaxy."
    mask = task.class_mask([0, 1])
    assert mask[0, :5].all() and not mask[0, 5:].any() and mask[1, 5:].all() and not mask[1, :5].any()
    one = vitask_tasks.load_task(_dc("builtin"))
    assert len(one.datasets) == 1 and one.num_classes == 10 and len(one.test) == 80


def test_joint_medmnist_chest_and_folder(tmp_path):
    _write(tmp_path / "dermamnist.npz", classes=7, n=(7, 2, 7))
    chest = _write(tmp_path / "chestmnist.npz", multi=14, n=(5, 1, 4))
    make_folder(tmp_path / "my_xrays", {"train": {"no_tumor": 2, "tumor": 2}, "test": {"tumor": 1, "no_tumor": 1}})
    dc = _dc(f"dermamnist, chestmnist,folder:{tmp_path / 'my_xrays'}", tmp_path, test_limit=3, modality="brain MRI",
             no_finding="no finding")
    task = vitask_tasks.load_task(dc, seed=0)
    assert task.names == ["dermamnist", "chestmnist", "my_xrays"]
    assert task.multi_label.tolist() == [False, True, False]
    assert task.offsets.tolist() == [0, 7, 21] and task.num_classes == 23
    assert [int((task.test.dataset == k).sum()) for k in range(3)] == [3, 3, 2]  # test_limit per dataset
    assert [int((task.train.dataset == k).sum()) for k in range(3)] == [7, 5, 4]
    folder = task.datasets[2]
    assert folder.instruction() == "Analyze the given brain MRI image. The possible diagnoses are: no tumor, tumor."
    # ChestMNIST: multi-hot targets in its own label range; answers list the positives or say no_finding.
    sel = np.flatnonzero(task.train.dataset == 1)
    for j, i in enumerate(sel):
        hot = chest["train_labels"][j].astype(bool)
        np.testing.assert_array_equal(task.train.targets[i, 7:21], hot)
        assert not task.train.targets[i, :7].any() and not task.train.targets[i, 21:].any()
        names = [medmnist.MEDMNIST["chestmnist"].labels[k] for k in np.flatnonzero(hot)]
        assert task.train.responses[i] == (", ".join(names) if names else "no finding") + "."
        assert task.train.label[i] == -1
    # The same seed gives the same test subset.
    again = vitask_tasks.load_task(dc, seed=0)
    key = lambda e: e.path or e.array.tobytes()
    assert [key(e) for e in task.test.examples] == [key(e) for e in again.test.examples]
    other = vitask_tasks.load_task(dc, seed=1)
    assert [key(e) for e in task.test.examples] != [key(e) for e in other.test.examples]


@pytest.mark.parametrize("name, pattern", [
    ("dermamnist", "needs --config.data.root"),
    ("foo", "unknown dataset 'foo'"),
    ("builtin_a,builtin_a", "lists the dataset 'builtin_a' twice"),
    (" , ", "data.name is empty"),
    ("folder:", "needs a path"),
    ("folder:/nonexistent/xrays", "/nonexistent/xrays does not exist"),
])
def test_errors(name, pattern):
    with pytest.raises(UserError, match=pattern):
        vitask_tasks.load_task(_dc(name))


def test_no_finding_must_not_be_a_label(tmp_path):
    _write(tmp_path / "chestmnist.npz", multi=14)
    with pytest.raises(UserError, match="no_finding='Mass' is also a label of chestmnist"):
        vitask_tasks.load_task(_dc("chestmnist", tmp_path, no_finding="Mass"))


def _train_split(datasets, responses):
    n = len(responses)
    return vitask_tasks.Split([None] * n, np.asarray(datasets, np.int32), np.zeros(n, np.int32),
                              np.zeros((n, 1), bool), list(responses))


def test_crt_sampler_own_dataset_other_answer_deterministic():
    # Three datasets, interleaved rows; dataset 2 is multi-label-like (whole answer sets); in dataset 1 only row 3
    # has another answer than 'a.', so every other row of dataset 1 must get row 3.
    ds = [0, 1, 0, 1, 2, 0, 1, 2, 2, 0, 1, 2]
    resp = ["x.", "a.", "y.", "b.", "p, q.", "x.", "a.", "p.", "p, q.", "z.", "a.", "normal."]
    split = _train_split(ds, resp)
    sampler = vitask_tasks.NegativeSampler(split, ["d0", "d1", "d2"])
    rows = np.arange(len(ds))
    seen = {i: set() for i in rows}
    for step in range(200):
        neg = sampler.sample(rows, [0, 13], step)
        for i, j in zip(rows, neg):
            assert ds[j] == ds[i] and resp[j] != resp[i], (i, j)
            seen[i].add(int(j))
        np.testing.assert_array_equal(neg, sampler.sample(rows, [0, 13], step))   # a pure function of (seed, step)
    # Every candidate of the whole training split is drawn (not only rows of one batch), and only candidates.
    for i in rows:
        assert seen[i] == {j for j in rows if ds[j] == ds[i] and resp[j] != resp[i]}, i
    assert seen[1] == {3}
    assert not np.array_equal(sampler.sample(rows, [0, 13], 0), sampler.sample(rows, [1, 13], 0))
    # Any batch of rows (repeats, any order) gets the same rules.
    batch = np.array([4, 4, 1, 11, 0])
    neg = sampler.sample(batch, 5, 7)
    assert all(ds[j] == ds[i] and resp[j] != resp[i] for i, j in zip(batch, neg))


def test_crt_sampler_one_answer_dataset_is_an_error():
    split = _train_split([0, 0, 1, 1], ["x.", "y.", "a.", "a."])
    with pytest.raises(UserError, match="dataset 'd1' has one distinct answer \\('a.'\\)"):
        vitask_tasks.NegativeSampler(split, ["d0", "d1"])


def test_val_splits_are_loaded_and_limited(tmp_path):
    _write(tmp_path / "dermamnist.npz", classes=7, n=(7, 5, 7))
    make_folder(tmp_path / "xr", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 2}, "test": {"a": 1, "b": 1}})
    task = vitask_tasks.load_task(_dc(f"dermamnist,folder:{tmp_path / 'xr'},builtin_a", tmp_path, val_limit=4))
    assert [int((task.val.dataset == k).sum()) for k in range(3)] == [4, 3, 4]
    derma = medmnist.load_medmnist("dermamnist", str(tmp_path))
    val_arrays = {e.array.tobytes() for e in derma.val}
    assert all(e.array.tobytes() in val_arrays for e, d in zip(task.val.examples, task.val.dataset) if d == 0)
    assert all("/val/" in e.path for e, d in zip(task.val.examples, task.val.dataset) if d == 1)
