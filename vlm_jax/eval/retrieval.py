"""Retrieval and compositionality evaluators: image-text recall@k, SugarCrepe, Winoground, a results table.

Evaluators take embeddings or similarity scores computed elsewhere (by a CLIP tower or an LVLM's summary
token, as in VladVA, arXiv 2412.04378) and return percentages; they never run a model.

Ties. Recall@k uses a *pessimistic* rank that depends only on the score values, never on a sort order:
a ground-truth item is preceded by every wrong candidate that scores **greater than or equal** to it, so
a tie counts against the query. Collapsed embeddings (all scores equal) therefore get recall 0 instead of
100, and the result is the same on every backend and block size. Without ties this is exactly the
CLIP/ALBEF protocol (`np.argsort(-scores)` and the position of the first ground-truth item). SugarCrepe
and Winoground use strict '>' comparisons, as their papers define them, so a tie is a failure there too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# SugarCrepe's seven categories in the paper's column order, and the groups it reports.
SUGARCREPE_GROUPS = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}
SUGARCREPE_CATEGORIES = tuple(c for group in SUGARCREPE_GROUPS.values() for c in group)


# ---------------------------------------------------------------------------------------------------------
# Image-text retrieval


def _l2_normalize(x: jax.Array) -> jax.Array:
    # A zero vector stays zero (its scores are all 0, which the tie rule counts as a miss).
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _pad_blocks(x: jax.Array, block: int) -> jax.Array:
    n = x.shape[0]
    nb = max(-(-n // block), 1)
    x = jnp.pad(x, [(0, nb * block - n)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((nb, block) + x.shape[1:])


@functools.partial(jax.jit, static_argnames=("image_block", "text_block"))
def _ranks(image_emb, text_emb, caption_to_image, image_block, text_block):
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    img = _l2_normalize(image_emb.astype(jnp.float32))
    txt = _l2_normalize(text_emb.astype(jnp.float32))
    # HIGHEST: TPUs default to bf16 passes, which would create ties and reorder near-equal scores.
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)

    def i2t_block(args):
        rows, ids = args                                   # f32[b, D], i32[b]
        s = dot(rows, txt.T)                               # f32[b, T]
        gt = caption_to_image[None, :] == ids[:, None]     # bool[b, T]
        best = jnp.max(jnp.where(gt, s, -jnp.inf), axis=1, keepdims=True)
        return jnp.sum(~gt & (s >= best), axis=1, dtype=jnp.int32)

    def t2i_block(args):
        rows, own = args                                   # f32[b, D], i32[b]
        s = dot(rows, img.T)                               # f32[b, I]
        gt = jnp.arange(num_images)[None, :] == own[:, None]
        target = jnp.sum(jnp.where(gt, s, 0.0), axis=1, keepdims=True)
        return jnp.sum(~gt & (s >= target), axis=1, dtype=jnp.int32)

    image_ids = jnp.arange(num_images, dtype=jnp.int32)
    i2t = jax.lax.map(i2t_block, (_pad_blocks(img, image_block), _pad_blocks(image_ids, image_block)))
    t2i = jax.lax.map(t2i_block, (_pad_blocks(txt, text_block), _pad_blocks(caption_to_image, text_block)))
    return i2t.reshape(-1)[:num_images], t2i.reshape(-1)[:num_texts]


def retrieval_ranks(image_emb: Any, text_emb: Any, caption_to_image: Any, *,
                    block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the ground truth for every image query and every caption query.

    Embeddings are L2-normalised here (cosine similarity), in float32, so raw tower outputs can be passed.
    Scores are computed `block_size` queries at a time (one f32[block_size, T] or f32[block_size, I] score
    block live at once: 1024 x 25,000 is 100 MB), so COCO's 5,000 x 25,000 matrix is never materialised.

    Args:
      image_emb: f32[I, D].
      text_emb: f32[T, D].
      caption_to_image: i32[T], the image index (in [0, I)) of each caption; every image needs >= 1 caption.
      block_size: queries per block (memory, not results, depends on it).

    Returns:
      (i2t i32[I], t2i i32[T]). i2t[i] = number of captions of *other* images scoring >= the best of image
      i's own captions; t2i[t] = number of other images scoring >= caption t's own image. A query is
      retrieved at k iff its rank < k (ties count against the query, see the module docstring).

    Raises:
      ValueError: mismatched shapes, a caption index out of range, an image without a caption, or
        non-finite embeddings.
    """
    image_emb, text_emb = jnp.asarray(image_emb), jnp.asarray(text_emb)
    c2i = np.asarray(caption_to_image)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"need image_emb f32[I, D] and text_emb f32[T, D], got {image_emb.shape} and "
                         f"{text_emb.shape}")
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    if c2i.shape != (num_texts,) or not np.issubdtype(c2i.dtype, np.integer):
        raise ValueError(f"caption_to_image must be int[{num_texts}] (one image index per caption), "
                         f"got {c2i.dtype}{list(c2i.shape)}")
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {num_images} and {num_texts}")
    if c2i.min() < 0 or c2i.max() >= num_images:
        raise ValueError(f"caption_to_image has indices outside [0, {num_images}): min {c2i.min()}, max {c2i.max()}")
    counts = np.bincount(c2i, minlength=num_images)
    if not counts.all():
        raise ValueError(f"{int(np.sum(counts == 0))} images have no caption (first: image "
                         f"{int(np.argmin(counts))}); image-to-text recall is undefined for them")
    if not (bool(jnp.isfinite(image_emb).all()) and bool(jnp.isfinite(text_emb).all())):
        raise ValueError("image_emb or text_emb contains NaN or inf")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    i2t, t2i = _ranks(image_emb, text_emb, jnp.asarray(c2i, jnp.int32),
                      int(min(block_size, num_images)), int(min(block_size, num_texts)))
    return np.asarray(i2t), np.asarray(t2i)


def retrieval_recall(image_emb: Any, text_emb: Any, caption_to_image: Any, ks: Sequence[int] = (1, 5, 10), *,
                     block_size: int = 1024) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k in percent, the CLIP/ALBEF protocol (Flickr30k, COCO).

    An image counts as retrieved at k if ANY of its captions is among the top k texts; a caption counts as
    retrieved at k if its own image is among the top k images. Embeddings are L2-normalised inside; ties
    count against the query (see `retrieval_ranks`).

    Args:
      image_emb: f32[I, D].
      text_emb: f32[T, D].
      caption_to_image: i32[T] image index of each caption (`RetrievalSet.caption_to_image`).
      ks: the cut-offs k >= 1.
      block_size: queries per score block (bounds memory).

    Returns:
      {'i2t_R@k': ..., 't2i_R@k': ... for k in ks, 'rsum': sum of all of them} (floats, percent).
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be non-empty cut-offs >= 1, got {ks}")
    i2t, t2i = retrieval_ranks(image_emb, text_emb, caption_to_image, block_size=block_size)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * float(np.mean(ranks < k))
    out["rsum"] = float(sum(out.values()))
    return out


# ---------------------------------------------------------------------------------------------------------
# Compositionality: SugarCrepe and Winoground


def pairwise_accuracy(pos_scores: Any, neg_scores: Any) -> float:
    """SugarCrepe accuracy: percent of pairs whose positive caption scores strictly higher than the negative.

    Args:
      pos_scores: f32[N] similarity(image, positive caption).
      neg_scores: f32[N] similarity(image, negative caption).

    Returns:
      Percent in [0, 100]; a tie is a failure.
    """
    pos, neg = np.asarray(pos_scores, np.float64), np.asarray(neg_scores, np.float64)
    if pos.ndim != 1 or pos.shape != neg.shape or pos.size == 0:
        raise ValueError(f"need pos_scores and neg_scores of one equal non-zero length, got {pos.shape} "
                         f"and {neg.shape}")
    return 100.0 * float(np.mean(pos > neg))


def sugarcrepe_scores(scores_by_category: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
    """SugarCrepe per-category accuracies and the replace / swap / add group averages.

    A group average is the unweighted mean of its categories' accuracies (replace = obj, att, rel; swap =
    obj, att; add = obj, att), the way papers summarise SugarCrepe's table; it is reported only when all
    of its categories are given, so a partial run never prints a misleading group number. 'average' is
    the unweighted mean of the seven categories, likewise only when all are present.

    Args:
      scores_by_category: category ('replace_obj', ... or any other name) -> (pos f32[N], neg f32[N]).

    Returns:
      {category: percent, ..., 'replace': ..., 'swap': ..., 'add': ..., 'average': ...}.
    """
    out = {name: pairwise_accuracy(pos, neg) for name, (pos, neg) in scores_by_category.items()}
    for group, members in SUGARCREPE_GROUPS.items():
        if all(m in out for m in members):
            out[group] = float(np.mean([out[m] for m in members]))
    if all(c in out for c in SUGARCREPE_CATEGORIES):
        out["average"] = float(np.mean([out[c] for c in SUGARCREPE_CATEGORIES]))
    return out


def winoground_scores(s: Any) -> dict[str, float]:
    """Winoground text, image and group scores in percent (Thrush et al., CVPR 2022, Sec. 3.3).

    With s[n, i, j] = similarity(image_i, caption_j) of example n (caption_j belongs to image_j):
      text score:  for each image the right caption wins: s[n,0,0] > s[n,0,1] and s[n,1,1] > s[n,1,0];
      image score: for each caption the right image wins: s[n,0,0] > s[n,1,0] and s[n,1,1] > s[n,0,1];
      group score: both. Comparisons are strict, so ties fail.

    Args:
      s: f32[N, 2, 2] (index order: example, image, caption).

    Returns:
      {'text': ..., 'image': ..., 'group': ...}.
    """
    s = np.asarray(s, np.float64)
    if s.ndim != 3 or s.shape[1:] != (2, 2) or s.shape[0] == 0:
        raise ValueError(f"winoground scores must be f32[N, 2, 2] (example, image, caption), got {s.shape}")
    text = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    image = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    return {"text": 100.0 * float(np.mean(text)), "image": 100.0 * float(np.mean(image)),
            "group": 100.0 * float(np.mean(text & image))}


# ---------------------------------------------------------------------------------------------------------
# Report


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value.replace("|", "\\|")
    value = float(value)
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def format_table(rows: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] | Mapping[str, str], *,
                 digits: int = 1, bold_best: bool = False, title: str = "") -> str:
    """A markdown comparison table: one row per model (in `rows` order), one column per metric.

    Args:
      rows: model name -> {metric: value}; a missing (or None / NaN) value prints as '–'.
      metrics: metric keys in column order, or key -> column header.
      digits: decimals of every number (papers print retrieval recall with 1).
      bold_best: bold the highest number of each column (all of the tied best).
      title: optional '### title' line above the table.

    Returns:
      The table as a string ending with a newline.
    """
    headers = dict(metrics) if isinstance(metrics, Mapping) else {m: m for m in metrics}
    if not headers:
        raise ValueError("format_table needs at least one metric")
    best = {}
    if bold_best:
        for m in headers:
            vals = [float(r[m]) for r in rows.values() if isinstance(r.get(m), (int, float, np.number))
                    and not math.isnan(float(r[m]))]
            if vals:
                best[m] = round(max(vals), digits)
    lines = [f"### {title}", ""] if title else []
    lines.append("| model | " + " | ".join(h.replace("|", "\\|") for h in headers.values()) + " |")
    lines.append("|---|" + "---:|" * len(headers))
    for name, row in rows.items():
        cells = []
        for m in headers:
            text = _cell(row.get(m), digits)
            if m in best and text != "–" and not isinstance(row.get(m), str) and \
                    round(float(row[m]), digits) == best[m]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {str(name).replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
