"""The per-family LVLM inputs (`data.lvlm_inputs`) against each checkpoint's own HF processor, on the replicas:
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
