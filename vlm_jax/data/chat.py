"""Prompts exactly as the checkpoint's own HF processor builds them: chat template, whole-prompt tokenization.

A prompt is rendered with the checkpoint's chat template (the same Jinja template `processor.apply_chat_template`
renders) and the rendered string is tokenized *whole*, as `processor(text=..., images=...)` does; the image
placeholder then becomes `tokens_per_image` image tokens, as the processor expands it. Tokenizing a prompt piece
by piece gives other ids with SentencePiece (Metaspace prepends '▁' to every piece) or byte-level BPE (merges
across piece boundaries), so the model would see prompts it was never trained on.

Spans inside a prompt (the handcrafted prompt that a soft prompt replaces, a caption, an answer) are found from
the fast tokenizer's character offsets into the rendered string, never by tokenizing the span alone.

Answers (VITask's responses, VladVA's long captions, label continuations) follow the generation prompt with the
separator the template itself puts between 'assistant' and the answer (' ' for LLaVA-1.5's 'ASSISTANT:', '' for
ChatML), and end with the tokenizer's EOS (the token generation stops at: '</s>', '<|im_end|>'); their ids are
those of the whole string prompt + answer, checked to extend the prompt's ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from vlm_jax.errors import UserError

IMAGE_PLACEHOLDER = "<image>"


def _is_jinja(template: str) -> bool:
    return "{%" in template or "{{" in template


def load_chat_template(checkpoint_dir: str | os.PathLike, override: str = "", tokenizer=None) -> str:
    """The chat template: `override` when given, else the checkpoint's own.

    The checkpoint's is looked up where transformers keeps it: chat_template.jinja, chat_template.json,
    processor_config.json, then the tokenizer's (tokenizer_config.json).

    Args:
      checkpoint_dir: the checkpoint.
      override: '' (use the checkpoint's), a Jinja template, or a plain format with one '{}' where the user turn
        goes (e.g. 'USER: {} ASSISTANT:'; images then go first as '<image>\\n').
      tokenizer: the loaded tokenizer (for its chat_template).

    Raises:
      UserError: no template anywhere, or a malformed override.
    """
    if override:
        if not _is_jinja(override) and override.count("{}") != 1:
            raise UserError(f"chat_template {override!r} is neither a Jinja template nor a format with one '{{}}' "
                            "where the user turn goes (e.g. 'USER: {} ASSISTANT:')")
        return override
    root = os.fspath(checkpoint_dir)
    jinja = os.path.join(root, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json"):
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path) as f:
                got = json.load(f).get("chat_template")
            if got:
                return got
    got = getattr(tokenizer, "chat_template", None)
    if isinstance(got, str) and got:
        return got
    raise UserError(f"{root} has no chat template (chat_template.jinja / .json, processor_config.json, "
                    f"tokenizer_config.json): set one, e.g. --config.model.chat_template='USER: {{}} ASSISTANT:'")


def image_token(checkpoint_dir: str | os.PathLike) -> str:
    """The processor's image placeholder (processor_config.json 'image_token'; LLaVA's '<image>' by default)."""
    path = os.path.join(os.fspath(checkpoint_dir), "processor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f).get("image_token") or IMAGE_PLACEHOLDER
    return IMAGE_PLACEHOLDER


class ChatFormat:
    """One checkpoint's prompt format: rendering, whole-prompt tokenization, image-token expansion, answers.

    Args:
      tokenizer: the checkpoint's HF (fast) tokenizer.
      template: `load_chat_template(...)`.
      tokens_per_image: image tokens one placeholder expands to.
      image_token_id: their id (the model config's).
      image_token: the placeholder's text.
      image_run: the ids one placeholder becomes (the family's layout, `data.lvlm_inputs`: InternVL's
        `<img>` + contexts + `</img>`); None: `tokens_per_image` image tokens (LLaVA, Qwen2-VL).
      plain_image: what a plain format ('USER: {} ASSISTANT:') writes for an image, as the checkpoint's own
        template writes it (Qwen2-VL: the placeholder between its vision start / end markers); None: the
        placeholder alone.
    """

    def __init__(self, tokenizer, template: str, tokens_per_image: int, image_token_id: int,
                 image_token: str = IMAGE_PLACEHOLDER, image_run: Sequence[int] | None = None,
                 plain_image: str | None = None):
        self.tok, self.template = tokenizer, template
        self.tokens_per_image, self.image_token_id, self.image_token = tokens_per_image, image_token_id, image_token
        self.plain_image = image_token if plain_image is None else plain_image
        self.image_run = list(image_run) if image_run is not None else [image_token_id] * tokens_per_image
        if tokenizer.convert_tokens_to_ids(image_token) != image_token_id:
            raise UserError(f"the tokenizer's {image_token!r} is id {tokenizer.convert_tokens_to_ids(image_token)}, "
                            f"the model's image_token_id is {image_token_id}: tokenizer and model do not match")
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.eos_token or ""
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self._heads: dict[tuple[str, bool], tuple[str, list[int]]] = {}
        self.answer_sep = self._answer_separator()

    # --------------------------------------------------------------------------------------------- rendering

    def render(self, text: str, image: bool, answer: str | None = None) -> str:
        """The rendered user turn + generation prompt (+ the assistant's `answer`, as the template renders it)."""
        if not _is_jinja(self.template):
            user = (self.plain_image + "\n" if image else "") + text
            out = self.template.format(user)
            return out if answer is None else out + " " + answer
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        conv = [{"role": "user", "content": content}]
        if answer is not None:
            conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.tok.apply_chat_template(conv, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=answer is None)

    def _answer_separator(self) -> str:
        """What the template puts between the generation prompt and the assistant's text."""
        probe = "zqxj answer"
        gen, full = self.render("q", False), self.render("q", False, answer=probe)
        if not full.startswith(gen) or probe not in full[len(gen):]:
            raise UserError("cannot tell from the chat template where an answer goes (a conversation with the "
                            "answer does not extend the generation prompt); set model.chat_template explicitly")
        return full[len(gen):full.index(probe, len(gen))]

    # --------------------------------------------------------------------------------------------- tokenizing

    def encode(self, rendered: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of a rendered prompt as the processor tokenizes it, the image placeholder
        expanded to `image_run` (the expanded ones all carry the placeholder's offsets)."""
        enc = self.tok(rendered, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        out_ids, out_off = [], []
        for i, o in zip(ids, offsets):
            run = self.image_run if i == self.image_token_id else [i]
            out_ids += run
            out_off += [o] * len(run)
        return out_ids, out_off

    def prompt(self, text: str, image: bool) -> list[int]:
        """Ids of the generation prompt for a user turn."""
        return self.encode(self.render(text, image))[0]

    def answer_ids(self, prompt_text: str, image: bool, answer: str, eos: bool = True) -> list[int]:
        """Ids of `answer` after the generation prompt (separator included, EOS appended): the tokens that extend
        the whole string prompt + separator + answer + EOS beyond the prompt's own ids.

        Raises:
          UserError: the prompt's ids are not a prefix (a tokenizer merging across the boundary).
        """
        key = (prompt_text, image)
        if key not in self._heads:  # one prompt, many answers (every long caption of a run): render it once
            rendered = self.render(prompt_text, image)
            self._heads[key] = rendered, self.encode(rendered)[0]
        rendered, head = self._heads[key]
        full = self.encode(rendered + self.answer_sep + answer + (self.eos_text if eos else ""))[0]
        if full[:len(head)] != head:
            raise UserError(f"the tokenizer merges the answer {answer!r} into the prompt's last token; "
                            "set model.chat_template so that the prompt ends on a token boundary")
        return full[len(head):]


def span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """[first, last) token indices whose characters meet [start, end) of the rendered string (zero-width special
    tokens excluded)."""
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hit:
        raise UserError(f"no token covers characters [{start}, {end}) of the prompt")
    return hit[0], hit[-1] + 1
