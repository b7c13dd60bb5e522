"""Qwen2-VL parity with HF `Qwen2VLForConditionalGeneration` (float32): logits and M-RoPE positions on two tiny
random configs with images and left padding, greedy decoding against HF `generate`, the image processor and
prompt ids against HF's processor on the Qwen2-VL-2B-Instruct replica, and the real 2B's parameter count."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlm_jax.convert import qwen2_vl as convert
from vlm_jax.convert import stream
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.data import qwen2_vl_images as images
from vlm_jax.errors import UserError
from vlm_jax.models import generate
from vlm_jax.models import qwen2_vl as q2
from vlm_jax.testing import replicas, replicas_qwen2_vl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMG, VIDEO, START, END = 60, 61, 62, 63
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    # The 2B's shape: GQA, tied embeddings, section proportions 16:24:24, 2 x 2 merge, quick-GELU.
    "gqa_tied": dict(text_config=dict(num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                       "rope_theta": 1e6}, **TEXT),
                     vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4,
                                        spatial_merge_size=2, temporal_patch_size=2),
                     tie_word_embeddings=True),
    # Other axes: untied head, MHA, another section split and theta, no merge, 3 vision heads, erf GELU.
    "mha_nomerge": dict(text_config=dict(num_attention_heads=2, num_key_value_heads=2,
                                         rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                          "rope_theta": 1e4}, **TEXT),
                        vision_config=dict(depth=3, embed_dim=24, hidden_size=32, num_heads=3, patch_size=2,
                                           spatial_merge_size=1, temporal_patch_size=2, hidden_act="gelu",
                                           mlp_ratio=2)),
}
GRIDS = np.array([[1, 4, 6], [1, 8, 4], [1, 4, 4]])  # (t, h, w) in patches; three images of different shapes


@pytest.fixture(scope="module", params=list(CASES))
def hf_qwen2_vl(request, tmp_path_factory):
    config = transformers.Qwen2VLConfig(image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=START,
                                        vision_end_token_id=END, **CASES[request.param])
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0, which would hide mapping bugs
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)  # transformers 5 names: model.visual., model.language_model.
    ours, params = convert.from_pretrained(path)
    return request.param, model, path, ours, params


def _batch(cfg: q2.Qwen2VLConfig, rng):
    """Two LEFT-padded rows: row 0 = text, image 0, text; row 1 = text, image 1, text, image 2, text."""
    n = [cfg.tokens_per_image(g) for g in GRIDS]
    rows = [[5, START] + [IMG] * n[0] + [END, 7, 8],
            [3, 4, START] + [IMG] * n[1] + [END, 9, START] + [IMG] * n[2] + [END, 10]]
    length = max(map(len, rows)) + 1
    ids, mask = np.zeros((2, length), np.int64), np.zeros((2, length), np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    pixels = rng.normal(size=(int(GRIDS.prod(1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    return ids, mask, pixels


def _hf_inputs(ids, mask, pixels):
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
                image_grid_thw=torch.tensor(GRIDS), mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))


def test_logits_and_positions_match_hf(hf_qwen2_vl):
    name, hf, _, model, params = hf_qwen2_vl
    ids, mask, pixels = _batch(model.cfg, np.random.default_rng(0))
    q2.check_image_tokens(ids, GRIDS, model.cfg)
    inputs = _hf_inputs(ids, mask, pixels)
    with torch.no_grad():
        ref = hf(**inputs).logits.numpy()
        ref_pos, ref_delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs[
            "image_grid_thw"], attention_mask=inputs["attention_mask"])
    pos, delta = model.rope_positions(ids, mask, GRIDS)
    np.testing.assert_array_equal(np.asarray(pos), ref_pos.numpy(), err_msg=name)
    np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy()[:, 0], err_msg=name)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                               jnp.asarray(pixels), jnp.asarray(GRIDS, jnp.int32))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("hf_qwen2_vl", ["gqa_tied"], indirect=True)  # one config decodes: the compile costs
def test_greedy_generation_matches_hf(hf_qwen2_vl):
    _, hf, _, model, params = hf_qwen2_vl
    ids, mask, pixels = _batch(model.cfg, np.random.default_rng(1))
    with torch.no_grad():
        ref = hf.generate(**_hf_inputs(ids, mask, pixels), do_sample=False, max_new_tokens=8, eos_token_id=None,
                          pad_token_id=0)[:, ids.shape[1]:].numpy()
    embeds = jax.jit(model.apply, static_argnames="method")(
        {"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(pixels), jnp.asarray(GRIDS, jnp.int32),
        method="embed_multimodal")
    positions, _ = model.rope_positions(ids, mask, GRIDS)
    out = generate.greedy_generate(model, params, None, mask, 8, eos_token_id=None, pad_token_id=0,
                                   inputs_embeds=embeds, positions=positions, bucket_multiple=16)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_export_roundtrip(hf_qwen2_vl, tmp_path):
    """to_hf writes the hub's names (visual., model., lm_head), which HF loads; the reload equals the params."""
    name, hf, _, model, params = hf_qwen2_vl
    out = convert.to_hf(model, params, tmp_path / "export")
    names = set(stream.open_tensors(out))
    assert "visual.patch_embed.proj.weight" in names and "model.embed_tokens.weight" in names
    again = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    want, got = hf.state_dict(), again.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), (name, k)
    _, reloaded = convert.from_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)


# ----------------------------------------------------------------------------- replica + processor


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    path = replicas.write_replica("qwen2-vl", tmp_path_factory.mktemp("replica") / "qwen2-vl",
                                  ["What is in the picture?", "Describe both images."])
    return path, replicas_qwen2_vl.hf_processor(path)


def _image(seed, h, w):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def test_replica_processor_bit_equal_and_runs_in_hf(replica):
    path, proc = replica
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "chat_template.json", "tokenizer.json",
            "tokenizer_config.json"} <= files  # the hub repo's layout
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    # 300x420 rounds to 308x420; 20x30 is below min_pixels and grows to 56x84.
    imgs = [_image(0, 300, 420), _image(1, 20, 30)]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Describe both images."}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    ref = proc(text=[text], images=imgs, return_tensors="np")
    ours = images.preprocess_images(imgs, images.image_settings(path))
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])  # bit-equal
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["image_grid_thw"].tolist() == [[1, 22, 30], [1, 4, 6]]
    tok = proc.tokenizer
    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    rendered = tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=True)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    ids = images.expand_image_tokens(tok(rendered)["input_ids"], ours["image_grid_thw"], image_id, 2)
    assert ids == ref["input_ids"][0].tolist()
    # The replica runs in HF, and the port equals it on the processor's own outputs.
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
    small = proc(text=[text], images=[imgs[1], imgs[1]], return_tensors="np")
    with torch.no_grad():
        want = hf(**{k: torch.tensor(v) for k, v in small.items()}).logits.numpy()
    model, params = convert.from_pretrained(path)
    assert model.cfg.image_token_id == image_id and model.cfg.text.tie_word_embeddings
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(small["input_ids"], jnp.int32), None,
                               jnp.asarray(small["pixel_values"]), jnp.asarray(small["image_grid_thw"], jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_smart_resize_matches_hf():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rng = np.random.default_rng(0)
    sizes = [(28, 28), (1, 150), (5000, 4000), (10000, 10000), (27, 29), (4000, 21)] + \
        [tuple(int(v) for v in rng.integers(10, 5000, 2)) for _ in range(300)]
    for h, w in sizes:
        for lo, hi in ((3136, 12845056), (3136, 200704)):
            assert images.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    with pytest.raises(UserError, match="aspect ratio"):
        images.smart_resize(1, 300, 28, 3136, 12845056)


def test_settings_forms_and_errors(tmp_path):
    hub = dict(replicas_qwen2_vl.QWEN2_VL_2B.image_processor)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub))
    s = images.image_settings(tmp_path)
    assert (s["min_pixels"], s["max_pixels"], s["merge_size"]) == (3136, 12845056, 2)
    five = tmp_path / "five"
    five.mkdir()  # transformers 5's processor_config.json form: size = {shortest_edge, longest_edge}
    image = {k: v for k, v in hub.items() if k not in ("min_pixels", "max_pixels", "processor_class")}
    (five / "processor_config.json").write_text(json.dumps({"image_processor": dict(
        image, size={"shortest_edge": 100, "longest_edge": 5000})}))
    assert (images.image_settings(five)["min_pixels"], images.image_settings(five)["max_pixels"]) == (100, 5000)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(hub, min_pixel=5)))
    with pytest.raises(UserError, match=r"unknown Qwen2-VL image processor setting\(s\) \['min_pixel'\]"):
        images.image_settings(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(hub, image_processor_type="CLIPImageProcessor")))
    with pytest.raises(UserError, match="not Qwen2-VL's"):
        images.image_settings(tmp_path)
    with pytest.raises(UserError, match="2 image placeholder"):
        images.expand_image_tokens([5, IMG, IMG], [[1, 2, 2]], IMG, 2)


def test_errors(hf_qwen2_vl, tmp_path):
    _, _, path, model, _ = hf_qwen2_vl
    with pytest.raises(ValueError, match="image tokens"):
        q2.check_image_tokens(np.full((1, 5), IMG), GRIDS, model.cfg)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["use_sliding_window"] = True
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="sliding-window"):
        convert.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="llava")))
    with pytest.raises(CheckpointError, match="not 'qwen2_vl'"):
        convert.from_pretrained(bad)


# ----------------------------------------------------------------------------- the real size

# Qwen/Qwen2-VL-2B-Instruct's config.json (the hub's flat, transformers-4 form).
QWEN2_VL_2B_CONFIG = dict(
    model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"], vocab_size=151936, hidden_size=1536,
    intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, hidden_act="silu",
    max_position_embeddings=32768, max_window_layers=28, rms_norm_eps=1e-6, rope_theta=1000000.0,
    sliding_window=32768, use_sliding_window=False, tie_word_embeddings=True, bos_token_id=151643,
    eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
    image_token_id=151655, video_token_id=151656, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=1536,
                       patch_size=14, spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2))
# The hub's model.safetensors.index.json: total_size 4,417,971,200 bytes of bfloat16 (2 bytes a parameter).
QWEN2_VL_2B_PARAMS = 4_417_971_200 // 2


def test_real_2b_param_count_without_memory():
    model = q2.Qwen2VL.from_hf_config(QWEN2_VL_2B_CONFIG, scan_layers=True)  # same shapes, stacked: faster trace
    shapes = convert.param_shapes(model)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    vision = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["visual"]))
    print(f"Qwen2-VL-2B: {ours:,} parameters ({vision:,} in the vision tower)")
    assert model.cfg.text.mrope_section == (16, 24, 24) and model.cfg.text.head_dim == 128
    assert ours == QWEN2_VL_2B_PARAMS


@pytest.mark.parametrize("hf_qwen2_vl", ["gqa_tied"], indirect=True)  # one config: the LoRA compile costs
def test_peft_adapter_export_matches_hf(hf_qwen2_vl, tmp_path):
    """LoRA exported as a PEFT adapter (convert/adapters.py) and loaded by `peft` onto the HF model gives our LoRA
    model's logits: the in-memory module names of Qwen2VLForConditionalGeneration are right."""
    import copy

    peft_lib = pytest.importorskip("peft")
    from vlm_jax.convert import adapters
    from vlm_jax.methods import vladva
    from vlm_jax.models import peft
    from vlm_jax.testing import common

    _, hf, _, model, params = hf_qwen2_vl
    lora = common.random_lora(params, vladva.LORA_TARGETS, rank=2, seed=1, std=0.1)
    out = adapters.write_peft_adapter(tmp_path / "adapter", model, lora, rank=2, alpha=4.0, base_model="base")
    ids, mask, pixels = _batch(model.cfg, np.random.default_rng(1))
    adapted = peft_lib.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()  # a copy: the fixture stays plain
    with torch.no_grad():
        ref = adapted(**_hf_inputs(ids, mask, pixels)).logits.numpy()
    ours = jax.jit(peft.LoraModel(model, alpha=4.0, rank=2).apply)(
        {"params": {"base": params, "lora": lora}}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
        jnp.asarray(pixels), jnp.asarray(GRIDS, jnp.int32))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4, rtol=0)
