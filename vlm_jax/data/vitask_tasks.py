"""VITask's classification tasks: one dataset, or several trained jointly (METHODS.md, VITask: one joint model over
the 12 MedMNIST 2D datasets), with their instructions, target responses and per-dataset metrics.

`data.name` is one name or a comma-separated list (joint training):
  <medmnist name>        the official `<name>[_<size>].npz` in `data.root` (`medmnist.load_medmnist`), e.g.
                         dermamnist; chestmnist is multi-label.
  folder:<path>          an image folder `<path>/{train,val,test}/<class>/*` (`imagefolder.load_image_folder`);
                         its instruction says `data.modality`; its name is the folder's base name. (A path that
                         holds ',' cannot be listed.)
  builtin                the 10 offline toy photos (`builtin.builtin_dataset`), modality 'photo'.
  builtin_a, builtin_b   its first / last five classes as two disjoint 5-class datasets: joint training offline.

Splits: train, val and test of every dataset (MedMNIST: the npz's official val; folders: `val/`, empty when absent;
builtin: its own val crops); `train_limit` / `val_limit` / `test_limit` cap each dataset's share. The val split is
what the TSM's best epoch is selected on (the paper: "select the best model based on validation set performance").

CRT negatives (`NegativeSampler`): drawn from the whole training split of the sample's own dataset, among the rows
with a different answer.

Joint label space: dataset k owns classes [offsets[k], offsets[k] + sizes[k]) of C = sum(sizes) (`methods.tsm`).
Datasets never share classes here, even when their names coincide (OrganA/C/S: the paper's 70-way head merges
those three; ours has 92 outputs over the 12 sets, each dataset only ever seeing its own).

Texts (`medmnist.format_instruction`): 'Analyze the given {modality} image. The possible diagnoses are: {labels}.'
(or without the label set: `full_instruction=False`) -> '{label}.'. A multi-label sample answers its positive
labels in label order joined by ', ' ('effusion, mass.'), or `no_finding` + '.' ('normal.') when it has none.

Metrics (`split_metrics`, in %): single-label datasets: accuracy and macro-F1 over the dataset's classes
(`medmnist.accuracy` / `macro_f1`); multi-label: exact-match accuracy of the label set and macro-F1 over the
labels (`medmnist.multilabel_accuracy` / `multilabel_macro_f1`). An unmatched answer (valid False) is wrong and
predicts no label. 'mean': the unweighted mean over datasets, as the paper's averages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlm_jax import errors
from vlm_jax.data import chat, imagefolder, medmnist
from vlm_jax.data.types import Example

FOLDER = "folder:"
BUILTIN = ("builtin", "builtin_a", "builtin_b")


@dataclasses.dataclass(frozen=True, eq=False)
class TaskDataset:
    """One dataset of a (joint) task. Examples have `.label` (the local class; -1 when multi-label), `.array` or
    `.path`, and `.multi_hot` (i32[C_k]) when multi-label."""
    name: str
    modality: str
    classnames: tuple[str, ...]
    multi_label: bool
    train: Sequence[Any]
    test: Sequence[Any]
    val: Sequence[Any] = ()   # empty: the dataset has no val split (a folder without val/)

    def instruction(self, full: bool = True) -> str:
        return medmnist.format_instruction(self.modality, self.classnames, include_labels=full)

    def label_responses(self) -> list[str]:
        """Per class: '{label}.' (what the likelihood ranking scores)."""
        return [medmnist.response([c]) for c in self.classnames]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a joint task, flattened over its datasets (in dataset order).

    Attributes:
      examples: the N examples.
      dataset: i32[N] dataset index.
      label: i32[N] class index inside its dataset (-1 for multi-label samples).
      targets: bool[N, C] label set in the joint label space (one-hot for single-label samples).
      responses: the N target answers.
    """
    examples: list[Any]
    dataset: np.ndarray
    label: np.ndarray
    targets: np.ndarray
    responses: list[str]

    def __len__(self) -> int:
        return len(self.examples)


@dataclasses.dataclass(frozen=True, eq=False)
class JointTask:
    datasets: list[TaskDataset]
    offsets: np.ndarray   # i32[D]
    sizes: np.ndarray     # i32[D]
    train: Split
    test: Split
    no_finding: str
    val: Split | None = None   # every dataset's val split (a dataset without one contributes nothing)

    @property
    def num_classes(self) -> int:
        return int(self.sizes.sum())

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    @property
    def multi_label(self) -> np.ndarray:
        """bool[D]."""
        return np.array([d.multi_label for d in self.datasets], bool)

    def class_mask(self, dataset_ids) -> np.ndarray:
        """i32[B] -> bool[B, C]: each sample's own dataset's classes (numpy twin of `tsm.dataset_class_mask`)."""
        ids = np.asarray(dataset_ids, np.int64)
        c = np.arange(self.num_classes)[None]
        lo = self.offsets[ids][:, None]
        return (c >= lo) & (c < lo + self.sizes[ids][:, None])


def parse_names(name: str) -> list[str]:
    names = [n.strip() for n in str(name).split(",") if n.strip()]
    if not names:
        raise errors.UserError("data.name is empty; give a MedMNIST name, folder:<path>, builtin, or a "
                               "comma-separated list of them")
    return names


def _builtin(name: str) -> TaskDataset:
    from vlm_jax.data import builtin

    ds = builtin.builtin_dataset()
    if name == "builtin":
        return TaskDataset("builtin", "photo", tuple(ds.classnames), False, list(ds.train), list(ds.test),
                           list(ds.val))
    half = len(ds.classnames) // 2
    lo, hi = (0, half) if name == "builtin_a" else (half, len(ds.classnames))
    pick = lambda xs: [Example(e.path, e.label - lo, e.classname, e.array) for e in xs if lo <= e.label < hi]
    return TaskDataset(name, "photo", tuple(ds.classnames[lo:hi]), False, pick(ds.train), pick(ds.test),
                       pick(ds.val))


def load_dataset(name: str, *, root: str = "", size: int | None = None, modality: str = "medical") -> TaskDataset:
    """One entry of `data.name` (see the module doc) -> TaskDataset. Raises UserError (one line)."""
    if name in BUILTIN:
        return _builtin(name)
    if name.startswith(FOLDER):
        path = name[len(FOLDER):].strip()
        if not path:
            raise errors.UserError("data.name folder: needs a path: folder:/data/my_dataset")
        ds = imagefolder.load_image_folder(path)
        return TaskDataset(ds.name, modality, tuple(ds.classnames), False, list(ds.train), list(ds.test),
                           list(ds.val))
    if name.strip().lower() not in medmnist.MEDMNIST:
        raise errors.UserError(f"unknown dataset {name!r} in data.name; use a MedMNIST 2D name "
                               f"({', '.join(medmnist.MEDMNIST)}), folder:<path>, builtin, builtin_a or builtin_b")
    if not root:
        raise errors.UserError(f"{name} needs --config.data.root=<folder with the MedMNIST npz files>; or try "
                               "--config=configs/vitask.py:runlocal")
    ds = medmnist.load_medmnist(name, root, size=size or None)
    return TaskDataset(ds.name, ds.modality, tuple(ds.classnames), ds.multi_label, list(ds.train), list(ds.test),
                       list(ds.val))


def _split(datasets: Sequence[TaskDataset], which: str, offsets: np.ndarray, num_classes: int,
           no_finding: str, keep: Sequence[np.ndarray | None]) -> Split:
    examples, dataset, label, responses, rows = [], [], [], [], []
    for k, ds in enumerate(datasets):
        items = getattr(ds, which)
        order = range(len(items)) if keep[k] is None else keep[k]
        for j in order:
            e = items[j]
            examples.append(e)
            dataset.append(k)
            if ds.multi_label:
                hot = np.asarray(e.multi_hot, bool)
                label.append(-1)
                responses.append(medmnist.response([ds.classnames[i] for i in np.flatnonzero(hot)],
                                                   none=no_finding))
                rows.append(offsets[k] + np.flatnonzero(hot))
            else:
                label.append(int(e.label))
                responses.append(medmnist.response([ds.classnames[e.label]]))
                rows.append(offsets[k] + np.array([e.label]))
    targets = np.zeros((len(examples), num_classes), bool)
    for i, r in enumerate(rows):
        targets[i, r] = True
    return Split(examples, np.asarray(dataset, np.int32), np.asarray(label, np.int32), targets, responses)


def build_task(datasets: Sequence[TaskDataset], *, no_finding: str = medmnist.NO_FINDING, test_limit: int = 0,
               seed: int = 0, train_limit: int = 0, val_limit: int = 0) -> JointTask:
    """Joins datasets into one task.

    Args:
      datasets: in the order of `data.name`; names must differ.
      no_finding: a multi-label sample's answer without positive label; must not name one of its labels.
      test_limit: per dataset, evaluate on the (sorted) first N of a fixed permutation of its test split (0 = all).
      seed: that permutation's seed.
      train_limit: per dataset, train on the (sorted) first N of a fixed permutation of its train split (0 = all).
      val_limit: per dataset, validate on the (sorted) first N of a fixed permutation of its val split (0 = all).
    """
    names = [d.name for d in datasets]
    for d in datasets:
        if names.count(d.name) > 1:
            raise errors.UserError(f"data.name lists the dataset {d.name!r} twice (folder datasets are named by "
                                   "their folder's base name)")
        if not d.train or not d.test:
            raise errors.UserError(f"dataset {d.name!r} has no {'train' if not d.train else 'test'} examples")
        if d.multi_label and any(medmnist.normalize(c) == medmnist.normalize(no_finding) for c in d.classnames):
            raise errors.UserError(f"data.no_finding={no_finding!r} is also a label of {d.name}; choose another "
                                   "answer for 'no positive label'")
    sizes = np.array([len(d.classnames) for d in datasets], np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    c = int(sizes.sum())
    for key, limit in (("test_limit", test_limit), ("train_limit", train_limit), ("val_limit", val_limit)):
        if limit < 0:
            raise errors.UserError(f"data.{key} must be >= 0 (0 = all), got {limit}")

    def keep(split, limit, salt):
        return [np.sort(np.random.default_rng([seed, k, *salt]).permutation(len(getattr(d, split)))[:limit])
                if limit and limit < len(getattr(d, split)) else None for k, d in enumerate(datasets)]

    train = _split(datasets, "train", offsets, c, no_finding, keep("train", train_limit, (1,)))
    test = _split(datasets, "test", offsets, c, no_finding, keep("test", test_limit, ()))
    val = _split(datasets, "val", offsets, c, no_finding, keep("val", val_limit, (2,)))
    return JointTask(list(datasets), offsets, sizes, train, test, no_finding, val)


def load_task(dc, seed: int = 0) -> JointTask:
    """`config.data` -> JointTask (every dataset of the comma-separated `dc.name`)."""
    datasets = [load_dataset(n, root=dc.root, size=dc.size or None, modality=dc.modality)
                for n in parse_names(dc.name)]
    return build_task(datasets, no_finding=dc.no_finding, test_limit=dc.test_limit, seed=seed,
                      train_limit=dc.get("train_limit", 0), val_limit=dc.get("val_limit", 0))


# ----------------------------------------------------------------------------------------------------------
# CRT negatives.

class NegativeSampler:
    """CRT negatives (VITask, Eq. 7: "instruction_i = instruction_j and response_i != response_j"): for a training
    row i, a row j drawn uniformly from the whole training split of i's own dataset (so the same instruction) whose
    answer differs from i's (a multi-label row's whole label set). Never another dataset, never the same answer.

    Rows are sorted by (dataset, answer), so a dataset's rows are one block and each answer a sub-block; drawing
    u in [0, n_dataset - n_answer) and skipping i's own sub-block is a uniform draw over the candidates.

    Args:
      split: the training split.
      names: the datasets' names (for the error message).

    Raises:
      UserError: a dataset whose training split holds one distinct answer (it has no negative at all).
    """

    def __init__(self, split: Split, names: Sequence[str]):
        ds = np.asarray(split.dataset, np.int64)
        _, answer = np.unique(np.asarray(split.responses, object).astype(str), return_inverse=True)
        order = np.lexsort((answer, ds))          # by dataset, then answer
        sd, sa = ds[order], answer[order]
        n = len(order)
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n)
        # First sorted position of each row's dataset block and of its answer sub-block, and their sizes.
        new_ds = np.r_[True, sd[1:] != sd[:-1]]
        new_ans = new_ds | np.r_[True, sa[1:] != sa[:-1]]
        ds_lo = np.maximum.accumulate(np.where(new_ds, np.arange(n), 0))
        ans_lo = np.maximum.accumulate(np.where(new_ans, np.arange(n), 0))
        ds_n = np.bincount(ds_lo, minlength=n)[ds_lo]
        ans_n = np.bincount(ans_lo, minlength=n)[ans_lo]
        for k in np.unique(sd[ds_n == ans_n]):
            first = split.responses[order[np.searchsorted(sd, k)]]
            raise errors.UserError(
                f"dataset {names[k]!r} has one distinct answer ({first!r}) in its training split: CRT needs a "
                "negative of the same dataset with a different answer; add examples of another class, raise "
                "data.train_limit, or set --config.method.stage2_epochs=0")
        self._order = order
        # Per original row: its dataset block start, the offset of its answer sub-block inside it, the sizes.
        self._ds_lo, self._rel, self._ds_n, self._ans_n = (x[pos] for x in (ds_lo, ans_lo - ds_lo, ds_n, ans_n))

    def sample(self, rows, seed, step: int) -> np.ndarray:
        """i32[B]: a negative training row for each of `rows`; a pure function of (seed, step, rows).

        Args:
          rows: i32[B] training-split rows (the batch).
          seed: an int or a sequence of ints (the run's seed and a salt).
          step: the global training step (so a resumed run draws the same negatives).
        """
        rows = np.asarray(rows, np.int64)
        seed = list(np.atleast_1d(seed).tolist())
        rng = np.random.default_rng([*seed, int(step)])
        u = rng.integers(0, self._ds_n[rows] - self._ans_n[rows])
        rel = np.where(u < self._rel[rows], u, u + self._ans_n[rows])   # skip the row's own answer
        return self._order[self._ds_lo[rows] + rel].astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# Metrics.

def split_metrics(task: JointTask, split: Split, pred: np.ndarray, valid: np.ndarray | None = None, *,
                  skip: Sequence[int] = (), unmatched: bool = False) -> dict[str, Any]:
    """Per-dataset metrics (%) of predicted label sets.

    Args:
      task, split: the task and the evaluated split.
      pred: bool[N, C] predicted sets in the joint label space (a single-label prediction is one-hot).
      valid: bool[N]; False marks an unmatched answer (wrong; predicts nothing). None: all valid.
      skip: dataset indices not evaluated (their entry is None and the mean is None).
      unmatched: also report each dataset's % of unmatched answers.

    Returns:
      {'datasets': {name: {'accuracy', 'macro_f1'[, 'unmatched']} or None}, 'mean': {'accuracy', 'macro_f1'}}.
    """
    pred = np.asarray(pred, bool)
    valid = np.ones(len(split), bool) if valid is None else np.asarray(valid, bool)
    out: dict[str, Any] = {}
    for k, ds in enumerate(task.datasets):
        if k in skip:
            out[ds.name] = None
            continue
        sel = split.dataset == k
        lo, hi = task.offsets[k], task.offsets[k] + task.sizes[k]
        p, v = pred[sel, lo:hi] & valid[sel, None], valid[sel]
        if ds.multi_label:
            true = split.targets[sel, lo:hi]
            m = {"accuracy": medmnist.multilabel_accuracy(p, true, v),
                 "macro_f1": medmnist.multilabel_macro_f1(p, true)}
        else:
            local = np.where(p.any(1), np.argmax(p, 1), -1)
            true = split.label[sel]
            m = {"accuracy": medmnist.accuracy(local, true), "macro_f1": medmnist.macro_f1(local, true, hi - lo)}
        m = {key: 100.0 * val for key, val in m.items()}
        if unmatched:
            m["unmatched"] = 100.0 * float(np.mean(~v)) if v.size else 0.0
        out[ds.name] = m
    done = [m for m in out.values() if m is not None]
    mean = None if len(done) < len(out) else {key: float(np.mean([m[key] for m in done]))
                                              for key in ("accuracy", "macro_f1")}
    return {"datasets": out, "mean": mean}


# ----------------------------------------------------------------------------------------------------------
# Token rows of the LVLM (prompt + answer), exactly as the checkpoint's processor builds them.

class Seqs:
    """Token rows [generation prompt of (image, instruction_d), answer separator + response, EOS], exactly as the
    checkpoint's processor tokenizes them (`data.chat`: its chat template, the whole string tokenized).

    Args:
      fmt: the checkpoint's `chat.ChatFormat`.
      instructions: one per dataset d.
      responses: every response a row may hold (fixes the answer length A and so the sequence length L).
    """

    def __init__(self, fmt: chat.ChatFormat, instructions: Sequence[str], responses: Sequence[str]):
        self.fmt, self.instructions = fmt, list(instructions)
        self.prompts = [fmt.prompt(ins, image=True) for ins in instructions]
        self.pad = fmt.pad_id
        self._answers: dict[tuple[int, str], list[int]] = {}
        self.answer_length = max(len(self.answer(d, r)) for d in range(len(instructions)) for r in set(responses))
        self.prompt_length = max(len(p) for p in self.prompts)
        self.length = self.prompt_length + self.answer_length

    def answer(self, d: int, text: str) -> list[int]:
        """Token ids of the response `text` (+ EOS) after dataset d's prompt (memoised: few distinct answers)."""
        if (d, text) not in self._answers:
            self._answers[d, text] = self.fmt.answer_ids(self.instructions[d], True, text)
        return self._answers[d, text]

    def rows(self, datasets, responses) -> dict[str, np.ndarray]:
        """Teacher-forcing rows, right-padded: {'input_ids', 'attention_mask', 'answer_mask'} i32[B, L]."""
        b = len(responses)
        out = {k: np.zeros((b, self.length), np.int32) for k in ("input_ids", "attention_mask", "answer_mask")}
        out["input_ids"][:] = self.pad
        for i, (d, r) in enumerate(zip(datasets, responses)):
            p, a = self.prompts[d], self.answer(int(d), r)
            if len(p) + len(a) > self.length:
                raise ValueError(f"response {r!r} is longer than the {self.answer_length} answer tokens planned for")
            out["input_ids"][i, :len(p) + len(a)] = p + a
            out["attention_mask"][i, :len(p) + len(a)] = 1
            out["answer_mask"][i, len(p):len(p) + len(a)] = 1
        return out

    def prompt_rows(self, datasets) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation prompts left-padded to the longest dataset prompt: (ids, mask) i32[B, P]."""
        ids = np.full((len(datasets), self.prompt_length), self.pad, np.int32)
        mask = np.zeros_like(ids)
        for i, d in enumerate(datasets):
            p = self.prompts[d]
            ids[i, self.prompt_length - len(p):] = p
            mask[i, self.prompt_length - len(p):] = 1
        return ids, mask

    def answer_table(self, responses: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Label responses of each dataset d, right-padded: (ids, mask) i32[D, K, A], K = the most classes; the
        rows past a dataset's own classes have mask 0 (score them -inf)."""
        k = max(len(r) for r in responses)
        a = max(len(self.answer(d, x)) for d, r in enumerate(responses) for x in r)
        ids = np.full((len(responses), k, a), self.pad, np.int32)
        mask = np.zeros_like(ids)
        for d, rs in enumerate(responses):
            for j, r in enumerate(rs):
                t = self.answer(d, r)
                ids[d, j, :len(t)] = t
                mask[d, j, :len(t)] = 1
        return ids, mask
