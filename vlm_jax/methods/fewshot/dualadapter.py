"""DualAdapter and DualAdapter-F (arXiv 2403.12964) as few-shot methods; the math is in
`vlm_jax.methods.dualadapter`, the protocols in `_cache_adapter`.

Both read config.dualadapter and the classifiers of config.templates.dualadapter (plus CuPL and the negative
templates). Under the papers' protocol DualAdapter-F trains on dualadapter.train.data: the official second K-shot
draw ('second_draw') or the cache's own shots ('cache'); under the realistic protocol on the K cache shots.
"""

from __future__ import annotations

import functools
from typing import Any

from vlm_jax.methods import dualadapter
from vlm_jax.methods import fewshot_registry as registry
from vlm_jax.methods.fewshot import _cache_adapter as cache_adapter


def dual_logits(f, w_pos, w_neg, caches, *, beta, alpha, lam):
    """Module-level (the grid search jits it by identity)."""
    return dualadapter.logits(f, w_pos, w_neg, caches, alpha=alpha, beta=beta, lam=lam)


def dual_adapted(residuals, w_template, w_cupl, w_neg, caches):
    """(w_pos, w_neg, caches) of the adapted classifiers and cache keys: `dual_logits`' args."""
    w_pos, _, _, w_n, keys, neg_keys = dualadapter.adapt(residuals, w_template, w_cupl, w_neg, caches)
    return w_pos, w_n, caches.replace(keys=keys, neg_keys=neg_keys)


def dualadapter_optim(tc, shots: int) -> dict[str, Any]:
    """DualAdapter-F's optimizer settings for `shots`: the yaml's per-shot eps (food101: 1e-2 at 1/2 shots)."""
    optim = tc.optim.to_dict()
    optim["eps"] = float(dict(tc.eps_few_shots).get(shots, optim["eps"]))
    return optim


class DualAdapter(cache_adapter.TrainingFree):
    name = "dualadapter"
    display_name = "DualAdapter (training-free)"
    order = 20
    config_block = "dualadapter"
    templates = ("dualadapter",)
    logits = staticmethod(dual_logits)

    def args(self, ctx, caches):
        return (ctx.text["positive"], ctx.text["negative"], caches)


class DualAdapterF(cache_adapter.FineTuned):
    name = "dualadapter_f"
    display_name = "DualAdapter-F"
    order = 21
    config_block = "dualadapter"
    templates = ("dualadapter",)
    logits = staticmethod(dual_logits)

    def parts(self, ctx, caches):
        """DualAdapter-F at the preset's initial alpha, beta, lambda: residuals on classifiers and keys train."""
        dc, w = ctx.config.dualadapter, ctx.text
        hp = dict(alpha=dc.init.alpha, beta=dc.init.beta, lam=dc.init.lam)

        def eval_logits(a, f, w_template, w_cupl, w_neg, caches):
            return dual_logits(f, *dual_adapted(a, w_template, w_cupl, w_neg, caches), **hp)

        consts = {"w_template": w["template"], "w_cupl": w["cupl"], "w_neg": w["negative"], "caches": caches}
        return (dualadapter.init_residuals(*w["template"].shape), consts,
                functools.partial(dualadapter.finetune_loss, consistency=dc.consistency, **hp), eval_logits)

    def adapted_args(self, ctx, fit, caches):
        w = ctx.text
        return dual_adapted(fit.best_params["adapter"], w["template"], w["cupl"], w["negative"], caches)

    def optim(self, ctx):
        return dualadapter_optim(ctx.config.dualadapter.train, ctx.shots)

    def paper_train_set(self, ctx):
        return ctx.train_few

    def paper_record(self, ctx, fit, res: dict[str, Any]) -> None:
        # With the second draw, cache and training set together hold up to 2K distinct images per class.
        res.update(best_epoch=fit.best_epoch, train_data=ctx.config.dualadapter.train.data,
                   train_images=len(ctx.train_few), distinct_images=len({id(e) for e in [*ctx.few, *ctx.train_few]}))


registry.register(DualAdapter())
registry.register(DualAdapterF())
