"""Parity of vlm_jax.models.clip.CLIP with HF torch CLIPModel (tiny random configs, float32, CPU)."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlm_jax.convert import clip as clip_convert
from vlm_jax.models import clip as clip_lib
from vlm_jax.models.clip import CLIP

# name -> (text overrides, vision overrides, projection_dim); see conftest TINY_CLIP_*.
CASES = {
    # OpenAI-style: quick_gelu, legacy eos_token_id == 2 (pool at argmax(input_ids)).
    "legacy_eos": (dict(eos_token_id=2), dict(), 16),
    # Odd widths / head counts / head_dim, exact gelu, non-square patch grid count, new eos rule.
    "odd_gelu": (dict(hidden_size=21, num_attention_heads=3, intermediate_size=29, hidden_act="gelu",
                      eos_token_id=50, max_position_embeddings=16),
                 dict(hidden_size=30, num_attention_heads=5, intermediate_size=23, hidden_act="gelu",
                      image_size=30, patch_size=5), 12),
    # tanh gelus, 3 layers, other eps, pad == eos (first-EOS rule must skip the padding).
    "tanh_deep": (dict(hidden_size=24, num_attention_heads=2, hidden_act="gelu_pytorch_tanh", num_hidden_layers=3,
                       layer_norm_eps=1e-6, pad_token_id=98),
                  dict(hidden_size=24, num_attention_heads=6, hidden_act="gelu_new", num_hidden_layers=3,
                       layer_norm_eps=1e-6, image_size=28, patch_size=14), 8),
}


def make_inputs(config, batch=3, length=None, seed=0):
    """Random NCHW pixels and right-padded [BOS, tokens..., EOS, PAD...] rows of varying length."""
    rng = np.random.default_rng(seed)
    v, t = config.vision_config, config.text_config
    pixels = rng.standard_normal((batch, 3, v.image_size, v.image_size)).astype(np.float32)
    length = length or t.max_position_embeddings
    # Legacy configs pool at argmax(ids): like OpenAI's vocab, EOS must be the largest id there.
    eos = t.vocab_size - 1 if t.eos_token_id == 2 else t.eos_token_id
    pad = eos if t.eos_token_id == 2 else t.pad_token_id
    ids = np.full((batch, length), pad, np.int64)
    mask = np.zeros((batch, length), np.int64)
    for b, n in enumerate(np.linspace(length, 3, batch).astype(int)):
        body = rng.integers(3, t.vocab_size - 2, n - 2)
        body[body == eos] = eos - 1
        ids[b, :n] = [t.bos_token_id, *body, eos]
        mask[b, :n] = 1
    return pixels, ids, mask


def hf_embeddings(hf_model, pixels, ids, mask):
    with torch.inference_mode():
        image = hf_model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
        text = hf_model.get_text_features(input_ids=torch.from_numpy(ids),
                                          attention_mask=torch.from_numpy(mask)).pooler_output.numpy()
    return image, text


@functools.lru_cache(maxsize=None)
def _encoders(model):
    """jitted (encode_image, encode_text, vision_hidden_states) of a (hashable) module."""
    return (jax.jit(functools.partial(model.apply, method=CLIP.encode_image)),
            jax.jit(functools.partial(model.apply, method=CLIP.encode_text)),
            jax.jit(functools.partial(model.apply, method=CLIP.vision_hidden_states)))


def flax_embeddings(model, params, pixels, ids, mask):
    enc_image, enc_text, _ = _encoders(model)
    image = enc_image({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    text = enc_text({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    return np.asarray(image), np.asarray(text)


@pytest.fixture(scope="module")
def loaded(hf_clip):
    """name -> (hf_model, flax model, params), loaded from HF's save_pretrained output."""
    cache = {}

    def get(name):
        if name not in cache:
            text, vision, proj = CASES[name]
            hf_model, path = hf_clip(name, text=text, vision=vision, projection_dim=proj)
            cache[name] = (hf_model, *clip_convert.from_pretrained(path))
        return cache[name]

    return get


# Text length per case: the full max_position_embeddings, or shorter (position table sliced).
LENGTHS = {"legacy_eos": 12, "odd_gelu": 9, "tanh_deep": 12}


@pytest.mark.parametrize("name", list(CASES))
def test_embeddings_match_hf(loaded, name):
    hf_model, model, params = loaded(name)
    pixels, ids, mask = make_inputs(hf_model.config, length=LENGTHS[name])
    want_image, want_text = hf_embeddings(hf_model, pixels, ids, mask)
    got_image, got_text = flax_embeddings(model, params, pixels, ids, mask)
    chex.assert_shape([got_image, got_text], (3, hf_model.config.projection_dim))
    np.testing.assert_allclose(got_image, want_image, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_text, want_text, atol=1e-5, rtol=0)


def test_eos_rule_follows_config(loaded):
    """Legacy (eos_token_id == 2) pools at argmax(ids); otherwise at the first EOS.

    Causal attention means tokens after the pooled position cannot change the output, so
    rewriting them must leave the embedding unchanged while rewriting earlier ones must not.
    """
    _, model, params = loaded("odd_gelu")
    eos = model.text.eos_token_id
    ids = np.array([[97, 5, eos, 90, eos, 1, 1, 1, 1]] * 3)  # first EOS at 2, largest id at 0
    ids[1, 3:] = [7, 8, 9, 10, 11, 12]  # after the first EOS
    ids[2, 1] = 6  # before it
    mask = np.ones_like(ids)
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    got = np.asarray(_encoders(model)[1]({"params": params}, ids, mask))
    np.testing.assert_allclose(got[1], got[0], atol=1e-6)
    assert np.abs(got[2] - got[0]).max() > 1e-3
    legacy = model.clone(text=dataclasses.replace(model.text, eos_token_id=2))
    got = np.asarray(_encoders(legacy)[1]({"params": params}, ids, mask))
    np.testing.assert_allclose(got[2], got[0], atol=1e-6)  # both pooled at position 0


def test_vision_hidden_states_match_hf(loaded):
    hf_model, model, params = loaded("odd_gelu")
    pixels, _, _ = make_inputs(hf_model.config)
    with torch.inference_mode():
        want = hf_model.vision_model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
    got = _encoders(model)[2]({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert len(got) == len(want) == model.vision.num_layers + 1
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-5, rtol=0)


def test_bfloat16_runs_and_is_close(loaded, hf_clip):
    hf_model, _, _ = loaded("legacy_eos")
    model, params = clip_convert.from_pretrained(hf_clip("legacy_eos")[1], dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    pixels, ids, mask = make_inputs(hf_model.config)
    want_image, want_text = hf_embeddings(hf_model, pixels, ids, mask)
    got_image, got_text = flax_embeddings(model, params, pixels, ids, mask)
    assert got_image.dtype == got_text.dtype == jnp.bfloat16
    for got, want in ((got_image, want_image), (got_text, want_text)):
        got = got.astype(np.float32)
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() > 0.99


def test_params_carry_logical_axes():
    config = transformers.CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                      num_attention_heads=2, vocab_size=50, max_position_embeddings=8),
                                     vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=16, patch_size=8),
                                     projection_dim=8)
    model = CLIP.from_hf_config(config)
    variables = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(batch=2))
    known = {"embed", "mlp", "heads", "kv", "vocab", "pos", "patch_h", "patch_w", "channels", "norm", "proj"}
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for box in leaves:
        assert len(box.names) == box.value.ndim and set(box.names) <= known, box.names
    specs = nn.get_partition_spec(variables)["params"]
    q_spec = specs["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q_spec) == ("embed", "heads", "kv")
    # A mesh rule table resolves every name (Flax rejects repeated names within one array).
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"))
    mesh_specs = nn.logical_to_mesh(specs, rules)
    assert tuple(mesh_specs["visual_projection"]["kernel"]) == ("fsdp", None)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_activations_match_hf(act):
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    want = transformers.activations.ACT2FN[act](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(clip_lib.activation(act)(jnp.asarray(x)), want, atol=1e-6)


def test_bad_inputs_raise(loaded):
    with pytest.raises(ValueError, match="'relu2'"):
        clip_lib.activation("relu2")
    _, model, params = loaded("legacy_eos")
    with pytest.raises(ValueError, match="image size"):
        model.apply({"params": params}, jnp.zeros((1, 3, 32, 32)), method=CLIP.encode_image)  # NCHW by mistake
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.apply({"params": params}, jnp.zeros((1, 13), jnp.int32), method=CLIP.encode_text)
