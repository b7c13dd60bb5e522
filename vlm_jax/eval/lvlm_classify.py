"""Classification with an LVLM, each sample among its own dataset's labels: by label likelihood (every label
answer scored against a KV cache of the prompt) or by greedy generation matched to the label set.

Both take a `vitask_tasks.Split` of a `JointTask` and return (pred bool[N, C] in the joint label space, valid
bool[N]); `pixels_of(idx)` gives the split's rows' vision arrays through the LVLM's image processor (a dict by HF
name, `data.lvlm_inputs`, or LLaVA's bare f32[b, H, W, 3]). Any LVLM family: Qwen2-VL's prompts are prefilled at
their M-RoPE positions (`model.positions`) and decoded with its `MRopeCache`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import logging

from vlm_jax.data import features as feats
from vlm_jax.data import medmnist, vitask_tasks


def rank_labels(rank, weights, conn, seqs: vitask_tasks.Seqs, table, task: vitask_tasks.JointTask, split: vitask_tasks.Split,
                rows: Sequence[int], split_feats: np.ndarray, pixels_of, batch: int, use_ep: bool):
    """Label-likelihood predictions of `rows` of `split`, each among its own dataset's labels.

    Args:
      rank: `make_ranker(...)`; table: `seqs.answer_table(<each dataset's label responses>)`.

    Returns:
      (pred bool[N, C] one-hot in the joint label space, valid bool[N]: True on `rows`).
    """
    pred = np.zeros((len(split), task.num_classes), bool)
    valid = np.zeros(len(split), bool)
    for idx, n in feats.padded_chunks(rows, batch):
        s = label_scores(rank, weights, conn, seqs, table, split, idx, split_feats, pixels_of, use_ep)
        best = task.offsets[split.dataset[idx]] + np.argmax(s, axis=1)
        pred[idx[:n], best[:n]] = True
        valid[idx[:n]] = True
    return pred, valid


def label_scores(rank, weights, conn, seqs: vitask_tasks.Seqs, table, split: vitask_tasks.Split, idx: np.ndarray,
                 split_feats: np.ndarray, pixels_of, use_ep: bool) -> np.ndarray:
    """f32[b, K]: log p(label answer | image, instruction [, exemplar]) of rows `idx` of `split` for each label of
    their own dataset (-inf past its labels; K = the most labels of a dataset)."""
    ans_ids, ans_mask = table
    ds = split.dataset[idx]
    ids, mask = seqs.prompt_rows(ds)
    s = np.asarray(rank(weights, conn, ids, mask, pixels_of(idx), split_feats[idx], ans_ids[ds], ans_mask[ds],
                        use_ep=use_ep))
    return np.where(ans_mask[ds][:, :, 0] > 0, s, -np.inf)  # only the sample's own dataset's labels


def generate_answers(model, embed, seqs: vitask_tasks.Seqs, tok, split: vitask_tasks.Split, weights, conn,
                     split_feats: np.ndarray, pixels_of, batch: int, use_ep: bool) -> list[str]:
    """The greedy answers (decoded text) to every row of `split`, each with its own dataset's instruction."""
    from vlm_jax.models import generate

    max_new = seqs.answer_length + 2
    eos = tok.eos_token_id
    texts = []
    for idx, n in feats.padded_chunks(range(len(split)), batch):
        ids, mask = seqs.prompt_rows(split.dataset[idx])
        embeds, mask, positions = embed(weights, conn, ids, mask, pixels_of(idx), split_feats[idx],
                                        use_ep=use_ep)
        out = np.asarray(generate.greedy_generate(model, weights, None, mask, max_new, eos_token_id=eos,
                                                  pad_token_id=seqs.pad, inputs_embeds=embeds,
                                                  positions=positions))
        for row in out[:n]:
            row = row.tolist()
            texts.append(tok.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True))
    return texts


def generate_labels(model, embed, seqs: vitask_tasks.Seqs, tok, task: vitask_tasks.JointTask, split: vitask_tasks.Split,
                    weights, conn, split_feats: np.ndarray, pixels_of, batch: int, use_ep: bool):
    """Predictions from greedy answers matched to each sample's own dataset's label set.

    Prompts are left-padded to one length (`Seqs.prompt_rows`), so a batch may mix datasets; with EP the exemplar
    token goes after the image tokens. Decoding runs with the KV cache of `models.generate`. A single-label answer
    is matched with `medmnist.match_answer`, a multi-label one with `medmnist.match_label_set`.

    Returns:
      (pred bool[N, C] label sets in the joint label space, valid bool[N]: False where the answer is unmatched).
    """
    texts = generate_answers(model, embed, seqs, tok, split, weights, conn, split_feats, pixels_of, batch, use_ep)
    pred = np.zeros((len(split), task.num_classes), bool)
    valid = np.zeros(len(split), bool)
    shown = texts[:3]
    for i, (d, text) in enumerate(zip(split.dataset, texts)):
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
