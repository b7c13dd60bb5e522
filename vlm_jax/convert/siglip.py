"""HF `SiglipVisionModel` <-> `vlm_jax.models.siglip.SiglipVisionTower`: table, loading, export; and
HF `SiglipModel` <-> `SiglipModel` (the dual encoder: `load_siglip_model`, `siglip_model_to_hf`).

Where the tower's tensors live depends on who saved the checkpoint, so the HF-side name
prefix is a parameter of the table rather than a constant:

  SiglipVisionModel, transformers 5 save_pretrained     ''                         (no prefix)
  SiglipVisionModel, transformers 4 / hub checkpoints   'vision_model.'
  SiglipModel (image + text towers)                     'vision_model.'
  LLaVA on the hub (llava-hf/llava-interleave-...)      'vision_tower.vision_model.'
  LLaVA, transformers 5 save_pretrained                 'vision_tower.'
  LLaVA, transformers 5 in-memory state_dict()          'model.vision_tower.'

transformers 5 reads every one of these (its conversion mapping strips `vision_model.` from
SiglipVisionModel and maps LLaVA's `vision_tower` to `model.vision_tower`), transformers 4
only the 'vision_model.' forms; hence `to_hf` writes 'vision_model.' by default. A LLaVA loader
builds its tower rows with `siglip_table(n, prefix=detect_prefix(names, LLAVA_PREFIXES),
flax_prefix=('vision_tower',))`.
"""

from __future__ import annotations

import pathlib
import re
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import loader, stream
from vlm_jax.convert.clip import _layer, _norm  # SigLIP's encoder layers are CLIP's, name for name
from vlm_jax.convert.loader import CheckpointError, Entry
from vlm_jax.models.siglip import SiglipModel, SiglipVisionConfig, SiglipVisionTower

# Non-persistent buffers older transformers saved; not parameters.
IGNORE = (r".*\.position_ids",)

STANDALONE_PREFIXES = ("vision_model.", "")
LLAVA_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                  "model.vision_tower.")
_PROBE = "embeddings.patch_embedding.weight"  # present in every SigLIP tower, whatever the head/depth


def siglip_table(num_layers: int, *, use_head: bool = False, prefix: str = "vision_model.",
                 flax_prefix: tuple[str, ...] = ()) -> list[Entry]:
    """The HF <-> Flax table of a SigLIP vision tower.

    Args:
      num_layers: encoder depth.
      use_head: include the MAP pooling head's rows (False for LLaVA, which never runs it).
      prefix: HF name prefix of the tower, with its trailing dot (see the module docstring).
      flax_prefix: Flax path of the tower inside a bigger model, e.g. ('vision_tower',).

    Returns:
      The table entries.
    """
    p, f = prefix, tuple(flax_prefix)
    table = [
        Entry(f"{p}embeddings.patch_embedding.weight", (*f, "embeddings", "patch_embedding", "kernel"), "conv"),
        Entry(f"{p}embeddings.patch_embedding.bias", (*f, "embeddings", "patch_embedding", "bias")),
        Entry(f"{p}embeddings.position_embedding.weight", (*f, "embeddings", "position_embedding", "embedding")),
        *_norm(f"{p}post_layernorm", (*f, "post_layernorm")),
    ]
    for i in range(num_layers):
        table += _layer(f"{p}encoder.layers.{i}", (*f, "encoder", f"layers_{i}"))
    if use_head:
        h, fh = f"{p}head", (*f, "head")
        table += [
            Entry(f"{h}.probe", (*fh, "probe")),
            # torch's fused in_proj f32[3D, D] is [q; k; v] rows, each head-major: exactly the
            # generic "transpose then split" into f32[D, 3, H, K].
            Entry(f"{h}.attention.in_proj_weight", (*fh, "attention", "in_proj", "kernel"), "transpose_split"),
            Entry(f"{h}.attention.in_proj_bias", (*fh, "attention", "in_proj", "bias"), "split"),
            Entry(f"{h}.attention.out_proj.weight", (*fh, "attention", "out_proj", "kernel"), "transpose_merge"),
            Entry(f"{h}.attention.out_proj.bias", (*fh, "attention", "out_proj", "bias")),
            *_norm(f"{h}.layernorm", (*fh, "layernorm")),
        ]
        for fc in ("fc1", "fc2"):
            table += [Entry(f"{h}.mlp.{fc}.weight", (*fh, "mlp", fc, "kernel"), "transpose"),
                      Entry(f"{h}.mlp.{fc}.bias", (*fh, "mlp", fc, "bias"))]
    return table


def head_pattern(prefix: str) -> str:
    """Regex (for `apply_table(ignore=...)`) of the MAP head's tensors under `prefix`.

    LLaVA checkpoints may carry the head although nothing runs it; a tower built without it
    drops them through this pattern.
    """
    return re.escape(prefix) + r"head\..*"


def detect_prefix(names: Iterable[str], candidates: Sequence[str] = STANDALONE_PREFIXES) -> str:
    """Which of `candidates` the checkpoint's tower is stored under.

    Args:
      names: the checkpoint's tensor names.
      candidates: prefixes to try in order, e.g. STANDALONE_PREFIXES or LLAVA_PREFIXES.

    Returns:
      The first candidate c such that c + 'embeddings.patch_embedding.weight' is a tensor.

    Raises:
      CheckpointError: none matches; the message shows some of the names found.
    """
    names = set(names)
    for c in candidates:
        if c + _PROBE in names:
            return c
    sample = sorted(n for n in names if n.endswith(_PROBE)) or sorted(names)[:5]
    raise CheckpointError(f"no SigLIP vision tower found: expected one of {[c + _PROBE for c in candidates]}, "
                          f"the checkpoint has e.g. {sample}")


def table_for(model: SiglipVisionTower, prefix: str = "vision_model.") -> list[Entry]:
    return siglip_table(model.cfg.num_layers, use_head=model.cfg.use_head, prefix=prefix)


def param_shapes(model: SiglipVisionTower):
    """Unboxed `jax.eval_shape` params tree of `model` (no memory allocated)."""
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])


_MODEL_TYPES = ("siglip_vision_model", "siglip")


def from_pretrained(path_or_hub_id, dtype=jnp.float32, param_dtype=None, use_head: bool | None = None,
                    attention_impl=None, mesh=None, rules=None):
    """Loads the SigLIP vision tower of an HF checkpoint (local dir or cached hub id) into Flax.

    Args:
      path_or_hub_id: directory with config.json + *.safetensors of a `SiglipVisionModel`
        (model_type 'siglip_vision_model') or a `SiglipModel` ('siglip': its text tower and
        logit scale/bias are skipped), or a hub id in the HF cache.
      dtype: compute dtype of the returned module.
      param_dtype: dtype of the returned params (each tensor cast as it is read); defaults to `dtype`.
      use_head: build the MAP pooling head; None follows the config's `vision_use_head`.
        False drops the head's tensors if the file has them.
      attention_impl: None (XLA) or 'cudnn', see `SiglipVisionTower`.
      mesh: a `jax.sharding.Mesh`: params sharded by their logical axis names and `rules`; None: the
        default device. Tensors are read one at a time and placed straight into their sharding.
      rules: logical axis -> mesh axis rules (`vlm_jax.runtime.mesh.DEFAULT_RULES` when None).

    Returns:
      (model, params): a `SiglipVisionTower` and its plain (unboxed) params tree of `jax.Array`s.

    Raises:
      CheckpointError: not a SigLIP checkpoint, or its tensors do not match the config.
    """
    ckpt = loader.resolve_checkpoint(path_or_hub_id)
    raw = loader.read_config(ckpt)
    model_type = raw.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise CheckpointError(f"{ckpt} holds a {model_type!r} model, not SigLIP (model_type must be one of "
                              f"{list(_MODEL_TYPES)}); for a LLaVA checkpoint use its own loader")
    vision = raw.get("vision_config", {}) if model_type == "siglip" else raw
    param_dtype = dtype if param_dtype is None else param_dtype
    model = SiglipVisionTower.from_hf_config(dict(vision), use_head=use_head, dtype=dtype,
                                             param_dtype=param_dtype, attention_impl=attention_impl)
    tensors = stream.open_tensors(ckpt)
    prefix = detect_prefix(tensors, STANDALONE_PREFIXES)
    ignore = list(IGNORE)
    if model_type == "siglip":
        ignore += [r"text_model\..*", "logit_scale", "logit_bias"]
    if not model.cfg.use_head:
        ignore.append(head_pattern(prefix))
    elif f"{prefix}head.probe" not in tensors:
        raise CheckpointError(f"{ckpt}: config.json says vision_use_head=true but the weights have no "
                              f"{prefix}head.* tensors; pass use_head=False to load the tower without the head")
    abstract = stream.abstract_params(model)
    shardings = None if mesh is None else stream.shardings_for(model, mesh, rules, abstract=abstract)
    params = stream.load_table(table_for(model, prefix), tensors, abstract, ignore=ignore, shardings=shardings)
    return model, params


def hf_config(model: SiglipVisionTower | SiglipVisionConfig):
    """A `transformers.SiglipVisionConfig` equivalent to a tower's (or a tower config's) hyper-parameters."""
    from transformers import SiglipVisionConfig as HFConfig  # lazy: heavy import

    c = model if isinstance(model, SiglipVisionConfig) else model.cfg
    return HFConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_channels=c.num_channels,
                    image_size=c.image_size, patch_size=c.patch_size, hidden_act=c.hidden_act,
                    layer_norm_eps=c.layer_norm_eps, vision_use_head=c.use_head)


def to_hf(model_or_config, params, out_dir, *, dtype=None, prefix: str = "vision_model.",
          extra_files=None) -> pathlib.Path:
    """Writes params as an HF `SiglipVisionModel` checkpoint (config.json + model.safetensors) atomically.

    Args:
      model_or_config: the `SiglipVisionTower`, or a `transformers.SiglipVisionConfig` / dict.
      params: the tower's params tree (boxed or not).
      out_dir: destination; loadable by `transformers.SiglipVisionModel.from_pretrained`.
      dtype: tensor dtype in the file; None keeps the params' dtype.
      prefix: HF name prefix; the default 'vision_model.' is read by transformers 4 and 5 alike.
      extra_files: more files for the directory (name -> content).

    Returns:
      The output directory.
    """
    if isinstance(model_or_config, SiglipVisionTower):
        config = hf_config(model_or_config)
    else:
        from transformers import SiglipVisionConfig as HFConfig

        config = HFConfig.from_dict(model_or_config) if isinstance(model_or_config, dict) else model_or_config
    cfg = SiglipVisionConfig.from_hf(config)
    tensors = loader.export_table(siglip_table(cfg.num_layers, use_head=cfg.use_head, prefix=prefix), params,
                                  dtype=dtype)
    d = config.to_dict()
    d["architectures"] = ["SiglipVisionModel"]
    d["dtype"] = d["torch_dtype"] = str(np.dtype(next(iter(tensors.values())).dtype))
    return loader.write_checkpoint(out_dir, tensors, d, extra_files)


# ----------------------------------------------------------------------------- the dual encoder (SiglipModel)


def siglip_text_table(num_layers: int, prefix: str = "text_model.") -> list[Entry]:
    """The HF <-> Flax rows of a SigLIP text tower (Flax path 'text_model/...')."""
    f = ("text_model",)
    table = [
        Entry(f"{prefix}embeddings.token_embedding.weight", (*f, "embeddings", "token_embedding", "embedding")),
        Entry(f"{prefix}embeddings.position_embedding.weight", (*f, "embeddings", "position_embedding", "embedding")),
        *_norm(f"{prefix}final_layer_norm", (*f, "final_layer_norm")),
        Entry(f"{prefix}head.weight", (*f, "head", "kernel"), "transpose"),
        Entry(f"{prefix}head.bias", (*f, "head", "bias")),
    ]
    for i in range(num_layers):
        table += _layer(f"{prefix}encoder.layers.{i}", (*f, "encoder", f"layers_{i}"))
    return table


def siglip_model_table(model: SiglipModel) -> list[Entry]:
    """The full HF <-> Flax table of a `SiglipModel` (both towers, logit scale and bias)."""
    return (siglip_table(model.vision.num_layers, use_head=True, prefix="vision_model.", flax_prefix=("vision_model",))
            + siglip_text_table(model.text.num_layers)
            + [Entry("logit_scale", ("logit_scale",)), Entry("logit_bias", ("logit_bias",))])


def load_siglip_model(path_or_hub_id, dtype=jnp.float32, param_dtype=None, attention_impl=None, mesh=None,
                      rules=None):
    """Loads an HF `SiglipModel` checkpoint (model_type 'siglip', both towers) into Flax, streaming.

    Args: as `from_pretrained`.

    Returns:
      (model, params): a `SiglipModel` and its plain params tree.

    Raises:
      CheckpointError: not a SigLIP dual-encoder checkpoint, or its tensors do not match the config.
    """
    ckpt = loader.resolve_checkpoint(path_or_hub_id)
    raw = loader.read_config(ckpt)
    if raw.get("model_type") != "siglip":
        raise CheckpointError(f"{ckpt} holds a {raw.get('model_type')!r} model, not a SigLIP dual encoder "
                              f"(model_type 'siglip', an HF SiglipModel)")
    from transformers import SiglipConfig  # lazy: heavy import

    param_dtype = dtype if param_dtype is None else param_dtype
    try:
        model = SiglipModel.from_hf_config(SiglipConfig.from_dict(raw), dtype=dtype, param_dtype=param_dtype,
                                           attention_impl=attention_impl)
    except ValueError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    abstract = stream.abstract_params(model)
    shardings = None if mesh is None else stream.shardings_for(model, mesh, rules, abstract=abstract)
    params = stream.load_table(siglip_model_table(model), stream.open_tensors(ckpt), abstract, ignore=IGNORE,
                               shardings=shardings)
    return model, params


def siglip_model_config(model: SiglipModel):
    """A `transformers.SiglipConfig` with the dual encoder's hyper-parameters."""
    from transformers import SiglipConfig

    t = model.text
    text = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
                vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings,
                projection_size=t.projection_size)
    return SiglipConfig(text_config=text, vision_config=hf_config(model.vision).to_dict())


def siglip_model_to_hf(model: SiglipModel, params, out_dir, *, dtype=None, config=None,
                       extra_files=None) -> pathlib.Path:
    """Writes a `SiglipModel` as an HF checkpoint (config.json + model.safetensors) atomically.

    Args:
      model: the module.
      params: its params tree.
      out_dir: destination; loadable by `transformers.SiglipModel.from_pretrained`.
      dtype: tensor dtype in the file; None keeps the params'.
      config: a `transformers.SiglipConfig` to write instead of the one derived from `model` (keeps token ids).
      extra_files: more files (tokenizer, preprocessor_config.json ...).
    """
    tensors = loader.export_table(siglip_model_table(model), params, dtype=dtype)
    d = (config or siglip_model_config(model)).to_dict()
    d["architectures"] = ["SiglipModel"]
    d["dtype"] = d["torch_dtype"] = str(np.dtype(tensors["logit_scale"].dtype))
    return loader.write_checkpoint(out_dir, tensors, d, extra_files)
