"""Zero-shot CLIP: the text classifier of config.templates.zeroshot, nothing learnt, nothing searched."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlm_jax.eval import classification
from vlm_jax.methods import fewshot_registry as registry
from vlm_jax.methods import tip_adapter


class ZeroShot:
    """CLIP's hand-crafted prompts, scored as the Tip-Adapter code scores zero-shot CLIP."""

    name = "zeroshot"
    display_name = "Zero-shot CLIP"
    order = 0
    config_block = None
    templates = ("zeroshot",)
    needs = frozenset()

    def check(self, config) -> None:
        del config

    def run_paper(self, ctx: registry.Context) -> dict[str, Any]:
        args = (ctx.text["zeroshot"],)
        logits = tip_adapter.zero_shot_logits(np.asarray(ctx.val["features"]), *args)
        res = {"val_accuracy": float(classification.accuracy(logits, ctx.val["labels"]))}
        registry.evaluate(res, tip_adapter.zero_shot_logits, args, ctx.tests)
        return res

    def run_realistic(self, ctx: registry.Context) -> dict[str, Any]:
        res: dict[str, Any] = {}
        registry.evaluate(res, tip_adapter.zero_shot_logits, (ctx.text["zeroshot"],), ctx.tests)
        res["hparams"] = {}
        return res


registry.register(ZeroShot())
