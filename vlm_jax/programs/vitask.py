"""VITask (arXiv 2410.06456): an LVLM fine-tuned for one classification task with a task-specific model (TSM).

Data flow: config -> dataset (a MedMNIST 2D single-label dataset, or on `:runlocal` the built-in photos as a
10-class "diagnosis" task) -> TSM (CLIP vision tower + linear head, `methods.tsm`) trained with the generic
trainer -> frozen TSM exemplar features -> LLaVA + LoRA (+ `ExemplarConnector`) trained with `methods.vitask`:
  vanilla baseline: L_van only (its own LoRA, stage-1 epochs);
  VITask stage 1:   L_van + L_ep + alpha RDA, trains {'lora', 'connector'};
  VITask stage 2:   + beta CRT, the connector FROZEN (param group 'lora' only).
-> evaluation by label-likelihood ranking: for each test image every label's response '<label>.' + EOS is scored
(sum of log-probs given image + instruction [+ exemplar]) and the argmax is the prediction -> accuracy and
macro-F1 (%) of 'TSM', 'vanilla (L_van)', 'VITask w/o EP', 'VITask w/ EP' -> workdir (results.json, results.md,
metrics.jsonl, checkpoints).

Sequences (tokenized piecewise, right-padded to one length): [BOS, 'USER: ', image tokens, '\\n' + instruction,
' ASSISTANT:', ' ' + response, EOS]; answer_mask is 1 on the response and EOS tokens.

CRT negatives: in each training batch, sample i's negative image is that of sample (i + s) mod B for the smallest
shift s >= 1 whose label differs from i's (the "roll the batch until labels differ" rule); if every sample of the
batch has i's label, the shift-1 image is used (same label: a weak negative). The negative pass shares the
positive's ids exactly, only the pixels differ (as `vitask.crt_loss` requires).

results.json also records a sha256 of the connector params after stage 1 and after stage 2 (they must be equal:
the connector is frozen in stage 2).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vlm_jax import errors
from vlm_jax.convert import clip as clip_convert
from vlm_jax.convert import llava as llava_convert
from vlm_jax.data import features as feats
from vlm_jax.data import medmnist, preprocess, tokenize
from vlm_jax.eval import report, retrieval
from vlm_jax.methods import tsm as tsm_lib
from vlm_jax.methods import vitask
from vlm_jax.models import peft
from vlm_jax.train import mesh as mesh_lib
from vlm_jax.train import trainer
from vlm_jax.train.metrics import MetricWriter

ROWS = ("TSM", "vanilla (L_van)", "VITask w/o EP", "VITask w/ EP")
COLUMNS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "unmatched": "unmatched answers"}


# ----------------------------------------------------------------------------------------------------------
# Task.

@dataclasses.dataclass
class Task:
    name: str
    classnames: list[str]
    instruction: str
    responses: list[str]     # per class: '<classname>.'
    train: list[Any]         # examples with .array and .label
    test: list[Any]


def load_task(dc) -> Task:
    if dc.name == "builtin":
        from vlm_jax.data import builtin
        ds = builtin.builtin_dataset()
        instr = "Analyze the given photo image." + (
            f" The possible diagnoses are: {', '.join(ds.classnames)}." if dc.full_instruction else "")
        return Task("builtin", list(ds.classnames), instr, [f"{c}." for c in ds.classnames],
                    list(ds.train), list(ds.test))
    if not dc.root:
        raise errors.UserError("VITask needs --config.data.root=<folder with the MedMNIST npz files>; or try "
                               "--config=configs/vitask.py:runlocal")
    ds = medmnist.load_medmnist(dc.name, dc.root, size=dc.size or None)
    if ds.multi_label:
        raise errors.UserError(f"{dc.name} is multi-label; this program ranks single labels (use another dataset)")
    return Task(ds.name, list(ds.classnames), medmnist.instruction(dc.name, include_labels=dc.full_instruction),
                [medmnist.response([c]) for c in ds.classnames], list(ds.train), list(ds.test))


def _pixels(examples, idx, pp) -> np.ndarray:
    return feats.load_all(lambda j: preprocess.clip_preprocess(preprocess.load_image(examples[j].array), **pp), idx)


def _batch_size(want: int, n: int, mesh) -> int:
    div = mesh_lib.batch_divisor(mesh)
    return max(div, min(want, n) // div * div)


def _sha(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda x: jax.tree_util.keystr(x[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()


def _metrics(pred, true, num_classes) -> dict[str, float]:
    return {"accuracy": 100.0 * medmnist.accuracy(pred, true),
            "macro_f1": 100.0 * medmnist.macro_f1(pred, true, num_classes)}


# ----------------------------------------------------------------------------------------------------------
# Tokens.

class Seqs:
    """Piecewise tokenization of [BOS, pre, image tokens, '\\n' + instruction, post, ' ' + response, EOS]."""

    def __init__(self, tok, template: str, instruction: str, responses, tokens_per_image: int, image_token_id: int):
        pre, post = template.split("{}")
        enc = lambda t: list(tok(t, add_special_tokens=False).input_ids) if t else []
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        self.prompt = bos + enc(pre) + [image_token_id] * tokens_per_image + enc("\n" + instruction) + enc(post)
        self.answers = [enc(" " + r) + eos for r in responses]
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.length = len(self.prompt) + max(len(a) for a in self.answers)
        n = self.length
        c = len(self.answers)
        self.ids = np.full((c, n), self.pad, np.int32)
        self.mask = np.zeros((c, n), np.int32)
        self.answer_mask = np.zeros((c, n), np.int32)
        p = len(self.prompt)
        for k, a in enumerate(self.answers):
            self.ids[k, :p + len(a)] = self.prompt + a
            self.mask[k, :p + len(a)] = 1
            self.answer_mask[k, p:p + len(a)] = 1

    def rows(self, labels) -> dict[str, np.ndarray]:
        labels = np.asarray(labels)
        return {"input_ids": self.ids[labels], "attention_mask": self.mask[labels],
                "answer_mask": self.answer_mask[labels]}


def negative_index(labels: np.ndarray) -> np.ndarray:
    """i32[B]: for each i, (i + s) mod B for the smallest s >= 1 with a different label (shift 1 if none)."""
    b = len(labels)
    out = (np.arange(b) + 1) % b
    done = np.zeros(b, bool)
    for s in range(1, b):
        j = (np.arange(b) + s) % b
        hit = (~done) & (labels[j] != labels)
        out[hit] = j[hit]
        done |= hit
    return out.astype(np.int32)


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
                 beta: float, rda_direction: str):
    """stage None: the vanilla baseline (L_van only); 1 / 2: VITask's stages (`vitask.total_loss`)."""

    def loss_fn(params, batch, rng):
        del rng
        weights = peft.lora_merge(params["base"], params["lora"], alpha=lora_alpha, rank=lora_rank)
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
    @functools.partial(jax.jit, static_argnames="use_ep")
    def score(base, lora, conn, ids, mask, amask, pixels, feature, use_ep: bool):
        """f32[N]: sum over answer tokens of log p(token | image, instruction [, exemplar])."""
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


def rank_labels(score, base, lora, conn, seqs: Seqs, test, test_feats, pp, batch: int, use_ep: bool) -> np.ndarray:
    """i32[N] predictions: argmax over classes of the score of each class's response."""
    c = len(seqs.answers)
    preds = []
    for i in range(0, len(test), batch):
        idx = list(range(i, min(i + batch, len(test))))
        n = len(idx)
        idx += [idx[0]] * (batch - n)  # one compiled shape
        px = np.repeat(_pixels(test, idx, pp), c, axis=0)
        ft = np.repeat(test_feats[idx], c, axis=0)
        labels = np.tile(np.arange(c), batch)
        r = seqs.rows(labels)
        s = np.asarray(score(base, lora, conn, r["input_ids"], r["attention_mask"], r["answer_mask"], px, ft,
                             use_ep=use_ep)).reshape(batch, c)
        preds.append(np.argmax(s, axis=1)[:n])
    return np.concatenate(preds).astype(np.int32)


def generate_labels(model, connector, seqs: Seqs, tok, classnames, base, lora, conn, test, test_feats, pp,
                    batch: int, use_ep: bool, *, lora_alpha: float, lora_rank: int) -> np.ndarray:
    """i32[N] predictions from greedy answers: decode, normalise, match to the label set (-1 if unmatched).

    Every prompt has the same tokens ([image + instruction]), so no row needs padding; with EP the exemplar
    token goes after the image tokens. Decoding runs with the KV cache of `models.generate`.
    """
    from vlm_jax.models import generate

    weights = jax.jit(functools.partial(peft.lora_merge, alpha=lora_alpha, rank=lora_rank))(base, lora)
    image_token_id = model.cfg.image_token_id

    @jax.jit
    def embed(ids, pixels, feature):
        embeds = model.apply({"params": weights}, ids, pixels, method="embed_multimodal")
        mask = jnp.ones(ids.shape, jnp.int32)
        if use_ep:
            ex = connector.apply({"params": conn}, feature)
            embeds, mask = vitask.insert_exemplar(embeds, mask, ex, vitask.exemplar_position(ids, image_token_id))
        return embeds, mask

    max_new = max(len(a) for a in seqs.answers) + 2
    eos = tok.eos_token_id
    preds = []
    for i in range(0, len(test), batch):
        idx = list(range(i, min(i + batch, len(test))))
        n = len(idx)
        idx += [idx[0]] * (batch - n)  # one compiled shape
        ids = np.tile(np.asarray(seqs.prompt, np.int32), (batch, 1))
        embeds, mask = embed(ids, _pixels(test, idx, pp), test_feats[idx])
        out = np.asarray(generate.greedy_generate(model, weights, None, mask, max_new, eos_token_id=eos,
                                                  pad_token_id=seqs.pad, inputs_embeds=embeds))[:n]
        for row in out:
            row = row.tolist()
            text = tok.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True)
            k = medmnist.match_answer(text, classnames)
            preds.append(-1 if k is None else k)
    return np.asarray(preds, np.int32)


# ----------------------------------------------------------------------------------------------------------
# Entry point.

def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    dc, mc, tc, sc = config.data, config.method, config.train, config.tsm
    cache_root = os.path.expanduser(os.environ.get("VLM_JAX_CACHE", "~/.cache/vlm_jax"))
    task = load_task(dc)
    num_classes = len(task.classnames)
    test = task.test
    if dc.test_limit and dc.test_limit < len(test):
        order = np.random.default_rng(config.rng_seed).permutation(len(test))[:dc.test_limit]
        test = [test[j] for j in sorted(order)]
    test_labels = np.array([e.label for e in test], np.int32)
    train_labels = np.array([e.label for e in task.train], np.int32)

    # Everything a user can get wrong is checked before the workdir gets anything (or a TSM trains for nothing).
    if mc.eval_mode not in ("likelihood", "generate", "both"):
        raise errors.UserError(f"method.eval_mode must be 'likelihood', 'generate' or 'both', got {mc.eval_mode!r}")
    from vlm_jax.programs import fewshot_clip
    clip_dir = fewshot_clip.resolve_checkpoint(sc.checkpoint, os.path.join(cache_root, "models"), "configs/vitask.py")
    texts = [dc.chat_template.replace("{}", task.instruction)] + task.responses + list(task.classnames)
    ckpt = llava_convert.resolve_checkpoint(config.model.checkpoint, os.path.join(cache_root, "models"), texts,
                                          "configs/vitask.py")

    os.makedirs(workdir, exist_ok=True)
    report.write_atomic(os.path.join(workdir, "config.json"), lambda f: f.write(config.to_json_best_effort(indent=1)))
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    repl = mesh_lib.replicated(mesh)
    writer = MetricWriter(workdir)
    rng = jax.random.key(config.rng_seed)
    rows: dict[str, dict[str, float]] = {}

    # ---- 1. TSM.
    clip_model, clip_params = clip_convert.from_pretrained(clip_dir, dtype=jnp.float32)
    tsm_model = tsm_lib.TSMClassifier(clip_model.vision, num_classes)
    tsm_params = tsm_lib.init_from_clip(tsm_model, clip_params, jax.random.fold_in(rng, 1))
    del clip_params
    clip_pp = preprocess.preprocess_settings(clip_dir)
    n_train = len(task.train)
    bs = _batch_size(sc.batch_size, n_train, mesh)
    all_true = np.ones((bs, num_classes), bool)

    def tsm_batches(epoch):
        order = np.random.default_rng([config.rng_seed, 1, epoch]).permutation(n_train)
        for i in range(n_train // bs):
            idx = order[i * bs:(i + 1) * bs]
            yield {"pixel_values": _pixels(task.train, idx, clip_pp), "labels": train_labels[idx],
                   "class_mask": all_true}

    fit = trainer.fit(loss_fn=tsm_lib.make_loss_fn(tsm_model), params=tsm_params,
                      param_groups=list(tsm_lib.PARAM_GROUPS), optim=sc.optim.to_dict(), num_epochs=sc.epochs,
                      steps_per_epoch=n_train // bs, epoch_batches=tsm_batches, mesh=mesh,
                      rng=jax.random.fold_in(rng, 2), workdir=workdir, writer=writer, name="tsm", log_every_s=10.0)
    tsm_params = jax.device_put(fit.best_params, repl)

    def tsm_pass(examples, fn):
        out, b = [], 32
        for i in range(0, len(examples), b):
            idx = list(range(i, min(i + b, len(examples))))
            n = len(idx)
            idx += [idx[0]] * (b - n)
            out.append(np.asarray(fn(tsm_model, tsm_params, _pixels(examples, idx, clip_pp)))[:n])
        return np.concatenate(out)

    tsm_pred = tsm_pass(test, lambda m, p, x: tsm_lib.predict(m, p, x, np.ones((x.shape[0], num_classes), bool)))
    rows["TSM"] = _metrics(tsm_pred, test_labels, num_classes)
    train_feats = tsm_pass(task.train, tsm_lib.exemplar_features).astype(np.float32)
    test_feats = tsm_pass(test, tsm_lib.exemplar_features).astype(np.float32)
    logging.info("TSM: %s", rows["TSM"])

    # ---- 2. LVLM.
    model, base = llava_convert.from_pretrained(ckpt, dtype=jnp.dtype(config.model.dtype))
    base = jax.device_put(base, repl)
    tok = tokenize.load_tokenizer(ckpt)
    pp = preprocess.preprocess_settings(ckpt)
    seqs = Seqs(tok, dc.chat_template, task.instruction, task.responses, model.cfg.tokens_per_image,
                model.cfg.image_token_id)
    width = base["language_model"]["model"]["embed_tokens"]["embedding"].shape[-1]
    connector = vitask.ExemplarConnector(out_dim=width, hidden_dim=mc.connector_hidden or None)
    forward = make_forward(model, connector, model.cfg.image_token_id)
    targets = [tuple(t) if isinstance(t, (list, tuple)) else t for t in mc.lora_targets]
    lora_kw = dict(lora_alpha=mc.lora_alpha, lora_rank=mc.lora_rank)
    logging.info("LLaVA %s: %d train / %d test, sequence length %d", ckpt, n_train, len(test), seqs.length)

    bs = _batch_size(tc.batch_size, n_train, mesh)
    steps = n_train // bs

    def lvlm_batches(seed, with_neg):
        def epoch_batches(epoch):
            order = np.random.default_rng([config.rng_seed, seed, epoch]).permutation(n_train)
            for i in range(steps):
                idx = order[i * bs:(i + 1) * bs]
                px = _pixels(task.train, idx, pp)
                b = {**seqs.rows(train_labels[idx]), "pixel_values": px, "feature": train_feats[idx]}
                if with_neg:
                    b["neg_pixel_values"] = px[negative_index(train_labels[idx])]
                yield b
        return epoch_batches

    def train(name, params, groups, stage, epochs, seed):
        loss_fn = make_loss_fn(forward, stage=stage, pad_id=seqs.pad, alpha=mc.alpha, beta=mc.beta,
                               rda_direction=mc.rda_direction, **lora_kw)
        f = trainer.fit(loss_fn=loss_fn, params=params, param_groups=groups, optim=tc.optim.to_dict(),
                        num_epochs=epochs, steps_per_epoch=steps, epoch_batches=lvlm_batches(seed, stage == 2),
                        mesh=mesh, rng=jax.random.fold_in(rng, seed), workdir=workdir, writer=writer, name=name,
                        log_every_s=10.0)
        return trainer.merge(jax.device_put(f.best_params, repl), params), f.history

    lora0 = peft.lora_init(base, jax.random.fold_in(rng, 3), targets=targets, rank=mc.lora_rank)
    conn0 = nn.meta.unbox(connector.init(jax.random.fold_in(rng, 4),
                                         jnp.zeros((1, train_feats.shape[1]), jnp.float32))["params"])
    # Vanilla baseline: L_van only, its own LoRA.
    van, h_van = train("vanilla", {"base": base, "lora": lora0}, [("lora/.*", 1.0)], None, mc.stage1_epochs, 10)
    # VITask stage 1: {'lora', 'connector'}; stage 2: + CRT, the connector frozen.
    p1, h1 = train("vitask_stage1", {"base": base, "lora": lora0, "connector": conn0},
                   [("lora/.*", 1.0), ("connector/.*", 1.0)], 1, mc.stage1_epochs, 11)
    sha1 = _sha(p1["connector"])
    h2 = []
    p2 = p1
    if mc.stage2_epochs:
        p2, h2 = train("vitask_stage2", p1, [("lora/.*", 1.0)], 2, mc.stage2_epochs, 12)
    sha2 = _sha(p2["connector"])

    # ---- 3. Evaluation by label-likelihood ranking.
    score = make_scorer(forward, **lora_kw)
    eb = max(1, int(dc.eval_batch_size))
    rk = lambda p, conn, ep: rank_labels(score, base, p["lora"], conn, seqs, test, test_feats, pp, eb, ep)
    dummy_conn = p2["connector"]
    variants = [("vanilla (L_van)", van, dummy_conn, False), ("VITask w/o EP", p2, p2["connector"], False),
                ("VITask w/ EP", p2, p2["connector"], True)]
    if mc.eval_mode in ("likelihood", "both"):
        for name, p, conn, ep in variants:
            rows[name] = _metrics(rk(p, conn, ep), test_labels, num_classes)
    if mc.eval_mode in ("generate", "both"):
        # Greedy answers matched to the label set; an unmatched answer counts as wrong.
        suffix = " [generated]" if mc.eval_mode == "both" else ""
        for name, p, conn, ep in variants:
            pred = generate_labels(model, connector, seqs, tok, list(task.classnames), base, p["lora"], conn, test,
                                   test_feats, pp, eb, ep, **lora_kw)
            rows[name + suffix] = {**_metrics(pred, test_labels, num_classes),
                                   "unmatched": 100.0 * float(np.mean(pred < 0))}
    for i, (name, r) in enumerate(rows.items()):
        writer.write(i, r, prefix=f"test/{name}/")
    writer.close()

    md = retrieval.format_table(rows, COLUMNS, title=f"VITask on {task.name}: test (%), {len(test)} images, "
                                                      f"{mc.eval_mode} evaluation, {os.path.basename(ckpt)}")
    out = {"checkpoint": ckpt, "tsm_checkpoint": clip_dir, "dataset": task.name, "num_classes": num_classes,
           "train_examples": n_train, "test_examples": len(test), "eval_mode": mc.eval_mode,
           "connector_sha256": {"stage1": sha1, "stage2": sha2},
           "history": {"tsm": fit.history, "vanilla": h_van, "stage1": h1, "stage2": h2}, "results": rows}
    report.write_atomic(os.path.join(workdir, "results.md"), lambda f: f.write(md))
    report.write_json(os.path.join(workdir, "results.json"), out)
    print("\n" + md, flush=True)
    return out
