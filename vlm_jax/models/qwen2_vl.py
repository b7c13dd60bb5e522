"""Qwen2-VL in Flax linen: a port of HF `Qwen2VLForConditionalGeneration` (images; videos are not supported).

  pixel_values f32[N, C*T*P*P] (every image's patches, flattened by the processor) + image_grid_thw i32[n, 3]
    -> patch embedding (HF's Conv3d with kernel = stride = patch: one matmul here)
    -> depth x [x + attn(ln1(x)); x + mlp(ln2(x))], attention within one image (one frame) only, 2D rotary
       embeddings: half of each head's frequencies rotate by the patch's row, half by its column
    -> PatchMerger: LayerNorm, each 2 x 2 block of neighbouring patches concatenated (the processor orders
       patches block by block), MLP to the LM width: f32[N / 4, D], one row per image token
  -> the features replace the <|image_pad|> embeddings in order (as LLaVA's) -> Qwen2 LM (`llama.CausalLM`) with
     M-RoPE: a token has three positions (temporal, height, width), `mrope_section` splits the rotary
     frequencies between them. Text tokens have three equal positions; an image's tokens sit on its grid,
     offset by the text before it; the text after an image continues from the largest of them + 1
     (`rope_positions`, HF's `get_rope_index`).

Parameter tree: {'visual': {'patch_embed' [E, C, T, P, P] (HF's Conv3d kernel layout),
'blocks_{i}': {'norm1', 'attn': {'qkv' [E, 3, H, Dh], 'proj' [H, Dh, E]}, 'norm2', 'mlp': {'fc1', 'fc2'}},
'merger': {'ln_q', 'mlp_0', 'mlp_2'}}, 'language_model': CausalLM params}.

Decoding: the cache (`MRopeCache`) remembers each row's rope delta (largest prompt position + 1 minus its real
token count), so the tokens generated after a prompt with images continue at HF's positions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import clip as clip_lib
from vlm_jax.models import llama as llama_lib
from vlm_jax.models.llava import merge_image_features

Dtype = Any


def _part(init, *names):
    return nn.with_logical_partitioning(init, names)


_init = nn.initializers.normal(0.02)
_zeros, _ones = nn.initializers.zeros_init(), nn.initializers.ones_init()


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """HF `Qwen2VLVisionConfig` (a frozen view)."""

    depth: int
    embed_dim: int
    hidden_size: int  # the merger's output width (the LM's)
    num_heads: int
    mlp_ratio: int = 4
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0

    def __post_init__(self):
        clip_lib.activation(self.hidden_act)  # raises on an unsupported one
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"vision embed_dim {self.embed_dim} / num_heads {self.num_heads} must be a multiple "
                             f"of 4 (2D rotary embeddings)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one row of pixel_values: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """HF `Qwen2VLConfig` (a frozen view). Token ids other than the image token are kept for export."""

    vision: VisionConfig
    text: llama_lib.DecoderConfig
    image_token_id: int
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    def tokens_per_image(self, grid_thw) -> int:
        """Image tokens (= features) of an image with processor grid (t, h, w)."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.vision.spatial_merge_size ** 2

    @classmethod
    def from_hf(cls, config) -> "Qwen2VLConfig":
        """From a `transformers.Qwen2VLConfig` or a config.json dict.

        Raises:
          ValueError: a setting the port does not support (sliding-window attention, a RoPE scaling type).
        """
        if isinstance(config, dict):
            from transformers import Qwen2VLConfig as HFConfig  # lazy: heavy import

            config = HFConfig.from_dict(config)  # moves the legacy top-level text keys into text_config
        v, t = config.vision_config, config.text_config
        vrope = dict(v.rope_parameters or {})
        if vrope.get("rope_type", "axial") != "axial":
            raise ValueError(f"unsupported vision rope type {vrope.get('rope_type')!r}; Qwen2-VL's is 'axial'")
        vision = VisionConfig(depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.hidden_size, num_heads=v.num_heads,
                              mlp_ratio=int(v.mlp_ratio), hidden_act=v.hidden_act, in_channels=v.in_channels,
                              patch_size=int(v.patch_size), temporal_patch_size=int(v.temporal_patch_size),
                              spatial_merge_size=v.spatial_merge_size,
                              rope_theta=float(vrope.get("rope_theta", 10000.0)))
        rope = dict(t.rope_parameters or {})
        if rope.get("rope_type", "default") != "default":  # transformers maps the hub's 'mrope' to 'default'
            raise ValueError(f"unsupported rope type {rope.get('rope_type')!r} in Qwen2-VL's text config; "
                             "vlm_jax supports M-RoPE without scaling")
        if t.use_sliding_window or "sliding_attention" in (t.layer_types or ()):
            raise ValueError("Qwen2-VL sliding-window attention (use_sliding_window=True) is not supported")
        heads = t.num_attention_heads
        eos = t.eos_token_id
        text = llama_lib.DecoderConfig(
            model_type="qwen2", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_layers=t.num_hidden_layers, num_heads=heads,
            num_kv_heads=t.num_key_value_heads or heads,
            head_dim=t.hidden_size // heads,  # HF's Qwen2VLAttention ignores a config head_dim
            hidden_act=t.hidden_act, rms_norm_eps=float(t.rms_norm_eps), rope_theta=float(rope["rope_theta"]),
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=bool(config.tie_word_embeddings), qkv_bias=True,
            bos_token_id=t.bos_token_id, eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=t.pad_token_id,
            # HF's own default when a config names none (the 7B / 2B value).
            mrope_section=tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24))))
        return cls(vision=vision, text=text, image_token_id=int(config.image_token_id),
                   video_token_id=config.video_token_id, vision_start_token_id=config.vision_start_token_id,
                   vision_end_token_id=config.vision_end_token_id)


# ----------------------------------------------------------------------------- positions


def patch_coordinates(grid_thw, num_patches: int, merge: int):
    """Row, column and attention segment of every patch, in the processor's order (jit-friendly: the grid may
    be traced, only the total patch count is static).

    The processor flattens an image block by block: merge x merge neighbouring patches, row-major inside
    the block, blocks row-major over the image; frames (t) follow each other.

    Args:
      grid_thw: i32[n, 3] per-image (t, h, w) in patches.
      num_patches: N = sum(t * h * w).
      merge: spatial_merge_size.

    Returns:
      (row i32[N], col i32[N], segment i32[N]): segment numbers each frame of each image (HF attends within one).
    """
    grid = jnp.asarray(grid_thw, jnp.int32)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    sizes = t * h * w
    ends = jnp.cumsum(sizes)
    p = jnp.arange(num_patches, dtype=jnp.int32)
    img = jnp.minimum(jnp.searchsorted(ends, p, side="right", method="compare_all"), grid.shape[0] - 1)
    local = p - (ends - sizes)[img]
    per_frame = (h * w)[img]
    frame, j = local // per_frame, local % per_frame
    block, r = j // (merge * merge), j % (merge * merge)
    blocks_per_row = w[img] // merge
    row = (block // blocks_per_row) * merge + r // merge
    col = (block % blocks_per_row) * merge + r % merge
    segment = (jnp.cumsum(t) - t)[img] + frame
    return row, col, segment


@functools.partial(jax.jit, static_argnames=("image_token_id", "spatial_merge_size"))
def rope_positions(input_ids, attention_mask, image_grid_thw, *, image_token_id: int, spatial_merge_size: int):
    """M-RoPE positions of a batch, equal to HF `Qwen2VLModel.get_rope_index` (images; padding anywhere).

    Real tokens are numbered in order, skipping padding: a text token takes the running position p on all three
    axes and advances it by 1; the k-th image's tokens (row-major over the batch, as the images are given) take
    p + (frame, row, col) on its merged grid, and the image advances p by max(rows, cols). Padding gets 0.

    Args:
      input_ids: i32[B, L] with t * h * w / merge^2 image tokens per image.
      attention_mask: i32[B, L] or None (all real).
      image_grid_thw: i32[n, 3] or None (text only).
      image_token_id, spatial_merge_size: the config's.

    Returns:
      (positions i32[3, B, L], deltas i32[B]): delta = largest position + 1 - real tokens, the shift of the text
      positions that follow the prompt (HF's rope_deltas).
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    real = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask) > 0
    if image_grid_thw is None or np.shape(image_grid_thw)[0] == 0:
        is_img = jnp.zeros(ids.shape, bool)
        grid = jnp.ones((1, 3), jnp.int32) * spatial_merge_size
    else:
        is_img = (ids == image_token_id) & real
        grid = jnp.asarray(image_grid_thw, jnp.int32)
    t, h, w = grid[:, 0], grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
    sizes = t * h * w
    ends = jnp.cumsum(sizes)
    k_global = (jnp.cumsum(is_img.reshape(-1)) - 1).reshape(ids.shape)  # the image token's index in the batch
    img = jnp.clip(jnp.searchsorted(ends, k_global, side="right", method="compare_all"), 0, grid.shape[0] - 1)
    k = k_global - (ends - sizes)[img]  # its index within its image
    last = is_img & (k == sizes[img] - 1)
    step = jnp.where(is_img, jnp.where(last, jnp.maximum(h, w)[img], 0), 1) * real
    start = jnp.cumsum(step, axis=1) - step  # the running position before each token
    offsets = jnp.stack([k // (h * w)[img], (k // w[img]) % h[img], k % w[img]])
    pos = jnp.where(is_img[None], start[None] + offsets, start[None])
    pos = jnp.where(real[None], pos, 0).astype(jnp.int32)
    deltas = jnp.max(jnp.where(real[None], pos, -1), axis=(0, 2)) + 1 - jnp.sum(real, axis=1)
    return pos, deltas.astype(jnp.int32)


def check_image_tokens(input_ids, image_grid_thw, cfg: Qwen2VLConfig) -> None:
    """Host-side check (jit cannot raise) that the prompts hold each image's number of image tokens."""
    n = int((np.asarray(input_ids) == cfg.image_token_id).sum())
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    want = sum(cfg.tokens_per_image(g) for g in grids)
    if n != want:
        raise ValueError(f"the prompts hold {n} image tokens but the images (grids {grids.tolist()}) give {want} "
                         f"features; expand each image's <|image_pad|> to t*h*w/"
                         f"{cfg.vision.spatial_merge_size ** 2} tokens, as the HF processor does")


def _flat_vision(pixel_values, image_grid_thw):
    """The processor's flat layout from a per-row one (f32[B, P, C*T*P*P] -> f32[B*P, ...], i32[B, 3])."""
    if pixel_values.ndim == 3:
        pixel_values = pixel_values.reshape(-1, pixel_values.shape[-1])
    return pixel_values, jnp.reshape(image_grid_thw, (-1, 3))


@flax.struct.dataclass
class MRopeCache:
    """A `llama.KVCache` plus each row's rope delta (i32[B]), which positions the tokens decoded after a prompt."""

    kv: llama_lib.KVCache
    delta: jax.Array

    @property
    def max_len(self) -> int:
        return self.kv.max_len


# ----------------------------------------------------------------------------- vision tower


def _rope_vision(x, cos, sin):
    """x [N, H, Dh] rotated in float32 (as HF), cos/sin f32[N, Dh]."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = x32 * cos[:, None] + jnp.concatenate([-x2, x1], axis=-1) * sin[:, None]
    return out.astype(x.dtype)


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        """f32[N, E] -> f32[N, E]; mask bool[1, 1, N, N] (same image frame), cos/sin f32[N, Dh]."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = nn.DenseGeneral((3, c.num_heads, c.head_dim), name="qkv",
                              kernel_init=_part(_init, "embed", None, "heads", "kv"),
                              bias_init=_part(_zeros, None, "heads", "kv"), **kw)(x)
        q, k = _rope_vision(qkv[:, 0], cos, sin), _rope_vision(qkv[:, 1], cos, sin)
        out = jax.nn.dot_product_attention(q[None], k[None], qkv[None, :, 2], mask=mask, scale=c.head_dim ** -0.5,
                                           implementation=self.attention_impl)[0]
        return nn.DenseGeneral(c.embed_dim, axis=(-2, -1), name="proj",
                               kernel_init=_part(_init, "heads", "kv", "embed"), bias_init=_part(_zeros, "embed"),
                               **kw)(out)


class VisionMLP(nn.Module):
    cfg: VisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(int(c.embed_dim * c.mlp_ratio), name="fc1", kernel_init=_part(_init, "embed", "mlp"),
                     bias_init=_part(_zeros, "mlp"), **kw)(x)
        h = clip_lib.activation(c.hidden_act)(h)
        return nn.Dense(c.embed_dim, name="fc2", kernel_init=_part(_init, "mlp", "embed"),
                        bias_init=_part(_zeros, "embed"), **kw)(h)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = clip_lib.LayerNorm(1e-6, "norm1", **kw)(x)
        x = x + VisionAttention(c, attention_impl=self.attention_impl, name="attn", **kw)(h, mask, cos, sin)
        return x + VisionMLP(c, name="mlp", **kw)(clip_lib.LayerNorm(1e-6, "norm2", **kw)(x))


class PatchMerger(nn.Module):
    """HF `PatchMerger`: LayerNorm, merge x merge neighbours concatenated, Linear -> GELU (erf) -> Linear."""

    cfg: VisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        """f32[N, E] -> f32[N / merge^2, D]."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = c.embed_dim * c.spatial_merge_size ** 2
        x = clip_lib.LayerNorm(1e-6, "ln_q", **kw)(x).reshape(-1, width)
        x = nn.Dense(width, name="mlp_0", kernel_init=_part(_init, "embed_vision", "mlp"),
                     bias_init=_part(_zeros, "mlp"), **kw)(x)
        x = jax.nn.gelu(x, approximate=False)
        return nn.Dense(c.hidden_size, name="mlp_2", kernel_init=_part(_init, "mlp", "embed"),
                        bias_init=_part(_zeros, "embed"), **kw)(x)


class VisionTransformer(nn.Module):
    """HF `Qwen2VisionTransformerPretrainedModel`: flattened patches of any number of images -> merged features."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixel_values, grid_thw):
        """f32[N, C*T*P*P] patches + i32[n, 3] grids -> f32[N / merge^2, D] (the images' features, in order)."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Conv3d with kernel = stride = the patch is a matmul over the flattened patch (C, T, P, P order, which is
        # the kernel's own layout: kept as is, so the checkpoint tensor converts unchanged).
        kernel = self.param("patch_embed", _part(_init, "embed", "channels", None, "patch_h", "patch_w"),
                            (c.embed_dim, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size),
                            self.param_dtype)
        x = jnp.asarray(pixel_values, self.dtype) @ kernel.reshape(c.embed_dim, -1).T.astype(self.dtype)
        row, col, segment = patch_coordinates(grid_thw, x.shape[0], c.spatial_merge_size)
        mask = (segment[:, None] == segment[None, :])[None, None]
        half = c.head_dim // 2  # HF's spatial_dim: row and column each get head_dim / 4 frequencies
        inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
        freqs = jnp.concatenate([row[:, None] * inv_freq, col[:, None] * inv_freq], axis=-1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        for i in range(c.depth):
            x = VisionBlock(c, attention_impl=self.attention_impl, name=f"blocks_{i}", **kw)(x, mask, cos, sin)
        return PatchMerger(c, name="merger", **kw)(x)


# ----------------------------------------------------------------------------- the LVLM


class Qwen2VL(nn.Module):
    """HF `Qwen2VLForConditionalGeneration` (images).

    Build with `Qwen2VL.from_hf_config(config)`; load weights with `vlm_jax.convert.qwen2_vl.from_pretrained`.
    It has the LVLM interface of `Llava` (`embed_multimodal`, `hidden_states`, `logits`, `embed`, `init_cache`,
    `init_inputs`) plus `rope_positions`: prompts with images need their M-RoPE positions, e.g.
    `greedy_generate(model, params, None, mask, n, eos, pad, inputs_embeds=embeds, positions=positions)`.

    Attributes:
      cfg: hyper-parameters.
      dtype / param_dtype: compute and parameter dtypes; attention_impl / remat / scan_layers: the LM's options
        (attention_impl also the vision tower's).
    """

    cfg: Qwen2VLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    scan_layers: bool = False

    @classmethod
    def from_hf_config(cls, config, **kwargs) -> "Qwen2VL":
        return cls(Qwen2VLConfig.from_hf(config), **kwargs)

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual = VisionTransformer(c.vision, attention_impl=self.attention_impl, **kw)
        self.language_model = llama_lib.CausalLM(c.text, attention_impl=self.attention_impl, remat=self.remat,
                                                 scan_layers=self.scan_layers, **kw)

    def rope_positions(self, input_ids, attention_mask=None, image_grid_thw=None):
        """(positions i32[3, B, L], deltas i32[B]) of a batch; see the module function `rope_positions`."""
        return rope_positions(input_ids, attention_mask, image_grid_thw, image_token_id=self.cfg.image_token_id,
                              spatial_merge_size=self.cfg.vision.spatial_merge_size)

    def positions(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """M-RoPE positions i32[3, B, L] of prompts with images (None without images: text positions are the
        LM's default). Works on the unbound module, so programs call it outside `apply`."""
        del pixel_values
        if image_grid_thw is None:
            return None
        return self.rope_positions(input_ids, attention_mask, jnp.reshape(image_grid_thw, (-1, 3)))[0]

    def image_features(self, pixel_values, image_grid_thw):
        """f32[N, C*T*P*P] patches + i32[n, 3] grids -> f32[N / merge^2, D] features (one per image token)."""
        return self.visual(pixel_values, image_grid_thw)

    def embed_multimodal(self, input_ids, pixel_values=None, image_grid_thw=None):
        """i32[B, L] ids (+ the processor's pixel_values f32[N, C*T*P*P] and image_grid_thw i32[n, 3], or
        f32[B, P, C*T*P*P] and i32[B, 3]: one image per row) -> f32[B, L, D], images spliced in."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds
        pixel_values, image_grid_thw = _flat_vision(pixel_values, image_grid_thw)
        return merge_image_features(embeds, input_ids, self.image_features(pixel_values, image_grid_thw),
                                    self.cfg.image_token_id)

    def hidden_states(self, input_ids, attention_mask=None, *, inputs_embeds=None, positions=None, cache=None):
        """The LM's final-norm hidden states f32[B, L, D] (and the updated cache when one is passed).

        Args:
          input_ids / inputs_embeds: exactly one of them.
          attention_mask: i32[B, L] or None.
          positions: i32[3, B, L] (`rope_positions`: needed whenever the tokens hold images) or i32[B, L];
            None: text positions (cumsum(mask) - 1), shifted by the cache's rope delta when decoding.
          cache: an `MRopeCache` (`init_cache`) or None.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        mask = jnp.ones(x.shape[:2], jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        if cache is None:
            return self.language_model.hidden_states(None, mask, inputs_embeds=x, positions=positions)
        seen = jnp.sum(cache.kv.mask, axis=-1)  # real tokens already in the cache, per row
        if positions is None:
            # Text after the prompt: HF's cache position + rope delta (the same as HF's cumsum of the mask).
            positions = jnp.maximum(seen[:, None] + jnp.cumsum(mask, axis=-1) - 1, 0) + cache.delta[:, None]
            delta = cache.delta
        else:
            pos3 = positions if positions.ndim == 3 else positions[None]
            top = jnp.max(jnp.where(mask[None] > 0, pos3, -1), axis=(0, 2))
            delta = (top + 1 - seen - jnp.sum(mask, axis=-1)).astype(jnp.int32)
        hidden, kv = self.language_model.hidden_states(None, mask, inputs_embeds=x, positions=positions,
                                                       cache=cache.kv)
        return hidden, MRopeCache(kv=kv, delta=delta)

    def logits(self, hidden):
        return self.language_model.logits(hidden)

    def embed(self, input_ids):
        return self.language_model.embed(input_ids)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *, positions=None,
                 cache=None, return_hidden: bool = False):
        """Next-token logits f32[B, L, V] of text with images.

        Args:
          input_ids: i32[B, L], each image's <|image_pad|> expanded to its tokens (as the HF processor does).
          attention_mask: i32[B, L] or None; padding anywhere (left for decoding).
          pixel_values, image_grid_thw: the processor's f32[N, C*T*P*P] and i32[n, 3], or None (text only).
          positions: M-RoPE positions; None computes `rope_positions` from the ids when there are images.
          cache, return_hidden: as `CausalLM.__call__`.
        """
        embeds = self.embed_multimodal(input_ids, pixel_values, image_grid_thw)
        if positions is None and image_grid_thw is not None:
            positions = self.rope_positions(input_ids, attention_mask, image_grid_thw)[0]
        out = self.hidden_states(None, attention_mask, inputs_embeds=embeds, positions=positions, cache=cache)
        hidden, new_cache = out if cache is not None else (out[0], None)
        logits = self.logits(hidden)
        extra = ((hidden.astype(jnp.float32),) if return_hidden else ()) + ((new_cache,) if cache is not None else ())
        return (logits, *extra) if extra else logits

    def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None) -> MRopeCache:
        """An empty cache (works on the unbound module)."""
        kv = llama_lib.init_cache(self.cfg.text, batch, max_len, self.dtype if dtype is None else dtype,
                                  self.scan_layers)
        return MRopeCache(kv=kv, delta=jnp.zeros((batch,), jnp.int32))

    def init_inputs(self, batch: int = 1, images: int = 1):
        """Dummy (input_ids, attention_mask, pixel_values, image_grid_thw) for `init` / `jax.eval_shape`: each
        image a 2 x 2 grid of merged tokens."""
        v = self.cfg.vision
        side = 2 * v.spatial_merge_size
        n = batch * images
        ids = jnp.full((batch, images * 4 + 2), self.cfg.image_token_id, jnp.int32).at[:, -2:].set(0)
        grid = jnp.tile(jnp.asarray([[1, side, side]], jnp.int32), (n, 1))
        return ids, jnp.ones_like(ids), jnp.zeros((n * side * side, v.patch_dim), jnp.float32), grid
