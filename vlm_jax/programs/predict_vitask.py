"""`vlm-jax predict` for a VITask workdir: the answer and the label ranking of the fine-tuned LVLM.

The model is the evaluation's 'VITask w/ EP' row rebuilt from the workdir: the TSM (its tower from tsm.checkpoint,
initialised as `vitask.train_tsm` does, then the kept params of fit 'tsm'), the LVLM with the LoRA of
'vitask_stage2' (of 'vitask_stage1' when stage 2 did not run) applied unmerged and the exemplar connector of
'vitask_stage1' (frozen in stage 2). The images form an unlabeled split of the chosen dataset and go through the
evaluation's own functions: the TSM pass for the exemplar features (`tsm.tsm_pass`), greedy generation
(`lvlm_classify.generate_answers`) matched to the label set as the evaluation matches it, and the label
likelihoods (`lvlm_classify.label_scores`; single-label datasets only, as in the evaluation).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vlm_jax import errors


def _split(paths: Sequence[str], dataset: int, num_classes: int):
    """An unlabeled `vitask_tasks.Split` of image files, all of dataset index `dataset`."""
    from vlm_jax.data import vitask_tasks

    n = len(paths)
    return vitask_tasks.Split(examples=[types.SimpleNamespace(path=p, array=None) for p in paths],
                              dataset=np.full(n, dataset, np.int32), label=np.full(n, -1, np.int32),
                              targets=np.zeros((n, num_classes), bool), responses=[""] * n)


def _dataset_index(task, name: str | None) -> int:
    if name is None:
        if len(task.names) > 1:
            raise errors.UserError(f"the run trained on several datasets ({', '.join(task.names)}): choose one "
                                   "with --dataset")
        return 0
    if name not in task.names:
        raise errors.UserError(f"--dataset={name!r} is not one of the run's datasets: {', '.join(task.names)}")
    return task.names.index(name)


def _tsm(config, inp, kept):
    """(TSM module, params) as `vitask.train_tsm` leaves them: the tower initialised the same way, the kept
    params of fit 'tsm' over it."""
    from vlm_jax.methods import tsm as tsm_lib
    from vlm_jax.programs import vitask
    from vlm_jax.train import trainer

    vision, tower = vitask.load_tsm_tower(inp.clip_dir)
    tsm_model = tsm_lib.TSMClassifier(vision, inp.task.num_classes)
    init = tsm_lib.init_from_tower(tsm_model, tower, jax.random.fold_in(jax.random.key(config.rng_seed), 1))
    return tsm_model, trainer.merge(kept, init)


def _lvlm(t, mc):
    """(LoRA model, connector module, {'base', 'lora'}, connector params, the LoRA's fit name): the evaluation's
    'VITask w/ EP' (stage 2's LoRA, stage 1's connector: frozen in stage 2)."""
    from vlm_jax.methods import vitask as vitask_method
    from vlm_jax.models import peft

    width = t.base["language_model"]["model"]["embed_tokens"]["embedding"].shape[-1]
    connector = vitask_method.ExemplarConnector(out_dim=width, hidden_dim=mc.connector_hidden or None)
    stage = "vitask_stage2" if "vitask_stage2" in t.fits else "vitask_stage1"
    weights = {"base": t.base, "lora": t.fits[stage].params["lora"]}
    lm = peft.LoraModel(t.model, alpha=mc.lora_alpha, rank=mc.lora_rank)
    return lm, connector, weights, t.fits["vitask_stage1"].params["connector"], stage


def predict(run, paths: list[str], dataset: str | None, k: int, batch_size: int | None) -> dict[str, Any]:
    """{'program', 'dataset', 'images': [{'image', 'answer', 'matched', 'ranking'}]} (see the module)."""
    from vlm_jax.data import features as feats_lib
    from vlm_jax.data import medmnist
    from vlm_jax.eval import lvlm_classify
    from vlm_jax.methods import tsm as tsm_lib
    from vlm_jax.methods import vitask as vitask_method
    from vlm_jax.programs import trained, vitask
    from vlm_jax.programs import runner
    from vlm_jax.runtime.metrics import Progress

    config, mc = run.config, run.config.method
    mesh, _ = runner.make_mesh(config)
    with trained.version_errors(run):
        inp = vitask.check_inputs(config)
        t = trained.load(run, mesh, checkpoints={"model": inp.ckpt, "tsm": inp.clip_dir},
                         fits=("tsm", "vitask_stage1", "vitask_stage2"))   # not the 'vanilla' baseline's
        needed = {"tsm", "vitask_stage1"} - set(t.fits)
        if needed:
            raise errors.UserError(f"{run.workdir} has no checkpoint {', '.join(sorted(needed))}: its training did "
                                   "not get that far")
        task, d = inp.task, _dataset_index(inp.task, dataset)
        dset = task.datasets[d]
        bs = batch_size or max(1, int(config.data.eval_batch_size))

        tsm_model, tsm_params = _tsm(config, inp, t.fits["tsm"].params)
        lm, connector, weights, conn, stage = _lvlm(t, mc)
        embed = vitask_method.make_embedder(lm, connector, t.model.cfg.image_token_id)
        rank = vitask_method.make_ranker(lm, connector, t.model.cfg.image_token_id)
        table = inp.seqs.answer_table(inp.label_responses)
        answers, scores = [], []
        progress = Progress(len(paths), what="predict", every_s=10.0)
        for start in range(0, len(paths), 8 * bs):   # a few batches at a time, for the progress line
            split = _split(paths[start:start + 8 * bs], d, task.num_classes)
            _, feats = tsm_lib.tsm_pass(tsm_model, tsm_params, task, split,
                                        lambda idx: vitask._pixels(split.examples, idx, inp.clip_pp), batch=bs)
            pixels_of = lambda idx: vitask._vision(split.examples, idx, inp.inputs)  # noqa: E731
            answers += lvlm_classify.generate_answers(lm, embed, inp.seqs, inp.tok, split, weights, conn, feats,
                                                      pixels_of, bs, True)
            if not dset.multi_label:   # the likelihood ranking is for single-label datasets, as in the evaluation
                for idx, n in feats_lib.padded_chunks(range(len(split)), bs):
                    scores.append(lvlm_classify.label_scores(rank, weights, conn, inp.seqs, table, split, idx,
                                                             feats, pixels_of, True)[:n, :len(dset.classnames)])
            progress.update(min(start + 8 * bs, len(paths)))
        scores = np.concatenate(scores) if scores else None
    images = []
    for i, (p, text) in enumerate(zip(paths, answers)):
        if dset.multi_label:
            hot = medmnist.match_label_set(text, dset.classnames, none=task.no_finding)
            matched = None if hot is None else ", ".join(c for c, h in zip(dset.classnames, hot) if h) or "none"
        else:
            m = medmnist.match_answer(text, dset.classnames)
            matched = None if m is None else dset.classnames[m]
        order = np.argsort(-scores[i], kind="stable")[:k] if scores is not None else []
        ranking = [{"class": dset.classnames[j], "score": round(float(scores[i][j]), 4)} for j in order]
        images.append({"image": p, "answer": text, "matched": matched, "ranking": ranking})
    return {"program": "vitask", "dataset": dset.name, "model": f"VITask w/ EP ({stage})", "images": images}
