"""LLaVA-style LVLMs: vision tower -> multimodal projector -> decoder LM, as HF `LlavaForConditionalGeneration`.

The text is embedded by the LM; the projected image features replace the embeddings at the positions of the
image token (`<image>`, already expanded by the processor to one token per image feature), in order: the
first image fills the first `tokens_per_image` image tokens of the batch (row-major), and so on — HF's
`masked_scatter`. Two towers are supported: CLIP (llava-1.5: hidden state -2, class token dropped) and SigLIP
(llava-interleave-qwen: the 'full' selection), and two LMs: Llama (Vicuna) and Qwen2.

Parameter tree: {'vision_tower': CLIPVisionTower or SiglipVisionTower params, 'multi_modal_projector':
{'linear_1', 'linear_2'}, 'language_model': CausalLM params}. Logical axis names as in the families' files;
the projector's input axis is 'embed_vision'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import clip as clip_lib
from vlm_jax.models import llama as llama_lib
from vlm_jax.models import siglip as siglip_lib

Dtype = Any
SELECT_STRATEGIES = ("default", "full")
# The vision inputs of every LVLM family, under the HF processors' names: what `embed_multimodal` and `positions`
# take as keyword arguments (a batch dict holds those of its family only; `vision_inputs`).
VISION_KEYS = ("pixel_values", "image_grid_thw")


def vision_inputs(batch, prefix: str = "") -> dict:
    """The vision arrays of a batch dict ({prefix + name} for name in VISION_KEYS), under their HF names."""
    return {k: batch[prefix + k] for k in VISION_KEYS if prefix + k in batch}


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """Hyper-parameters (a frozen, hashable view of HF's `LlavaConfig`).

    Attributes:
      vision_type: 'clip' or 'siglip' (the vision_config's model_type family).
      vision: the tower's config.
      text: the decoder's config.
      image_token_id: id of the image placeholder token.
      vision_feature_layer: index (or indices, concatenated on features) into the tower's hidden states.
      select_strategy: 'default' drops the first token (CLIP's class token; a patch for SigLIP, as HF does),
        'full' keeps every token.
      projector_act: activation between the projector's two linear layers ('gelu' in LLaVA-1.5).
      projector_bias: whether the projector's linear layers have biases.
    """

    vision_type: str
    vision: Any
    text: llama_lib.DecoderConfig
    image_token_id: int
    vision_feature_layer: int | tuple[int, ...] = -2
    select_strategy: str = "default"
    projector_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        if self.vision_type not in ("clip", "siglip"):
            raise ValueError(f"unsupported vision tower {self.vision_type!r}; vlm_jax LLaVA supports 'clip', 'siglip'")
        if self.select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"unknown vision_feature_select_strategy {self.select_strategy!r}; "
                             f"expected one of {SELECT_STRATEGIES}")

    @property
    def layers(self) -> tuple[int, ...]:
        v = self.vision_feature_layer
        return (v,) if isinstance(v, int) else tuple(v)

    @property
    def tokens_per_image(self) -> int:
        """Image features (= image tokens in the prompt) per image."""
        n = (self.vision.image_size // self.vision.patch_size) ** 2
        # CLIP's hidden states carry a class token, SigLIP's do not. 'default' drops the *first* state whatever
        # the tower (HF's `[:, 1:]`; for SigLIP that is a patch), 'full' keeps every one.
        return n + int(self.vision_type == "clip") - int(self.select_strategy == "default")

    @classmethod
    def from_hf(cls, config) -> "LlavaConfig":
        """From a `transformers.LlavaConfig` (or its `to_dict()`)."""
        if isinstance(config, dict):
            from transformers import LlavaConfig as HFConfig  # lazy: heavy import
            config = HFConfig.from_dict(config)
        v, t = config.vision_config, config.text_config
        vtype = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip",
                 "siglip": "siglip"}.get(v.model_type, v.model_type)
        if vtype == "clip":
            vision = clip_lib.vision_config_from_hf(v)
        elif vtype == "siglip":
            # LLaVA never runs SigLIP's pooling head: it is not built (its tensors are ignored on load).
            vision = siglip_lib.SiglipVisionConfig.from_hf(v, use_head=False)
        else:
            vision = None
        layer = config.vision_feature_layer
        return cls(vision_type=vtype, vision=vision, text=llama_lib.DecoderConfig.from_hf(t),
                   image_token_id=int(config.image_token_id),
                   vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
                   select_strategy=config.vision_feature_select_strategy,
                   projector_act=config.projector_hidden_act,
                   projector_bias=bool(getattr(config, "multimodal_projector_bias", True)))


class Projector(nn.Module):
    """HF `LlavaMultiModalProjector`: linear -> act -> linear, vision width (x layers) -> LM width."""

    cfg: LlavaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """f32[N, T, Dv * num_layers] -> f32[N, T, D]."""
        d = self.cfg.text.hidden_size
        kw = dict(use_bias=self.cfg.projector_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.lecun_normal()
        x = nn.Dense(d, kernel_init=nn.with_logical_partitioning(init, ("embed_vision", "embed")), name="linear_1",
                     **kw)(x)
        x = clip_lib.activation(self.cfg.projector_act)(x)
        return nn.Dense(d, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")), name="linear_2", **kw)(x)


def merge_image_features(embeds, input_ids, features, image_token_id: int):
    """Places image features at the image-token positions, in order (HF's `masked_scatter`).

    Args:
      embeds: f32[B, L, D] text embeddings.
      input_ids: i32[B, L]; exactly N * T of them equal `image_token_id` (checked by `check_image_tokens`,
        outside jit).
      features: f32[N, T, D] projected image features.
      image_token_id: the placeholder id.

    Returns:
      f32[B, L, D].
    """
    b, l, d = embeds.shape
    mask = (input_ids == image_token_id).reshape(-1)
    flat = features.reshape(-1, d).astype(embeds.dtype)
    # The k-th image token (row-major over the batch) takes the k-th feature row.
    idx = jnp.clip(jnp.cumsum(mask) - 1, 0, flat.shape[0] - 1)
    return jnp.where(mask[:, None], flat[idx], embeds.reshape(-1, d)).reshape(b, l, d)


def check_image_tokens(input_ids, num_images: int, tokens_per_image: int, image_token_id: int) -> None:
    """Host-side check (jit cannot raise) that the prompts hold one image token per image feature."""
    n = int((np.asarray(input_ids) == image_token_id).sum())
    if n != num_images * tokens_per_image:
        raise ValueError(f"the prompts hold {n} image tokens but {num_images} image(s) give "
                         f"{num_images * tokens_per_image} features; expand each <image> to {tokens_per_image} "
                         f"tokens (id {image_token_id}), as the HF processor does")


class ImageTokenLVLM(nn.Module):
    """What the LVLMs that splice image features at image-token positions share (LLaVA, InternVL): their face to
    the programs. A subclass defines `cfg` (with `text` and `image_token_id`), `language_model` (a
    `llama.CausalLM`), `scan_layers`, `dtype` and `image_features(pixel_values) -> f32[N, T, D]`.

    The LVLM interface every program uses (`Qwen2VL` has the same methods):
      embed_multimodal(input_ids, **vision) -> f32[B, L, D]; vision = the processor's arrays by HF name
        (`VISION_KEYS`), either HF's flat layout or with a leading batch axis (one image per row, as the programs
        batch them), which is flattened here;
      positions(input_ids, attention_mask, **vision) -> the rotary positions to pass to `hidden_states` (None:
        the LM's own, count of real tokens; Qwen2-VL's M-RoPE positions);
      hidden_states / logits / embed / init_cache / init_inputs.
    """

    def embed_multimodal(self, input_ids, pixel_values=None):
        """i32[B, L] ids (+ f32[N, H, W, 3] images or tiles, or f32[B, T, H, W, 3] T tiles per row) -> f32[B, L, D]
        embeddings, the image features (`image_features`, one row per image token) spliced in at the image-token
        positions."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds
        if pixel_values.ndim == 5:  # [B, T, H, W, 3]: each row's tiles, in order
            pixel_values = pixel_values.reshape(-1, *pixel_values.shape[2:])
        return merge_image_features(embeds, input_ids, self.image_features(pixel_values), self.cfg.image_token_id)

    def positions(self, input_ids, attention_mask=None, pixel_values=None):
        """None: 1-D rotary positions, which the LM derives from the mask (works on the unbound module)."""
        del input_ids, attention_mask, pixel_values
        return None

    def hidden_states(self, input_ids, attention_mask=None, *, inputs_embeds=None, positions=None, cache=None):
        """The LM's final-norm hidden states; see `CausalLM.hidden_states`."""
        return self.language_model.hidden_states(input_ids, attention_mask, inputs_embeds=inputs_embeds,
                                                 positions=positions, cache=cache)

    def logits(self, hidden):
        return self.language_model.logits(hidden)

    def embed(self, input_ids):
        return self.language_model.embed(input_ids)

    def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None):
        return llama_lib.init_cache(self.cfg.text, batch, max_len, self.dtype if dtype is None else dtype,
                                    self.scan_layers)


class Llava(ImageTokenLVLM):
    """HF `LlavaForConditionalGeneration`.

    Build with `Llava.from_hf_config(config)`; load weights with `vlm_jax.convert.llava.from_pretrained`.
    It has the `hidden_states` / `logits` / `init_cache` interface of `CausalLM`, so
    `vlm_jax.models.generate.greedy_generate(model, params, None, mask, ..., inputs_embeds=embeds)` decodes
    from `embeds = model.apply(v, ids, pixel_values, method='embed_multimodal')`.

    Attributes:
      cfg: hyper-parameters.
      dtype / param_dtype: compute and parameter dtypes; attention_impl / remat / scan_layers: the LM's options.
    """

    cfg: LlavaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    scan_layers: bool = False

    @classmethod
    def from_hf_config(cls, config, **kwargs) -> "Llava":
        return cls(LlavaConfig.from_hf(config), **kwargs)

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.vision_type == "clip":
            self.vision_tower = clip_lib.CLIPVisionTower(c.vision, attention_impl=self.attention_impl, **kw)
        else:
            self.vision_tower = siglip_lib.SiglipVisionTower(c.vision, attention_impl=self.attention_impl, **kw)
        self.multi_modal_projector = Projector(c, **kw)
        self.language_model = llama_lib.CausalLM(c.text, attention_impl=self.attention_impl, remat=self.remat,
                                                 scan_layers=self.scan_layers, **kw)

    def image_features(self, pixel_values):
        """f32[N, H, W, 3] normalised images -> f32[N, T, D] projected features (T = tokens_per_image)."""
        c = self.cfg
        if c.vision_type == "clip":
            states = self.vision_tower(pixel_values)[1]
        else:
            states = self.vision_tower.hidden_states(pixel_values)
        selected = [states[i] for i in c.layers]
        if c.select_strategy == "default":  # as HF: the first state goes for any tower (CLIP's class token)
            selected = [s[:, 1:] for s in selected]
        return self.multi_modal_projector(jnp.concatenate(selected, axis=-1))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, *, positions=None, cache=None,
                 return_hidden: bool = False):
        """Next-token logits f32[B, L, V] of text with images.

        Args:
          input_ids: i32[B, L] with `tokens_per_image` image tokens per image (as the HF processor expands them).
          attention_mask: i32[B, L] or None.
          pixel_values: f32[N, H, W, 3] normalised NHWC images, N = total images in the batch, or None.
          positions, cache, return_hidden: as `CausalLM.__call__`.
        """
        embeds = self.embed_multimodal(input_ids, pixel_values)
        return self.language_model(None, attention_mask, inputs_embeds=embeds, positions=positions, cache=cache,
                                   return_hidden=return_hidden)

    def init_inputs(self, batch: int = 1, images: int = 1):
        """Dummy (input_ids, attention_mask, pixel_values) for `init` / `jax.eval_shape`."""
        v, t = self.cfg.vision, self.cfg.tokens_per_image
        ids = jnp.full((batch, images * t + 2), self.cfg.image_token_id, jnp.int32).at[:, -2:].set(0)
        return (ids, jnp.ones_like(ids),
                jnp.zeros((batch * images, v.image_size, v.image_size, v.num_channels), jnp.float32))
