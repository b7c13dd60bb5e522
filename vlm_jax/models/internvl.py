"""InternVL in Flax linen: a port of HF `InternVLForConditionalGeneration` (transformers' `internvl` format).

That format holds the InternVL 2.5 / 3 "-hf" checkpoints (Qwen2 LMs) and InternVL2 / 2.5 checkpoints after
transformers' conversion script, whose InternLM2 LM becomes a Llama-format LM. The pieces, as HF computes them:

  InternViT (`InternVLVisionModel`): conv patches -> [CLS; patches] + learned positions -> N blocks of
      x + lambda_1 * attn(norm_before(x));  x + lambda_2 * mlp(norm_after(x))
    with LayerNorm or RMSNorm (`norm_type`), optional RMSNorm on the whole q and k (`use_qk_norm`, eps 1e-6 as
    HF hard-codes it), layer-scale vectors lambda_1/2, and a final LayerNorm only when use_mean_pooling=False.
  Feature selection: layer -1 is the tower's last_hidden_state (after that final norm, if any), any other index
    reads hidden_states[i] (0 = embeddings); 'default' drops the CLS token.
  Pixel shuffle (downsample_ratio 0.5): the 32x32 patch grid of a 448 px tile becomes 16x16 tokens of 4x width.
  Projector (`InternVLMultiModalProjector`): LayerNorm (eps 1e-5) -> linear_1 -> act -> linear_2.
  Merge: the projected tile features replace the `<IMG_CONTEXT>` token embeddings in order (HF masked_scatter).
  LM: `vlm_jax.models.llama.CausalLM` (Llama or Qwen2; the head tied or not by InternVL's own top-level
    tie_word_embeddings, which is what transformers 5 reads).

Images arrive as tiles f32[N, H, W, 3] (NHWC; the processor splits each image into tiles + a thumbnail,
`vlm_jax.data.internvl_images`), each tile giving `tokens_per_tile` features.

Parameter tree (HF names with `layer.3` -> `layer_3`, Linear weight -> kernel, norms' weight -> scale):

  vision_tower/embeddings/{cls_token [1,1,Dv], position_embeddings [1,1+P,Dv], patch_embeddings/projection}
  vision_tower/encoder/layer_{i}/{layernorm_before, layernorm_after, lambda_1, lambda_2}
  vision_tower/encoder/layer_{i}/attention/{q,k,v}_proj [Dv, H, Dh], q_norm/k_norm [Dv], projection_layer
  vision_tower/encoder/layer_{i}/mlp/{fc1, fc2};  vision_tower/layernorm (use_mean_pooling=False only)
  multi_modal_projector/{layer_norm, linear_1, linear_2};  language_model/... (CausalLM)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import clip as clip_lib
from vlm_jax.models import llama as llama_lib
from vlm_jax.models.llava import ImageTokenLVLM, check_image_tokens, merge_image_features  # noqa: F401 (re-exported)

Dtype = Any
NORM_TYPES = ("layer_norm", "rms_norm")
QK_NORM_EPS = 1e-6  # HF builds q_norm / k_norm with the RMSNorm default, not layer_norm_eps


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


@dataclasses.dataclass(frozen=True)
class InternVisionConfig:
    """Hyper-parameters of InternViT (a frozen, hashable view of HF's `InternVLVisionConfig`)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_channels: int = 3
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    attention_bias: bool = False
    use_qk_norm: bool = False
    use_mean_pooling: bool = True  # False: a final LayerNorm on the last hidden state
    use_absolute_position_embeddings: bool = True
    use_mask_token: bool = False  # a parameter only (masked image modelling); InternVL never uses it

    def __post_init__(self):
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"unsupported vision norm_type {self.norm_type!r}; expected one of {NORM_TYPES}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        clip_lib.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @classmethod
    def from_hf(cls, v) -> "InternVisionConfig":
        """From a `transformers.InternVLVisionConfig`."""
        return cls(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
                   num_heads=v.num_attention_heads, image_size=_pair(v.image_size), patch_size=_pair(v.patch_size),
                   num_channels=v.num_channels, hidden_act=v.hidden_act, norm_type=v.norm_type,
                   layer_norm_eps=float(v.layer_norm_eps), attention_bias=bool(v.attention_bias),
                   use_qk_norm=bool(v.use_qk_norm), use_mean_pooling=bool(v.use_mean_pooling),
                   use_absolute_position_embeddings=bool(v.use_absolute_position_embeddings),
                   use_mask_token=bool(v.use_mask_token))


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    """Hyper-parameters of the whole model (a frozen, hashable view of HF's `InternVLConfig`).

    Attributes:
      vision: the InternViT config.
      text: the LM config; its tie_word_embeddings is InternVL's top-level flag (what transformers 5 ties by).
      image_token_id: id of `<IMG_CONTEXT>`, the per-feature placeholder.
      downsample_ratio: pixel-shuffle ratio r (1 / r must be an integer; 0.5 in every released model).
      projector_act: activation inside the projector.
      vision_feature_layer: -1 (the tower's output) or the index of a hidden state (0 = embeddings).
    """

    vision: InternVisionConfig
    text: llama_lib.DecoderConfig
    image_token_id: int
    downsample_ratio: float = 0.5
    projector_act: str = "gelu"
    vision_feature_layer: int = -1

    def __post_init__(self):
        k = 1 / self.downsample_ratio
        if abs(k - round(k)) > 1e-9 or round(k) < 1:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} is not 1/k for an integer k")
        gh, gw = self.vision.grid
        if gh != gw or gh % self.shuffle:
            raise ValueError(f"the {gh}x{gw} patch grid must be square and divisible by 1/downsample_ratio "
                             f"({self.shuffle}) for the pixel shuffle")
        if not -self.vision.num_layers - 1 <= self.vision_feature_layer <= self.vision.num_layers:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is out of range for "
                             f"{self.vision.num_layers} layers")
        clip_lib.activation(self.projector_act)

    @property
    def shuffle(self) -> int:
        """k = 1 / downsample_ratio: k x k neighbouring patches become one token."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """Image features (= `<IMG_CONTEXT>` tokens in the prompt) per tile; an image of n tiles takes n times."""
        g = self.vision.grid[0] // self.shuffle
        return g * g

    @classmethod
    def from_hf(cls, config) -> "InternVLConfig":
        """From a `transformers.InternVLConfig` (or its dict).

        Raises:
          ValueError: an unsupported feature selection, norm, activation, LM or rope type.
        """
        if isinstance(config, dict):
            from transformers import InternVLConfig as HFConfig  # lazy: heavy import
            config = HFConfig.from_dict(config)
        if config.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
                             f"supported: InternVL drops the CLS token ('default'); HF cannot run 'full' either")
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be one int for InternVL (HF indexes hidden_states with "
                             f"it), got {layer!r}")
        text = llama_lib.DecoderConfig.from_hf(config.text_config)
        text = dataclasses.replace(text, tie_word_embeddings=bool(config.tie_word_embeddings))
        return cls(vision=InternVisionConfig.from_hf(config.vision_config), text=text,
                   image_token_id=int(config.image_token_id), downsample_ratio=float(config.downsample_ratio),
                   projector_act=config.projector_hidden_act, vision_feature_layer=layer)


def _part(init, *names):
    return nn.with_logical_partitioning(init, names)


_init = nn.initializers.normal(0.02)
_zeros, _ones = nn.initializers.zeros_init(), nn.initializers.ones_init()


def _norm(c: InternVisionConfig, name: str, kw: dict):
    if c.norm_type == "rms_norm":
        return llama_lib.RMSNorm(c.layer_norm_eps, name=name, **kw)
    return clip_lib.LayerNorm(c.layer_norm_eps, name, **kw)


class VisionAttention(nn.Module):
    """HF `InternVLVisionAttention`: q/k/v (optionally RMS-normed over all heads at once) -> SDPA -> projection."""

    cfg: InternVisionConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        """f32[B, N, Dv] -> f32[B, N, Dv]."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(name):
            y = nn.DenseGeneral((c.num_heads, c.head_dim), use_bias=c.attention_bias, name=f"{name}_proj",
                                kernel_init=_part(_init, "embed", "heads", "kv"),
                                bias_init=_part(_zeros, "heads", "kv"), **kw)(x)
            if c.use_qk_norm and name in "qk":
                flat = y.reshape(*y.shape[:2], -1)  # the norm spans every head, as HF's Linear output
                y = llama_lib.RMSNorm(QK_NORM_EPS, name=f"{name}_norm", **kw)(flat).reshape(y.shape)
            return y

        out = jax.nn.dot_product_attention(proj("q"), proj("k"), proj("v"), scale=c.head_dim ** -0.5,
                                           implementation=self.attention_impl)
        return nn.DenseGeneral(c.hidden_size, axis=(-2, -1), name="projection_layer",
                               kernel_init=_part(_init, "heads", "kv", "embed"), bias_init=_part(_zeros, "embed"),
                               **kw)(out)


class VisionLayer(nn.Module):
    """HF `InternVLVisionLayer`: pre-norm attention and MLP, each scaled by a learned vector (layer scale)."""

    cfg: InternVisionConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        scale = [self.param(f"lambda_{i}", _part(nn.initializers.constant(0.1), "norm"), (c.hidden_size,),
                            self.param_dtype).astype(self.dtype) for i in (1, 2)]
        h = VisionAttention(c, attention_impl=self.attention_impl, name="attention", **kw)(
            _norm(c, "layernorm_before", kw)(x))
        x = scale[0] * h + x
        h = VisionMLP(c, name="mlp", **kw)(_norm(c, "layernorm_after", kw)(x))
        return scale[1] * h + x


class VisionMLP(nn.Module):
    """HF `InternVLVisionMLP`: fc1 -> act -> fc2."""

    cfg: InternVisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(c.intermediate_size, name="fc1", kernel_init=_part(_init, "embed", "mlp"),
                     bias_init=_part(_zeros, "mlp"), **kw)(x)
        return nn.Dense(c.hidden_size, name="fc2", kernel_init=_part(_init, "mlp", "embed"),
                        bias_init=_part(_zeros, "embed"), **kw)(clip_lib.activation(c.hidden_act)(x))


class VisionEmbeddings(nn.Module):
    """HF `InternVLVisionEmbeddings` at the trained resolution (no position interpolation)."""

    cfg: InternVisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, pixel_values):
        """f32[B, H, W, C] -> f32[B, 1 + P, Dv]."""
        c, d = self.cfg, self.cfg.hidden_size
        x = PatchEmbeddings(c, self.dtype, self.param_dtype, name="patch_embeddings")(pixel_values)
        b = x.shape[0]
        if c.use_mask_token:
            self.param("mask_token", _part(_zeros, None, None, "embed"), (1, 1, d), self.param_dtype)
        cls = self.param("cls_token", _part(_zeros, None, None, "embed"), (1, 1, d), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
        if c.use_absolute_position_embeddings:
            pos = self.param("position_embeddings", _part(_init, None, "pos", "embed"), (1, x.shape[1], d),
                             self.param_dtype)
            x = x + pos.astype(self.dtype)
        return x


class PatchEmbeddings(nn.Module):
    """HF `InternVLVisionPatchEmbeddings`: a stride-p conv (with bias), flattened row-major."""

    cfg: InternVisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, pixel_values):
        c = self.cfg
        x = nn.Conv(c.hidden_size, c.patch_size, strides=c.patch_size, padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="projection",
                    kernel_init=_part(_init, "patch_h", "patch_w", "channels", "embed"),
                    bias_init=_part(_zeros, "embed"))(pixel_values.astype(self.dtype))
        return x.reshape(x.shape[0], -1, c.hidden_size)



class VisionEncoder(nn.Module):
    """HF `InternVLVisionEncoder`: the layers, every hidden state kept."""

    cfg: InternVisionConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        """f32[N, S, Dv] -> tuple of L + 1 states (the input, then every layer's output)."""
        states = [x]
        for i in range(self.cfg.num_layers):
            x = VisionLayer(self.cfg, self.dtype, self.param_dtype, self.attention_impl, name=f"layer_{i}")(x)
            states.append(x)
        return tuple(states)


class InternVisionModel(nn.Module):
    """HF `InternVLVisionModel`."""

    cfg: InternVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixel_values):
        """Encodes tiles.

        Args:
          pixel_values: f32[N, H, W, C] normalised tiles (NHWC), H x W = image_size.

        Returns:
          (last_hidden_state f32[N, 1 + P, Dv], hidden_states): last_hidden_state is the last layer's output,
          through the final LayerNorm when use_mean_pooling=False; hidden_states is the tuple of L + 1 states
          (the embeddings, then every layer's output, before that norm), as HF `output_hidden_states=True`.
        """
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if tuple(pixel_values.shape[1:3]) != c.image_size:
            raise ValueError(f"tile size {tuple(pixel_values.shape[1:3])} != the tower's image_size {c.image_size} "
                             f"(NHWC tiles from the InternVL processor expected; HF would interpolate positions)")
        x = VisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
        states = VisionEncoder(c, attention_impl=self.attention_impl, name="encoder", **kw)(x)
        last = states[-1]
        if not c.use_mean_pooling:  # HF: layernorm = Identity when mean pooling (it pools nothing here)
            last = clip_lib.LayerNorm(c.layer_norm_eps, "layernorm", **kw)(last)
        return last, states


def pixel_shuffle(x, k: int):
    """HF `InternVLModel.pixel_shuffle` with scale 1/k: f32[N, G, G, C] -> f32[N, G/k, G/k, C*k*k].

    The same reshapes and transposes as HF (view, swap, view, swap), so the channel order of each merged token
    is HF's.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, h // k, c * k).transpose(0, 2, 1, 3)
    x = x.reshape(n, h // k, w // k, c * k * k).transpose(0, 2, 1, 3)
    return x


class Projector(nn.Module):
    """HF `InternVLMultiModalProjector`: LayerNorm -> linear_1 -> act -> linear_2 (vision x k^2 -> LM width)."""

    cfg: InternVLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """f32[N, T, Dv * k^2] -> f32[N, T, D]."""
        d, kw = self.cfg.text.hidden_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = clip_lib.LayerNorm(1e-5, "layer_norm", **kw)(x)  # torch's nn.LayerNorm default eps
        x = nn.Dense(d, name="linear_1", kernel_init=_part(_init, "embed_vision", "embed"),
                     bias_init=_part(_zeros, "embed"), **kw)(x)
        x = clip_lib.activation(self.cfg.projector_act)(x)
        return nn.Dense(d, name="linear_2", kernel_init=_part(_init, "mlp", "embed"),
                        bias_init=_part(_zeros, "embed"), **kw)(x)


class InternVL(ImageTokenLVLM):
    """HF `InternVLForConditionalGeneration`.

    Build with `InternVL.from_hf_config(config)`; load weights with `vlm_jax.convert.internvl.from_pretrained`.
    The LVLM interface of `vlm_jax.models.llava.Llava`: `embed_multimodal` / `hidden_states` / `logits` / `embed`
    / `init_cache`, so `vlm_jax.models.generate.greedy_generate(model, params, None, mask, ...,
    inputs_embeds=model.apply(v, ids, pixel_values, method='embed_multimodal'))` decodes.

    Attributes:
      cfg: hyper-parameters.
      dtype / param_dtype: compute and parameter dtypes; attention_impl / remat / scan_layers: the LM's options
        (attention_impl also for the vision tower).
    """

    cfg: InternVLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    scan_layers: bool = False

    @classmethod
    def from_hf_config(cls, config, **kwargs) -> "InternVL":
        return cls(InternVLConfig.from_hf(config), **kwargs)

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = InternVisionModel(c.vision, attention_impl=self.attention_impl, **kw)
        self.multi_modal_projector = Projector(c, **kw)
        self.language_model = llama_lib.CausalLM(c.text, attention_impl=self.attention_impl, remat=self.remat,
                                                 scan_layers=self.scan_layers, **kw)

    def image_features(self, pixel_values):
        """f32[N, H, W, 3] normalised tiles -> f32[N, T, D] projected features (T = tokens_per_tile)."""
        c = self.cfg
        last, states = self.vision_tower(pixel_values)
        x = last if c.vision_feature_layer == -1 else states[c.vision_feature_layer]
        x = x[:, 1:]  # 'default': drop the CLS token
        g = c.vision.grid[0]
        x = pixel_shuffle(x.reshape(x.shape[0], g, g, x.shape[-1]), c.shuffle)
        return self.multi_modal_projector(x.reshape(x.shape[0], -1, x.shape[-1]))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, *, positions=None, cache=None,
                 return_hidden: bool = False):
        """Next-token logits f32[B, L, V] of text with images.

        Args:
          input_ids: i32[B, L] with `tokens_per_tile` `<IMG_CONTEXT>` tokens per tile (as the processor expands
            them, between `<img>` and `</img>`).
          attention_mask: i32[B, L] or None.
          pixel_values: f32[N, H, W, 3] normalised NHWC tiles, N = all tiles of all images of the batch, or None.
          positions, cache, return_hidden: as `CausalLM.__call__`.
        """
        embeds = self.embed_multimodal(input_ids, pixel_values)
        return self.language_model(None, attention_mask, inputs_embeds=embeds, positions=positions, cache=cache,
                                   return_hidden=return_hidden)

    def init_inputs(self, batch: int = 1, images: int = 1):
        """Dummy (input_ids, attention_mask, pixel_values) for `init` / `jax.eval_shape` (one tile per image)."""
        v, t = self.cfg.vision, self.cfg.tokens_per_tile
        ids = jnp.full((batch, images * t + 2), self.cfg.image_token_id, jnp.int32).at[:, -2:].set(0)
        return (ids, jnp.ones_like(ids),
                jnp.zeros((batch * images, *v.image_size, v.num_channels), jnp.float32))
