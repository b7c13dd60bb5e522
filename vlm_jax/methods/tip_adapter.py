"""Zero-shot CLIP, Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022) as pure functions on features.

The baselines of DualAdapter. The official code (github gaopengcuhk/Tip-Adapter: main.py, utils.py) is the
authority. Conventions as in `dualadapter`: image features f32[N, D] normalised, text classifier f32[C, D],
cache keys f32[C*K, D] sorted by class then shot, cache values f32[C*K, C] one-hot (a `dualadapter.Caches`
holds both).

Tip-Adapter-F in the reference trains an `nn.Linear` whose weight is initialised to the cache keys (and is
never re-normalised), with plain cross-entropy, AdamW(lr=preset lr (1e-3), eps=1e-4, torch's default weight
decay 0.01), cosine annealing to 0 over train_epoch x steps per epoch, batch 256; the best epoch is kept.
The reference keeps the cache in float16; we use float32.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

LOGIT_SCALE = 100.0
FINETUNE_EPS = 1e-4  # AdamW eps of Tip-Adapter-F
FINETUNE_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which the reference does not override
SEARCH_START = 0.1  # the reference's beta and alpha grids start at 0.1


def zero_shot_logits(features: jax.Array, text_weights: jax.Array) -> jax.Array:
    """Zero-shot CLIP: 100 f W^T.

    Args:
      features: f32[B, D] normalised image features.
      text_weights: f32[C, D] text classifier.

    Returns:
      f32[B, C].
    """
    chex.assert_rank([features, text_weights], 2)
    chex.assert_equal_shape_suffix([features, text_weights], 1)
    return LOGIT_SCALE * features @ text_weights.T


def logits(features: jax.Array, text_weights: jax.Array, cache_keys: jax.Array, cache_values: jax.Array, *,
           alpha: jax.Array | float, beta: jax.Array | float) -> jax.Array:
    """Tip-Adapter logits (reference main.py run_tip_adapter): 100 f W^T + alpha exp(-beta (1 - f K^T)) V.

    alpha and beta may be traced scalars (vmap over a grid).

    Args:
      features: f32[B, D] normalised image features.
      text_weights: f32[C, D].
      cache_keys: f32[C*K, D] (the trained keys for Tip-Adapter-F).
      cache_values: f32[C*K, C] one-hot.
      alpha: residual ratio. beta: sharpness.

    Returns:
      f32[B, C].
    """
    chex.assert_rank([cache_keys, cache_values], 2)
    chex.assert_equal_shape_suffix([features, cache_keys], 1)
    chex.assert_equal_shape_prefix([cache_keys, cache_values], 1)
    cache = jnp.exp(-beta * (1.0 - features @ cache_keys.T)) @ cache_values
    return zero_shot_logits(features, text_weights) + alpha * cache


def finetune_init(caches: Any) -> dict[str, jax.Array]:
    """Tip-Adapter-F parameters: the cache keys, made trainable.

    Args:
      caches: a `dualadapter.Caches` (its `keys`) or the keys f32[C*K, D] themselves.

    Returns:
      {'cache_keys': f32[C*K, D]}.
    """
    keys = getattr(caches, "keys", caches)
    keys = jnp.array(keys, jnp.float32)  # a copy
    chex.assert_rank(keys, 2)
    return {"cache_keys": keys}


def finetune_loss(params: dict[str, jax.Array], features: jax.Array, labels: jax.Array, text_weights: jax.Array,
                  cache_values: jax.Array, *, alpha: jax.Array | float,
                  beta: jax.Array | float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Tip-Adapter-F loss (reference main.py run_tip_adapter_F): CE of `logits` with the trainable keys.

    Args:
      params: from `finetune_init`.
      features: f32[B, D] normalised image features of a training batch.
      labels: i32[B].
      text_weights: f32[C, D]. cache_values: f32[C*K, C] one-hot.
      alpha, beta: the preset's init_alpha, init_beta.

    Returns:
      (loss f32[], metrics dict with loss, ce, accuracy (percent)).
    """
    chex.assert_rank([features, labels], [2, 1])
    out = logits(features, text_weights, params["cache_keys"], cache_values, alpha=alpha, beta=beta)
    ce = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
    acc = 100.0 * jnp.mean(jnp.argmax(out, -1) == labels)
    return ce, {"loss": ce, "ce": ce, "accuracy": acc}


# ----------------------------------------------------------------------------------------------------------
# Official per-dataset settings (configs/*.yaml of gaopengcuhk/Tip-Adapter)
# ----------------------------------------------------------------------------------------------------------
#
# search_scale = (beta_stop, alpha_stop), search_step = (beta_steps, alpha_steps); the grids are
# value_i = i * (stop - 0.1) / steps + 0.1 for i < steps (utils.search_hp), beta the outer loop. seed: main.py
# seeds random / torch with 1. dtd, eurosat, fgvc, imagenet and oxford_pets were read from the official
# repository; caltech101, food101, oxford_flowers, stanford_cars, sun397 and ucf101 from an unmodified fork of
# it (OE-Heart/Tip-Adapter, whose five official files match), cross-checked where other copies exist.

_COMMON = dict(search_scale=(7.0, 3.0), search_step=(200, 20), init_beta=1.0, init_alpha=1.17, lr=1e-3,
               eps=FINETUNE_EPS, weight_decay=FINETUNE_WEIGHT_DECAY, train_epoch=20, augment_epoch=10, seed=1)


def _preset(**overrides: Any) -> dict[str, Any]:
    return {**_COMMON, **overrides}


PRESETS: dict[str, dict[str, Any]] = {
    "default": _preset(),
    "imagenet": _preset(),
    "caltech101": _preset(search_scale=(12.0, 5.0), init_alpha=3.0),
    "oxford_pets": _preset(),
    "stanford_cars": _preset(search_scale=(20.0, 10.0), init_alpha=3.0),
    "oxford_flowers": _preset(search_scale=(50.0, 50.0), init_alpha=10.0),
    "food101": _preset(search_scale=(10.0, 10.0)),
    "fgvc_aircraft": _preset(search_scale=(30.0, 30.0), init_alpha=5.0),
    "sun397": _preset(search_scale=(12.0, 10.0)),
    "dtd": _preset(search_scale=(13.0, 13.0), init_alpha=2.0),
    "eurosat": _preset(search_scale=(12.0, 10.0), init_alpha=2.0, train_epoch=100),
    "ucf101": _preset(init_alpha=3.0),
}


def search_grids(preset: dict[str, Any] | str) -> dict[str, np.ndarray]:
    """The reference's validation grid of a preset, in its loop order: {'beta', 'alpha'}."""
    p = PRESETS[preset] if isinstance(preset, str) else preset

    def grid(stop: float, steps: int) -> np.ndarray:
        # Same formula as vlm_jax.eval.classification.grid(0.1, stop, steps).
        return np.asarray([i * (stop - SEARCH_START) / steps + SEARCH_START for i in range(int(steps))], np.float64)

    return {"beta": grid(p["search_scale"][0], p["search_step"][0]),
            "alpha": grid(p["search_scale"][1], p["search_step"][1])}
