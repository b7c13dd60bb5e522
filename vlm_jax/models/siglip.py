"""SigLIP (Zhai et al. 2023) in Flax linen: ports of Hugging Face `SiglipVisionModel` and `SiglipModel`.

`SiglipVisionTower` is the image encoder of SigLIP-based LVLMs (LLaVA-Interleave, LLaVA-OneVision,
PaliGemma); `SiglipModel` is the dual encoder (vision tower + `SiglipTextTower` + the sigmoid
loss's learnt logit scale and bias), a few-shot backbone like CLIP. The vision tower reproduces
`transformers.SiglipVisionModel` (modeling_siglip.py) in float32 to ~1e-6:

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

The text tower (`SiglipTextModel`): token + learned position embeddings -> N encoder layers
(CLIP's blocks, *bidirectional*: no causal mask) -> final_layer_norm -> `head` (Linear D -> P) on
the *last* position, which is padding for short texts: SigLIP was trained on texts padded to 64
tokens with no padding mask, so the pads are attended and the last pad's state is the embedding.
Its tree: text_model/embeddings/{token_embedding, position_embedding}/embedding,
text_model/encoder/layers_{i}/..., text_model/final_layer_norm, text_model/head/{kernel, bias};
the dual encoder adds logit_scale f32[1] and logit_bias f32[1] (HF's shapes).

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

from vlm_jax.models.clip import MLP, Encoder, LayerNorm, TowerConfig, _TextEmbeddings

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


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig(TowerConfig):
    """Hyper-parameters of the text tower (a frozen view of HF's `SiglipTextConfig`).

    `max_position_embeddings` is the length texts are padded to (64 for the released checkpoints);
    `projection_size` the width of `head`'s output (HF defaults it to hidden_size).
    """

    vocab_size: int = 32000
    max_position_embeddings: int = 64
    projection_size: int = 768

    @classmethod
    def from_hf(cls, config) -> "SiglipTextConfig":
        """From a `transformers.SiglipTextConfig`, a `SiglipConfig` (its text part) or their dicts."""
        if isinstance(config, dict):
            from transformers import SiglipTextConfig as HFConfig  # lazy: heavy import

            config = HFConfig.from_dict(config.get("text_config", config))
        else:
            config = getattr(config, "text_config", config)
        return cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                   hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
                   vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
                   projection_size=config.projection_size or config.hidden_size)


class SiglipTextTower(nn.Module):
    """HF `SiglipTextModel`: bidirectional encoder, pooled at the last position, then `head`."""

    cfg: SiglipTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """Encodes token ids.

        Args:
          input_ids: i32[B, L], L <= max_position_embeddings (SigLIP pads to exactly that).
          attention_mask: i32[B, L] (1 = token, 0 = padding: those keys are masked, as HF does when it is
            given one) or None: every position is attended, as SigLIP was trained.

        Returns:
          (pooled f32[B, P] = head(final_layer_norm output at position L - 1), last_hidden_state f32[B, L, D]).
        """
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} > max_position_embeddings "
                             f"{c.max_position_embeddings}")
        x = _TextEmbeddings(c, name="embeddings", **kw)(input_ids)
        mask = None if attention_mask is None else (attention_mask[:, None, None, :] > 0)
        x = Encoder(c, name="encoder", attention_impl=self.attention_impl, **kw)(x, mask)[-1]
        x = LayerNorm(c.layer_norm_eps, name="final_layer_norm", **kw)(x)
        pooled = nn.Dense(c.projection_size, kernel_init=_part(_default_kernel, "embed", "proj"),
                          bias_init=_part(_zeros, "proj"), name="head", **kw)(x[:, -1])
        return pooled, x


class SiglipModel(nn.Module):
    """HF `SiglipModel`: image and text towers, logit_scale and logit_bias.

    The sigmoid logits are `exp(logit_scale) * cos(image, text) + logit_bias` (both stored as f32[1]).

    Attributes:
      vision: the vision tower's hyper-parameters (with its MAP head: the image embedding is its output).
      text: the text tower's hyper-parameters.
    """

    vision: SiglipVisionConfig
    text: SiglipTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @classmethod
    def from_hf_config(cls, config, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                       attention_impl: str | None = None) -> "SiglipModel":
        """From a `transformers.SiglipConfig` (or its dict)."""
        vision = SiglipVisionConfig.from_hf(config)
        if not vision.use_head:
            raise ValueError("a SigLIP dual encoder needs the vision MAP head (vision_use_head=true): the image "
                             "embedding is its output")
        return cls(vision, SiglipTextConfig.from_hf(config), dtype=dtype, param_dtype=param_dtype,
                   attention_impl=attention_impl)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        self.vision_model = SiglipVisionTower(self.vision, **kw)
        self.text_model = SiglipTextTower(self.text, **kw)
        # HF initialises both from randn; the released checkpoints start from log(10) and -10.
        self.logit_scale = self.param("logit_scale", _part(nn.initializers.constant(jnp.log(10.0)), None), (1,),
                                      self.param_dtype)
        self.logit_bias = self.param("logit_bias", _part(nn.initializers.constant(-10.0), None), (1,),
                                     self.param_dtype)

    def encode_image(self, pixel_values):
        """f32[B, H, W, C] normalised NHWC images -> f32[B, P] (the MAP head's output, unnormalised)."""
        return self.vision_model(pixel_values)[1]

    def encode_text(self, input_ids, attention_mask=None):
        """i32[B, L] ids (padded to max_position_embeddings), mask or None -> f32[B, P] (unnormalised)."""
        return self.text_model(input_ids, attention_mask)[0]

    def logit_params(self):
        """(logit_scale f32[1], logit_bias f32[1]) as stored (apply exp to the scale)."""
        return self.logit_scale, self.logit_bias

    def __call__(self, pixel_values, input_ids, attention_mask=None):
        """Returns the sigmoid logits f32[B_img, B_txt] of HF's `logits_per_image`; creates every param."""
        img, txt = self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        return (img @ txt.T) * jnp.exp(self.logit_scale) + self.logit_bias

    def init_inputs(self, batch: int = 1):
        """Dummy (pixel_values, input_ids) for `init` / `jax.eval_shape`."""
        v, t = self.vision, self.text
        return (jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32),
                jnp.zeros((batch, t.max_position_embeddings), jnp.int32))
