"""The vision replicas (vlm_jax.testing.replicas_vision): each loads in its reference library with the real
structure, and the few-shot program runs end to end on the RN50 (open_clip) and the SigLIP replicas."""

import json

import numpy as np
import pytest
import torch
import transformers

from vlm_jax.convert import dual_encoder
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.testing import replicas, replicas_vision


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    return {name: replicas.resolve_offline(f"replica:{name}", str(root)) if name != "vit-b16-in21k"
            else str(replicas.write_replica(name, root / name)) for name in replicas_vision.REPLICAS}


def test_rn50_replica_is_open_clips_rn50_structure(written):
    from vlm_jax.testing.open_clip_ref import import_open_clip

    open_clip, _ = import_open_clip()
    model = open_clip.create_model(f"local-dir:{written['rn50-openclip']}").eval()  # open_clip reads the weights
    real = open_clip.get_model_config("RN50")
    cfg = json.loads(open(f"{written['rn50-openclip']}/open_clip_config.json").read())["model_cfg"]
    assert cfg["vision_cfg"]["layers"] == real["vision_cfg"]["layers"] and cfg["embed_dim"] == real["embed_dim"]
    assert model.visual.attnpool.num_heads == 32 and model.visual.image_size == 224
    enc = dual_encoder.load_dual_encoder(written["rn50-openclip"])
    assert (enc.family, enc.image_size, enc.text_length) == ("open_clip", 224, 77)
    ids, _ = enc.tokenize(["a photo of a coffee."])
    with torch.inference_mode():
        assert model.encode_text(torch.from_numpy(ids).long()).shape == (1, 1024)


def test_siglip_and_vit_replicas_load_in_transformers(written):
    sig = written["siglip-base"]
    hf = transformers.SiglipModel.from_pretrained(sig).eval()
    assert hf.config.vision_config.image_size == 224 and hf.config.vision_config.patch_size == 16
    tok = transformers.AutoTokenizer.from_pretrained(sig)
    assert type(tok).__name__ == "SiglipTokenizer"
    enc = dual_encoder.load_dual_encoder(sig)
    ids, mask = enc.tokenize(["A photo of a Coffee!"])
    ref = tok(["A photo of a Coffee!"], padding="max_length", return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, ref)  # 64 ids, </s> then </s>-padding, as the checkpoint's tokenizer
    assert ids.shape == (1, 64) and mask.all()  # SigLIP attends to the pads, as trained
    vit = transformers.ViTModel.from_pretrained(written["vit-b16-in21k"])
    assert vit.config.patch_size == 16 and vit.pooler is not None
    assert type(transformers.AutoImageProcessor.from_pretrained(written["vit-b16-in21k"])).__name__.startswith("ViT")
    with pytest.raises(CheckpointError, match="not a dual encoder"):
        dual_encoder.load_dual_encoder(written["vit-b16-in21k"])


@pytest.mark.parametrize("name", ["rn50-openclip", "siglip-base"])
def test_fewshot_program_runs_on_replica(name, written, tmp_path):
    from configs import dualadapter as da_config
    from vlm_jax.programs import fewshot_clip

    c = da_config.get_config("runlocal")
    c.model.checkpoint = written[name]
    c.protocol = "paper"
    c.data.augment_epoch, c.data.max_eval_examples = 1, 40
    c.feature_cache_dir = str(tmp_path / "features")
    if name == "rn50-openclip":
        # The training-free methods only: -F would compile the 16-block ResNet into two more train steps (CI time);
        # the SigLIP run covers the fine-tuned methods on a non-CLIP backbone.
        c.methods = "zeroshot,tip_adapter,dualadapter"
    for m in ("dualadapter", "tip_adapter"):
        c[m].train.epochs = 1
    for g in (*c.dualadapter.search.values(), *c.tip_adapter.search.values()):
        g.steps = 4
    out = fewshot_clip.run(c, str(tmp_path / "run"))
    res = out["runs"][0]["methods"]
    assert set(res) == set(c.methods.split(","))
    # Ten classes of real photos: the cache methods beat chance (10%) even on random weights (crops of one photo
    # share low-level statistics), so the images went through the right tower and preprocessing.
    assert res["tip_adapter"]["test_accuracy"] > 30.0, res
