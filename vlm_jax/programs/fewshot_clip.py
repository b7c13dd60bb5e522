"""Few-shot CLIP adaptation: zero-shot CLIP, Tip-Adapter(-F) and DualAdapter(-F) on one dataset.

Data flow: config -> dataset + few-shot sample -> CLIP (converted HF weights) -> cached features -> method
(pure functions of features) -> generic trainer for the fine-tuned variants -> hyperparameter search on val ->
test accuracy -> workdir (config.json, metrics.jsonl, TensorBoard events, results.json, results.md, plot).

Everything a user can get wrong (checkpoint, data root, split files, shots) is checked before the workdir gets
any result file, and reported as one `UserError` line.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vlm_jax import errors
from vlm_jax.convert import clip as clip_convert
from vlm_jax.convert import loader
from vlm_jax.data import features as feats
from vlm_jax.data import fewshot, preprocess, tokenize
from vlm_jax.eval import classification, report
from vlm_jax.methods import dualadapter, tip_adapter
from vlm_jax.train import mesh as mesh_lib
from vlm_jax.train import trainer
from vlm_jax.train import workdir as workdir_lib
from vlm_jax.train.metrics import MetricWriter

BUILTIN_CHECKPOINT = "builtin:tiny-clip"


# ----------------------------------------------------------------------------------------------------------
# Inputs.

def resolve_checkpoint(spec: str, cache_root: str, config_file: str = "configs/dualadapter.py") -> str:
    """A checkpoint directory for `spec`: a local dir, a hub id in the HF cache, or the built-in tiny CLIP.

    A missing checkpoint is one UserError line that points at `config_file`'s offline `:runlocal` default.
    """
    if spec == BUILTIN_CHECKPOINT:
        # A random toy CLIP, written as a full HF checkpoint (weights, tokenizer, preprocessor) so the offline
        # run goes through exactly the loading path that real checkpoints take. The words of the built-in
        # dataset's prompts become single tokens, so no prompt is cut at the 77-token context.
        path = os.path.join(cache_root, "tiny-clip-v2")
        if not os.path.exists(os.path.join(path, "config.json")):
            from vlm_jax.data import builtin
            ds = builtin.builtin_dataset()
            words = [*ds.classnames, *ds.templates, *ds.negative_templates,
                     *(p for ps in ds.cupl_prompts or [] for p in ps)]
            clip_convert.write_random_checkpoint(
                path, seed=0, projection_dim=64, words=words,
                vision=dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256),
                text=dict(hidden_size=64, intermediate_size=256, max_position_embeddings=77))
        return path
    try:
        return str(loader.resolve_checkpoint(spec))
    except ValueError as e:
        raise errors.UserError(f"{e} (or try the offline default: --config={config_file}:runlocal)") from None


def load_data(dc: ml_collections.ConfigDict) -> fewshot.FewShotDataset:
    name = dc.name
    if name == "builtin":
        from vlm_jax.data import builtin
        return builtin.builtin_dataset()
    if name.startswith("tfds:"):
        from vlm_jax.data import tfds_source
        return tfds_source.tfds_dataset(name[len("tfds:"):], data_dir=dc.tfds_data_dir or None)
    if not dc.root:
        raise errors.UserError(
            f"no data root for dataset {name!r}: pass --config.data.root=/path/to/coop_data or set VLM_JAX_DATA "
            "(layout: CoOp's DATASETS.md), or try the offline default: --config=configs/dualadapter.py:runlocal")
    return fewshot.load_dataset(name, dc.root, cupl_path=dc.cupl_path or None)


# ----------------------------------------------------------------------------------------------------------
# Features.

class Backbone:
    """The frozen CLIP with jitted, sharded encoders and the host-side image transforms.

    Weights and tokenizer load on first use: a rerun whose features are all cached never reads them.
    """

    def __init__(self, checkpoint_dir: str, dtype: str, mesh: jax.sharding.Mesh):
        self.dir, self.dtype, self.mesh = checkpoint_dir, jnp.dtype(dtype), mesh
        self.pp = preprocess.preprocess_settings(checkpoint_dir)
        self.fingerprint = feats.checkpoint_fingerprint(checkpoint_dir)

    @functools.cached_property
    def _loaded(self):
        model, params = clip_convert.from_pretrained(self.dir, dtype=self.dtype)
        logging.info("loaded CLIP from %s", self.dir)
        return model, jax.device_put(params, mesh_lib.replicated(self.mesh))

    @property
    def model(self):
        return self._loaded[0]

    @property
    def params(self):
        return self._loaded[1]

    @functools.cached_property
    def tokenizer(self):
        return tokenize.load_tokenizer(self.dir)

    @functools.cached_property
    def encode_image(self):
        model = self.model
        return jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))

    @functools.cached_property
    def encode_text(self):
        model = self.model
        return jax.jit(lambda p, t: model.apply({"params": p}, t[:, 0], t[:, 1], method=model.encode_text))

    def eval_transform(self, ex: fewshot.Example) -> np.ndarray:
        return preprocess.clip_preprocess(preprocess.load_image(ex.array if ex.array is not None else ex.path),
                                          **self.pp)

    def augment_transform(self, item: tuple[fewshot.Example, tuple[int, ...]]) -> np.ndarray:
        # One generator per (seed, pass, image): deterministic whatever the thread-pool order.
        ex, seed = item
        img = preprocess.load_image(ex.array if ex.array is not None else ex.path)
        return preprocess.augment(img, np.random.default_rng(list(seed)), size=self.pp["crop_size"],
                                  mean=self.pp["mean"], std=self.pp["std"])

    def text_classifier(self, prompts_per_class: list[list[str]], batch_size: int) -> np.ndarray:
        """f32[C, D]: per class, the normalised mean of the normalised prompt embeddings."""
        flat = [p for ps in prompts_per_class for p in ps]
        ids, mask = tokenize.tokenize(self.tokenizer, flat, self.model.text.max_position_embeddings)
        rows = np.stack([ids, mask], axis=1)  # i32[N, 2, L]: one item per prompt for map_batches
        emb = feats.l2_normalize(feats.map_batches(self.encode_text, self.params, rows, lambda r: r,
                                                   batch_size=batch_size, mesh=self.mesh, desc="text"))
        splits = np.cumsum([len(ps) for ps in prompts_per_class])[:-1]
        return feats.l2_normalize(np.stack([e.mean(0) for e in np.split(emb, splits)]))


def _key(bb: Backbone, dc, **extra) -> dict[str, Any]:
    return {"checkpoint": bb.fingerprint, "dataset": dc.name, "root": dc.root, "preprocess": bb.pp, **extra}


def text_features(bb: Backbone, ds: fewshot.FewShotDataset, dc, cache_dir) -> dict[str, np.ndarray]:
    def compute():
        out = {
            "template": bb.text_classifier([[t.format(c) for t in ds.templates] for c in ds.classnames], dc.batch_size),
            "negative": bb.text_classifier([[t.format(c) for t in ds.negative_templates] for c in ds.classnames],
                                           dc.batch_size),
        }
        if ds.cupl_prompts is not None:
            out["cupl"] = bb.text_classifier(ds.cupl_prompts, dc.batch_size)
        return out
    key = _key(bb, dc, kind="text", classnames=ds.classnames, templates=ds.templates,
               negative=ds.negative_templates, cupl=ds.cupl_prompts)
    return feats.cached(cache_dir, key, compute)


def eval_features(bb: Backbone, examples, dc, split: str, cache_dir) -> dict[str, np.ndarray]:
    if dc.max_eval_examples and len(examples) > dc.max_eval_examples:
        # An even stride, not a prefix: splits are often sorted by class.
        examples = examples[::-(-len(examples) // dc.max_eval_examples)]
    def compute():
        f = feats.map_batches(bb.encode_image, bb.params, examples, bb.eval_transform, batch_size=dc.batch_size,
                              mesh=bb.mesh, desc=f"{split} features")
        return {"features": feats.l2_normalize(f), "labels": np.array([e.label for e in examples], np.int32)}
    return feats.cached(cache_dir, _key(bb, dc, kind=split, n=len(examples)), compute)


def cache_features(bb: Backbone, few: list[fewshot.Example], dc, shots, seed, cache_dir) -> dict[str, np.ndarray]:
    """Cache keys as Tip-Adapter builds them: mean over `augment_epoch` augmented passes, then normalised."""
    def compute():
        total = 0.0
        for epoch in range(dc.augment_epoch):
            items = [(ex, (seed, epoch, i)) for i, ex in enumerate(few)]
            total = total + feats.map_batches(bb.encode_image, bb.params, items, bb.augment_transform,
                                              batch_size=dc.batch_size, mesh=bb.mesh,
                                              desc=f"cache features {epoch + 1}/{dc.augment_epoch}")
        return {"keys": feats.l2_normalize(total / dc.augment_epoch), "labels": np.array([e.label for e in few], np.int32)}
    key = _key(bb, dc, kind="cache", shots=shots, seed=seed, augment_epoch=dc.augment_epoch, augment="rrc0.5-flip")
    return feats.cached(cache_dir, key, compute)


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning through the generic trainer (Tip-Adapter-F, DualAdapter-F).

def finetune(bb: Backbone, few, tc, *, name: str, adapter, consts, method_loss, eval_logits, val, seed: int,
             workdir: str, writer: MetricWriter, rng: jax.Array):
    """Trains `adapter` on freshly augmented few-shot images each epoch; the CLIP forward runs inside the step.

    Args:
      tc: train config (epochs, batch_size, optim, param_groups).
      adapter: trainable pytree; consts: frozen arrays the loss needs (text classifiers, caches).
      method_loss: (adapter, features f32[B, D], labels i32[B], **consts) -> (loss, metrics).
      eval_logits: (adapter, features, **consts) -> logits at the method's initial hyperparameters; its val
        accuracy picks the best epoch, as the references do.
    Returns:
      trainer.FitResult.
    """
    n, div = len(few), mesh_lib.batch_divisor(bb.mesh)
    bs = max(div, min(tc.batch_size, n) // div * div)
    # The reference keeps the last, smaller batch (drop_last=False); we keep it too when the mesh can split it.
    sizes = [bs] * (n // bs) + ([n % bs // div * div] if n % bs >= div else [])
    labels = np.array([e.label for e in few], np.int32)

    def epoch_batches(epoch):
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

    val_logits = jax.jit(lambda a, c: eval_logits(a, val["features"], **c))
    consts_dev = jax.device_put(consts, mesh_lib.replicated(bb.mesh))

    def eval_fn(adapter):
        return {"accuracy": float(classification.accuracy(val_logits(adapter["adapter"], consts_dev), val["labels"]))}

    return trainer.fit(
        loss_fn=loss_fn, params={"clip": bb.params, "adapter": adapter, "consts": consts},
        param_groups=[tuple(g) for g in tc.param_groups], optim=tc.optim.to_dict(), num_epochs=tc.epochs,
        steps_per_epoch=len(sizes), epoch_batches=epoch_batches, mesh=bb.mesh, rng=rng, eval_fn=eval_fn,
        select="accuracy", workdir=workdir, writer=writer, name=name)


# ----------------------------------------------------------------------------------------------------------
# The methods. Module-level logits functions: `classification.search` jits them by identity.

def _tip_logits(f, w, keys, values, *, beta, alpha):
    return tip_adapter.logits(f, w, keys, values, alpha=alpha, beta=beta)


def _dual_logits(f, w_pos, w_neg, caches, *, beta, alpha, lam):
    return dualadapter.logits(f, w_pos, w_neg, caches, alpha=alpha, beta=beta, lam=lam)


def _dual_adapted(residuals, w_template, w_cupl, w_neg, caches):
    w_pos, _, _, w_n, keys, neg_keys = dualadapter.adapt(residuals, w_template, w_cupl, w_neg, caches)
    return w_pos, w_n, caches.replace(keys=keys, neg_keys=neg_keys)


def _grids(search_cfg) -> dict[str, np.ndarray]:
    return {k: classification.grid(g.start, g.stop, g.steps) for k, g in search_cfg.items()}


def _search(logits_fn, args, grids, val) -> tuple[Any, dict[str, Any]]:
    """Searches `grids` on val (the reference's loop order); returns (features -> logits, result dict)."""
    t0 = time.time()
    best, val_acc, table = classification.search(logits_fn, grids, val["features"], val["labels"], args=args)
    logging.info("search over %d settings: %.1f s", table.size, time.time() - t0)
    return functools.partial(logits_fn, **best), {"val_accuracy": val_acc, "hparams": best}, args


def run_methods(config, methods, bb: Backbone, ds, few, text, val, tests, cache, *, shots, seed, workdir, writer,
                rng):
    """Runs `methods` for one (shots, seed).

    Args:
      tests: name -> (features dict, class_subset or None); 'test' is the dataset's own test split, others are
        domain-generalisation sets evaluated with the same adapted classifier (e.g. ImageNet-V2/-Sketch/-A/-R).

    Returns:
      {method: {'val_accuracy', 'test_accuracy', '<name>_accuracy' for the other test sets, 'hparams', ...}}.
    """
    out: dict[str, dict[str, Any]] = {}
    w_t, w_u, w_n = text["template"], text.get("cupl"), text["negative"]
    w_pos = np.asarray(dualadapter.positive_classifier(w_t, w_u))
    caches = dualadapter.build_caches(cache["keys"], cache["labels"], len(ds.classnames))
    tag = f"{shots}shot-seed{seed}"

    for method in methods:
        t0 = time.time()
        if method == "zeroshot":
            # CLIP's prompt ensemble over the hand-written templates, as in the CLIP and Tip-Adapter papers.
            logits_fn, res, args = tip_adapter.zero_shot_logits, {}, (w_t,)
            res["val_accuracy"] = float(classification.accuracy(logits_fn(val["features"], *args), val["labels"]))
        elif method == "tip_adapter":
            logits_fn, res, args = _search(_tip_logits, (w_t, caches.keys, caches.values),
                                           _grids(config.tip_adapter.search), val)
        elif method == "tip_adapter_f":
            tc, init = config.tip_adapter.train, config.tip_adapter.init
            hp = dict(alpha=init.alpha, beta=init.beta)
            consts = {"text_weights": w_t, "cache_values": caches.values}
            fit = finetune(bb, few, tc, name=f"tip_adapter_f-{tag}", adapter=tip_adapter.finetune_init(caches),
                           consts=consts, method_loss=functools.partial(tip_adapter.finetune_loss, **hp),
                           eval_logits=lambda a, f, text_weights, cache_values: tip_adapter.logits(
                               f, text_weights, a["cache_keys"], cache_values, **hp),
                           val=val, seed=seed, workdir=workdir, writer=writer, rng=rng)
            keys = fit.best_params["adapter"]["cache_keys"]
            logits_fn, res, args = _search(_tip_logits, (w_t, keys, caches.values), _grids(config.tip_adapter.search),
                                           val)
            res["best_epoch"] = fit.best_epoch
        elif method == "dualadapter":
            logits_fn, res, args = _search(_dual_logits, (w_pos, w_n, caches), _grids(config.dualadapter.search), val)
        elif method == "dualadapter_f":
            dc = config.dualadapter
            hp = dict(alpha=dc.init.alpha, beta=dc.init.beta, lam=dc.init.lam)
            consts = {"w_template": w_t, "w_cupl": w_u, "w_neg": w_n, "caches": caches}

            def eval_logits(a, f, w_template, w_cupl, w_neg, caches):
                return _dual_logits(f, *_dual_adapted(a, w_template, w_cupl, w_neg, caches), **hp)

            fit = finetune(bb, few, dc.train, name=f"dualadapter_f-{tag}",
                           adapter=dualadapter.init_residuals(len(ds.classnames), w_t.shape[1]), consts=consts,
                           method_loss=functools.partial(dualadapter.finetune_loss, consistency=dc.consistency, **hp),
                           eval_logits=eval_logits, val=val, seed=seed, workdir=workdir, writer=writer, rng=rng)
            adapted = _dual_adapted(fit.best_params["adapter"], w_t, w_u, w_n, caches)
            logits_fn, res, args = _search(_dual_logits, adapted, _grids(dc.search), val)
            res["best_epoch"] = fit.best_epoch
        else:  # run() validated the names
            raise AssertionError(method)
        for name, (split, subset) in tests.items():
            logits = logits_fn(jnp.asarray(split["features"]), *args)
            res[f"{name}_accuracy"] = float(classification.accuracy(logits, split["labels"], class_subset=subset))
        res["seconds"] = round(time.time() - t0, 2)
        logging.info("%s %s: val %.2f%%, test %.2f%% (%.1f s)", method, tag, res["val_accuracy"],
                     res["test_accuracy"], res["seconds"])
        writer.write(shots, {k: v for k, v in res.items() if k.endswith("_accuracy")}, prefix=f"{method}/seed{seed}/")
        out[method] = res
    return out


# ----------------------------------------------------------------------------------------------------------
# Entry point.

def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the config (one (shots, seed), or the sweep) and writes the results into `workdir`."""
    dc = config.data
    methods = [m.strip() for m in config.methods.split(",") if m.strip()]
    unknown = set(methods) - set(report.METHOD_NAMES)
    if unknown:
        raise errors.UserError(f"unknown methods {sorted(unknown)} in config.methods; known: "
                               f"{', '.join(report.METHOD_NAMES)}")
    runs = ([(s, r) for s in config.sweep.shots for r in config.sweep.seeds] if config.sweep.enabled
            else [(dc.shots, dc.seed)])
    cache_dir = config.feature_cache_dir or os.path.join(workdir, "features")

    # Everything a user can get wrong is checked before the workdir gets a result.
    ckpt = resolve_checkpoint(config.model.checkpoint, os.path.join(os.path.dirname(cache_dir), "models"))
    ds = load_data(dc)
    samples = {(s, r): fewshot.sample_few_shot(ds.train, s, r) for s, r in runs}
    if not ds.val or not ds.test:
        raise errors.UserError(f"dataset {ds.name!r} needs val and test splits for the search and the evaluation")
    extra_tests = {}
    for name in filter(None, (n.strip() for n in dc.extra_test.split(","))):
        extra = fewshot.load_dataset(name, dc.root)
        if list(extra.classnames) != list(ds.classnames):
            raise errors.UserError(f"test set {name!r} does not share the class names of {ds.name!r}; "
                                   "domain-generalisation sets go with imagenet (imagenetv2, imagenet_sketch, ...)")
        extra_tests[name] = extra

    workdir_lib.prepare(workdir, config)   # config.json; refuses a changed config on a resumed workdir
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    logging.info("mesh %s on %d devices; checkpoint %s; dataset %s (%d classes)", dict(mesh.shape),
                 len(jax.devices()), ckpt, ds.name, len(ds.classnames))
    bb = Backbone(ckpt, config.model.dtype, mesh)
    writer = MetricWriter(workdir)
    rng = jax.random.key(config.rng_seed)

    text = text_features(bb, ds, dc, cache_dir)
    val = eval_features(bb, ds.val, dc, "val", cache_dir)
    # ImageNet has no val split in CoOp's protocol: val *is* test there, so encode it once.
    test = val if ds.test is ds.val else eval_features(bb, ds.test, dc, "test", cache_dir)
    tests = {"test": (test, ds.class_subset)}
    for name, extra in extra_tests.items():
        tests[name] = (eval_features(bb, extra.test, dc, f"{name}-test", cache_dir), extra.class_subset)
    results = []
    for shots, seed in runs:
        cache = cache_features(bb, samples[(shots, seed)], dc, shots, seed, cache_dir)
        res = run_methods(config, methods, bb, ds, samples[(shots, seed)], text, val, tests, cache, shots=shots,
                              seed=seed, workdir=workdir, writer=writer, rng=jax.random.fold_in(rng, seed))
        results.append({"shots": shots, "seed": seed, "methods": res})
    writer.close()

    summary = report.summarize(results)
    backbone = os.path.basename(os.path.normpath(ckpt))
    title = f"{ds.name}: test accuracy (%), {backbone}"
    md = report.table(summary, title)
    for name in extra_tests:
        md += "\n" + report.table(report.summarize(results, f"{name}_accuracy"), f"{name}: test accuracy (%), {backbone}")
    out = {"dataset": ds.name, "checkpoint": ckpt, "num_classes": len(ds.classnames), "val_size": len(val["labels"]),
           "test_sizes": {k: len(v[0]["labels"]) for k, v in tests.items()}, "runs": results, "summary": summary}
    if len(runs) > 1:
        report.plot(summary, os.path.join(workdir, "accuracy_vs_shots.png"), title)
    report.write_atomic(os.path.join(workdir, "results.md"), lambda f: f.write(md))
    report.write_json(os.path.join(workdir, "results.json"), out)
    if mesh_lib.is_primary():
        print("\n" + md, flush=True)
    return out
