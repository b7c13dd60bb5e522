"""The few-shot CLIP methods of `fewshot_clip`, run under the papers' protocol (hyperparameters on val).

Each method is a registered face (`vlm_jax.methods.fewshot_registry`; the faces live in
`vlm_jax/methods/fewshot/`): this module builds the `Context` a face runs on — the text classifiers, the cache,
and the services that need the backbone or the workdir (`finetune`, which runs the frozen CLIP inside each train
step on freshly augmented few-shot images, and features of augmented views) — and runs the faces of
config.methods in order, timing, logging and recording each. The protocol choices that move the numbers are
config keys (see `configs/dualadapter.py`): each method's templates, DualAdapter-F's training subset,
Tip-Adapter-F's epoch selection (val, or the official code's test), and the per-shot AdamW eps.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlm_jax import errors
from vlm_jax.data import features as feats
from vlm_jax.data import pipeline
from vlm_jax.eval import classification
from vlm_jax.methods import dualadapter
from vlm_jax.methods import fewshot_registry as registry
from vlm_jax.methods.fewshot.dualadapter import dualadapter_optim  # noqa: F401  (re-exported: the program's name)
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.train import evaluators, trainer


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning through the generic trainer (Tip-Adapter-F, DualAdapter-F).

def finetune(bb, few, tc, *, name: str, adapter, consts, method_loss, eval_logits, seed: int, workdir: str | None,
             writer, rng: jax.Array, select_on: dict[str, np.ndarray] | None = None, keep_epoch: int | None = None,
             optim: dict[str, Any] | None = None, evals: Any = None, tests=None) -> trainer.FitResult:
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
      evals: config.evals, of the types `EVALUATORS` lists; tests: the run's test sets (`Context.tests`).
    Returns:
      trainer.FitResult (best_metrics['val_accuracy']: the selection accuracy of the kept epoch).
    """
    n, div = len(few), mesh_lib.batch_divisor(bb.mesh)
    bs = max(div, min(tc.batch_size, n) // div * div)
    # The reference keeps the last, smaller batch (drop_last=False); we keep it too when the mesh can split it.
    sizes = [bs] * (n // bs) + ([n % bs // div * div] if n % bs >= div else [])
    labels = np.array([e.label for e in few], np.int32)
    current = {"epoch": -1}  # the epoch whose batches were built last: all of an epoch's before its evaluation

    def make(idx, epoch, i):
        current["epoch"] = epoch
        items = [(few[j], (seed, 100_000 + epoch, int(j))) for j in idx]
        return {"images": feats.load_all(bb.augment_transform, items), "labels": labels[idx]}
    epoch_batches = pipeline.EpochBatches(n, tuple(sizes), (seed, 7919), make, mesh=bb.mesh)

    encode = bb.model.encode_image

    def loss_fn(params, batch, rng):
        del rng
        f = bb.model.apply({"params": params["clip"]}, batch["images"], method=encode)
        f = jax.lax.stop_gradient(f / jnp.linalg.norm(f, axis=-1, keepdims=True))
        return method_loss(params["adapter"], f, batch["labels"], **params["consts"])

    if (select_on is None) == (keep_epoch is None):
        raise ValueError("finetune needs exactly one of select_on and keep_epoch")
    accuracy_on = functools.partial(_accuracy_on, eval_logits, jax.device_put(consts, mesh_lib.replicated(bb.mesh)))
    if select_on is not None:
        eval_fn = accuracy_on(select_on)
    else:
        def eval_fn(adapter):  # 1 at the wanted epoch, 0 elsewhere: the trainer keeps the first maximum
            return {"accuracy": float(current["epoch"] == keep_epoch)}

    def selection():
        if select_on is None:
            raise errors.UserError(f"{name}: evaluator type 'selection' needs a selection split, and this run keeps "
                                   f"epoch {keep_epoch} without one (too few shots for folds): use type 'test'")
        return eval_fn
    factories = {"selection": selection, "test": lambda: accuracy_on(tests["test"][0])}
    return trainer.fit(
        loss_fn=loss_fn, params={"clip": bb.params, "adapter": adapter, "consts": consts},
        param_groups=[tuple(g) for g in tc.param_groups], optim=optim or tc.optim.to_dict(), num_epochs=tc.epochs,
        steps_per_epoch=len(sizes), epoch_batches=epoch_batches, mesh=bb.mesh, rng=rng, eval_fn=eval_fn,
        select="accuracy", workdir=workdir, writer=writer, name=name,
        evals=evaluators.from_config(evals, factories))


# The evaluator types of config.evals in the few-shot program (the accuracy of the method's logits at its initial
# hyperparameters): 'selection' on the split the epoch is chosen on (the per-epoch val_accuracy), 'test' on test.
EVALUATORS = ("selection", "test")


def _accuracy_on(eval_logits, consts_dev, split: dict[str, np.ndarray]):
    """trainable params -> {'accuracy'} of `eval_logits` on `split` ({'features', 'labels'})."""
    logits = jax.jit(lambda a, c: eval_logits(a, split["features"], **c))

    def fn(trainable):
        return {"accuracy": float(classification.accuracy(logits(trainable["adapter"], consts_dev),
                                                          split["labels"]))}
    return fn


# ----------------------------------------------------------------------------------------------------------
# The context the faces run on.

def text_weights(config, text) -> dict[str, Any]:
    """The classifiers each method uses: {'zeroshot', 'tip', 'template', 'cupl', 'negative', 'positive'}."""
    t = config.templates
    w_t, w_u = text[f"template/{t.dualadapter}"], text.get("cupl")
    return {"zeroshot": text[f"template/{t.zeroshot}"], "tip": text[f"template/{t.tip_adapter}"], "template": w_t,
            "cupl": w_u, "negative": text["negative"],
            "positive": np.asarray(dualadapter.positive_classifier(w_t, w_u))}


def augmented_views(config, bb, few, *, shots, seed, workdir):
    """n -> {'features' f32[n * N, D] normalised, 'labels' i32[n * N]}: n augmented views of each shot, view-major.

    Each (view, image) has its own augmentation seed, apart from the cache's and the fine-tuning's; the features
    are memoised in the feature cache like the others.
    """
    dc = config.data
    cache_dir = config.feature_cache_dir or os.path.join(workdir, "features")

    def views(n: int) -> dict[str, np.ndarray]:
        def compute():
            items = [(ex, (seed, 200_000 + v, i)) for v in range(n) for i, ex in enumerate(few)]
            f = feats.map_batches(bb.encode_image, bb.params, items, bb.augment_transform, batch_size=dc.eval_batch_size,
                                  mesh=bb.mesh, desc=f"{n} augmented views")
            return {"features": feats.l2_normalize(f), "labels": np.array([e.label for e, _ in items], np.int32)}
        key = {"checkpoint": bb.fingerprint, "dataset": dc.name, "root": dc.root, "preprocess": bb.pp,
               "kind": "views", "shots": shots, "seed": seed, "views": n, "augment": "rrc0.5-flip"}
        return feats.cached(cache_dir, key, compute)
    return views


def context(config, faces, protocol, bb, ds, few, text, tests, cache, *, shots, seed, workdir, writer, rng,
            **protocol_data) -> registry.Context:
    """The `Context` of one (shots, seed) under `protocol`; services only for what `faces` need."""
    needs = set().union(*(f.needs for f in faces))
    service = functools.partial(finetune, bb, seed=seed, workdir=workdir, writer=writer, rng=rng,
                                evals=config.get("evals"), tests=tests)
    return registry.Context(
        config=config, protocol=protocol, shots=shots, seed=seed, num_classes=len(ds.classnames),
        text=text_weights(config, text), few=few, cache=cache, tests=tests,
        caches=(dualadapter.build_caches(cache["keys"], cache["labels"], len(ds.classnames))
                if "cache" in needs else None),
        finetune=service if "training" in needs else None,
        views=(augmented_views(config, bb, few, shots=shots, seed=seed, workdir=workdir)
               if "views" in needs else None),
        **protocol_data)


def run_faces(faces, ctx: registry.Context, writer, defaults=None) -> dict[str, dict[str, Any]]:
    """Runs each face under ctx.protocol; {name: result dict} with 'seconds' added, logged and written."""
    out = {}
    realistic = ctx.protocol == "realistic"
    for face in faces:
        t0 = time.time()
        res = dict(defaults or {})
        res.update(face.run_realistic(ctx) if realistic else face.run_paper(ctx))
        res["seconds"] = round(time.time() - t0, 2)
        logging.info("%s %s %s: val %s, test %.2f%% (%.1f s) %s", face.name, ctx.tag, ctx.protocol,
                     "-" if res.get("val_accuracy") is None else f"{res['val_accuracy']:.2f}%",
                     res["test_accuracy"], res["seconds"], res.get("hparams", ""))
        writer.write(ctx.shots, {k: v for k, v in res.items() if k.endswith("_accuracy") and v is not None},
                     prefix=f"{face.name}/seed{ctx.seed}/" + ("realistic/" if realistic else ""))
        out[face.name] = res
    return out


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
    faces = registry.check(config, methods)
    ctx = context(config, faces, "paper", bb, ds, few, text, tests, cache, shots=shots, seed=seed, workdir=workdir,
                  writer=writer, rng=rng, train_few=train_few, val=val)
    return run_faces(faces, ctx, writer)
