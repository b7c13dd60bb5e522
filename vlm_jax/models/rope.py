"""Rotary-embedding frequencies of the RoPE scaling types real Llama / Qwen2 checkpoints use.

A port of transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py) for the types below, in float32 with the
same operations in the same order as HF, so that the tables agree to the last bit or close to it:

  default   inv_freq[i] = 1 / theta^(2i / Dh)
  linear    inv_freq / factor                                  (positions stretched by `factor`)
  dynamic   NTK-aware: theta grows with the sequence length S once S > max_position_embeddings:
              theta' = theta * (factor * S / max_pos - (factor - 1)) ^ (Dh / (Dh - 2))
            (InternLM2 / InternVL2, Qwen-VL era checkpoints)
  llama3    Llama 3.1's banded rescaling: low frequencies / factor, high ones kept, a smooth ramp between

Dynamic NTK as HF computes it: HF's rotary module recomputes inv_freq at every forward call from S =
max(position_ids) + 1 of *that call* (prefill: the longest row; each decode step: the new position), and keys
already in the KV cache keep the rotation they were given. Passing each call's positions to `inv_freq` gives
exactly that. (HF's module also keeps the largest S it has seen until a call shorter than max_position_embeddings
resets it; a fresh HF model, which is what generate starts from, behaves as here.)

A config's scaling parameters are kept as a sorted tuple of (key, value) pairs (`DecoderConfig.rope_scaling`),
so the config stays hashable; `scaling_from_hf` validates and extracts them.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# The parameters each type reads from rope_parameters / rope_scaling (besides rope_theta).
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def scaling_from_hf(rope: dict, rope_type: str) -> tuple[tuple[str, float], ...]:
    """The scaling parameters of `rope_type` from an HF rope dict, as sorted (key, value) pairs.

    Args:
      rope: HF `rope_parameters` (transformers 5) or `rope_scaling` (older configs).
      rope_type: its type ('rope_type', or the legacy 'type').

    Returns:
      e.g. (('factor', 2.0),) for 'dynamic'; () for 'default'.

    Raises:
      ValueError: an unsupported type, a missing parameter, or a partial rotary factor (not in Llama / Qwen2).
    """
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r} (rope_scaling / rope_parameters); "
                         f"vlm_jax supports {list(SUPPORTED_ROPE_TYPES)}")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (rotary "
                         f"embeddings over the whole head only)")
    missing = [k for k in _REQUIRED[rope_type] if rope.get(k) is None]
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {missing} in rope_scaling / rope_parameters")
    # original_max_position_embeddings stays an int (HF validates its type on export).
    return tuple(sorted((k, int(rope[k]) if k.startswith("original_") else float(rope[k]))
                        for k in _REQUIRED[rope_type]))


def _base_inv_freq(theta, dim: int):
    # HF: 1.0 / (base ** (torch.arange(0, dim, 2, dtype=int64).float() / dim)), float32.
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _llama3(inv_freq, p: dict):
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def inv_freq(cfg, positions=None):
    """The rotary inverse frequencies f32[Dh / 2] for one forward call.

    Args:
      cfg: a `DecoderConfig` (head_dim, rope_theta, rope_type, rope_scaling, max_position_embeddings).
      positions: integer positions of the call's tokens (any shape); only 'dynamic' reads them
        (S = max(positions) + 1, traced, so one compiled program serves every length).

    Returns:
      f32[Dh / 2].
    """
    dim, theta, p = cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling)
    base = _base_inv_freq(theta, dim)
    if cfg.rope_type == "linear":
        return base / p["factor"]
    if cfg.rope_type == "llama3":
        return _llama3(base, p)
    if cfg.rope_type == "dynamic":
        if positions is None:
            raise ValueError("dynamic rope needs the call's positions")
        max_pos = cfg.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions).astype(jnp.int32) + 1, max_pos)
        scale = p["factor"] * seq_len.astype(jnp.float32) / max_pos - (p["factor"] - 1)
        grown = _base_inv_freq(theta * scale ** (dim / (dim - 2)), dim)
        # Up to max_position_embeddings HF keeps the original table (not the formula at S = max_pos, which
        # float32 rounding could move by an ulp).
        return jnp.where(seq_len > max_pos, grown, base)
    return base
