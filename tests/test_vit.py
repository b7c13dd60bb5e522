"""Parity of vlm_jax.models.vit.ViT with HF torch ViTModel / ViTForImageClassification, and its conversion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlm_jax.convert import vit as convert
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.models.vit import ViT, ViTConfig

# Odd widths on purpose (5 heads of 6, MLP 23): a mapping that mixes heads or transposes shows.
TINY = dict(hidden_size=30, num_hidden_layers=2, num_attention_heads=5, intermediate_size=23, image_size=32,
            patch_size=8, layer_norm_eps=1e-12)


def perturb(model):
    """HF initialises biases to 0, norms to 1 and the class token to 0-ish: noise on all so every mapping matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (torch model, save_pretrained dir) for 'model' (ViTModel + pooler) and 'classifier'."""
    out = {}
    torch.manual_seed(0)
    for kind, cls, extra in (("model", transformers.ViTModel, {}),
                             ("classifier", transformers.ViTForImageClassification, dict(num_labels=7))):
        model = perturb(cls(transformers.ViTConfig(**TINY, **extra)))
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (model, path)
    return out


@functools.lru_cache(maxsize=None)
def _apply(model):
    return jax.jit(model.apply)


def _pixels(batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def _ours(model, params, pixels):
    return jax.tree.map(np.asarray, _apply(model)({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1))))


def test_vit_model_matches_hf(saved):
    hf, path = saved["model"]
    model, params = convert.from_pretrained(path)
    assert model.cfg.pooler and not model.cfg.num_labels
    pixels = _pixels()
    with torch.inference_mode():
        ref = hf(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    out = _ours(model, params, pixels)
    np.testing.assert_allclose(out["last_hidden_state"], ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["pooler_output"], ref.pooler_output.numpy(), atol=1e-5, rtol=0)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=0)


def test_classifier_matches_hf_and_round_trips(saved, tmp_path):
    hf, path = saved["classifier"]
    model, params = convert.from_pretrained(path)
    assert model.cfg.num_labels == 7 and not model.cfg.pooler
    pixels = _pixels(seed=1)
    with torch.inference_mode():
        ref = hf(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    np.testing.assert_allclose(_ours(model, params, pixels)["logits"], ref, atol=1e-5, rtol=0)
    # Export: transformers reads it back to the same logits; the files hold the hub's legacy names.
    out = convert.to_hf(model, params, tmp_path / "export")
    back = transformers.ViTForImageClassification.from_pretrained(out).eval()
    with torch.inference_mode():
        np.testing.assert_allclose(back(pixel_values=torch.from_numpy(pixels)).logits.numpy(), ref, atol=1e-6)


def test_vit_model_export_loads_in_hf(saved, tmp_path):
    hf, path = saved["model"]
    model, params = convert.from_pretrained(path)
    back = transformers.ViTModel.from_pretrained(convert.to_hf(model, params, tmp_path / "export")).eval()
    pixels = _pixels(seed=2)
    with torch.inference_mode():
        a, b = hf(pixel_values=torch.from_numpy(pixels)), back(pixel_values=torch.from_numpy(pixels))
    np.testing.assert_allclose(a.pooler_output.numpy(), b.pooler_output.numpy(), atol=1e-6)


def test_unsupported_and_wrong_checkpoints_are_one_line_errors(saved, tmp_path):
    with pytest.raises(ValueError, match="qkv_bias"):
        ViTConfig.from_hf(transformers.ViTConfig(**TINY, qkv_bias=False))
    hf, path = saved["model"]
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(CheckpointError, match="missing tensors: .*encoder.layer.2"):
        convert.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="deit")))
    with pytest.raises(CheckpointError, match="not ViT"):
        convert.from_pretrained(bad)


def test_vit_base_in21k_parameter_count():
    """google/vit-base-patch16-224-in21k (ViTModel with pooler): 86,389,248 parameters (HF's num_parameters)."""
    cfg = ViTConfig.from_hf(transformers.ViTConfig())  # the defaults are ViT-B/16 at 224
    shapes = jax.eval_shape(ViT(cfg).init, jax.random.key(0), *ViT(cfg).init_inputs())
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        theirs = transformers.ViTModel(transformers.ViTConfig()).num_parameters()
    assert ours == theirs == 86_389_248
