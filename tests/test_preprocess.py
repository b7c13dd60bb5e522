"""Tests for vlm_jax.data.preprocess: parity with transformers' CLIP processor, the cache augmentation."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import preprocess as pp

try:  # transformers 5: the PIL backend has its own class; CLIPImageProcessor is the torchvision one.
    from transformers import CLIPImageProcessorPil as SlowCLIPProcessor
except ImportError:  # transformers 4.x: CLIPImageProcessor is the slow PIL processor.
    from transformers import CLIPImageProcessor as SlowCLIPProcessor


def _random_image(h, w, mode="RGB", seed=0):
    rs = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rs.randint(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def _hf(processor, image):
    return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)  # CHW -> HWC


@pytest.mark.parametrize("h,w", [(300, 500), (500, 300), (224, 224), (333, 500), (501, 223), (100, 37),
                                 (10, 10), (224, 1000)])
def test_clip_preprocess_matches_transformers(h, w):
    image = _random_image(h, w, seed=h * w)
    ours = pp.clip_preprocess(image)
    ref = _hf(SlowCLIPProcessor(), image)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-6


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_clip_preprocess_modes_match_transformers(mode):
    image = _random_image(61, 83, "RGBA", seed=3).convert(mode)
    assert np.abs(pp.clip_preprocess(image) - _hf(SlowCLIPProcessor(), image)).max() < 1e-6


@pytest.mark.parametrize("size,crop", [(256, 224), (200, 224), (336, 336)])
def test_clip_preprocess_other_sizes_match_transformers(size, crop):
    image = _random_image(270, 410, seed=size)
    processor = SlowCLIPProcessor(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    ours = pp.clip_preprocess(np.asarray(image), size=size, crop_size=crop)  # array input too
    assert ours.shape == (crop, crop, 3)
    assert np.abs(ours - _hf(processor, image)).max() < 1e-6


def test_resize_output_size_truncates_like_transformers():
    assert pp.resize_shortest_edge_size(333, 500, 224) == (224, 336)  # 224 * 500 / 333 = 336.3
    assert pp.resize_shortest_edge_size(500, 333, 224) == (336, 224)
    assert pp.resize_shortest_edge_size(100, 37, 224) == (605, 224)  # 605.4


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.jpg") as err:
        pp.load_image(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not found.*missing.png"):
        pp.load_image(tmp_path / "missing.png")
    truncated = tmp_path / "truncated.png"
    _random_image(40, 40).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.png"):
        pp.load_image(truncated)
    with pytest.raises(ValueError, match="uint8"):
        pp.load_image(np.zeros((4, 4, 3), np.float32))


def test_load_image_inputs(tmp_path):
    arr = np.asarray(_random_image(12, 9))
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    for source in (path, str(path), path.read_bytes(), arr, Image.fromarray(arr)):
        img = pp.load_image(source)
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), arr)
    gray = pp.load_image(np.ones((5, 6), bool))
    assert gray.size == (6, 5) and np.asarray(gray).min() == 255


def test_preprocess_settings(tmp_path):
    with pytest.raises(ValueError, match="no image processor config"):  # never a silent 224-px default
        pp.preprocess_settings(tmp_path)
    default = dict(size=224, crop_size=224, mean=pp.CLIP_MEAN, std=pp.CLIP_STD)
    cfg = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
           "crop_size": {"height": 336, "width": 336}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    settings = pp.preprocess_settings(tmp_path)
    assert settings == dict(size=336, crop_size=336, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert pp.clip_preprocess(_random_image(20, 30), **settings).shape == (336, 336, 3)
    # Old CLIP checkpoints: a feature extractor and int sizes.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"feature_extractor_type": "CLIPFeatureExtractor",
                                                                   "size": 288}))
    assert pp.preprocess_settings(tmp_path) == dict(default, size=288)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor",
                                                                   "size": {"height": 384, "width": 384}}))
    with pytest.raises(ValueError, match="CLIP-style"):
        pp.preprocess_settings(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "DeiTImageProcessor"}))
    with pytest.raises(ValueError, match="'DeiTImageProcessor' is not supported; supported: CLIP"):
        pp.image_settings(tmp_path)


def _saved(processor, tmp_path, layout):
    """A checkpoint dir holding `processor`'s config as the hub does (preprocessor_config.json) or as transformers
    5's processor.save_pretrained does (inside processor_config.json)."""
    processor.save_pretrained(tmp_path)
    if layout == "processor_config":
        pre = tmp_path / "preprocessor_config.json"
        (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": json.loads(pre.read_text())}))
        pre.unlink()
    return tmp_path


@pytest.mark.parametrize("layout", ["preprocessor_config", "processor_config"])
@pytest.mark.parametrize("kind", ["clip336", "siglip384", "vit384"])
def test_image_settings_match_the_checkpoints_processor(tmp_path, kind, layout):
    from transformers import SiglipImageProcessorPil, ViTImageProcessorPil

    processor = {
        "clip336": lambda: SlowCLIPProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        "siglip384": lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                                                     image_std=[0.5] * 3),
        # ViT's class defaults (bilinear, mean/std 0.5) and size; 384 so that the resize is not a no-op.
        "vit384": lambda: ViTImageProcessorPil(size={"height": 384, "width": 384}),
    }[kind]()
    settings = pp.image_settings(_saved(processor, tmp_path, layout))
    # ViT's processor has no do_convert_rgb: transformers itself fails on RGBA / L images there (we convert them).
    for i, (h, w, mode) in enumerate([(300, 500, "RGB"), (501, 223, "RGBA"), (40, 37, "L")]):
        if kind == "vit384" and mode != "RGB":
            continue
        image = _random_image(h, w, mode, seed=i)
        ours = pp.preprocess_image(image, settings)
        ref = _hf(processor, image)
        assert ours.shape == ref.shape == ((336, 336, 3) if kind == "clip336" else (384, 384, 3))
        assert np.abs(ours - ref).max() < 1e-6


@pytest.mark.parametrize("h,w", [(224, 224), (300, 500), (400, 250), (37, 41)])
def test_crop_params_within_bounds(h, w):
    scale, ratio = (0.5, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(h + w)
    for _ in range(200):
        top, left, ch, cw = pp.sample_crop_params(h, w, rng, scale, ratio)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        # Rounding of w and h to integers moves the area / ratio by at most about one pixel per side.
        assert scale[0] * h * w - (ch + cw + 1) <= ch * cw <= scale[1] * h * w + (ch + cw + 1)
        assert ratio[0] - 2 / min(ch, cw) <= cw / ch <= ratio[1] + 2 / min(ch, cw)


def test_crop_params_fallback_is_center_crop():
    # A 10 x 1000 strip: no crop with area >= 50% and ratio <= 4/3 fits, so all 10 tries fail.
    top, left, ch, cw = pp.sample_crop_params(10, 1000, np.random.default_rng(0))
    assert (top, ch, cw) == (0, 10, round(10 * 4 / 3)) and left == (1000 - cw) // 2
    top, left, ch, cw = pp.sample_crop_params(1000, 10, np.random.default_rng(0))
    assert (left, cw, ch) == (0, 10, round(10 / (3 / 4))) and top == (1000 - ch) // 2


def test_crop_params_deterministic():
    a = [pp.sample_crop_params(300, 400, np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]


def test_augment_deterministic_shape_and_flip():
    image = _random_image(180, 260, seed=5)
    a = pp.augment(image, np.random.default_rng(42), size=64)
    b = pp.augment(image, np.random.default_rng(42), size=64)
    c = pp.augment(image, np.random.default_rng(43), size=64)
    assert a.shape == (64, 64, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Same generator state -> same crop; the flip is drawn last and mirrors the resized crop.
    never = pp.augment(image, np.random.default_rng(1), size=64, flip_p=0.0)
    always = pp.augment(image, np.random.default_rng(1), size=64, flip_p=1.0)
    np.testing.assert_array_equal(always, never[:, ::-1])


def test_augment_full_crop_equals_resize_and_normalise():
    image = _random_image(128, 128, seed=9)
    out = pp.augment(image, np.random.default_rng(0), size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    # Whole-image crop: the same as resizing to 64 (clip_preprocess differs only in float rounding).
    ref = pp.clip_preprocess(image, size=64, crop_size=64)
    assert np.abs(out - ref).max() < 1e-5
    assert math.isclose(float(out.mean()), float(ref.mean()), rel_tol=1e-5)


def test_vit_in21k_feature_extractor_config_is_bit_equal(tmp_path):
    """google/vit-base-patch16-224-in21k's preprocessor_config.json (an old ViTFeatureExtractor, int size, which
    ViT reads as a square, unlike CLIP and SigLIP): ours equals the processor transformers builds from it."""
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(
        do_normalize=True, do_resize=True, feature_extractor_type="ViTFeatureExtractor", image_mean=[0.5] * 3,
        image_std=[0.5] * 3, resample=2, size=224)))
    settings = pp.image_settings(tmp_path)
    assert settings["resize"] == {"height": 224, "width": 224} and settings["resample"] == 2
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    for i, (h, w, mode) in enumerate([(300, 500, "RGB"), (97, 130, "RGB")]):
        image = _random_image(h, w, mode, seed=10 + i)
        np.testing.assert_array_equal(pp.preprocess_image(image, settings), _hf(processor, image))
