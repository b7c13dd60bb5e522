"""Image-text pairs -> fixed-shape token batches for the discriminative method (`methods/vladva`).

Every prompt is what the checkpoint's own processor feeds the model (`data.chat`): the user turn rendered with
the chat template and tokenized whole, the image placeholder expanded to the image tokens. The span that a soft
prompt replaces is found from the tokenizer's character offsets: the P tokens that end where the handcrafted
prompt ends (P = the prompt's length in the image row, or in a reference caption's text row), so every id outside
that span is the processor's. Shapes are static: every image prompt has the same length, text and long captions
are right-padded (and truncated) to the config's lengths, so the train step compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vlm_jax.data import chat
from vlm_jax.errors import UserError

SENTENCE_PLACEHOLDER = "<sent>"
_REFERENCE_CAPTION = "a photo of a cat"  # fixes the text prompt's token length P_text


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """The handcrafted prompts and the lengths of one run.

    Attributes:
      image_prompt: the text that follows the image in the user turn (E5-V: 'Summary above image in one word:';
        the chat template places the image, e.g. LLaVA-1.5's 'USER: <image>\n... ASSISTANT:').
      text_prompt: the user turn of a caption, '<sent>' marking the caption
        ('<sent>\nSummary above sentence in one word:').
      short_max_tokens: captions with fewer tokens feed the contrastive loss, the others the NTP loss.
      text_len, long_len: padded lengths of the text and long-caption sequences.
    """

    image_prompt: str
    text_prompt: str
    short_max_tokens: int = 30
    text_len: int = 64
    long_len: int = 128

    def __post_init__(self):
        if chat.IMAGE_PLACEHOLDER in self.image_prompt:
            raise UserError(f"image_prompt {self.image_prompt!r} holds {chat.IMAGE_PLACEHOLDER!r}: the chat template "
                            "places the image now; give only the text after it, e.g. 'Summary above image in one "
                            "word:'")
        if not self.image_prompt.strip():
            raise UserError("image_prompt is empty")
        if not self.text_prompt.startswith(SENTENCE_PLACEHOLDER) or not self.text_prompt[len(SENTENCE_PLACEHOLDER):]:
            raise UserError(f"text_prompt must start with {SENTENCE_PLACEHOLDER!r} and continue with the prompt, "
                            f"got {self.text_prompt!r}")


class Tokens:
    """The discriminative method's rows, as the checkpoint's processor tokenizes them.

    Attributes:
      image_prompt / text_prompt: ids of the handcrafted prompt spans (what the soft prompts start from).
      eos, pad: token ids.
    """

    def __init__(self, fmt: chat.ChatFormat, spec: PromptSpec):
        self.fmt, self.tok, self.spec = fmt, fmt.tok, spec
        rendered = fmt.render(spec.image_prompt, image=True)
        ids, offsets = fmt.encode(rendered)
        at = rendered.rfind(spec.image_prompt)
        lo, hi = chat.span(offsets, at, at + len(spec.image_prompt))
        self._image = (ids, lo)
        self.image_prompt = ids[lo:hi]
        ref_ids, ref_start, _ = self._text(_REFERENCE_CAPTION, exact_span=True)
        self.text_prompt = ref_ids[ref_start:ref_start + self._p_text]
        self.eos, self.pad = fmt.eos_id, fmt.pad_id

    def image_row(self) -> tuple[list[int], int]:
        """(ids, prompt start) of the image prompt; the same for every image."""
        return self._image

    def _text(self, caption: str, exact_span: bool = False) -> tuple[list[int], int, int]:
        """(ids, soft-prompt start, index of the caption's first token) of one caption's user turn."""
        user = self.spec.text_prompt.replace(SENTENCE_PLACEHOLDER, caption, 1)
        rendered = self.fmt.render(user, image=False)
        at = rendered.rfind(user)
        ids, offsets = self.fmt.encode(rendered)
        lo, hi = chat.span(offsets, at + len(caption), at + len(user))
        if exact_span:
            self._p_text = hi - lo
        # The soft prompt is the P tokens that end where the prompt ends: a token merging the caption's last
        # characters with the prompt's first (BPE's '.\n') stays inside it, and every id outside is HF's.
        start = hi - self._p_text
        first = chat.span(offsets, at, at + max(len(caption), 1))[0] if caption else start
        return ids, start, min(first, start)

    def text_row(self, caption: str) -> tuple[list[int], int]:
        """(ids, prompt start) of a caption's user turn, the caption cut (at a token) so the row fits text_len."""
        ids, start, first = self._text(caption)
        for _ in range(4):
            excess = len(ids) - self.spec.text_len
            if excess <= 0:
                return ids, start
            keep = start - first - excess  # caption tokens that fit
            if keep < 1:
                raise UserError(f"data.text_len={self.spec.text_len} leaves no room for a caption next to the "
                                f"{len(ids) - (start - first)} tokens of the text prompt")
            cut = self.tok(caption, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            caption = caption[:cut[min(keep, len(cut)) - 1][1]]
            ids, start, first = self._text(caption)
        raise UserError(f"cannot cut caption {caption[:40]!r}... to data.text_len={self.spec.text_len} tokens")

    def long_row(self, caption: str) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of [image prompt, answer separator + caption + EOS]: the NTP target is the caption and
        EOS, generated after the image prompt as the assistant's answer."""
        ids, _ = self.image_row()
        cap = self.fmt.answer_ids(self.spec.image_prompt, True, caption)
        cap = cap[:max(self.spec.long_len - len(ids), 0)]
        if not cap:
            raise UserError(f"data.long_len={self.spec.long_len} leaves no room for a long caption after the "
                            f"{len(ids)} tokens of the image prompt: use at least {len(ids) + 30}")
        return ids + cap, [0] * len(ids) + [1] * len(cap)

    def num_tokens(self, caption: str) -> int:
        return len(self.tok(caption, add_special_tokens=False).input_ids)


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


def _vision(images) -> dict[str, np.ndarray]:
    """The batch's vision arrays by HF name: a dict (`lvlm_inputs.LVLMInputs.load_batch`, any family) or LLaVA's
    bare f32[B, H, W, 3] pixel_values."""
    if isinstance(images, dict):
        return dict(images)
    return {"pixel_values": np.asarray(images, np.float32)}


def train_batch(tokens: Tokens, images, shorts: Sequence[str | None],
                longs: Sequence[str | None]) -> dict[str, np.ndarray]:
    """The batch layout of `vladva.make_loss_fn` for B samples (a missing caption is None).

    Args:
      images: the B images' vision arrays by HF name (`lvlm_inputs.LVLMInputs.load_batch`), or f32[B, H, W, 3]
        preprocessed LLaVA images.
      shorts / longs: per sample, the contrastive caption and the NTP caption (see `split_captions`).
    """
    vision = _vision(images)
    b = len(vision["pixel_values"])
    img_ids, start = tokens.image_row()
    image_ids, image_mask = _pad([img_ids] * b, len(img_ids), tokens.pad)
    text = [tokens.text_row(s or "") for s in shorts]
    text_ids, text_mask = _pad([t[0] for t in text], tokens.spec.text_len, tokens.pad)
    long = [tokens.long_row(c or "") for c in longs]
    long_ids, long_mask = _pad([l[0] for l in long], tokens.spec.long_len, tokens.pad)
    loss_mask, _ = _pad([l[1] for l in long], tokens.spec.long_len, 0)
    return {
        "image_ids": image_ids, "image_mask": image_mask, **vision,
        "image_prompt_start": np.full((b,), start, np.int32),
        "text_ids": text_ids, "text_mask": text_mask, "text_prompt_start": np.array([t[1] for t in text], np.int32),
        "long_ids": long_ids, "long_mask": long_mask, "long_loss_mask": loss_mask * long_mask,
        "long_prompt_start": np.full((b,), start, np.int32),
        "has_short": np.array([s is not None for s in shorts]), "has_long": np.array([c is not None for c in longs]),
    }


def image_batch(tokens: Tokens, images) -> dict[str, np.ndarray]:
    """Inputs of `vladva.image_embedding` for B images (their vision arrays, as `train_batch` takes them)."""
    vision = _vision(images)
    b = len(vision["pixel_values"])
    ids, start = tokens.image_row()
    image_ids, image_mask = _pad([ids] * b, len(ids), tokens.pad)
    return {"input_ids": image_ids, "attention_mask": image_mask, **vision,
            "prompt_start": np.full((b,), start, np.int32)}


def text_batch(tokens: Tokens, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """Inputs of `vladva.text_embedding` for B captions."""
    rows = [tokens.text_row(c) for c in captions]
    ids, mask = _pad([r[0] for r in rows], tokens.spec.text_len, tokens.pad)
    return {"input_ids": ids, "attention_mask": mask, "prompt_start": np.array([r[1] for r in rows], np.int32)}


def soft_prompt_lengths(tokens: Tokens) -> tuple[int, int]:
    """(P_image, P_text): token lengths of the handcrafted prompts that the soft prompts replace."""
    return len(tokens.image_prompt), len(tokens.text_prompt)


