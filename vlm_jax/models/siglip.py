"""SigLIP vision tower (Zhai et al. 2023) in Flax linen: a port of Hugging Face `SiglipVisionModel`.

This is the image encoder of SigLIP-based LVLMs (LLaVA-Interleave, LLaVA-OneVision, PaliGemma).
It reproduces `transformers.SiglipVisionModel` (modeling_siglip.py) in float32 to ~1e-6:

  conv patch embedding (with bias) + learned positions (no class token, no pre-norm)
  -> N pre-LN encoder layers (the same blocks as CLIP's, reused from `vlm_jax.models.clip`)
  -> post_layernorm -> optional multihead attention-pooling ("MAP") head.

What LLaVA consumes: `LlavaModel.get_image_features` takes `hidden_states[vision_feature_layer]`
of the tower, and HF's hidden_states are the embeddings and the raw output of every encoder
layer, *without* post_layernorm (it is applied only to `last_hidden_state`). So a LLaVA
module calls `SiglipVisionTower.hidden_states` and picks `[-1]` (llava-interleave-qwen:
vision_feature_layer=-1, 'full' select: every patch token, there is no class token to drop);
post_layernorm and the head are then dead weights kept only so the tree mirrors the checkpoint.

The parameter tree mirrors HF's state dict (the SiglipVisionModel key names of transformers 5,
i.e. without the `vision_model.` prefix; the converter adds prefixes):

  embeddings/patch_embedding/{kernel, bias}, embeddings/position_embedding/embedding
  encoder/layers_{i}/{layer_norm1, layer_norm2}/{scale, bias}
  encoder/layers_{i}/self_attn/{q,k,v,out}_proj/{kernel, bias}
  encoder/layers_{i}/mlp/{fc1, fc2}/{kernel, bias}
  post_layernorm/{scale, bias}
  head/probe, head/attention/{in_proj, out_proj}/{kernel, bias}, head/layernorm, head/mlp/{fc1, fc2}

Logical axis names: those of `vlm_jax.models.clip` ('embed', 'mlp', 'heads', 'kv', 'pos',
'patch_h', 'patch_w', 'channels', 'norm'), plus 'qkv' (the 3 of the MAP head's fused q/k/v
projection, kept fused because torch's nn.MultiheadAttention stores it so) and None on the
two singleton axes of the head's probe f32[1, 1, D].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.clip import MLP, Encoder, LayerNorm, TowerConfig

Dtype = Any


def _part(init, *names):
    return nn.with_logical_partitioning(init, names)


_default_kernel = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(TowerConfig):
    """Hyper-parameters of the tower (a frozen, hashable view of HF's `SiglipVisionConfig`).

    `use_head` is HF's `vision_use_head`: whether the MAP pooling head exists.
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    use_head: bool = True

    @property
    def num_patches(self) -> int:
        # Floor, as the VALID conv: so400m-patch14-384 (LLaVA-Interleave/OneVision) has 27^2 = 729
        # patches and ignores the last 384 - 27 * 14 = 6 pixel rows and columns.
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, config, use_head: bool | None = None) -> "SiglipVisionConfig":
        """From a `transformers.SiglipVisionConfig`, a `SiglipConfig` (its vision part) or a dict.

        Args:
          config: the HF config object or its `to_dict()`; a full SiglipConfig / LLaVA config
            (anything with a `vision_config`) contributes its vision part.
          use_head: overrides `vision_use_head` (LLaVA never runs the head: pass False to drop it).
        """
        if isinstance(config, dict):
            config = config.get("vision_config", config)
        else:
            config = getattr(config, "vision_config", config)
        model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
        if model_type not in (None, "siglip_vision_model"):
            # e.g. a LLaVA whose vision_config is CLIP's: building a SigLIP tower from it would "work".
            raise ValueError(f"vision config has model_type {model_type!r}, not 'siglip_vision_model'")
        if isinstance(config, dict):
            from transformers import SiglipVisionConfig as HFConfig  # lazy: heavy import

            config = HFConfig.from_dict(config)
        return cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                   hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
                   image_size=config.image_size, patch_size=config.patch_size,
                   num_channels=config.num_channels,
                   use_head=bool(getattr(config, "vision_use_head", True) if use_head is None else use_head))


class _VisionEmbeddings(nn.Module):
    """HF `SiglipVisionEmbeddings`: conv patches (with bias) + learned positions, no class token."""

    cfg: SiglipVisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, pixel_values):
        """f32[B, H, W, C] -> f32[B, N, D]."""
        c = self.cfg
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=True,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=_part(_default_kernel, "patch_h", "patch_w", "channels", "embed"),
                          bias_init=_part(_zeros, "embed"), name="patch_embedding")(pixel_values.astype(self.dtype))
        # Row-major flattening of the [gh, gw] grid matches torch's flatten(2) on NCHW.
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size)
        # HF initialises SigLIP positions with std 1/sqrt(D) (not CLIP's 0.02).
        pos = nn.Embed(c.num_patches, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=_part(nn.initializers.normal(c.hidden_size ** -0.5), "pos", "embed"),
                       name="position_embedding")
        return patches + pos(jnp.arange(c.num_patches))[None]


class _FusedInProj(nn.Module):
    """The fused q/k/v projection of torch's nn.MultiheadAttention (`in_proj_weight` / `in_proj_bias`).

    Kept fused, as f32[D, 3, H, K] and f32[3, H, K], because torch stores one f32[3D, D] tensor:
    the converter then maps it with the generic transpose_split / split kinds.
    """

    cfg: SiglipVisionConfig
    param_dtype: Dtype

    @nn.compact
    def __call__(self):
        """Returns (kernel f32[D, 3, H, K], bias f32[3, H, K]); index 0/1/2 of axis 'qkv' is q/k/v."""
        c = self.cfg
        kernel = self.param("kernel", _part(_default_kernel, "embed", "qkv", "heads", "kv"),
                            (c.hidden_size, 3, c.num_heads, c.head_dim), self.param_dtype)
        bias = self.param("bias", _part(_zeros, "qkv", "heads", "kv"), (3, c.num_heads, c.head_dim),
                          self.param_dtype)
        return kernel, bias


class _PoolingAttention(nn.Module):
    """torch `nn.MultiheadAttention(batch_first=True)`, used as cross-attention (probe -> patches)."""

    cfg: SiglipVisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, query, x):
        """f32[B, Q, D] queries attend over f32[B, N, D] -> f32[B, Q, D]."""
        c = self.cfg
        kernel, bias = _FusedInProj(c, self.param_dtype, name="in_proj")()
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        query, x = query.astype(self.dtype), x.astype(self.dtype)
        # q comes from the probe, k and v from the patches: three einsums on the kernel's slices.
        q = jnp.einsum("bqd,dhk->bqhk", query, kernel[:, 0]) + bias[0]
        key = jnp.einsum("bnd,dhk->bnhk", x, kernel[:, 1]) + bias[1]
        val = jnp.einsum("bnd,dhk->bnhk", x, kernel[:, 2]) + bias[2]
        out = jax.nn.dot_product_attention(q, key, val, scale=c.head_dim ** -0.5)
        return nn.DenseGeneral(c.hidden_size, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=_part(_default_kernel, "heads", "kv", "embed"),
                               bias_init=_part(_zeros, "embed"), name="out_proj")(out)


class _PoolingHead(nn.Module):
    """HF `SiglipMultiheadAttentionPoolingHead`: a learned probe attends over the patches."""

    cfg: SiglipVisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        """f32[B, N, D] -> f32[B, D]."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        probe = self.param("probe", _part(nn.initializers.xavier_uniform(), None, None, "embed"),
                           (1, 1, c.hidden_size), self.param_dtype)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, c.hidden_size))
        h = _PoolingAttention(c, name="attention", **kw)(probe, x)
        h = h + MLP(c, name="mlp", **kw)(LayerNorm(c.layer_norm_eps, name="layernorm", **kw)(h))
        return h[:, 0]


class SiglipVisionTower(nn.Module):
    """HF `SiglipVisionModel`.

    Build it with `SiglipVisionTower.from_hf_config(config)`. Init with `__call__` or
    `hidden_states`: both create every parameter (post_layernorm and head included), so the tree
    always mirrors the checkpoint whichever entry point a caller uses.

    Attributes:
      cfg: tower hyper-parameters.
      dtype: compute dtype (activations); bfloat16 works.
      param_dtype: parameter dtype.
      attention_impl: `implementation` of jax.nn.dot_product_attention in the encoder: None
        (XLA, portable) or 'cudnn' (fused kernel, NVIDIA GPUs only).
    """

    cfg: SiglipVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @classmethod
    def from_hf_config(cls, config, *, use_head: bool | None = None, dtype: Dtype = jnp.float32,
                       param_dtype: Dtype = jnp.float32, attention_impl: str | None = None) -> "SiglipVisionTower":
        """From an HF SiglipVisionConfig / SiglipConfig / LLaVA config (or dict); see `SiglipVisionConfig.from_hf`."""
        return cls(SiglipVisionConfig.from_hf(config, use_head=use_head), dtype=dtype, param_dtype=param_dtype,
                   attention_impl=attention_impl)

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = _VisionEmbeddings(c, **kw)
        self.encoder = Encoder(c, attention_impl=self.attention_impl, **kw)
        self.post_layernorm = LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)
        self.head = _PoolingHead(c, **kw) if c.use_head else None

    def _check(self, pixel_values):
        c = self.cfg
        if pixel_values.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"pixel_values shape {pixel_values.shape[1:]} != (image_size, image_size, channels) = "
                             f"{(c.image_size, c.image_size, c.num_channels)} (NHWC input expected; position "
                             f"interpolation to other sizes is not supported)")

    def hidden_states(self, pixel_values):
        """The encoder's hidden states, as HF `output_hidden_states=True` (what LLaVA selects from).

        Args:
          pixel_values: f32[B, H, W, C] normalised images (NHWC), H = W = image_size.

        Returns:
          Tuple of L + 1 f32[B, N, D], N = (image_size / patch_size)^2: the embeddings, then every
          layer's output; none has post_layernorm applied.
        """
        self._check(pixel_values)
        states = self.encoder(self.embeddings(pixel_values))
        if self.is_initializing():
            # Create the params LLaVA never uses, so that init through this method still gives the
            # full tree that the checkpoint (and export back to HF) has.
            self._finish(states[-1])
        return states

    def _finish(self, last):
        last = self.post_layernorm(last)
        return last, (self.head(last) if self.head is not None else None)

    def __call__(self, pixel_values):
        """Encodes images.

        Args:
          pixel_values: f32[B, H, W, C] normalised images (NHWC), H = W = image_size.

        Returns:
          (last_hidden_state f32[B, N, D] after post_layernorm, pooled): pooled is the MAP head's
          f32[B, D] output, or None when the tower has no head (use_head=False).
        """
        self._check(pixel_values)
        return self._finish(self.encoder(self.embeddings(pixel_values))[-1])

    def init_inputs(self, batch: int = 1):
        """Dummy (pixel_values,) for `init` / `jax.eval_shape`."""
        c = self.cfg
        return (jnp.zeros((batch, c.image_size, c.image_size, c.num_channels), jnp.float32),)
