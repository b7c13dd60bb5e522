"""Greedy decoding for `vlm_jax.models.llama.CausalLM` with a KV cache, equal to HF
`model.generate(do_sample=False)` on left-padded batches.

The whole decode is one jitted function: a prefill of the (left-padded) prompt into the cache,
then a `jax.lax.while_loop` of single-token steps that stops early once every row has emitted
EOS. Rows that finished emit `pad_token_id` afterwards, as HF does.

Compilation: one per (model, batch size, prompt bucket, max_new_tokens, number of EOS ids,
dtype of the prompt embeddings); the EOS and pad ids themselves are traced. Prompts are
left-padded further up to a *bucket* length, the next multiple of `bucket_multiple` (default
64), so prompts of 1..64 tokens share one executable, 65..128 the next, and so on; the extra
padding is masked out (and does not shift positions, which count real tokens only), so it
changes no token, only wastes < `bucket_multiple` slots of prefill compute. A LLaVA-1.5 prompt
(576 image tokens + text) lands in 640 or 704.

The cache holds bucket + max_new_tokens slots per row (dtype = the model's compute dtype).
"""

from __future__ import annotations

import collections
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# How many times the jitted decode was traced (i.e. compiled), for tests and logs.
TRACES: collections.Counter = collections.Counter()


def bucket_length(length: int, multiple: int = 64) -> int:
    """The padded prompt length: `length` rounded up to a multiple of `multiple`."""
    return max(multiple, -(-length // multiple) * multiple)


def _eos_tuple(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _decode(params, input_ids, inputs_embeds, attention_mask, positions, eos_ids, pad_id, *, model, max_new_tokens):
    """The jitted prefill + while_loop; inputs already bucketed. Returns i32[B, max_new_tokens].

    eos_ids i32[E] (E may be 0) and pad_id i32[] are traced, so changing them does not recompile.
    """
    TRACES["greedy_generate"] += 1  # Python side effect: runs at trace time only
    variables = {"params": params}
    b, length = attention_mask.shape

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    def next_token(hidden):
        # LM head on the last position only: the prompt's [B, L, V] logits are never built.
        logits = model.apply(variables, hidden[:, -1], method="logits")
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)  # first max on ties, as torch

    # The last prompt token is the last slot of every row (left padding), so decoding writes
    # slot `length + step` for all rows alike.
    cache = model.init_cache(b, length + max_new_tokens)
    hidden, cache = model.apply(variables, input_ids, attention_mask, inputs_embeds=inputs_embeds,
                                positions=positions, cache=cache, method="hidden_states")
    tok = next_token(hidden)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    ones = jnp.ones((b, 1), jnp.int32)

    def cond(state):
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tok, cache, done, out = state
        hidden, cache = model.apply(variables, tok[:, None], ones, cache=cache, method="hidden_states")
        tok = jnp.where(done, pad_id, next_token(hidden))
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
        return step + 1, tok, cache, done | is_eos(tok), out

    state = (jnp.asarray(1, jnp.int32), tok, cache, is_eos(tok), out)
    return jax.lax.while_loop(cond, body, state)[-1]


def greedy_generate(model, params, input_ids, attention_mask, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None, pad_token_id: int, *, inputs_embeds=None,
                    positions=None, bucket_multiple: int = 64) -> jax.Array:
    """Greedy decoding of a left-padded batch.

    Args:
      model: a `CausalLM` (anything with its `hidden_states` / `logits` / `init_cache` methods).
      params: its params tree.
      input_ids: i32[B, L] left-padded prompt ids, or None when `inputs_embeds` is given.
      attention_mask: i32[B, L], 1 = token, 0 = padding; padding must be on the left (every
        row's last column is a real token), as HF tokenizers with padding_side='left' give.
      max_new_tokens: N, the number of tokens to generate per row.
      eos_token_id: id (or ids) that end a row; None never stops early.
      pad_token_id: written after a row's EOS (and used to pad prompt ids to the bucket).
      inputs_embeds: f32[B, L, D] prompt embeddings instead of ids, e.g. LLaVA's text
        embeddings with the image features spliced in (`model.embed` + projector output).
      positions: the prompt's rotary positions, i32[B, L] or i32[3, B, L] (Qwen2-VL's M-RoPE,
        `Qwen2VL.rope_positions`); None: the model's default (the count of real tokens before).
        The tokens generated next are placed by the model (Qwen2-VL's cache keeps the offset).
      bucket_multiple: prompts are left-padded to a multiple of this (see the module doc).

    Returns:
      i32[B, N] generated ids (the EOS itself included, `pad_token_id` after it), equal to
      HF `generate(..., do_sample=False, max_new_tokens=N)[:, L:]` padded to N columns.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    mask = np.asarray(attention_mask, np.int32)
    if not mask[:, -1].all():
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 in every row "
                         "(tokenize with padding_side='left')")
    length = mask.shape[1]
    extra = bucket_length(length, bucket_multiple) - length
    mask = np.pad(mask, ((0, 0), (extra, 0)))
    if input_ids is not None:
        input_ids = jnp.pad(jnp.asarray(input_ids, jnp.int32), ((0, 0), (extra, 0)), constant_values=pad_token_id)
    else:
        inputs_embeds = jnp.pad(jnp.asarray(inputs_embeds), ((0, 0), (extra, 0), (0, 0)))
    if positions is not None:  # the bucket's extra slots are padding: their positions are never used
        positions = jnp.asarray(positions, jnp.int32)
        positions = jnp.pad(positions, [(0, 0)] * (positions.ndim - 1) + [(extra, 0)])
    eos_ids = jnp.asarray(_eos_tuple(eos_token_id), jnp.int32).reshape(-1)
    return _decode(params, input_ids, inputs_embeds, jnp.asarray(mask), positions, eos_ids,
                   jnp.asarray(pad_token_id, jnp.int32), model=model, max_new_tokens=int(max_new_tokens))
