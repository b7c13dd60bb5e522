"""VITask (arXiv 2410.06456): an LVLM fine-tuned for classification tasks with a task-specific model (TSM).

Data flow: config -> task (`data.vitask_tasks`: one dataset or several trained jointly — MedMNIST 2D, image
folders, or on `:runlocal` the built-in photos split into two 5-class "diagnosis" datasets) -> TSM (CLIP vision
tower + one linear head over the union of the datasets' labels, softmax masked to each sample's own dataset,
sigmoid BCE for a multi-label dataset; `methods.tsm`) trained with the generic trainer, its epoch chosen by the
mean (over datasets) val accuracy of every dataset's val split (`tsm.selection='val'`, the paper's rule) -> frozen
TSM exemplar features -> the LVLM (LLaVA, InternVL or Qwen2-VL) + LoRA (+ `ExemplarConnector`) trained with `methods.vitask` on batches that mix the datasets,
each sample with its own dataset's instruction:
  vanilla baseline: L_van only (its own LoRA; by default as many steps as both VITask stages together,
                    `method.vanilla_epochs`);
  VITask stage 1:   L_van + L_ep + alpha RDA, trains {'lora', 'connector'};
  VITask stage 2:   + beta CRT, the connector FROZEN (param group 'lora' only).
-> evaluation of 'TSM', 'vanilla (L_van)', 'VITask w/o EP', 'VITask w/ EP' (`method.eval_mode`):
  generate:   greedy answers, normalised and matched to the sample's own dataset's label set (`medmnist.
              match_answer`; multi-label: `match_label_set`); an unmatched answer counts as wrong;
  likelihood: label-likelihood ranking: every label response '<label>.' + EOS of the sample's dataset is scored
              (sum of log-probs given image + instruction [+ exemplar]) and the argmax is the prediction. The
              prompt (image + instruction [+ exemplar]) runs once per image into a KV cache and the label
              continuations are scored against it (`make_ranker`), so the vision tower and the prompt are never
              recomputed per label. Single-label datasets only: a multi-label answer is a set of labels, and
              ranking all 2^C sets is not done; `eval_mode='likelihood'` with a multi-label dataset is a UserError
              and 'both' leaves its likelihood cells empty ('–', and no mean);
  both:       both, the generated rows suffixed ' [generated]'.
-> accuracy and macro-F1 (%) per dataset and their mean over datasets (`vitask_tasks.split_metrics`) -> workdir
(results.json: results[row]['datasets'][name] / results[row]['mean']; results.md: one table, rows = methods,
two columns per dataset, plus a table of unmatched answers; metrics.jsonl; checkpoints).

Sequences (right-padded to one length): the generation prompt of (image, instruction) rendered with the
checkpoint's chat template and tokenized whole, then the template's answer separator + response + EOS
(`data.chat`: LLaVA-1.5 '... ASSISTANT: <response></s>', ChatML '...assistant\\n<response><|im_end|>'); ids equal
the HF processor's; answer_mask is 1 on the response and EOS tokens. Evaluation prompts are
left-padded to the longest dataset prompt instead, so every dataset shares one compiled shape.

CRT negatives (`vitask_tasks.NegativeSampler`): sample i's negative image is drawn from the whole training split
of i's own dataset (same instruction) among the rows with a different answer — never another dataset, never the
same answer — a pure function of (rng_seed, step); its pixels are loaded with the batch. A dataset whose training
split holds one answer only is a UserError before any training (when stage 2 runs). The negative pass shares the
positive's ids exactly, only the pixels differ (as `vitask.crt_loss` requires).

results.json also records a sha256 of the connector params after stage 1 and after stage 2 (they must be equal:
the connector is frozen in stage 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vlm_jax import config_utils, errors
from vlm_jax.convert import clip as clip_convert
from vlm_jax.convert import auto
from vlm_jax.convert import loader
from vlm_jax.convert import vit as vit_convert
from vlm_jax.data import features as feats
from vlm_jax.data import chat, lvlm_inputs, medmnist, preprocess, tokenize, vitask_tasks
from vlm_jax.eval import lvlm_classify, retrieval
from vlm_jax.methods import tsm as tsm_lib
from vlm_jax.methods import vitask
from vlm_jax.models import peft
from vlm_jax.programs import runner
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.train import evaluators, trainer
from vlm_jax.runtime import workdir as workdir_lib
from vlm_jax.runtime.metrics import MetricWriter

ROWS = ("TSM", "vanilla (L_van)", "VITask w/o EP", "VITask w/ EP")
# The evaluator types of config.evals (train/evaluators.py): 'ranking', the label-likelihood accuracy and macro-F1
# of the LVLM being trained on its `split` ('val' or 'test'), as the results table ranks (the vanilla fit without
# the exemplar, VITask's stages with it), written as <fit>/<name>/<dataset or mean>/<metric>.
EVALUATORS = ("ranking",)
EVAL_SPLITS = ("val", "test")
METRICS = {"accuracy": "acc", "macro_f1": "F1"}
EVAL_MODES = ("likelihood", "generate", "both")


def _source(example):
    return example.array if getattr(example, "array", None) is not None else example.path


def _pixels(examples, idx, pp) -> np.ndarray:
    """f32[len(idx), H, W, 3]: examples[idx] through the HF image processor settings `pp` (`image_settings`)."""
    return feats.load_all(lambda j: preprocess.preprocess_image(_source(examples[j]), pp), idx)


def _vision(examples, idx, inputs: lvlm_inputs.LVLMInputs) -> dict[str, np.ndarray]:
    """examples[idx]'s vision arrays by HF name through the LVLM family's processor (`data.lvlm_inputs`)."""
    return inputs.load_batch([_source(examples[j]) for j in idx])


def _sha(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda x: jax.tree_util.keystr(x[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()


def make_tsm_eval(tsm_model, params, task: vitask_tasks.JointTask, pixels_of):
    """The trainer's `eval_fn` of the TSM: trainable params -> the val split's mean (over datasets) accuracy and
    macro-F1 (%), as the test table computes them; `trainer.fit` keeps the epoch of the best 'accuracy'.

    Args:
      params: the TSM's full tree (its frozen leaves, if any, complete the trainable ones).
      pixels_of: i32[b] rows of `task.val` -> f32[b, H, W, 3].
    """
    def eval_fn(trainable):
        pred, _ = tsm_lib.tsm_pass(tsm_model, trainer.merge(trainable, params), task, task.val, pixels_of)
        return vitask_tasks.split_metrics(task, task.val, pred)["mean"]
    return eval_fn


def format_results(rows: dict[str, dict[str, Any]], names: Sequence[str], title: str) -> str:
    """Markdown: one table, rows = methods, accuracy / macro-F1 per dataset (+ their mean over several datasets);
    then the % of unmatched generated answers per dataset, if any row has them."""
    flat, cols = {}, {}
    keys = list(names) + (["mean"] if len(names) > 1 else [])
    for n in keys:
        for m, short in METRICS.items():
            cols[f"{n}/{m}"] = f"{n} {short}"
    unmatched = {}
    for row, r in rows.items():
        per = dict(r["datasets"], mean=r["mean"])
        flat[row] = {f"{n}/{m}": (per[n] or {}).get(m) for n in keys for m in METRICS}
        if any(v and "unmatched" in v for v in r["datasets"].values()):
            unmatched[row] = {n: (r["datasets"][n] or {}).get("unmatched") for n in names}
    md = retrieval.format_table(flat, cols, title=title)
    if unmatched:
        md += "\n" + retrieval.format_table(unmatched, {n: n for n in names},
                                            title="unmatched generated answers (%, counted as wrong)")
    return md


def _flat_metrics(r: dict[str, Any]) -> dict[str, float]:
    out = {f"{n}/{k}": v for n, m in r["datasets"].items() if m for k, v in m.items()}
    out.update({f"mean/{k}": v for k, v in (r["mean"] or {}).items()})
    return out


# ----------------------------------------------------------------------------------------------------------
# Entry point.

@dataclasses.dataclass
class Inputs:
    """Everything of a run that is resolved and checked before the workdir gets anything."""
    task: vitask_tasks.JointTask
    instructions: list[str]
    label_responses: list[list[str]]
    negatives: vitask_tasks.NegativeSampler | None
    clip_dir: str
    ckpt: str
    tok: Any
    inputs: lvlm_inputs.LVLMInputs  # the LVLM family's image processor + image token layout
    clip_pp: Any       # the TSM tower's
    seqs: vitask_tasks.Seqs


def check_inputs(config: ml_collections.ConfigDict) -> Inputs:
    """Everything a user can get wrong, checked before the workdir gets anything (or a TSM trains for nothing)."""
    dc, mc, sc = config.data, config.method, config.tsm
    config_utils.check_ranges(config, {
        "tsm.epochs": 1, "tsm.batch_size": 1, "tsm.optim.lr": 0, "train.batch_size": 1, "train.optim.lr": 0,
        "method.stage1_epochs": 1, "method.stage2_epochs": 0, "method.vanilla_epochs": 0, "method.lora_rank": 1,
        "method.alpha": 0, "method.beta": 0, "data.eval_batch_size": 1, "data.test_limit": 0, "data.train_limit": 0,
        "data.val_limit": 0, "method.stage2_lr_scale": 0,
        "method.connector_hidden": 0}, {"method.eval_mode": EVAL_MODES,
                                        "method.rda_direction": vitask.DIRECTIONS,
                                        "tsm.selection": ("val", "last")})
    evals = evaluators.check(config.get("evals"), {"ranking": lambda split="val": None})
    for name, _, _, options in evals:
        if options.get("split", "val") not in EVAL_SPLITS:
            raise errors.UserError(f"evals.{name}.split={options['split']!r}: use one of {', '.join(EVAL_SPLITS)}")
    task = vitask_tasks.load_task(dc, config.rng_seed)
    empty = [f"evals.{name}" for name, _, _, o in evals if not len(getattr(task, o.get("split", "val")) or ())]
    if empty:
        raise errors.UserError(f"{empty[0]} ranks the val split, which is empty here: use split='test' or give the "
                               "datasets a val split")
    # CRT's "different label": a different answer (a multi-label sample's whole set) of the same dataset.
    negatives = vitask_tasks.NegativeSampler(task.train, task.names) if mc.stage2_epochs else None
    no_val = [d.name for k, d in enumerate(task.datasets) if not np.any(task.val.dataset == k)]
    if sc.selection == "val" and no_val:
        raise errors.UserError(f"{', '.join(no_val)} has no val split (a folder dataset needs <path>/val/<class>/): "
                               "the TSM's best epoch is selected on val; add one or set --config.tsm.selection=last")
    multi = [d.name for d in task.datasets if d.multi_label]
    if multi and mc.eval_mode == "likelihood":
        raise errors.UserError(f"{', '.join(multi)} is multi-label: label-likelihood ranking scores one label per "
                               "answer; use --config.method.eval_mode=generate (or both: its likelihood cells stay "
                               "empty)")
    clip_dir = runner.resolve_checkpoint(sc.checkpoint, "configs/vitask.py")
    tsm_tower_type(clip_dir)
    instructions = [d.instruction(dc.full_instruction) for d in task.datasets]
    label_responses = [d.label_responses() for d in task.datasets]
    texts = (instructions + [r for rs in label_responses for r in rs] +
             [c for d in task.datasets for c in d.classnames] +
             ([medmnist.response([], none=task.no_finding)] if multi else []))
    ckpt = runner.resolve_checkpoint(config.model.checkpoint, "configs/vitask.py", texts)
    # The LVLM's prompt format and preprocessing (any family of `convert.auto`), checked against the config now, not
    # after the TSM has trained.
    cfg = auto.lvlm_config(ckpt)
    tok = tokenize.load_tokenizer(ckpt)
    inputs = lvlm_inputs.for_checkpoint(ckpt, cfg, tok, config.model.get("image_size", 0))
    fmt = inputs.chat_format(tok, chat.load_chat_template(ckpt, config.model.chat_template, tok))
    seqs = vitask_tasks.Seqs(fmt, instructions, task.train.responses + [r for rs in label_responses for r in rs])
    return Inputs(task, instructions, label_responses, negatives, clip_dir, ckpt, tok,
                  inputs, preprocess.image_settings(clip_dir), seqs)


TSM_TOWERS = ("vit", "clip")  # model_type of tsm.checkpoint's config.json


def tsm_tower_type(ckpt: str) -> str:
    """The TSM checkpoint's model_type ('vit': HF ViT, the paper's ViT-B/16-IN21k; 'clip': a CLIP's vision tower);
    anything else is one UserError line."""
    kind = loader.read_config(ckpt).get("model_type")
    if kind not in TSM_TOWERS:
        raise errors.UserError(f"tsm.checkpoint {ckpt} holds a {kind!r} model; the TSM takes an HF ViT (e.g. "
                               "google/vit-base-patch16-224-in21k, the paper's) or a CLIP checkpoint")
    return kind


def load_tsm_tower(ckpt: str):
    """(vision config, tower params) of the TSM checkpoint, float32 (the TSM is fully fine-tuned)."""
    if tsm_tower_type(ckpt) == "vit":
        model, params = vit_convert.from_pretrained(ckpt, dtype=jnp.float32)
        return model.cfg, params
    model, params = clip_convert.from_pretrained(ckpt, dtype=jnp.float32)
    return model.vision, params


def train_tsm(config, inp: Inputs, mesh, rng, workdir: str, writer):
    """The TSM: one head over the union of the labels, each sample's softmax (or BCE) on its own dataset's; its
    epoch chosen on val (the paper: "select the best model based on validation set performance").

    Returns:
      (test predictions bool[N, C], split name -> its exemplar features f32[n, D] ('train', 'test', and 'val' when
      the task has one), the fit result).
    """
    sc, task, train = config.tsm, inp.task, inp.task.train
    multi = any(d.multi_label for d in task.datasets)
    vision, tower_params = load_tsm_tower(inp.clip_dir)
    tsm_model = tsm_lib.TSMClassifier(vision, task.num_classes)
    tsm_params = tsm_lib.init_from_tower(tsm_model, tower_params, jax.random.fold_in(rng, 1))
    del tower_params
    n, bs = len(train), runner.batch_size(sc.batch_size, len(train), mesh)

    def tsm_batch(idx, epoch, i):
        ds = train.dataset[idx]
        b = {"pixel_values": _pixels(train.examples, idx, inp.clip_pp),
             "labels": (task.offsets[ds] + np.maximum(train.label[idx], 0)).astype(np.int32),
             "class_mask": task.class_mask(ds)}
        if multi:
            b["targets"] = train.targets[idx].astype(np.float32)
            b["multi_label"] = task.multi_label[ds]
        return b

    batches = runner.epoch_batches(n, bs, [config.rng_seed, 1], tsm_batch, mesh=mesh)
    tsm_eval = (make_tsm_eval(tsm_model, tsm_params, task, lambda idx: _pixels(task.val.examples, idx, inp.clip_pp))
                if sc.selection == "val" else None)
    fit = trainer.fit(loss_fn=tsm_lib.make_loss_fn(tsm_model), params=tsm_params,
                      param_groups=list(tsm_lib.PARAM_GROUPS), optim=sc.optim.to_dict(), num_epochs=sc.epochs,
                      steps_per_epoch=n // bs, epoch_batches=batches,
                      mesh=mesh, rng=jax.random.fold_in(rng, 2), workdir=workdir, writer=writer, name="tsm",
                      log_every_s=10.0, checkpoint_every_steps=sc.get("checkpoint_every_steps", 0),
                      accum_steps=runner.accum_steps(sc, bs, mesh, "tsm"), eval_fn=tsm_eval, select="accuracy")
    tsm_params = trainer.merge(jax.device_put(fit.best_params, mesh_lib.replicated(mesh)), tsm_params)
    logging.info("TSM: epoch %d of %d kept (%s)", fit.best_epoch + 1, sc.epochs,
                 "best val mean accuracy" if tsm_eval else "the last")

    def pass_of(split):
        return tsm_lib.tsm_pass(tsm_model, tsm_params, task, split,
                                lambda idx: _pixels(split.examples, idx, inp.clip_pp))

    features = {"train": pass_of(train)[1]}
    tsm_pred, features["test"] = pass_of(task.test)
    if task.val is not None and len(task.val):   # the exemplars of config.evals on 'val'
        features["val"] = pass_of(task.val)[1]
    return tsm_pred, features, fit


def evaluator_factories(config, inp: Inputs, model, connector, params, features, use_ep: bool):
    """type -> (**options) -> (trainable params -> flat metrics) of one LVLM fit, for `evaluators.from_config`.

    Args:
      params: the fit's whole tree ({'base', 'lora'[, 'connector']}); the trainable part comes with each call.
      features: split name -> TSM exemplar features (`train_tsm`).
      use_ep: rank with the exemplar (VITask's stages) or without (vanilla).
    """
    def ranking(split="val"):
        task, seqs, eb = inp.task, inp.seqs, max(1, int(config.data.eval_batch_size))
        part = getattr(task, split)
        lm = peft.LoraModel(model, alpha=config.method.lora_alpha, rank=config.method.lora_rank)
        rank = vitask.make_ranker(lm, connector, model.cfg.image_token_id)
        table = seqs.answer_table(inp.label_responses)
        rows = [i for i in range(len(part)) if not task.multi_label[part.dataset[i]]]
        skip = [k for k in range(len(task.datasets)) if task.multi_label[k]]
        conn0 = params.get("connector")

        def fn(trainable):
            p = trainer.merge(trainable, params)
            pred, valid = lvlm_classify.rank_labels(
                rank, {"base": p["base"], "lora": p["lora"]}, p.get("connector", conn0), seqs, table, task, part,
                rows, features[split], lambda idx: _vision(part.examples, idx, inp.inputs), eb, use_ep)
            return _flat_metrics(vitask_tasks.split_metrics(task, part, pred, valid, skip=skip))
        return fn
    return {"ranking": ranking}


def train_lvlm(config, inp: Inputs, model, base, connector, features, mesh, rng, workdir: str, writer):
    """The vanilla baseline (L_van only, its own LoRA) and VITask's two stages (stage 1: {'lora', 'connector'};
    stage 2: + CRT, the connector frozen), on batches that mix the datasets, each sample with its own dataset's
    instruction; `features`: the TSM's exemplars per split (`train_tsm`). Returns ({'vanilla', 'stage1',
    'stage2'} -> trained params, the same -> history, steps)."""
    mc, tc, train, seqs = config.method, config.train, inp.task.train, inp.seqs
    train_feats = features["train"]
    n, bs = len(train), runner.batch_size(tc.batch_size, len(train), mesh)
    steps = n // bs
    forward = vitask.make_forward(model, connector, model.cfg.image_token_id)

    def lvlm_batches(seed, with_neg):
        def make(idx, epoch, i):
            b = {**seqs.rows(train.dataset[idx], [train.responses[j] for j in idx]),
                 **_vision(train.examples, idx, inp.inputs), "feature": train_feats[idx]}
            if with_neg:
                neg = inp.negatives.sample(idx, [config.rng_seed, seed], epoch * steps + i)
                b.update({"neg_" + k: v for k, v in _vision(train.examples, neg, inp.inputs).items()})
            return b
        # The negatives of a batch are drawn together (`Negatives.sample`): every host builds the whole batch.
        return runner.epoch_batches(n, bs, [config.rng_seed, seed], make, mesh=mesh, rowwise=not with_neg)

    def fit_lvlm(name, params, groups, stage, epochs, seed, lr_scale=1.0):
        loss_fn = vitask.make_loss_fn(forward, stage=stage, pad_id=seqs.pad, alpha=mc.alpha, beta=mc.beta,
                                      rda_direction=mc.rda_direction, lora_alpha=mc.lora_alpha,
                                      lora_rank=mc.lora_rank)
        optim = dict(tc.optim.to_dict(), lr=tc.optim.lr * lr_scale)
        evals = evaluators.from_config(config.get("evals"), evaluator_factories(
            config, inp, model, connector, params, features, use_ep=stage is not None))
        f = trainer.fit(loss_fn=loss_fn, params=params, param_groups=groups, optim=optim,
                        num_epochs=epochs, steps_per_epoch=steps, epoch_batches=lvlm_batches(seed, stage == 2),
                        mesh=mesh, rng=jax.random.fold_in(rng, seed), workdir=workdir, writer=writer, name=name,
                        log_every_s=10.0, checkpoint_every_steps=tc.get("checkpoint_every_steps", 0),
                        accum_steps=runner.accum_steps(tc, bs, mesh, "train"), evals=evals)
        return trainer.merge(jax.device_put(f.best_params, mesh_lib.replicated(mesh)), params), f.history

    # Vanilla gets as many steps as VITask's two stages together unless told otherwise (same batches per epoch).
    van_epochs = mc.vanilla_epochs or mc.stage1_epochs + mc.stage2_epochs
    steps_of = {"vanilla": van_epochs * steps, "stage1": mc.stage1_epochs * steps, "stage2": mc.stage2_epochs * steps}
    logging.info("steps: vanilla %d, VITask stage 1 %d + stage 2 %d", *steps_of.values())
    targets = [tuple(t) if isinstance(t, (list, tuple)) else t for t in mc.lora_targets]
    lora0 = peft.lora_init(base, jax.random.fold_in(rng, 3), targets=targets, rank=mc.lora_rank)
    conn0 = nn.meta.unbox(connector.init(jax.random.fold_in(rng, 4),
                                         jnp.zeros((1, train_feats.shape[1]), jnp.float32))["params"])
    params, hist = {}, {}
    params["vanilla"], hist["vanilla"] = fit_lvlm("vanilla", {"base": base, "lora": lora0}, [("lora/.*", 1.0)],
                                                  None, van_epochs, 10)
    params["stage1"], hist["stage1"] = fit_lvlm("vitask_stage1", {"base": base, "lora": lora0, "connector": conn0},
                                                [("lora/.*", 1.0), ("connector/.*", 1.0)], 1, mc.stage1_epochs, 11)
    params["stage2"], hist["stage2"] = params["stage1"], []
    if mc.stage2_epochs:
        params["stage2"], hist["stage2"] = fit_lvlm("vitask_stage2", params["stage1"], [("lora/.*", 1.0)], 2,
                                                    mc.stage2_epochs, 12, mc.stage2_lr_scale)
    return params, hist, steps_of


def evaluate(config, inp: Inputs, model, base, connector, trained, test_feats) -> dict[str, dict[str, Any]]:
    """The rows 'vanilla (L_van)', 'VITask w/o EP', 'VITask w/ EP' on the test split, each sample against its own
    dataset's label set, by likelihood and/or generation (`method.eval_mode`)."""
    mc, task, test, seqs = config.method, inp.task, inp.task.test, inp.seqs
    eb = max(1, int(config.data.eval_batch_size))
    # LoRA applied unmerged, as in training: the evaluated model is the trained one (also with a bf16 base).
    lm = peft.LoraModel(model, alpha=mc.lora_alpha, rank=mc.lora_rank)
    van, p2 = trained["vanilla"], trained["stage2"]
    variants = [("vanilla (L_van)", van, p2["connector"], False), ("VITask w/o EP", p2, p2["connector"], False),
                ("VITask w/ EP", p2, p2["connector"], True)]
    is_ml = task.multi_label
    skip = [k for k in range(len(task.datasets)) if is_ml[k]]
    lik, gen = {}, {}
    rank = vitask.make_ranker(lm, connector, model.cfg.image_token_id)
    embed = vitask.make_embedder(lm, connector, model.cfg.image_token_id)
    table = seqs.answer_table(inp.label_responses)
    pixels_of_test = lambda idx: _vision(test.examples, idx, inp.inputs)  # noqa: E731
    single_rows = [i for i in range(len(test)) if not is_ml[test.dataset[i]]]
    for name, p, conn, ep in variants:
        weights = {"base": base, "lora": p["lora"]}
        if mc.eval_mode in ("likelihood", "both"):
            pred, valid = lvlm_classify.rank_labels(rank, weights, conn, seqs, table, task, test, single_rows,
                                                    test_feats, pixels_of_test, eb, ep)
            lik[name] = vitask_tasks.split_metrics(task, test, pred, valid, skip=skip)
        if mc.eval_mode in ("generate", "both"):
            # Greedy answers matched to the label set; an unmatched answer counts as wrong.
            pred, valid = lvlm_classify.generate_labels(lm, embed, seqs, inp.tok, task, test, weights, conn,
                                                        test_feats, pixels_of_test, eb, ep)
            gen[name + (" [generated]" if mc.eval_mode == "both" else "")] = vitask_tasks.split_metrics(
                task, test, pred, valid, unmatched=True)
    return {**lik, **gen}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """TSM -> vanilla + VITask stages -> evaluation -> results.md / results.json in `workdir`."""
    mc, inp = config.method, check_inputs(config)
    task, train, test = inp.task, inp.task.train, inp.task.test
    workdir_lib.prepare(workdir, config)   # config.json; refuses a changed config on a resumed workdir
    mesh, rules = runner.make_mesh(config)   # config.mesh, config.mesh_rules
    writer = MetricWriter.for_run(workdir, config)
    rng = jax.random.key(config.rng_seed)
    for key, c in (("tsm", config.tsm), ("train", config.train)):   # fail before any training, not between stages
        runner.accum_steps(c, runner.batch_size(c.batch_size, len(train), mesh), mesh, key)

    tsm_pred, features, tsm_fit = train_tsm(config, inp, mesh, rng, workdir, writer)
    rows = {"TSM": vitask_tasks.split_metrics(task, test, tsm_pred)}
    logging.info("TSM: %s", rows["TSM"])
    model, base = runner.load_lvlm(inp.ckpt, config.model, mesh, rules)
    width = base["language_model"]["model"]["embed_tokens"]["embedding"].shape[-1]
    connector = vitask.ExemplarConnector(out_dim=width, hidden_dim=mc.connector_hidden or None)
    logging.info("%s %s: %s; %d train / %d test, sequence length %d", inp.inputs.family, inp.ckpt, ", ".join(task.names),
                 len(train), len(test), inp.seqs.length)
    trained, hist, steps = train_lvlm(config, inp, model, base, connector, features, mesh, rng, workdir, writer)
    rows.update(evaluate(config, inp, model, base, connector, trained, features["test"]))
    for i, (name, r) in enumerate(rows.items()):
        writer.write(i, _flat_metrics(r), prefix=f"test/{name}/")
    writer.close()

    title = (f"VITask on {', '.join(task.names)}: test (%), {len(test)} images, {mc.eval_mode} evaluation, "
             f"{os.path.basename(inp.ckpt)}")
    datasets = [{"name": d.name, "modality": d.modality, "num_classes": len(d.classnames),
                 "multi_label": d.multi_label, "instruction": ins, "train_examples": int(np.sum(train.dataset == k)),
                 "test_examples": int(np.sum(test.dataset == k))}
                for k, (d, ins) in enumerate(zip(task.datasets, inp.instructions))]
    out = {"checkpoint": inp.ckpt, "tsm_checkpoint": inp.clip_dir, "datasets": datasets,
           "num_classes": task.num_classes, "train_examples": len(train), "test_examples": len(test),
           "eval_mode": mc.eval_mode,
           "connector_sha256": {k: _sha(trained[k]["connector"]) for k in ("stage1", "stage2")}, "steps": steps,
           "tsm_selection": {"mode": config.tsm.selection, "best_epoch": tsm_fit.best_epoch,
                             "val_examples": len(task.val)},
           "history": {"tsm": tsm_fit.history, **hist}, "results": rows}
    return runner.write_results(workdir, format_results(rows, task.names, title), out)
