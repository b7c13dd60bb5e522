"""One entry point for every LVLM family: `from_pretrained`, `lvlm_config` and `to_hf` dispatch on config.json's
`model_type`.

  model_type   HF class                              vlm_jax model                  converter
  llava        LlavaForConditionalGeneration         models.llava.Llava             convert.llava
  internvl     InternVLForConditionalGeneration      models.internvl.InternVL       convert.internvl
  qwen2_vl     Qwen2VLForConditionalGeneration       models.qwen2_vl.Qwen2VL        convert.qwen2_vl

Every returned model has the same face to the programs (`embed_multimodal(input_ids, **vision)`, `positions`,
`hidden_states`, `logits`, `embed`, `init_cache`, `init_inputs`; see `models.llava.ImageTokenLVLM`). Any other
model_type is one `CheckpointError` line naming the supported ones; LLaVA-NeXT / LLaVA-OneVision ('llava_next',
'llava_onevision': anyres tiling with an image newline token) are named as not supported.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from vlm_jax.convert import loader
from vlm_jax.convert.loader import CheckpointError

SUPPORTED = ("llava", "internvl", "qwen2_vl")
# Known LVLM types that do not load, with why (named in the error instead of the generic line).
UNSUPPORTED = {"llava_next": "LLaVA-NeXT's anyres tiling", "llava_onevision": "LLaVA-OneVision's anyres tiling",
               "llava_next_video": "LLaVA-NeXT-Video", "qwen2_5_vl": "Qwen2.5-VL (window attention)",
               "internvl_chat": "the original InternVL remote-code format (convert it with transformers' "
                                "convert_internvl_weights_to_hf.py first)"}


def _module(model_type: str, where: str):
    """The converter module of a model_type; CheckpointError (one line) for any other."""
    if model_type not in SUPPORTED:
        why = f" ({UNSUPPORTED[model_type]} is not implemented)" if model_type in UNSUPPORTED else ""
        raise CheckpointError(f"{where} holds a {model_type!r} model{why}; vlm_jax loads LVLMs of model_type "
                              f"{', '.join(SUPPORTED)}")
    from vlm_jax.convert import internvl, llava, qwen2_vl  # lazy: each pulls in its model family

    return {"llava": llava, "internvl": internvl, "qwen2_vl": qwen2_vl}[model_type]


def model_type(ckpt: str | os.PathLike) -> str:
    """config.json's model_type of a checkpoint directory (checked to be a supported LVLM)."""
    raw = loader.read_config(ckpt)
    kind = raw.get("model_type")
    _module(kind, str(ckpt))
    return kind


def lvlm_config(ckpt: str | os.PathLike) -> Any:
    """The family's frozen config (`LlavaConfig`, `InternVLConfig`, `Qwen2VLConfig`) of a checkpoint directory.

    Raises:
      CheckpointError: unreadable config.json, an unsupported model_type or setting (one line).
    """
    raw = loader.read_config(ckpt)
    mod = _module(raw.get("model_type"), str(ckpt))
    reader = {"llava": "llava_config", "internvl": "internvl_config", "qwen2_vl": "qwen2_vl_config"}
    return getattr(mod, reader[raw["model_type"]])(raw, where=str(ckpt))


def from_pretrained(path_or_hub_id, dtype=jnp.float32, param_dtype=None, attention_impl=None, remat: str = "none",
                    mesh=None, rules=None):
    """(model, params) of an LVLM checkpoint, streamed (see the families' `from_pretrained`).

    Args:
      path_or_hub_id: directory with config.json + *.safetensors, or a hub id in the HF cache.
      dtype, param_dtype, attention_impl, remat, mesh, rules: as `convert.llava.from_pretrained`.

    Raises:
      CheckpointError: not found, an unsupported model_type (the supported ones named) or setting, or missing /
        unexpected / mis-shaped tensors.
    """
    local = os.path.expanduser(os.fspath(path_or_hub_id))
    if os.path.isfile(os.path.join(local, loader.CONFIG_NAME)):  # the model type first, before the weights
        _module(loader.read_config(local).get("model_type"), local)
    ckpt = loader.resolve_checkpoint(path_or_hub_id)
    mod = _module(loader.read_config(ckpt).get("model_type"), str(ckpt))
    return mod.from_pretrained(ckpt, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                               remat=remat, mesh=mesh, rules=rules)


def to_hf(model, params, out_dir, **kwargs):
    """Writes `params` as the HF checkpoint of the model's family (`to_hf` of convert.llava / internvl / qwen2_vl)."""
    from vlm_jax.models.internvl import InternVL
    from vlm_jax.models.llava import Llava
    from vlm_jax.models.qwen2_vl import Qwen2VL

    for cls, kind in ((Llava, "llava"), (InternVL, "internvl"), (Qwen2VL, "qwen2_vl")):
        if isinstance(model, cls):
            return _module(kind, "model").to_hf(model, params, out_dir, **kwargs)
    raise TypeError(f"to_hf: {type(model).__name__} is not an LVLM of {SUPPORTED}")
