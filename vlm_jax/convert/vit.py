"""HF `ViTModel` / `ViTForImageClassification` <-> `vlm_jax.models.vit.ViT`: table, loading, export.

Checkpoints keep the legacy tensor names on disk (google/vit-base-patch16-224-in21k, and what
transformers 5's `save_pretrained` writes back, although its modules are renamed in memory):

  ViTModel                     embeddings.*, encoder.layer.{i}.*, layernorm.*, pooler.dense.*
  ViTForImageClassification    vit.embeddings.*, vit.encoder.layer.{i}.*, vit.layernorm.*, classifier.*

Which class a checkpoint holds is read from config.json's `architectures` (a ViTModel may lack its
pooler: `add_pooling_layer=False` saves no pooler.* tensors, so the pooler follows the weights).
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import loader, stream
from vlm_jax.convert.loader import CheckpointError, Entry
from vlm_jax.models.vit import ViT, ViTConfig

IGNORE = (r".*\.position_ids",)
_CLASSIFIER = "ViTForImageClassification"
_MODEL = "ViTModel"


def _norm(hf: str, fx: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{hf}.weight", (*fx, "scale")), Entry(f"{hf}.bias", (*fx, "bias"))]


def _dense(hf: str, fx: tuple[str, ...], kind: str = "transpose") -> list[Entry]:
    return [Entry(f"{hf}.weight", (*fx, "kernel"), kind), Entry(f"{hf}.bias", (*fx, "bias"))]


def _layer(hf: str, fx: tuple[str, ...]) -> list[Entry]:
    """One encoder layer: HF ViT's legacy names -> CLIP's block names (see vlm_jax.models.vit)."""
    att = (*fx, "self_attn")
    t = []
    for hf_name, fx_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        t += [Entry(f"{hf}.attention.attention.{hf_name}.weight", (*att, fx_name, "kernel"), "transpose_split"),
              Entry(f"{hf}.attention.attention.{hf_name}.bias", (*att, fx_name, "bias"), "split")]
    t += _dense(f"{hf}.attention.output.dense", (*att, "out_proj"), "transpose_merge")
    t += _dense(f"{hf}.intermediate.dense", (*fx, "mlp", "fc1")) + _dense(f"{hf}.output.dense", (*fx, "mlp", "fc2"))
    t += _norm(f"{hf}.layernorm_before", (*fx, "layer_norm1")) + _norm(f"{hf}.layernorm_after", (*fx, "layer_norm2"))
    return t


def vit_table(cfg: ViTConfig, prefix: str = "") -> list[Entry]:
    """The HF <-> Flax rows of a ViT; `prefix` 'vit.' for ViTForImageClassification, '' for ViTModel."""
    p = prefix
    table = [
        Entry(f"{p}embeddings.cls_token", ("embeddings", "cls_token")),
        Entry(f"{p}embeddings.position_embeddings", ("embeddings", "position_embeddings")),
        Entry(f"{p}embeddings.patch_embeddings.projection.weight", ("embeddings", "patch_embeddings", "kernel"),
              "conv"),
        Entry(f"{p}embeddings.patch_embeddings.projection.bias", ("embeddings", "patch_embeddings", "bias")),
        *_norm(f"{p}layernorm", ("layernorm",)),
    ]
    for i in range(cfg.num_layers):
        table += _layer(f"{p}encoder.layer.{i}", ("encoder", f"layers_{i}"))
    if cfg.pooler:
        table += _dense(f"{p}pooler.dense", ("pooler",))
    if cfg.num_labels:
        table += _dense("classifier", ("classifier",))
    return table


def _architecture(raw: dict, ckpt) -> str:
    archs = raw.get("architectures") or [_MODEL]
    if archs[0] not in (_MODEL, _CLASSIFIER):
        raise CheckpointError(f"{ckpt}: architecture {archs[0]!r} is not supported; supported: {_MODEL}, {_CLASSIFIER}")
    return archs[0]


def from_pretrained(path_or_hub_id, dtype=jnp.float32, param_dtype=None, attention_impl=None, mesh=None, rules=None):
    """Loads an HF ViT checkpoint (local dir or cached hub id) into Flax, streaming.

    Args:
      path_or_hub_id: directory with config.json (model_type 'vit') + *.safetensors, or a hub id in the HF cache.
      dtype: compute dtype of the returned module.
      param_dtype: dtype of the returned params; defaults to `dtype`.
      attention_impl: None (XLA) or 'cudnn'.
      mesh: a `jax.sharding.Mesh` to shard the params on by their logical axes (None: the default device).
      rules: logical axis -> mesh axis rules.

    Returns:
      (model, params): a `ViT` and its plain params tree.

    Raises:
      CheckpointError: not a ViT checkpoint, or its tensors do not match the config.
    """
    ckpt = loader.resolve_checkpoint(path_or_hub_id)
    raw = loader.read_config(ckpt)
    if raw.get("model_type") != "vit":
        raise CheckpointError(f"{ckpt} holds a {raw.get('model_type')!r} model, not ViT (model_type 'vit')")
    arch = _architecture(raw, ckpt)
    tensors = stream.open_tensors(ckpt)
    prefix = "vit." if arch == _CLASSIFIER else ""
    num_labels = 0
    if arch == _CLASSIFIER:
        num_labels = len(raw.get("id2label") or {}) or int(raw.get("num_labels", 2))
    try:
        cfg = ViTConfig.from_hf(raw, pooler=arch == _MODEL and f"{prefix}pooler.dense.weight" in tensors,
                                num_labels=num_labels)
    except ValueError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    param_dtype = dtype if param_dtype is None else param_dtype
    model = ViT(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    abstract = stream.abstract_params(model)
    shardings = None if mesh is None else stream.shardings_for(model, mesh, rules, abstract=abstract)
    params = stream.load_table(vit_table(cfg, prefix), tensors, abstract, ignore=IGNORE, shardings=shardings)
    return model, params


def hf_config(cfg: ViTConfig):
    """A `transformers.ViTConfig` with the module's hyper-parameters."""
    from transformers import ViTConfig as HFConfig  # lazy: heavy import

    kw = dict(num_labels=cfg.num_labels) if cfg.num_labels else {}
    return HFConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, hidden_act=cfg.hidden_act,
                    layer_norm_eps=cfg.layer_norm_eps, image_size=cfg.image_size, patch_size=cfg.patch_size,
                    num_channels=cfg.num_channels, pooler_output_size=cfg.pooler_output_size, **kw)


def to_hf(model: ViT, params, out_dir, *, dtype=None, extra_files=None) -> pathlib.Path:
    """Writes params as an HF checkpoint (config.json + model.safetensors, legacy tensor names) atomically.

    A model with a classifier is written as ViTForImageClassification, otherwise as ViTModel; either loads with
    its transformers class's `from_pretrained`.
    """
    cfg = model.cfg
    if cfg.num_labels and cfg.pooler:
        raise ValueError("ViTForImageClassification has no pooler: a ViT with both cannot be written as HF")
    arch = _CLASSIFIER if cfg.num_labels else _MODEL
    tensors = loader.export_table(vit_table(cfg, "vit." if cfg.num_labels else ""), params, dtype=dtype)
    d = hf_config(cfg).to_dict()
    d["architectures"] = [arch]
    d["dtype"] = d["torch_dtype"] = str(np.dtype(next(iter(tensors.values())).dtype))
    return loader.write_checkpoint(out_dir, tensors, d, extra_files)
