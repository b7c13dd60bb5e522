"""InternVL parity with HF `InternVLForConditionalGeneration` (float32, CPU) on two tiny random configs, the
processor against HF's `InternVLProcessor` on the replicas of InternVL3-1B-hf and the converted InternVL2-2B, and
the real InternVL2-2B's parameter count from shapes alone."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax.convert import internvl as internvl_convert
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.data import internvl_images, tokenize
from vlm_jax.models import generate
from vlm_jax.models.internvl import InternVL, check_image_tokens
from vlm_jax.testing import replicas

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMG = 60  # <IMG_CONTEXT> id of the random configs
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7)  # 4 x 4 patches -> 2 x 2 tokens per tile
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    # InternVL 2.5 / 3 -hf: LayerNorm InternViT with qkv bias, Qwen2 LM tied; a hidden state (-2) selected.
    "layernorm_qwen2": dict(vision_config=dict(VISION, attention_bias=True),
                            text_config=dict(TEXT, model_type="qwen2", max_position_embeddings=256),
                            vision_feature_layer=-2, tie_word_embeddings=True),
    # InternViT-6B style (RMSNorm, qk-norm, final LayerNorm: use_mean_pooling=False, mask token) + converted
    # InternLM2 (Llama, untied, dynamic NTK rope whose 16 positions the prompts outgrow).
    "rmsnorm_qknorm_llama": dict(
        vision_config=dict(VISION, norm_type="rms_norm", use_qk_norm=True, use_mean_pooling=False,
                           use_mask_token=True, layer_norm_eps=1e-5),
        text_config=dict(TEXT, model_type="llama", max_position_embeddings=16, tie_word_embeddings=False,
                         rope_scaling=dict(type="dynamic", factor=2.0)),
        vision_feature_layer=-1, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=list(CASES))
def hf_internvl(request, tmp_path_factory):
    config = transformers.InternVLConfig(image_token_id=IMG, **CASES[request.param])
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF inits norms to 1, biases and CLS/positions to 0: that would hide mapping bugs
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ours, params = internvl_convert.from_pretrained(path)
    return request.param, model, path, ours, params


def _left_padded(rows):
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def _nchw(pixels):
    return torch.tensor(pixels.transpose(0, 3, 1, 2))


def test_logits_match_hf(hf_internvl):
    """Left-padded rows: one image of 2 tiles, then one of 1 tile; the text around them."""
    name, hf, _, model, params = hf_internvl
    t = model.cfg.tokens_per_tile
    assert t == 4
    ids, mask = _left_padded([[1, 5, 6] + [IMG] * (2 * t) + [7, 8, 9, 10, 11, 12, 13],
                              [1, 9] + [IMG] * t + [10, 11]])
    check_image_tokens(ids, 3, t, IMG)
    pixels = np.random.default_rng(0).normal(size=(3, 28, 28, 3)).astype(np.float32)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)  # what HF generate passes; HF's default is arange
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=_nchw(pixels),
                 position_ids=torch.tensor(pos)).logits.numpy()
    out = np.asarray(jax.jit(model.apply)({"params": params}, ids.astype(np.int32), mask.astype(np.int32), pixels))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0, err_msg=name)


def test_greedy_generation_matches_hf(hf_internvl):
    """On the converted-InternLM2 config: its dynamic NTK rope regrows past 16 positions while decoding."""
    name, hf, _, model, params = hf_internvl
    if name != "rmsnorm_qknorm_llama":
        pytest.skip("one config suffices for decoding (the logits test covers both)")
    t = model.cfg.tokens_per_tile
    ids, mask = _left_padded([[1, 5] + [IMG] * t + [7], [1, 9, 4, 3] + [IMG] * t + [8, 6]])
    pixels = np.random.default_rng(1).normal(size=(2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=_nchw(pixels),
                          do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    embeds = model.apply({"params": params}, ids.astype(np.int32), pixels, method="embed_multimodal")
    out = generate.greedy_generate(model, params, None, mask, 8, eos_token_id=None, pad_token_id=0,
                                   inputs_embeds=embeds, bucket_multiple=8)
    np.testing.assert_array_equal(np.asarray(out), ref[:, ids.shape[1]:].numpy(), err_msg=name)


def test_export_and_hub_names_round_trip(hf_internvl, tmp_path):
    """to_hf loads in transformers with HF's own logits; the -hf hub names ('model.vision_tower.' ...) load too."""
    from safetensors.numpy import load_file, save_file

    name, hf, path, model, params = hf_internvl
    out = internvl_convert.to_hf(model, params, tmp_path / "export")
    again = transformers.InternVLForConditionalGeneration.from_pretrained(out).eval()
    ids = np.array([[1, 5] + [IMG] * 4 + [7]])
    pixels = _nchw(np.random.default_rng(2).normal(size=(1, 28, 28, 3)).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(again(input_ids=torch.tensor(ids), pixel_values=pixels).logits.numpy(),
                                   hf(input_ids=torch.tensor(ids), pixel_values=pixels).logits.numpy(), atol=1e-6)
    rename = [("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
              ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")]
    hub = {}
    for k, v in load_file(out / "model.safetensors").items():
        old, new = next((o, n) for o, n in rename if k.startswith(o))
        hub[new + k[len(old):]] = v
    (tmp_path / "hub").mkdir()
    save_file(hub, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "hub" / "config.json").write_text((path / "config.json").read_text())
    _, loaded = internvl_convert.from_pretrained(tmp_path / "hub")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_errors(hf_internvl, tmp_path):
    name, _, path, model, params = hf_internvl
    cfg = json.loads((path / "config.json").read_text())
    for key, value, match in [("model_type", "internvl_chat", "not 'internvl'"),
                              ("vision_feature_select_strategy", "full", "'full' is not supported")]:
        bad = tmp_path / key
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**cfg, key: value}))
        (bad / "model.safetensors").symlink_to(path / "model.safetensors")
        with pytest.raises(CheckpointError, match=match):
            internvl_convert.from_pretrained(bad)
    with pytest.raises(ValueError, match="tile size"):
        model.apply({"params": params}, np.zeros((1, 8), np.int32), None, np.zeros((1, 32, 32, 3), np.float32))


# ----------------------------------------------------------------------------- processor, on the replicas


@pytest.fixture(scope="module")
def hf_processor_class(request):
    """transformers' InternVLProcessor, buildable without torchvision: it insists on a video processor (only
    torchvision provides one); images never touch it, so the check is skipped for a missing one."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    mp = pytest.MonkeyPatch()
    mp.setattr(ProcessorMixin, "check_argument_for_proper_class",
               lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg))
    request.addfinalizer(mp.undo)
    return transformers.InternVLProcessor


def _images():
    """A square image (1 tile), a 3:1 one (3 tiles + thumbnail); test_tile_grid_equals_hf covers the grids."""
    shapes = [(100, 100), (60, 200)]
    return [Image.fromarray(np.random.RandomState(s).randint(0, 256, (h, w, 3), dtype=np.uint8))
            for s, (h, w) in enumerate(shapes)]


@pytest.mark.parametrize("name", ["internvl3-1b", "internvl2-2b"])
def test_replica_processor_and_model_equal_hf(name, tmp_path, hf_processor_class):
    path = replicas.write_replica(name, tmp_path / name, ["What is shown in this image?", "a cat"])
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        {"internvl3-1b": "Qwen2Tokenizer", "internvl2-2b": "LlamaTokenizer"}[name]
    tok = tokenize.load_tokenizer(path)
    proc = hf_processor_class(image_processor=transformers.GotOcr2ImageProcessorPil.from_pretrained(path),
                              tokenizer=tok, video_processor=None,
                              image_seq_length=json.loads((path / "processor_config.json").read_text())[
                                  "image_seq_length"],
                              chat_template=json.loads((path / "chat_template.json").read_text())["chat_template"])
    convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
             [{"role": "user", "content": [{"type": "text", "text": "a cat"}, {"type": "image"}]}]]
    texts = [proc.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    ref = proc(text=texts, images=_images(), padding=True, return_tensors="np")
    settings = internvl_images.image_settings(path)
    ours = internvl_images.process(tok, texts, _images(), settings)
    assert ours["num_tiles"].tolist() == [1, 4]
    assert [internvl_images.num_tiles(im.height, im.width, settings) for im in _images()] == [1, 4]
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])  # <img> 256 x n <IMG_CONTEXT> </img>
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"].transpose(0, 2, 3, 1))  # bit-equal
    # A tokenizer whose config names a padding side overrides the processor's 'left', in HF and here.
    right = transformers.AutoTokenizer.from_pretrained(path, padding_side="right")
    proc.tokenizer = right
    ref_right = proc(text=texts, images=_images(), padding=True, return_tensors="np")["input_ids"]
    assert ref_right[0, -1] == right.pad_token_id
    np.testing.assert_array_equal(internvl_images.process(right, texts, _images(), settings)["input_ids"], ref_right)
    # The model on the processor's output: HF itself runs the replica (on the first prompt and its one-tile
    # image); on the converted InternVL2 (dynamic rope, Llama tokenizer) the port gives HF's logits too.
    hf = transformers.InternVLForConditionalGeneration.from_pretrained(path).eval()
    model, params = internvl_convert.from_pretrained(path)
    assert model.cfg.tokens_per_tile == settings["image_seq_length"] == 256
    ids, mask, pixels = ours["input_ids"][:1], ours["attention_mask"][:1], ours["pixel_values"][:1]
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos), pixel_values=_nchw(pixels)).logits.numpy()
    assert np.isfinite(want).all() and want.shape == (*ids.shape, model.cfg.text.vocab_size)
    if name == "internvl2-2b":
        got = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask, pixels))
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_tile_grid_equals_hf():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = np.random.default_rng(0)
    sizes = [(448, 448), (448, 896), (896, 448), (224, 448), (1000, 10), (10, 1000), (447, 1344), (1344, 448)]
    sizes += [tuple(int(v) for v in rng.integers(8, 3000, 2)) for _ in range(200)]
    for lo, hi in [(1, 12), (1, 6), (2, 9)]:
        settings = dict(tile=[448, 448], min_tiles=lo, max_tiles=hi)
        for h, w in sizes:
            assert internvl_images.tile_grid(h, w, settings) == get_optimal_tiled_canvas((h, w), (448, 448), lo, hi)


def test_processor_errors(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "GotOcr2ImageProcessorFast", "do_center_crop": True}))
    with pytest.raises(ValueError, match=r"unsupported image processor settings \['do_center_crop'\]"):
        internvl_images.image_settings(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    with pytest.raises(ValueError, match="not InternVL's"):
        internvl_images.image_settings(tmp_path)
    with pytest.raises(ValueError, match="hold 2 <IMG_CONTEXT> placeholder"):
        internvl_images.expand_prompts(["<IMG_CONTEXT><IMG_CONTEXT>"], [1], 4, ("<img>", "<IMG_CONTEXT>", "</img>"))


# ----------------------------------------------------------------------------- the real InternVL2-2B


def test_internvl2_2b_parameter_count():
    """OpenGVLab/InternVL2-2B after conversion: InternViT-300M-448px + InternLM2-chat-1.8B (Llama format) + MLP
    projector, from the published config values; eval_shape allocates nothing. Published size: 2.2B (2,205M)."""
    config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=448, patch_size=14, attention_bias=True, norm_type="layer_norm",
                           layer_norm_eps=1e-6),
        text_config=dict(model_type="llama", vocab_size=92553, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
                         rope_scaling=dict(type="dynamic", factor=2.0), tie_word_embeddings=False),
        image_token_id=92546, downsample_ratio=0.5, tie_word_embeddings=False)
    model = InternVL.from_hf_config(config)
    shapes = internvl_convert.param_shapes(model)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        hf = transformers.InternVLForConditionalGeneration(config)
    print(f"InternVL2-2B parameters: {ours:,} (published: 2.2B)")
    assert ours == sum(p.numel() for p in hf.parameters())
    assert 2.15e9 < ours < 2.25e9
    assert model.cfg.tokens_per_tile == 256 and model.cfg.text.rope_type == "dynamic"


@pytest.mark.parametrize("hf_internvl", ["layernorm_qwen2"], indirect=True)  # one config: the LoRA compile costs
def test_peft_adapter_export_matches_hf(hf_internvl, tmp_path):
    """LoRA exported as a PEFT adapter (convert/adapters.py) and loaded by `peft` onto the HF model gives our LoRA
    model's logits: the in-memory module names of InternVLForConditionalGeneration are right."""
    import copy

    peft_lib = pytest.importorskip("peft")
    from vlm_jax.convert import adapters
    from vlm_jax.methods import vladva
    from vlm_jax.models import peft
    from vlm_jax.testing import common

    _, hf, _, model, params = hf_internvl
    lora = common.random_lora(params, vladva.LORA_TARGETS, rank=2, seed=1, std=0.1)
    out = adapters.write_peft_adapter(tmp_path / "adapter", model, lora, rank=2, alpha=4.0, base_model="base")
    t = model.cfg.tokens_per_tile
    ids, mask = _left_padded([[1, 5] + [IMG] * t + [7, 8], [1, 9, 3] + [IMG] * t + [10]])
    pixels = np.random.default_rng(1).normal(size=(2, 28, 28, 3)).astype(np.float32)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    adapted = peft_lib.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()  # a copy: the fixture stays plain
    with torch.no_grad():
        ref = adapted(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=_nchw(pixels),
                      position_ids=torch.tensor(pos)).logits.numpy()
    ours = jax.jit(peft.LoraModel(model, alpha=4.0, rank=2).apply)({"params": {"base": params, "lora": lora}},
                                                          ids.astype(np.int32), mask.astype(np.int32), pixels)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4, rtol=0)
