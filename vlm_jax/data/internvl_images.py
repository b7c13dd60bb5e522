"""InternVL's processor in numpy / PIL: dynamic tiling + thumbnail, and the `<img>...</img>` prompt layout.

Bit-equal to transformers' `InternVLProcessor` with the PIL backend of `GotOcr2ImageProcessor`
(`GotOcr2ImageProcessorPil`, what transformers loads for the hub configs' `GotOcr2ImageProcessorFast` when
torchvision is absent; its torchvision backend resizes with torch's bicubic instead, which is not bit-equal):

  tiling (`crop_to_patches`, which InternVLProcessor turns on for every call): among the grids (cols, rows) with
    min_patches <= cols * rows <= max_patches, sorted by tile count, pick the aspect ratio closest to the image's
    (ties: the later grid while the image covers more than half of its area); resize the image to
    cols x rows tiles with PIL, cut it row-major, and add a thumbnail (the whole image resized to one tile)
    whenever there is more than one tile.
  each tile: rescale (float64, then float32) and normalise (float32), as the PIL backend.
  prompt: every `<IMG_CONTEXT>` in the text (one per image, in order over the batch; the chat template writes
    it) becomes `<img>` + image_seq_length x n_tiles `<IMG_CONTEXT>` + `</img>`, then the checkpoint's tokenizer
    encodes the whole text (left padding unless the tokenizer's config names a side, as the processor).

Settings come from the checkpoint (preprocessor_config.json or processor_config.json['image_processor'], and
processor_config.json's image_seq_length); a setting this module does not implement is a one-line error.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlm_jax.data import preprocess
from vlm_jax.errors import UserError

PROCESSOR_TYPES = tuple(f"GotOcr2ImageProcessor{s}" for s in ("", "Fast", "Pil"))
# GotOcr2ImageProcessor's class defaults (transformers' image_processing_pil_got_ocr2.py), for keys a config omits.
_DEFAULTS = dict(size={"height": 384, "width": 384}, resample=3, do_resize=True, do_rescale=True,
                 rescale_factor=1 / 255, do_normalize=True, image_mean=preprocess.CLIP_MEAN,
                 image_std=preprocess.CLIP_STD, do_convert_rgb=True, min_patches=1, max_patches=12)
# Keys that carry no preprocessing (bookkeeping written by save_pretrained), or that InternVLProcessor overrides.
_INERT = {"image_processor_type", "processor_class", "data_format", "input_data_format", "return_tensors",
          "device", "default_to_square", "crop_to_patches", "disable_grouping", "auto_map"}
# Keys that must stay off (null / false) because this module does not implement them.
_OFF = ("do_center_crop", "crop_size", "do_pad", "pad_size")
IMAGE_SEQ_LENGTH_DEFAULT = 256  # InternVLProcessor's default when processor_config.json has none


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def image_settings(checkpoint_dir: str | os.PathLike) -> dict:
    """The checkpoint's InternVL preprocessing as plain data (json-able; the argument of the functions below).

    Returns:
      {'tile': [h, w], 'min_tiles', 'max_tiles', 'resample', 'rescale': float | None, 'mean'/'std': [3] | None,
       'image_seq_length': int}.

    Raises:
      UserError: no image processor config, another image processor class, or a setting not implemented here.
    """
    cfg, where = preprocess.read_image_processor_config(checkpoint_dir)
    name = cfg.get("image_processor_type")
    if name not in PROCESSOR_TYPES:
        raise UserError(f"{where}: image processor {name!r} is not InternVL's; supported: {', '.join(PROCESSOR_TYPES)}")
    unknown = sorted(k for k, v in cfg.items() if v is not None and k not in _DEFAULTS and k not in _INERT
                     and k not in _OFF)
    on = sorted(k for k in _OFF if cfg.get(k))
    if unknown or on:
        raise UserError(f"{where}: unsupported image processor settings {unknown + on}")
    d = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    size = d["size"]
    if not (isinstance(size, dict) and set(size) == {"height", "width"}):
        raise UserError(f"{where}: size must be {{'height': h, 'width': w}} for InternVL tiles, got {size!r}")
    if not d["do_resize"] or not d["do_convert_rgb"]:
        raise UserError(f"{where}: do_resize=false / do_convert_rgb=false are not supported")
    if int(d["resample"]) not in {int(r) for r in Image.Resampling}:
        raise UserError(f"{where}: unknown resample filter {d['resample']!r}")
    root = os.fspath(checkpoint_dir)
    proc_path = os.path.join(root, "processor_config.json")
    proc = _read_json(proc_path) if os.path.exists(proc_path) else {}
    return {
        "tile": [int(size["height"]), int(size["width"])],
        "min_tiles": int(d["min_patches"]), "max_tiles": int(d["max_patches"]),
        "resample": int(d["resample"]),
        "rescale": float(d["rescale_factor"]) if d["do_rescale"] else None,
        "mean": [float(v) for v in d["image_mean"]] if d["do_normalize"] else None,
        "std": [float(v) for v in d["image_std"]] if d["do_normalize"] else None,
        "image_seq_length": int(proc.get("image_seq_length", IMAGE_SEQ_LENGTH_DEFAULT)),
    }


@functools.lru_cache(maxsize=16)
def _grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # (cols, rows), generated cols-major and stably sorted by tile count: the order HF breaks ties in.
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
             if min_tiles <= w * h <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(height: int, width: int, settings: dict) -> tuple[int, int]:
    """(cols, rows) of the tiling of a height x width image (HF's `get_optimal_tiled_canvas`)."""
    tile_h, tile_w = settings["tile"]
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in _grids(settings["min_tiles"], settings["max_tiles"]):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * tile_h * tile_w * grid[0] * grid[1]:
            best = grid
    return best


def num_tiles(height: int, width: int, settings: dict) -> int:
    """Tiles (thumbnail included) a height x width image becomes: n_tiles x image_seq_length image tokens."""
    if settings["max_tiles"] <= 1:
        return 1
    cols, rows = tile_grid(height, width, settings)
    return 1 if cols * rows == 1 else cols * rows + 1


def _finish(arr: np.ndarray, settings: dict) -> np.ndarray:
    # The rescale / normalise arithmetic of the PIL backend (shared with the CLIP / SigLIP path).
    return preprocess.preprocess_image(arr, dict(settings, resize=None, crop=None, convert_rgb=True))


def preprocess_image(image: preprocess.ImageLike, settings: dict) -> np.ndarray:
    """One image -> its tiles f32[n, H, W, 3] (NHWC): row-major tiles, then the thumbnail (if n > 1).

    Args:
      image: anything `preprocess.load_image` accepts.
      settings: `image_settings(checkpoint)`.
    """
    img = preprocess.load_image(image)
    tile_h, tile_w = settings["tile"]
    resample = Image.Resampling(settings["resample"])
    thumbnail = img.resize((tile_w, tile_h), resample=resample)
    if settings["max_tiles"] <= 1:
        return _finish(np.asarray(thumbnail), settings)[None]
    cols, rows = tile_grid(img.height, img.width, settings)
    canvas = np.asarray(img.resize((cols * tile_w, rows * tile_h), resample=resample))
    tiles = [canvas[r * tile_h:(r + 1) * tile_h, c * tile_w:(c + 1) * tile_w]
             for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(np.asarray(thumbnail))
    return np.stack([_finish(t, settings) for t in tiles])


def image_tokens(tokenizer) -> tuple[str, str, str]:
    """(start, context, end) image token strings from the tokenizer, as InternVLProcessor reads them."""
    names = ("start_image_token", "context_image_token", "end_image_token")
    found = tuple(getattr(tokenizer, n, None) for n in names)
    if not all(isinstance(t, str) for t in found):
        raise UserError(f"the tokenizer does not name InternVL's image tokens {list(names)} (tokenizer_config.json "
                        f"'extra_special_tokens' of an InternVL -hf checkpoint); got {found}")
    return found


def expand_prompts(texts: Sequence[str], tiles: Sequence[int], image_seq_length: int,
                   tokens: tuple[str, str, str]) -> list[str]:
    """Replaces the k-th `<IMG_CONTEXT>` of the batch with `<img>` + image_seq_length * tiles[k] contexts + `</img>`.

    Raises:
      UserError: the texts hold another number of image placeholders than there are images.
    """
    start, context, end = tokens
    found = sum(t.count(context) for t in texts)
    if found != len(tiles):
        raise UserError(f"the prompts hold {found} {context} placeholder(s) for {len(tiles)} image(s); put one per "
                        f"image (the chat template writes it for each {{'type': 'image'}} entry)")
    it = iter(tiles)

    def expand(text):
        first, *rest = text.split(context)
        return first + "".join(start + context * (image_seq_length * next(it)) + end + p for p in rest)

    return [expand(t) for t in texts]


def process(tokenizer, texts: Sequence[str], images: Sequence[preprocess.ImageLike], settings: dict,
            padding: bool = True) -> dict[str, np.ndarray]:
    """The InternVL processor: texts with one `<IMG_CONTEXT>` per image, plus the images, into model inputs.

    Args:
      tokenizer: the checkpoint's tokenizer (`vlm_jax.data.tokenize.load_tokenizer`).
      texts: B prompts (already rendered by the chat template).
      images: the images of the whole batch, in placeholder order.
      settings: `image_settings(checkpoint)`.
      padding: pad to the longest row (on the left, unless the tokenizer's config sets padding_side, as the
        processor does); False needs B = 1 or equal lengths.

    Returns:
      {'input_ids': i32[B, L], 'attention_mask': i32[B, L], 'pixel_values': f32[N, H, W, 3] (N = all tiles,
       image after image), 'num_tiles': i32[images]}.
    """
    pixels = [preprocess_image(im, settings) for im in images]
    tiles = [p.shape[0] for p in pixels]
    expanded = expand_prompts(list(texts), tiles, settings["image_seq_length"], image_tokens(tokenizer))
    # The processor pads on the left unless the tokenizer's own config names a side (its init kwargs win).
    side = tokenizer.padding_side if "padding_side" in tokenizer.init_kwargs else "left"
    enc = tokenizer(expanded, padding=padding, padding_side=side, return_tensors="np")
    out = {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
           "num_tiles": np.asarray(tiles, np.int32)}
    if pixels:
        out["pixel_values"] = np.concatenate(pixels)
    return out
