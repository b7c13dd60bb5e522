"""ViT (Dosovitskiy et al. 2021) in Flax linen: a port of Hugging Face `ViTModel` / `ViTForImageClassification`.

VITask's task-specific model is "a ViT base model pre-trained on ImageNet-21K"
(google/vit-base-patch16-224-in21k, a `ViTModel` with its pooler). The module reproduces
transformers' modeling_vit.py in float32 to ~1e-6:

  conv patch embedding (with bias) -> [cls_token; patches] + learned positions (no pre-norm)
  -> N pre-LN encoder layers -> final layernorm -> optional pooler (dense + tanh on the class
  token, ViTModel) -> optional classifier (dense on the normed class token, ViTForImageClassification).

The encoder layers are CLIP's blocks (`vlm_jax.models.clip.Encoder`): HF ViT's
`layernorm_before -> attention (q/k/v/o, all with bias) -> + -> layernorm_after -> mlp -> +`
is exactly CLIP's pre-LN block, so the parameter tree reuses CLIP's names (layer_norm1,
self_attn/{q,k,v,out}_proj, mlp/{fc1,fc2}) and the converter maps them to ViT's:

  embeddings/{cls_token, position_embeddings, patch_embeddings/{kernel, bias}}
  encoder/layers_{i}/...   (CLIP's names)
  layernorm/{scale, bias}, pooler/{kernel, bias}, classifier/{kernel, bias}

Logical axis names: those of `vlm_jax.models.clip`, plus 'classes' (classifier output rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models.clip import Encoder, LayerNorm, TowerConfig

Dtype = Any


def _part(init, *names):
    return nn.with_logical_partitioning(init, names)


_default_kernel = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros_init()
_embed_init = nn.initializers.truncated_normal(0.02)  # HF's initializer_range


@dataclasses.dataclass(frozen=True)
class ViTConfig(TowerConfig):
    """Hyper-parameters (a frozen, hashable view of HF's `ViTConfig`).

    `pooler` is ViTModel's `add_pooling_layer`; `num_labels` > 0 adds ViTForImageClassification's
    classifier (0: none).
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    pooler: bool = True
    pooler_output_size: int | None = None
    num_labels: int = 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, config, *, pooler: bool = True, num_labels: int = 0) -> "ViTConfig":
        """From a `transformers.ViTConfig` (or its dict).

        Raises:
          ValueError: a setting the port does not implement (qkv_bias=False, a pooler_act other than tanh,
            non-square images or patches, or a head_dim that is not hidden_size / heads).
        """
        if isinstance(config, dict):
            from transformers import ViTConfig as HFConfig  # lazy: heavy import

            config = HFConfig.from_dict(config)
        if getattr(config, "model_type", "vit") != "vit":
            raise ValueError(f"config has model_type {config.model_type!r}, not 'vit'")
        unsupported = {k: v for k, v in (("qkv_bias", config.qkv_bias), ("pooler_act", config.pooler_act))
                       if v != {"qkv_bias": True, "pooler_act": "tanh"}[k]}
        for k in ("image_size", "patch_size"):
            if not isinstance(getattr(config, k), int):
                unsupported[k] = getattr(config, k)
        if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
            unsupported["head_dim"] = config.head_dim
        if unsupported:
            raise ValueError(f"ViT settings not supported by vlm_jax: {unsupported}")
        out = config.pooler_output_size or config.hidden_size
        return cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                   hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
                   image_size=config.image_size, patch_size=config.patch_size, num_channels=config.num_channels,
                   pooler=pooler, pooler_output_size=out, num_labels=num_labels)


class _Embeddings(nn.Module):
    """HF `ViTEmbeddings`: conv patches (with bias), class token, learned positions."""

    cfg: ViTConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, pixel_values):
        """f32[B, H, W, C] -> f32[B, 1 + N, D]."""
        c, d = self.cfg, self.cfg.hidden_size
        p = c.patch_size
        patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          kernel_init=_part(_default_kernel, "patch_h", "patch_w", "channels", "embed"),
                          bias_init=_part(_zeros, "embed"), name="patch_embeddings")(pixel_values.astype(self.dtype))
        # Row-major flattening of the [gh, gw] grid matches torch's flatten(2) on NCHW.
        patches = patches.reshape(patches.shape[0], -1, d)
        # HF stores both as f32[1, 1, D] / f32[1, 1 + N, D]; the leading 1s are kept so the file round-trips.
        cls = self.param("cls_token", _part(_embed_init, None, None, "embed"), (1, 1, d), self.param_dtype)
        pos = self.param("position_embeddings", _part(_embed_init, None, "pos", "embed"), (1, c.num_patches + 1, d),
                         self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, d))
        return jnp.concatenate([cls, patches], axis=1) + pos.astype(self.dtype)


class ViT(nn.Module):
    """HF `ViTModel` (cfg.pooler) / `ViTForImageClassification` (cfg.num_labels > 0, no pooler).

    Attributes:
      cfg: hyper-parameters.
      dtype: compute dtype (activations); bfloat16 works.
      param_dtype: parameter dtype.
      attention_impl: `implementation` of jax.nn.dot_product_attention: None (XLA) or 'cudnn'.
    """

    cfg: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixel_values):
        """Encodes images.

        Args:
          pixel_values: f32[B, H, W, C] normalised images (NHWC), H = W = image_size.

        Returns:
          dict with 'last_hidden_state' f32[B, 1 + N, D] (after the final layernorm), 'hidden_states'
          (L + 1 f32[B, 1 + N, D]: the embeddings, then every layer's raw output, as HF
          `output_hidden_states=True`), 'pooler_output' f32[B, D'] or None, 'logits' f32[B, num_labels] or None.
        """
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixel_values.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"pixel_values shape {pixel_values.shape[1:]} != (image_size, image_size, channels) = "
                             f"{(c.image_size, c.image_size, c.num_channels)} (NHWC input expected)")
        states = Encoder(c, name="encoder", attention_impl=self.attention_impl, **kw)(
            _Embeddings(c, name="embeddings", **kw)(pixel_values))
        last = LayerNorm(c.layer_norm_eps, name="layernorm", **kw)(states[-1])
        pooled = logits = None
        if c.pooler:
            pooled = jnp.tanh(nn.Dense(c.pooler_output_size, kernel_init=_part(_default_kernel, "embed", "mlp"),
                                       bias_init=_part(_zeros, "mlp"), name="pooler", **kw)(last[:, 0]))
        if c.num_labels:
            logits = nn.Dense(c.num_labels, kernel_init=_part(_zeros, "embed", "classes"),
                              bias_init=_part(_zeros, "classes"), name="classifier", **kw)(last[:, 0])
        return {"last_hidden_state": last, "hidden_states": states, "pooler_output": pooled, "logits": logits}

    def init_inputs(self, batch: int = 1):
        """Dummy (pixel_values,) for `init` / `jax.eval_shape`."""
        c = self.cfg
        return (jnp.zeros((batch, c.image_size, c.image_size, c.num_channels), jnp.float32),)
