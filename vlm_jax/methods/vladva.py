"""Discriminative fine-tuning of LVLMs ("VladVA", arXiv 2412.04378) as pure functions.

The LVLM itself is the encoder (E5-V style): an image is embedded as the final-layer (final-norm) hidden state
of the last real token of [image + image prompt], a caption as that of [caption + text prompt] run through the
LM alone. Training combines a symmetric InfoNCE on short captions (< 30 tokens) with a next-token loss on long
captions (>= 30 tokens) generated after [image + image prompt]; contrastive learning on long captions collapses
(too few hard negatives). What trains: separate soft prompts for the image and the text side, initialised from
the handcrafted prompts' token embeddings (`peft.soft_prompt_init`), and LoRA on the LM's linear layers;
everything else is frozen. Layer, prompts, temperature and the loss weight are not published: we use E5-V's
(final layer, the prompts below, fixed temperature 0.05) and a loss weight of 1.

Composition inside a jitted loss (what `make_loss_fn` does):

    params = peft.lora_merge(base, lora, alpha=alpha, rank=rank)      # differentiable in `lora` only
    img = image_embedding(model, params, ids, mask, pixels, prompt=image_prompt, prompt_start=start)
    txt = text_embedding(model, params, text_ids, text_mask, prompt=text_prompt, prompt_start=text_start)
    loss, metrics = info_nce(img, txt, temperature=0.05, valid=has_short)

Prompts: the image prompt is the text after the image in the user turn, the text prompt a user turn with
`<sent>` for the caption; the data pipeline (`data.pairs`, `data.chat`) renders them with the checkpoint's chat
template and tokenizes them whole, as the HF processor does (LLaVA-1.5: 'USER: <image>\nSummary above image in
one word: ASSISTANT:', E5-V's prompt), and finds the soft-prompt span from character offsets (`*_prompt_start`).
Soft prompts replace that span in place (`peft.replace_span`), so shapes, masks and positions never change and
an untrained prompt reproduces the handcrafted one exactly.

Distribution: every function is written on the *global* batch. Under `jax.jit` with the batch sharded over the
mesh's ('data', 'fsdp') axes, the [B, B] similarity matrix of `info_nce` spans the global batch: XLA's SPMD
partitioner inserts the all-gather of the embeddings itself, so every shard's pairs are negatives for every
other shard's (the "gather negatives from all GPUs" of CLIP-style training, with no hand-written collective).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import peft
from vlm_jax.models.llava import VISION_KEYS, vision_inputs

PyTree = Any

# E5-V's prompts (the closest public method; VladVA's are not published).
IMAGE_PROMPT = "Summary above image in one word:"  # after the image, which the chat template places
TEXT_PROMPT = "<sent>\nSummary above sentence in one word:"
DEFAULT_TEMPERATURE = 0.05  # E5-V (fixed); VLM2Vec uses 0.02
SHORT_CAPTION_MAX_TOKENS = 30  # captions shorter than this feed the contrastive loss, the others the NTP loss
# CLIP clamps its learnable logit scale 1 / T at 100, i.e. T >= 0.01.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 1.0
# LoRA on every linear layer of the LM (VladVA: rank 16, alpha 16). o_proj's kernel is f32[H, Dh, D]: two input axes.
LORA_TARGETS = (r"language_model/.*/(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj)/kernel",
                (r"language_model/.*/o_proj/kernel", 2))
# Stands in for -inf on padded columns: exp underflows to exactly 0, yet a fully padded batch stays NaN-free.
_NEG = -1e9


# ----------------------------------------------------------------------------------------------------------
# Embeddings.

def last_token_embedding(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Hidden state of the last real token of each row.

    Args:
      hidden: f32[B, L, D] final-norm hidden states.
      attention_mask: i32[B, L], 1 = token; right- or left-padded (the position of the last 1 is taken, so
        both layouts work). An all-zero row yields position L - 1.

    Returns:
      f32[B, D].
    """
    length = attention_mask.shape[1]
    last = length - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def _embed(model, params, embeds, attention_mask, prompt, prompt_start, positions=None):
    if prompt is not None:
        if prompt_start is None:
            raise ValueError("a soft prompt needs prompt_start (e.g. peft.find_span of the handcrafted prompt)")
        embeds = peft.replace_span(embeds, prompt_start, prompt)
    hidden, _ = model.apply({"params": params}, None, attention_mask, inputs_embeds=embeds, positions=positions,
                            method="hidden_states")
    return last_token_embedding(hidden, attention_mask)


def multimodal_inputs(model, params: PyTree, input_ids: jax.Array, attention_mask: jax.Array,
                      vision: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
    """(f32[B, L, D] embeddings with the images spliced in, the rotary positions or None) of image rows: the LVLM
    interface (`models.llava.ImageTokenLVLM`) for any family; `vision` = the batch's arrays by HF name."""
    embeds = model.apply({"params": params}, input_ids, method="embed_multimodal", **vision)
    return embeds, model.positions(input_ids, attention_mask, **vision)


def image_embedding(model, params: PyTree, input_ids: jax.Array, attention_mask: jax.Array,
                    vision: Mapping[str, jax.Array], *, prompt: jax.Array | None = None,
                    prompt_start: jax.Array | None = None) -> jax.Array:
    """Image embedding: the LVLM over [image + image prompt], last real token's final-norm hidden state.

    Args:
      model: an LVLM of `convert.auto` (LLaVA, InternVL, Qwen2-VL).
      params: its params (LoRA already merged by the caller if any: `peft.lora_merge` inside the loss).
      input_ids: i32[B, L] with each row's image token run (processor-expanded placeholder).
      attention_mask: i32[B, L].
      vision: the rows' vision arrays by HF name, one image per row (`data.lvlm_inputs`): pixel_values
        f32[B, H, W, 3] for LLaVA, f32[B, tiles, H, W, 3] for InternVL, f32[B, P, C*T*P*P] (+ image_grid_thw
        i32[B, 3]) for Qwen2-VL.
      prompt: f32[P, D] (or f32[B, P, D]) soft image prompt, or None for the handcrafted tokens as they are.
      prompt_start: i32[B] start of the prompt span per row (-1: leave the row unchanged).

    Returns:
      f32[B, D] (not normalised).
    """
    if not isinstance(vision, Mapping):  # a bare pixel array (LLaVA / InternVL)
        vision = {"pixel_values": vision}
    embeds, positions = multimodal_inputs(model, params, input_ids, attention_mask, vision)
    return _embed(model, params, embeds, attention_mask, prompt, prompt_start, positions)


def text_embedding(model, params: PyTree, input_ids: jax.Array, attention_mask: jax.Array, *,
                   prompt: jax.Array | None = None, prompt_start: jax.Array | None = None) -> jax.Array:
    """Text embedding: the LM alone over [caption + text prompt], last real token's final-norm hidden state.

    Args:
      model: an LVLM (its LM is used; the vision tower never runs) or a `CausalLM`.
      params: its params (LoRA merged by the caller if any).
      input_ids, attention_mask: i32[B, L] a caption's chat-templated TEXT_PROMPT (`data.pairs`).
      prompt, prompt_start: as `image_embedding`, with the text side's soft prompt.

    Returns:
      f32[B, D].
    """
    embeds = model.apply({"params": params}, input_ids, method="embed")
    return _embed(model, params, embeds, attention_mask, prompt, prompt_start)


# ----------------------------------------------------------------------------------------------------------
# Losses.

def init_log_temperature(temperature: float = DEFAULT_TEMPERATURE) -> jax.Array:
    """f32[] log T, a learnable temperature parameter (CLIP learns log(1 / T); same thing, sign flipped)."""
    return jnp.asarray(np.log(temperature), jnp.float32)


def temperature_from_log(log_temperature: jax.Array, min_temperature: float = MIN_TEMPERATURE,
                         max_temperature: float = MAX_TEMPERATURE) -> jax.Array:
    """T = clip(exp(log T), min, max), CLIP-style (CLIP caps the logit scale 1 / T at 100, i.e. T >= 0.01).

    Clipping in the forward pass (rather than clamping the parameter after the step, as CLIP's reference
    does) gives the same values and stops the gradient while T sits at a bound.
    """
    return jnp.clip(jnp.exp(log_temperature), min_temperature, max_temperature)


def info_nce(image_emb: jax.Array, text_emb: jax.Array, *, temperature: float | jax.Array = DEFAULT_TEMPERATURE,
             valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE on cosine similarities (CLIP's loss): mean of image->text and text->image CE.

    Written on the global batch: under `jax.jit` with the embeddings sharded over the mesh's batch axes, the
    similarity matrix below still spans the whole global batch — XLA all-gathers what the matmul needs — so
    every pair's negatives come from all shards, with no manual `all_gather` (which would only be needed
    inside `shard_map`). The value is the same as on one device.

    Args:
      image_emb: f32[B, D] image embeddings (L2-normalised here).
      text_emb: f32[B, D] text embeddings; row i is the positive of image row i.
      temperature: T, a float or f32[] (e.g. `temperature_from_log(params['log_temperature'])`); logits are
        cos / T.
      valid: bool[B] or None. Invalid (padded) pairs are dropped from the average *and* as negatives: their
        columns get a logit of -1e9 (effectively -inf; finite so that an all-padded batch gives 0, not NaN).

    Returns:
      (loss f32[], metrics {'i2t_acc', 't2i_acc', 'temperature', 'n_pairs'}); accuracies are the fraction of
      valid rows whose positive has the highest logit.
    """
    b = image_emb.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
    img = _l2_normalize(image_emb.astype(jnp.float32))
    txt = _l2_normalize(text_emb.astype(jnp.float32))
    temperature = jnp.asarray(temperature, jnp.float32)
    logits = img @ txt.T / temperature  # [B images, B texts]
    pair = valid[:, None] & valid[None, :]
    logits = jnp.where(pair, logits, _NEG)
    diag = jnp.arange(b)

    def ce(lg):  # rows: queries, columns: candidates
        return jax.nn.logsumexp(lg, axis=1) - lg[diag, diag]

    n = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    per_row = 0.5 * (ce(logits) + ce(logits.T))
    loss = jnp.where(valid, per_row, 0.0).sum() / n
    i2t = jnp.where(valid, jnp.argmax(logits, axis=1) == diag, False).sum() / n
    t2i = jnp.where(valid, jnp.argmax(logits, axis=0) == diag, False).sum() / n
    return loss, {"i2t_acc": i2t, "t2i_acc": t2i, "temperature": temperature, "n_pairs": valid.sum()}


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def next_token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shifted next-token cross-entropy, averaged over the target tokens of the whole batch.

    Args:
      logits: f32[B, L, V]; position t predicts token t + 1.
      input_ids: i32[B, L].
      loss_mask: i32[B, L] (or bool), 1 where the token is a target (the answer / long caption tokens, never
        the prompt, image or padding). Position 0 is never predicted, so loss_mask[:, 0] is ignored.

    Returns:
      (loss f32[] = sum of the targets' -log p / number of targets (0 when there is none), n_tokens i32[]).
    """
    total, n = next_token_sums(logits, input_ids, loss_mask)
    return total / jnp.maximum(n, 1).astype(jnp.float32), n


def next_token_sums(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the targets' -log p f32[], number of targets i32[]): `next_token_loss` before the division, so
    that chunks can be summed into the full batch's loss."""
    lg = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:] > 0
    logp = jax.nn.log_softmax(lg, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.where(mask, nll, 0.0).sum(), mask.sum()


def total_loss(image_emb: jax.Array, text_emb: jax.Array, long_logits: jax.Array | None,
               long_ids: jax.Array | None, long_loss_mask: jax.Array | None, has_short: jax.Array,
               has_long: jax.Array | None, *, temperature: float | jax.Array = DEFAULT_TEMPERATURE,
               ntp_weight: float = 1.0, ntp_sums: tuple[jax.Array, jax.Array] | None = None,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VladVA's objective: InfoNCE(short captions) + ntp_weight * next-token loss(long captions).

    Args:
      image_emb, text_emb: f32[B, D] embeddings of [image + image prompt] and [short caption + text prompt].
      long_logits: f32[B, L, V] logits over [image + image prompt + long caption], or None (no NTP term).
      long_ids: i32[B, L]; long_loss_mask: i32[B, L] 1 on the long caption's tokens.
      has_short: bool[B], the sample has a short caption (< 30 tokens): it is a pair of the contrastive loss
        and a negative for the others; otherwise it is masked out of both.
      has_long: bool[B], the sample has a long caption (>= 30 tokens): its tokens enter the NTP loss.
      temperature: InfoNCE temperature (float or f32[]).
      ntp_weight: weight of the NTP term.
      ntp_sums: instead of long_logits, the NTP term's (sum, count) already computed (`next_token_sums` of
        has_long-masked targets, summed over chunks).

    Returns:
      (loss f32[], metrics {'contrastive', 'ntp', 'ntp_tokens', 'i2t_acc', 't2i_acc', 'temperature', 'n_pairs'}).
    """
    contrastive, metrics = info_nce(image_emb, text_emb, temperature=temperature, valid=has_short)
    metrics = {"contrastive": contrastive, **metrics}
    loss = contrastive
    if long_logits is not None:
        mask = jnp.asarray(long_loss_mask) * jnp.asarray(has_long, long_loss_mask.dtype)[:, None]
        ntp_sums = next_token_sums(long_logits, long_ids, mask)
    if ntp_sums is not None:
        total, n = ntp_sums
        ntp = total / jnp.maximum(n, 1).astype(jnp.float32)
        loss = loss + ntp_weight * ntp
        metrics.update(ntp=ntp, ntp_tokens=n)
    return loss, metrics


def _rowwise(fn, k: int, xs: Mapping[str, jax.Array]):
    """fn(xs) for a function of independent rows, computed over k chunks one at a time.

    Each microbatch runs under `jax.checkpoint` inside `lax.map`, so the backward pass keeps only the
    microbatch inputs and fn's outputs and recomputes one microbatch's activations at a time: GradCache's
    memory profile (one extra forward), with gradients that are exactly the full batch's, because whatever is
    computed from the outputs (InfoNCE over the whole batch) sees every row at once. Microbatch i holds rows
    i, i + k, ... so it stays spread over the devices of a batch-sharded mesh.
    """
    if k == 1:
        return fn(xs)
    b = next(iter(xs.values())).shape[0]
    if b % k:
        raise ValueError(f"train.grad_cache_chunks={k} must divide the batch size {b}")
    split = lambda x: jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
    out = jax.lax.map(jax.checkpoint(fn), jax.tree.map(split, dict(xs)))
    return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(b, *y.shape[2:]) if y.ndim > 1 else y, out)


# ----------------------------------------------------------------------------------------------------------
# The trainer's loss function.

def make_loss_fn(model, *, lora_alpha: float, lora_rank: int, temperature: float = DEFAULT_TEMPERATURE,
                 ntp_weight: float = 1.0, min_temperature: float = MIN_TEMPERATURE,
                 max_temperature: float = MAX_TEMPERATURE, grad_cache_chunks: int = 1, lora_impl: str = "unmerged",
                 ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """Builds `loss_fn(params, batch, rng) -> (loss, metrics)` for `vlm_jax.train.trainer`.

    Params tree:
      {'base': the LVLM's params (frozen), 'lora': `peft.lora_init(base, ..., targets=LORA_TARGETS)` tree (may be
       {} or absent: no LoRA), 'image_prompt': f32[P, D], 'text_prompt': f32[P', D] (each may be absent: the
       handcrafted tokens are used as they are), optionally 'log_temperature': f32[] (learnable T, clipped to
       [min_temperature, max_temperature]; otherwise `temperature` is fixed)}.
      Train with param_groups like [('lora/.*', 1.0), ('(image|text)_prompt', 1.0)]: 'base/...' stays frozen.

    Batch (global batch B, one image per sample; all rows may be left- or right-padded):
      image_ids i32[B, Li], image_mask i32[B, Li]: chat-templated IMAGE_PROMPT with the image placeholder expanded to
        the family's image token run.
      pixel_values (+ image_grid_thw for Qwen2-VL): the sample's image by HF name, one per row
        (`data.lvlm_inputs`; also the image of long_ids' image tokens).
      image_prompt_start i32[B]: start of the image prompt's span in image_ids (-1: none).
      text_ids i32[B, Lt], text_mask i32[B, Lt]: chat-templated TEXT_PROMPT of the short caption.
      text_prompt_start i32[B]: start of the text prompt's span in text_ids.
      long_ids i32[B, Ll], long_mask i32[B, Ll]: [image + image prompt] followed by the long caption.
      long_loss_mask i32[B, Ll]: 1 on the long caption's tokens (the NTP targets).
      long_prompt_start i32[B] (optional): start of the image prompt's span in long_ids, so the NTP loss also
        trains the image soft prompt; absent: long_ids keeps the handcrafted prompt tokens.
      has_short bool[B], has_long bool[B]: which of the two captions the sample really has (padding rows and
        missing captions are False).

    The rng is unused (no LoRA dropout).

    lora_impl: 'unmerged' (default) adds s (x A) B beside each adapted layer (`peft.lora_interceptor`), so the
    backward pass never forms a full weight gradient of the frozen kernels (25-35% of a LoRA step's FLOPs in
    benchmarks/train_steps.py); 'merged' differentiates through W + s A B (`peft.lora_merge`). Equal up to
    float rounding.

    grad_cache_chunks: k > 1 runs the LVLM passes over k chunks with rematerialisation (`_rowwise`): activation
    memory of B / k samples, the exact full-batch loss and gradients (all B - 1 negatives), one extra forward.
    The trainer's generic `accum_steps` would instead average k smaller contrastive losses.
    """

    def loss_fn(params: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array):
        del rng
        with peft.lora_context(params.get("lora"), lora_impl, alpha=lora_alpha, rank=lora_rank) as weights_of:
            return _loss(weights_of(params["base"]), params, batch)

    def _loss(weights, params, batch):
        image_prompt, text_prompt = params.get("image_prompt"), params.get("text_prompt")
        if "log_temperature" in params:
            t = temperature_from_log(params["log_temperature"], min_temperature, max_temperature)
        else:
            t = temperature
        pick = lambda *keys: {k: batch[k] for k in keys if k in batch}
        img = _rowwise(lambda x: image_embedding(
            model, weights, x["image_ids"], x["image_mask"], vision_inputs(x), prompt=image_prompt,
            prompt_start=x.get("image_prompt_start")), grad_cache_chunks,
            pick("image_ids", "image_mask", "image_prompt_start", *VISION_KEYS))
        txt = _rowwise(lambda x: text_embedding(
            model, weights, x["text_ids"], x["text_mask"], prompt=text_prompt, prompt_start=x.get("text_prompt_start")),
            grad_cache_chunks, pick("text_ids", "text_mask", "text_prompt_start"))
        ntp_sums = None
        if ntp_weight:
            def ntp(x):
                embeds, positions = multimodal_inputs(model, weights, x["long_ids"], x["long_mask"], vision_inputs(x))
                if image_prompt is not None and "long_prompt_start" in x:
                    embeds = peft.replace_span(embeds, x["long_prompt_start"], image_prompt)
                hidden, _ = model.apply({"params": weights}, None, x["long_mask"], inputs_embeds=embeds,
                                        positions=positions, method="hidden_states")
                logits = model.apply({"params": weights}, hidden, method="logits")
                mask = x["long_loss_mask"] * x["has_long"].astype(x["long_loss_mask"].dtype)[:, None]
                return next_token_sums(logits, x["long_ids"], mask)
            sums = _rowwise(ntp, grad_cache_chunks, pick("long_ids", "long_mask", "long_loss_mask", "long_prompt_start",
                                                    *VISION_KEYS) | {"has_long": batch["has_long"]})
            ntp_sums = jax.tree.map(jnp.sum, sums) if grad_cache_chunks > 1 else sums
        return total_loss(img, txt, None, None, None, batch["has_short"], None, temperature=t,
                          ntp_weight=ntp_weight, ntp_sums=ntp_sums)

    return loss_fn
