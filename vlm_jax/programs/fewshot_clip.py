"""Few-shot CLIP adaptation: zero-shot CLIP, Tip-Adapter(-F) and DualAdapter(-F) on one dataset.

Data flow: config -> dataset + few-shot sample -> CLIP (converted HF weights) -> cached features -> method
(pure functions of features, `fewshot_methods`) -> generic trainer for the fine-tuned variants ->
hyperparameter search on val -> test accuracy -> workdir (config.json, metrics.jsonl, TensorBoard events,
results.json, results.md, plot).

Everything a user can get wrong (checkpoint, data root, split files, shots) is checked before the workdir gets
any result file, and reported as one `UserError` line.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vlm_jax import config_utils, errors
from vlm_jax.convert import dual_encoder, stream
from vlm_jax.data import datasets_meta as meta
from vlm_jax.data import features as feats
from vlm_jax.data import fewshot, preprocess
from vlm_jax.eval import report
from vlm_jax.methods import fewshot_registry
from vlm_jax.programs import fewshot_methods, fewshot_realistic, runner
from vlm_jax.runtime import workdir as workdir_lib
from vlm_jax.runtime.metrics import MetricWriter
from vlm_jax.train import evaluators

# config.protocol -> the protocols it runs (see configs/dualadapter.py and `fewshot_realistic`).
PROTOCOLS = {"paper": ("paper",), "realistic": ("realistic",), "both": ("paper", "realistic")}


# ----------------------------------------------------------------------------------------------------------
# Inputs.

def load_data(dc: ml_collections.ConfigDict) -> fewshot.FewShotDataset:
    """The dataset of `dc.name`, which must be the dataset whose presets the config chose (`dc.preset`)."""
    name = meta.canonical_name(dc.name)
    if name != dc.preset:
        raise errors.UserError(
            f"config.data.name={dc.name!r} but the config took the presets (search ranges, epochs, learning rates) "
            f"of {dc.preset!r}: name the dataset in the config argument, "
            f"--config=configs/dualadapter.py:dataset={dc.name}, so that its presets apply")
    cupl = dc.cupl_path or None
    if name.startswith("tfds:"):
        from vlm_jax.data import tfds_source
        return tfds_source.tfds_dataset(name[len("tfds:"):], data_dir=dc.tfds_data_dir or None, cupl_path=cupl)
    if name != "skimage_photos" and not dc.root:
        raise errors.UserError(
            f"no data root for dataset {name!r}: pass --config.data.root=/path/to/coop_data or set VLM_JAX_DATA "
            "(layout: CoOp's DATASETS.md), or try the offline default: --config=configs/dualadapter.py:runlocal")
    return fewshot.load_dataset(name, dc.root or None, cupl_path=cupl)


def training_subsets(config, train, shots: int, seed: int) -> tuple[list[fewshot.Example], list[fewshot.Example]]:
    """(cache subset, DualAdapter-F's training subset) for one (shots, seed).

    The cache holds the K shots drawn with `seed` (the official extract_features.py: random.seed(1)). With
    config.dualadapter.train.data = 'second_draw' DualAdapter-F trains on a second K-shot draw with seed
    draw_seed + seed - sampling_seed (the official main.py: random.seed(3407) for sampling seed 1); with 'cache'
    on the cache subset itself.
    """
    tc = config.dualadapter.train
    few = fewshot.sample_few_shot(train, shots, seed)
    if tc.data == "cache":
        return few, few
    if tc.data != "second_draw":
        raise errors.UserError(f"dualadapter.train.data must be 'second_draw' or 'cache', got {tc.data!r}")
    return few, fewshot.sample_few_shot(train, shots, tc.draw_seed + seed - tc.sampling_seed)


# ----------------------------------------------------------------------------------------------------------
# Features.

class Backbone:
    """The frozen dual encoder (HF CLIP, HF SigLIP or open_clip: `dual_encoder.load_dual_encoder`) with jitted,
    sharded encoders and the host-side image transforms.

    Weights and tokenizer load on first use: a rerun whose features are all cached never reads them.
    """

    def __init__(self, checkpoint_dir: str, dtype: str, mesh: jax.sharding.Mesh, rules=None):
        self.dir, self.dtype, self.mesh, self.rules = checkpoint_dir, jnp.dtype(dtype), mesh, rules
        self.enc = dual_encoder.load_dual_encoder(checkpoint_dir, self.dtype)
        self.pp = self.enc.image_settings
        self.fingerprint = feats.checkpoint_fingerprint(checkpoint_dir)

    @functools.cached_property
    def _loaded(self):
        model, params = self.enc.model, self.enc.params
        logging.info("loaded %s", dual_encoder.describe(self.enc))
        # Placed by the logical axis names and config.mesh_rules: replicated on the default data-parallel mesh.
        return model, jax.device_put(params, stream.shardings_for(model, self.mesh, self.rules))

    @property
    def model(self):
        return self._loaded[0]

    @property
    def params(self):
        return self._loaded[1]

    @functools.cached_property
    def encode_image(self):
        model = self.model
        return jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))

    @functools.cached_property
    def encode_text(self):
        model = self.model
        return jax.jit(lambda p, t: model.apply({"params": p}, t[:, 0], t[:, 1], method=model.encode_text))

    def eval_transform(self, ex: fewshot.Example) -> np.ndarray:
        return preprocess.preprocess_image(ex.array if ex.array is not None else ex.path, self.pp)

    def augment_transform(self, item: tuple[fewshot.Example, tuple[int, ...]]) -> np.ndarray:
        # One generator per (seed, pass, image): deterministic whatever the thread-pool order.
        ex, seed = item
        img = preprocess.load_image(ex.array if ex.array is not None else ex.path)
        return preprocess.augment(img, np.random.default_rng(list(seed)), size=self.enc.image_size,
                                  mean=self.pp["mean"], std=self.pp["std"])

    def text_classifier(self, prompts_per_class: list[list[str]], batch_size: int) -> np.ndarray:
        """f32[C, D]: per class, the normalised mean of the normalised prompt embeddings."""
        flat = [p for ps in prompts_per_class for p in ps]
        ids, mask = self.enc.tokenize(flat)
        rows = np.stack([ids, mask], axis=1)  # i32[N, 2, L]: one item per prompt for map_batches
        emb = feats.l2_normalize(feats.map_batches(self.encode_text, self.params, rows, lambda r: r,
                                                   batch_size=batch_size, mesh=self.mesh, desc="text"))
        splits = np.cumsum([len(ps) for ps in prompts_per_class])[:-1]
        return feats.l2_normalize(np.stack([e.mean(0) for e in np.split(emb, splits)]))


def _key(bb: Backbone, dc, **extra) -> dict[str, Any]:
    return {"checkpoint": bb.fingerprint, "dataset": dc.name, "root": dc.root, "preprocess": bb.pp, **extra}


def text_features(bb: Backbone, ds: fewshot.FewShotDataset, dc, template_sets, cache_dir) -> dict[str, np.ndarray]:
    """Classifiers f32[C, D]: 'template/<set>' for each set in `template_sets`, 'negative', and 'cupl' if any."""
    prompts = {f"template/{t}": ds.templates_of(t) for t in sorted(set(template_sets))}

    def compute():
        out = {k: bb.text_classifier([[t.format(c) for t in ts] for c in ds.classnames], dc.eval_batch_size)
               for k, ts in prompts.items()}
        out["negative"] = bb.text_classifier([[t.format(c) for t in ds.negative_templates] for c in ds.classnames],
                                             dc.eval_batch_size)
        if ds.cupl_prompts is not None:
            out["cupl"] = bb.text_classifier(ds.cupl_prompts, dc.eval_batch_size)
        return out
    key = _key(bb, dc, kind="text", classnames=ds.classnames, templates=prompts,
               negative=ds.negative_templates, cupl=ds.cupl_prompts)
    return feats.cached(cache_dir, key, compute)


def eval_features(bb: Backbone, examples, dc, split: str, cache_dir, cap: bool = True) -> dict[str, np.ndarray]:
    """{'features' f32[N, D] normalised, 'labels' i32[N]} of `examples` through the evaluation transform.

    `cap`: honour data.max_eval_examples (val/test); the support set is never subsampled.
    """
    if cap and dc.max_eval_examples and len(examples) > dc.max_eval_examples:
        # An even stride, not a prefix: splits are often sorted by class.
        examples = examples[::-(-len(examples) // dc.max_eval_examples)]
    def compute():
        f = feats.map_batches(bb.encode_image, bb.params, examples, bb.eval_transform, batch_size=dc.eval_batch_size,
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
                                              batch_size=dc.eval_batch_size, mesh=bb.mesh,
                                              desc=f"cache features {epoch + 1}/{dc.augment_epoch}")
        return {"keys": feats.l2_normalize(total / dc.augment_epoch),
                "labels": np.array([e.label for e in few], np.int32)}
    key = _key(bb, dc, kind="cache", shots=shots, seed=seed, augment_epoch=dc.augment_epoch, augment="rrc0.5-flip")
    return feats.cached(cache_dir, key, compute)


# ----------------------------------------------------------------------------------------------------------
# Entry point.

def _has(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


def predict_features(bb: Backbone, paths, dc) -> dict[str, np.ndarray]:
    """{'features' f32[N, D]} of image files through the evaluation transform (as `eval_features`; not cached).

    `vlm-jax predict` runs the program with them as one more, unlabeled, test set 'predict': every method scores
    it with its evaluated classifier (`fewshot_registry.evaluate`), `run` writes nothing and returns
    {'classnames', 'runs'}, each method's result with 'predict_logits' f32[N, C].
    """
    f = feats.map_batches(bb.encode_image, bb.params, list(paths), lambda p: preprocess.preprocess_image(p, bb.pp),
                          batch_size=dc.eval_batch_size, mesh=bb.mesh, desc="predict features")
    return {"features": feats.l2_normalize(f)}


def check_values(config: ml_collections.ConfigDict) -> tuple[list[str], list[tuple[int, int]]]:
    """(methods, [(shots, seed)] runs) of the config, its names and ranges checked: one line, before any work."""
    dc = config.data
    methods = [m.strip() for m in config.methods.split(",") if m.strip()]
    unknown = set(methods) - set(fewshot_registry.names())
    if unknown:
        raise errors.UserError(f"unknown methods {sorted(unknown)} in config.methods; known: "
                               f"{', '.join(fewshot_registry.names())}")
    runs = ([(s, r) for s in config.sweep.shots for r in config.sweep.seeds] if config.sweep.enabled
            else [(dc.shots, dc.seed)])
    if len(runs) > 1:
        report.require_plotting()  # the sweep ends with a plot: a missing extra is said now, not after the runs
    for s, _ in runs:  # shots <= 0 (or 1.5): one line, before anything is written
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise errors.UserError(f"shots must be a whole number >= 1, got {s!r} (config argument shots=, "
                                   f"--config.data.shots or --config.sweep.shots)")
    minimums = {"data.eval_batch_size": 1, "data.augment_epoch": 1, "realistic.folds": 2, "realistic.min_shots": 1}
    for m in ("dualadapter", "tip_adapter"):
        if m in config:
            minimums.update({f"{m}.train.epochs": 1, f"{m}.train.batch_size": 1})
    config_utils.check_ranges(config, {k: v for k, v in minimums.items() if _has(config, k)})
    return methods, runs


def run(config: ml_collections.ConfigDict, workdir: str, predict: tuple[str, ...] = ()) -> dict[str, Any]:
    """Runs the config (one (shots, seed), or the sweep) and writes the results into `workdir`; with `predict`
    (image paths) returns their logits instead (`predict_features`)."""
    dc = config.data
    methods, runs = check_values(config)
    cache_dir = config.feature_cache_dir or os.path.join(workdir, "features")

    # Everything a user can get wrong is checked before the workdir gets a result.
    ckpt = runner.resolve_checkpoint(config.model.checkpoint, "configs/dualadapter.py")
    ds = load_data(dc)
    samples = {(s, r): training_subsets(config, ds.train, s, r) for s, r in runs}
    check_choices(config)
    paper, realistic = (p in PROTOCOLS[config.protocol] for p in ("paper", "realistic"))
    # The realistic protocol never touches the val split (not even its length).
    if (paper and not ds.val) or not ds.test:
        raise errors.UserError(f"dataset {ds.name!r} needs {'val and ' if paper else ''}test splits for the "
                               "search and the evaluation")
    extra_tests = {}
    for name in filter(None, (n.strip() for n in dc.extra_test.split(","))):
        extra = fewshot.load_dataset(name, dc.root)
        if list(extra.classnames) != list(ds.classnames):
            raise errors.UserError(f"test set {name!r} does not share the class names of {ds.name!r}; "
                                   "domain-generalisation sets go with imagenet (imagenetv2, imagenet_sketch, ...)")
        extra_tests[extra.name] = extra
    template_sets = [config.templates[m] for m in ("zeroshot", "tip_adapter", "dualadapter")]
    for t in template_sets:
        ds.templates_of(t)  # an unknown set name fails here, before any work

    workdir_lib.prepare(workdir, config)   # config.json; refuses a changed config on a resumed workdir
    mesh, rules = runner.make_mesh(config)
    logging.info("mesh %s on %d devices; checkpoint %s; dataset %s (%d classes)", dict(mesh.shape),
                 len(jax.devices()), ckpt, ds.name, len(ds.classnames))
    bb = Backbone(ckpt, config.model.dtype, mesh, rules)
    writer = MetricWriter.for_run(workdir, config)
    rng = jax.random.key(config.rng_seed)

    text = text_features(bb, ds, dc, template_sets, cache_dir)
    val = eval_features(bb, ds.val, dc, "val", cache_dir) if paper else None
    # ImageNet has no val split in CoOp's protocol: val *is* test there, so encode it once.
    test = val if paper and ds.test is ds.val else eval_features(bb, ds.test, dc, "test", cache_dir)
    tests = {"test": (test, ds.class_subset)}
    for name, extra in extra_tests.items():
        tests[name] = (eval_features(bb, extra.test, dc, f"{name}-test", cache_dir), extra.class_subset)
    if predict:
        tests["predict"] = (predict_features(bb, predict, dc), None)
    results = []
    for shots, seed in runs:
        few, train_few = samples[(shots, seed)]
        cache = cache_features(bb, few, dc, shots, seed, cache_dir)
        kw = dict(shots=shots, seed=seed, workdir=workdir, writer=writer, rng=jax.random.fold_in(rng, seed))
        run_res: dict[str, Any] = {"shots": shots, "seed": seed}
        if paper:
            run_res["methods"] = fewshot_methods.run_paper(config, methods, bb, ds, few, train_few, text, val, tests,
                                                           cache, **kw)
        if realistic:
            support = eval_features(bb, few, dc, f"support-{shots}shot-seed{seed}", cache_dir, cap=False)
            run_res["realistic"] = fewshot_realistic.run_realistic(config, methods, bb, ds, few, text, support,
                                                                   tests, cache, **kw)
        results.append(run_res)
    writer.close()
    if predict:
        return {"classnames": list(ds.classnames), "runs": results}
    return write_results(config, methods, ds, ckpt, results, tests, val, workdir)


def check_choices(config) -> None:
    """The protocol choices a run reads late, checked before any work: one UserError line each."""
    choices = {"protocol": (config.protocol, tuple(PROTOCOLS)),
               "tip_adapter.train.selection": (config.tip_adapter.train.selection, ("val", "test"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise errors.UserError(f"config.{key} must be one of {', '.join(allowed)}, got {value!r}")
    # The evaluators are built in each fit; their types and keys are checked here, before any work.
    evaluators.check(config.get("evals"), dict.fromkeys(fewshot_methods.EVALUATORS, lambda: None))


def write_results(config, methods, ds, ckpt, results, tests, val, workdir) -> dict[str, Any]:
    """results.md (a table per test set, the protocols side by side, with notes), results.json and the plot."""
    paper, realistic = (any(k in r for r in results) for k in ("methods", "realistic"))
    protocols = {k: v for k, v in report.PROTOCOL_NAMES.items() if any(k in r for r in results)}
    labels = protocols if len(protocols) > 1 else {k: "" for k in protocols}
    backbone = os.path.basename(os.path.normpath(ckpt))
    title = f"{ds.name}: test accuracy (%), {backbone}"
    marks, notes = result_notes(config, methods, ds, realistic)

    def md_table(metric, title, notes=()):
        return report.protocols_table({label: report.summarize(results, metric, k) for k, label in labels.items()},
                                      title, marks=marks, notes=notes, display=fewshot_registry.display_names())

    md = md_table("test_accuracy", title, notes)
    for name in tests:
        if name != "test":
            md += "\n" + md_table(f"{name}_accuracy", f"{name}: test accuracy (%), {backbone}")
    summary = report.summarize(results) if paper else {}
    summary_realistic = report.summarize(results, protocol="realistic") if realistic else {}
    out = {"dataset": ds.name, "checkpoint": ckpt, "num_classes": len(ds.classnames), "protocol": config.protocol,
           "val_size": len(val["labels"]) if paper else None,
           "test_sizes": {k: len(v[0]["labels"]) for k, v in tests.items()}, "cupl": ds.cupl_prompts is not None,
           "templates": config.templates.to_dict(), "notes": notes, "runs": results, "summary": summary,
           "summary_realistic": summary_realistic}
    if len(results) > 1:
        report.plot(summary, os.path.join(workdir, "accuracy_vs_shots.png"), title, realistic=summary_realistic,
                    display=fewshot_registry.display_names())
    return runner.write_results(workdir, md, out)


def result_notes(config, methods, ds, realistic: bool) -> tuple[dict[str, str], list[str]]:
    """(row marks, one-line notes) that say how the table's rows were obtained where it departs from a default."""
    marks, notes = {}, []
    if realistic:
        rc = config.realistic
        notes.append(f"realistic: every hyperparameter (alpha, beta, lambda, epoch) chosen by {rc.folds}-fold "
                     f"cross-validation over the K shots (min(K, {rc.folds}) folds), never the val split; below "
                     f"{rc.min_shots} shots the presets' initial values and last epoch; DualAdapter-F trains on the "
                     "K cache shots. paper: chosen on the full val split, as the papers do.")
    t = config.templates
    notes.append(f"Templates (config.templates): zero-shot CLIP {t.zeroshot!r}, Tip-Adapter(-F) {t.tip_adapter!r}, "
                 f"DualAdapter(-F) {t.dualadapter!r}.")
    if "tip_adapter_f" in methods and config.tip_adapter.train.selection == "test":
        marks["tip_adapter_f"] = " †"
        notes.append("† (paper) Tip-Adapter-F's epoch was selected on the *test* split and the best of that epoch's "
                     "and the searched accuracy is reported, as the official code does (optimistic; default: val).")
    if "dualadapter_f" in methods:
        tc = config.dualadapter.train
        marks["dualadapter_f"] = " ‡"
        if tc.data == "second_draw":
            notes.append(f"‡ (paper) DualAdapter-F trains on a second K-shot draw (seed {tc.draw_seed} + seed - "
                         f"{tc.sampling_seed}, as the official main.py), the cache holds the first: up to 2K "
                         "distinct images per class (dualadapter.train.data=cache: the cache's K shots only).")
        else:
            notes.append("‡ (paper) DualAdapter-F trains on the cache's own K shots (dualadapter.train.data=cache); "
                         "the official code trains on a second K-shot draw (second_draw).")
    if ds.cupl_prompts is None and {"dualadapter", "dualadapter_f"} & set(methods):
        notes.append("DualAdapter ran without CuPL descriptions (templates only), not the paper's setting: pass "
                     "--config.data.cupl_path=<DualAdapter's gpt3_prompts/ folder or the dataset's CuPL json>.")
    return marks, notes
