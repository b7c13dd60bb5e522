"""Llama-family decoder LMs in Flax linen: ports of HF `LlamaForCausalLM` and `Qwen2ForCausalLM`.

One module, `CausalLM`, covers both (Qwen2 is Llama with biases on the q/k/v projections, its
own rope_theta and, for the small models, tied input/output embeddings). It reproduces HF's
modeling_llama.py / modeling_qwen2.py in float32 to ~1e-5:

  embed_tokens -> N x [x + attn(rms1(x)); x + mlp(rms2(x))] -> norm -> lm_head (or embed^T)

  * RMSNorm computed in float32 (as HF), then cast back and multiplied by the scale.
  * Rotary embeddings with HF's rotate_half convention (the two halves of each head, not
    interleaved pairs), inv_freq = 1 / theta^(2i/Dh); rope scaling types 'linear', 'dynamic'
    (NTK) and 'llama3' as HF computes them (`vlm_jax.models.rope`).
  * Grouped-query attention: K/V have num_kv_heads heads; query head n reads kv head n // G,
    which is both HF's repeat_kv order and jax.nn.dot_product_attention's own GQA grouping.
  * SwiGLU MLP: down(silu(gate(x)) * up(x)).

The parameter tree mirrors the HF state dict (`layers.3` -> `layers_3`, Linear `weight` ->
`kernel`, RMSNorm `weight` -> `scale`, Embedding `weight` -> `embedding`):

  model/embed_tokens/embedding                      [V, D]         ('vocab', 'embed')
  model/layers_{i}/input_layernorm/scale            [D]            ('norm',)
  model/layers_{i}/self_attn/q_proj/{kernel,bias}   [D, H, Dh]     ('embed', 'heads', 'kv'); bias [H, Dh]
  model/layers_{i}/self_attn/{k,v}_proj/...         [D, KVH, Dh]   ('embed', 'kv_heads', 'kv')
  model/layers_{i}/self_attn/o_proj/kernel          [H, Dh, D]     ('heads', 'kv', 'embed')
  model/layers_{i}/post_attention_layernorm/scale   [D]
  model/layers_{i}/mlp/{gate,up}_proj/kernel        [D, F]         ('embed', 'mlp'); down_proj [F, D]
  model/norm/scale                                  [D]
  lm_head/kernel                                    [D, V]         ('embed', 'vocab'); absent when tied

With `scan_layers=True` the layers are one `nn.scan`ned module `model/layers/...` whose leaves
carry a leading 'layers' axis of size N (one compiled layer body instead of N: faster
compiles, the usual choice for 7B models). Biases exist only where the config says so.

KV cache (`KVCache`): per-layer k/v buffers dtype[B, T, KVH, Dh] (a tuple over layers, or one
stacked dtype[N, B, T, KVH, Dh] array when scanned), a slot mask i32[B, T] and the next write
slot. All rows share the write slot, which is why prompts are LEFT-padded: the prompt ends at
the same slot in every row and every row's next token is written at the same place.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vlm_jax.models import rope as rope_lib

Dtype = Any

_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu}
SUPPORTED_ROPE_TYPES = rope_lib.SUPPORTED_ROPE_TYPES
REMAT_POLICIES = {
    "none": None,
    # Recompute the whole layer in the backward pass: least memory.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep the projection matmul outputs, recompute the rest (norms, rope, attention scores):
    # the attention score/probability tensors are batched dots and are not saved.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a Llama/Qwen2 decoder (a frozen, hashable view of the HF config)."""

    model_type: str  # 'llama' or 'qwen2' (decides the HF class on export)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float], ...] = ()  # the type's parameters, sorted (`rope.scaling_from_hf`)
    max_position_embeddings: int = 4096  # 'dynamic' rope's threshold; nothing here is sized by it
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None  # token ids only kept to write the config back (to_hf)
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # M-RoPE (Qwen2-VL): how many of the head's Dh/2 rotary frequencies follow the temporal, height and width
    # position; used with positions of shape [3, B, L]. None: positions are [B, L] (plain RoPE).
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
        rope_lib.scaling_from_hf(dict(self.rope_scaling), self.rope_type)  # validates type and parameters
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.mrope_section is not None and (len(self.mrope_section) != 3
                                               or sum(self.mrope_section) != self.head_dim // 2):
            raise ValueError(f"mrope_section {list(self.mrope_section)} must be 3 sizes summing to head_dim / 2 = "
                             f"{self.head_dim // 2}")

    @classmethod
    def from_hf(cls, config) -> "DecoderConfig":
        """From a `transformers.LlamaConfig` / `Qwen2Config` (or its dict, with 'model_type').

        Raises:
          ValueError: an unsupported model_type, rope type, activation or sliding-window attention.
        """
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        model_type = get("model_type")
        if model_type not in ("llama", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r}; vlm_jax decoders support ['llama', 'qwen2']")
        heads = get("num_attention_heads")
        # transformers 5 keeps theta and the scaling type in `rope_parameters`; older configs
        # (and raw config.json files) use `rope_theta` + `rope_scaling` with 'type' or 'rope_type'.
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        if "full_attention" in rope and isinstance(rope["full_attention"], dict):
            rope = rope["full_attention"]  # per-layer-type form; only full attention is supported
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", get("rope_theta")) or 10000.0
        if model_type == "qwen2":
            layer_types = get("layer_types") or ()
            if get("use_sliding_window", False) or "sliding_attention" in layer_types:
                raise ValueError("Qwen2 sliding-window attention (use_sliding_window=True) is not supported")
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(get("attention_bias", False))
            mlp_bias = bool(get("mlp_bias", False))
        eos = get("eos_token_id")
        return cls(model_type=model_type, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                   intermediate_size=get("intermediate_size"), num_layers=get("num_hidden_layers"),
                   num_heads=heads, num_kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads, hidden_act=get("hidden_act", "silu"),
                   rms_norm_eps=float(get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_type=rope_type,
                   rope_scaling=rope_lib.scaling_from_hf(rope, rope_type),
                   max_position_embeddings=get("max_position_embeddings", 4096),
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                   qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, bos_token_id=get("bos_token_id"),
                   eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
                   pad_token_id=get("pad_token_id"))


def _part(init, *names):
    return nn.with_logical_partitioning(init, names)


_init = nn.initializers.normal(0.02)  # HF's initializer_range for kernels and embeddings
_zeros, _ones = nn.initializers.zeros_init(), nn.initializers.ones_init()


# ----------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
    """Decoding state; a pytree, so it passes through jit / while_loop / scan.

    Attributes:
      k, v: per-layer buffers: a tuple of N dtype[B, T, KVH, Dh], or one dtype[N, B, T, KVH, Dh]
        with scan_layers. Rotary embeddings are already applied to k.
      mask: i32[B, T], 1 where a slot holds a real (non-padding) token.
      index: i32[], the slot the next token is written to (shared by all rows).
    """

    k: Any
    v: Any
    mask: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype: Dtype = jnp.float32,
               scan_layers: bool = False) -> KVCache:
    """An empty cache of `max_len` slots (prompt + new tokens) for `batch` rows."""
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    if scan_layers:
        k = jnp.zeros((cfg.num_layers, *shape), dtype)
        v = jnp.zeros((cfg.num_layers, *shape), dtype)
    else:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=k, v=v, mask=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- layers


def rope_cos_sin(cfg: DecoderConfig, positions):
    """i32[B, L] positions -> (cos, sin) f32[B, L, Dh], as HF's LlamaRotaryEmbedding."""
    inv_freq = rope_lib.inv_freq(cfg, positions)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(cfg: DecoderConfig, positions):
    """M-RoPE (HF Qwen2VLRotaryEmbedding): i32[3, B, L] (temporal, height, width) positions -> (cos, sin)
    f32[B, L, Dh]. The k-th chunk of `cfg.mrope_section` frequencies (in each half) rotates by axis k's position;
    with three equal position rows this is plain RoPE."""
    if cfg.mrope_section is None:
        raise ValueError("positions of shape [3, B, L] need a config with mrope_section (M-RoPE)")
    cos, sin = rope_cos_sin(cfg, positions)  # [3, B, L, Dh]: every frequency at every axis' position
    bounds = [0, *itertools.accumulate(cfg.mrope_section)]
    half = cfg.head_dim // 2

    def pick(t):
        t = jnp.concatenate([t[k, ..., a:b] for k, (a, b) in enumerate(zip(bounds, bounds[1:]))], axis=-1)
        return jnp.concatenate([t, t], axis=-1)

    return pick(cos[..., :half]), pick(sin[..., :half])


def apply_rope(x, cos, sin):
    """x [B, L, H, Dh], cos/sin f32[B, L, Dh] -> rotated x (HF rotate_half convention)."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", _part(_ones, "norm"), (x.shape[-1],), self.param_dtype)
        # float32 statistics whatever the compute dtype, as HF (bf16 squares lose too much).
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class Attention(nn.Module):
    cfg: DecoderConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask, cos, sin, kv=None, index=None):
        """Self-attention with rotary embeddings and GQA.

        Args:
          x: f32[B, L, D] normed hidden states.
          mask: bool[B, 1, L, S] (True = attend); S = L without cache, T with.
          cos, sin: f32[B, L, Dh] rotary tables of the L positions.
          kv: None, or this layer's cache buffers (k, v) dtype[B, T, KVH, Dh].
          index: i32[], slot of x's first token in the cache (with kv).

        Returns:
          (f32[B, L, D], updated (k, v) or None).
        """
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(heads, axis, name):
            return nn.DenseGeneral((heads, c.head_dim), use_bias=c.qkv_bias, name=name,
                                   kernel_init=_part(_init, "embed", axis, "kv"),
                                   bias_init=_part(_zeros, axis, "kv"), **kw)(x)

        # [B, L, heads, Dh] is the BTNH layout of jax.nn.dot_product_attention.
        q = apply_rope(proj(c.num_heads, "heads", "q_proj"), cos, sin)
        k = apply_rope(proj(c.num_kv_heads, "kv_heads", "k_proj"), cos, sin)
        v = proj(c.num_kv_heads, "kv_heads", "v_proj")
        if kv is not None:
            k_buf, v_buf = kv
            # Writes the L new entries at [index, index + L). dynamic_update_slice clamps an
            # out-of-range start instead of failing: the caller sizes the cache (generate does).
            k_buf = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), (0, index, 0, 0))
            v_buf = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), (0, index, 0, 0))
            kv = (k_buf, v_buf)
            k, v = k_buf.astype(q.dtype), v_buf.astype(q.dtype)
        # GQA is handled by the function itself (no repeated K/V in memory). The XLA path keeps
        # the softmax in float32 for bf16 inputs; 'cudnn' is the fused GPU kernel.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=c.head_dim ** -0.5,
                                           implementation=self.attention_impl)
        out = nn.DenseGeneral(c.hidden_size, axis=(-2, -1), use_bias=c.o_bias, name="o_proj",
                              kernel_init=_part(_init, "heads", "kv", "embed"),
                              bias_init=_part(_zeros, "embed"), **kw)(out)
        return out, kv


class MLP(nn.Module):
    cfg: DecoderConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        up = dict(kernel_init=_part(_init, "embed", "mlp"), bias_init=_part(_zeros, "mlp"), **kw)
        gate = nn.Dense(c.intermediate_size, name="gate_proj", **up)(x)
        h = _ACTIVATIONS[c.hidden_act](gate) * nn.Dense(c.intermediate_size, name="up_proj", **up)(x)
        return nn.Dense(c.hidden_size, name="down_proj", kernel_init=_part(_init, "mlp", "embed"),
                        bias_init=_part(_zeros, "embed"), **kw)(h)


class DecoderLayer(nn.Module):
    """Pre-norm block. The (carry, per-layer input) signature is what nn.scan needs."""

    cfg: DecoderConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, kv, mask, cos, sin, index):
        """(x f32[B, L, D], kv, ...) -> (x, kv); see `Attention` for the arguments."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(self.cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, kv = Attention(self.cfg, attention_impl=self.attention_impl, name="self_attn", **kw)(
            h, mask, cos, sin, kv, index)
        x = x + h
        h = RMSNorm(self.cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        return x + MLP(self.cfg, name="mlp", **kw)(h), kv


class DecoderModel(nn.Module):
    """HF `LlamaModel` / `Qwen2Model`: embeddings, layers, final norm."""

    cfg: DecoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    scan_layers: bool = False

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_part(_init, "vocab", "embed"), **kw)
        layer = DecoderLayer
        if REMAT_POLICIES[self.remat] is not None:
            # prevent_cse only matters outside scan (scan already stops XLA from merging the
            # recomputation with the forward pass) and costs performance inside it.
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        if self.scan_layers:
            layer = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            self.layers = layer(c, attention_impl=self.attention_impl, **kw)
        else:
            # A list attribute in setup names its modules layers_0 ... layers_{N-1}.
            self.layers = [layer(c, attention_impl=self.attention_impl, **kw) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, **kw)

    def __call__(self, x, attention_mask, positions=None, cache: KVCache | None = None):
        """Runs the layers on embedded inputs.

        Args:
          x: f32[B, L, D] input embeddings.
          attention_mask: i32[B, L], 1 = token, 0 = padding.
          positions: i32[B, L] rotary positions, or None for the count of real tokens before
            each one (cumsum(mask) - 1, clipped at 0), continuing the cache's count; or
            i32[3, B, L] M-RoPE positions (configs with mrope_section).
          cache: None, or a KVCache the L tokens are appended to.

        Returns:
          (final-norm hidden states f32[B, L, D], updated cache or None).
        """
        b, length = attention_mask.shape
        valid = attention_mask > 0
        if cache is None:
            start = jnp.zeros((b, 1), jnp.int32)
            # Causal AND key padding, as HF's create_causal_mask. A query that is padding
            # itself may see no key at all; its output is garbage but finite and unused.
            mask = jnp.tril(jnp.ones((length, length), bool))[None, None] & valid[:, None, None, :]
            index = kv = None
        else:
            start = jnp.sum(cache.mask, axis=-1, keepdims=True)
            index = cache.index
            slots = jax.lax.dynamic_update_slice(cache.mask, attention_mask.astype(jnp.int32), (0, index))
            q_slot = index + jnp.arange(length)
            causal = jnp.arange(cache.max_len)[None, :] <= q_slot[:, None]  # [L, T] in slot space
            mask = causal[None, None] & (slots > 0)[:, None, None, :]
            kv = (cache.k, cache.v)
        if positions is None:
            # What HF generate passes (cumsum - 1, pads 0). HF's forward *without* position_ids
            # uses arange(L) (+ cache length) instead, which differs for left-padded rows.
            positions = jnp.maximum(start + jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
        cos, sin = (mrope_cos_sin if positions.ndim == 3 else rope_cos_sin)(self.cfg, positions)
        x = x.astype(self.dtype)
        if self.scan_layers:
            x, kv = self.layers(x, None if kv is None else kv, mask, cos, sin, index)
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                x, layer_kv = layer(x, None if kv is None else (kv[0][i], kv[1][i]), mask, cos, sin, index)
                if layer_kv is not None:
                    new_k.append(layer_kv[0])
                    new_v.append(layer_kv[1])
            kv = None if kv is None else (tuple(new_k), tuple(new_v))
        x = self.norm(x)
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], mask=slots, index=index + length)
        return x, cache


class CausalLM(nn.Module):
    """HF `LlamaForCausalLM` / `Qwen2ForCausalLM`.

    Build it with `CausalLM.from_hf_config(config)`; load weights with
    `vlm_jax.convert.llama.from_pretrained`. Methods go through `apply`, e.g.
    `model.apply({"params": p}, ids, method=CausalLM.embed)`.

    Attributes:
      cfg: hyper-parameters.
      dtype: compute dtype (activations, KV cache by default); bfloat16 works.
      param_dtype: parameter dtype (float32 master weights for training).
      attention_impl: `implementation` of jax.nn.dot_product_attention: None (XLA, portable)
        or 'cudnn' (fused kernel, NVIDIA GPUs only).
      remat: 'none', 'full' or 'dots' (see REMAT_POLICIES), applied per layer.
      scan_layers: nn.scan over the layers, params stacked on a leading 'layers' axis.
    """

    cfg: DecoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    scan_layers: bool = False

    @classmethod
    def from_hf_config(cls, config, **kwargs) -> "CausalLM":
        """From a `transformers.LlamaConfig` / `Qwen2Config` (or dict); kwargs are the attributes."""
        return cls(DecoderConfig.from_hf(config), **kwargs)

    def setup(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {list(REMAT_POLICIES)}")
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.model = DecoderModel(c, attention_impl=self.attention_impl, remat=self.remat,
                                  scan_layers=self.scan_layers, **kw)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, kernel_init=_part(_init, "embed", "vocab"), **kw)

    def embed(self, input_ids):
        """i32[B, L] -> dtype[B, L, D] token embeddings (to splice images / soft prompts into)."""
        return self.model.embed_tokens(input_ids)

    def logits(self, hidden):
        """Final-norm hidden states f32[..., D] -> f32[..., V] logits (lm_head or tied embedding)."""
        if self.cfg.tie_word_embeddings:
            out = self.model.embed_tokens.attend(hidden.astype(self.dtype))
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def hidden_states(self, input_ids, attention_mask=None, *, inputs_embeds=None, positions=None, cache=None):
        """Like `__call__` without the LM head: (f32[B, L, D] final-norm hidden, cache or None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], jnp.int32)
        return self.model(x, attention_mask, positions, cache)

    def __call__(self, input_ids, attention_mask=None, *, inputs_embeds=None, positions=None, cache=None,
                 return_hidden: bool = False):
        """Next-token logits.

        Args:
          input_ids: i32[B, L] token ids, or None when `inputs_embeds` is given.
          attention_mask: i32[B, L], 1 = token, 0 = padding (None: no padding). With a cache,
            the mask of the L new tokens only; the cache remembers the earlier ones.
          inputs_embeds: f32[B, L, D] embeddings instead of ids (e.g. `embed(ids)` with image
            features or soft prompts spliced in).
          positions: i32[B, L] rotary positions; None means cumsum(attention_mask) - 1 clipped
            at 0 (plus the cache's real-token count), which is what HF generate computes. HF's
            forward *without* position_ids uses arange(L) (+ cache length) instead, which
            differs on left-padded rows: pass HF the same position_ids when comparing.
          cache: a `KVCache` (see `init_cache`) to append the L tokens to; the tokens go at
            slots [cache.index, cache.index + L).
          return_hidden: also return the final-norm hidden states.

        Returns:
          logits f32[B, L, V]; or a tuple (logits, [hidden f32[B, L, D] if return_hidden],
          [updated cache if a cache was passed]).
        """
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, inputs_embeds=inputs_embeds,
                                               positions=positions, cache=cache)
        logits = self.logits(hidden)
        out = (logits,) + ((hidden.astype(jnp.float32),) if return_hidden else ()) + \
            ((new_cache,) if cache is not None else ())
        return out[0] if len(out) == 1 else out

    def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None) -> KVCache:
        """An empty KVCache for this model (works on the unbound module: no params needed)."""
        return init_cache(self.cfg, batch, max_len, self.dtype if dtype is None else dtype, self.scan_layers)

    def init_inputs(self, batch: int = 1, length: int = 8):
        """Dummy (input_ids, attention_mask) for `init` / `jax.eval_shape`."""
        return jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), jnp.int32)
