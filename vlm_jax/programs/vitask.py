"""VITask (arXiv 2410.06456): an LVLM fine-tuned for classification tasks with a task-specific model (TSM).

Data flow: config -> task (`data.vitask_tasks`: one dataset or several trained jointly — MedMNIST 2D, image
folders, or on `:runlocal` the built-in photos split into two 5-class "diagnosis" datasets) -> TSM (CLIP vision
tower + one linear head over the union of the datasets' labels, softmax masked to each sample's own dataset,
sigmoid BCE for a multi-label dataset; `methods.tsm`) trained with the generic trainer, its epoch chosen by the
mean (over datasets) val accuracy of every dataset's val split (`tsm.selection='val'`, the paper's rule) -> frozen
TSM exemplar features -> LLaVA + LoRA (+ `ExemplarConnector`) trained with `methods.vitask` on batches that mix the datasets,
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

import functools
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
from vlm_jax.convert import llava as llava_convert
from vlm_jax.convert import loader
from vlm_jax.data import features as feats
from vlm_jax.data import chat, medmnist, preprocess, tokenize, vitask_tasks
from vlm_jax.eval import report, retrieval
from vlm_jax.methods import discriminative as disc
from vlm_jax.methods import tsm as tsm_lib
from vlm_jax.methods import vitask
from vlm_jax.models import peft
from vlm_jax.train import mesh as mesh_lib
from vlm_jax.train import trainer
from vlm_jax.train import workdir as workdir_lib
from vlm_jax.train.metrics import MetricWriter

ROWS = ("TSM", "vanilla (L_van)", "VITask w/o EP", "VITask w/ EP")
METRICS = {"accuracy": "acc", "macro_f1": "F1"}
EVAL_MODES = ("likelihood", "generate", "both")


def _source(example):
    return example.array if getattr(example, "array", None) is not None else example.path


def _pixels(examples, idx, pp) -> np.ndarray:
    """f32[len(idx), H, W, 3]: examples[idx] through the HF image processor settings `pp` (`image_settings`)."""
    return feats.load_all(lambda j: preprocess.preprocess_image(_source(examples[j]), pp), idx)


def _batch_size(want: int, n: int, mesh) -> int:
    div = mesh_lib.batch_divisor(mesh)
    return max(div, min(want, n) // div * div)


def _chunks(rows: Sequence[int], batch: int):
    """(idx, n): `rows` in chunks of `batch`, the last padded with its first row (one compiled shape)."""
    rows = list(rows)
    for i in range(0, len(rows), batch):
        idx = rows[i:i + batch]
        n = len(idx)
        yield np.asarray(idx + [idx[0]] * (batch - n)), n


def _accum(tc, bs: int, mesh, key: str) -> int:
    """The config's gradient-accumulation steps, checked against the batch size before any training."""
    k = int(tc.get("accum_steps", 1))
    div = mesh_lib.batch_divisor(mesh)
    if k < 1 or bs % (k * div):
        raise errors.UserError(f"{key}.accum_steps={k} needs a batch size ({bs}) divisible by {k} x the {div} "
                               f"data-parallel devices: change {key}.batch_size or {key}.accum_steps")
    return k


def _sha(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda x: jax.tree_util.keystr(x[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()


def tsm_pass(tsm_model, params, task: vitask_tasks.JointTask, split: vitask_tasks.Split, pixels_of,
             batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(bool[N, C] predictions, f32[N, D] exemplar features) of `split` in one pass of the TSM's tower.

    Args:
      pixels_of: i32[b] rows of `split` -> f32[b, H, W, 3] (the CLIP tower's preprocessing).
    """
    preds, features = [], []
    for idx, n in _chunks(range(len(split)), batch):
        ds = split.dataset[idx]
        p, f = tsm_lib.predict_and_features(tsm_model, params, pixels_of(idx), task.class_mask(ds),
                                            task.multi_label[ds])
        preds.append(np.asarray(p)[:n])
        features.append(np.asarray(f, np.float32)[:n])
    return np.concatenate(preds), np.concatenate(features)


def make_tsm_eval(tsm_model, params, task: vitask_tasks.JointTask, pixels_of):
    """The trainer's `eval_fn` of the TSM: trainable params -> the val split's mean (over datasets) accuracy and
    macro-F1 (%), as the test table computes them; `trainer.fit` keeps the epoch of the best 'accuracy'.

    Args:
      params: the TSM's full tree (its frozen leaves, if any, complete the trainable ones).
      pixels_of: i32[b] rows of `task.val` -> f32[b, H, W, 3].
    """
    def eval_fn(trainable):
        pred, _ = tsm_pass(tsm_model, trainer.merge(trainable, params), task, task.val, pixels_of)
        return vitask_tasks.split_metrics(task, task.val, pred)["mean"]
    return eval_fn


# ----------------------------------------------------------------------------------------------------------
# Tokens.

class Seqs:
    """Token rows [generation prompt of (image, instruction_d), answer separator + response, EOS], exactly as the
    checkpoint's processor tokenizes them (`data.chat`: its chat template, the whole string tokenized).

    Args:
      fmt: the checkpoint's `chat.ChatFormat`.
      instructions: one per dataset d.
      responses: every response a row may hold (fixes the answer length A and so the sequence length L).
    """

    def __init__(self, fmt: chat.ChatFormat, instructions: Sequence[str], responses: Sequence[str]):
        self.fmt, self.instructions = fmt, list(instructions)
        self.prompts = [fmt.prompt(ins, image=True) for ins in instructions]
        self.pad = fmt.pad_id
        self._answers: dict[tuple[int, str], list[int]] = {}
        self.answer_length = max(len(self.answer(d, r)) for d in range(len(instructions)) for r in set(responses))
        self.prompt_length = max(len(p) for p in self.prompts)
        self.length = self.prompt_length + self.answer_length

    def answer(self, d: int, text: str) -> list[int]:
        """Token ids of the response `text` (+ EOS) after dataset d's prompt (memoised: few distinct answers)."""
        if (d, text) not in self._answers:
            self._answers[d, text] = self.fmt.answer_ids(self.instructions[d], True, text)
        return self._answers[d, text]

    def rows(self, datasets, responses) -> dict[str, np.ndarray]:
        """Teacher-forcing rows, right-padded: {'input_ids', 'attention_mask', 'answer_mask'} i32[B, L]."""
        b = len(responses)
        out = {k: np.zeros((b, self.length), np.int32) for k in ("input_ids", "attention_mask", "answer_mask")}
        out["input_ids"][:] = self.pad
        for i, (d, r) in enumerate(zip(datasets, responses)):
            p, a = self.prompts[d], self.answer(int(d), r)
            if len(p) + len(a) > self.length:
                raise ValueError(f"response {r!r} is longer than the {self.answer_length} answer tokens planned for")
            out["input_ids"][i, :len(p) + len(a)] = p + a
            out["attention_mask"][i, :len(p) + len(a)] = 1
            out["answer_mask"][i, len(p):len(p) + len(a)] = 1
        return out

    def prompt_rows(self, datasets) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation prompts left-padded to the longest dataset prompt: (ids, mask) i32[B, P]."""
        ids = np.full((len(datasets), self.prompt_length), self.pad, np.int32)
        mask = np.zeros_like(ids)
        for i, d in enumerate(datasets):
            p = self.prompts[d]
            ids[i, self.prompt_length - len(p):] = p
            mask[i, self.prompt_length - len(p):] = 1
        return ids, mask

    def answer_table(self, responses: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Label responses of each dataset d, right-padded: (ids, mask) i32[D, K, A], K = the most classes; the
        rows past a dataset's own classes have mask 0 (score them -inf)."""
        k = max(len(r) for r in responses)
        a = max(len(self.answer(d, x)) for d, r in enumerate(responses) for x in r)
        ids = np.full((len(responses), k, a), self.pad, np.int32)
        mask = np.zeros_like(ids)
        for d, rs in enumerate(responses):
            for j, r in enumerate(rs):
                t = self.answer(d, r)
                ids[d, j, :len(t)] = t
                mask[d, j, :len(t)] = 1
        return ids, mask


# ----------------------------------------------------------------------------------------------------------
# The LVLM passes and losses.

def make_forward(model, connector: vitask.ExemplarConnector, image_token_id: int):
    def forward(weights, ids, mask, pixels, conn=None, feature=None):
        """Plain pass (conn None): f32[B, L, V]; exemplar pass: (f32[B, L + 1, V], position i32[B])."""
        embeds = model.apply({"params": weights}, ids, pixels, method="embed_multimodal")
        pos = None
        if conn is not None:
            pos = vitask.exemplar_position(ids, image_token_id)
            ex = connector.apply({"params": conn}, feature)
            embeds, mask = vitask.insert_exemplar(embeds, mask, ex, pos)
        hidden, _ = model.apply({"params": weights}, None, mask, inputs_embeds=embeds, method="hidden_states")
        logits = model.apply({"params": weights}, hidden, method="logits")
        return logits if conn is None else (logits, pos)
    return forward


def make_loss_fn(forward, *, stage: int | None, pad_id: int, lora_alpha: float, lora_rank: int, alpha: float,
                 beta: float, rda_direction: str, lora_impl: str = "unmerged"):
    """stage None: the vanilla baseline (L_van only); 1 / 2: VITask's stages (`vitask.total_loss`).

    lora_impl: 'unmerged' (the adapters beside the frozen layers, no full weight gradients) or 'merged'; see
    `discriminative.lora_context`.
    """

    def loss_fn(params, batch, rng):
        del rng
        with disc.lora_context(params["lora"], lora_impl, alpha=lora_alpha, rank=lora_rank) as weights_of:
            return _loss(weights_of(params["base"]), params, batch)

    def _loss(weights, params, batch):
        ids, mask, amask = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
        plain = forward(weights, ids, mask, batch["pixel_values"])
        l_van = vitask.answer_nll(plain, ids, amask)
        if stage is None:
            return l_van, {"loss": l_van, "l_van": l_van}
        ep, pos = forward(weights, ids, mask, batch["pixel_values"], params["connector"], batch["feature"])
        l_ep = vitask.answer_nll(ep, vitask.insert_token(ids, pad_id, pos), vitask.insert_token(amask, 0, pos))
        rda = vitask.rda_loss(plain, vitask.drop_exemplar_logits(ep, pos), amask, direction=rda_direction)
        crt = None
        m = {"l_van": l_van, "l_ep": l_ep, "rda": rda}
        if stage == 2:
            neg = forward(weights, ids, mask, batch["neg_pixel_values"])
            crt = vitask.crt_loss(plain, neg, ids, amask)
            m["crt"] = crt
        loss = vitask.total_loss(stage, l_van, l_ep, rda, crt, alpha=alpha, beta=beta)
        return loss, {"loss": loss, **m}

    return loss_fn


def make_scorer(forward, *, lora_alpha: float, lora_rank: int):
    """The uncached reference of `make_ranker`: one full pass (vision tower included) per (image, answer) row."""

    @functools.partial(jax.jit, static_argnames="use_ep")
    def score(base, lora, conn, ids, mask, amask, pixels, feature, use_ep: bool):
        """f32[N]: sum over answer tokens of log p(token | image, instruction [, exemplar]); rows as `Seqs.rows`."""
        weights = peft.lora_merge(base, lora, alpha=lora_alpha, rank=lora_rank)
        if use_ep:
            ep, pos = forward(weights, ids, mask, pixels, conn, feature)
            logits = vitask.drop_exemplar_logits(ep, pos)
        else:
            logits = forward(weights, ids, mask, pixels)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.where(amask[:, 1:] > 0, tok, 0.0).sum(axis=1)
    return score


# ----------------------------------------------------------------------------------------------------------
# Evaluation.

def _prompt_embeds(model, connector, image_token_id, weights, conn, ids, mask, pixels, feature, use_ep):
    """Embedded (left-padded) prompts with the images spliced in [and the exemplar after them]."""
    embeds = model.apply({"params": weights}, ids, pixels, method="embed_multimodal")
    if use_ep:
        ex = connector.apply({"params": conn}, feature)
        embeds, mask = vitask.insert_exemplar(embeds, mask, ex, vitask.exemplar_position(ids, image_token_id))
    return embeds, mask


def repeat_cache(cache, k: int, scan_layers: bool = False):
    """Each row of a `KVCache` repeated k times (row b -> rows b*k .. b*k + k - 1)."""
    kv_axis = 1 if scan_layers else 0  # scanned layers stack k / v on a leading layer axis
    rep = lambda x: jnp.repeat(x, k, axis=kv_axis)
    return cache.replace(k=jax.tree.map(rep, cache.k), v=jax.tree.map(rep, cache.v),
                         mask=jnp.repeat(cache.mask, k, axis=0))


def make_ranker(model, connector, image_token_id: int):
    """Label-likelihood scores with the prompt computed once per image.

    The prompt (image tokens from the vision tower, instruction [, exemplar]) is prefilled into a KV cache for B
    rows; the cache is repeated for the K label responses of each row and only the K answer continuations run
    through the LM. Equal (to float rounding) to `make_scorer` on the full sequences, at B prompt passes instead of
    B * K full passes.
    """

    @functools.partial(jax.jit, static_argnames="use_ep")
    def rank(weights, conn, ids, mask, pixels, feature, ans_ids, ans_mask, use_ep: bool):
        """Scores f32[B, K] = sum over answer tokens of log p(token | image, instruction [, exemplar]).

        Args:
          weights: the model's params (a `peft.LoraModel`'s {'base', 'lora'}); conn: connector params (with use_ep).
          ids, mask: i32[B, P] left-padded prompts (`Seqs.prompt_rows`); pixels f32[B, H, W, 3]; feature f32[B, Dt].
          ans_ids, ans_mask: i32[B, K, A] each row's K right-padded answers ' <label>.' + EOS (mask 0 rows score
            whatever; the caller masks them).
        """
        embeds, mask = _prompt_embeds(model, connector, image_token_id, weights, conn, ids, mask, pixels, feature,
                                      use_ep)
        b, p = mask.shape
        k, a = ans_ids.shape[1:]
        v = {"params": weights}
        cache = model.init_cache(b, p + a)
        hidden, cache = model.apply(v, None, mask, inputs_embeds=embeds, cache=cache, method="hidden_states")
        # The last prompt position predicts every answer's first token.
        first = jax.nn.log_softmax(model.apply(v, hidden[:, -1], method="logits").astype(jnp.float32), axis=-1)
        s0 = jnp.take_along_axis(first, ans_ids[:, :, 0], axis=1)
        flat_ids, flat_mask = ans_ids.reshape(b * k, a), ans_mask.reshape(b * k, a)
        hidden, _ = model.apply(v, flat_ids, flat_mask, cache=repeat_cache(cache, k, model.scan_layers),
                                method="hidden_states")
        logp = jax.nn.log_softmax(model.apply(v, hidden[:, :-1], method="logits").astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(logp, flat_ids[:, 1:, None], axis=-1)[..., 0]
        rest = jnp.where(flat_mask[:, 1:] > 0, tok, 0.0).sum(axis=1)
        return s0 + rest.reshape(b, k)

    return rank


def rank_labels(rank, weights, conn, seqs: Seqs, table, task: vitask_tasks.JointTask, split: vitask_tasks.Split,
                rows: Sequence[int], split_feats: np.ndarray, pp, batch: int, use_ep: bool):
    """Label-likelihood predictions of `rows` of `split`, each among its own dataset's labels.

    Args:
      rank: `make_ranker(...)`; table: `seqs.answer_table(<each dataset's label responses>)`.

    Returns:
      (pred bool[N, C] one-hot in the joint label space, valid bool[N]: True on `rows`).
    """
    ans_ids, ans_mask = table
    pred = np.zeros((len(split), task.num_classes), bool)
    valid = np.zeros(len(split), bool)
    for idx, n in _chunks(rows, batch):
        ds = split.dataset[idx]
        ids, mask = seqs.prompt_rows(ds)
        s = np.asarray(rank(weights, conn, ids, mask, _pixels(split.examples, idx, pp), split_feats[idx],
                            ans_ids[ds], ans_mask[ds], use_ep=use_ep))
        s = np.where(ans_mask[ds][:, :, 0] > 0, s, -np.inf)  # only the sample's own dataset's labels
        best = task.offsets[ds] + np.argmax(s, axis=1)
        pred[idx[:n], best[:n]] = True
        valid[idx[:n]] = True
    return pred, valid


def make_embedder(model, connector, image_token_id: int):
    return jax.jit(functools.partial(_prompt_embeds, model, connector, image_token_id), static_argnames="use_ep")


def generate_labels(model, embed, seqs: Seqs, tok, task: vitask_tasks.JointTask, split: vitask_tasks.Split,
                    weights, conn, split_feats: np.ndarray, pp, batch: int, use_ep: bool):
    """Predictions from greedy answers matched to each sample's own dataset's label set.

    Prompts are left-padded to one length (`Seqs.prompt_rows`), so a batch may mix datasets; with EP the exemplar
    token goes after the image tokens. Decoding runs with the KV cache of `models.generate`. A single-label answer
    is matched with `medmnist.match_answer`, a multi-label one with `medmnist.match_label_set`.

    Returns:
      (pred bool[N, C] label sets in the joint label space, valid bool[N]: False where the answer is unmatched).
    """
    from vlm_jax.models import generate

    max_new = seqs.answer_length + 2
    eos = tok.eos_token_id
    pred = np.zeros((len(split), task.num_classes), bool)
    valid = np.zeros(len(split), bool)
    shown = []
    for idx, n in _chunks(range(len(split)), batch):
        ds = split.dataset[idx]
        ids, mask = seqs.prompt_rows(ds)
        embeds, mask = embed(weights, conn, ids, mask, _pixels(split.examples, idx, pp), split_feats[idx],
                             use_ep=use_ep)
        out = np.asarray(generate.greedy_generate(model, weights, None, mask, max_new, eos_token_id=eos,
                                                  pad_token_id=seqs.pad, inputs_embeds=embeds))
        for i, d, row in zip(idx[:n], ds[:n], out[:n]):
            row = row.tolist()
            text = tok.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True)
            if len(shown) < 3:
                shown.append(text)
            dset, lo = task.datasets[d], task.offsets[d]
            if dset.multi_label:
                hot = medmnist.match_label_set(text, dset.classnames, none=task.no_finding)
                if hot is not None:
                    pred[i, lo:lo + len(hot)] = hot
                    valid[i] = True
            else:
                k = medmnist.match_answer(text, dset.classnames)
                if k is not None:
                    pred[i, lo + k] = True
                    valid[i] = True
    logging.info("generated answers, e.g. %s; %d%% unmatched", shown, round(100 * float(np.mean(~valid))))
    return pred, valid


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

def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    dc, mc, tc, sc = config.data, config.method, config.train, config.tsm
    cache_root = os.path.expanduser(os.environ.get("VLM_JAX_CACHE", "~/.cache/vlm_jax"))

    # Everything a user can get wrong is checked before the workdir gets anything (or a TSM trains for nothing).
    config_utils.check_ranges(config, {
        "tsm.epochs": 1, "tsm.batch_size": 1, "tsm.optim.lr": 0, "train.batch_size": 1, "train.optim.lr": 0,
        "method.stage1_epochs": 1, "method.stage2_epochs": 0, "method.vanilla_epochs": 0, "method.lora_rank": 1,
        "method.alpha": 0, "method.beta": 0, "data.eval_batch_size": 1, "data.test_limit": 0, "data.train_limit": 0,
        "data.val_limit": 0, "method.stage2_lr_scale": 0,
        "method.connector_hidden": 0}, {"method.eval_mode": EVAL_MODES,
                                        "method.rda_direction": vitask.DIRECTIONS,
                                        "tsm.selection": ("val", "last")})
    task = vitask_tasks.load_task(dc, config.rng_seed)
    train, test = task.train, task.test
    # CRT's "different label": a different answer (a multi-label sample's whole set) of the same dataset.
    negatives = vitask_tasks.NegativeSampler(train, task.names) if mc.stage2_epochs else None
    no_val = [d.name for k, d in enumerate(task.datasets) if not np.any(task.val.dataset == k)]
    if sc.selection == "val" and no_val:
        raise errors.UserError(f"{', '.join(no_val)} has no val split (a folder dataset needs <path>/val/<class>/): "
                               "the TSM's best epoch is selected on val; add one or set --config.tsm.selection=last")
    is_ml = task.multi_label
    multi = [d.name for d in task.datasets if d.multi_label]
    if multi and mc.eval_mode == "likelihood":
        raise errors.UserError(f"{', '.join(multi)} is multi-label: label-likelihood ranking scores one label per "
                               "answer; use --config.method.eval_mode=generate (or both: its likelihood cells stay "
                               "empty)")
    from vlm_jax.programs import fewshot_clip
    clip_dir = fewshot_clip.resolve_checkpoint(sc.checkpoint, os.path.join(cache_root, "models"), "configs/vitask.py")
    instructions = [d.instruction(dc.full_instruction) for d in task.datasets]
    label_responses = [d.label_responses() for d in task.datasets]
    texts = (instructions + [r for rs in label_responses for r in rs] +
             [c for d in task.datasets for c in d.classnames] +
             ([medmnist.response([], none=task.no_finding)] if multi else []))
    ckpt = llava_convert.resolve_checkpoint(config.model.checkpoint, os.path.join(cache_root, "models"), texts,
                                          "configs/vitask.py")
    # The LLaVA's prompt format and preprocessing, checked against the config now, not after the TSM has trained.
    cfg = llava_convert.llava_config(loader.read_config(ckpt), ckpt)
    tok = tokenize.load_tokenizer(ckpt)
    pp = preprocess.image_settings(ckpt)
    clip_pp = preprocess.image_settings(clip_dir)
    fmt = chat.ChatFormat(tok, chat.load_chat_template(ckpt, dc.chat_template, tok), cfg.tokens_per_image,
                          cfg.image_token_id, chat.image_token(ckpt))
    seqs = Seqs(fmt, instructions, train.responses + [r for rs in label_responses for r in rs])

    workdir_lib.prepare(workdir, config)   # config.json; refuses a changed config on a resumed workdir
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    repl = mesh_lib.replicated(mesh)
    writer = MetricWriter(workdir)
    rng = jax.random.key(config.rng_seed)
    rows: dict[str, dict[str, Any]] = {}
    num_classes = task.num_classes
    n_train = len(train)
    for key, c in (("tsm", sc), ("train", tc)):   # fail before any training, not between the stages
        _accum(c, _batch_size(c.batch_size, n_train, mesh), mesh, key)

    # ---- 1. TSM: one head over the union of the labels, each sample's softmax (or BCE) on its own dataset's.
    clip_model, clip_params = clip_convert.from_pretrained(clip_dir, dtype=jnp.float32)
    tsm_model = tsm_lib.TSMClassifier(clip_model.vision, num_classes)
    tsm_params = tsm_lib.init_from_clip(tsm_model, clip_params, jax.random.fold_in(rng, 1))
    del clip_params
    bs = _batch_size(sc.batch_size, n_train, mesh)

    def tsm_batch(idx):
        ds = train.dataset[idx]
        b = {"pixel_values": _pixels(train.examples, idx, clip_pp),
             "labels": (task.offsets[ds] + np.maximum(train.label[idx], 0)).astype(np.int32),
             "class_mask": task.class_mask(ds)}
        if multi:
            b["targets"] = train.targets[idx].astype(np.float32)
            b["multi_label"] = is_ml[ds]
        return b

    def tsm_batches(epoch):
        order = np.random.default_rng([config.rng_seed, 1, epoch]).permutation(n_train)
        for i in range(n_train // bs):
            yield tsm_batch(order[i * bs:(i + 1) * bs])

    # The paper: "select the best model based on validation set performance" (mean val accuracy over datasets).
    tsm_eval = (make_tsm_eval(tsm_model, tsm_params, task, lambda idx: _pixels(task.val.examples, idx, clip_pp))
                if sc.selection == "val" else None)
    fit = trainer.fit(loss_fn=tsm_lib.make_loss_fn(tsm_model), params=tsm_params,
                      param_groups=list(tsm_lib.PARAM_GROUPS), optim=sc.optim.to_dict(), num_epochs=sc.epochs,
                      steps_per_epoch=n_train // bs, epoch_batches=tsm_batches, mesh=mesh,
                      rng=jax.random.fold_in(rng, 2), workdir=workdir, writer=writer, name="tsm", log_every_s=10.0,
                      checkpoint_every_steps=sc.get("checkpoint_every_steps", 0),
                      accum_steps=_accum(sc, bs, mesh, "tsm"), eval_fn=tsm_eval, select="accuracy")
    tsm_params = trainer.merge(jax.device_put(fit.best_params, repl), tsm_params)
    logging.info("TSM: epoch %d of %d kept (%s)", fit.best_epoch + 1, sc.epochs,
                 "best val mean accuracy" if tsm_eval else "the last")

    def pass_of(split):
        return tsm_pass(tsm_model, tsm_params, task, split, lambda idx: _pixels(split.examples, idx, clip_pp))

    _, train_feats = pass_of(train)
    tsm_pred, test_feats = pass_of(test)
    rows["TSM"] = vitask_tasks.split_metrics(task, test, tsm_pred)
    logging.info("TSM: %s", rows["TSM"])

    # ---- 2. LVLM, on batches that mix the datasets, each sample with its own dataset's instruction.
    # Streamed, each tensor placed by its logical axes: replicated on the default data-parallel mesh, split under
    # fsdp / tensor; never the whole LLaVA on one device.
    model, base = llava_convert.from_pretrained(
        ckpt, dtype=jnp.dtype(config.model.dtype),
        param_dtype=jnp.dtype(config.model.get("param_dtype") or config.model.dtype), mesh=mesh)
    width = base["language_model"]["model"]["embed_tokens"]["embedding"].shape[-1]
    connector = vitask.ExemplarConnector(out_dim=width, hidden_dim=mc.connector_hidden or None)
    forward = make_forward(model, connector, model.cfg.image_token_id)
    targets = [tuple(t) if isinstance(t, (list, tuple)) else t for t in mc.lora_targets]
    lora_kw = dict(lora_alpha=mc.lora_alpha, lora_rank=mc.lora_rank)
    logging.info("LLaVA %s: %s; %d train / %d test, sequence length %d", ckpt, ", ".join(task.names), n_train,
                 len(test), seqs.length)

    bs = _batch_size(tc.batch_size, n_train, mesh)
    steps = n_train // bs

    def lvlm_batches(seed, with_neg):
        def epoch_batches(epoch):
            order = np.random.default_rng([config.rng_seed, seed, epoch]).permutation(n_train)
            for i in range(steps):
                idx = order[i * bs:(i + 1) * bs]
                px = _pixels(train.examples, idx, pp)
                b = {**seqs.rows(train.dataset[idx], [train.responses[j] for j in idx]), "pixel_values": px,
                     "feature": train_feats[idx]}
                if with_neg:
                    neg = negatives.sample(idx, [config.rng_seed, seed], epoch * steps + i)
                    b["neg_pixel_values"] = _pixels(train.examples, neg, pp)
                yield b
        return epoch_batches

    def fit_lvlm(name, params, groups, stage, epochs, seed, lr_scale=1.0):
        loss_fn = make_loss_fn(forward, stage=stage, pad_id=seqs.pad, alpha=mc.alpha, beta=mc.beta,
                               rda_direction=mc.rda_direction, **lora_kw)
        optim = dict(tc.optim.to_dict(), lr=tc.optim.lr * lr_scale)
        f = trainer.fit(loss_fn=loss_fn, params=params, param_groups=groups, optim=optim,
                        num_epochs=epochs, steps_per_epoch=steps, epoch_batches=lvlm_batches(seed, stage == 2),
                        mesh=mesh, rng=jax.random.fold_in(rng, seed), workdir=workdir, writer=writer, name=name,
                        log_every_s=10.0, checkpoint_every_steps=tc.get("checkpoint_every_steps", 0),
                        accum_steps=_accum(tc, bs, mesh, "train"))
        return trainer.merge(jax.device_put(f.best_params, repl), params), f.history

    # Vanilla gets as many steps as VITask's two stages together unless told otherwise (same batches per epoch).
    van_epochs = mc.vanilla_epochs or mc.stage1_epochs + mc.stage2_epochs
    logging.info("steps: vanilla %d, VITask stage 1 %d + stage 2 %d", van_epochs * steps, mc.stage1_epochs * steps,
                 mc.stage2_epochs * steps)
    lora0 = peft.lora_init(base, jax.random.fold_in(rng, 3), targets=targets, rank=mc.lora_rank)
    conn0 = nn.meta.unbox(connector.init(jax.random.fold_in(rng, 4),
                                         jnp.zeros((1, train_feats.shape[1]), jnp.float32))["params"])
    # Vanilla baseline: L_van only, its own LoRA.
    van, h_van = fit_lvlm("vanilla", {"base": base, "lora": lora0}, [("lora/.*", 1.0)], None, van_epochs, 10)
    # VITask stage 1: {'lora', 'connector'}; stage 2: + CRT, the connector frozen.
    p1, h1 = fit_lvlm("vitask_stage1", {"base": base, "lora": lora0, "connector": conn0},
                      [("lora/.*", 1.0), ("connector/.*", 1.0)], 1, mc.stage1_epochs, 11)
    sha1 = _sha(p1["connector"])
    h2 = []
    p2 = p1
    if mc.stage2_epochs:
        p2, h2 = fit_lvlm("vitask_stage2", p1, [("lora/.*", 1.0)], 2, mc.stage2_epochs, 12, mc.stage2_lr_scale)
    sha2 = _sha(p2["connector"])

    # ---- 3. Evaluation, each sample against its own dataset's label set.
    eb = max(1, int(dc.eval_batch_size))
    # LoRA applied unmerged, as in training: the evaluated model is the trained one (also with a bf16 base).
    lm = peft.LoraModel(model, alpha=mc.lora_alpha, rank=mc.lora_rank)
    variants = [("vanilla (L_van)", van, p2["connector"], False), ("VITask w/o EP", p2, p2["connector"], False),
                ("VITask w/ EP", p2, p2["connector"], True)]
    skip = [k for k in range(len(task.datasets)) if is_ml[k]]
    lik, gen = {}, {}
    rank = make_ranker(lm, connector, model.cfg.image_token_id)
    embed = make_embedder(lm, connector, model.cfg.image_token_id)
    table = seqs.answer_table(label_responses)
    single_rows = [i for i in range(len(test)) if not is_ml[test.dataset[i]]]
    for name, p, conn, ep in variants:
        weights = {"base": base, "lora": p["lora"]}
        if mc.eval_mode in ("likelihood", "both"):
            pred, valid = rank_labels(rank, weights, conn, seqs, table, task, test, single_rows, test_feats, pp, eb,
                                      ep)
            lik[name] = vitask_tasks.split_metrics(task, test, pred, valid, skip=skip)
        if mc.eval_mode in ("generate", "both"):
            # Greedy answers matched to the label set; an unmatched answer counts as wrong.
            pred, valid = generate_labels(lm, embed, seqs, tok, task, test, weights, conn, test_feats, pp, eb, ep)
            gen[name + (" [generated]" if mc.eval_mode == "both" else "")] = vitask_tasks.split_metrics(
                task, test, pred, valid, unmatched=True)
        del weights
    rows.update(lik)
    rows.update(gen)
    for i, (name, r) in enumerate(rows.items()):
        writer.write(i, _flat_metrics(r), prefix=f"test/{name}/")
    writer.close()

    title = (f"VITask on {', '.join(task.names)}: test (%), {len(test)} images, {mc.eval_mode} evaluation, "
             f"{os.path.basename(ckpt)}")
    md = format_results(rows, task.names, title)
    datasets = [{"name": d.name, "modality": d.modality, "num_classes": len(d.classnames),
                 "multi_label": d.multi_label, "instruction": ins, "train_examples": int(np.sum(train.dataset == k)),
                 "test_examples": int(np.sum(test.dataset == k))}
                for k, (d, ins) in enumerate(zip(task.datasets, instructions))]
    out = {"checkpoint": ckpt, "tsm_checkpoint": clip_dir, "datasets": datasets, "num_classes": num_classes,
           "train_examples": n_train, "test_examples": len(test), "eval_mode": mc.eval_mode,
           "connector_sha256": {"stage1": sha1, "stage2": sha2},
           "steps": {"vanilla": van_epochs * steps, "stage1": mc.stage1_epochs * steps,
                     "stage2": mc.stage2_epochs * steps},
           "tsm_selection": {"mode": sc.selection, "best_epoch": fit.best_epoch, "val_examples": len(task.val)},
           "history": {"tsm": fit.history, "vanilla": h_van, "stage1": h1, "stage2": h2}, "results": rows}
    report.write_atomic(os.path.join(workdir, "results.md"), lambda f: f.write(md))
    report.write_json(os.path.join(workdir, "results.json"), out)
    if mesh_lib.is_primary():
        print("\n" + md, flush=True)
    return out
