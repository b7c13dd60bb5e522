"""Offline replicas of real LVLM checkpoints: the real structure at tiny widths, for tests and `:runlocal`.

A replica keeps everything of the real hub checkpoint that shapes the data the model sees: the config keys and
the values behind tokens per image (image size / patch size, vision_feature_layer, select strategy), the image
token id's role, RoPE theta, tied or untied heads, Qwen2's q/k/v biases; the tokenizer *class and normalisation*
(a SentencePiece model trained on the spot and loaded as the checkpoint's `LlamaTokenizer` with its settings; a
byte-level BPE trained with Qwen2's pre-tokenizer and loaded as `Qwen2Tokenizer` with the ChatML specials); the
image processor class and config; the chat template; the file layout the hub repos use (preprocessor_config.json,
processor_config.json, chat_template.json, tokenizer files), all written by transformers' `save_pretrained`.
Only the widths and depths shrink, and the vocabulary is what a small corpus trains.

  python -m vlm_jax.testing.replicas llava-1.5 /tmp/llava-1.5-replica              # llava-hf/llava-1.5-7b-hf
  python -m vlm_jax.testing.replicas llava-interleave-qwen /tmp/interleave-replica  # ...-interleave-qwen-0.5b-hf

Weights are random (numpy noise on a Flax init) and written with `vlm_jax.convert.llava.to_hf`, so no torch is
needed; `LlavaForConditionalGeneration.from_pretrained` loads them (tests check that HF runs every replica).

`qk_std` (`write_replica`, or the spec 'replica:llava-1.5?qk_std=0.5' of `resolve_offline`) sets the std of the LM's
q_proj / k_proj kernels apart from the others' 0.05. At 0.05 the LM's attention logits have a std of ~0.1, so every
text position averages the 576 image tokens almost uniformly: its hidden state carries little more than the image's
mean colour, and a few fine-tuning steps cannot read a class out of it. At 0.5 (logits std ~8) attention is
selective, as a trained LM's is; the VITask `:runlocal` demo uses it so its toy learns to answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Sequence

from vlm_jax.testing import replicas_internvl
from vlm_jax.testing.common import BASE_CORPUS as _BASE_CORPUS, INIT_STD, qwen2_bpe, random_params  # noqa: F401
from vlm_jax.testing.replicas_qwen2_vl import QWEN2_VL_2B
from vlm_jax.testing import replicas_vision

# `qk_std` overrides INIT_STD for the LM's attention queries and keys.
QK_KERNELS = r"language_model/.*/(q_proj|k_proj)/kernel"

# llava-hf/llava-1.5-7b-hf's chat_template.json.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# The ChatML template of the llava-interleave / onevision Qwen checkpoints (images first, each '<image>\n').
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Text every replica's tokenizer is trained on, besides the caller's corpus (so common words are whole pieces).
@dataclasses.dataclass(frozen=True)
class Replica:
    """What one replica copies from its real checkpoint; `hub_id` names that checkpoint."""

    hub_id: str
    tokenizer: str           # 'llama' (SentencePiece, LlamaTokenizer) or 'qwen2' (byte-level BPE, Qwen2Tokenizer)
    vision: dict             # HF vision_config structure (tiny widths)
    text: dict               # HF text_config structure (tiny widths)
    vision_feature_layer: int
    select_strategy: str
    image_processor: dict    # kwargs of the image processor class below
    image_processor_class: str
    num_additional_image_tokens: int
    chat_template: str
    tie_word_embeddings: bool
    vocab_size: int = 1000   # the trained tokenizer's size (plus specials)


REPLICAS: dict = {  # name -> Replica (LLaVA), or another family's replica (with a `write` method)
    "llava-1.5": Replica(
        hub_id="llava-hf/llava-1.5-7b-hf", tokenizer="llama",
        # CLIP ViT-L/14-336: 336 px / patch 14 = 576 patches (+ class token, dropped by 'default').
        vision=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, image_size=336, patch_size=14, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5, projection_dim=16),
        # Vicuna-7B: Llama, no GQA, untied head, RoPE theta 1e4, 4096 positions.
        text=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False),
        vision_feature_layer=-2, select_strategy="default",
        image_processor=dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        image_processor_class="CLIPImageProcessor", num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE, tie_word_embeddings=False),
    "llava-interleave-qwen": Replica(
        hub_id="llava-hf/llava-interleave-qwen-0.5b-hf", tokenizer="qwen2",
        # SigLIP so400m/14-384: 384 px / patch 14 = 27 x 27 = 729 patches, no class token, all kept ('full').
        vision=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                    layer_norm_eps=1e-6, vision_use_head=False),
        # Qwen1.5-0.5B-Chat: Qwen2 with q/k/v biases, tied embeddings, RoPE theta 1e6, 32768 positions.
        text=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True),
        vision_feature_layer=-1, select_strategy="full",
        image_processor=dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        image_processor_class="SiglipImageProcessor", num_additional_image_tokens=0,
        chat_template=CHATML_IMAGE_TEMPLATE, tie_word_embeddings=True),
    **replicas_internvl.REPLICAS,  # internvl3-1b, internvl2-2b: transformers' internvl format, their own writer
    "qwen2-vl": QWEN2_VL_2B,  # Qwen/Qwen2-VL-2B-Instruct (vlm_jax.testing.replicas_qwen2_vl)
    **replicas_vision.REPLICAS,  # the dual encoders' and ViT's (rn50-openclip, vit-b16-in21k, siglip-base)
}


def _llama_tokenizer(corpus: Sequence[str], vocab_size: int, tmp: pathlib.Path):
    """Llama-2's SentencePiece recipe (BPE, byte fallback, split digits, dummy prefix, no normalisation), loaded
    as llava-1.5's `LlamaTokenizer` (legacy=False, BOS added) with '<image>' and '<pad>' added as llava-hf did."""
    import sentencepiece as spm
    from transformers import AddedToken, AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1,
        max_sentence_length=1 << 16)
    src = tmp / "sp"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(model.getvalue())
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "padding_side": "left",
        "model_max_length": 4096}))
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok, {"tokenizer.model": model.getvalue()}


def _qwen2_tokenizer(corpus: Sequence[str], vocab_size: int, tmp: pathlib.Path):
    """A byte-level BPE trained with Qwen2's own normaliser and pre-tokenizer, loaded as `Qwen2Tokenizer` with the
    ChatML specials of the Qwen chat checkpoints (eos '<|im_end|>', pad '<|endoftext|>', no BOS) and '<image>'."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = qwen2_bpe(corpus, vocab_size)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None, bos_token=None, model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    return tok, {}


def _to_hub_layout(out: pathlib.Path) -> None:
    """transformers 5 saves the image processor inside processor_config.json and the template as
    chat_template.jinja; the hub repos keep preprocessor_config.json and chat_template.json."""
    proc = json.loads((out / "processor_config.json").read_text())
    image = proc.pop("image_processor")
    image["processor_class"] = proc.get("processor_class", "LlavaProcessor")
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
    jinja = out / "chat_template.jinja"
    (out / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}, indent=2))
    jinja.unlink()


def write_replica(name: str, out_dir, corpus: Sequence[str] = (), *, seed: int = 0, layout: str = "hub",
                  dtype=None, qk_std: float = INIT_STD) -> pathlib.Path:
    """Writes the replica `name` (a key of REPLICAS) into `out_dir`, atomically.

    Args:
      name: a key of REPLICAS ('llava-1.5', 'llava-interleave-qwen', 'internvl3-1b', 'internvl2-2b', 'qwen2-vl').
      out_dir: target directory (must not exist yet, or be empty).
      corpus: extra texts for the tokenizer (a run's prompts and captions, so its words are whole pieces).
      seed: weights' seed.
      layout: 'hub' (preprocessor_config.json + chat_template.json, as the hub repos) or 'transformers5' (what
        transformers 5's `save_pretrained` writes: both inside processor_config.json / chat_template.jinja).
      dtype: weights' dtype (jnp dtype; default float32).
      qk_std: std of the LM's q_proj / k_proj kernels (LLaVA replicas; see the module doc; default: every weight's).

    Returns:
      The checkpoint directory.
    """
    import jax.numpy as jnp
    from transformers import CLIPImageProcessorPil, LlavaConfig as HFConfig, LlavaProcessor, SiglipImageProcessorPil

    from vlm_jax.convert import llava as llava_convert
    from vlm_jax.models.llava import Llava, LlavaConfig

    if name not in REPLICAS:
        raise KeyError(f"unknown replica {name!r}; known: {', '.join(REPLICAS)}")
    if isinstance(REPLICAS[name], replicas_vision.VisionReplica):
        return REPLICAS[name].write(out_dir, corpus, seed=seed)
    if layout not in ("hub", "transformers5"):
        raise ValueError(f"layout must be 'hub' or 'transformers5', got {layout!r}")
    r = REPLICAS[name]
    if not isinstance(r, Replica):
        return r.write(out_dir, corpus, seed=seed, layout=layout, dtype=dtype)
    out = pathlib.Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = [_BASE_CORPUS, *corpus]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        tmp = pathlib.Path(tmp)
        make = _llama_tokenizer if r.tokenizer == "llama" else _qwen2_tokenizer
        tok, extra = make(texts, r.vocab_size, tmp)
        image_cls = CLIPImageProcessorPil if r.image_processor_class.startswith("CLIP") else SiglipImageProcessorPil
        processor = LlavaProcessor(image_processor=image_cls(**r.image_processor), tokenizer=tok,
                                   patch_size=r.vision["patch_size"], vision_feature_select_strategy=r.select_strategy,
                                   num_additional_image_tokens=r.num_additional_image_tokens,
                                   chat_template=r.chat_template, image_token="<image>")
        stage = tmp / "ckpt"
        processor.save_pretrained(stage)
        for fname, data in extra.items():
            (stage / fname).write_bytes(data)
        tc = json.loads((stage / "tokenizer_config.json").read_text())
        for junk in ("is_local", "local_files_only"):  # from_pretrained's own arguments, not the checkpoint's
            tc.pop(junk, None)
        (stage / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        if layout == "hub":
            _to_hub_layout(stage)
        text = dict(r.text, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
        config = HFConfig(vision_config=r.vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=r.vision_feature_layer, vision_feature_select_strategy=r.select_strategy,
                          projector_hidden_act="gelu", tie_word_embeddings=r.tie_word_embeddings,
                          pad_token_id=tok.pad_token_id)
        model = Llava(LlavaConfig.from_hf(config), param_dtype=dtype or jnp.float32)
        params = random_params(model, seed, stds={QK_KERNELS: qk_std} if qk_std != INIT_STD else None)
        files = {f.name: f.read_bytes() for f in stage.iterdir() if f.is_file()}
        written = llava_convert.to_hf(model, params, tmp / "final", extra_files=files)
        if out.exists():
            if any(out.iterdir()):
                raise FileExistsError(f"{out} exists and is not empty")
            out.rmdir()
        shutil.move(str(written), str(out))
    out.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from other users of a shared cache
    return out


# ----------------------------------------------------------------------------------------------------------
# Offline checkpoint specs of configs ('replica:<name>', 'builtin:tiny-clip').

REPLICA_PREFIX = "replica:"
TINY_CLIP = "builtin:tiny-clip"


def is_offline_spec(spec: str) -> bool:
    """Whether `spec` names an offline checkpoint that this module writes (rather than a directory / hub id)."""
    return spec.startswith(REPLICA_PREFIX) or spec.startswith("builtin:")


def texts_key(texts: Sequence[str], options: dict[str, float] | None = None) -> str:
    """A short stable key of a replica's tokenizer corpus and options (for cache folder names)."""
    import hashlib

    # The salt changes whenever the replicas' structure or weights do, so a stale cached one is never reused.
    extra = [f"{k}={v!r}" for k, v in sorted((options or {}).items())]
    return hashlib.sha256("\x00".join(["replica-v1", *texts, *extra]).encode()).hexdigest()[:12]


def parse_replica_spec(spec: str) -> tuple[str, dict[str, float]]:
    """'replica:<name>[?qk_std=<float>]' -> (name, {'qk_std': float} or {}); anything else is a UserError."""
    import math

    from vlm_jax.errors import UserError

    name, _, query = spec[len(REPLICA_PREFIX):].partition("?")
    if name not in REPLICAS:
        raise UserError(f"unknown replica {spec!r}; known: {', '.join(REPLICA_PREFIX + n for n in REPLICAS)}")
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key != "qk_std" or not eq:
            raise UserError(f"replica option {item!r} in {spec!r} is not known: the only one is qk_std=<float>")
        try:
            std = float(value)
        except ValueError:
            std = math.nan
        if not (math.isfinite(std) and std > 0):
            raise UserError(f"replica option {item!r} in {spec!r}: qk_std must be a finite number > 0")
        options[key] = std
    return name, options


def resolve_offline(spec: str, models_dir: str, texts: Sequence[str] = ()) -> str:
    """The directory of an offline checkpoint spec, written on first use (atomically) under `models_dir`.

    'replica:<name>': a replica of `REPLICAS`, its tokenizer trained on `texts` (the run's prompts and captions),
    so its folder is keyed by them: a run with other texts never picks up a tokenizer that splits them differently.
    'builtin:tiny-clip': a random toy CLIP whose vocabulary holds the built-in dataset's prompt words.

    Raises:
      UserError: an unknown name (one line listing the known ones).
    """
    from vlm_jax.errors import UserError

    if spec == TINY_CLIP:
        return str(_tiny_clip(pathlib.Path(models_dir) / "tiny-clip-v2"))
    if spec == "builtin:tiny-llava":
        raise UserError("model.checkpoint='builtin:tiny-llava' was replaced by the offline replicas of the real "
                        "checkpoints: use 'replica:llava-1.5' or 'replica:llava-interleave-qwen'")
    if not spec.startswith(REPLICA_PREFIX):
        raise UserError(f"unknown offline checkpoint {spec!r}; known: "
                        f"{', '.join([TINY_CLIP] + [REPLICA_PREFIX + n for n in REPLICAS])}")
    name, options = parse_replica_spec(spec)
    if isinstance(REPLICAS[name], replicas_vision.VisionReplica):  # dual encoders / ViT: no tokenizer corpus
        if options:
            raise UserError(f"replica options are for the LLaVA replicas, not {spec!r}")
        return str(replicas_vision.cached_replica(name, models_dir))
    path = pathlib.Path(models_dir) / f"replica-{name}-{texts_key(texts, options)}"
    if not (path / "config.json").exists():
        try:
            write_replica(name, path, texts, **options)
        except FileExistsError:  # another run wrote it first (the write is atomic): use theirs
            pass
    return str(path)


def _tiny_clip(path: pathlib.Path) -> pathlib.Path:
    # A random toy CLIP, written as a full HF checkpoint (weights, tokenizer, preprocessor) so the offline run goes
    # through exactly the loading path that real checkpoints take. The words of the built-in dataset's prompts
    # become single tokens, so no prompt is cut at the 77-token context.
    if not (path / "config.json").exists():
        from vlm_jax.convert import clip as clip_convert
        from vlm_jax.data import builtin

        ds = builtin.builtin_dataset()
        words = [*ds.classnames, *ds.templates, *ds.negative_templates, *(p for ps in ds.cupl_prompts or [] for p in ps)]
        clip_convert.write_random_checkpoint(
            path, seed=0, projection_dim=64, words=words,
            vision=dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256),
            text=dict(hidden_size=64, intermediate_size=256, max_position_embeddings=77))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(REPLICAS))
    parser.add_argument("out_dir")
    parser.add_argument("--layout", default="hub", choices=["hub", "transformers5"])
    parser.add_argument("--corpus", default=None, help="a text file whose lines join the tokenizer's corpus")
    parser.add_argument("--qk-std", type=float, default=INIT_STD,
                        help="std of the LM's q_proj / k_proj kernels (0.5: selective attention; see the module doc)")
    args = parser.parse_args(argv)
    corpus = pathlib.Path(args.corpus).read_text().splitlines() if args.corpus else ()
    try:
        path = write_replica(args.name, args.out_dir, corpus, layout=args.layout, qk_std=args.qk_std)
    except (FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{REPLICAS[args.name].hub_id} replica written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
