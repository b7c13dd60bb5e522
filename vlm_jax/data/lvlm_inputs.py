"""One LVLM family's image processor + image-token layout, as the programs need them: the vision arrays of an
image under their HF names, and the ids one image placeholder of the chat template becomes in the prompt.

  family    placeholder (template)   image token run (ids)                          vision arrays of one image
  llava     <image>                  T x <image>  (T = the tower's tokens)           pixel_values f32[H, W, 3]
  internvl  <IMG_CONTEXT>            <img> + 256 x tiles <IMG_CONTEXT> + </img>     pixel_values f32[tiles, H, W, 3]
  qwen2_vl  <|image_pad|> (between   (h / 2) * (w / 2) x <|image_pad|>              pixel_values f32[h * w, C*T*P*P],
            <|vision_start|> and                                                    image_grid_thw i32[3] = (1, h, w)
            <|vision_end|>)

Each is bit-equal to the checkpoint's own HF processor (`data.preprocess` for LLaVA's CLIP / SigLIP processors,
`data.internvl_images`, `data.qwen2_vl_images`). Programs batch the arrays with a leading batch axis (one image
per row, `batch`); the models flatten it into HF's layout (`models.llava.ImageTokenLVLM`).

Static shapes: jit compiles one program per shape, so a run gives every image the same number of image tokens:
  llava     fixed by the tower (always so in HF);
  internvl  one 448 px tile per image (the whole image resized, no tiling): what the HF processor produces with
            `max_patches=1`; the checkpoint's dynamic tiling (up to max_patches tiles + thumbnail) is not used;
  qwen2_vl  every image first resized (PIL, the processor's resample filter) to `image_size` x `image_size`
            (default 448: 16 x 16 merged tokens), qwen-vl-utils' `resized_height` / `resized_width`; the HF
            processor then keeps that size. `image_size` must be a multiple of patch * merge (28) and within the
            processor's [min_pixels, max_pixels], else a one-line UserError. The other families refuse an
            `image_size` other than 0 or their own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vlm_jax.data import chat, features, internvl_images, preprocess, qwen2_vl_images
from vlm_jax.errors import UserError

QWEN2_VL_IMAGE_SIZE = 448  # the default fixed side: 32 x 32 patches, 256 image tokens (as one InternVL tile)


@dataclasses.dataclass(frozen=True)
class LVLMInputs:
    """A run's vision inputs and image-token layout for one checkpoint (`for_checkpoint`).

    Attributes:
      family: config.json's model_type ('llava', 'internvl', 'qwen2_vl').
      image_token: the placeholder text the chat template writes for an image.
      image_token_id: the model's image feature token id (the placeholder's id).
      image_run: the ids one placeholder becomes in the prompt (as the HF processor expands it).
      settings: the image processor settings (json-able; the family's `image_settings`, adjusted for the run).
      image_size: the side every image is resized to first (Qwen2-VL), else 0.
      plain_image: what a plain chat format writes for an image ('' = `image_token`): Qwen2-VL's template wraps
        the placeholder in its vision start / end markers, which the processor leaves as they are.
    """

    family: str
    image_token: str
    image_token_id: int
    image_run: tuple[int, ...]
    settings: dict
    image_size: int = 0
    plain_image: str = ""

    @property
    def tokens_per_image(self) -> int:
        """Image features (= image_token_id tokens) per image."""
        return sum(1 for i in self.image_run if i == self.image_token_id)

    def vision(self, image: preprocess.ImageLike) -> dict[str, np.ndarray]:
        """One image's vision arrays under their HF names (see the module table)."""
        if self.family == "llava":
            return {"pixel_values": preprocess.preprocess_image(image, self.settings)}
        if self.family == "internvl":
            return {"pixel_values": internvl_images.preprocess_image(image, self.settings)}
        img = preprocess.load_image(image)
        side = self.image_size
        img = img.resize((side, side), resample=Image.Resampling(self.settings["resample"]))
        pixels, grid = qwen2_vl_images.preprocess_image(img, self.settings)
        return {"pixel_values": pixels, "image_grid_thw": np.asarray(grid, np.int32)}

    def batch(self, arrays: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Per-image `vision` dicts -> the batch's, each array stacked on a leading batch axis."""
        return {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}

    def load_batch(self, images: Sequence[preprocess.ImageLike]) -> dict[str, np.ndarray]:
        """`batch` of the images' `vision`, decoded in the loading thread pool."""
        return self.batch(features.map_all(self.vision, images))

    def chat_format(self, tokenizer, template: str) -> chat.ChatFormat:
        """The run's `ChatFormat`: the template's placeholder expanded to `image_run`."""
        return chat.ChatFormat(tokenizer, template, self.tokens_per_image, self.image_token_id, self.image_token,
                               image_run=self.image_run, plain_image=self.plain_image or None)


def _check_size(image_size: int, own: int, family: str) -> None:
    if image_size not in (0, own):
        raise UserError(f"model.image_size={image_size}: a {family} checkpoint takes {own} px images only "
                        f"(set 0); a per-run image size is a Qwen2-VL setting")


def _llava(ckpt, cfg, tok, image_size: int) -> LVLMInputs:
    pp = preprocess.image_settings(ckpt)
    _check_size(image_size, cfg.vision.image_size, "llava")
    return LVLMInputs("llava", chat.image_token(ckpt), cfg.image_token_id,
                      (cfg.image_token_id,) * cfg.tokens_per_image, pp)


def _internvl(ckpt, cfg, tok, image_size: int) -> LVLMInputs:
    # One tile per image, the thumbnail path of the processor (= HF with max_patches=1): a static token count.
    settings = dict(internvl_images.image_settings(ckpt), min_tiles=1, max_tiles=1)
    tile = settings["tile"]
    if tuple(tile) != tuple(cfg.vision.image_size):
        raise UserError(f"{ckpt}: the image processor's tile {tile} differs from the vision tower's "
                        f"{list(cfg.vision.image_size)}")
    _check_size(image_size, tile[0], "internvl")
    if settings["image_seq_length"] != cfg.tokens_per_tile:
        raise UserError(f"{ckpt}: processor image_seq_length {settings['image_seq_length']} != the model's "
                        f"{cfg.tokens_per_tile} tokens per tile")
    start, context, end = internvl_images.image_tokens(tok)
    ids = [tok.convert_tokens_to_ids(t) for t in (start, context, end)]
    run = (ids[0],) + (cfg.image_token_id,) * cfg.tokens_per_tile + (ids[2],)
    return LVLMInputs("internvl", context, cfg.image_token_id, run, settings)


def _qwen2_vl(ckpt, cfg, tok, image_size: int) -> LVLMInputs:
    settings = qwen2_vl_images.image_settings(ckpt)
    side = image_size or QWEN2_VL_IMAGE_SIZE
    factor = settings["patch_size"] * settings["merge_size"]
    got = qwen2_vl_images.smart_resize(side, side, factor, settings["min_pixels"], settings["max_pixels"])
    if got != (side, side):
        raise UserError(f"model.image_size={side}: the Qwen2-VL processor would resize it to {got[0]}x{got[1]}; use "
                        f"a multiple of {factor} with {settings['min_pixels']} <= side^2 <= {settings['max_pixels']}")
    if settings["patch_size"] != cfg.vision.patch_size or settings["merge_size"] != cfg.vision.spatial_merge_size:
        raise UserError(f"{ckpt}: the image processor's patch / merge size differ from the vision tower's")
    g = side // settings["patch_size"]
    n = cfg.tokens_per_image((1, g, g))
    token = tok.convert_ids_to_tokens(cfg.image_token_id)
    if cfg.vision_start_token_id is None or cfg.vision_end_token_id is None:
        raise UserError(f"{ckpt}/config.json lacks vision_start_token_id / vision_end_token_id (every Qwen2-VL "
                        "checkpoint has them)")
    start, end = (tok.convert_ids_to_tokens(i) for i in (cfg.vision_start_token_id, cfg.vision_end_token_id))
    return LVLMInputs("qwen2_vl", token, cfg.image_token_id, (cfg.image_token_id,) * n, settings, side,
                      plain_image=f"{start}{token}{end}")


def for_checkpoint(ckpt: str | os.PathLike, cfg: Any, tokenizer, image_size: int = 0) -> LVLMInputs:
    """The vision inputs of a checkpoint of any supported family.

    Args:
      ckpt: the checkpoint directory (its config.json's model_type names the family).
      cfg: its family config (`convert.auto.lvlm_config(ckpt)`: `LlavaConfig`, `InternVLConfig`, `Qwen2VLConfig`).
      tokenizer: its tokenizer (`data.tokenize.load_tokenizer`).
      image_size: the run's image side (`model.image_size`; 0 = the family's default; see the module doc).

    Raises:
      UserError: an image processor or setting the family does not support, or an image_size it refuses.
    """
    ckpt = os.fspath(ckpt)
    image_size = int(image_size)
    if image_size < 0:
        raise UserError(f"model.image_size must be >= 0 (0 = the checkpoint's default), got {image_size}")
    path = os.path.join(ckpt, "config.json")
    try:
        with open(path) as f:
            family = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    makers = {"llava": _llava, "internvl": _internvl, "qwen2_vl": _qwen2_vl}
    if family not in makers:
        raise UserError(f"{ckpt} holds a {family!r} model; LVLM inputs exist for {', '.join(makers)}")
    return makers[family](ckpt, cfg, tokenizer, image_size)
