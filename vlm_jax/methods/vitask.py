"""VITask (arXiv 2410.06456): task-specific fine-tuning of LVLMs with a task-specific model (TSM), pure pieces.

Exemplar prompting (EP): the frozen TSM's CLS feature f32[B, Dt] goes through a new connector
(`ExemplarConnector`) to one LM-width token, inserted right after the image tokens (`insert_exemplar`). The LVLM
is run twice per sample with one set of weights: a plain pass (image + instruction -> answer) and an exemplar
pass (image + exemplar + instruction -> answer). Losses, all on answer tokens only, teacher-forced, with the
shift convention of `vladva.next_token_loss` (logits at position t predict token t + 1):

    L_van = answer_nll(plain_logits, ids, answer_mask)
    L_ep  = answer_nll(ep_logits, ep_ids, ep_answer_mask)         # or the aligned logits with ids / answer_mask
    RDA   = rda_loss(plain_logits, drop_exemplar_logits(ep_logits, position), answer_mask)
    CRT   = crt_loss(plain_logits, neg_logits, ids, answer_mask)  # neg: another sample's image, same text
    loss  = total_loss(stage, L_van, L_ep, RDA, CRT, alpha=alpha, beta=beta)

Alignment. The exemplar pass is one token longer. `insert_exemplar` (and `insert_token` for ids and masks)
shifts every token from `position` on by one; `drop_exemplar_logits` removes the one logit row that predicts the
exemplar itself (row position - 1), which leaves f32[B, L, V] rows predicting exactly the tokens of the plain
sequence, so RDA compares the two passes token by token. CRT needs the positive and negative passes aligned on
the same answer positions: the caller builds both sequences from the *same* text (same instruction, same
answer, same padding) and only swaps the pixels, so with a fixed number of image tokens per image the two id
sequences are identical and every position matches.

Padding. The exemplar goes after the image tokens, i.e. inside the real tokens, so left padding stays in
front and right padding stays at the end; positions from `cumsum(mask) - 1` stay consistent either way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.methods import vladva as disc
from vlm_jax.models import peft
from vlm_jax.models.llava import vision_inputs

Dtype = jnp.dtype
STAGES = (1, 2)
DIRECTIONS = ("student_teacher", "teacher_student")


# ----------------------------------------------------------------------------------------------------------
# The TSM-to-LLM connector.

class ExemplarConnector(nn.Module):
    """LayerNorm -> Dense -> GELU -> Dense: a TSM feature f32[B, Dt] to one exemplar token f32[B, 1, D].

    Attributes:
      out_dim: D, the LM's hidden size.
      hidden_dim: width of the middle layer (None: out_dim).
      eps: LayerNorm epsilon.

    Logical axes: LayerNorm scale/bias 'norm'; first kernel ('embed_vision', 'mlp'), second ('mlp', 'embed');
    biases ('mlp',) and ('embed',). The TSM's width is a vision-side width, like the LLaVA projector's input.
    """

    out_dim: int
    hidden_dim: int | None = None
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature: jax.Array) -> jax.Array:
        """f32[B, Dt] -> f32[B, 1, D]."""
        hidden = self.hidden_dim or self.out_dim
        part, init = nn.with_logical_partitioning, nn.initializers.lecun_normal()
        zeros, ones = nn.initializers.zeros_init(), nn.initializers.ones_init()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, scale_init=part(ones, ("norm",)),
                         bias_init=part(zeros, ("norm",)), name="norm", **kw)(feature)
        x = nn.Dense(hidden, kernel_init=part(init, ("embed_vision", "mlp")), bias_init=part(zeros, ("mlp",)),
                     name="linear_1", **kw)(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dense(self.out_dim, kernel_init=part(init, ("mlp", "embed")), bias_init=part(zeros, ("embed",)),
                     name="linear_2", **kw)(x)
        return x[:, None, :]


# ----------------------------------------------------------------------------------------------------------
# Sequence surgery (static shapes).

def exemplar_position(input_ids: jax.Array, image_token_id: int) -> jax.Array:
    """i32[B]: the index right after the last image token of each row (0 for a row without image tokens)."""
    is_img = input_ids == image_token_id
    length = input_ids.shape[1]
    last = length - 1 - jnp.argmax(is_img[:, ::-1], axis=1)
    return jnp.where(is_img.any(axis=1), last + 1, 0).astype(jnp.int32)


def insert_token(x: jax.Array, value: jax.Array, position: jax.Array) -> jax.Array:
    """Inserts `value` into each row of `x` at `position`, shifting the rest right by one.

    Args:
      x: [B, L, ...] (ids, masks, embeddings).
      value: [B, ...] (or a scalar) placed at out[b, position[b]].
      position: i32[B] in [0, L].

    Returns:
      [B, L + 1, ...]: out[:, j] = x[:, j] for j < p, value for j = p, x[:, j - 1] for j > p.
    """
    b, length = x.shape[:2]
    idx = jnp.arange(length + 1)[None, :]
    pos = jnp.asarray(position, jnp.int32)[:, None]
    src = jnp.clip(idx - (idx > pos), 0, length - 1)
    extra = (1,) * (x.ndim - 2)
    out = jnp.take_along_axis(x, src.reshape(src.shape + extra), axis=1)
    value = jnp.broadcast_to(jnp.asarray(value, x.dtype), (b,) + x.shape[2:])
    return jnp.where((idx == pos).reshape((b, length + 1) + extra), value[:, None], out)


def remove_token(x: jax.Array, index: jax.Array) -> jax.Array:
    """Removes row b's element `index[b]` along axis 1: [B, L + 1, ...] -> [B, L, ...] (inverse of insert)."""
    length = x.shape[1] - 1
    idx = jnp.arange(length)[None, :]
    src = idx + (idx >= jnp.asarray(index, jnp.int32)[:, None])
    return jnp.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 2)), axis=1)


def insert_exemplar(embeds: jax.Array, mask: jax.Array, exemplar: jax.Array,
                    position: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Places the exemplar token right after the image tokens.

    Args:
      embeds: f32[B, L, D] input embeddings (image features already merged: `Llava.embed_multimodal`).
      mask: i32[B, L] attention mask.
      exemplar: f32[B, D] (or f32[B, 1, D], the connector's output) exemplar token.
      position: i32[B] index after the last image token (`exemplar_position`).

    Returns:
      (f32[B, L + 1, D], i32[B, L + 1]); the mask is 1 at the exemplar. Use `insert_token(ids, pad, position)`
      and `insert_token(answer_mask, 0, position)` to build the matching ids and answer mask.
    """
    exemplar = exemplar.reshape(exemplar.shape[0], embeds.shape[-1]).astype(embeds.dtype)
    return insert_token(embeds, exemplar, position), insert_token(mask, 1, position)


def drop_exemplar_logits(logits: jax.Array, position: jax.Array) -> jax.Array:
    """Aligns exemplar-pass logits with the plain sequence: f32[B, L + 1, V] -> f32[B, L, V].

    Row position - 1 predicts the exemplar itself (no counterpart in the plain pass); removing it leaves row t
    predicting plain token t + 1 for every t. For position 0 row 0 is removed (it predicts plain token 0).
    """
    return remove_token(logits, jnp.maximum(jnp.asarray(position, jnp.int32) - 1, 0))


# ----------------------------------------------------------------------------------------------------------
# Losses (answer tokens only; logits at t predict token t + 1).

def _shifted(answer_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    mask = answer_mask[:, 1:] > 0
    return mask, jnp.maximum(mask.sum(), 1).astype(jnp.float32)


def answer_nll(logits: jax.Array, ids: jax.Array, answer_mask: jax.Array) -> jax.Array:
    """L_van (plain pass) or L_ep (exemplar pass): mean -log p of the answer tokens.

    Args:
      logits: f32[B, L, V]; ids: i32[B, L]; answer_mask: i32[B, L], 1 on the response tokens.

    Returns:
      f32[] (0 when there is no answer token).
    """
    return disc.next_token_loss(logits, ids, answer_mask)[0]


def rda_loss(student_logits: jax.Array, teacher_logits: jax.Array, answer_mask: jax.Array, *,
             direction: str = "student_teacher") -> jax.Array:
    """Response distribution alignment: mean over answer tokens of a KL over the vocabulary.

    Args:
      student_logits: f32[B, L, V], the plain pass p(r | img, instr).
      teacher_logits: f32[B, L, V], the exemplar pass p(r | img, exemplar, instr), aligned with the student
        (`drop_exemplar_logits`); its gradient is stopped (self-distillation: same weights, teacher is a target).
      answer_mask: i32[B, L], 1 on the response tokens (targets; the same shift as `answer_nll`).
      direction: 'student_teacher' (paper): KL(p_student || sg p_teacher);
        'teacher_student': KL(sg p_teacher || p_student).

    Returns:
      f32[] >= 0; 0 when the two distributions are equal.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    log_s = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32), axis=-1)
    log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits[:, :-1]).astype(jnp.float32), axis=-1)
    if direction == "student_teacher":
        kl = jnp.sum(jnp.exp(log_s) * (log_s - log_t), axis=-1)
    else:
        kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    mask, n = _shifted(answer_mask)
    return jnp.where(mask, kl, 0.0).sum() / n


def crt_loss(pos_logits: jax.Array, neg_logits: jax.Array, ids: jax.Array, answer_mask: jax.Array) -> jax.Array:
    """Contrastive response tuning: per answer token -log softmax(z_pos - z_neg)[r_t], mean over answer tokens.

    Args:
      pos_logits: f32[B, L, V] with the sample's own image.
      neg_logits: f32[B, L, V] with the image of another sample having the same instruction and a different
        label. Both passes must share the text (same ids, same padding: the caller only swaps pixels) so that
        position t is the same answer token in both. Gradients flow through both passes.
      ids: i32[B, L]; answer_mask: i32[B, L], 1 on the response tokens.

    Returns:
      f32[].
    """
    z = pos_logits[:, :-1].astype(jnp.float32) - neg_logits[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(z, axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    mask, n = _shifted(answer_mask)
    return jnp.where(mask, nll, 0.0).sum() / n


def total_loss(stage: int, l_van: jax.Array, l_ep: jax.Array, rda: jax.Array, crt: jax.Array | None = None, *,
               alpha: float = 1.0, beta: float = 1.0) -> jax.Array:
    """Stage 1: L_van + L_ep + alpha RDA. Stage 2 (connector frozen): that + beta CRT (crt required)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    loss = l_van + l_ep + alpha * rda
    if stage == 2:
        if crt is None:
            raise ValueError("stage 2 needs the CRT loss")
        loss = loss + beta * crt
    return loss


# ----------------------------------------------------------------------------------------------------------
# The LVLM passes and losses.

def _vision(pixels) -> dict:
    # A bare pixel array is LLaVA's / InternVL's pixel_values; a dict holds any family's arrays by HF name.
    return dict(pixels) if isinstance(pixels, Mapping) else {"pixel_values": pixels}


def multimodal_prompt(model, connector, image_token_id, weights, conn, ids, mask, pixels, feature):
    """(embeds f32[B, L(+1), D], mask, rotary positions or None, exemplar position i32[B] or None): the images
    spliced in (any LVLM family: `pixels` = its vision arrays by HF name), with the exemplar token after them when
    `conn` is given. The positions are the family's for the final sequence (`model.positions`: Qwen2-VL's M-RoPE
    with the exemplar as one text token after the image; None for LLaVA / InternVL)."""
    vision = _vision(pixels)
    embeds = model.apply({"params": weights}, ids, method="embed_multimodal", **vision)
    pos = None
    if conn is not None:
        pos = exemplar_position(ids, image_token_id)
        ex = connector.apply({"params": conn}, feature)
        embeds, mask = insert_exemplar(embeds, mask, ex, pos)
        ids = insert_token(ids, -1, pos)  # a text token (never an image id) for the positions
    return embeds, mask, model.positions(ids, mask, **vision), pos


def make_forward(model, connector: "ExemplarConnector", image_token_id: int):
    def forward(weights, ids, mask, pixels, conn=None, feature=None):
        """Plain pass (conn None): f32[B, L, V]; exemplar pass: (f32[B, L + 1, V], position i32[B]).
        `pixels`: the rows' vision arrays by HF name (a dict), or LLaVA's / InternVL's bare pixel_values."""
        embeds, mask, positions, pos = multimodal_prompt(model, connector, image_token_id, weights, conn, ids, mask,
                                                         pixels, feature)
        hidden, _ = model.apply({"params": weights}, None, mask, inputs_embeds=embeds, positions=positions,
                                method="hidden_states")
        logits = model.apply({"params": weights}, hidden, method="logits")
        return logits if conn is None else (logits, pos)
    return forward


def make_loss_fn(forward, *, stage: int | None, pad_id: int, lora_alpha: float, lora_rank: int, alpha: float,
                 beta: float, rda_direction: str, lora_impl: str = "unmerged"):
    """stage None: the vanilla baseline (L_van only); 1 / 2: VITask's stages (`total_loss`).

    lora_impl: 'unmerged' (the adapters beside the frozen layers, no full weight gradients) or 'merged'; see
    `peft.lora_context`.
    """

    def loss_fn(params, batch, rng):
        del rng
        with peft.lora_context(params["lora"], lora_impl, alpha=lora_alpha, rank=lora_rank) as weights_of:
            return _loss(weights_of(params["base"]), params, batch)

    def _loss(weights, params, batch):
        ids, mask, amask = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
        vision = vision_inputs(batch)
        plain = forward(weights, ids, mask, vision)
        l_van = answer_nll(plain, ids, amask)
        if stage is None:
            return l_van, {"loss": l_van, "l_van": l_van}
        ep, pos = forward(weights, ids, mask, vision, params["connector"], batch["feature"])
        l_ep = answer_nll(ep, insert_token(ids, pad_id, pos), insert_token(amask, 0, pos))
        rda = rda_loss(plain, drop_exemplar_logits(ep, pos), amask, direction=rda_direction)
        crt = None
        m = {"l_van": l_van, "l_ep": l_ep, "rda": rda}
        if stage == 2:
            # The negative image has the positive's size (one static size per run), hence its grid too.
            neg = forward(weights, ids, mask, {**vision, **vision_inputs(batch, "neg_")})
            crt = crt_loss(plain, neg, ids, amask)
            m["crt"] = crt
        loss = total_loss(stage, l_van, l_ep, rda, crt, alpha=alpha, beta=beta)
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
            logits = drop_exemplar_logits(ep, pos)
        else:
            logits = forward(weights, ids, mask, pixels)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.where(amask[:, 1:] > 0, tok, 0.0).sum(axis=1)
    return score


# ----------------------------------------------------------------------------------------------------------
# Label scoring (the likelihood evaluation and its uncached reference).

def prompt_embeds(model, connector, image_token_id, weights, conn, ids, mask, pixels, feature, use_ep):
    """(embeds, mask, rotary positions or None) of (left-padded) prompts with the images spliced in [and the
    exemplar after them]; see `multimodal_prompt`."""
    embeds, mask, positions, _ = multimodal_prompt(model, connector, image_token_id, weights,
                                                   conn if use_ep else None, ids, mask, pixels, feature)
    return embeds, mask, positions


def repeat_cache(cache, k: int, scan_layers: bool = False):
    """Each row of a `KVCache` (or Qwen2-VL's `MRopeCache`: its rope deltas too) repeated k times (row b -> rows
    b*k .. b*k + k - 1)."""
    if hasattr(cache, "delta"):
        return cache.replace(kv=repeat_cache(cache.kv, k, scan_layers), delta=jnp.repeat(cache.delta, k, axis=0))
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
          ids, mask: i32[B, P] left-padded prompts (`Seqs.prompt_rows`); pixels: the rows' vision arrays by HF
            name (`data.lvlm_inputs`; or a bare f32[B, H, W, 3]); feature f32[B, Dt].
          ans_ids, ans_mask: i32[B, K, A] each row's K right-padded answers ' <label>.' + EOS (mask 0 rows score
            whatever; the caller masks them).
        """
        embeds, mask, positions = prompt_embeds(model, connector, image_token_id, weights, conn, ids, mask, pixels,
                                                feature, use_ep)
        b, p = mask.shape
        k, a = ans_ids.shape[1:]
        v = {"params": weights}
        cache = model.init_cache(b, p + a)
        hidden, cache = model.apply(v, None, mask, inputs_embeds=embeds, positions=positions, cache=cache,
                                    method="hidden_states")
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


def make_embedder(model, connector, image_token_id: int):
    return jax.jit(functools.partial(prompt_embeds, model, connector, image_token_id), static_argnames="use_ep")
