"""Qwen2-VL's image preprocessing and image-token expansion, bit-equal to HF `Qwen2VLImageProcessor` (its PIL
path, `Qwen2VLImageProcessorPil`) and `Qwen2VLProcessor`.

Per image: RGB -> `smart_resize` to a multiple of patch * merge on each side, with the pixel count kept in
[min_pixels, max_pixels] (PIL bicubic) -> rescale (float64, then float32) and normalise (float32) -> cut into
P x P patches ordered block by block (merge x merge neighbours together) -> each patch repeated over the
temporal_patch_size frames (a still image is a clip of identical frames) and flattened as (C, T, P, P).
The images' patches are concatenated: pixel_values f32[N, C*T*P*P], image_grid_thw i64[n, 3] = (1, H/P, W/P).

In the prompt, each image's <|image_pad|> becomes t * h * w / merge^2 tokens (`expand_image_tokens`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlm_jax.data import preprocess
from vlm_jax.errors import UserError

PROCESSOR_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
_DEFAULTS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14, temporal_patch_size=2, merge_size=2,
                 image_mean=list(preprocess.CLIP_MEAN), image_std=list(preprocess.CLIP_STD), do_resize=True,
                 do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True, resample=3)
# Keys a config may carry that change nothing here (bookkeeping, or the video processor's).
_INERT = {"image_processor_type", "processor_class", "default_to_square", "data_format", "input_data_format",
          "return_tensors", "device", "disable_grouping", "auto_map", "_processor_class"}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """HF's `smart_resize`: (h, w) rounded to multiples of `factor`, then scaled (keeping the aspect ratio) into
    [min_pixels, max_pixels] pixels, rounding down when shrinking and up when growing.

    Raises:
      UserError: an aspect ratio above 200 (HF refuses it too).
    """
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"image of {height}x{width}: Qwen2-VL's processor refuses aspect ratios above 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def image_settings(checkpoint_dir: str | os.PathLike) -> dict:
    """The checkpoint's Qwen2-VL image processor config as plain data (json-able; `preprocess_images`' argument).

    Both forms are read: the hub's (min_pixels / max_pixels at the top) and transformers 5's (size = {shortest_edge:
    min pixels, longest_edge: max pixels}); the top-level keys win, as in HF. Keys left out take the class defaults.

    Raises:
      UserError: another processor class, or a key / value this port does not know (named).
    """
    cfg, where = preprocess.read_image_processor_config(checkpoint_dir)
    name = cfg.get("image_processor_type")
    if name not in PROCESSOR_TYPES:
        raise UserError(f"{where}: image processor {name!r} is not Qwen2-VL's; expected one of {list(PROCESSOR_TYPES)}")
    unknown = sorted(set(cfg) - set(_DEFAULTS) - _INERT - {"size"})
    if unknown:
        raise UserError(f"{where}: unknown Qwen2-VL image processor setting(s) {unknown}; known: "
                        f"{sorted(set(_DEFAULTS) | {'size'})}")
    d = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None and k in _DEFAULTS}}
    size = cfg.get("size") or {}
    bounds = {"shortest_edge": "min_pixels", "longest_edge": "max_pixels", "min_pixels": "min_pixels",
              "max_pixels": "max_pixels"}
    if not isinstance(size, dict) or set(size) - set(bounds):
        raise UserError(f"{where}: unsupported size={size!r}; expected {{'shortest_edge': min pixels, "
                        f"'longest_edge': max pixels}}")
    for key, value in size.items():
        if cfg.get(bounds[key]) is None:
            d[bounds[key]] = value
    for flag in ("do_resize", "do_convert_rgb"):
        if not d[flag]:
            raise UserError(f"{where}: {flag}=false is not supported by vlm_jax's Qwen2-VL preprocessing")
    return {"min_pixels": int(d["min_pixels"]), "max_pixels": int(d["max_pixels"]), "patch_size": int(d["patch_size"]),
            "temporal_patch_size": int(d["temporal_patch_size"]), "merge_size": int(d["merge_size"]),
            "rescale": float(d["rescale_factor"]) if d["do_rescale"] else None,
            "mean": [float(v) for v in d["image_mean"]] if d["do_normalize"] else None,
            "std": [float(v) for v in d["image_std"]] if d["do_normalize"] else None,
            "resample": int(d["resample"])}


def _patchify(x: np.ndarray, s: dict) -> tuple[np.ndarray, tuple[int, int, int]]:
    """f32[H, W, C] -> (f32[gh * gw, C*T*P*P] in the processor's block order, grid (1, gh, gw))."""
    p, m, t = s["patch_size"], s["merge_size"], s["temporal_patch_size"]
    chw = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
    c, height, width = chw.shape
    gh, gw = height // p, width // p
    # (C, gh/m, m, P, gw/m, m, P) -> (gh/m, gw/m, m, m, C, P, P): blocks row-major, patches row-major inside.
    patches = chw.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    frames = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return frames.reshape(gh * gw, c * t * p * p), (1, gh, gw)


def preprocess_image(image: preprocess.ImageLike, settings: dict) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (patches f32[h * w, C*T*P*P], grid (1, h, w)), as the HF processor.

    Args:
      image: anything `preprocess.load_image` accepts.
      settings: `image_settings(checkpoint)`.
    """
    img = preprocess.load_image(image)
    factor = settings["patch_size"] * settings["merge_size"]
    h, w = smart_resize(img.height, img.width, factor, settings["min_pixels"], settings["max_pixels"])
    arr = np.asarray(img.resize((w, h), resample=Image.Resampling(settings["resample"])))
    x = arr.astype(np.float32)
    if settings["rescale"] is not None:
        # HF rescales in float64 then casts to float32; normalisation then runs in float32.
        x = (arr.astype(np.float64) * settings["rescale"]).astype(np.float32)
    if settings["mean"] is not None:
        x = (x - np.asarray(settings["mean"], np.float32)) / np.asarray(settings["std"], np.float32)
    return _patchify(x, settings)


def preprocess_images(images: Sequence[preprocess.ImageLike], settings: dict) -> dict[str, np.ndarray]:
    """Images -> {'pixel_values': f32[N, C*T*P*P], 'image_grid_thw': i64[n, 3]}, the HF processor's outputs."""
    if not images:
        raise UserError("preprocess_images needs at least one image")
    out = [preprocess_image(im, settings) for im in images]
    return {"pixel_values": np.concatenate([p for p, _ in out]),
            "image_grid_thw": np.asarray([g for _, g in out], np.int64)}


def tokens_per_image(grid_thw: Sequence[int], merge_size: int) -> int:
    """Image tokens of one image: t * h * w / merge^2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // merge_size ** 2


def expand_image_tokens(input_ids: Sequence[int], image_grid_thw, image_token_id: int, merge_size: int) -> list[int]:
    """Prompt ids with one image token per image -> each repeated to its image's token count (the processor's
    expansion; the placeholder is a special token, so expanding ids equals expanding the text).

    Raises:
      UserError: the prompt's placeholders and the images do not pair up.
    """
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    n = sum(1 for i in input_ids if i == image_token_id)
    if n != len(grids):
        raise UserError(f"the prompt holds {n} image placeholder(s) (id {image_token_id}) for {len(grids)} image(s)")
    out, k = [], 0
    for i in input_ids:
        if i == image_token_id:
            out += [i] * tokens_per_image(grids[k], merge_size)
            k += 1
        else:
            out.append(i)
    return out
