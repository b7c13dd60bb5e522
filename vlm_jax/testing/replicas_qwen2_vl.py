"""An offline replica of Qwen/Qwen2-VL-2B-Instruct: its structure at tiny widths (see `replicas` for the idea).

Kept from the real checkpoint: the config keys and what shapes the data (patch 14, temporal patch 2, 2 x 2
merge, so tokens per image = (H / 28) * (W / 28) after `smart_resize`; M-RoPE with the 2B's section proportions;
RoPE theta 1e6; tied embeddings; GQA; quick-GELU vision MLP), the tokenizer class and its specials in the hub's
order (a byte-level BPE trained on the spot with Qwen2's normaliser and pre-tokenizer, loaded as
`Qwen2Tokenizer`: '<|endoftext|>' (pad) then '<|im_start|>', '<|im_end|>' (eos) ... '<|vision_start|>',
'<|vision_end|>', '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>'; no BOS; left padding), the image processor
config (min / max pixels 3136 / 12845056, CLIP mean / std) and the chat template, in the hub repo's file layout
(preprocessor_config.json, chat_template.json, tokenizer files; no processor_config.json).

  python -m vlm_jax.testing.replicas qwen2-vl /tmp/qwen2-vl-replica

transformers' `Qwen2VLProcessor` also loads a video processor, which needs torchvision; `hf_processor` builds the
same processor without its video half, so the HF processing code runs where torchvision is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

from vlm_jax.testing import common

# Qwen/Qwen2-VL-2B-Instruct's chat_template.json.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
# The specials after '<|endoftext|>', in the hub tokenizer's order (ids 151644 ... 151656 there).
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
            "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>")


@dataclasses.dataclass(frozen=True)
class Qwen2VLReplica:
    """What the replica copies from its real checkpoint."""

    hub_id: str
    vision: dict            # HF vision_config (tiny widths)
    text: dict              # HF text keys (tiny widths)
    image_processor: dict   # the hub's preprocessor_config.json
    chat_template: str
    vocab_size: int = 1000  # the trained BPE's size (plus specials)

    def write(self, out_dir, corpus: Sequence[str] = (), *, seed: int = 0, layout: str = "hub",
              dtype=None) -> pathlib.Path:
        """Writes the replica into `out_dir` atomically; see `replicas.write_replica` for the arguments."""
        return _write(self, out_dir, corpus, seed=seed, layout=layout, dtype=dtype)


QWEN2_VL_2B = Qwen2VLReplica(
    hub_id="Qwen/Qwen2-VL-2B-Instruct",
    # 1280 wide, 32 deep, 16 heads at full size; the merger outputs the LM width.
    vision=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=4, hidden_act="quick_gelu",
                in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    # Qwen2-1.5B-like: 1536 wide, 12 heads of 128 (2 kv heads), mrope_section [16, 24, 24] of 64 at full size.
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
              rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1000000.0,
              use_sliding_window=False, tie_word_embeddings=True),
    image_processor={"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                     "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                     "processor_class": "Qwen2VLProcessor"},
    chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _tokenizer(corpus: Sequence[str], vocab_size: int):
    """A byte-level BPE trained with Qwen2's own normaliser / pre-tokenizer, as `Qwen2Tokenizer` with the specials."""
    from transformers import Qwen2Tokenizer

    vocab, merges = common.qwen2_bpe(corpus, vocab_size)
    # '<|endoftext|>' first (the hub's first added token), then the others in order; eos is '<|im_end|>'.
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", errors="replace",
                         model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    tok.eos_token = "<|im_end|>"
    tok.padding_side = "left"
    return tok


def _write(r: Qwen2VLReplica, out_dir, corpus, *, seed: int, layout: str, dtype) -> pathlib.Path:
    import jax.numpy as jnp
    from transformers import Qwen2VLConfig as HFConfig

    from vlm_jax.convert import qwen2_vl as convert
    from vlm_jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig

    if layout not in ("hub", "transformers5"):
        raise ValueError(f"layout must be 'hub' or 'transformers5', got {layout!r}")
    out = pathlib.Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        tmp = pathlib.Path(tmp)
        tok = _tokenizer([common.BASE_CORPUS, *corpus], r.vocab_size)
        tok.save_pretrained(tmp / "tok")
        files = {f.name: f.read_bytes() for f in (tmp / "tok").iterdir() if f.is_file()}
        tc = json.loads(files["tokenizer_config.json"])
        for junk in ("is_local", "local_files_only"):  # from_pretrained's own arguments, not the checkpoint's
            tc.pop(junk, None)
        files["tokenizer_config.json"] = json.dumps(tc, indent=2).encode()
        if layout == "hub":
            files["preprocessor_config.json"] = json.dumps(r.image_processor, indent=2).encode()
            files["chat_template.json"] = json.dumps({"chat_template": r.chat_template}, indent=2).encode()
        else:  # what transformers 5's processor.save_pretrained writes
            image = {k: v for k, v in r.image_processor.items() if k != "processor_class"}
            image["size"] = {"shortest_edge": image.pop("min_pixels"), "longest_edge": image.pop("max_pixels")}
            files["processor_config.json"] = json.dumps({"image_processor": image,
                                                         "processor_class": "Qwen2VLProcessor"}, indent=2).encode()
            files["chat_template.jinja"] = r.chat_template.encode()
        ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end", "vision_pad",
                                                                            "image_pad", "video_pad")}
        config = HFConfig(vision_config=r.vision, vocab_size=len(tok), bos_token_id=tok.convert_tokens_to_ids(
            "<|endoftext|>"), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
            vision_end_token_id=ids["vision_end"], **r.text)
        model = Qwen2VL(Qwen2VLConfig.from_hf(config), param_dtype=dtype or jnp.float32)
        params = common.random_params(model, seed)
        written = convert.to_hf(model, params, tmp / "final", extra_files=files)
        if out.exists():
            if any(out.iterdir()):
                raise FileExistsError(f"{out} exists and is not empty")
            out.rmdir()
        shutil.move(str(written), str(out))
    out.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from other users of a shared cache
    return out


def hf_processor(path):
    """transformers' `Qwen2VLProcessor` of a checkpoint without the video processor (which needs torchvision):
    the same image processor, tokenizer, chat template and processing code."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # ProcessorMixin takes its sub-processors from __init__'s parameter names: image + tokenizer only.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor.from_pretrained(path)
