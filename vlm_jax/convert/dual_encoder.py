"""One image-text dual-encoder interface over every checkpoint format the few-shot program takes.

`load_dual_encoder(checkpoint_dir, dtype)` reads what a directory holds and returns a `DualEncoder`:

  format              detected by                                   model (vlm_jax.models)
  HF CLIP             config.json model_type 'clip'                 clip.CLIP
  HF SigLIP           config.json model_type 'siglip'               siglip.SiglipModel
  open_clip           open_clip_config.json (+ .safetensors)        open_clip.OpenCLIP (ModifiedResNet or ViT)

Every model has `encode_image(f32[B, H, W, 3]) -> f32[B, P]` and `encode_text(i32[B, L], i32[B, L]) -> f32[B, P]`
(unnormalised), so `model.apply({'params': params}, x, method=model.encode_image)` is the same call for all.
The tokenizer and the image preprocessing are the checkpoint's own: HF CLIP / SigLIP read their tokenizer files and
image processor config (`vlm_jax.data.preprocess.image_settings`), open_clip its SimpleTokenizer-equal BPE and its
preprocess_cfg (`open_clip_image_settings`). Weights load on first use of `model` / `params`, so a run whose
features are all cached never reads them.

Logit scale and bias: `logit_scale` is the checkpoint's exp(logit_scale) (OpenAI CLIP: 100, its clamp; SigLIP
base: about 117), `logit_bias` SigLIP's learnt bias (about -13; None for CLIP). The few-shot methods do not read
them: Tip-Adapter and DualAdapter hard-code CLIP's 100 (`methods.tip_adapter.LOGIT_SCALE`,
`methods.dualadapter.LOGIT_SCALE`) and DualAdapter's negative text path its 0.15 (`NEGATIVE_TEXT_SCALE`, i.e.
100 * 0.15 * (1 - cos)). Both are CLIP-specific constants of the papers, tuned with RN50 / ViT-B on CLIP's
cosine range; on SigLIP the program uses the same constants: a bias adds the same amount to every class (the
argmax and the softmax cross-entropy do not see it), and the scale multiplies the text logits only relative to
the cache term, whose weight alpha is searched on val (Tip-Adapter's argmax is unchanged by scaling text by s and
alpha by s). So SigLIP's 117 vs 100 moves the searched alpha, not the result; what does not transfer is the
presets' initial alpha / beta / lambda (used by -F training and the realistic protocol below 2 shots) and the
0.15, which were tuned on CLIP and are used as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import loader
from vlm_jax.convert import open_clip as open_clip_convert
from vlm_jax.convert.loader import CheckpointError

FAMILIES = ("clip", "siglip", "open_clip")
REPLICA_PREFIX = "replica:"


@dataclasses.dataclass
class DualEncoder:
    """A dual-encoder checkpoint: lazily loaded model + params, and the checkpoint's own tokenizer and preprocessing.

    Attributes:
      family: 'clip' (HF CLIPModel), 'siglip' (HF SiglipModel) or 'open_clip'.
      checkpoint_dir: the directory.
      dtype: compute and parameter dtype.
      image_settings: the argument of `vlm_jax.data.preprocess.preprocess_image` (plain data; a cache key).
      image_size: the side of the square images the image tower takes.
      text_length: L, the length every tokenised text is padded to.
    """

    family: str
    checkpoint_dir: str
    dtype: Any
    image_settings: dict
    image_size: int
    text_length: int
    _load: Callable[[], tuple[Any, Any]] = dataclasses.field(repr=False)
    _tokenizer: Callable[[], Callable] = dataclasses.field(repr=False)

    @functools.cached_property
    def _loaded(self):
        return self._load()

    @property
    def model(self):
        """The Flax module (weights are read on first access)."""
        return self._loaded[0]

    @property
    def params(self):
        """Its params tree."""
        return self._loaded[1]

    @functools.cached_property
    def tokenizer(self) -> Callable[[list[str]], tuple[np.ndarray, np.ndarray]]:
        """texts -> (input_ids i32[N, L], attention_mask i32[N, L]), as the checkpoint's own tokenizer."""
        return self._tokenizer()

    def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenizer(list(texts))

    def encode_image(self, pixel_values, params=None):
        """f32[B, H, W, 3] preprocessed images -> f32[B, P] (unnormalised); pure, jit it as you like."""
        return self.model.apply({"params": self.params if params is None else params}, pixel_values,
                                method=self.model.encode_image)

    def encode_text(self, input_ids, attention_mask, params=None):
        """i32[B, L], i32[B, L] -> f32[B, P] (unnormalised)."""
        return self.model.apply({"params": self.params if params is None else params}, input_ids, attention_mask,
                                method=self.model.encode_text)

    @property
    def logit_scale(self) -> float:
        """exp of the checkpoint's learnt logit scale (OpenAI CLIP: 100)."""
        return math.exp(float(np.asarray(self.params["logit_scale"]).reshape(())))

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's learnt logit bias; None for the softmax-trained CLIPs."""
        bias = self.params.get("logit_bias")
        return None if bias is None else float(np.asarray(bias).reshape(()))


def detect_family(checkpoint_dir) -> str:
    """'clip', 'siglip' or 'open_clip' from what the directory holds (CheckpointError otherwise)."""
    root = pathlib.Path(checkpoint_dir)
    if open_clip_convert.is_open_clip_dir(root):
        return "open_clip"
    if (root / loader.CONFIG_NAME).is_file():
        model_type = loader.read_config(root).get("model_type")
        if model_type in ("clip", "siglip"):
            return model_type
        raise CheckpointError(f"{root} holds a {model_type!r} model, not a dual encoder; supported: HF CLIP "
                              f"(model_type 'clip'), HF SigLIP ('siglip'), or an open_clip directory "
                              f"({open_clip_convert.CONFIG_NAME})")
    raise CheckpointError(f"{root} is not a dual-encoder checkpoint: it has neither config.json (HF CLIP / SigLIP) "
                          f"nor {open_clip_convert.CONFIG_NAME} (open_clip)")


def _hf_tokenizer(root, length: int, siglip: bool):
    from vlm_jax.data import tokenize

    tok = tokenize.load_tokenizer(root)

    def call(texts):
        ids, mask = tokenize.tokenize(tok, texts, length)
        # SigLIP was trained on texts padded to L with no padding mask (big_vision; HF's docs: padding="max_length"
        # "as that's how the model was trained"): the tower attends to the pads and pools the last one.
        return (ids, np.ones_like(mask)) if siglip else (ids, mask)
    return call


def load_dual_encoder(checkpoint_dir, dtype="float32") -> DualEncoder:
    """The `DualEncoder` of a checkpoint directory (HF CLIP, HF SigLIP or open_clip); weights load lazily.

    Args:
      checkpoint_dir: the directory (`programs.runner.resolve_checkpoint` finds it for hub ids and replicas).
      dtype: compute and parameter dtype ('float32', 'bfloat16' ...).

    Raises:
      CheckpointError / UserError: an unknown format, an unsupported config, missing tokenizer or processor files
        (one line each).
    """
    from vlm_jax.data import preprocess, tokenize

    root = pathlib.Path(checkpoint_dir)
    family = detect_family(root)
    dtype = jnp.dtype(dtype)
    if family == "open_clip":
        raw = open_clip_convert.read_config(root)
        try:
            cfg = open_clip_convert.config_from_dict(raw["model_cfg"])
        except ValueError as e:
            raise CheckpointError(f"{root / open_clip_convert.CONFIG_NAME}: {e}") from None
        open_clip_convert.weights_file(root)  # a torch-only directory fails here, before any work
        size, length = cfg.vision.image_size, cfg.text.context_length
        settings = preprocess.open_clip_image_settings(raw.get("preprocess_cfg", {}), size,
                                                       str(root / open_clip_convert.CONFIG_NAME))
        return DualEncoder(family, str(root), dtype, settings, size, length,
                           _load=lambda: open_clip_convert.from_pretrained(root, dtype=dtype),
                           _tokenizer=lambda: tokenize.OpenCLIPTokenizer(root, length))
    raw = loader.read_config(root)
    settings = preprocess.image_settings(root)
    if family == "clip":
        from vlm_jax.convert import clip as convert

        size, length = raw["vision_config"].get("image_size", 224), raw["text_config"].get(
            "max_position_embeddings", 77)
        load = functools.partial(convert.from_pretrained, root, dtype=dtype)
    else:
        from vlm_jax.convert import siglip as convert

        size, length = raw["vision_config"].get("image_size", 224), raw["text_config"].get(
            "max_position_embeddings", 64)
        load = functools.partial(convert.load_siglip_model, root, dtype=dtype)
    return DualEncoder(family, str(root), dtype, settings, size, length, _load=load,
                       _tokenizer=lambda: _hf_tokenizer(root, length, family == "siglip"))


def describe(enc: DualEncoder) -> str:
    """One line for logs: family, image size, text length, preprocessing."""
    return f"{enc.family} dual encoder, {enc.image_size}px images, {enc.text_length}-token texts, " + json.dumps(
        enc.image_settings, sort_keys=True)
