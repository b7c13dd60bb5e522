"""One evaluation suite for any image-text embedding model: an LVLM's summary token (VladVA, E5-V) or CLIP.

The suite holds the data (images as anything the caller's `embed_images` understands: paths or Examples);
`evaluate` asks the model for embeddings through two callables and scores them with `eval.retrieval` and
`eval.classification`, so every baseline goes through exactly the same protocol and lands in one table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vlm_jax.eval import classification, retrieval

EmbedImages = Callable[[Sequence[Any]], np.ndarray]   # N images -> f32[N, D]
EmbedTexts = Callable[[Sequence[str]], np.ndarray]    # N texts -> f32[N, D]


@dataclasses.dataclass
class Suite:
    """Evaluation data; any part may be None.

    Attributes:
      retrieval: (images [I], captions [T], caption_to_image i32[T]).
      sugarcrepe: category -> [(image, positive caption, negative caption)].
      winoground: [(image_0, image_1, caption_0, caption_1)], caption_j describes image_j.
      classification: (images [N], labels i32[N], class prompts [C] e.g. 'a photo of a cat.').
    """

    retrieval: tuple[Sequence[Any], Sequence[str], np.ndarray] | None = None
    sugarcrepe: dict[str, Sequence[tuple[Any, str, str]]] | None = None
    winoground: Sequence[tuple[Any, Any, str, str]] | None = None
    classification: tuple[Sequence[Any], np.ndarray, Sequence[str]] | None = None


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _unique(items: Sequence[Any]) -> tuple[list[Any], np.ndarray]:
    """Distinct images (by path, or identity for in-memory ones) and each item's index among them."""
    key = [x if isinstance(x, str) else id(x) for x in items]
    first: dict[Any, int] = {}
    uniq = []
    for k, x in zip(key, items):
        if k not in first:
            first[k] = len(uniq)
            uniq.append(x)
    return uniq, np.array([first[k] for k in key], np.int32)


def evaluate(suite: Suite, embed_images: EmbedImages, embed_texts: EmbedTexts) -> dict[str, float]:
    """Scores one model on every part of `suite`; returns flat metrics in percent.

    Keys: 'i2t_R@k' / 't2i_R@k' / 'rsum' (retrieval), 'sugarcrepe/<category|group|average>',
    'winoground/{text,image,group}', 'classification/accuracy'.
    """
    out: dict[str, float] = {}
    if suite.retrieval is not None:
        images, captions, c2i = suite.retrieval
        out.update(retrieval.retrieval_recall(embed_images(images), embed_texts(captions), c2i))
    if suite.sugarcrepe:
        scores = {}
        for cat, items in suite.sugarcrepe.items():
            uniq, idx = _unique([it[0] for it in items])
            img = _normalize(embed_images(uniq))[idx]
            pos = _normalize(embed_texts([it[1] for it in items]))
            neg = _normalize(embed_texts([it[2] for it in items]))
            scores[cat] = (np.sum(img * pos, -1), np.sum(img * neg, -1))
        out.update({f"sugarcrepe/{k}": v for k, v in retrieval.sugarcrepe_scores(scores).items()})
    if suite.winoground:
        uniq, idx = _unique([x for it in suite.winoground for x in it[:2]])
        img = _normalize(embed_images(uniq))[idx].reshape(len(suite.winoground), 2, -1)
        cap = _normalize(embed_texts([c for it in suite.winoground for c in it[2:]])).reshape(len(suite.winoground),
                                                                                              2, -1)
        s = np.einsum("nid,njd->nij", img, cap)  # s[n, i, j] = sim(image_i, caption_j)
        out.update({f"winoground/{k}": v for k, v in retrieval.winoground_scores(s).items()})
    if suite.classification is not None:
        images, labels, prompts = suite.classification
        logits = _normalize(embed_images(images)) @ _normalize(embed_texts(prompts)).T
        out["classification/accuracy"] = float(classification.accuracy(logits, labels))
    return out


def toy_suite(dataset) -> Suite:
    """A small suite from a few-shot dataset's test split (the built-in photos for `:runlocal`).

    Retrieval: one image per class with 'a photo of a <class>.'; SugarCrepe-style 'replace_obj': the negative
    names the next class; Winoground-style pairs of consecutive classes; classification of the test split.
    A pipeline check with known structure, not a benchmark.
    """
    first: dict[int, Any] = {}
    for ex in dataset.test:
        first.setdefault(ex.label, ex)
    labels = sorted(first)
    names = dataset.classnames
    cap = lambda c: f"a photo of a {names[c]}."
    nxt = {c: labels[(i + 1) % len(labels)] for i, c in enumerate(labels)}
    return Suite(
        retrieval=([first[c] for c in labels], [cap(c) for c in labels], np.arange(len(labels), dtype=np.int32)),
        sugarcrepe={"replace_obj": [(first[c], cap(c), cap(nxt[c])) for c in labels]},
        winoground=[(first[c], first[nxt[c]], cap(c), cap(nxt[c])) for c in labels[::2]],
        classification=(list(dataset.test), np.array([e.label for e in dataset.test], np.int32),
                        [cap(c) for c in range(len(names))]),
    )
