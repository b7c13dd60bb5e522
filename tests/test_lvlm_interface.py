"""The LVLM interface. The per-family inputs (`data.lvlm_inputs`) against each checkpoint's own HF processor, on the replicas:
the prompt ids (chat template rendered, the placeholder expanded to the family's image token run) and the vision
arrays are bit-equal to what `processor(text=..., images=...)` returns for the run's static image settings; and
`convert.auto` loads each family and refuses the rest in one line."""

import json

import numpy as np
import pytest
import transformers
from PIL import Image

from vlm_jax.convert import auto
from vlm_jax.data import lvlm_inputs, tokenize
from vlm_jax.data import chat
from vlm_jax.errors import CheckpointError, UserError
from vlm_jax.testing import replicas, replicas_qwen2_vl

TEXTS = ["What is shown in this image?", "a cat"]


def _image(seed, h, w):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def _ours(path, image_size=0):
    tok = tokenize.load_tokenizer(path)
    inputs = lvlm_inputs.for_checkpoint(path, auto.lvlm_config(path), tok, image_size)
    fmt = inputs.chat_format(tok, chat.load_chat_template(path, "", tok))
    return inputs, fmt


@pytest.fixture(scope="module")
def internvl_proc(tmp_path_factory):
    """InternVL2-2B's replica and transformers' InternVLProcessor for it (built without a video processor, which
    needs torchvision; images never touch it)."""
    from transformers.processing_utils import ProcessorMixin

    path = replicas.write_replica("internvl2-2b", tmp_path_factory.mktemp("r") / "internvl2-2b", TEXTS)
    check = ProcessorMixin.check_argument_for_proper_class
    mp = pytest.MonkeyPatch()
    mp.setattr(ProcessorMixin, "check_argument_for_proper_class",
               lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg))
    try:
        proc = transformers.InternVLProcessor(
            image_processor=transformers.GotOcr2ImageProcessorPil.from_pretrained(path),
            tokenizer=tokenize.load_tokenizer(path), video_processor=None,
            image_seq_length=json.loads((path / "processor_config.json").read_text())["image_seq_length"],
            chat_template=json.loads((path / "chat_template.json").read_text())["chat_template"])
    finally:
        mp.undo()
    return path, proc


def test_internvl_inputs_equal_hf_processor_with_one_tile(internvl_proc):
    path, proc = internvl_proc
    inputs, fmt = _ours(path)
    img = _image(0, 60, 200)  # 3:1, which the checkpoint's own setting (max_patches 12) would cut into 3 + 1 tiles
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXTS[0]}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    ref = proc(text=[text], images=[img], max_patches=1, return_tensors="np")
    ids, _ = fmt.encode(fmt.render(TEXTS[0], image=True))
    assert ids == ref["input_ids"][0].tolist()  # <img> 256 x <IMG_CONTEXT> </img>, tokenized as HF
    assert inputs.tokens_per_image == 256 and len(inputs.image_run) == 258
    vision = inputs.batch([inputs.vision(img)])
    np.testing.assert_array_equal(vision["pixel_values"][0], ref["pixel_values"].transpose(0, 2, 3, 1))
    assert set(vision) == {"pixel_values"}
    with pytest.raises(UserError, match="model.image_size=224"):
        _ours(path, 224)


def test_qwen2_vl_inputs_equal_hf_processor_at_the_fixed_size(tmp_path):
    path = replicas.write_replica("qwen2-vl", tmp_path / "qwen2-vl", TEXTS)
    proc = replicas_qwen2_vl.hf_processor(path)
    inputs, fmt = _ours(path, 224)
    img = _image(1, 300, 420)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXTS[0]}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    # The run's static size: the image resized (PIL, the processor's bicubic) to 224 x 224, as qwen-vl-utils'
    # resized_height / resized_width do, then the processor (which keeps 224 x 224).
    square = img.resize((224, 224), resample=Image.Resampling.BICUBIC)
    ref = proc(text=[text], images=[square], return_tensors="np")
    ids, _ = fmt.encode(fmt.render(TEXTS[0], image=True))
    assert ids == ref["input_ids"][0].tolist()  # <|vision_start|> 64 x <|image_pad|> <|vision_end|>
    assert inputs.tokens_per_image == 64
    vision = inputs.batch([inputs.vision(img)] * 2)
    np.testing.assert_array_equal(vision["pixel_values"][0], ref["pixel_values"])
    np.testing.assert_array_equal(vision["image_grid_thw"], np.repeat(ref["image_grid_thw"], 2, 0))
    # A plain format (model.chat_template='USER: {} ASSISTANT:') writes the image as the checkpoint's template
    # does, between the vision start / end markers; the processor expands the placeholder only.
    plain = inputs.chat_format(tokenize.load_tokenizer(path), "USER: {} ASSISTANT:")
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    assert image_text in text   # as the checkpoint's own template writes an image
    marked = "USER: " + image_text + "\n" + TEXTS[0] + " ASSISTANT:"
    assert plain.render(TEXTS[0], image=True) == marked
    assert plain.encode(marked)[0] == proc(text=[marked], images=[square], return_tensors="np")["input_ids"][0].tolist()
    assert _ours(path)[0].tokens_per_image == 256  # the default: 448 px
    for bad in (230, 28):  # not a multiple of 28; below min_pixels (3136 = 56^2)
        with pytest.raises(UserError, match=f"model.image_size={bad}"):
            _ours(path, bad)


def test_auto_refuses_other_model_types_in_one_line(tmp_path):
    for kind in ("llava_next", "llava_onevision", "blip"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "config.json").write_text(json.dumps({"model_type": kind}))
        with pytest.raises(CheckpointError) as e:
            auto.from_pretrained(tmp_path / kind)
        msg = str(e.value)
        assert "\n" not in msg and "llava, internvl, qwen2_vl" in msg and repr(kind) in msg
        if kind != "blip":
            assert "anyres" in msg


# ----------------------------------------------------------------------------- the methods' cached paths, Qwen2-VL


def test_qwen2_vl_cached_ranking_and_decoding_equal_full_passes():
    """VITask's label ranking (prompt prefilled into an `MRopeCache` at its M-RoPE positions, the exemplar after the
    image, answers decoded from the cache's rope delta) equals the full passes of `make_scorer`, and greedy decoding
    from the prompt embeddings equals argmax over full forwards of the growing sequence; the model itself equals HF
    (tests/test_qwen2_vl.py)."""
    import jax
    import jax.numpy as jnp

    from vlm_jax.methods import vitask
    from vlm_jax.models import generate, peft
    from vlm_jax.models import qwen2_vl as q2

    img, start, end = 60, 61, 62
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
        image_token_id=img, vision_start_token_id=start, vision_end_token_id=end)
    model = q2.Qwen2VL.from_hf_config(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32),
                          jax.jit(model.init)(jax.random.key(0), *model.init_inputs())["params"])
    conn = vitask.ExemplarConnector(out_dim=32)
    conn_params = jax.jit(conn.init)(jax.random.key(1), jnp.zeros((1, 8)))["params"]
    b, k = 2, 3
    # Left-padded prompts of two lengths; 56 px images: 4 x 4 patches, 4 tokens; an image grid per row.
    rows = [[1, start] + [img] * 4 + [end, 5, 6], [start] + [img] * 4 + [end, 7]]
    p = max(map(len, rows))
    ids = np.array([[0] * (p - len(r)) + r for r in rows], np.int32)
    mask = np.array([[0] * (p - len(r)) + [1] * len(r) for r in rows], np.int32)
    vision = {"pixel_values": rng.normal(size=(b, 16, model.cfg.vision.patch_dim)).astype(np.float32),
              "image_grid_thw": np.tile(np.array([[1, 4, 4]], np.int32), (b, 1))}
    feats = rng.normal(size=(b, 8)).astype(np.float32)
    ans = rng.integers(5, 50, size=(b, k, 3)).astype(np.int32)
    ans_mask = np.ones_like(ans)
    ans_mask[:, 0, -1] = 0  # a shorter answer
    rank = vitask.make_ranker(model, conn, img)
    lora = peft.lora_init(params, jax.random.key(2), targets=[r"language_model/.*/q_proj/kernel"], rank=2)
    score = vitask.make_scorer(vitask.make_forward(model, conn, img), lora_alpha=2.0, lora_rank=2)
    # The reference rows: prompt + answer, right-padded, each with its own image.
    full = np.concatenate([np.repeat(ids, k, 0), ans.reshape(b * k, 3)], 1)
    full_mask = np.concatenate([np.repeat(mask, k, 0), ans_mask.reshape(b * k, 3)], 1)
    amask = np.concatenate([np.zeros((b * k, p), np.int32), ans_mask.reshape(b * k, 3)], 1)
    rep = {key: np.repeat(v, k, 0) for key, v in vision.items()}
    merged = peft.lora_merge(params, lora, alpha=2.0, rank=2)
    # With the exemplar (the plain pass is the same path without it; test_vitask_program covers it on LLaVA).
    got = np.asarray(rank(merged, conn_params, ids, mask, vision, feats, ans, ans_mask, use_ep=True))
    want = np.asarray(score(params, lora, conn_params, full, full_mask, amask, rep, np.repeat(feats, k, 0),
                            use_ep=True)).reshape(b, k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Greedy decoding from the embedder's (embeds, mask, positions), KV cache + MRopeCache deltas ...
    embed = vitask.make_embedder(model, conn, img)
    e, m, pos = embed(params, conn_params, ids, mask, vision, feats, use_ep=True)
    assert pos.shape == (3, b, p + 1)
    out = np.asarray(generate.greedy_generate(model, params, None, m, 4, eos_token_id=None, pad_token_id=0,
                                              inputs_embeds=e, positions=pos))
    # ... equals argmax of full forwards (no cache) over the prompt + the tokens so far (right-padded to one length,
    # one compile), the positions recomputed from the whole sequence.
    seq = np.asarray(vitask.insert_token(jnp.asarray(ids), -1, vitask.exemplar_position(ids, img)))
    n = seq.shape[1]
    seq = np.pad(seq, ((0, 0), (0, 4)))
    seq_mask = np.pad(np.asarray(m), ((0, 0), (0, 4)))
    embeds = jnp.pad(e, ((0, 0), (0, 4), (0, 0)))

    @jax.jit
    def full_logits(embeds, seq, seq_mask):
        positions = model.positions(seq, seq_mask, **vision)
        hidden = model.apply({"params": params}, None, seq_mask, inputs_embeds=embeds, positions=positions,
                             method="hidden_states")[0]
        return model.apply({"params": params}, hidden, method="logits")

    for step in range(4):
        tok = np.asarray(jnp.argmax(full_logits(embeds, seq, seq_mask)[:, n - 1 + step], -1))
        np.testing.assert_array_equal(tok, out[:, step])
        new = model.apply({"params": params}, jnp.asarray(tok[:, None], jnp.int32), method="embed")
        embeds = embeds.at[:, n + step].set(new[:, 0])
        seq[:, n + step], seq_mask[:, n + step] = tok, 1
