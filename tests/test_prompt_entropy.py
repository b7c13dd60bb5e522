"""VladVA's prompt selection by entropy (vlm_jax.programs.prompt_entropy) against HF transformers + torch: the HF
processor's rows and pixels, the HF model's last-position logits, torch's Categorical entropy; on the llava-1.5
and the Qwen2-VL replicas (Qwen2-VL: M-RoPE positions, its own vision inputs at a fixed image size)."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vlm_jax.errors import UserError
from vlm_jax.programs import prompt_entropy
from vlm_jax.testing import replicas

PROMPTS = ["Summary above image in one word:", "Describe the image in detail.", "What is shown in this image?"]


# replica -> (its LM head weight (Qwen2-VL's is tied to the embeddings), how much to sharpen it, the HF model
# class, --image_size)
FAMILIES = {"llava-1.5": ("language_model.lm_head.weight", 10.0, "LlavaForConditionalGeneration", 0),
            "qwen2-vl": ("model.embed_tokens.weight", 4.0, "Qwen2VLForConditionalGeneration", 224)}


def _peaked(path, head, scale):
    """The replica's random weights give a near-uniform next token (every prompt ~ log V nats): a sharper LM
    head makes the prompts' entropies differ, so the choice is decided by the model, not by rounding."""
    from safetensors.numpy import load_file, save_file

    f = str(path / "model.safetensors")
    w = load_file(f)
    w[head] = w[head] * scale
    save_file(w, f, metadata={"format": "pt"})


def _hf_processor(name, path):
    if name == "qwen2-vl":   # without the video processor (it needs torchvision)
        from vlm_jax.testing import replicas_qwen2_vl
        return replicas_qwen2_vl.hf_processor(path)
    return transformers.AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_entropy_equals_torch_on_a_replica_and_the_highest_is_chosen(tmp_path, capsys, name):
    head, scale, hf_class, size = FAMILIES[name]
    path = replicas.write_replica(name, tmp_path / "replica", PROMPTS)
    _peaked(path, head, scale)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (60 + 20 * i, 90, 3), dtype=np.uint8)) for i in range(2)]
    for i, im in enumerate(images):
        im.save(folder / f"{i}.png")
    out = prompt_entropy.main([f"--checkpoint={path}", "--prompts=" + "|".join(PROMPTS), f"--images={folder}",
                               "--num_images=0", "--batch_size=3", f"--image_size={size}"])   # 2 images: padded

    proc = _hf_processor(name, path)
    hf = getattr(transformers, hf_class).from_pretrained(path).eval()
    if size:   # the run's fixed size: resized first (PIL bicubic, as qwen-vl-utils), then the processor
        images = [im.resize((size, size), resample=Image.Resampling.BICUBIC) for im in images]
    ref = []
    for p in PROMPTS:
        text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                        add_generation_prompt=True)
        hs = []
        for im in images:
            x = proc(text=text, images=im, return_tensors="pt")
            with torch.no_grad():
                logits = hf(**x).logits[0, -1]
            hs.append(float(torch.distributions.Categorical(logits=logits).entropy()))
        ref.append(np.mean(hs))
    got = [out["entropy"][p] for p in PROMPTS]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert out["chosen"] == PROMPTS[int(np.argmax(ref))]
    assert sorted(ref)[-1] - sorted(ref)[-2] > 1e-3, ref   # the choice is not decided by rounding
    assert f"{out['chosen']}" in [l.split("  ")[1] for l in capsys.readouterr().out.splitlines() if "chosen" in l]


def test_bad_arguments():
    with pytest.raises(UserError, match="--prompts is empty"):
        prompt_entropy.parse_prompts(" | ")
    with pytest.raises(UserError, match="twice"):
        prompt_entropy.parse_prompts("a|a")
    with pytest.raises(UserError, match="neither 'builtin' nor a folder"):
        prompt_entropy.load_images("/nonexistent/images", 4)
