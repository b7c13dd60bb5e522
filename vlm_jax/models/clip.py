"""CLIP (Radford et al. 2021) in Flax linen: a port of Hugging Face `CLIPModel`.

The module reproduces `transformers.CLIPModel` (modeling_clip.py) in float32 to ~1e-6:

  * `CLIPVisionTower`: conv patch embedding (no bias) -> [class token; patches] + learned
    positions -> pre_layrnorm -> N pre-LN encoder layers -> post_layernorm on the class token.
  * `CLIPTextTower`: token + position embeddings -> N pre-LN encoder layers with a causal and
    padding mask -> final_layer_norm -> hidden state at the EOS token.
  * `CLIP`: both towers, the two bias-free projections and `logit_scale` (stored like HF, i.e.
    log(1 / temperature); callers apply `exp`).

The parameter tree mirrors the HF state dict so that freezing regexes read the same on both
sides (`layers.3` becomes `layers_3`, Linear `weight` becomes `kernel`, LayerNorm `weight`
becomes `scale`, Embedding `weight` becomes `embedding`; HF's typo `pre_layrnorm` is kept):

  vision_model/embeddings/{patch_embedding/kernel, class_embedding, position_embedding/embedding}
  vision_model/pre_layrnorm, vision_model/post_layernorm
  {vision,text}_model/encoder/layers_{i}/{layer_norm1, layer_norm2}
  {vision,text}_model/encoder/layers_{i}/self_attn/{q,k,v,out}_proj/{kernel,bias}
  {vision,text}_model/encoder/layers_{i}/mlp/{fc1,fc2}/{kernel,bias}
  text_model/embeddings/{token_embedding,position_embedding}/embedding, text_model/final_layer_norm
  visual_projection/kernel, text_projection/kernel, logit_scale

Logical axis names (mapped onto the mesh by the config's rule table):

  'embed'     model width D of either tower (kernels' input/output side, embeddings' columns)
  'mlp'       MLP hidden width (fc1 output, fc2 input)
  'heads'     attention heads; q/k/v kernels are f32[D, heads, kv], out_proj is f32[heads, kv, D]
  'kv'        per-head width (head_dim)
  'vocab'     token-embedding rows
  'pos'       position-embedding rows (text positions, or class token + patches)
  'patch_h', 'patch_w', 'channels'   the patch-embedding conv kernel f32[ph, pw, C, D]; tiny,
              kept distinct because Flax rejects a name repeated within one array
  'norm'      LayerNorm scale/bias (replicated in practice)
  'proj'      joint embedding width P of the two projections
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_ACTIVATIONS = {
    # OpenAI's CLIP uses quick_gelu; other checkpoints (e.g. LAION's) use the exact erf gelu.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
    """Returns the activation function HF calls `name` (ACT2FN), or raises ValueError."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; vlm_jax CLIP supports {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Hyper-parameters shared by both towers (a frozen, hashable view of the HF config)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        activation(self.hidden_act)  # fail at construction, not at the first trace

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
    image_size: int
    patch_size: int
    num_channels: int = 3


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerConfig):
    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int
    bos_token_id: int | None = None  # only kept to write the config back (to_hf)
    pad_token_id: int | None = None


def _tower_kwargs(c) -> dict:
    return dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps)


def vision_config_from_hf(v) -> "VisionConfig":
    """A `VisionConfig` from an HF CLIPVisionConfig (standalone, or the vision part of a CLIP/LLaVA config)."""
    return VisionConfig(**_tower_kwargs(v), image_size=v.image_size, patch_size=v.patch_size,
                        num_channels=v.num_channels)


def _part(init, *names):
    return nn.with_logical_partitioning(init, names)


_default_kernel = nn.initializers.lecun_normal()
_zeros, _ones = nn.initializers.zeros_init(), nn.initializers.ones_init()
_embed_init = nn.initializers.normal(0.02)  # HF initialises embeddings with std 0.02 too


def LayerNorm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """nn.LayerNorm with logical names; two-pass variance to match torch in float32."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        scale_init=_part(_ones, "norm"), bias_init=_part(_zeros, "norm"), name=name)


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (all with bias)."""

    cfg: TowerConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask=None):
        """f32[B, L, D], bool[B, 1, L, L] or None (True = attend) -> f32[B, L, D]."""
        c = self.cfg
        heads = dict(features=(c.num_heads, c.head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=_part(_default_kernel, "embed", "heads", "kv"),
                     bias_init=_part(_zeros, "heads", "kv"))
        # [B, L, heads, kv] is exactly the BTNH layout jax.nn.dot_product_attention wants.
        q = nn.DenseGeneral(**heads, name="q_proj")(x)
        k = nn.DenseGeneral(**heads, name="k_proj")(x)
        v = nn.DenseGeneral(**heads, name="v_proj")(x)
        # attention_impl None/'xla' is the portable XLA path, 'cudnn' the fused GPU kernel; both
        # keep the softmax in float32 for bf16 inputs.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=c.head_dim ** -0.5,
                                           implementation=self.attention_impl)
        return nn.DenseGeneral(c.hidden_size, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=_part(_default_kernel, "heads", "kv", "embed"),
                               bias_init=_part(_zeros, "embed"), name="out_proj")(out)


class MLP(nn.Module):
    cfg: TowerConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(c.intermediate_size, kernel_init=_part(_default_kernel, "embed", "mlp"),
                     bias_init=_part(_zeros, "mlp"), name="fc1", **kw)(x)
        x = activation(c.hidden_act)(x)
        return nn.Dense(c.hidden_size, kernel_init=_part(_default_kernel, "mlp", "embed"),
                        bias_init=_part(_zeros, "embed"), name="fc2", **kw)(x)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    cfg: TowerConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + Attention(self.cfg, name="self_attn", attention_impl=self.attention_impl, **kw)(h, mask)
        h = LayerNorm(self.cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + MLP(self.cfg, name="mlp", **kw)(h)


class Encoder(nn.Module):
    """`num_layers` encoder layers, named layers_{i} like HF's `encoder.layers.{i}`."""

    cfg: TowerConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask=None):
        """Returns the tuple of hidden states: the input, then every layer's output (L + 1)."""
        states = [x]
        for i in range(self.cfg.num_layers):
            x = EncoderLayer(self.cfg, self.dtype, self.param_dtype, self.attention_impl, name=f"layers_{i}")(x, mask)
            states.append(x)
        return tuple(states)


class _VisionEmbeddings(nn.Module):
    """HF `CLIPVisionEmbeddings`: conv patches, class token, learned positions."""

    cfg: VisionConfig
    num_positions: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, pixel_values):
        """f32[B, H, W, C] -> f32[B, 1 + N, D]."""
        c = self.cfg
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=_part(_default_kernel, "patch_h", "patch_w", "channels", "embed"),
                          name="patch_embedding")(pixel_values.astype(self.dtype))
        b = patches.shape[0]
        # Row-major flattening of the [gh, gw] grid matches torch's flatten(2) on NCHW.
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", _part(_embed_init, "embed"), (c.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
        pos = nn.Embed(self.num_positions, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=_part(_embed_init, "pos", "embed"), name="position_embedding")
        return jnp.concatenate([cls, patches], axis=1) + pos(jnp.arange(self.num_positions))[None]


class CLIPVisionTower(nn.Module):
    """HF `CLIPVisionModel`."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixel_values):
        """Encodes images.

        Args:
          pixel_values: f32[B, H, W, C] normalised images (NHWC), H = W = image_size.

        Returns:
          (pooled f32[B, D], hidden_states): pooled is post_layernorm(class token of the last
          layer); hidden_states is a tuple of L + 1 f32[B, 1 + N, D] (the pre_layrnorm output,
          then every layer's output), as HF `output_hidden_states=True`.
        """
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixel_values.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"image size {pixel_values.shape[1:3]} != model image_size {c.image_size} "
                             f"(NHWC input expected)")
        num_pos = (c.image_size // c.patch_size) ** 2 + 1
        emb = _VisionEmbeddings(c, num_pos, name="embeddings", **kw)(pixel_values)
        x = LayerNorm(c.layer_norm_eps, name="pre_layrnorm", **kw)(emb)
        states = Encoder(c, name="encoder", attention_impl=self.attention_impl, **kw)(x)
        pooled = LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)(states[-1][:, 0])
        return pooled, states


class CLIPTextTower(nn.Module):
    """HF `CLIPTextModel`."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """Encodes token ids.

        Args:
          input_ids: i32[B, L], L <= max_position_embeddings.
          attention_mask: i32[B, L] (1 = token, 0 = padding) or None for no padding.

        Returns:
          (pooled f32[B, D], last_hidden_state f32[B, L, D]); pooled is the final_layer_norm
          output at the EOS token.
        """
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(f"sequence length {length} > max_position_embeddings {c.max_position_embeddings}")
        x = _TextEmbeddings(c, name="embeddings", **kw)(input_ids)

        # Causal AND padding mask, as HF's create_causal_mask: query i sees key j iff j <= i and
        # j is a real token. A boolean mask keeps jax.nn.dot_product_attention on its fast paths.
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        x = Encoder(c, name="encoder", attention_impl=self.attention_impl, **kw)(x, mask)[-1]
        x = LayerNorm(c.layer_norm_eps, name="final_layer_norm", **kw)(x)

        if c.eos_token_id == 2:
            # HF's legacy rule (configs saved before transformers PR #24773 carry eos_token_id=2):
            # the EOS token <|endoftext|> has the largest id of the original vocab.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            # First EOS (the pad token may equal EOS); 0 if a row has none, as torch's argmax.
            eos_pos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        return x[jnp.arange(b), eos_pos], x


class _TextEmbeddings(nn.Module):
    """HF `CLIPTextEmbeddings`: token + absolute position embeddings."""

    cfg: TextConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, input_ids):
        """i32[B, L] -> f32[B, L, D]."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_part(_embed_init, "vocab", "embed"),
                       name="token_embedding", **kw)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=_part(_embed_init, "pos", "embed"),
                       name="position_embedding", **kw)
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]


class CLIP(nn.Module):
    """HF `CLIPModel`: both towers, projections and logit_scale.

    Build it from an HF config with `CLIP.from_hf_config(config)`. Use the methods through
    `apply`, e.g. `model.apply({"params": p}, x, method=CLIP.encode_image)`.

    Attributes:
      vision: vision tower hyper-parameters.
      text: text tower hyper-parameters.
      projection_dim: P, the joint embedding width.
      logit_scale_init: initial value of `logit_scale` (log of 1/temperature).
      dtype: compute dtype (activations); bfloat16 works.
      param_dtype: parameter dtype.
      attention_impl: `implementation` of jax.nn.dot_product_attention: None (XLA, portable)
        or 'cudnn' (fused kernel, NVIDIA GPUs only).
    """

    vision: VisionConfig
    text: TextConfig
    projection_dim: int
    logit_scale_init: float = 2.6592
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @classmethod
    def from_hf_config(cls, config, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                       attention_impl: str | None = None) -> "CLIP":
        """Builds the module from a `transformers.CLIPConfig` (or its `to_dict()`)."""
        if isinstance(config, dict):
            from transformers import CLIPConfig  # lazy: transformers is heavy and only needed here
            config = CLIPConfig.from_dict(config)
        v, t = config.vision_config, config.text_config
        vision = vision_config_from_hf(v)
        text = TextConfig(**_tower_kwargs(t), vocab_size=t.vocab_size,
                          max_position_embeddings=t.max_position_embeddings, eos_token_id=t.eos_token_id,
                          bos_token_id=t.bos_token_id, pad_token_id=t.pad_token_id)
        return cls(vision, text, config.projection_dim, float(config.logit_scale_init_value),
                   dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_model = CLIPVisionTower(self.vision, attention_impl=self.attention_impl, **kw)
        self.text_model = CLIPTextTower(self.text, attention_impl=self.attention_impl, **kw)
        proj = dict(use_bias=False, kernel_init=_part(_default_kernel, "embed", "proj"), **kw)
        self.visual_projection = nn.Dense(self.projection_dim, **proj)
        self.text_projection = nn.Dense(self.projection_dim, **proj)
        self.logit_scale = self.param("logit_scale", _part(nn.initializers.constant(self.logit_scale_init)),
                                      (), self.param_dtype)

    def encode_image(self, pixel_values):
        """f32[B, H, W, C] normalised NHWC images -> f32[B, P] (unnormalised image embeddings)."""
        return self.visual_projection(self.vision_model(pixel_values)[0])

    def encode_text(self, input_ids, attention_mask=None):
        """i32[B, L] ids, i32[B, L] mask (or None) -> f32[B, P] (unnormalised text embeddings)."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[0])

    def vision_hidden_states(self, pixel_values):
        """f32[B, H, W, C] -> tuple of L + 1 f32[B, 1 + N, D] (HF `hidden_states`; LLaVA takes [-2])."""
        return self.vision_model(pixel_values)[1]

    def __call__(self, pixel_values, input_ids, attention_mask=None):
        """Returns (f32[B, P] image embeddings, f32[B', P] text embeddings); creates every param."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

    def init_inputs(self, batch: int = 1):
        """Dummy (pixel_values, input_ids, attention_mask) for `init` / `jax.eval_shape`."""
        v, t = self.vision, self.text
        return (jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32),
                jnp.zeros((batch, t.max_position_embeddings), jnp.int32),
                jnp.ones((batch, t.max_position_embeddings), jnp.int32))
