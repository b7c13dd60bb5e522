"""Discriminative fine-tuning of an LVLM ("VladVA", arXiv 2412.04378): the LVLM as an image-text embedding model.

Data flow: config -> LLaVA checkpoint + tokenizer -> image-text pairs (JSONL manifest or the built-in photos)
-> `data.pairs` batches -> `methods.discriminative` loss (InfoNCE on short captions + NTP on long ones, soft
prompts + LoRA, the base frozen) -> the generic trainer -> zero-shot retrieval recall@1/5/10 of the untrained
LVLM with handcrafted prompts (the E5-V baseline) and of the fine-tuned one -> workdir (results.json,
results.md, metrics.jsonl, checkpoints).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vlm_jax import errors
from vlm_jax.convert import llava as llava_convert
from vlm_jax.convert import loader
from vlm_jax.data import captions as captions_lib
from vlm_jax.data import features as feats
from vlm_jax.data import pairs, preprocess, tokenize
from vlm_jax.eval import report, retrieval
from vlm_jax.methods import discriminative as disc
from vlm_jax.models import peft
from vlm_jax.train import mesh as mesh_lib
from vlm_jax.train import trainer
from vlm_jax.train.metrics import MetricWriter

BUILTIN_CHECKPOINT = "builtin:tiny-llava"


# ----------------------------------------------------------------------------------------------------------
# Inputs.

def _builtin_pairs():
    """Train pairs and a retrieval set from the built-in photos: short 'a photo of a X.', long = descriptions."""
    from vlm_jax.data import builtin
    ds = builtin.builtin_dataset()
    long = {c: " ".join(p) for c, p in zip(ds.classnames, ds.cupl_prompts)}
    train = [(ex, f"a photo of a {ex.classname}.", long[ex.classname]) for ex in ds.train]
    # Retrieval: one test image per class, its caption — an unambiguous 10 x 10 toy set.
    seen, test = set(), []
    for ex in ds.test:
        if ex.label not in seen:
            seen.add(ex.label)
            test.append((ex, f"a photo of a {ex.classname}."))
    return ds, train, test


def resolve_checkpoint(spec: str, cache_root: str, texts) -> str:
    if spec == BUILTIN_CHECKPOINT:
        path = os.path.join(cache_root, "tiny-llava-v1")
        if not os.path.exists(os.path.join(path, "config.json")):
            llava_convert.write_random_checkpoint(path, texts, image_size=32, patch_size=8)
        return path
    try:
        return str(loader.resolve_checkpoint(spec))
    except errors.UserError as e:
        raise errors.UserError(f"{e} (or try the offline default: --config=configs/discriminative.py:runlocal)") \
            from None


def load_pairs(dc):
    """(train [(image, short, long)], test [(image, caption)]); images are Examples or paths."""
    if dc.name == "builtin":
        _, train, test = _builtin_pairs()
        return train, test
    if not dc.manifest or not dc.retrieval_json:
        raise errors.UserError("discriminative fine-tuning needs --config.data.manifest=pairs.jsonl (image, "
                               "short_caption, long_caption) and --config.data.retrieval_json=dataset_flickr30k.json "
                               "(Karpathy format) with --config.data.image_root; or try "
                               "--config=configs/discriminative.py:runlocal")
    train = [(p.image, p.short_caption, p.long_caption) for p in captions_lib.read_manifest(dc.manifest, dc.image_root)]
    rs = captions_lib.read_karpathy(dc.retrieval_json, dc.image_root, split=dc.retrieval_split)
    test = [(rs.image_paths[i], rs.captions[j]) for j, i in enumerate(rs.caption_to_image)]
    return train, test


# ----------------------------------------------------------------------------------------------------------
# Embeddings for evaluation.

def _load(item, pp) -> np.ndarray:
    src = item.array if getattr(item, "array", None) is not None else getattr(item, "path", item)
    return preprocess.clip_preprocess(preprocess.load_image(src), **pp)


def embed_retrieval_set(model, params, tokens, test, pp, mesh, batch_size, image_prompt=None, text_prompt=None):
    """(image embeddings f32[I, D], text embeddings f32[T, D], caption_to_image i32[T]) of the test pairs."""
    images = list(dict.fromkeys(id(x) if not isinstance(x, str) else x for x, _ in test))
    first = {}
    for x, _ in test:
        first.setdefault(id(x) if not isinstance(x, str) else x, x)
    c2i = np.array([images.index(id(x) if not isinstance(x, str) else x) for x, _ in test], np.int32)
    # Trained prompts come back from the trainer as host (numpy) arrays; inside jit they must be jax arrays.
    image_prompt = None if image_prompt is None else jnp.asarray(image_prompt)
    text_prompt = None if text_prompt is None else jnp.asarray(text_prompt)

    @jax.jit
    def img_fn(p, batch):
        return disc.image_embedding(model, p, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                    prompt=image_prompt, prompt_start=batch["prompt_start"] if image_prompt
                                    is not None else None)

    @jax.jit
    def txt_fn(p, batch):
        return disc.text_embedding(model, p, batch["input_ids"], batch["attention_mask"], prompt=text_prompt,
                                   prompt_start=batch["prompt_start"] if text_prompt is not None else None)

    def run(fn, items, make):
        out = []
        div = mesh_lib.batch_divisor(mesh)
        bs = max(div, batch_size // div * div)
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            n = len(chunk)
            chunk = chunk + [chunk[0]] * (bs - n)  # one compiled shape
            out.append(np.asarray(fn(params, mesh_lib.shard_batch(make(chunk), mesh)))[:n])
        return np.concatenate(out)

    img = run(img_fn, [first[k] for k in images], lambda xs: pairs.image_batch(tokens, np.stack([_load(x, pp) for x in xs])))
    txt = run(txt_fn, [c for _, c in test], lambda cs: pairs.text_batch(tokens, cs))
    return img, txt, c2i


# ----------------------------------------------------------------------------------------------------------
# Entry point.

def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    dc, mc, tc = config.data, config.method, config.train
    cache_root = os.path.expanduser(os.environ.get("VLM_JAX_CACHE", "~/.cache/vlm_jax"))
    train_pairs, test = load_pairs(dc)
    texts = [mc.chat_template.replace("{}", mc.image_prompt), mc.chat_template.replace("{}", mc.text_prompt)]
    texts += [c for _, s, l in train_pairs for c in (s, l) if c] + [c for _, c in test]
    ckpt = resolve_checkpoint(config.model.checkpoint, os.path.join(cache_root, "models"), texts)

    os.makedirs(workdir, exist_ok=True)
    report.write_atomic(os.path.join(workdir, "config.json"), lambda f: f.write(config.to_json_best_effort(indent=1)))
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    model, base = llava_convert.from_pretrained(ckpt, dtype=jnp.dtype(config.model.dtype))
    base = jax.device_put(base, mesh_lib.replicated(mesh))
    tok = tokenize.load_tokenizer(ckpt)
    pp = preprocess.preprocess_settings(ckpt)
    spec = pairs.PromptSpec(chat_template=mc.chat_template, image_prompt=mc.image_prompt, text_prompt=mc.text_prompt,
                            tokens_per_image=model.cfg.tokens_per_image, image_token_id=model.cfg.image_token_id,
                            short_max_tokens=mc.short_max_tokens, text_len=dc.text_len, long_len=dc.long_len)
    tokens = pairs.Tokens(tok, spec)
    logging.info("LLaVA %s: %d train pairs, %d test captions, %d image tokens per image", ckpt, len(train_pairs),
                 len(test), spec.tokens_per_image)

    rows: dict[str, dict[str, float]] = {}
    # The E5-V baseline: the untrained LVLM with the handcrafted prompts.
    img, txt, c2i = embed_retrieval_set(model, base, tokens, test, pp, mesh, dc.batch_size)
    rows["LVLM + handcrafted prompts (E5-V style)"] = retrieval.retrieval_recall(img, txt, c2i)

    # VladVA: soft prompts (initialised from the handcrafted prompts' embeddings) + LoRA; the base frozen.
    table = base["language_model"]["model"]["embed_tokens"]["embedding"]
    rng = jax.random.key(config.rng_seed)
    params = {"base": base,
              "lora": peft.lora_init(base, rng, targets=[tuple(t) if isinstance(t, (list, tuple)) else t
                                                         for t in mc.lora_targets], rank=mc.lora_rank),
              "image_prompt": peft.soft_prompt_init(table, jnp.asarray(tokens.image_prompt)),
              "text_prompt": peft.soft_prompt_init(table, jnp.asarray(tokens.text_prompt))}
    if mc.learn_temperature:
        params["log_temperature"] = disc.init_log_temperature(mc.temperature)
    loss_fn = disc.make_loss_fn(model, lora_alpha=mc.lora_alpha, lora_rank=mc.lora_rank, temperature=mc.temperature,
                                ntp_weight=mc.ntp_weight)

    split = [pairs.split_captions(tokens, (s, l)) for _, s, l in train_pairs]
    n, div = len(train_pairs), mesh_lib.batch_divisor(mesh)
    bs = max(div, min(tc.batch_size, n) // div * div)
    steps_per_epoch = n // bs

    def epoch_batches(epoch):
        order = np.random.default_rng([config.rng_seed, epoch]).permutation(n)
        for i in range(steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            images = np.stack(list(feats._POOL.map(lambda j: _load(train_pairs[j][0], pp), idx)))
            yield pairs.train_batch(tokens, images, [split[j][0] for j in idx], [split[j][1] for j in idx])

    writer = MetricWriter(workdir)
    fit = trainer.fit(loss_fn=loss_fn, params=params, param_groups=[tuple(g) for g in tc.param_groups],
                      optim=tc.optim.to_dict(), num_epochs=tc.epochs, steps_per_epoch=steps_per_epoch,
                      epoch_batches=epoch_batches, mesh=mesh, rng=rng, workdir=workdir, writer=writer,
                      name="vladva", log_every_s=10.0)
    writer.close()
    trained = fit.best_params
    weights = peft.lora_merge(base, trained["lora"], alpha=mc.lora_alpha, rank=mc.lora_rank)
    img, txt, c2i = embed_retrieval_set(model, weights, tokens, test, pp, mesh, dc.batch_size,
                                        image_prompt=trained["image_prompt"], text_prompt=trained["text_prompt"])
    rows["VladVA (soft prompts + LoRA)"] = retrieval.retrieval_recall(img, txt, c2i)

    metrics = {f"{d}_R@{k}": f"{d} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    md = retrieval.format_table(rows, metrics, title=f"zero-shot retrieval, {len(set(c2i.tolist()))} images / "
                                                      f"{len(c2i)} captions, {os.path.basename(ckpt)}")
    out = {"checkpoint": ckpt, "train_pairs": n, "history": fit.history, "retrieval": rows}
    report.write_atomic(os.path.join(workdir, "results.md"), lambda f: f.write(md))
    report.write_json(os.path.join(workdir, "results.json"), out)
    print("\n" + md, flush=True)
    return out
