"""VladVA's prompt selection by entropy (arXiv 2412.04378, Fig. 5): for each candidate image prompt, the entropy of
the LVLM's next-token distribution right after the prompt (the generation prompt's last token: the position whose
hidden state is the image embedding), averaged over a set of images; the prompt with the HIGHEST mean entropy is
chosen (the paper finds it gives the better embeddings).

  python -m vlm_jax.programs.prompt_entropy --checkpoint=llava-hf/llava-1.5-7b-hf \
      --prompts='Summary above image in one word:|Describe the image:|In one word, the image shows' \
      --images=/data/coco/val2014 --num_images=100
  python -m vlm_jax.programs.prompt_entropy --checkpoint=replica:llava-1.5 --prompts='a|b' --images=builtin  # offline

Any LVLM family VladVA trains (LLaVA, InternVL, Qwen2-VL: `convert.auto`). Rows are built as the training and
evaluation rows are (`data.lvlm_inputs`: the checkpoint's chat template, the whole prompt tokenized, the image
placeholder expanded to the family's image token run; the vision arrays by the checkpoint's image processor
settings at the run's `--image_size`). Entropy is in nats.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import errors
from vlm_jax.data import chat, lvlm_inputs, tokenize
from vlm_jax.programs import runner
from vlm_jax.methods import vladva as disc

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def entropy(logits: jax.Array) -> jax.Array:
    """f32[..., V] logits -> f32[...]: -sum_v p_v log p_v (nats), in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def next_token_entropy(model, params, input_ids, attention_mask, vision) -> jax.Array:
    """f32[B]: entropy of the next-token distribution after each row's last real token.

    Args:
      model: an LVLM of `convert.auto` (LLaVA, InternVL, Qwen2-VL); params: its params.
      input_ids, attention_mask: i32[B, L] image rows (each image's token run expanded).
      vision: the rows' vision arrays by HF name (`data.lvlm_inputs.LVLMInputs.batch`), one image per row.
    """
    embeds, positions = disc.multimodal_inputs(model, params, input_ids, attention_mask, vision)
    hidden, _ = model.apply({"params": params}, None, attention_mask, inputs_embeds=embeds, positions=positions,
                            method="hidden_states")
    last = disc.last_token_embedding(hidden, attention_mask)
    return entropy(model.apply({"params": params}, last, method="logits"))


def prompt_entropies(model, params, fmt: chat.ChatFormat, prompts: Sequence[str],
                     images: Sequence[dict[str, np.ndarray]], batch_size: int = 8) -> list[float]:
    """Mean (over `images`) next-token entropy after each prompt.

    Args:
      fmt: the run's `chat.ChatFormat` (`LVLMInputs.chat_format`); each prompt is the user turn after the image.
      images: each image's vision arrays (`LVLMInputs.vision`).
      batch_size: images per forward pass (the last batch is padded with its first image, one compiled shape).

    Returns:
      One float per prompt.
    """
    batches = []
    for i in range(0, len(images), batch_size):
        chunk = list(images[i:i + batch_size])
        batches.append((len(chunk), {k: np.stack([a[k] for a in chunk + chunk[:1] * (batch_size - len(chunk))])
                                     for k in chunk[0]}))
    out = []
    for p in prompts:
        ids = np.asarray(fmt.prompt(p, image=True), np.int32)
        rows = jnp.asarray(np.broadcast_to(ids, (batch_size, len(ids))))
        total = 0.0
        for n, vision in batches:
            h = next_token_entropy(model, params, rows, jnp.ones(rows.shape, jnp.int32), vision)
            total += float(np.sum(np.asarray(h)[:n]))
        out.append(total / len(images))
    return out


def load_images(spec: str, num: int) -> list:
    """'builtin' (the offline toy photos) or a folder searched recursively for images; the first `num` (sorted
    paths; 0 = all). Raises UserError when nothing is found."""
    if spec == "builtin":
        from vlm_jax.data import builtin

        items = [e.array for e in builtin.builtin_dataset().test]
    else:
        if not os.path.isdir(spec):
            raise errors.UserError(f"--images={spec!r} is neither 'builtin' nor a folder")
        items = sorted(os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not items:
            raise errors.UserError(f"--images={spec!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return items[:num] if num else items


def parse_prompts(text: str) -> list[str]:
    prompts = [p for p in (s.strip() for s in text.split("|")) if p]
    if len(prompts) < 1:
        raise errors.UserError("--prompts is empty: give candidate image prompts separated by '|'")
    if len(set(prompts)) < len(prompts):
        raise errors.UserError("--prompts lists a prompt twice")
    return prompts


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m vlm_jax.programs.prompt_entropy", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="LVLM checkpoint dir (LLaVA, InternVL, Qwen2-VL), hub id, "
                    "or replica:<name>")
    ap.add_argument("--prompts", required=True, help="candidate image prompts separated by '|'")
    ap.add_argument("--images", default="builtin", help="'builtin' or a folder of images")
    ap.add_argument("--num_images", type=int, default=64, help="first N images (0 = all)")
    ap.add_argument("--chat_template", default="", help="'' = the checkpoint's own (see configs/vladva.py)")
    ap.add_argument("--image_size", type=int, default=0, help="the run's model.image_size (0 = the family's "
                    "default; see configs/vladva.py)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--output", default="", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    from vlm_jax.convert import auto
    from vlm_jax.data import features

    prompts = parse_prompts(args.prompts)
    if args.num_images < 0 or args.batch_size < 1:
        raise errors.UserError("--num_images must be >= 0 and --batch_size >= 1")
    items = load_images(args.images, args.num_images)
    ckpt = runner.resolve_checkpoint(args.checkpoint, None, prompts)
    tok = tokenize.load_tokenizer(ckpt)
    inputs = lvlm_inputs.for_checkpoint(ckpt, auto.lvlm_config(ckpt), tok, args.image_size)
    fmt = inputs.chat_format(tok, chat.load_chat_template(ckpt, args.chat_template, tok))
    images = features.map_all(inputs.vision, items)
    model, params = auto.from_pretrained(ckpt, dtype=jnp.dtype(args.dtype))
    h = prompt_entropies(model, params, fmt, prompts, images, args.batch_size)
    best = int(np.argmax(h))
    out = {"checkpoint": ckpt, "num_images": len(items), "entropy": dict(zip(prompts, h)), "chosen": prompts[best]}
    width = max(len(p) for p in prompts)
    print(f"mean next-token entropy (nats) over {len(items)} images, {os.path.basename(ckpt)}:")
    for p, v in zip(prompts, h):
        print(f"  {p:<{width}}  {v:.6f}{'  <- chosen (highest)' if p == prompts[best] else ''}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    try:
        main()
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
