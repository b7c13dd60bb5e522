"""open_clip's CLIP in Flax linen: OpenAI's ModifiedResNet (RN50 / RN101 / RN50x4 ...) or open_clip's ViT,
with open_clip's text transformer. A port of `open_clip.model.CLIP` (open-clip-torch 3.x) in float32 to ~1e-6.

DualAdapter's and Tip-Adapter's tables are on CLIP RN50, which transformers cannot load; open_clip's hub
repositories (open_clip_config.json + open_clip_model.safetensors) carry it and the ViTs alike.

  ModifiedResNet: a three-conv stem (3x3 convs, the first strided, then a 2x2 average pool), four stages
    of bottlenecks whose stride is an average pool after the 3x3 conv (and before the 1x1 downsample
    conv: "anti-aliased"), then attention pooling: the mean token is prepended to the HW tokens, learned
    positions are added, and the mean token's multi-head attention output (separate q/k/v, c_proj to
    embed_dim) is the image embedding. BatchNorm runs in eval mode.
  VisionTransformer: conv patches (no bias), class token, positions, ln_pre, residual attention blocks,
    ln_post on the class token, `proj`.
  TextTransformer: token + positions, causal residual attention blocks, ln_final, the features at the
    EOT token (the largest id: open_clip's 'argmax' pooling) @ text_projection.

A residual attention block is x + attn(ln_1(x)), then x + mlp(ln_2(x)) with mlp = c_proj(act(c_fc(.))),
act = QuickGELU for the OpenAI-trained weights (`quick_gelu`), exact GELU otherwise; LayerNorm eps 1e-5.

The parameter tree mirrors open_clip's state dict (`layer1.0` -> `layer1_0`, `resblocks.3` ->
`resblocks_3`, torch's fused nn.MultiheadAttention `in_proj_weight` -> attn/in_proj/kernel
f32[D, 3, heads, kv]); BatchNorm's running statistics are params too (`mean`, `var`): the backbone is
used frozen, and one collection keeps `model.apply({'params': p}, ...)` uniform across backbones.

Logical axis names: those of `vlm_jax.models.clip` ('embed', 'mlp', 'heads', 'kv', 'qkv', 'pos', 'vocab',
'norm', 'proj', 'patch_h', 'patch_w', 'channels'), plus 'conv_in' / 'conv_out' (ResNet conv kernels and
BatchNorm vectors).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_default_kernel = nn.initializers.lecun_normal()
_zeros, _ones = nn.initializers.zeros_init(), nn.initializers.ones_init()
_small = nn.initializers.normal(0.02)
_EPS = 1e-5  # torch's LayerNorm and BatchNorm default, which open_clip keeps


def _part(init, *names):
    return nn.with_logical_partitioning(init, names)


def _act(quick_gelu: bool):
    return (lambda x: x * jax.nn.sigmoid(1.702 * x)) if quick_gelu else (lambda x: jax.nn.gelu(x, approximate=False))


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """open_clip's vision_cfg of a ModifiedResNet (layers is a 4-tuple); heads = width * 32 // head_width."""

    layers: tuple[int, int, int, int]
    width: int = 64
    head_width: int = 64
    image_size: int = 224

    @property
    def heads(self) -> int:
        return self.width * 32 // self.head_width


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """open_clip's vision_cfg of a VisionTransformer; heads = width // head_width."""

    layers: int
    width: int
    patch_size: int
    image_size: int = 224
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def heads(self) -> int:
        return self.width // self.head_width


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """open_clip's text_cfg (the built-in TextTransformer)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class OpenCLIPConfig:
    """open_clip's model_cfg: embed_dim, vision_cfg, text_cfg, quick_gelu (and init_logit_bias for SigLIP-style)."""

    embed_dim: int
    vision: ResNetConfig | ViTConfig
    text: TextConfig
    quick_gelu: bool = False
    logit_bias: bool = False


# open_clip config keys whose default (or listed value) is what the port implements; any other value is refused.
_VISION_OK = dict(ls_init_value=None, attentional_pool=False, no_ln_pre=False,
                  pos_embed_type="learnable", final_ln_after_pool=False, pool_type="tok", output_tokens=False,
                  act_kwargs=None, norm_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                  scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False, timm_model_name=None)
_TEXT_OK = dict(hf_tokenizer_name=None, tokenizer_mode=None, tokenizer_kwargs=None, ls_init_value=None,
                embed_cls=False, pad_id=0, no_causal_mask=False, final_ln_after_pool=False, pool_type="argmax",
                proj_bias=False, proj_type="linear", output_tokens=False, act_kwargs=None, norm_kwargs=None,
                block_type=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
                scale_attn=False, scale_fc=False, hf_model_name=None)
_IGNORED = {"patch_dropout", "eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "timm_model_pretrained",
            "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "attn_pooler_queries",
            "attn_pooler_heads"}  # training-only, or read only by a feature that is refused above


def _check(cfg: dict, ok: dict, known: set, where: str) -> None:
    bad = {k: v for k, v in cfg.items() if k in ok and v != ok[k]}
    unknown = sorted(set(cfg) - set(ok) - known - _IGNORED)
    if bad or unknown:
        raise ValueError(f"open_clip {where} settings not supported by vlm_jax: "
                         f"{dict(bad, **{k: cfg[k] for k in unknown})}")


def config_from_dict(model_cfg: dict) -> OpenCLIPConfig:
    """An `OpenCLIPConfig` from open_clip's model_cfg (open_clip_config.json['model_cfg'] or model_configs/*.json).

    Raises:
      ValueError: one line naming every setting the port does not implement (timm / HF towers, CoCa, attentional
        pooling, layer scale, custom blocks ...).
    """
    unknown = sorted(set(model_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                                       "init_logit_bias", "custom_text", "cast_dtype", "nonscalar_logit_scale"})
    if unknown or model_cfg.get("nonscalar_logit_scale"):
        raise ValueError(f"open_clip model settings not supported by vlm_jax: {unknown or 'nonscalar_logit_scale'}")
    v, t = dict(model_cfg["vision_cfg"]), dict(model_cfg.get("text_cfg", {}))
    _check(v, _VISION_OK, {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}, "vision_cfg")
    _check(t, _TEXT_OK, {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}, "text_cfg")
    if not isinstance(v.get("image_size", 224), int):
        raise ValueError(f"open_clip vision_cfg: non-square image_size {v['image_size']} is not supported")
    common = {k: v[k] for k in ("width", "head_width", "image_size") if k in v}
    if isinstance(v.get("layers"), (list, tuple)):
        vision = ResNetConfig(layers=tuple(v["layers"]), **common)
    else:
        vision = ViTConfig(layers=v.get("layers", 12), width=v.get("width", 768), patch_size=v.get("patch_size", 16),
                           mlp_ratio=v.get("mlp_ratio", 4.0), **{k: common[k] for k in common if k != "width"})
    text = TextConfig(**{k: t[k] for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")
                         if k in t})
    return OpenCLIPConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=text,
                          quick_gelu=bool(model_cfg.get("quick_gelu", False)),
                          logit_bias=model_cfg.get("init_logit_bias") is not None)


def config_to_dict(cfg: OpenCLIPConfig) -> dict:
    """open_clip's model_cfg for `cfg` (what open_clip_config.json['model_cfg'] holds)."""
    v = dataclasses.asdict(cfg.vision)
    if isinstance(cfg.vision, ResNetConfig):
        v["layers"], v["patch_size"] = list(v["layers"]), None
    out = dict(embed_dim=cfg.embed_dim, vision_cfg=v, text_cfg=dataclasses.asdict(cfg.text))
    if cfg.quick_gelu:
        out["quick_gelu"] = True
    if cfg.logit_bias:
        out["init_logit_bias"] = -10.0
    return out


def _ln(name, kw):
    # A bare nn.LayerNorm named like open_clip's module (ln_1, ln_post ...).
    return nn.LayerNorm(epsilon=_EPS, use_fast_variance=False, scale_init=_part(_ones, "norm"),
                        bias_init=_part(_zeros, "norm"), name=name, **kw)


class ResidualAttentionBlock(nn.Module):
    """open_clip's ResidualAttentionBlock with torch's fused nn.MultiheadAttention."""

    width: int
    heads: int
    mlp_ratio: float
    quick_gelu: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, mask=None):
        """f32[B, L, D], bool[1, 1, L, L] or None (True = attend) -> f32[B, L, D]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, k = self.heads, self.width // self.heads
        y = _ln("ln_1", kw)(x)
        # One f32[D, 3, H, K] kernel: torch stores q, k, v stacked in one in_proj_weight.
        qkv = nn.DenseGeneral((3, h, k), dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=_part(_default_kernel, "embed", "qkv", "heads", "kv"),
                              bias_init=_part(_zeros, "qkv", "heads", "kv"), name="attn_in_proj")(y)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=mask, scale=k ** -0.5)
        x = x + nn.DenseGeneral(self.width, axis=(-2, -1), kernel_init=_part(_default_kernel, "heads", "kv", "embed"),
                                bias_init=_part(_zeros, "embed"), name="attn_out_proj", **kw)(out)
        y = _ln("ln_2", kw)(x)
        y = nn.Dense(int(self.width * self.mlp_ratio), kernel_init=_part(_default_kernel, "embed", "mlp"),
                     bias_init=_part(_zeros, "mlp"), name="mlp_c_fc", **kw)(y)
        y = nn.Dense(self.width, kernel_init=_part(_default_kernel, "mlp", "embed"), bias_init=_part(_zeros, "embed"),
                     name="mlp_c_proj", **kw)(_act(self.quick_gelu)(y))
        return x + y


class Transformer(nn.Module):
    """`layers` residual attention blocks named resblocks_{i}."""

    width: int
    layers: int
    heads: int
    mlp_ratio: float
    quick_gelu: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(self.layers):
            x = ResidualAttentionBlock(self.width, self.heads, self.mlp_ratio, self.quick_gelu, self.dtype,
                                       self.param_dtype, name=f"resblocks_{i}")(x, mask)
        return x


class FrozenBatchNorm(nn.Module):
    """torch BatchNorm2d in eval mode: (x - running_mean) / sqrt(running_var + 1e-5) * weight + bias."""

    features: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        p = {name: self.param(name, _part(init, "conv_out"), (self.features,), self.param_dtype).astype(jnp.float32)
             for name, init in (("scale", _ones), ("bias", _zeros), ("mean", _zeros), ("var", _ones))}
        inv = jax.lax.rsqrt(p["var"] + _EPS) * p["scale"]
        return ((x.astype(jnp.float32) - p["mean"]) * inv + p["bias"]).astype(self.dtype)


def _conv(features, k, name, kw, stride=1):
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((k // 2, k // 2),) * 2, use_bias=False,
                   kernel_init=_part(_default_kernel, None, None, "conv_in", "conv_out"), name=name, **kw)


def _avg_pool(x, s):
    return x if s == 1 else nn.avg_pool(x, (s, s), strides=(s, s))  # torch AvgPool2d(s): kernel = stride = s


class Bottleneck(nn.Module):
    """OpenAI's anti-aliased bottleneck: the stride is an average pool after conv2 (and before downsample's conv)."""

    planes: int
    stride: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_ch = self.planes * 4
        y = nn.relu(FrozenBatchNorm(self.planes, name="bn1", **kw)(_conv(self.planes, 1, "conv1", kw)(x)))
        y = nn.relu(FrozenBatchNorm(self.planes, name="bn2", **kw)(_conv(self.planes, 3, "conv2", kw)(y)))
        y = FrozenBatchNorm(out_ch, name="bn3", **kw)(_conv(out_ch, 1, "conv3", kw)(_avg_pool(y, self.stride)))
        if self.stride > 1 or x.shape[-1] != out_ch:
            x = FrozenBatchNorm(out_ch, name="downsample_1", **kw)(
                _conv(out_ch, 1, "downsample_0", kw)(_avg_pool(x, self.stride)))
        return nn.relu(y + x)


class AttentionPool2d(nn.Module):
    """The mean token attends over [mean; HW tokens] + positions; its output (c_proj) is the embedding."""

    heads: int
    output_dim: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        """f32[B, h, w, C] -> f32[B, output_dim]."""
        b, gh, gw, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.reshape(b, gh * gw, c)  # row-major over (h, w): torch's reshape of NCHW to [N, C, HW]
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        pos = self.param("positional_embedding", _part(nn.initializers.normal(c ** -0.5), "pos", "embed"),
                         (gh * gw + 1, c), self.param_dtype)
        x = x + pos.astype(self.dtype)
        k = c // self.heads
        heads = dict(features=(self.heads, k), kernel_init=_part(_default_kernel, "embed", "heads", "kv"),
                     bias_init=_part(_zeros, "heads", "kv"), **kw)
        q = nn.DenseGeneral(**heads, name="q_proj")(x[:, :1])  # only the mean token's output is kept
        out = jax.nn.dot_product_attention(q, nn.DenseGeneral(**heads, name="k_proj")(x),
                                           nn.DenseGeneral(**heads, name="v_proj")(x), scale=k ** -0.5)
        return nn.DenseGeneral(self.output_dim, axis=(-2, -1), name="c_proj",
                               kernel_init=_part(_default_kernel, "heads", "kv", "proj"),
                               bias_init=_part(_zeros, "proj"), **kw)(out)[:, 0]


class ModifiedResNet(nn.Module):
    cfg: ResNetConfig
    output_dim: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        """f32[B, H, W, 3] -> f32[B, output_dim]."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        for i, (ch, stride) in enumerate(((c.width // 2, 2), (c.width // 2, 1), (c.width, 1)), start=1):
            x = nn.relu(FrozenBatchNorm(ch, name=f"bn{i}", **kw)(_conv(ch, 3, f"conv{i}", kw, stride)(x)))
        x = _avg_pool(x, 2)
        for stage, (blocks, planes) in enumerate(zip(c.layers, (c.width, c.width * 2, c.width * 4, c.width * 8)), 1):
            for j in range(blocks):
                stride = 2 if stage > 1 and j == 0 else 1
                x = Bottleneck(planes, stride, name=f"layer{stage}_{j}", **kw)(x)
        return AttentionPool2d(c.heads, self.output_dim, name="attnpool", **kw)(x)


class VisionTransformer(nn.Module):
    cfg: ViTConfig
    output_dim: int
    quick_gelu: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        """f32[B, H, W, 3] -> f32[B, output_dim] (ln_post of the class token @ proj)."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p, d = c.patch_size, c.width
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="conv1",
                    kernel_init=_part(_default_kernel, "patch_h", "patch_w", "channels", "embed"), **kw)(
                        x.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, d)
        n = (c.image_size // p) ** 2 + 1
        cls = self.param("class_embedding", _part(_small, "embed"), (d,), self.param_dtype).astype(self.dtype)
        pos = self.param("positional_embedding", _part(_small, "pos", "embed"), (n, d), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1) + pos.astype(self.dtype)
        x = Transformer(d, c.layers, c.heads, c.mlp_ratio, self.quick_gelu, name="transformer", **kw)(
            _ln("ln_pre", kw)(x))
        pooled = _ln("ln_post", kw)(x[:, 0])
        proj = self.param("proj", _part(_default_kernel, "embed", "proj"), (d, self.output_dim), self.param_dtype)
        return pooled @ proj.astype(self.dtype)


class OpenCLIP(nn.Module):
    """open_clip's `CLIP`: `visual`, the text tower's params at the top level (as open_clip keeps them), logit_scale.

    Use it through `apply`, e.g. `model.apply({'params': p}, x, method=OpenCLIP.encode_image)`.
    """

    cfg: OpenCLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if isinstance(c.vision, ResNetConfig):
            self.visual = ModifiedResNet(c.vision, c.embed_dim, **kw)
        else:
            self.visual = VisionTransformer(c.vision, c.embed_dim, c.quick_gelu, **kw)
        t = c.text
        self.token_embedding = nn.Embed(t.vocab_size, t.width, embedding_init=_part(_small, "vocab", "embed"), **kw)
        self.positional_embedding = self.param("positional_embedding", _part(_small, "pos", "embed"),
                                               (t.context_length, t.width), self.param_dtype)
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, c.quick_gelu, **kw)
        self.ln_final = nn.LayerNorm(epsilon=_EPS, use_fast_variance=False, scale_init=_part(_ones, "norm"),
                                     bias_init=_part(_zeros, "norm"), **kw)
        self.text_projection = self.param("text_projection", _part(_default_kernel, "embed", "proj"),
                                          (t.width, c.embed_dim), self.param_dtype)
        self.logit_scale = self.param("logit_scale", _part(nn.initializers.constant(jnp.log(1 / 0.07))), (),
                                      self.param_dtype)
        if c.logit_bias:
            self.logit_bias = self.param("logit_bias", _part(nn.initializers.constant(-10.0)), (), self.param_dtype)

    def encode_image(self, pixel_values):
        """f32[B, H, W, 3] normalised NHWC images -> f32[B, embed_dim] (unnormalised)."""
        size = self.cfg.vision.image_size
        if pixel_values.shape[1:] != (size, size, 3):
            raise ValueError(f"pixel_values shape {pixel_values.shape[1:]} != ({size}, {size}, 3) (NHWC expected)")
        return self.visual(pixel_values)

    def encode_text(self, input_ids, attention_mask=None):
        """i32[B, L] ids (L <= context_length) -> f32[B, embed_dim] (unnormalised).

        `attention_mask` is accepted for the common interface and unused: open_clip's text tower has only its
        causal mask, and the pooled EOT token never sees the padding after it.
        """
        del attention_mask
        length = input_ids.shape[1]
        if length > self.cfg.text.context_length:
            raise ValueError(f"sequence length {length} > context_length {self.cfg.text.context_length}")
        x = self.token_embedding(input_ids) + self.positional_embedding[:length].astype(self.dtype)
        x = self.ln_final(self.transformer(x, jnp.tril(jnp.ones((length, length), bool))[None, None]))
        eot = x[jnp.arange(x.shape[0]), jnp.argmax(input_ids, axis=-1)]  # EOT has the largest id
        return eot @ self.text_projection.astype(self.dtype)

    def __call__(self, pixel_values, input_ids):
        """(f32[B, P] image, f32[B', P] text embeddings); creates every param."""
        return self.encode_image(pixel_values), self.encode_text(input_ids)

    def init_inputs(self, batch: int = 1):
        """Dummy (pixel_values, input_ids) for `init` / `jax.eval_shape`."""
        size, length = self.cfg.vision.image_size, self.cfg.text.context_length
        return jnp.zeros((batch, size, size, 3), jnp.float32), jnp.zeros((batch, length), jnp.int32)
