"""DualAdapter ("Negative Yields Positive", arXiv 2403.12964) as pure functions on CLIP features.

Everything here works on already-extracted, L2-normalised features; no model, no I/O, no loop. Conventions:
image features f32[N, D]; text classifiers row-major f32[C, D] (rows normalised); caches keep keys sorted
by class then shot, f32[C*K, D] with the same number of shots K for every class.

The official PyTorch code (github zhangce01/DualAdapter: main.py, utils.py) is the authority. Where it
differs from the paper we follow the code and say so:

* The positive classifier 0.45 W_template + 0.55 W_cupl is *not* re-normalised (main.py uses it as is).
* The negative cache affinity is exp(-beta * f K_neg^T), written in the code as A(1 - f K_neg^T) with
  A(x) = exp(-beta (1 - x)); the negative text logits are 100 * 0.15 * (1 - f W_neg^T).
* The soft (label-refined) cache values are computed once from the *original* cache keys and stay fixed
  while the keys are fine-tuned.
* The reference consistency loss applies `nn.CosineSimilarity(dim=1)` to [D, C] matrices, i.e. a cosine
  across classes for each feature dimension; `finetune_loss(consistency='reference')` reproduces it and is
  the default (the published numbers were obtained with it); `'per_class'` is the paper's reading.
* The reference keeps caches, residuals and adapted weights in float16; we use float32 throughout.

Fine-tuning hyperparameters of the reference (for the trainer): AdamW, weight decay 0.1, eps from the
preset (1e-3 for most datasets), lr for the positive adapter and 5 x lr for the negative one
(`param_groups`, `NEGATIVE_LR_MULTIPLIER`), cosine annealing to 0 over train_epoch x steps per epoch,
batch 256, best epoch selected by validation accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

# Constants of the reference code (main.py).
TEMPLATE_WEIGHT = 0.45  # positive classifier = 0.45 template + 0.55 CuPL
CUPL_WEIGHT = 0.55
LOGIT_SCALE = 100.0  # CLIP logit scale used for both text paths
NEGATIVE_TEXT_SCALE = 0.15  # the negative text logits are 100 * (1 - f W_neg^T) * 0.15
NEGATIVE_LR_MULTIPLIER = 5.0  # the negative adapter's lr is 5 x the positive adapter's
WEIGHT_DECAY = 0.1  # AdamW weight decay of both parameter groups
_COS_EPS = 1e-7  # eps of the reference's nn.CosineSimilarity


def normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """L2-normalises `x` along `axis` like `torch.nn.functional.normalize`: x / max(||x||, eps)."""
    norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
    return x / jnp.maximum(norm, eps)


# ----------------------------------------------------------------------------------------------------------
# Text classifiers
# ----------------------------------------------------------------------------------------------------------


def text_classifier(class_prompt_embeddings: Sequence[jax.Array] | jax.Array) -> jax.Array:
    """Builds a zero-shot classifier from prompt embeddings (reference extract_features.py).

    w_c = normalise(mean_p normalise(e_{c,p})), the CLIP prompt ensemble.

    Args:
      class_prompt_embeddings: either f32[C, P, D] (same number of prompts per class) or a list of C arrays
        f32[P_c, D] (e.g. a varying number of CuPL descriptions per class).

    Returns:
      f32[C, D], rows normalised.
    """
    if isinstance(class_prompt_embeddings, (list, tuple)):
        counts = np.array([np.shape(e)[0] for e in class_prompt_embeddings])
        if (counts == 0).any():
            raise ValueError(f"every class needs at least one prompt; empty classes: {np.flatnonzero(counts == 0)}")
        flat = normalize(jnp.concatenate([jnp.asarray(e, jnp.float32) for e in class_prompt_embeddings], 0))
        seg = jnp.asarray(np.repeat(np.arange(len(counts)), counts))
        sums = jax.ops.segment_sum(flat, seg, num_segments=len(counts))
        return normalize(sums / jnp.asarray(counts, jnp.float32)[:, None])
    emb = jnp.asarray(class_prompt_embeddings, jnp.float32)
    chex.assert_rank(emb, 3)
    return normalize(normalize(emb).mean(axis=1))


def positive_classifier(w_template: jax.Array, w_cupl: jax.Array | None = None,
                        cupl_weight: float = CUPL_WEIGHT) -> jax.Array:
    """The positive text classifier (reference main.py: `0.45 * clip_weights_template + 0.55 * clip_weights_cupl`).

    W_pos = (1 - cupl_weight) W_template + cupl_weight W_cupl, *not* re-normalised (as in the reference),
    so its rows have norm <= 1. Without CuPL descriptions W_pos = W_template.

    Args:
      w_template: f32[C, D] classifier from the hand-written templates.
      w_cupl: f32[C, D] classifier from the CuPL descriptions, or None.
      cupl_weight: weight of the CuPL classifier (0.55 in the reference).

    Returns:
      f32[C, D].
    """
    if w_cupl is None:
        return w_template
    chex.assert_equal_shape([w_template, w_cupl])
    return (1.0 - cupl_weight) * w_template + cupl_weight * w_cupl


# ----------------------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Caches:
    """The positive and pseudo-negative caches, keys sorted by class then shot.

    Attributes:
      keys: f32[C*K, D] few-shot image features (row c*K + s is shot s of class c).
      values: f32[C*K, C] one-hot labels.
      soft_values: f32[C*K, C] label-refined values (`soft_values`).
      neg_keys: f32[C*K, D] pseudo-negative keys (`pseudo_negative_keys`).
      shots: K (static).
    """

    keys: jax.Array
    values: jax.Array
    soft_values: jax.Array
    neg_keys: jax.Array
    shots: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def num_classes(self) -> int:
        return self.values.shape[-1]


@functools.partial(jax.jit, static_argnames="shots")
def soft_values(keys: jax.Array, shots: int, temperature: float = 0.1) -> jax.Array:
    """Similarity-based label refinement (reference utils.generate_soft_label).

    For each class c with shots k_1..k_K: avg_i = (sum_j cos(k_i, k_j) - 1) / (K - 1),
    conf = softmax_i(avg_i / temperature), value_i = onehot(c) * conf_i * K. K = 1 keeps one-hot values.
    (The reference subtracts exactly 1 for the self-similarity, which assumes normalised keys.)

    Args:
      keys: f32[C*K, D] normalised keys sorted by class then shot.
      shots: K.
      temperature: softmax temperature (0.1 in the reference).

    Returns:
      f32[C*K, C].
    """
    n, d = keys.shape
    c = n // shots
    onehot = jnp.repeat(jnp.eye(c, dtype=jnp.float32), shots, axis=0)
    if shots == 1:
        return onehot
    k = keys.reshape(c, shots, d)
    sim = jnp.einsum("csd,ctd->cst", k, k)
    avg = (sim.sum(-1) - 1.0) / (shots - 1)
    conf = jax.nn.softmax(avg / temperature, axis=1)
    return onehot * (conf * shots).reshape(n, 1)


def _excluded_class(sim: jax.Array) -> jax.Array:
    """For each row c of S f32[C, C], the one class that the C-1 lowest entries leave out: its maximum.

    `torch.topk(S, C - 1, largest=False)` drops one maximal entry of each row, which is c itself unless
    another class has an identical (or, through rounding, larger) similarity. Which of several exactly tied
    maxima torch drops is implementation-defined (on CPU it differs from row to row); we drop c itself when it
    is among the maxima, else the first maximal index.
    """
    c = sim.shape[0]
    diag = jnp.diagonal(sim)
    row_max = sim.max(axis=1)
    return jnp.where(diag >= row_max, jnp.arange(c), jnp.argmax(sim, axis=1))


@functools.partial(jax.jit, static_argnames="shots")
def pseudo_negative_keys(keys: jax.Array, shots: int) -> jax.Array:
    """Pseudo-negative cache keys (reference utils.generate_pseudo_negative_cache).

    m_c = normalise(mean_s k_{c,s}); S = m m^T; for class c take the C-1 classes with the lowest S[c]
    (`torch.topk(largest=False)`, see `_excluded_class` for ties); the negative key of shot s of class c is
    normalise(mean over those classes j of k_{j,s}). Vectorised: sum over all classes minus the excluded one.

    Args:
      keys: f32[C*K, D] keys sorted by class then shot.
      shots: K.

    Returns:
      f32[C*K, D], rows normalised.
    """
    n, d = keys.shape
    c = n // shots
    if c < 2:
        raise ValueError(f"the pseudo-negative cache needs at least 2 classes, got {c}")
    k = keys.reshape(c, shots, d)
    means = normalize(k.mean(axis=1))
    excluded = _excluded_class(means @ means.T)
    neg = (k.sum(axis=0)[None] - k[excluded]) / (c - 1)
    return normalize(neg.reshape(n, d))


def build_caches(keys: jax.Array, labels: Any, num_classes: int, temperature: float = 0.1) -> Caches:
    """Builds the positive and pseudo-negative caches from few-shot features.

    Args:
      keys: f32[N, D] normalised few-shot image features, N = C*K, in any order.
      labels: i32[N] class ids in [0, num_classes); must be concrete (not traced). Each class must have
        the same number of shots K.
      num_classes: C.
      temperature: temperature of the soft label refinement.

    Returns:
      `Caches` with rows stably sorted by label: the within-class order of the input defines the shot index
      s, which pairs shots of different classes in the pseudo-negative cache (as the reference's loader order
      does).

    Raises:
      ValueError: on labels out of range, unequal shots per class, or fewer than two classes.
    """
    keys = jnp.asarray(keys, jnp.float32)
    labels = np.asarray(labels)
    chex.assert_rank(keys, 2)
    if labels.ndim != 1 or labels.shape[0] != keys.shape[0]:
        raise ValueError(f"labels must be i32[{keys.shape[0]}], got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() == 0 or counts.min() != counts.max():
        raise ValueError(
            "build_caches needs the same number of shots (>= 1) for every class; got between "
            f"{counts.min()} (class {int(counts.argmin())}) and {counts.max()} (class {int(counts.argmax())})")
    shots = int(counts[0])
    order = np.argsort(labels, kind="stable")
    keys = keys[order]
    values = jax.nn.one_hot(labels[order], num_classes, dtype=jnp.float32)
    return Caches(keys=keys, values=values, soft_values=soft_values(keys, shots, temperature),
                  neg_keys=pseudo_negative_keys(keys, shots), shots=shots)


# ----------------------------------------------------------------------------------------------------------
# Logits (training-free DualAdapter)
# ----------------------------------------------------------------------------------------------------------


def affinity(sim: jax.Array, beta: jax.Array | float) -> jax.Array:
    """A(x) = exp(-beta (1 - x)), the Tip-Adapter cache affinity."""
    return jnp.exp(-beta * (1.0 - sim))


def logits(features: jax.Array, text_pos: jax.Array, text_neg: jax.Array, caches: Caches, *,
           alpha: jax.Array | float, beta: jax.Array | float, lam: jax.Array | float) -> jax.Array:
    """DualAdapter logits (reference main.py, the evaluation block of DualAdapter()).

      pos = 100 f W_pos^T + alpha A(f K^T) V_soft
      neg = 100 * 0.15 (1 - f W_neg^T) + alpha A(1 - f K_neg^T) V_onehot,  A(1 - x) = exp(-beta x)
      out = lam pos + (1 - lam) neg

    alpha, beta, lam may be traced scalars, so the function can be vmapped over a hyperparameter grid.

    Args:
      features: f32[B, D] normalised image features.
      text_pos: f32[C, D] positive classifier (`positive_classifier`).
      text_neg: f32[C, D] negative classifier (from negative prompts, e.g. 'a photo without {}.').
      caches: `Caches` with C classes.
      alpha: cache weight.
      beta: affinity sharpness.
      lam: weight of the positive path.

    Returns:
      f32[B, C].
    """
    chex.assert_rank(features, 2)
    chex.assert_equal_shape([text_pos, text_neg])
    chex.assert_equal_shape([caches.keys, caches.neg_keys])
    chex.assert_equal_shape_suffix([features, text_pos, caches.keys], 1)
    pos = LOGIT_SCALE * features @ text_pos.T + alpha * (affinity(features @ caches.keys.T, beta) @ caches.soft_values)
    neg = (LOGIT_SCALE * NEGATIVE_TEXT_SCALE * (1.0 - features @ text_neg.T)
           + alpha * (affinity(1.0 - features @ caches.neg_keys.T, beta) @ caches.values))
    return lam * pos + (1.0 - lam) * neg


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning (DualAdapter with trainable residuals)
# ----------------------------------------------------------------------------------------------------------

_GROUPS = {"res_template": "positive", "res_cupl": "positive", "res_keys": "positive",
           "res_neg": "negative", "res_neg_keys": "negative"}


def init_residuals(num_classes: int, dim: int) -> dict[str, jax.Array]:
    """Zero residuals of the two adapters (reference utils.PositiveAdapter / NegativeAdapter).

    Returns:
      dict of f32[C, D] zeros: res_template, res_cupl, res_keys (positive adapter; res_keys is shared by
      the K shots of a class), res_neg, res_neg_keys (negative adapter).
    """
    return {name: jnp.zeros((num_classes, dim), jnp.float32) for name in _GROUPS}


def param_groups(residuals: Any) -> Any:
    """Labels each residual 'positive' or 'negative' (same pytree structure; for `optax.multi_transform`).

    The reference optimises the negative adapter with `NEGATIVE_LR_MULTIPLIER` x the learning rate.
    """
    def label(path, _):
        name = getattr(path[-1], "key", getattr(path[-1], "name", None))
        if name not in _GROUPS:
            raise KeyError(f"unknown DualAdapter residual {jax.tree_util.keystr(path)}; expected {sorted(_GROUPS)}")
        return _GROUPS[name]
    return jax.tree_util.tree_map_with_path(label, residuals)


def adapt(residuals: dict[str, jax.Array], w_template: jax.Array, w_cupl: jax.Array | None, w_neg: jax.Array,
          caches: Caches) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array, jax.Array]:
    """Applies the residuals (reference PositiveAdapter.forward followed by NegativeAdapter.forward).

      W_t' = normalise(W_t + R_t), W_u' = normalise(W_u + R_u), W_pos = 0.45 W_t' + 0.55 W_u'
      W_neg' = normalise(normalise(W_neg) + R_neg)
      K' = normalise(K + repeat(R_k, K shots)), K_neg' = normalise(normalise(K_neg) + repeat(R_nk, K shots))

    Args:
      residuals: from `init_residuals`, each f32[C, D].
      w_template: f32[C, D]. w_cupl: f32[C, D] or None (template only; res_cupl is then unused).
      w_neg: f32[C, D] negative classifier.
      caches: `Caches`.

    Returns:
      (w_pos f32[C, D], w_template' f32[C, D], w_cupl' f32[C, D] | None, w_neg' f32[C, D],
       keys' f32[C*K, D], neg_keys' f32[C*K, D]).
    """
    chex.assert_equal_shape([w_template, w_neg, residuals["res_template"], residuals["res_keys"]])
    k = caches.shots
    w_t = normalize(w_template + residuals["res_template"])
    w_u = None if w_cupl is None else normalize(w_cupl + residuals["res_cupl"])
    w_n = normalize(normalize(w_neg) + residuals["res_neg"])
    keys = normalize(caches.keys + jnp.repeat(residuals["res_keys"], k, axis=0))
    neg_keys = normalize(normalize(caches.neg_keys) + jnp.repeat(residuals["res_neg_keys"], k, axis=0))
    return positive_classifier(w_t, w_u), w_t, w_u, w_n, keys, neg_keys


def _cosine(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
    """torch.nn.CosineSimilarity(dim=axis, eps=1e-7)."""
    return jnp.sum(normalize(a, axis, _COS_EPS) * normalize(b, axis, _COS_EPS), axis=axis)


def consistency_loss(w_pos: jax.Array, w_template: jax.Array, w_cupl: jax.Array | None,
                     mode: str = "reference") -> jax.Array:
    """Keeps the adapted positive classifier close to the original text classifiers.

      L = mean(0.45 (1 - cos(W_pos', W_t)) + 0.55 (1 - cos(W_pos', W_u)))   (1 - cos(W_pos', W_t) without CuPL)

    Args:
      w_pos: f32[C, D] adapted positive classifier.
      w_template, w_cupl: f32[C, D] original (unadapted) classifiers; w_cupl may be None.
      mode: 'per_class': cosine over D for each class, mean over the C classes (the paper's reading).
        'reference': cosine over the C classes for each feature dimension, mean over D -- what the reference
        computes, since it applies `nn.CosineSimilarity(dim=1)` to [D, C] matrices.

    Returns:
      f32[] loss.
    """
    if mode not in ("per_class", "reference"):
        raise ValueError(f"consistency must be 'per_class' or 'reference', got {mode!r}")
    axis = -1 if mode == "per_class" else 0
    if w_cupl is None:
        return jnp.mean(1.0 - _cosine(w_pos, w_template, axis))
    dist = (TEMPLATE_WEIGHT * (1.0 - _cosine(w_pos, w_template, axis))
            + (1.0 - TEMPLATE_WEIGHT) * (1.0 - _cosine(w_pos, w_cupl, axis)))
    return jnp.mean(dist)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    # Distances here are never ~0 in practice; the floor only keeps the gradient finite if one is.
    return jnp.sqrt(jnp.maximum(x, 1e-12))


def adaptive_reranking_loss(features: jax.Array, prototypes: jax.Array, labels: jax.Array,
                            scale: float = 4.0, knn: int = 3) -> jax.Array:
    """Adaptive re-ranking loss (reference main.py `adaptive_reranking_loss`).

    For each sample, over its knn nearest prototypes p_k (Euclidean; the true class included if it is among
    them): max(0, ||f - p_y|| + (1 - p_k . p_y) / scale - ||f - p_k||); mean over [B, knn].

    Args:
      features: f32[B, D] image features.
      prototypes: f32[C, D] class prototypes (the adapted positive classifier, rows not normalised).
      labels: i32[B].
      scale: margin scale (4 in the reference).
      knn: number of nearest prototypes (3; clipped to C).

    Returns:
      f32[] loss.
    """
    chex.assert_rank([features, prototypes, labels], [2, 2, 1])
    knn = min(knn, prototypes.shape[0])
    # torch.cdist's matmul path: ||f||^2 + ||p||^2 - 2 f.p, clamped at 0.
    sq = (jnp.sum(features**2, -1)[:, None] + jnp.sum(prototypes**2, -1)[None, :]
          - 2.0 * features @ prototypes.T)
    dist = _safe_sqrt(sq)
    neg_top, idx = jax.lax.top_k(-dist, knn)  # the knn smallest distances, ascending
    p_y = prototypes[labels]
    anchor = _safe_sqrt(jnp.sum((features - p_y) ** 2, -1))[:, None]
    margins = (1.0 - jnp.einsum("bkd,bd->bk", prototypes[idx], p_y)) / scale
    return jnp.mean(jnp.maximum(anchor + margins + neg_top, 0.0))


def finetune_loss(residuals: dict[str, jax.Array], features: jax.Array, labels: jax.Array,
                  w_template: jax.Array, w_cupl: jax.Array | None, w_neg: jax.Array, caches: Caches, *,
                  alpha: jax.Array | float, beta: jax.Array | float, lam: jax.Array | float,
                  consistency_weight: float = 8.0, rerank_scale: float = 4.0, rerank_knn: int = 3,
                  consistency: str = "reference") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DualAdapter fine-tuning loss (reference main.py, the training block of DualAdapter()).

      loss = CE(logits(f; adapted W_pos, W_neg', K', K_neg')) + rerank(f, W_pos, y)
             + consistency_weight * consistency(W_pos, W_t, W_u)

    The soft cache values stay those of the original keys (as in the reference).

    Args:
      residuals: trainable residuals (`init_residuals`).
      features: f32[B, D] normalised image features of a training batch.
      labels: i32[B].
      w_template, w_cupl, w_neg: f32[C, D] original classifiers (w_cupl may be None).
      caches: `Caches` built from the original few-shot features.
      alpha, beta, lam: logits hyperparameters (the preset's init_alpha, init_beta, init_lambda).
      consistency_weight: 8 in the reference.
      rerank_scale, rerank_knn: 4 and 3 in the reference.
      consistency: 'reference' (default, what the reference computes) or 'per_class' (the paper's reading);
        see `consistency_loss`.

    Returns:
      (loss f32[], metrics dict with loss, ce, rerank, consistency, accuracy (percent)).
    """
    chex.assert_rank([features, labels], [2, 1])
    w_pos, _, _, w_n, keys, neg_keys = adapt(residuals, w_template, w_cupl, w_neg, caches)
    out = logits(features, w_pos, w_n, caches.replace(keys=keys, neg_keys=neg_keys), alpha=alpha, beta=beta, lam=lam)
    ce = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
    rerank = adaptive_reranking_loss(features, w_pos, labels, scale=rerank_scale, knn=rerank_knn)
    cons = consistency_loss(w_pos, w_template, w_cupl, consistency)
    loss = ce + rerank + consistency_weight * cons
    acc = 100.0 * jnp.mean(jnp.argmax(out, -1) == labels)
    return loss, {"loss": loss, "ce": ce, "rerank": rerank, "consistency": cons, "accuracy": acc}


# ----------------------------------------------------------------------------------------------------------
# Official per-dataset settings (configs/*.yaml of zhangce01/DualAdapter)
# ----------------------------------------------------------------------------------------------------------
#
# search_scale / search_scale2 / search_step are (beta, alpha, lam) start / stop / steps of the validation
# grid, value_i = i * (stop - start) / steps + start for i < steps (the reference's beta2 / alpha2 entries are
# fixed to 0 and dropped). seed is main.py's training seed; the few-shot sampling of extract_features.py
# uses seed 1 (sampling_seed). training_feat_num = 1024 (RN50) everywhere and w_training* are unused by the
# reference's logits, so they are left out.
#
# stanford_cars and ucf101 ship an older config format (search_scale: [15, 10 | 7, 0.2, 0.2],
# search_step: [100, 20, 10, 10], no search_scale2), on which main.py would fail with a KeyError. We read
# them as beta in [0, 15) x 100 and alpha in [0, stop) x 20 and take the common lam range [0.6, 1) x 20;
# the raw values are kept under 'legacy_search_scale' / 'legacy_search_step'.

_COMMON = dict(search_scale=(0.0, 0.0, 0.6), search_scale2=(7.0, 7.0, 1.0), search_step=(200, 40, 20),
               init_beta=1.0, init_alpha=5.0, init_lambda=0.75, lr=1e-4, eps=1e-3, train_epoch=30,
               augment_epoch=10, seed=3407, sampling_seed=1)


def _preset(**overrides: Any) -> dict[str, Any]:
    return {**_COMMON, **overrides}


PRESETS: dict[str, dict[str, Any]] = {
    "default": _preset(),
    "imagenet": _preset(search_scale2=(4.0, 4.0, 0.9), init_beta=2.0, init_alpha=1.2, augment_epoch=20,
                        train_epoch=20),
    "caltech101": _preset(),
    "oxford_pets": _preset(init_alpha=2.0),
    "stanford_cars": _preset(search_scale2=(15.0, 10.0, 1.0), search_step=(100, 20, 20), init_beta=2.0,
                             init_alpha=1.0, eps=5e-3, legacy_search_scale=(15, 10, 0.2, 0.2),
                             legacy_search_step=(100, 20, 10, 10)),
    "oxford_flowers": _preset(init_alpha=3.0, train_epoch=60),
    # food101.yaml: "eps 0.01 for 1/2-shot, 0.001 for others".
    "food101": _preset(init_alpha=0.8, eps_few_shots={1: 1e-2, 2: 1e-2}),
    "fgvc_aircraft": _preset(search_scale2=(20.0, 10.0, 1.0), init_beta=3.0, init_alpha=8.0, lr=5e-4),
    "sun397": _preset(search_scale2=(10.0, 7.0, 1.0), init_beta=5.0, init_alpha=3.0),
    "dtd": _preset(init_alpha=3.0, train_epoch=20),
    "eurosat": _preset(search_scale=(0.0, 0.0, 0.3), search_scale2=(20.0, 5.0, 0.9), search_step=(200, 20, 10),
                       init_beta=6.0, init_alpha=1.5, train_epoch=200),
    "ucf101": _preset(search_scale2=(15.0, 7.0, 1.0), search_step=(100, 20, 20), init_alpha=1.0, eps=2e-3,
                      legacy_search_scale=(15, 7, 0.2, 0.2), legacy_search_step=(100, 20, 10, 10)),
}


def _reference_grid(start: float, stop: float, steps: int) -> np.ndarray:
    # Same formula as vlm_jax.eval.classification.grid (kept local: methods do not import evaluators).
    return np.asarray([i * (stop - start) / steps + start for i in range(int(steps))], np.float64)


def search_grids(preset: dict[str, Any] | str) -> dict[str, np.ndarray]:
    """The reference's validation grid of a preset, in its loop order: {'beta', 'alpha', 'lam'}."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    return {name: _reference_grid(p["search_scale"][i], p["search_scale2"][i], p["search_step"][i])
            for i, name in enumerate(("beta", "alpha", "lam"))}
