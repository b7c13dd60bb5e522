"""Offline replicas of InternVL checkpoints in transformers' `internvl` format (real structure, tiny widths).

  internvl3-1b   OpenGVLab/InternVL3-1B-hf: InternViT-300M-448px-V2_5 (448 px tiles, patch 14, qkv bias, LayerNorm,
                 no qk-norm) + Qwen2.5-0.5B (Qwen2: q/k/v biases, RoPE theta 1e6, GQA 14/2), untied head; the
                 Qwen2.5-VL byte-level BPE tokenizer class (`Qwen2Tokenizer`) with its specials and InternVL's
                 `<img>` `</img>` `<IMG_CONTEXT>` ... named in tokenizer_config.json; 256 tokens per tile.
  internvl2-2b   OpenGVLab/InternVL2-2B after transformers' convert_internvl_weights_to_hf.py: InternViT-300M-448px
                 + InternLM2-chat-1.8B as a Llama-format LM (GQA 16/8, RoPE theta 1e6 with dynamic NTK scaling
                 x2 over 32768 positions, untied head); InternLM2's SentencePiece BPE loaded as the converted
                 checkpoint's `LlamaTokenizer` (no dummy prefix: add_prefix_space=false, pad '</s>', BOS added)
                 with InternLM2's ChatML specials; generation_config.json's eos '<|im_end|>' as the script writes it.

Both carry the image processor config of the -hf repos (GotOcr2ImageProcessorFast, 448 px tiles, 1..12 tiles +
thumbnail, ImageNet mean/std), processor_config.json (image_seq_length) and the chat template of transformers'
conversion script (ChatML; each image written as `<IMG_CONTEXT>`, which the processor expands). Files follow the
hub layout (preprocessor_config.json, processor_config.json, chat_template.json, tokenizer files).

transformers without torchvision cannot build `InternVLProcessor` (it requires a video processor); the tests
assemble it from these files with the video processor left out (see tests/test_internvl.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

from vlm_jax.testing import common

# transformers' convert_internvl_weights_to_hf.py chat template (the one the -hf repos carry).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")
# What the tokenizer names (tokenizer_config.json); transformers 5 adds '<video>' to the vocabulary if absent.
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
INTERNVL_SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
# Qwen2.5-VL's added tokens in id order (151643 ...); the last eight are not special.
QWEN25VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                     "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN25VL_PLAIN = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>")
# InternLM2's chat / tool tokens (ids 92538 ... 92543), before InternVL's.
INTERNLM2_SPECIALS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                      "<|im_start|>")
# The -hf repos' preprocessor_config.json (GotOcr2ImageProcessorFast as written by transformers 4.5x).
IMAGE_PROCESSOR = {
    "crop_size": None, "crop_to_patches": False, "data_format": "channels_first", "default_to_square": True,
    "device": None, "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "GotOcr2ImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225], "input_data_format": None, "max_patches": 12, "min_patches": 1,
    "processor_class": "InternVLProcessor", "resample": 3, "rescale_factor": 1 / 255, "return_tensors": None,
    "size": {"height": 448, "width": 448}}
# InternViT-300M-448px structure (both replicas), tiny widths.
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=[448, 448],
              patch_size=[14, 14], hidden_act="gelu", norm_type="layer_norm", layer_norm_eps=1e-6,
              attention_bias=True, use_qk_norm=False, use_mean_pooling=True, layer_scale_init_value=0.1)


@dataclasses.dataclass(frozen=True)
class InternVLReplica:
    """What one replica copies from its real checkpoint; `hub_id` names that checkpoint."""

    hub_id: str
    tokenizer: str          # 'qwen2' (byte-level BPE) or 'internlm2' (SentencePiece as LlamaTokenizer)
    text: dict              # HF text_config structure (tiny widths)
    generation_eos: str | None = None  # generation_config.json eos token, when the checkpoint has one
    vocab_size: int = 1000

    def write(self, out_dir, corpus: Sequence[str] = (), *, seed: int = 0, layout: str = "hub",
              dtype=None) -> pathlib.Path:
        """Writes the replica into `out_dir` (new or empty), atomically; see `replicas.write_replica`."""
        if layout != "hub":
            raise ValueError(f"InternVL replicas are written in the hub layout only, got layout={layout!r}")
        return _write(self, pathlib.Path(out_dir), corpus, seed, dtype)


REPLICAS = {
    "internvl3-1b": InternVLReplica(
        hub_id="OpenGVLab/InternVL3-1B-hf", tokenizer="qwen2",
        text=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False)),
    "internvl2-2b": InternVLReplica(
        hub_id="OpenGVLab/InternVL2-2B", tokenizer="internlm2", generation_eos="<|im_end|>",
        text=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_theta=1000000.0, rope_scaling={"type": "dynamic", "factor": 2.0}, tie_word_embeddings=False,
                  attention_bias=False)),
}


def _named(tok, out: pathlib.Path):
    """Saves `tok`, names InternVL's tokens in tokenizer_config.json, reloads it."""
    from transformers import AutoTokenizer

    tok.save_pretrained(out)
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for junk in ("is_local", "local_files_only"):  # from_pretrained's own arguments, not the checkpoint's
        cfg.pop(junk, None)
    path.write_text(json.dumps({**cfg, **NAMED_TOKENS}, indent=2))
    return AutoTokenizer.from_pretrained(out)


def _qwen2_tokenizer(corpus: Sequence[str], vocab_size: int, tmp: pathlib.Path):
    """Byte-level BPE trained with Qwen2's normaliser / pre-tokenizer, Qwen2.5-VL's added tokens, InternVL's."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = common.qwen2_bpe(corpus, vocab_size)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None,
                         pad_token=None, model_max_length=8192)

    def add(names, special):
        tok.add_tokens([AddedToken(t, special=special, normalized=False) for t in names], special_tokens=special)

    add(QWEN25VL_SPECIALS, True)
    add(QWEN25VL_PLAIN, False)
    add(INTERNVL_SPECIALS, True)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    return _named(tok, tmp / "tok")


def _internlm2_tokenizer(corpus: Sequence[str], vocab_size: int, tmp: pathlib.Path):
    """InternLM2's recipe (SentencePiece BPE, byte fallback, <unk> <s> </s> = 0 1 2), loaded the way the conversion
    script built its tokenizer: a Llama tokenizer with legacy=False and no dummy prefix, pad '</s>'."""
    import sentencepiece as spm
    from transformers import AddedToken, AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1,
        max_sentence_length=1 << 16)
    src = tmp / "sp"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(model.getvalue())
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False, "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "model_max_length": 8192}))
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in INTERNLM2_SPECIALS + INTERNVL_SPECIALS],
                   special_tokens=True)
    return _named(tok, tmp / "tok")


def _to_hub_layout(stage: pathlib.Path) -> None:
    """Processor files as the -hf repos have them (transformers 4.5x's save_pretrained)."""
    (stage / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR, indent=2))
    (stage / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": 256, "processor_class": "InternVLProcessor"}, indent=2))
    (stage / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    (stage / "chat_template.jinja").unlink(missing_ok=True)  # one template file, as the hub repos


def _write(r: InternVLReplica, out: pathlib.Path, corpus: Sequence[str], seed: int, dtype) -> pathlib.Path:
    import jax.numpy as jnp
    from transformers import InternVLConfig as HFConfig

    from vlm_jax.convert import internvl as internvl_convert
    from vlm_jax.models.internvl import InternVL, InternVLConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        tmp = pathlib.Path(tmp)
        make = _qwen2_tokenizer if r.tokenizer == "qwen2" else _internlm2_tokenizer
        tok = make([common.BASE_CORPUS, *corpus], r.vocab_size, tmp)
        stage = tmp / "ckpt"
        tok.save_pretrained(stage)
        tc = json.loads((stage / "tokenizer_config.json").read_text())
        for junk in ("is_local", "local_files_only"):
            tc.pop(junk, None)
        (stage / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        _to_hub_layout(stage)
        text = dict(r.text, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
        config = HFConfig(vision_config=VISION, text_config=text, image_token_id=tok.context_image_token_id,
                          image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
                          vision_feature_layer=-1, vision_feature_select_strategy="default",
                          tie_word_embeddings=text["tie_word_embeddings"])
        model = InternVL(InternVLConfig.from_hf(config), param_dtype=dtype or jnp.float32)
        params = common.random_params(model, seed)
        files = {f.name: f.read_bytes() for f in stage.iterdir() if f.is_file()}
        gen = None if r.generation_eos is None else {"eos_token_id": tok.convert_tokens_to_ids(r.generation_eos)}
        written = internvl_convert.to_hf(model, params, tmp / "final", extra_files=files, generation_config=gen)
        if out.exists():
            if any(out.iterdir()):
                raise FileExistsError(f"{out} exists and is not empty")
            out.rmdir()
        shutil.move(str(written), str(out))
    out.chmod(0o755)
    return out
