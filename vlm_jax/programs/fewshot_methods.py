"""The five few-shot CLIP methods of `fewshot_clip`, run under the papers' protocol (hyperparameters on val).

Everything here works on cached features, except fine-tuning, which runs the frozen CLIP inside each train
step on freshly augmented few-shot images (`finetune`). The protocol choices that move the numbers are config
keys (see `configs/dualadapter.py`): each method's templates, DualAdapter-F's training subset, Tip-Adapter-F's
epoch selection (val, or the official code's test), and the per-shot AdamW eps.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlm_jax.data import features as feats
from vlm_jax.eval import classification
from vlm_jax.methods import dualadapter, tip_adapter
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.train import trainer


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning through the generic trainer (Tip-Adapter-F, DualAdapter-F).

def finetune(bb, few, tc, *, name: str, adapter, consts, method_loss, eval_logits, seed: int, workdir: str | None,
             writer, rng: jax.Array, select_on: dict[str, np.ndarray] | None = None, keep_epoch: int | None = None,
             optim: dict[str, Any] | None = None) -> trainer.FitResult:
    """Trains `adapter` on freshly augmented images of `few` each epoch; the CLIP forward runs inside the step.

    Args:
      bb: the `fewshot_clip.Backbone`.
      few: the training examples.
      tc: train config (epochs, batch_size, optim, param_groups).
      adapter: trainable pytree; consts: frozen arrays the loss needs (text classifiers, caches).
      method_loss: (adapter, features f32[B, D], labels i32[B], **consts) -> (loss, metrics).
      eval_logits: (adapter, features, **consts) -> logits at the method's initial hyperparameters.
      select_on: {'features', 'labels'} on which the best epoch is chosen by `eval_logits` accuracy (the val
        split in the papers' protocol, a held-out fold in the realistic one; the trainer logs it as val_*).
      keep_epoch: instead of `select_on`, keep this epoch's parameters (the cosine schedule still spans all
        epochs, so the result equals a run stopped there).
      optim: the optimizer settings (default `tc.optim`).
    Returns:
      trainer.FitResult (best_metrics['val_accuracy']: the selection accuracy of the kept epoch).
    """
    n, div = len(few), mesh_lib.batch_divisor(bb.mesh)
    bs = max(div, min(tc.batch_size, n) // div * div)
    # The reference keeps the last, smaller batch (drop_last=False); we keep it too when the mesh can split it.
    sizes = [bs] * (n // bs) + ([n % bs // div * div] if n % bs >= div else [])
    labels = np.array([e.label for e in few], np.int32)
    current = {"epoch": -1}  # the trainer asks for each epoch's batches (also after a resume), then evaluates it

    def epoch_batches(epoch):
        current["epoch"] = epoch
        order = np.random.default_rng([seed, 7919, epoch]).permutation(n)
        start = 0
        for size in sizes:
            idx = order[start:start + size]
            start += size
            items = [(few[i], (seed, 100_000 + epoch, int(i))) for i in idx]
            yield {"images": feats.load_all(bb.augment_transform, items), "labels": labels[idx]}

    encode = bb.model.encode_image

    def loss_fn(params, batch, rng):
        del rng
        f = bb.model.apply({"params": params["clip"]}, batch["images"], method=encode)
        f = jax.lax.stop_gradient(f / jnp.linalg.norm(f, axis=-1, keepdims=True))
        return method_loss(params["adapter"], f, batch["labels"], **params["consts"])

    if (select_on is None) == (keep_epoch is None):
        raise ValueError("finetune needs exactly one of select_on and keep_epoch")
    if select_on is not None:
        sel_logits = jax.jit(lambda a, c: eval_logits(a, select_on["features"], **c))
        consts_dev = jax.device_put(consts, mesh_lib.replicated(bb.mesh))

        def eval_fn(adapter):
            acc = classification.accuracy(sel_logits(adapter["adapter"], consts_dev), select_on["labels"])
            return {"accuracy": float(acc)}
    else:
        def eval_fn(adapter):  # 1 at the wanted epoch, 0 elsewhere: the trainer keeps the first maximum
            return {"accuracy": float(current["epoch"] == keep_epoch)}

    return trainer.fit(
        loss_fn=loss_fn, params={"clip": bb.params, "adapter": adapter, "consts": consts},
        param_groups=[tuple(g) for g in tc.param_groups], optim=optim or tc.optim.to_dict(), num_epochs=tc.epochs,
        steps_per_epoch=len(sizes), epoch_batches=epoch_batches, mesh=bb.mesh, rng=rng, eval_fn=eval_fn,
        select="accuracy", workdir=workdir, writer=writer, name=name)


def dualadapter_optim(tc, shots: int) -> dict[str, Any]:
    """DualAdapter-F's optimizer settings for `shots`: the yaml's per-shot eps (food101: 1e-2 at 1/2 shots)."""
    optim = tc.optim.to_dict()
    optim["eps"] = float(dict(tc.eps_few_shots).get(shots, optim["eps"]))
    return optim


# ----------------------------------------------------------------------------------------------------------
# Logits. Module-level functions: `classification.search` jits them by identity.

def tip_logits(f, w, keys, values, *, beta, alpha):
    return tip_adapter.logits(f, w, keys, values, alpha=alpha, beta=beta)


def dual_logits(f, w_pos, w_neg, caches, *, beta, alpha, lam):
    return dualadapter.logits(f, w_pos, w_neg, caches, alpha=alpha, beta=beta, lam=lam)


def dual_adapted(residuals, w_template, w_cupl, w_neg, caches):
    w_pos, _, _, w_n, keys, neg_keys = dualadapter.adapt(residuals, w_template, w_cupl, w_neg, caches)
    return w_pos, w_n, caches.replace(keys=keys, neg_keys=neg_keys)


def grids(search_cfg) -> dict[str, np.ndarray]:
    return {k: classification.grid(g.start, g.stop, g.steps) for k, g in search_cfg.items()}


def tip_finetune_parts(config, w_tip, caches):
    """(consts, method_loss, eval_logits) of Tip-Adapter-F at the preset's initial alpha, beta."""
    init = config.tip_adapter.init
    hp = dict(alpha=init.alpha, beta=init.beta)

    def eval_logits(a, f, text_weights, cache_values):
        return tip_adapter.logits(f, text_weights, a["cache_keys"], cache_values, **hp)

    consts = {"text_weights": w_tip, "cache_values": caches.values}
    return consts, functools.partial(tip_adapter.finetune_loss, **hp), eval_logits


def dual_finetune_parts(config, w_t, w_u, w_n, caches):
    """(consts, method_loss, eval_logits) of DualAdapter-F at the preset's initial alpha, beta, lambda."""
    dc = config.dualadapter
    hp = dict(alpha=dc.init.alpha, beta=dc.init.beta, lam=dc.init.lam)

    def eval_logits(a, f, w_template, w_cupl, w_neg, caches):
        return dual_logits(f, *dual_adapted(a, w_template, w_cupl, w_neg, caches), **hp)

    consts = {"w_template": w_t, "w_cupl": w_u, "w_neg": w_n, "caches": caches}
    return consts, functools.partial(dualadapter.finetune_loss, consistency=dc.consistency, **hp), eval_logits


def _search(logits_fn, args, grid, val) -> tuple[Any, dict[str, Any], Any]:
    """Searches `grid` on val (the reference's loop order); returns (features -> logits, result dict, args)."""
    t0 = time.time()
    best, val_acc, table = classification.search(logits_fn, grid, val["features"], val["labels"], args=args)
    logging.info("search over %d settings: %.1f s", table.size, time.time() - t0)
    return functools.partial(logits_fn, **best), {"val_accuracy": val_acc, "hparams": best}, args


def text_weights(config, text) -> dict[str, Any]:
    """The classifiers each method uses: {'zeroshot', 'tip', 'template', 'cupl', 'negative', 'positive'}."""
    t = config.templates
    w_t, w_u = text[f"template/{t.dualadapter}"], text.get("cupl")
    return {"zeroshot": text[f"template/{t.zeroshot}"], "tip": text[f"template/{t.tip_adapter}"], "template": w_t,
            "cupl": w_u, "negative": text["negative"],
            "positive": np.asarray(dualadapter.positive_classifier(w_t, w_u))}


def evaluate(res, logits_fn, args, tests) -> None:
    """Adds '<name>_accuracy' for every test set to `res`."""
    for name, (split, subset) in tests.items():
        logits = logits_fn(jnp.asarray(split["features"]), *args)
        res[f"{name}_accuracy"] = float(classification.accuracy(logits, split["labels"], class_subset=subset))


# ----------------------------------------------------------------------------------------------------------
# The papers' protocol.

def run_paper(config, methods, bb, ds, few, train_few, text, val, tests, cache, *, shots, seed, workdir, writer,
              rng) -> dict[str, dict[str, Any]]:
    """Runs `methods` for one (shots, seed) with hyperparameters and epochs chosen on val, as the papers do.

    Args:
      few: the K-shot sample the caches are built from; train_few: DualAdapter-F's training examples (the
        official second draw, or `few` itself; see config.dualadapter.train.data).
      tests: name -> (features dict, class_subset or None); 'test' is the dataset's own test split, others are
        domain-generalisation sets evaluated with the same adapted classifier (e.g. ImageNet-V2/-Sketch/-A/-R).

    Returns:
      {method: {'val_accuracy', 'test_accuracy', '<name>_accuracy' for the other test sets, 'hparams', ...}}.
    """
    out: dict[str, dict[str, Any]] = {}
    w = text_weights(config, text)
    caches = dualadapter.build_caches(cache["keys"], cache["labels"], len(ds.classnames))
    tag = f"{shots}shot-seed{seed}"

    for method in methods:
        t0 = time.time()
        fit = None
        if method == "zeroshot":
            # CLIP's hand-crafted prompts as the Tip-Adapter code scores zero-shot CLIP (config.templates.zeroshot).
            logits_fn, res, args = tip_adapter.zero_shot_logits, {}, (w["zeroshot"],)
            res["val_accuracy"] = float(classification.accuracy(logits_fn(val["features"], *args), val["labels"]))
        elif method == "tip_adapter":
            logits_fn, res, args = _search(tip_logits, (w["tip"], caches.keys, caches.values),
                                           grids(config.tip_adapter.search), val)
        elif method == "tip_adapter_f":
            tc = config.tip_adapter.train
            consts, loss, eval_logits = tip_finetune_parts(config, w["tip"], caches)
            fit = finetune(bb, few, tc, name=f"tip_adapter_f-{tag}", adapter=tip_adapter.finetune_init(caches),
                           consts=consts, method_loss=loss, eval_logits=eval_logits,
                           select_on=tests["test"][0] if tc.selection == "test" else val, seed=seed,
                           workdir=workdir, writer=writer, rng=rng)
            keys = fit.best_params["adapter"]["cache_keys"]
            logits_fn, res, args = _search(tip_logits, (w["tip"], keys, caches.values),
                                           grids(config.tip_adapter.search), val)
            res.update(best_epoch=fit.best_epoch, selection=tc.selection)
        elif method == "dualadapter":
            logits_fn, res, args = _search(dual_logits, (w["positive"], w["negative"], caches),
                                           grids(config.dualadapter.search), val)
        elif method == "dualadapter_f":
            dc = config.dualadapter
            consts, loss, eval_logits = dual_finetune_parts(config, w["template"], w["cupl"], w["negative"], caches)
            fit = finetune(bb, train_few, dc.train, name=f"dualadapter_f-{tag}",
                           adapter=dualadapter.init_residuals(len(ds.classnames), w["template"].shape[1]),
                           consts=consts, method_loss=loss, eval_logits=eval_logits, select_on=val, seed=seed,
                           workdir=workdir, writer=writer, rng=rng, optim=dualadapter_optim(dc.train, shots))
            adapted = dual_adapted(fit.best_params["adapter"], w["template"], w["cupl"], w["negative"], caches)
            logits_fn, res, args = _search(dual_logits, adapted, grids(dc.search), val)
            # With the second draw, cache and training set together hold up to 2K distinct images per class.
            res.update(best_epoch=fit.best_epoch, train_data=dc.train.data, train_images=len(train_few),
                       distinct_images=len({id(e) for e in [*few, *train_few]}))
        else:  # run() validated the names
            raise AssertionError(method)
        evaluate(res, logits_fn, args, tests)
        if method == "tip_adapter_f" and res["selection"] == "test":
            # The official code reports max(best test epoch's accuracy, accuracy after the val search).
            res["test_accuracy"] = max(res["test_accuracy"], fit.best_metrics["val_accuracy"])
        res["seconds"] = round(time.time() - t0, 2)
        logging.info("%s %s: val %.2f%%, test %.2f%% (%.1f s)", method, tag, res["val_accuracy"],
                     res["test_accuracy"], res["seconds"])
        writer.write(shots, {k: v for k, v in res.items() if k.endswith("_accuracy")}, prefix=f"{method}/seed{seed}/")
        out[method] = res
    return out
