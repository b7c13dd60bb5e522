"""LLaVA parity with HF `LlavaForConditionalGeneration` (float32) on tiny random configs of both targets:
CLIP + Llama (llava-1.5) and SigLIP + Qwen2 (llava-interleave-qwen)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.convert import llava as llava_convert
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.models import generate
from vlm_jax.models.llava import check_image_tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 120
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=8)

CASES = {
    # llava-1.5: CLIP tower, hidden state -2 without the class token, Vicuna (Llama).
    "clip_llama": dict(vision_config=dict(model_type="clip_vision_model", hidden_act="quick_gelu", **VISION),
                       text_config=dict(model_type="llama", **TEXT), vision_feature_layer=-2,
                       vision_feature_select_strategy="default"),
    # llava-interleave-qwen: SigLIP tower, last hidden state, all tokens; Qwen2 with tied embeddings.
    "siglip_qwen2": dict(vision_config=dict(model_type="siglip_vision_model", **VISION),
                         text_config=dict(model_type="qwen2", tie_word_embeddings=True, **TEXT),
                         vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True),
}
# SigLIP with 'default' (HF's value when a config leaves it unset): HF drops the first patch for any tower.
SIGLIP_DEFAULT = dict(vision_config=dict(model_type="siglip_vision_model", **VISION),
                      text_config=dict(model_type="qwen2", **TEXT), vision_feature_layer=-1,
                      vision_feature_select_strategy="default")


@pytest.fixture(scope="module", params=list(CASES))
def hf_llava(request, tmp_path_factory):
    config = transformers.LlavaConfig(image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu", **CASES[request.param])
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0, which would hide mapping bugs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ours, params = llava_convert.from_pretrained(path)
    return request.param, model, path, ours, params


def _batch(tokens_per_image, rng):
    """Two rows, right-padded: row 0 = text, 1 image, text; row 1 = 2 images, text. Images NHWC."""
    t = tokens_per_image
    row0 = [1, 5, 6] + [IMAGE_TOKEN] * t + [7, 8, 9]
    row1 = [1] + [IMAGE_TOKEN] * (2 * t) + [10, 11, 12, 13, 14]
    length = max(len(row0), len(row1)) + 2
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for i, row in enumerate((row0, row1)):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    pixels = rng.normal(size=(3, VISION["image_size"], VISION["image_size"], 3)).astype(np.float32)
    return ids, mask, pixels


def test_logits_match_hf(hf_llava):
    name, hf, _, model, params = hf_llava
    ids, mask, pixels = _batch(model.cfg.tokens_per_image, np.random.default_rng(0))
    check_image_tokens(ids, 3, model.cfg.tokens_per_image, IMAGE_TOKEN)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                                 jnp.asarray(pixels)))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0, err_msg=name)


def test_siglip_default_strategy_matches_hf(tmp_path):
    config = transformers.LlavaConfig(image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu", **SIGLIP_DEFAULT)
    torch.manual_seed(1)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    model, params = llava_convert.from_pretrained(tmp_path)
    assert model.cfg.tokens_per_image == (VISION["image_size"] // VISION["patch_size"]) ** 2 - 1
    ids, mask, pixels = _batch(model.cfg.tokens_per_image, np.random.default_rng(3))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                                 jnp.asarray(pixels)))
    np.testing.assert_allclose(out[mask.astype(bool)], ref[mask.astype(bool)], atol=1e-4, rtol=0)


def test_greedy_generation_matches_hf(hf_llava):
    name, hf, _, model, params = hf_llava
    t = model.cfg.tokens_per_image
    # Left-padded prompts of different lengths, one image each.
    rows = [[1, 5] + [IMAGE_TOKEN] * t + [7], [1, 9, 4, 3] + [IMAGE_TOKEN] * t + [8, 6]]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    pixels = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)), do_sample=False,
                          max_new_tokens=6, eos_token_id=None, pad_token_id=0)[:, length:].numpy()
    embeds = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(pixels),
                         method="embed_multimodal")
    out = generate.greedy_generate(model, params, None, mask, 6, eos_token_id=None, pad_token_id=0,
                                   inputs_embeds=embeds)
    np.testing.assert_array_equal(np.asarray(out), ref, err_msg=name)


def test_export_roundtrip_loads_in_transformers(hf_llava, tmp_path):
    name, hf, _, model, params = hf_llava
    out = llava_convert.to_hf(model, params, tmp_path / "export")
    again = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, mask, pixels = _batch(model.cfg.tokens_per_image, np.random.default_rng(2))
    args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        np.testing.assert_allclose(again(**args).logits.numpy(), hf(**args).logits.numpy(), atol=1e-5, err_msg=name)
    _, reloaded = llava_convert.from_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_other_name_layouts_load(hf_llava, tmp_path):
    """transformers 5 writes 'vision_tower.<...>'; the hub has 'vision_tower.vision_model.<...>'; in-memory
    names are 'model.vision_tower.<...>', 'model.language_model.<...>', 'lm_head'."""
    from safetensors.numpy import load_file, save_file

    name, _, path, _, params = hf_llava
    tensors = load_file(path / "model.safetensors")
    rename = [("vision_tower.", "model.vision_tower.vision_model."),
              ("multi_modal_projector.", "model.multi_modal_projector."),
              ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")]
    legacy = {}
    for k, v in tensors.items():
        for old, new in rename:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        legacy[k] = v
    out = tmp_path / "legacy"
    out.mkdir()
    save_file(legacy, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((path / "config.json").read_text())
    _, loaded = llava_convert.from_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_errors(hf_llava, tmp_path):
    name, _, path, model, _ = hf_llava
    with pytest.raises(ValueError, match="image tokens"):
        check_image_tokens(np.full((1, 5), IMAGE_TOKEN), 2, model.cfg.tokens_per_image, IMAGE_TOKEN)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["model_type"] = "mistral"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'mistral' language model is not supported"):
        llava_convert.from_pretrained(bad)


FULL_SIZE = {
    # llava-hf/llava-1.5-7b-hf: CLIP-L/14 at 336 + Vicuna-7B.
    "llava-1.5-7b": (dict(vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                                             num_hidden_layers=24, num_attention_heads=16, image_size=336,
                                             patch_size=14, projection_dim=768),
                          text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096,
                                           intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                           num_key_value_heads=32),
                          image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default"),
                     576),
    # llava-hf/llava-interleave-qwen-0.5b-hf: SigLIP-so400m/14 at 384 (26 layers, no head) + Qwen2-0.5B.
    "llava-interleave-qwen-0.5b": (
        dict(vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                                vision_use_head=False),
             text_config=dict(model_type="qwen2", vocab_size=152000, hidden_size=896, intermediate_size=4864,
                              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                              tie_word_embeddings=True, rope_theta=1e6),
             image_token_id=151646, vision_feature_layer=-1, vision_feature_select_strategy="full",
             tie_word_embeddings=True),
        729),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_llava_builds_without_memory(name):
    """The real targets' shapes through eval_shape (no memory); parameter counts equal HF's (meta device)."""
    from vlm_jax.models.llava import Llava

    kwargs, tokens = FULL_SIZE[name]
    config = transformers.LlavaConfig(**kwargs)
    model = Llava.from_hf_config(config)
    shapes = llava_convert.param_shapes(model)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        hf = transformers.LlavaForConditionalGeneration(config)
    assert ours == sum(p.numel() for p in hf.parameters())
    assert model.cfg.tokens_per_image == tokens
