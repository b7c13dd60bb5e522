"""Parity of vlm_jax.models.siglip.SiglipModel (the SigLIP dual encoder) with HF torch SiglipModel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vlm_jax.convert import siglip as convert
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.models.siglip import SiglipModel

# Odd widths (5 heads of 6), a text projection narrower than the tower, 3 vs 2 layers.
TEXT = dict(hidden_size=30, intermediate_size=23, num_hidden_layers=3, num_attention_heads=5, vocab_size=101,
            max_position_embeddings=12, projection_size=30, pad_token_id=1, bos_token_id=None, eos_token_id=2)
VISION = dict(hidden_size=30, intermediate_size=37, num_hidden_layers=2, num_attention_heads=5, image_size=32,
              patch_size=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT, vision_config=VISION))
    with torch.no_grad():  # HF's init leaves biases at 0 and norms at 1: noise everywhere, so every mapping matters
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.eval()
    path = tmp_path_factory.mktemp("siglip")
    hf.save_pretrained(path)
    model, params = convert.load_siglip_model(path)
    return hf, path, model, params


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = rng.integers(3, 101, (3, 12)).astype(np.int32)
    ids[0, 5:] = 1  # padded to max_position_embeddings, as SigLIP's tokenizer does
    mask = (ids != 1).astype(np.int32)
    return pixels, ids, mask


def test_embeddings_and_logits_match_hf(saved):
    hf, _, model, params = saved
    pixels, ids, mask = _inputs()
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))

    @jax.jit  # one compile for all four outputs
    def ours(p, x, t, m):
        v = {"params": p}
        return (model.apply(v, x, method=SiglipModel.encode_image), model.apply(v, t, method=SiglipModel.encode_text),
                model.apply(v, t, m, method=SiglipModel.encode_text), model.apply(v, x, t))

    img, txt, txt_masked, logits = ours(params, nhwc, jnp.asarray(ids), jnp.asarray(mask))
    with torch.inference_mode():
        t_pix, t_ids = torch.from_numpy(pixels), torch.from_numpy(ids).long()
        ref_img = hf.get_image_features(pixel_values=t_pix).pooler_output.numpy()
        ref_txt = hf.get_text_features(input_ids=t_ids).pooler_output.numpy()
        ref_masked = hf.get_text_features(input_ids=t_ids, attention_mask=torch.from_numpy(mask)).pooler_output.numpy()
        ref_logits = hf(input_ids=t_ids, pixel_values=t_pix).logits_per_image.numpy()
    np.testing.assert_allclose(np.asarray(img), ref_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(txt), ref_txt, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(txt_masked), ref_masked, atol=1e-5, rtol=0)
    assert np.abs(ref_masked - ref_txt).max() > 1e-3  # the mask matters, so the masked comparison means something
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5, rtol=0)


def test_export_loads_in_hf(saved, tmp_path):
    hf, _, model, params = saved
    out = convert.siglip_model_to_hf(model, params, tmp_path / "export")
    back = transformers.SiglipModel.from_pretrained(out).eval()
    pixels, ids, _ = _inputs(1)
    with torch.inference_mode():
        a = hf(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(pixels)).logits_per_image
        b = back(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(pixels)).logits_per_image
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_vision_only_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a SigLIP dual encoder"):
        convert.load_siglip_model(tmp_path)
