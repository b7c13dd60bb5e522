"""Host-side image preprocessing (numpy / PIL): CLIP eval transform and the cache augmentation.

Images reach the model as f32[B, H, W, 3] (NHWC), already rescaled and normalised, so the jitted model
never sees uint8 or PIL. Two transforms ship:

- `clip_preprocess`: the evaluation transform, equal to transformers' PIL-backed CLIP image processor
    (`CLIPImageProcessorPil` in transformers 5, the slow `CLIPImageProcessor` in 4.x): shortest-edge
    resize with PIL bicubic, center crop, rescale by 1/255, normalise. Output sizes, crop offsets and the
    float arithmetic follow transformers' code line by line, so the two agree to the last bit.
- `preprocess_image` + `image_settings`: the same PIL path for any supported HF image processor config
    (CLIP-style shortest-edge + crop, SigLIP / ViT-style height x width), read from the checkpoint itself.
- `augment`: torchvision's `RandomResizedCrop(size, scale=(0.5, 1), interpolation=BICUBIC)` +
    `RandomHorizontalFlip(0.5)` + `ToTensor` + `Normalize`, the cache augmentation of Tip-Adapter and
    DualAdapter. The crop-parameter sampler is torchvision's algorithm (10 tries, then a center-crop
    fallback) driven by a `np.random.Generator`, so it is deterministic for a given generator; the
    distribution is torchvision's, the individual draws are not torch's (different RNG).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image

from vlm_jax.errors import UserError

# OpenAI CLIP normalisation constants (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]


def _to_rgb(image: Image.Image) -> Image.Image:
    # transformers' convert_to_rgb composites transparency onto white (original CLIP would just drop the
    # alpha channel); we follow transformers so that clip_preprocess equals the HF processor on every input.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image: ImageLike) -> Image.Image:
    """Loads an image as a PIL RGB image.

    Args:
      image: a file path, encoded file bytes, a PIL image, or a uint8/bool array u8[H, W], u8[H, W, 1|3|4].

    Returns:
      A fully loaded PIL image in mode 'RGB' (transparency composited onto white, as transformers does).

    Raises:
      UserError: (a ValueError) one line naming the file (or array) that cannot be read or decoded.
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise UserError(f"load_image expects a uint8 (or bool) array [H, W] or [H, W, 1|3|4], "
                             f"got {arr.dtype}{list(arr.shape)}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    if isinstance(image, (bytes, bytearray)):
        source, name = io.BytesIO(image), f"<{len(image)} encoded bytes>"
    else:
        source, name = os.fspath(image), os.fspath(image)
    try:
        with Image.open(source) as img:
            img.load()  # Image.open is lazy: force the decode here so a truncated file fails in this try.
            return _to_rgb(img)
    except FileNotFoundError:
        raise UserError(f"image file not found: {name}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {name}: {type(e).__name__}: {e}") from None


def _normalise(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def resize_shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: (new_h, new_w).

    The short side becomes `size`; the long side is `int(size * long / short)` (truncated, not rounded).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, crop_size: int) -> np.ndarray:
    """transformers' `center_crop` on u8[H, W, C]: offsets (H - c) // 2, zero padding when H or W < c."""
    height, width = image.shape[:2]
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    if top >= 0 and left >= 0:
        return image[top:top + crop_size, left:left + crop_size]
    # Too small: paste into a zero canvas (placed at ceil of half the padding), then crop as transformers does.
    new_h, new_w = max(crop_size, height), max(crop_size, width)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    canvas = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
    canvas[top_pad:top_pad + height, left_pad:left_pad + width] = image
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top):min(new_h, top + crop_size), max(0, left):min(new_w, left + crop_size)]


def clip_preprocess(image: ImageLike, size: int = 224, crop_size: int = 224,
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """CLIP evaluation transform, bit-equal to transformers' PIL CLIP image processor.

    Args:
      image: anything `load_image` accepts.
      size: target length of the shortest edge.
      crop_size: side of the square center crop.
      mean: per-channel mean (after rescaling to [0, 1]).
      std: per-channel std.

    Returns:
      f32[crop_size, crop_size, 3], normalised.
    """
    img = load_image(image)
    new_h, new_w = resize_shortest_edge_size(img.height, img.width, size)
    img = img.resize((new_w, new_h), resample=Image.BICUBIC)
    arr = center_crop(np.asarray(img), crop_size)
    # transformers rescales in float64 then casts to float32; normalise then runs in float32.
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    return _normalise(x, mean, std)


def sample_crop_params(height: int, width: int, rng: np.random.Generator,
                       scale: tuple[float, float] = (0.5, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: a random crop (top, left, h, w).

    Up to 10 tries draw an area fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`; the
    first crop that fits is placed uniformly at random. If none fits, the fallback is the largest center
    crop whose aspect ratio is clamped to `ratio` (the whole image when it already is within).

    Args:
      height: image height.
      width: image width.
      rng: the generator; draws in torchvision's order (area, ratio per try, then top, left).
      scale: bounds of the crop area as a fraction of the image area.
      ratio: bounds of the crop aspect ratio w / h.

    Returns:
      (top, left, h, w) in pixels.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(image: ImageLike, rng: np.random.Generator, size: int = 224,
            scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
            flip_p: float = 0.5, mean: Sequence[float] = CLIP_MEAN,
            std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """Random resized crop (bicubic) + horizontal flip + normalise, as torchvision composes them.

    Args:
      image: anything `load_image` accepts.
      rng: generator for the crop and the flip; the same generator state gives the same output.
      size: output side.
      scale: crop area bounds (fraction of the image area); DualAdapter uses (0.5, 1).
      ratio: crop aspect-ratio bounds.
      flip_p: probability of a horizontal flip.
      mean: per-channel mean.
      std: per-channel std.

    Returns:
      f32[size, size, 3], normalised.
    """
    img = load_image(image)
    top, left, h, w = sample_crop_params(img.height, img.width, rng, scale, ratio)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), resample=Image.BICUBIC)
    if rng.random() < flip_p:  # torchvision flips after the resize.
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = np.asarray(img, np.float32) / np.float32(255)  # ToTensor: float32 division.
    return _normalise(x, mean, std)


# The image processors whose PIL path is reproduced here, with their class defaults for keys a config leaves out
# (transformers 5's `CLIPImageProcessorPil` / `SiglipImageProcessorPil` / `ViTImageProcessorPil`; the Fast and plain
# names load the same settings, and old CLIP / ViT checkpoints name a `CLIPFeatureExtractor` / `ViTFeatureExtractor`).
_PROCESSOR_DEFAULTS = {
    "clip": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD),
    "siglip": dict(size={"height": 224, "width": 224}, crop_size=None, do_center_crop=False,
                   image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
    # ViT resizes bilinearly (google/vit-base-patch16-224-in21k's processor says resample=2 too).
    "vit": dict(size={"height": 224, "width": 224}, crop_size=None, do_center_crop=False, resample=2,
                image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
}
_PROCESSOR_TYPES = {f"{name}{suffix}": kind for name, kind in (("CLIPImageProcessor", "clip"),
                                                                ("SiglipImageProcessor", "siglip"),
                                                                ("ViTImageProcessor", "vit"))
                    for suffix in ("", "Fast", "Pil")}
_PROCESSOR_TYPES.update(CLIPFeatureExtractor="clip", ViTFeatureExtractor="vit")
_BICUBIC = 3


def read_image_processor_config(checkpoint_dir: str | os.PathLike) -> tuple[dict, str]:
    """The checkpoint's image-processor config, wherever the checkpoint keeps it.

    Hub checkpoints keep it in `preprocessor_config.json`; transformers 5's `processor.save_pretrained` writes
    it as the 'image_processor' entry of `processor_config.json` instead.

    Returns:
      (config dict, a description of where it was read, for messages).

    Raises:
      UserError: neither file holds one.
    """
    root = os.fspath(checkpoint_dir)
    pre, proc = os.path.join(root, "preprocessor_config.json"), os.path.join(root, "processor_config.json")
    if os.path.exists(pre):
        return _read_json(pre), pre
    if os.path.exists(proc):
        cfg = _read_json(proc)
        if isinstance(cfg.get("image_processor"), dict):
            return cfg["image_processor"], f"{proc} ['image_processor']"
    raise UserError(f"{root} has no image processor config (neither preprocessor_config.json nor an "
                    f"'image_processor' entry in processor_config.json): copy the original checkpoint's processor "
                    f"files into it (what `AutoProcessor.save_pretrained` writes)")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _size_dict(value, where: str, key: str, square: bool = False) -> dict:
    # transformers' get_size_dict: CLIP and SigLIP read an int size as the shortest edge (default_to_square=False),
    # ViT as a square (its class default, default_to_square=True); a crop size int is always a square.
    if isinstance(value, int):
        return {"height": value, "width": value} if key == "crop_size" or square else {"shortest_edge": value}
    if isinstance(value, dict) and ("shortest_edge" in value and len(value) == 1 or
                                    {"height", "width"} == set(value)):
        return {k: int(v) for k, v in value.items()}
    raise UserError(f"{where}: unsupported {key}={value!r}; supported: an int, {{'shortest_edge': n}} or "
                    f"{{'height': h, 'width': w}}")


def image_settings(checkpoint_dir: str | os.PathLike) -> dict:
    """The preprocessing of a checkpoint's own HF image processor, as plain data (json-able, a cache key).

    Supported: CLIPImageProcessor (shortest-edge resize + center crop), SiglipImageProcessor and ViTImageProcessor
    (resize to height x width, no crop; bicubic / bilinear by default), their Fast/Pil variants and the
    CLIPFeatureExtractor / ViTFeatureExtractor of older checkpoints; keys a config leaves out take the
    class's defaults, as transformers does. Anything else is a UserError naming it.

    Returns:
      {'resize': {'shortest_edge': n} | {'height', 'width'} | None, 'crop': [h, w] | None, 'rescale': float | None,
       'mean': [3] | None, 'std': [3] | None, 'resample': int, 'convert_rgb': bool}: the argument of
      `preprocess_image`.
    """
    cfg, where = read_image_processor_config(checkpoint_dir)
    name = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    kind = _PROCESSOR_TYPES.get(name)
    if kind is None:
        raise UserError(f"{where}: image processor {name!r} is not supported; supported: "
                        f"{', '.join(sorted(_PROCESSOR_TYPES))}")
    d = {**_PROCESSOR_DEFAULTS[kind], **{k: v for k, v in cfg.items() if v is not None}}
    crop = None
    if d.get("do_center_crop", False):
        c = _size_dict(d["crop_size"], where, "crop_size")
        if "height" not in c:
            raise UserError(f"{where}: crop_size must be a height and width, got {d['crop_size']!r}")
        crop = [c["height"], c["width"]]
    return {
        "resize": _size_dict(d["size"], where, "size", square=kind == "vit") if d.get("do_resize", True) else None,
        "crop": crop,
        "rescale": float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else None,
        "mean": [float(v) for v in d["image_mean"]] if d.get("do_normalize", True) else None,
        "std": [float(v) for v in d["image_std"]] if d.get("do_normalize", True) else None,
        "resample": int(d.get("resample", _BICUBIC)),
        "convert_rgb": bool(d.get("do_convert_rgb", True)),
    }


def preprocess_image(image: ImageLike, settings: dict) -> np.ndarray:
    """The HF image processor's PIL path (transformers' `PilBackend._preprocess`), bit-equal.

    Args:
      image: anything `load_image` accepts.
      settings: `image_settings(checkpoint)`.

    Returns:
      f32[H, W, 3] (NHWC row of the model's pixel_values).
    """
    img = load_image(image)
    resize = settings["resize"]
    if resize is not None:
        if "shortest_edge" in resize:
            new_h, new_w = resize_shortest_edge_size(img.height, img.width, resize["shortest_edge"])
        else:
            new_h, new_w = resize["height"], resize["width"]
        img = img.resize((new_w, new_h), resample=Image.Resampling(settings["resample"]))
    arr = np.asarray(img)
    torchvision = settings.get("backend") == "torchvision"
    if settings["crop"] is not None:
        h, w = settings["crop"]
        if h != w:
            raise UserError(f"non-square center crops ({h}x{w}) are not supported")
        arr = torchvision_center_crop(arr, h) if torchvision else center_crop(arr, h)
    x = arr
    if torchvision:  # ToTensor: a float32 division by 255
        x = arr.astype(np.float32) / np.float32(255)
    elif settings["rescale"] is not None:
        # transformers rescales in float64 then casts to float32; normalise then runs in float32.
        x = (arr.astype(np.float64) * settings["rescale"]).astype(np.float32)
    x = x.astype(np.float32)
    if settings["mean"] is not None:
        x = _normalise(x, settings["mean"], settings["std"])
    return x


def torchvision_center_crop(image: np.ndarray, crop_size: int) -> np.ndarray:
    """torchvision's `CenterCrop` on u8[H, W, C]: offsets round((H - c) / 2) (transformers floors), zero padding
    split (c - H) // 2 before and the rest after when the image is smaller."""
    height, width = image.shape[:2]
    if height < crop_size or width < crop_size:
        pad_h, pad_w = max(crop_size - height, 0), max(crop_size - width, 0)
        image = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
                       + ((0, 0),) * (image.ndim - 2))
        height, width = image.shape[:2]
    top, left = int(round((height - crop_size) / 2.0)), int(round((width - crop_size) / 2.0))
    return image[top:top + crop_size, left:left + crop_size]


_OPEN_CLIP_RESAMPLE = {"bicubic": 3, "bilinear": 2}


def open_clip_image_settings(preprocess_cfg: dict, image_size: int, where: str) -> dict:
    """The eval transform of an open_clip checkpoint (open_clip_config.json's preprocess_cfg), as `image_settings`.

    open_clip's `image_transform(is_train=False)` with resize_mode 'shortest' (its default): torchvision Resize of
    the shortest edge (the same size rule and PIL filter as transformers), CenterCrop (rounded offsets), ToTensor
    (float32 / 255), Normalize. One departure: open_clip converts to RGB after the crop and drops alpha; we
    convert first and composite alpha onto white (`load_image`), so only transparent images differ.

    Raises:
      UserError: a resize_mode or interpolation other than shortest / bicubic|bilinear, or a non-int size.
    """
    cfg = dict(preprocess_cfg)
    size = cfg.pop("size", image_size)
    allowed = {"resize_mode": ("shortest",), "interpolation": tuple(_OPEN_CLIP_RESAMPLE), "mode": ("RGB",),
               "fill_color": (0,)}
    unsupported = {k: cfg[k] for k in allowed if k in cfg and cfg[k] not in allowed[k]}
    unknown = sorted(set(cfg) - {"mean", "std", "resize_mode", "interpolation", "mode", "fill_color"})
    if unsupported or unknown or not isinstance(size, int):
        raise UserError(f"{where}: open_clip preprocess_cfg not supported: "
                        f"{dict(unsupported, **{k: cfg[k] for k in unknown}) or {'size': size}}")
    return {"resize": {"shortest_edge": size}, "crop": [size, size], "rescale": 1 / 255,
            "mean": [float(v) for v in cfg.get("mean", CLIP_MEAN)], "std": [float(v) for v in cfg.get("std", CLIP_STD)],
            "resample": _OPEN_CLIP_RESAMPLE[cfg.get("interpolation", "bicubic")], "convert_rgb": True,
            "backend": "torchvision"}


def preprocess_settings(checkpoint_dir: str | os.PathLike) -> dict:
    """A CLIP tower's `clip_preprocess` keyword arguments, read with `image_settings`.

    Args:
      checkpoint_dir: a Hugging Face CLIP checkpoint folder.

    Returns:
      {'size': int, 'crop_size': int, 'mean': tuple, 'std': tuple} (plain data, so it can also go into a json
      cache key).

    Raises:
      UserError: no image-processor config, or one that is not a CLIP-style shortest-edge resize + square crop.
    """
    s = image_settings(checkpoint_dir)
    resize, crop = s["resize"] or {}, s["crop"]
    if ("shortest_edge" not in resize or crop is None or crop[0] != crop[1] or s["resample"] != _BICUBIC
            or s["rescale"] is None or s["mean"] is None):
        raise UserError(f"{checkpoint_dir}: this program needs a CLIP-style image processor (bicubic shortest-edge "
                        f"resize, square center crop, rescale, normalise); the checkpoint's is {s}")
    return {"size": int(resize["shortest_edge"]), "crop_size": int(crop[0]), "mean": tuple(s["mean"]),
            "std": tuple(s["std"])}
