"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022) as few-shot methods; the math is in
`vlm_jax.methods.tip_adapter`, the protocols in `_cache_adapter`.

Both read config.tip_adapter (search grid, initial values, Tip-Adapter-F's training) and the classifier of
config.templates.tip_adapter. Tip-Adapter-F's epoch is chosen on val, or on test with
tip_adapter.train.selection='test' (the official code's optimistic protocol).
"""

from __future__ import annotations

import functools
from typing import Any

from vlm_jax import errors
from vlm_jax.methods import fewshot_registry as registry
from vlm_jax.methods import tip_adapter
from vlm_jax.methods.fewshot import _cache_adapter as cache_adapter

SELECTIONS = ("val", "test")


def tip_logits(f, w, keys, values, *, beta, alpha):
    """Module-level (the grid search jits it by identity)."""
    return tip_adapter.logits(f, w, keys, values, alpha=alpha, beta=beta)


class TipAdapter(cache_adapter.TrainingFree):
    name = "tip_adapter"
    display_name = "Tip-Adapter"
    order = 10
    config_block = "tip_adapter"
    templates = ("tip_adapter",)
    logits = staticmethod(tip_logits)

    def args(self, ctx, caches):
        return (ctx.text["tip"], caches.keys, caches.values)


class TipAdapterF(cache_adapter.FineTuned):
    name = "tip_adapter_f"
    display_name = "Tip-Adapter-F"
    order = 11
    config_block = "tip_adapter"
    templates = ("tip_adapter",)
    logits = staticmethod(tip_logits)

    def check(self, config) -> None:
        selection = config.tip_adapter.train.selection
        if selection not in SELECTIONS:
            raise errors.UserError(f"config.tip_adapter.train.selection must be one of {', '.join(SELECTIONS)}, "
                                   f"got {selection!r}")

    def parts(self, ctx, caches):
        """Tip-Adapter-F at the preset's initial alpha, beta: the cache keys train."""
        init = ctx.config.tip_adapter.init
        hp = dict(alpha=init.alpha, beta=init.beta)

        def eval_logits(a, f, text_weights, cache_values):
            return tip_adapter.logits(f, text_weights, a["cache_keys"], cache_values, **hp)

        consts = {"text_weights": ctx.text["tip"], "cache_values": caches.values}
        return (tip_adapter.finetune_init(caches), consts, functools.partial(tip_adapter.finetune_loss, **hp),
                eval_logits)

    def adapted_args(self, ctx, fit, caches):
        return (ctx.text["tip"], fit.best_params["adapter"]["cache_keys"], caches.values)

    def paper_selection(self, ctx):
        return ctx.tests["test"][0] if ctx.config.tip_adapter.train.selection == "test" else ctx.val

    def paper_record(self, ctx, fit, res: dict[str, Any]) -> None:
        res.update(best_epoch=fit.best_epoch, selection=ctx.config.tip_adapter.train.selection)

    def paper_finish(self, ctx, fit, res: dict[str, Any]) -> None:
        if res["selection"] == "test":
            # The official code reports max(best test epoch's accuracy, accuracy after the val search).
            res["test_accuracy"] = max(res["test_accuracy"], fit.best_metrics["val_accuracy"])


registry.register(TipAdapter())
registry.register(TipAdapterF())
