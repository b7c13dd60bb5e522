"""The two protocols for cache-model methods (Tip-Adapter's and DualAdapter's families), written once.

A cache model scores `logits(features, *args, **hparams)` with args built from a cache of the K shots and
hyperparameters searched on a grid (`TrainingFree`); its fine-tuned variant first trains an adapter with the
generic trainer (`FineTuned`). The protocols (see `programs/fewshot_realistic` for the realistic one):

* paper, training-free: grid search on the val split;
* paper, fine-tuned: train, keep the best epoch on val, then the grid search on val with the adapted args;
* realistic, training-free: the grid setting with the most correct held-out predictions over the folds of the
  K shots, each fold scored with a cache of its own training shots (presets' initial values without folds);
* realistic, fine-tuned: each fold fine-tunes on its training shots and is scored on its held-out shots; the
  epoch is the argmax of the pooled held-out accuracy curve and the setting that of the pooled grid tables; the
  final adapter trains on all K shots and is kept at that epoch (last epoch and initial values without folds).

A family subclasses these with its logits function and the args it builds; this module registers nothing.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
from absl import logging

from vlm_jax.eval import classification
from vlm_jax.methods import dualadapter
from vlm_jax.methods import fewshot_registry as registry


def grids(search_cfg) -> dict[str, np.ndarray]:
    """config block's `search` ({name: {start, stop, steps}}) -> name -> grid values, in loop order."""
    return {k: classification.grid(g.start, g.stop, g.steps) for k, g in search_cfg.items()}


def initial(block) -> dict[str, float]:
    """The preset's initial hyperparameters (`block.init`)."""
    return {k: float(v) for k, v in block.init.items()}


def search_val(logits_fn, args, grid, val) -> tuple[Any, dict[str, Any]]:
    """Searches `grid` on val (the reference's loop order); returns (features -> logits, result dict)."""
    t0 = time.time()
    best, val_acc, table = classification.search(logits_fn, grid, val["features"], val["labels"], args=args)
    logging.info("search over %d settings: %.1f s", table.size, time.time() - t0)
    return functools.partial(logits_fn, **best), {"val_accuracy": val_acc, "hparams": best}


def fold_caches(ctx: registry.Context, idx) -> dualadapter.Caches:
    """The cache of the shots `idx` of ctx.few alone (a fold's training shots)."""
    return dualadapter.build_caches(np.asarray(ctx.cache["keys"])[idx], np.asarray(ctx.cache["labels"])[idx],
                                    ctx.num_classes)


def held_out(ctx: registry.Context, idx) -> dict[str, np.ndarray]:
    """{'features', 'labels'} of the support shots `idx` (evaluation transform)."""
    return {k: np.asarray(ctx.support[k])[idx] for k in ("features", "labels")}


class TrainingFree:
    """A cache model whose hyperparameters are searched on a grid. Subclasses set the class attributes below
    (see `registry.FewShotMethod`) and `logits` (a module-level function: the grid search jits it by identity)."""

    name: str
    display_name: str
    order: int
    config_block: str
    templates: tuple[str, ...]
    needs = frozenset({"cache"})
    logits: Any

    def args(self, ctx: registry.Context, caches: dualadapter.Caches) -> tuple:
        """The positional args of `logits` after the features, for the cache `caches`."""
        raise NotImplementedError

    def check(self, config) -> None:
        del config

    def block(self, ctx: registry.Context):
        return ctx.config[self.config_block]

    def run_paper(self, ctx: registry.Context) -> dict[str, Any]:
        args = self.args(ctx, ctx.caches)
        logits_fn, res = search_val(self.logits, args, grids(self.block(ctx).search), ctx.val)
        registry.evaluate(res, logits_fn, args, ctx.tests)
        return res

    def run_realistic(self, ctx: registry.Context) -> dict[str, Any]:
        res: dict[str, Any] = {}
        hp = initial(self.block(ctx))
        if ctx.folds:
            fold_args = [(*held_out(ctx, held).values(), self.args(ctx, fold_caches(ctx, tr)))
                         for tr, held in ctx.folds]
            hp, res["cv_accuracy"], _ = classification.search_folds(self.logits, grids(self.block(ctx).search),
                                                                    fold_args)
        registry.evaluate(res, functools.partial(self.logits, **hp), self.args(ctx, ctx.caches), ctx.tests)
        res["hparams"] = hp
        return res


class FineTuned(TrainingFree):
    """A cache model whose adapter is trained first (through the frozen CLIP, `Context.finetune`)."""

    needs = frozenset({"cache", "training"})

    def parts(self, ctx: registry.Context, caches) -> tuple[Any, Any, Any, Any]:
        """(adapter init, frozen consts, method_loss, eval_logits) for `fewshot_methods.finetune`."""
        raise NotImplementedError

    def adapted_args(self, ctx: registry.Context, fit, caches) -> tuple:
        """The args of `logits` with the trained adapter `fit.best_params['adapter']`."""
        raise NotImplementedError

    def optim(self, ctx: registry.Context) -> dict[str, Any] | None:
        """The optimizer settings (None: the train block's `optim`)."""
        del ctx
        return None

    # The papers' protocol, per family: the training set, where the epoch is selected, what the result records.
    def paper_train_set(self, ctx: registry.Context):
        return ctx.few

    def paper_selection(self, ctx: registry.Context):
        return ctx.val

    def paper_record(self, ctx: registry.Context, fit, res: dict[str, Any]) -> None:
        """Adds the fit's facts to `res` (before the test accuracies)."""
        res["best_epoch"] = fit.best_epoch

    def paper_finish(self, ctx: registry.Context, fit, res: dict[str, Any]) -> None:
        """Last word on `res` once the test accuracies are in."""

    def fit(self, ctx: registry.Context, few, caches, *, name: str, select_on=None, keep_epoch=None):
        adapter, consts, loss, eval_logits = self.parts(ctx, caches)
        return ctx.finetune(few, self.block(ctx).train, name=name, adapter=adapter, consts=consts,
                            method_loss=loss, eval_logits=eval_logits, select_on=select_on, keep_epoch=keep_epoch,
                            optim=self.optim(ctx))

    def run_paper(self, ctx: registry.Context) -> dict[str, Any]:
        fit = self.fit(ctx, self.paper_train_set(ctx), ctx.caches, name=f"{self.name}-{ctx.tag}",
                       select_on=self.paper_selection(ctx))
        args = self.adapted_args(ctx, fit, ctx.caches)
        logits_fn, res = search_val(self.logits, args, grids(self.block(ctx).search), ctx.val)
        self.paper_record(ctx, fit, res)
        registry.evaluate(res, logits_fn, args, ctx.tests)
        self.paper_finish(ctx, fit, res)
        return res

    def run_realistic(self, ctx: registry.Context) -> dict[str, Any]:
        res: dict[str, Any] = {}
        epoch, hp = self.block(ctx).train.epochs - 1, initial(self.block(ctx))
        if ctx.folds:
            epoch, hp, res["cv_accuracy"] = self._cross_validate(ctx)
        fit = self.fit(ctx, ctx.few, ctx.caches, name=f"{self.name}-{ctx.tag}-realistic", keep_epoch=epoch)
        res["best_epoch"] = epoch
        registry.evaluate(res, functools.partial(self.logits, **hp), self.adapted_args(ctx, fit, ctx.caches),
                          ctx.tests)
        res["hparams"] = hp
        return res

    def _cross_validate(self, ctx: registry.Context) -> tuple[int, dict[str, float], float]:
        """Per fold: fine-tune on its training shots, select on its held-out shots. Returns (epoch, hparams, acc)."""
        curves, fold_args = [], []
        for f, (tr, held) in enumerate(ctx.folds):
            caches, held_set = fold_caches(ctx, tr), held_out(ctx, held)
            fit = self.fit(ctx, [ctx.few[i] for i in tr], caches, name=f"{self.name}-{ctx.tag}-cv{f}",
                           select_on=held_set)
            curves.append([row["val_accuracy"] * len(held) for row in fit.history])
            fold_args.append((held_set["features"], held_set["labels"], self.adapted_args(ctx, fit, caches)))
        epoch = int(np.argmax(np.sum(curves, axis=0)))  # the first best epoch of the pooled held-out accuracy
        best, acc, _ = classification.search_folds(self.logits, grids(self.block(ctx).search), fold_args)
        return epoch, best, acc
