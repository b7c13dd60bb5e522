"""Discriminative fine-tuning of an LVLM ("VladVA", arXiv 2412.04378): the LVLM as an image-text embedding model.

Data flow: config -> LVLM checkpoint (LLaVA, InternVL or Qwen2-VL: `convert.auto`) + tokenizer -> image-text pairs (JSONL manifest or the built-in photos)
-> `data.pairs` batches -> `methods.vladva` loss (InfoNCE on short captions + NTP on long ones, soft
prompts + LoRA, the base frozen) -> the generic trainer -> zero-shot retrieval recall@1/5/10 of the untrained
LVLM with handcrafted prompts (the E5-V baseline) and of the fine-tuned one -> workdir (results.json,
results.md, metrics.jsonl, checkpoints).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vlm_jax import config_utils, errors
from vlm_jax.convert import auto
from vlm_jax.data import captions as captions_lib
from vlm_jax.data import chat, lvlm_inputs, pairs, preprocess, tokenize
from vlm_jax.eval import retrieval
from vlm_jax.eval import suite as eval_suite
from vlm_jax.methods import vladva as disc
from vlm_jax.models import peft
from vlm_jax.models.llava import vision_inputs
from vlm_jax.programs import runner
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.train import evaluators, trainer
from vlm_jax.runtime import workdir as workdir_lib
from vlm_jax.runtime.metrics import MetricWriter

# Retrieval: R@1/R@5/R@10 both directions (the paper's tables report R@1 and R@10).
TABLE_COLUMNS = {"t2i_R@1": "T2I R@1", "t2i_R@5": "T2I R@5", "t2i_R@10": "T2I R@10",
                 "i2t_R@1": "I2T R@1", "i2t_R@5": "I2T R@5", "i2t_R@10": "I2T R@10",
                 "sugarcrepe/replace": "SugarCrepe replace", "sugarcrepe/replace_obj": "SugarCrepe replace-obj",
                 "sugarcrepe/average": "SugarCrepe avg", "winoground/text": "Wino text",
                 "winoground/image": "Wino image", "winoground/group": "Wino group",
                 "classification/accuracy": "zero-shot cls"}


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


def load_pairs(dc):
    """(train [(image, short, long)], extra texts for a toy tokenizer's corpus)."""
    if dc.name == "builtin":
        _, train, test = _builtin_pairs()
        return train, [c for _, c in test]
    tfds_name = dc.name[len("tfds:"):] if dc.name.startswith("tfds:") else None
    if not dc.manifest and not tfds_name:
        raise errors.UserError("discriminative fine-tuning needs --config.data.manifest=pairs.jsonl (lines of image, "
                               "short_caption, long_caption); or try --config=configs/vladva.py:runlocal")
    if not (dc.retrieval_json or dc.sugarcrepe or dc.winoground or dc.classification):
        raise errors.UserError("nothing to evaluate on: pass --config.data.retrieval_json (Karpathy format) and/or "
                               "--config.data.sugarcrepe, --config.data.winoground, --config.data.classification")
    if tfds_name:  # TFDS caption dataset (array_record), e.g. 'tfds:coco_captions'; images decode lazily.
        from vlm_jax.data import tfds_source
        got = tfds_source.tfds_caption_pairs(tfds_name, dc.get("tfds_data_dir") or None)
    else:
        got = captions_lib.read_manifest(dc.manifest, dc.image_root)
    train = [(p.image, p.short_caption, p.long_caption) for p in got]
    return train, []


# ----------------------------------------------------------------------------------------------------------
# Embedding functions for the evaluation suite.

def _source(item):
    return item.array if getattr(item, "array", None) is not None else getattr(item, "path", item)


def _load(item, pp) -> np.ndarray:
    return preprocess.preprocess_image(_source(item), pp)  # the LVLM's own processor settings


def _batched(fn, items, make, mesh, batch_size) -> np.ndarray:
    """fn(batch) over items in fixed-size (padded) batches sharded on the mesh; f32[len(items), D].

    Every process builds the same global batches and gets the whole result (gathered across processes).
    """
    out, div = [], mesh_lib.batch_divisor(mesh)
    bs = max(div, batch_size // div * div)
    for i in range(0, len(items), bs):
        chunk = list(items[i:i + bs])
        n = len(chunk)
        chunk += [chunk[0]] * (bs - n)  # one compiled shape
        out.append(mesh_lib.to_host(fn(mesh_lib.shard_batch(make(chunk), mesh)))[:n])
    return np.concatenate(out)


def embedding_fns(model, base, lora=None, lora_kw=None, image_prompt=None, text_prompt=None):
    """(image_fn(batch), text_fn(batch)) -> f32[B, D]: the LVLM's summary-token embeddings of `pairs.image_batch`
    / `pairs.text_batch` batches, with optional LoRA and soft prompts.

    LoRA is applied unmerged, exactly as the training forward applies it (`peft.LoraModel`): the model evaluated
    is the model trained, also with a bf16 base (a merge would round W + s A B to bf16).
    """
    # Trained prompts come back from the trainer as host (numpy) arrays; inside jit they must be jax arrays.
    image_prompt = None if image_prompt is None else jnp.asarray(image_prompt)
    text_prompt = None if text_prompt is None else jnp.asarray(text_prompt)
    if lora:
        model, params = peft.LoraModel(model, **lora_kw), {"base": base, "lora": lora}
    else:
        params = base

    @jax.jit
    def img_fn(params, batch):
        return disc.image_embedding(model, params, batch["input_ids"], batch["attention_mask"],
                                    vision_inputs(batch), prompt=image_prompt,
                                    prompt_start=None if image_prompt is None else batch["prompt_start"])

    @jax.jit
    def txt_fn(params, batch):
        return disc.text_embedding(model, params, batch["input_ids"], batch["attention_mask"], prompt=text_prompt,
                                   prompt_start=None if text_prompt is None else batch["prompt_start"])

    return (lambda batch: img_fn(params, batch)), (lambda batch: txt_fn(params, batch))


def lvlm_embedders(model, base, tokens, inputs: lvlm_inputs.LVLMInputs, mesh, batch_size, lora=None, lora_kw=None,
                   image_prompt=None, text_prompt=None):
    """(embed_images(items), embed_texts(captions)) for the evaluation suite; see `embedding_fns`. `inputs`: the
    checkpoint family's vision inputs."""
    img_fn, txt_fn = embedding_fns(model, base, lora, lora_kw, image_prompt, text_prompt)

    def embed_images(items):
        return _batched(img_fn, items, lambda xs: pairs.image_batch(tokens, inputs.load_batch([_source(x) for x in xs])),
                        mesh, batch_size)

    def embed_texts(texts):
        return _batched(txt_fn, texts, lambda cs: pairs.text_batch(tokens, cs), mesh, batch_size)

    return embed_images, embed_texts


# The evaluator types of config.evals (train/evaluators.py): 'suite', the zero-shot evaluation suite that makes
# the results table (retrieval, SugarCrepe, Winoground, classification: what data.* declares), on the model
# being trained.
EVALUATORS = ("suite",)


def evaluator_factories(suite, model, base, tokens, inputs, mesh, dc, mc) -> dict[str, Any]:
    """type -> () -> (trainable params -> the suite's flat metrics), for `evaluators.from_config`. `inputs`: the
    checkpoint family's vision inputs."""
    def suite_eval():
        def fn(trained):
            return eval_suite.evaluate(suite, *lvlm_embedders(
                model, base, tokens, inputs, mesh, dc.eval_batch_size, trained["lora"],
                dict(alpha=mc.lora_alpha, rank=mc.lora_rank), trained["image_prompt"], trained["text_prompt"]))
        return fn
    return {"suite": suite_eval}


def clip_embedders(checkpoint: str, mesh, batch_size):
    """(embed_images, embed_texts) of a dual encoder (HF CLIP / SigLIP, open_clip): the baseline on the same suite."""
    from vlm_jax.programs import fewshot_clip

    bb = fewshot_clip.Backbone(checkpoint, "float32", mesh)

    def embed_images(items):
        return _batched(lambda x: bb.encode_image(bb.params, x), items,
                        lambda xs: np.stack([_load(x, bb.pp) for x in xs]), mesh, batch_size)

    def embed_texts(texts):
        def make(cs):
            ids, mask = bb.enc.tokenize(cs)  # the checkpoint's own tokenizer and text length
            return np.stack([ids, mask], axis=1)
        return _batched(lambda t: bb.encode_text(bb.params, t), texts, make, mesh, batch_size)

    return embed_images, embed_texts


def build_suite(dc) -> eval_suite.Suite:
    if dc.name == "builtin":
        from vlm_jax.data import builtin
        return eval_suite.toy_suite(builtin.builtin_dataset())
    s = eval_suite.Suite()
    if dc.retrieval_json.startswith("tfds:"):  # every caption of each image of split retrieval_split
        from vlm_jax.data import tfds_source
        s.retrieval = tuple(tfds_source.tfds_retrieval_set(dc.retrieval_json[len("tfds:"):],
                                                           dc.get("tfds_data_dir") or None, split=dc.retrieval_split))
    elif dc.retrieval_json:
        rs = captions_lib.read_karpathy(dc.retrieval_json, dc.image_root, split=dc.retrieval_split)
        s.retrieval = (rs.image_paths, rs.captions, rs.caption_to_image)
    if dc.sugarcrepe:
        s.sugarcrepe = {k: [tuple(it) for it in v]
                        for k, v in captions_lib.read_sugarcrepe(dc.sugarcrepe, dc.sugarcrepe_images).items()}
    if dc.winoground:
        s.winoground = [(w.image_0, w.image_1, w.caption_0, w.caption_1)
                        for w in captions_lib.read_winoground(dc.winoground, dc.winoground_images)]
    if dc.classification:
        from vlm_jax.data import fewshot
        ds = fewshot.load_dataset(dc.classification, dc.classification_root)
        s.classification = (ds.test, np.array([e.label for e in ds.test], np.int32),
                            [ds.templates[0].format(c) for c in ds.classnames])
    return s


# ----------------------------------------------------------------------------------------------------------
# Entry point.

def prompt_tokens(ckpt: str, config, tok, inputs: lvlm_inputs.LVLMInputs) -> pairs.Tokens:
    """The run's prompt format from the checkpoint (its chat template unless model.chat_template is set), the
    image placeholder expanded to the family's image token run."""
    mc, dc = config.method, config.data
    fmt = inputs.chat_format(tok, chat.load_chat_template(ckpt, config.model.chat_template, tok))
    spec = pairs.PromptSpec(image_prompt=mc.image_prompt, text_prompt=mc.text_prompt,
                            short_max_tokens=mc.short_max_tokens, text_len=dc.text_len, long_len=dc.long_len)
    return pairs.Tokens(fmt, spec)


def check_lengths(tokens: pairs.Tokens, dc, longs) -> int:
    """The long-caption row length: data.long_len, or (0) the image prompt + the longest long caption's tokens
    (answer separator and EOS included) capped at data.long_caption_max_tokens. A length that cannot hold the
    image prompt plus a caption token, or a text_len that cannot hold the text prompt, is a UserError naming the
    key and a value that works — before anything is evaluated or trained."""
    n_image = len(tokens.image_row()[0])
    cap = int(dc.long_caption_max_tokens)
    if cap < 1:
        raise errors.UserError(f"data.long_caption_max_tokens must be >= 1, got {cap}")
    # One batched tokenizer call over the captions (a real set has millions); a caption's answer differs from its
    # own token count by the separator / EOS and at most a merge at the boundary, so only the captions within two
    # tokens of the longest need the exact (rendered, whole-prompt) count.
    need = 1
    if longs:
        counts = np.array([len(ids) for ids in tokens.tok(list(longs), add_special_tokens=False)["input_ids"]])
        longest = [longs[i] for i in np.flatnonzero(counts >= counts.max() - 2)[:64]]
        need = max(len(tokens.fmt.answer_ids(tokens.spec.image_prompt, True, c)) for c in longest)
    need = min(need, cap)
    if int(dc.long_len) == 0:
        long_len = n_image + need
    else:
        long_len = int(dc.long_len)
        if long_len < n_image + 1:
            raise errors.UserError(
                f"data.long_len={long_len} cannot hold the {n_image} tokens of the image prompt "
                f"({tokens.fmt.tokens_per_image} image tokens) and a caption: use data.long_len={n_image + need} "
                f"(or 0: derived from the data)")
    tokens.text_row("a")  # raises when data.text_len leaves no room for a caption next to the text prompt
    return long_len


def initial_params(base, tokens: pairs.Tokens, mc, rng) -> dict[str, Any]:
    """VladVA's trainable params beside the frozen base: soft prompts initialised from the handcrafted prompts'
    embeddings, LoRA on `method.lora_targets`, and the log temperature when it is learned."""
    table = base["language_model"]["model"]["embed_tokens"]["embedding"]
    params = {"base": base,
              "lora": peft.lora_init(base, rng, targets=[tuple(t) if isinstance(t, (list, tuple)) else t
                                                         for t in mc.lora_targets], rank=mc.lora_rank),
              "image_prompt": peft.soft_prompt_init(table, jnp.asarray(tokens.image_prompt)),
              "text_prompt": peft.soft_prompt_init(table, jnp.asarray(tokens.text_prompt))}
    if mc.learn_temperature:
        params["log_temperature"] = disc.init_log_temperature(mc.temperature)
    return params


def _limit(train_pairs, limit: int, seed: int):
    """data.train_limit: the (sorted) first `limit` of a fixed permutation of the pairs (0 = all)."""
    if limit < 0:
        raise errors.UserError(f"data.train_limit must be >= 0 (0 = all), got {limit}")
    if limit and limit < len(train_pairs):
        keep = np.sort(np.random.default_rng([seed, 1]).permutation(len(train_pairs))[:limit])
        train_pairs = [train_pairs[i] for i in keep]
    return train_pairs


def train_data(config) -> tuple[list, list[str]]:
    """The training pairs [(image, short, long)] after data.train_limit, and the extra texts of a toy tokenizer's
    corpus (the retrieval captions of the built-in set), as (pairs, texts)."""
    train_pairs, extra_texts = load_pairs(config.data)
    return _limit(train_pairs, int(config.data.get("train_limit", 0)), config.rng_seed), extra_texts


def resolve_checkpoints(config, data) -> tuple[str, str | None]:
    """(LVLM checkpoint directory, CLIP baseline's or None) as `runner.resolve_checkpoint` finds them; an offline
    replica's tokenizer is trained on the run's prompts and captions (`data`: what `train_data` returns)."""
    mc, (train_pairs, extra_texts) = config.method, data
    texts = [mc.image_prompt, mc.text_prompt] + [c for _, s, l in train_pairs for c in (s, l) if c] + extra_texts
    ckpt = runner.resolve_checkpoint(config.model.checkpoint, "configs/vladva.py", texts)
    clip_ckpt = None
    if config.clip_checkpoint:
        clip_ckpt = runner.resolve_checkpoint(config.clip_checkpoint, "configs/vladva.py")
    return ckpt, clip_ckpt


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Baselines (CLIP, the untrained LVLM) -> VladVA training -> the evaluation suite -> results."""
    dc, mc, tc = config.data, config.method, config.train
    config_utils.check_ranges(config, {
        "train.epochs": 1, "train.batch_size": 1, "train.optim.lr": 0, "data.eval_batch_size": 1, "data.text_len": 2,
        "data.long_len": 0, "data.train_limit": 0, "method.lora_rank": 1, "method.temperature": 1e-6,
        "method.short_max_tokens": 1, "train.grad_cache_chunks": 1, "method.ntp_weight": 0})
    data = train_data(config)
    train_pairs = data[0]
    suite = build_suite(dc)  # reads every evaluation file now: a bad path fails before any work
    ckpt, clip_ckpt = resolve_checkpoints(config, data)

    # Everything the config and the checkpoint must agree on, before the workdir gets anything.
    cfg = auto.lvlm_config(ckpt)
    tok = tokenize.load_tokenizer(ckpt)
    inputs = lvlm_inputs.for_checkpoint(ckpt, cfg, tok, config.model.get("image_size", 0))
    tokens = prompt_tokens(ckpt, config, tok, inputs)
    split = [pairs.split_captions(tokens, (s, l)) for _, s, l in train_pairs]
    long_len = check_lengths(tokens, dc, [l for _, l in split if l])
    tokens = pairs.Tokens(tokens.fmt, dataclasses.replace(tokens.spec, long_len=long_len))
    mesh, rules = runner.make_mesh(config)   # config.mesh, config.mesh_rules
    evaluators.check(config.get("evals"), dict.fromkeys(EVALUATORS, lambda: None))
    n, div = len(train_pairs), mesh_lib.batch_divisor(mesh)
    bs = runner.batch_size(tc.batch_size, n, mesh)
    k = tc.grad_cache_chunks
    if k < 1 or bs % (k * div):  # GradCache chunks split each device's rows
        raise errors.UserError(f"train.grad_cache_chunks={k} needs a training batch ({bs}) divisible by {k} x the "
                               f"{div} data-parallel devices: change train.batch_size or train.grad_cache_chunks")
    steps_per_epoch = n // bs

    workdir_lib.prepare(workdir, config)   # config.json; refuses a changed config on a resumed workdir
    # Sharded by logical axes as it streams in (`runner.load_lvlm`); the trainer keeps this layout.
    model, base = runner.load_lvlm(ckpt, config.model, mesh, rules)
    logging.info("%s %s: %d train pairs, %d image tokens per image, rows: image %d, text %d, long %d tokens",
                 inputs.family, ckpt, n, inputs.tokens_per_image, len(tokens.image_row()[0]), dc.text_len, long_len)

    rows: dict[str, dict[str, float]] = {}
    if clip_ckpt:
        rows["CLIP"] = eval_suite.evaluate(suite, *clip_embedders(clip_ckpt, mesh, dc.eval_batch_size))
    # The E5-V baseline: the untrained LVLM with the handcrafted prompts.
    rows["LVLM + handcrafted prompts (E5-V style)"] = eval_suite.evaluate(
        suite, *lvlm_embedders(model, base, tokens, inputs, mesh, dc.eval_batch_size))

    rng = jax.random.key(config.rng_seed)
    params = initial_params(base, tokens, mc, rng)
    loss_fn = disc.make_loss_fn(model, lora_alpha=mc.lora_alpha, lora_rank=mc.lora_rank, temperature=mc.temperature,
                                ntp_weight=mc.ntp_weight, grad_cache_chunks=k)

    def make_batch(idx, epoch, i):
        images = inputs.load_batch([_source(train_pairs[j][0]) for j in idx])
        return pairs.train_batch(tokens, images, [split[j][0] for j in idx], [split[j][1] for j in idx])
    epoch_batches = runner.epoch_batches(n, bs, [config.rng_seed], make_batch, mesh=mesh)

    writer = MetricWriter.for_run(workdir, config)
    fit = trainer.fit(loss_fn=loss_fn, params=params, param_groups=[tuple(g) for g in tc.param_groups],
                      optim=tc.optim.to_dict(), num_epochs=tc.epochs, steps_per_epoch=steps_per_epoch,
                      epoch_batches=epoch_batches, mesh=mesh, rng=rng, workdir=workdir, writer=writer,
                      name="vladva", log_every_s=10.0,
                      checkpoint_every_steps=tc.get("checkpoint_every_steps", 0),
                      evals=evaluators.from_config(config.get("evals"), evaluator_factories(
                          suite, model, base, tokens, inputs, mesh, dc, mc)))
    writer.close()
    trained = fit.best_params
    rows["VladVA (soft prompts + LoRA)"] = eval_suite.evaluate(suite, *lvlm_embedders(
        model, base, tokens, inputs, mesh, dc.eval_batch_size, trained["lora"],
        dict(alpha=mc.lora_alpha, rank=mc.lora_rank), trained["image_prompt"], trained["text_prompt"]))

    present = set().union(*(r.keys() for r in rows.values()))
    metrics = {k: h for k, h in TABLE_COLUMNS.items() if k in present}
    md = retrieval.format_table(rows, metrics, title=f"zero-shot evaluation (%), {os.path.basename(ckpt)}")
    out = {"checkpoint": ckpt, "train_pairs": n, "long_len": long_len, "history": fit.history, "results": rows}
    return runner.write_results(workdir, md, out)
