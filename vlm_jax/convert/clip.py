"""HF `CLIPModel` <-> `vlm_jax.models.clip.CLIP`: the conversion table, loading, export, and a
tiny random offline checkpoint (weights + tokenizer + image processor) for tests and `:runlocal`.
"""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import loader, stream
from vlm_jax.convert.loader import Entry
from vlm_jax.data.tokenize import bytes_to_unicode
from vlm_jax.models.clip import CLIP

# Buffers some checkpoints carry (older transformers saved them) that are not parameters.
IGNORE = (r".*\.position_ids",)


def _layer(hf: str, fx: tuple[str, ...]) -> list[Entry]:
    """Entries of one encoder layer, `hf` = 'text_model.encoder.layers.3', `fx` its Flax path."""
    t = [Entry(f"{hf}.self_attn.{p}_proj.weight", (*fx, "self_attn", f"{p}_proj", "kernel"), "transpose_split")
         for p in "qkv"]
    t += [Entry(f"{hf}.self_attn.{p}_proj.bias", (*fx, "self_attn", f"{p}_proj", "bias"), "split") for p in "qkv"]
    t += [Entry(f"{hf}.self_attn.out_proj.weight", (*fx, "self_attn", "out_proj", "kernel"), "transpose_merge"),
          Entry(f"{hf}.self_attn.out_proj.bias", (*fx, "self_attn", "out_proj", "bias"))]
    for fc in ("fc1", "fc2"):
        t += [Entry(f"{hf}.mlp.{fc}.weight", (*fx, "mlp", fc, "kernel"), "transpose"),
              Entry(f"{hf}.mlp.{fc}.bias", (*fx, "mlp", fc, "bias"))]
    for ln in ("layer_norm1", "layer_norm2"):
        t += _norm(f"{hf}.{ln}", (*fx, ln))
    return t


def _norm(hf: str, fx: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{hf}.weight", (*fx, "scale")), Entry(f"{hf}.bias", (*fx, "bias"))]


def clip_vision_table(num_layers: int, *, hf: str = "vision_model", fx: tuple[str, ...] = ("vision_model",)
                      ) -> list[Entry]:
    """The vision tower's rows: HF names under `hf` (e.g. 'model.vision_tower.vision_model' in a LLaVA
    checkpoint), Flax paths under `fx` (a `CLIPVisionTower`'s params live at `fx`)."""
    table = [
        Entry(f"{hf}.embeddings.patch_embedding.weight", (*fx, "embeddings", "patch_embedding", "kernel"), "conv"),
        Entry(f"{hf}.embeddings.class_embedding", (*fx, "embeddings", "class_embedding")),
        Entry(f"{hf}.embeddings.position_embedding.weight", (*fx, "embeddings", "position_embedding", "embedding")),
        *_norm(f"{hf}.pre_layrnorm", (*fx, "pre_layrnorm")),
        *_norm(f"{hf}.post_layernorm", (*fx, "post_layernorm")),
    ]
    for i in range(num_layers):
        table += _layer(f"{hf}.encoder.layers.{i}", (*fx, "encoder", f"layers_{i}"))
    return table


def clip_table(num_vision_layers: int, num_text_layers: int) -> list[Entry]:
    """The full HF <-> Flax table of a CLIPModel with the given depths."""
    t = "text_model"
    table = clip_vision_table(num_vision_layers) + [
        Entry(f"{t}.embeddings.token_embedding.weight", (t, "embeddings", "token_embedding", "embedding")),
        Entry(f"{t}.embeddings.position_embedding.weight", (t, "embeddings", "position_embedding", "embedding")),
        *_norm(f"{t}.final_layer_norm", (t, "final_layer_norm")),
        Entry("visual_projection.weight", ("visual_projection", "kernel"), "transpose"),
        Entry("text_projection.weight", ("text_projection", "kernel"), "transpose"),
        Entry("logit_scale", ("logit_scale",)),
    ]
    for i in range(num_text_layers):
        table += _layer(f"{t}.encoder.layers.{i}", (t, "encoder", f"layers_{i}"))
    return table


def table_for(model: CLIP) -> list[Entry]:
    return clip_table(model.vision.num_layers, model.text.num_layers)


def param_shapes(model: CLIP):
    """Unboxed `jax.eval_shape` params tree of `model` (no memory allocated)."""
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])


def from_pretrained(path_or_hub_id, dtype=jnp.float32, param_dtype=None, attention_impl=None, mesh=None,
                    rules=None):
    """Loads an HF CLIP checkpoint (local dir or cached hub id) into Flax.

    Tensors are read one at a time and placed straight into their sharding (`stream.load_table`).

    Args:
      path_or_hub_id: directory with config.json + *.safetensors, or a hub id in the HF cache.
      dtype: compute dtype of the returned module.
      param_dtype: dtype of the returned params (each tensor cast as it is read); defaults to `dtype`.
      attention_impl: None (XLA) or 'cudnn', see `CLIP`.
      mesh: a `jax.sharding.Mesh`: params sharded by their logical axis names and `rules`; None: the
        default device.
      rules: logical axis -> mesh axis rules (`vlm_jax.runtime.mesh.DEFAULT_RULES` when None).

    Returns:
      (model, params): a `CLIP` module and its plain (unboxed) params tree of `jax.Array`s.
    """
    from transformers import CLIPConfig  # lazy: heavy import, only needed to read configs

    ckpt = loader.resolve_checkpoint(path_or_hub_id)
    raw = loader.read_config(ckpt)
    if raw.get("model_type") not in (None, "clip"):
        raise loader.CheckpointError(f"{ckpt} holds a {raw.get('model_type')!r} model, not CLIP")
    param_dtype = dtype if param_dtype is None else param_dtype
    model = CLIP.from_hf_config(CLIPConfig.from_dict(raw), dtype=dtype, param_dtype=param_dtype,
                                attention_impl=attention_impl)
    abstract = stream.abstract_params(model)
    shardings = None if mesh is None else stream.shardings_for(model, mesh, rules, abstract=abstract)
    params = stream.load_table(table_for(model), stream.open_tensors(ckpt), abstract, ignore=IGNORE,
                               shardings=shardings)
    return model, params


def hf_config(model: CLIP):
    """A `transformers.CLIPConfig` equivalent to the module's hyper-parameters."""
    from transformers import CLIPConfig

    v, t = model.vision, model.text

    def tower(c):
        return dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, hidden_act=c.hidden_act,
                    layer_norm_eps=c.layer_norm_eps, projection_dim=model.projection_dim)

    text = dict(tower(t), vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings,
                eos_token_id=t.eos_token_id)
    text.update({k: getattr(t, k) for k in ("bos_token_id", "pad_token_id") if getattr(t, k) is not None})
    vision = dict(tower(v), image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model.projection_dim,
                      logit_scale_init_value=model.logit_scale_init)


def _config_dict(config, dtype) -> dict:
    d = config.to_dict()
    d["architectures"] = ["CLIPModel"]
    d["dtype"] = str(np.dtype(dtype))  # transformers 5 name; "torch_dtype" for older readers
    d["torch_dtype"] = d["dtype"]
    return d


def to_hf(model_or_config, params, out_dir, *, dtype=None, extra_files=None) -> pathlib.Path:
    """Writes params as an HF checkpoint (config.json + model.safetensors) atomically.

    Args:
      model_or_config: the `CLIP` module, or a `transformers.CLIPConfig` / dict written verbatim.
      params: the params tree (boxed or not).
      out_dir: destination directory; loadable by `transformers.CLIPModel.from_pretrained`.
      dtype: tensor dtype in the file; None keeps the params' dtype.
      extra_files: more files for the directory (name -> content).

    Returns:
      The output directory.
    """
    if isinstance(model_or_config, CLIP):
        config = hf_config(model_or_config)
    else:
        from transformers import CLIPConfig

        config = (CLIPConfig.from_dict(model_or_config) if isinstance(model_or_config, dict)
                  else model_or_config)
    v, t = config.vision_config, config.text_config
    tensors = loader.export_table(clip_table(v.num_hidden_layers, t.num_hidden_layers), params, dtype=dtype)
    file_dtype = tensors["logit_scale"].dtype
    return loader.write_checkpoint(out_dir, tensors, _config_dict(config, file_dtype), extra_files)


# ----------------------------------------------------------------------------- random checkpoint

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI CLIP's preprocessing constants (CLIPImageProcessor defaults).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies BPE merges as HF tokenizers does: lowest rank first, leftmost on ties."""
    pieces = list(pieces)
    while len(pieces) > 1:
        best = min((ranks.get(p, 1 << 62), i) for i, p in enumerate(zip(pieces, pieces[1:])))
        if best[0] == 1 << 62:
            break
        i = best[1]
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def tokenizer_files(words=None, max_length: int = 77) -> tuple[dict[str, str], int, int, int]:
    """A byte-level character BPE tokenizer in CLIPTokenizer's file format.

    Every byte and its end-of-word variant '<byte></w>' is a token, so any text encodes. Each
    alphabetic word of `words` (lowercased) also becomes one token: the word is first split by
    the merges so far, then merges joining those pieces left to right are appended. Appended
    merges rank below all earlier ones, so they never change how earlier words split.

    Returns:
      (files, vocab_size, bos_id, eos_id) with files = {name: content}.
    """
    enc = bytes_to_unicode()
    byte_chars = [enc[b] for b in range(256)]
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    known, ranks = set(tokens), {}
    for word in dict.fromkeys(w.lower() for text in (words or ()) for w in text.split() if w.isalpha()):
        chars = [enc[b] for b in word.encode("utf-8")]
        pieces = _bpe(chars[:-1] + [chars[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces[:2] = [pieces[0] + pieces[1]]
            if pieces[0] not in known:
                known.add(pieces[0])
                tokens.append(pieces[0])
    tokens += [BOS, EOS]  # last, like OpenAI's vocab: EOS has the largest id
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "\n".join(["#version: 0.2", *merges]) + "\n",
        "tokenizer_config.json": json.dumps(dict(tokenizer_class="CLIPTokenizer", model_max_length=max_length,
                                                 do_lower_case=True, errors="replace", **specials), indent=2),
        "special_tokens_map.json": json.dumps(specials, indent=2),
    }
    return files, len(vocab), vocab[BOS], vocab[EOS]


def preprocessor_config(image_size: int) -> str:
    """preprocessor_config.json of a CLIPImageProcessor for `image_size` images."""
    return json.dumps(dict(
        image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": image_size},
        resample=3, do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD, do_convert_rgb=True), indent=2)


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8, hidden_act="quick_gelu")
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu")


def write_random_checkpoint(out_dir, *, seed: int = 0, vision: dict | None = None, text: dict | None = None,
                            projection_dim: int = 16, words=None, dtype=jnp.float32) -> pathlib.Path:
    """Writes a tiny random CLIP as a complete offline HF checkpoint directory.

    The directory holds config.json, model.safetensors, a CLIPTokenizer (vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json) and preprocessor_config.json, so it loads
    with `from_pretrained` here, `transformers.CLIPModel/AutoTokenizer/CLIPImageProcessor`, and
    needs no network and no torch.

    Args:
      out_dir: destination directory.
      seed: PRNG seed of the Flax init.
      vision: overrides of the HF vision config (see TINY_VISION).
      text: overrides of the HF text config (see TINY_TEXT); vocab_size defaults to the
        tokenizer's size and may only be larger.
      projection_dim: joint embedding width.
      words: optional texts whose alphabetic words become single tokens (e.g. class names).
      dtype: parameter dtype stored in the file.

    Returns:
      The directory.
    """
    from transformers import CLIPConfig

    vision = {**TINY_VISION, **(vision or {})}
    text = {**TINY_TEXT, **(text or {})}
    files, n_vocab, bos, eos = tokenizer_files(words, text["max_position_embeddings"])
    text.setdefault("vocab_size", n_vocab)
    if text["vocab_size"] < n_vocab:
        raise ValueError(f"text vocab_size {text['vocab_size']} < tokenizer size {n_vocab}")
    text.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    model = CLIP.from_hf_config(config, param_dtype=dtype)
    params = jax.jit(model.init)(jax.random.key(seed), *model.init_inputs())["params"]
    files["preprocessor_config.json"] = preprocessor_config(vision["image_size"])
    return to_hf(config, nn.meta.unbox(params), out_dir, extra_files=files)
