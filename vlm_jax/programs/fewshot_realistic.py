"""The realistic few-shot protocol: every hyperparameter chosen with the K shots alone (never the val split).

The adapter papers choose (alpha, beta, lambda) by grid search on the full validation split and keep the
fine-tuning epoch that scores best on it: hundreds or thousands of labelled images that a K-shot user does not
have. CLAP (Silva-Rodriguez et al., arXiv 2312.12730) shows that this overstates few-shot accuracy. Here the
same methods choose their hyperparameters by k-fold cross-validation over the support set:

* folds = min(config.realistic.folds, K); fold f holds out shot s of every class where s % folds == f
  (`fewshot.shot_folds`), so each fold's cache keeps the same number of shots for every class;
* queries are the held-out support images with the evaluation transform (as val/test images are encoded);
* training-free methods: the grid setting with the most correct held-out predictions over all folds, each fold
  scored with a cache built from its training shots only (`classification.search_folds`);
* fine-tuned methods: each fold fine-tunes on its training shots and picks its best epoch and grid setting on
  its held-out shots, as the papers do on val; the epoch is the argmax of the held-out accuracy averaged over the
  folds, the setting the argmax of the pooled grid tables. The final adapter is trained on all K shots with the
  same schedule and kept at that epoch. DualAdapter-F trains on the K cache shots (the official second draw
  would add up to K more labelled images per class, which a K-shot user does not have);
* with fewer than config.realistic.min_shots shots (1-shot: a held-out shot would leave its class without a
  cache entry), the presets' initial (alpha, beta, lambda) and the last epoch are used.

Methods without hyperparameters to choose (zero-shot CLIP, or one that trains on the K shots alone) run as
under the papers' protocol. Each method's realistic run is its face's `run_realistic`
(`vlm_jax.methods.fewshot_registry`; the cache models' in `vlm_jax/methods/fewshot/_cache_adapter.py`). The
functions here receive the support set, the test sets and the text classifiers; no val split is passed in.
"""

from __future__ import annotations

from typing import Any

from vlm_jax.data import fewshot
from vlm_jax.methods import fewshot_registry as registry
from vlm_jax.programs import fewshot_methods as fm


def run_realistic(config, methods, bb, ds, few, text, support, tests, cache, *, shots, seed, workdir, writer,
                  rng) -> dict[str, dict[str, Any]]:
    """Runs `methods` for one (shots, seed) with every hyperparameter chosen on the K shots.

    Args:
      few: the K-shot support set (the cache subset), sorted by label.
      text: the text classifiers (`fewshot_clip.text_features`).
      support: {'features' f32[N, D], 'labels' i32[N]}: `few` encoded with the evaluation transform, same order.
      tests: name -> (features dict, class_subset or None), used only to report the final accuracy.
      cache: {'keys' f32[N, D], 'labels' i32[N]}: the augmented cache keys of `few`, same order.

    Returns:
      {method: {'test_accuracy', 'hparams', 'best_epoch' (fine-tuned), 'folds' (0: fixed defaults),
                'cv_accuracy' (pooled held-out accuracy of the chosen setting; None without folds)}}.
    """
    faces = registry.check(config, methods)
    rc = config.realistic
    k = min(int(rc.folds), shots)
    folds = fewshot.shot_folds(cache["labels"], k) if shots >= max(rc.min_shots, 2) and k >= 2 else []
    ctx = fm.context(config, faces, "realistic", bb, ds, few, text, tests, cache, shots=shots, seed=seed,
                     workdir=workdir, writer=writer, rng=rng, support=support, folds=folds)
    return fm.run_faces(faces, ctx, writer, defaults={"folds": len(folds), "cv_accuracy": None})
