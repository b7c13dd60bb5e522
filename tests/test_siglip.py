"""Parity of vlm_jax.models.siglip.SiglipVisionTower with HF torch SiglipVisionModel, and its conversion."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlm_jax.convert import loader
from vlm_jax.convert import siglip as convert
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.models.siglip import SiglipVisionTower

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)
CASES = {
    # The MAP head on; HF defaults otherwise (gelu_pytorch_tanh, eps 1e-6).
    "head": dict(vision_use_head=True),
    # LLaVA-like: no head; odd widths (5 heads of 6), 3 layers, exact gelu, other eps; image_size
    # not a multiple of patch_size (4 x 4 patches of 7 in 30 pixels), like so400m-patch14-384.
    "odd": dict(hidden_size=30, num_attention_heads=5, intermediate_size=23, image_size=30, patch_size=7,
                num_hidden_layers=3, hidden_act="gelu", layer_norm_eps=1e-5, vision_use_head=False),
}


def perturb(model):
    """HF initialises biases to 0 and norms to 1, which would hide conversion bugs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
    """name -> (torch SiglipVisionModel, save_pretrained dir), cached per module."""
    cache = {}

    def make(name):
        if name not in cache:
            cfg = transformers.SiglipVisionConfig(**{**TINY, **CASES[name]})
            torch.manual_seed(0)
            model = perturb(transformers.SiglipVisionModel(cfg))
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]

    return make


def pixels_of(model, batch=2, seed=0):
    c = model.config
    return np.random.default_rng(seed).standard_normal((batch, 3, c.image_size, c.image_size)).astype(np.float32)


def hf_outputs(hf_model, pixels):
    with torch.inference_mode():
        out = hf_model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    pooled = None if out.pooler_output is None else out.pooler_output.numpy()
    return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy(), pooled


@functools.lru_cache(maxsize=None)
def _jitted(model):
    """jitted (hidden_states, __call__, both) of a (hashable) module; tests compile only what they use."""
    hidden = functools.partial(model.apply, method=SiglipVisionTower.hidden_states)
    return jax.jit(hidden), jax.jit(model.apply), jax.jit(lambda v, x: (hidden(v, x), model.apply(v, x)))


def flax_outputs(model, params, pixels):
    states, (last, pooled) = _jitted(model)[2]({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    return [np.asarray(s) for s in states], np.asarray(last), None if pooled is None else np.asarray(pooled)


def assert_matches_hf(model, params, hf_model, atol=1e-5):
    pixels = pixels_of(hf_model)
    want_states, want_last, want_pooled = hf_outputs(hf_model, pixels)
    got_states, got_last, got_pooled = flax_outputs(model, params, pixels)
    assert len(got_states) == len(want_states) == model.cfg.num_layers + 1
    for i, (g, w) in enumerate(zip(got_states, want_states)):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"hidden_states[{i}]")
    np.testing.assert_allclose(got_last, want_last, atol=atol, rtol=0)
    assert (got_pooled is None) == (want_pooled is None)
    if want_pooled is not None:
        np.testing.assert_allclose(got_pooled, want_pooled, atol=atol, rtol=0)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_hf(hf_siglip, name):
    hf_model, path = hf_siglip(name)
    model, params = convert.from_pretrained(path)
    assert model.cfg.use_head == hf_model.config.vision_use_head
    assert_matches_hf(model, params, hf_model)


def test_post_layernorm_is_not_in_hidden_states(hf_siglip):
    """LLaVA reads hidden_states[-1]: the last layer's raw output, not last_hidden_state."""
    hf_model, path = hf_siglip("odd")
    model, params = convert.from_pretrained(path)
    states, last, _ = flax_outputs(model, params, pixels_of(hf_model))
    assert np.abs(states[-1] - last).max() > 0.1


def test_siglip_model_checkpoint_and_old_prefix(hf_siglip, tmp_path):
    """A full SiglipModel (image + text) and a transformers-4 style 'vision_model.'-prefixed file."""
    text = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                max_position_embeddings=8)
    cfg = transformers.SiglipConfig(text_config=text, vision_config={**TINY, **CASES["head"]})
    torch.manual_seed(1)
    full = perturb(transformers.SiglipModel(cfg))
    full.save_pretrained(tmp_path / "full")
    model, params = convert.from_pretrained(tmp_path / "full")
    assert_matches_hf(model, params, full.vision_model)
    # The same tower with the prefix transformers 4 wrote for SiglipVisionModel.
    hf_model, path = hf_siglip("odd")
    tensors = {"vision_model." + k: v for k, v in loader.load_tensors(path).items()}
    loader.write_checkpoint(tmp_path / "v4", tensors, loader.read_config(path))
    assert convert.detect_prefix(tensors) == "vision_model."
    assert_trees_equal(convert.from_pretrained(tmp_path / "v4")[1], convert.from_pretrained(path)[1])


def test_head_can_be_dropped_and_missing_head_is_explained(hf_siglip, tmp_path):
    hf_model, path = hf_siglip("head")
    model, params = convert.from_pretrained(path, use_head=False)
    assert "head" not in params and not model.cfg.use_head
    last, pooled = _jitted(model)[1]({"params": params}, jnp.asarray(pixels_of(hf_model).transpose(0, 2, 3, 1)))
    assert pooled is None
    np.testing.assert_allclose(np.asarray(last), hf_outputs(hf_model, pixels_of(hf_model))[1], atol=1e-5)
    # Config says head, weights have none: a clear error with the fix.
    tensors = {k: v for k, v in loader.load_tensors(path).items() if not k.startswith("head.")}
    loader.write_checkpoint(tmp_path / "headless", tensors, loader.read_config(path))
    with pytest.raises(CheckpointError, match="use_head=False"):
        convert.from_pretrained(tmp_path / "headless")
    assert "head" not in convert.from_pretrained(tmp_path / "headless", use_head=False)[1]


def test_llava_checkpoint_tower(tmp_path):
    """The tower inside a LLaVA checkpoint, under each prefix LLaVA files use, feeds HF's projector exactly."""
    vision = {**TINY, **CASES["odd"], "model_type": "siglip_vision_model", "vision_use_head": True}
    text = dict(model_type="qwen2", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                   vision_feature_select_strategy="full", image_token_id=63)
    torch.manual_seed(2)
    llava = perturb(transformers.LlavaForConditionalGeneration(cfg))
    llava.save_pretrained(tmp_path / "llava")
    saved = loader.load_tensors(tmp_path / "llava")
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in saved.items()}
    memory = {k: v.detach().numpy() for k, v in llava.state_dict().items()}
    model = SiglipVisionTower.from_hf_config(cfg, use_head=False)  # LLaVA never runs the head
    shapes = {"vision_tower": convert.param_shapes(model)}
    pixels = pixels_of(llava.model.vision_tower)
    with torch.inference_mode():
        want = llava.model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        want = torch.stack(list(want)).numpy()
    for tensors, expected in ((saved, "vision_tower."), (hub, "vision_tower.vision_model."),
                              (memory, "model.vision_tower.")):
        prefix = convert.detect_prefix(tensors, convert.LLAVA_PREFIXES)
        assert prefix == expected
        table = convert.siglip_table(model.cfg.num_layers, prefix=prefix, flax_prefix=("vision_tower",))
        # The LM and the projector are not the tower's; this LLaVA's config has a head nothing runs.
        ignore = [f"(?!{re.escape(prefix)}).*", convert.head_pattern(prefix), *convert.IGNORE]
        params = loader.apply_table(table, tensors, shapes, ignore=ignore)
        states = _jitted(model)[0]({"params": params["vision_tower"]}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
        with torch.inference_mode():
            got = llava.model.multi_modal_projector(torch.from_numpy(np.array(states[-1]))).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_export_round_trip(hf_siglip, tmp_path):
    _, path = hf_siglip("head")
    model, params = convert.from_pretrained(path)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32), params)
    for prefix in ("vision_model.", ""):  # transformers 4 style (the default) and 5 style
        out = convert.to_hf(model, params, tmp_path / f"export{prefix or '_'}", prefix=prefix)
        hf_model, info = transformers.SiglipVisionModel.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        assert_matches_hf(model, params, hf_model.eval())
        model2, params2 = convert.from_pretrained(out)
        assert model2 == model and convert.hf_config(model.cfg).to_dict() == convert.hf_config(model).to_dict()
        assert_trees_equal(params2, params)


def test_detect_prefix_error_names_candidates():
    with pytest.raises(CheckpointError, match="vision_tower.embeddings.patch_embedding.weight.*has e.g."):
        convert.detect_prefix(["language_model.embed_tokens.weight"], convert.LLAVA_PREFIXES)


def test_wrong_model_type_and_bad_inputs(hf_siglip, tmp_path):
    _, path = hf_siglip("odd")
    config = dict(loader.read_config(path), model_type="clip_vision_model")
    loader.write_checkpoint(tmp_path / "clip", loader.load_tensors(path), config)
    with pytest.raises(CheckpointError, match="not SigLIP"):
        convert.from_pretrained(tmp_path / "clip")
    model, params = convert.from_pretrained(path)
    with pytest.raises(ValueError, match="NHWC"):
        model.apply({"params": params}, jnp.zeros((1, 3, 30, 30)))  # NCHW by mistake
    with pytest.raises(ValueError, match="'clip_vision_model', not 'siglip_vision_model'"):
        SiglipVisionTower.from_hf_config({"vision_config": {"model_type": "clip_vision_model"}})


def test_bfloat16_runs_and_is_close(hf_siglip):
    hf_model, path = hf_siglip("head")
    model, params = convert.from_pretrained(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    pixels = pixels_of(hf_model)
    _, want_last, want_pooled = hf_outputs(hf_model, pixels)
    x = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    got_last, got_pooled = map(np.asarray, _jitted(model)[1]({"params": params}, x))
    for got, want in ((got_last, want_last), (got_pooled, want_pooled)):
        assert got.dtype == jnp.bfloat16
        got = got.astype(np.float32)
        assert np.isfinite(got).all() and np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_params_carry_logical_axes():
    model = SiglipVisionTower.from_hf_config(transformers.SiglipVisionConfig(**TINY))
    variables = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(batch=2))
    known = {"embed", "mlp", "heads", "kv", "pos", "patch_h", "patch_w", "channels", "norm", "qkv", None}
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for box in leaves:
        assert len(box.names) == box.value.ndim and set(box.names) <= known, box.names
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["head"]["attention"]["in_proj"]["kernel"]) == ("embed", "qkv", "heads", "kv")
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
    mesh_specs = nn.logical_to_mesh(specs, rules)
    assert tuple(mesh_specs["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]) == ("fsdp", "tensor")
    # hidden_states-only init (what a LLaVA module does) still creates the whole tree.
    other = jax.eval_shape(functools.partial(model.init, method=SiglipVisionTower.hidden_states), jax.random.key(0),
                           *model.init_inputs())
    assert jax.tree.structure(other) == jax.tree.structure(variables)
