"""Image-text pairs -> fixed-shape token batches for the discriminative LVLM method (`methods/discriminative`).

Each prompt is tokenized piecewise — chat-template prefix, image tokens or caption, the handcrafted prompt,
template suffix — and the pieces concatenated, so the prompt's token span (where a soft prompt goes) is known
exactly instead of searched for. Shapes are static: every image prompt has the same length, text and long
captions are right-padded (and truncated) to the config's lengths, so the train step compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vlm_jax.errors import UserError

IMAGE_PLACEHOLDER, SENTENCE_PLACEHOLDER = "<image>", "<sent>"


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """How prompts are laid out for one tokenizer and model.

    Attributes:
      chat_template: text with one '{}' where the user turn goes, e.g. LLaVA-1.5's 'USER: {} ASSISTANT:'.
      image_prompt: handcrafted prompt starting with '<image>' (E5-V: '<image>\\nSummary above image in one word:').
      text_prompt: handcrafted prompt starting with '<sent>'.
      tokens_per_image: image tokens one '<image>' expands to.
      image_token_id: their id.
      short_max_tokens: captions with fewer tokens feed the contrastive loss, the others the NTP loss.
      text_len, long_len: padded lengths of the text and long-caption sequences.
    """

    chat_template: str
    image_prompt: str
    text_prompt: str
    tokens_per_image: int
    image_token_id: int
    short_max_tokens: int = 30
    text_len: int = 64
    long_len: int = 128

    def __post_init__(self):
        if self.chat_template.count("{}") != 1:
            raise UserError(f"chat_template must contain one '{{}}' where the prompt goes, got {self.chat_template!r}")
        if not self.image_prompt.startswith(IMAGE_PLACEHOLDER):
            raise UserError(f"image_prompt must start with {IMAGE_PLACEHOLDER!r}, got {self.image_prompt!r}")
        if not self.text_prompt.startswith(SENTENCE_PLACEHOLDER):
            raise UserError(f"text_prompt must start with {SENTENCE_PLACEHOLDER!r}, got {self.text_prompt!r}")


class Tokens:
    """Piecewise tokenization with a HF tokenizer: no special tokens inside, BOS once at the start."""

    def __init__(self, tokenizer, spec: PromptSpec):
        self.tok, self.spec = tokenizer, spec
        pre, post = spec.chat_template.split("{}")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.prefix = bos + self.encode(pre)
        self.suffix = self.encode(post)
        self.image_prompt = self.encode(spec.image_prompt[len(IMAGE_PLACEHOLDER):])
        self.text_prompt = self.encode(spec.text_prompt[len(SENTENCE_PLACEHOLDER):])
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids) if text else []

    def image_row(self) -> tuple[list[int], int]:
        """(ids, prompt start) of [prefix, image tokens, image prompt, suffix]; the same for every image."""
        image = [self.spec.image_token_id] * self.spec.tokens_per_image
        start = len(self.prefix) + len(image)
        return self.prefix + image + self.image_prompt + self.suffix, start

    def text_row(self, caption: str) -> tuple[list[int], int]:
        """(ids, prompt start) of [prefix, caption, text prompt, suffix], the caption truncated to fit text_len."""
        room = self.spec.text_len - len(self.prefix) - len(self.text_prompt) - len(self.suffix)
        if room < 1:
            raise UserError(f"data.text_len={self.spec.text_len} leaves no room for the caption next to the prompt")
        cap = self.encode(caption)[:room]
        return self.prefix + cap + self.text_prompt + self.suffix, len(self.prefix) + len(cap)

    def long_row(self, caption: str) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of [image row, caption, EOS]: the NTP target is the caption (and EOS)."""
        ids, _ = self.image_row()
        cap = self.encode(" " + caption) + ([self.eos] if self.eos is not None else [])
        cap = cap[:max(self.spec.long_len - len(ids), 0)]
        if not cap:
            raise UserError(f"data.long_len={self.spec.long_len} leaves no room for a long caption after the "
                            f"{len(ids)} tokens of the image prompt")
        return ids + cap, [0] * len(ids) + [1] * len(cap)

    def num_tokens(self, caption: str) -> int:
        return len(self.encode(caption))


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), value, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def split_captions(tokens: Tokens, captions: Sequence[str | None]) -> tuple[str | None, str | None]:
    """(short, long): the first caption under `short_max_tokens` tokens, and the first one at or above it."""
    short = long = None
    for c in captions:
        if not c:
            continue
        if tokens.num_tokens(c) < tokens.spec.short_max_tokens:
            short = short or c
        else:
            long = long or c
    return short, long


def train_batch(tokens: Tokens, images: np.ndarray, shorts: Sequence[str | None],
                longs: Sequence[str | None]) -> dict[str, np.ndarray]:
    """The batch layout of `discriminative.make_loss_fn` for B samples (a missing caption is None).

    Args:
      images: f32[B, H, W, 3] preprocessed images.
      shorts / longs: per sample, the contrastive caption and the NTP caption (see `split_captions`).
    """
    b = len(images)
    img_ids, start = tokens.image_row()
    image_ids, image_mask = _pad([img_ids] * b, len(img_ids), tokens.pad)
    text = [tokens.text_row(s or "") for s in shorts]
    text_ids, text_mask = _pad([t[0] for t in text], tokens.spec.text_len, tokens.pad)
    long = [tokens.long_row(c or "") for c in longs]
    long_ids, long_mask = _pad([l[0] for l in long], tokens.spec.long_len, tokens.pad)
    loss_mask, _ = _pad([l[1] for l in long], tokens.spec.long_len, 0)
    return {
        "image_ids": image_ids, "image_mask": image_mask, "pixel_values": np.asarray(images, np.float32),
        "image_prompt_start": np.full((b,), start, np.int32),
        "text_ids": text_ids, "text_mask": text_mask, "text_prompt_start": np.array([t[1] for t in text], np.int32),
        "long_ids": long_ids, "long_mask": long_mask, "long_loss_mask": loss_mask * long_mask,
        "long_prompt_start": np.full((b,), start, np.int32),
        "has_short": np.array([s is not None for s in shorts]), "has_long": np.array([c is not None for c in longs]),
    }


def image_batch(tokens: Tokens, images: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of `discriminative.image_embedding` for f32[B, H, W, 3] images."""
    ids, start = tokens.image_row()
    image_ids, image_mask = _pad([ids] * len(images), len(ids), tokens.pad)
    return {"input_ids": image_ids, "attention_mask": image_mask, "pixel_values": np.asarray(images, np.float32),
            "prompt_start": np.full((len(images),), start, np.int32)}


def text_batch(tokens: Tokens, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """Inputs of `discriminative.text_embedding` for B captions."""
    rows = [tokens.text_row(c) for c in captions]
    ids, mask = _pad([r[0] for r in rows], tokens.spec.text_len, tokens.pad)
    return {"input_ids": ids, "attention_mask": mask, "prompt_start": np.array([r[1] for r in rows], np.int32)}


def soft_prompt_lengths(tokens: Tokens) -> tuple[int, int]:
    """(P_image, P_text): token lengths of the handcrafted prompts that the soft prompts replace."""
    return len(tokens.image_prompt), len(tokens.text_prompt)


