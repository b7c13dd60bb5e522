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

The functions here receive the support set, the test sets and the text classifiers; no val split is passed in.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
from absl import logging

from vlm_jax.data import fewshot
from vlm_jax.eval import classification
from vlm_jax.methods import dualadapter, tip_adapter
from vlm_jax.programs import fewshot_methods as fm


def _take(x, idx):
    return np.asarray(x)[idx]


def _fold_caches(cache, idx, num_classes):
    return dualadapter.build_caches(_take(cache["keys"], idx), _take(cache["labels"], idx), num_classes)


def _cv_fit(config, method, bb, few, w, cache, support, folds, *, shots, seed, tag, workdir, writer, rng):
    """Per fold: fine-tune on its training shots, select on its held-out shots. Returns (epoch, hparams, acc)."""
    curves, fold_args = [], []
    num_classes = w["template"].shape[0]
    for f, (tr, held) in enumerate(folds):
        caches = _fold_caches(cache, tr, num_classes)
        held_set = {"features": _take(support["features"], held), "labels": _take(support["labels"], held)}
        few_tr = [few[i] for i in tr]
        fit = _fit(config, method, bb, few_tr, w, caches, shots=shots, seed=seed, name=f"{method}-{tag}-cv{f}",
                   workdir=workdir, writer=writer, rng=rng, select_on=held_set)
        curves.append([row["val_accuracy"] * len(held) for row in fit.history])
        fold_args.append((held_set["features"], held_set["labels"], _adapted_args(method, fit, w, caches)))
    curve = np.sum(curves, axis=0)
    epoch = int(np.argmax(curve))  # the first best epoch of the pooled held-out accuracy
    logits_fn, search = _logits_and_grid(config, method)
    best, acc, _ = classification.search_folds(logits_fn, fm.grids(search), fold_args)
    return epoch, best, acc


def _fit(config, method, bb, few, w, caches, *, shots, seed, name, workdir, writer, rng, select_on=None,
         keep_epoch=None):
    if method == "tip_adapter_f":
        consts, loss, eval_logits = fm.tip_finetune_parts(config, w["tip"], caches)
        return fm.finetune(bb, few, config.tip_adapter.train, name=name, adapter=tip_adapter.finetune_init(caches),
                           consts=consts, method_loss=loss, eval_logits=eval_logits, seed=seed, workdir=workdir,
                           writer=writer, rng=rng, select_on=select_on, keep_epoch=keep_epoch)
    tc = config.dualadapter.train
    consts, loss, eval_logits = fm.dual_finetune_parts(config, w["template"], w["cupl"], w["negative"], caches)
    return fm.finetune(bb, few, tc, name=name, adapter=dualadapter.init_residuals(*w["template"].shape),
                       consts=consts, method_loss=loss, eval_logits=eval_logits, seed=seed, workdir=workdir,
                       writer=writer, rng=rng, select_on=select_on, keep_epoch=keep_epoch,
                       optim=fm.dualadapter_optim(tc, shots))


def _adapted_args(method, fit, w, caches):
    adapter = fit.best_params["adapter"]
    if method == "tip_adapter_f":
        return (w["tip"], adapter["cache_keys"], caches.values)
    return fm.dual_adapted(adapter, w["template"], w["cupl"], w["negative"], caches)


def _logits_and_grid(config, method):
    if method in ("tip_adapter", "tip_adapter_f"):
        return fm.tip_logits, config.tip_adapter.search
    return fm.dual_logits, config.dualadapter.search


def _initial(config, method) -> dict[str, float]:
    init = config.tip_adapter.init if method.startswith("tip") else config.dualadapter.init
    return {k: float(v) for k, v in init.items()}


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
    rc = config.realistic
    k = min(int(rc.folds), shots)
    folds = fewshot.shot_folds(cache["labels"], k) if shots >= max(rc.min_shots, 2) and k >= 2 else []
    w = fm.text_weights(config, text)
    num_classes = len(ds.classnames)
    caches = dualadapter.build_caches(cache["keys"], cache["labels"], num_classes)
    tag = f"{shots}shot-seed{seed}"
    out = {}
    for method in methods:
        t0 = time.time()
        res: dict[str, Any] = {"folds": len(folds), "cv_accuracy": None}
        if method == "zeroshot":
            logits_fn, args, hp = tip_adapter.zero_shot_logits, (w["zeroshot"],), {}
        elif method in ("tip_adapter", "dualadapter"):
            logits_fn, search = _logits_and_grid(config, method)
            def make(idx, method=method):  # the fold's own cache: its training shots only
                c = _fold_caches(cache, idx, num_classes)
                return (w["tip"], c.keys, c.values) if method == "tip_adapter" else (w["positive"], w["negative"], c)

            hp = _initial(config, method)
            if folds:
                fold_args = [(_take(support["features"], held), _take(support["labels"], held), make(tr))
                             for tr, held in folds]
                hp, res["cv_accuracy"], _ = classification.search_folds(logits_fn, fm.grids(search), fold_args)
            args = (w["tip"], caches.keys, caches.values) if method == "tip_adapter" else (
                w["positive"], w["negative"], caches)
        elif method in ("tip_adapter_f", "dualadapter_f"):
            tc = config.tip_adapter.train if method == "tip_adapter_f" else config.dualadapter.train
            epoch, hp = tc.epochs - 1, _initial(config, method)
            if folds:
                epoch, hp, res["cv_accuracy"] = _cv_fit(config, method, bb, few, w, cache, support, folds,
                                                        shots=shots, seed=seed, tag=tag, workdir=workdir,
                                                        writer=writer, rng=rng)
            fit = _fit(config, method, bb, few, w, caches, shots=shots, seed=seed, name=f"{method}-{tag}-realistic",
                       workdir=workdir, writer=writer, rng=rng, keep_epoch=epoch)
            logits_fn, _ = _logits_and_grid(config, method)
            args = _adapted_args(method, fit, w, caches)
            res["best_epoch"] = epoch
        else:  # run() validated the names
            raise AssertionError(method)
        if method != "zeroshot":
            logits_fn = functools.partial(logits_fn, **hp)
        fm.evaluate(res, logits_fn, args, tests)
        res.update(hparams=hp, seconds=round(time.time() - t0, 2))
        logging.info("%s %s realistic (%d folds): test %.2f%%, %s", method, tag, len(folds), res["test_accuracy"], hp)
        writer.write(shots, {k: v for k, v in res.items() if k.endswith("_accuracy") and v is not None},
                     prefix=f"{method}/seed{seed}/realistic/")
        out[method] = res
    return out
