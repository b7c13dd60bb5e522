"""Parity of vlm_jax.models.open_clip with open_clip (open-clip-torch) built with random weights, the open_clip
checkpoint format both ways, the tokenizer against open_clip's SimpleTokenizer, and RN50's parameter count.

open_clip is imported through `vlm_jax.testing.open_clip_ref`, which registers a torchvision stub when torchvision
cannot be imported (open_clip imports it for image transforms these tests never run; see that module).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vlm_jax.convert import open_clip as convert
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.data import datasets_meta as meta
from vlm_jax.data.tokenize import OpenCLIPTokenizer
from vlm_jax.models import open_clip as oc_lib
from vlm_jax.testing.open_clip_ref import import_open_clip

open_clip, _ = import_open_clip()

TEXT = dict(context_length=16, vocab_size=99, width=24, heads=3, layers=2)
CONFIGS = {
    # A ModifiedResNet: all four stages (one block each, so every first-block downsample and stride path runs),
    # width 8 -> 256-wide features, 4 heads of 64 in the attention pool, at 64 px (a 2 x 2 grid + mean token).
    "resnet": dict(embed_dim=20, quick_gelu=True, vision_cfg=dict(image_size=64, layers=[1, 2, 1, 1], width=8,
                                                                  head_width=64, patch_size=None), text_cfg=TEXT),
    # open_clip's ViT, exact GELU: 4 x 4 patches of 8, 2 layers of 3 heads of 8.
    "vit": dict(embed_dim=20, vision_cfg=dict(image_size=32, layers=2, width=24, head_width=8, patch_size=8),
                text_cfg=TEXT),
}


def _reference(name, tmp_path):
    """(torch open_clip CLIP with every tensor perturbed, its open_clip hub directory)."""
    cfg_file = tmp_path / f"vlmjax-test-{name}.json"
    cfg_file.write_text(json.dumps(CONFIGS[name]))
    open_clip.add_model_config(cfg_file)
    torch.manual_seed(0)
    model = open_clip.create_model(f"vlmjax-test-{name}", pretrained=None).eval()
    with torch.no_grad():  # biases 0, norms 1, BN statistics 0/1 would hide mapping bugs
        for key, t in model.state_dict().items():
            if key.endswith("running_var"):
                t.copy_(0.5 + torch.rand_like(t))
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    ckpt = tmp_path / name
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / convert.WEIGHTS_NAME)
    (ckpt / convert.CONFIG_NAME).write_text(json.dumps({"model_cfg": CONFIGS[name], "preprocess_cfg": {}}))
    return model, ckpt


def _inputs(size, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    ids = np.zeros((3, 16), np.int32)
    for row, n in enumerate((5, 16, 9)):  # EOT (98, the largest id) last, 0-padding after it, one full row
        ids[row, :n] = np.concatenate([[97], rng.integers(1, 97, n - 2), [98]])
    return pixels, ids


def _ours(model, params, pixels, ids):
    f = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    img, txt = f(params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids))
    return np.asarray(img), np.asarray(txt)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_embeddings_match_open_clip_and_export_round_trips(name, tmp_path):
    ref, ckpt = _reference(name, tmp_path)
    model, params = convert.from_pretrained(ckpt)
    assert isinstance(model.cfg.vision, oc_lib.ResNetConfig) == (name == "resnet")
    pixels, ids = _inputs(CONFIGS[name]["vision_cfg"]["image_size"])
    img, txt = _ours(model, params, pixels, ids)
    with torch.inference_mode():
        ref_img = ref.encode_image(torch.from_numpy(pixels)).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(ids).long()).numpy()
    np.testing.assert_allclose(img, ref_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(txt, ref_txt, atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(params["logit_scale"]), ref.logit_scale.item(), rtol=1e-7)
    # Export: open_clip itself loads the directory ('local-dir:'), to the same embeddings.
    out = convert.to_open_clip(model, params, tmp_path / "export")
    back = open_clip.create_model(f"local-dir:{out}").eval()
    with torch.inference_mode():
        np.testing.assert_allclose(back.encode_image(torch.from_numpy(pixels)).numpy(), ref_img, atol=1e-6)


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert.from_pretrained(tmp_path / "nope")
    (tmp_path / convert.CONFIG_NAME).write_text(json.dumps({"model_cfg": CONFIGS["vit"]}))
    (tmp_path / convert.TORCH_WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(CheckpointError, match="only open_clip_pytorch_model.bin .* convert it once"):
        convert.from_pretrained(tmp_path)
    bad = dict(CONFIGS["vit"], vision_cfg=dict(CONFIGS["vit"]["vision_cfg"], attentional_pool=True))
    (tmp_path / convert.CONFIG_NAME).write_text(json.dumps({"model_cfg": bad}))
    with pytest.raises(CheckpointError, match="not supported by vlm_jax: {'attentional_pool': True}"):
        convert.from_pretrained(tmp_path)
    hf_text = dict(CONFIGS["vit"], text_cfg=dict(hf_model_name="xlm-roberta-base", hf_tokenizer_name="x"))
    with pytest.raises(ValueError, match="hf_model_name"):
        oc_lib.config_from_dict(hf_text)


def test_rn50_parameter_count_matches_open_clip():
    """eval_shape of the real RN50 config = open_clip's own count (on torch's meta device): 102,007,137 parameters
    (the published "102M"), plus BatchNorm's running statistics, which we keep as params."""
    cfg = oc_lib.config_from_dict(open_clip.get_model_config("RN50"))
    model = oc_lib.OpenCLIP(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    stats = sum(int(np.prod(x.shape)) for path, x in flat if str(path[-1].key) in ("mean", "var"))
    ours = sum(int(np.prod(x.shape)) for _, x in flat) - stats
    with torch.device("meta"):
        theirs = sum(p.numel() for p in open_clip.model.CLIP(**open_clip.get_model_config("RN50")).parameters())
    assert ours == theirs == 102_007_137
    assert cfg.embed_dim == 1024 and cfg.vision.heads == 32


def _strings():
    names = list(open_clip.IMAGENET_CLASSNAMES[:300]) + list(meta.EUROSAT_NEW_CLASSNAMES.values()) + list(
        meta.CALTECH101_NEW_CLASSNAMES.values())
    templates = [t for ts in meta.TIP_ADAPTER_TEMPLATES.values() for t in ts][:20]
    out = names + [t.format(n) for t, n in zip(templates * 20, names[::3])]
    return out + [
        "", "  ", "A  photo\tof\na CAT!!", "it's the dog's toy, they'll've", "l'été à Paris — naïve café",
        "Ryan’s “quoted” text", "fish &amp; chips &lt;3", "mojibake: cafÃ©", "２０２４ ｆｕｌｌ",
        "ﬁne ligature",
        "numbers 1234567 and 3.14", "emoji 🐱🐶 and 中文字符 and Ελληνικά", "x" * 300,
        " ".join(["word"] * 100), "<|endoftext|> literal", "tab\there", "ALL CAPS CLASS NAME",
    ]


def test_tokenizer_ids_equal_open_clip_simple_tokenizer():
    texts = _strings()
    assert len(texts) > 300
    ours, mask = OpenCLIPTokenizer(context_length=77)(texts)
    theirs = open_clip.tokenizer.SimpleTokenizer()(texts, context_length=77).numpy()
    diff = [t for t, a, b in zip(texts, ours, theirs) if not np.array_equal(a, b)]
    assert not diff, diff[:5]
    np.testing.assert_array_equal(mask, (theirs != 0).astype(np.int32))
