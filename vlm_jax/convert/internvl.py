"""HF `InternVLForConditionalGeneration` <-> `vlm_jax.models.internvl.InternVL`.

The table is InternViT's tensors, the projector's and the LM's (`llama_convert.llama_table`). Tensor names on
disk depend on the transformers version that wrote them; each part's prefix is detected from the names:

  part        prefixes seen                                           written by `to_hf`
  tower       vision_tower. (transformers 5 save_pretrained),          vision_tower.
              model.vision_tower. (hub -hf repos, in-memory names)
  projector   multi_modal_projector., model.multi_modal_projector.     multi_modal_projector.
  LM          language_model.model. + language_model.lm_head,          language_model.model. +
              model.language_model. + lm_head                          language_model.lm_head

The export uses transformers 5's own names, which every transformers version with InternVL reads.
"""

from __future__ import annotations

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import llama as llama_convert
from vlm_jax.convert import loader, stream
from vlm_jax.convert.llava import LM_PREFIXES, PROJECTOR_PREFIXES
from vlm_jax.convert.loader import CheckpointError, Entry
from vlm_jax.models.internvl import InternVisionConfig, InternVL, InternVLConfig

TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")
EXPORT_LAYOUT = dict(tower="vision_tower.", projector="multi_modal_projector.", lm="language_model.model.",
                     head="language_model.lm_head")
IGNORE = (r".*\.position_ids",)


def detect_layout(names) -> dict[str, str]:
    """The name prefix of each part in a checkpoint: {'tower', 'projector', 'lm', 'head'}."""
    names = set(names)

    def find(candidates, probe, what):
        for prefix in candidates:
            if any(n.startswith(prefix + probe) for n in names):
                return prefix
        raise CheckpointError(f"not an InternVL checkpoint: found no {what} tensors under any of {list(candidates)}")

    lm = find([p for p, _ in LM_PREFIXES], "embed_tokens.", "language model")
    return dict(tower=find(TOWER_PREFIXES, "embeddings.patch_embeddings.", "vision tower"),
                projector=find(PROJECTOR_PREFIXES, "linear_1.", "projector"), lm=lm, head=dict(LM_PREFIXES)[lm])


def _norm(hf: str, fx: tuple[str, ...], with_bias: bool) -> list[Entry]:
    return [Entry(f"{hf}.weight", (*fx, "scale"))] + ([Entry(f"{hf}.bias", (*fx, "bias"))] if with_bias else [])


def _linear(hf: str, fx: tuple[str, ...], kind: str = "transpose", bias_kind: str | None = "identity") -> list[Entry]:
    t = [Entry(f"{hf}.weight", (*fx, "kernel"), kind)]
    return t + ([Entry(f"{hf}.bias", (*fx, "bias"), bias_kind)] if bias_kind else [])


def vision_table(c: InternVisionConfig, prefix: str = "vision_tower.", fx=("vision_tower",)) -> list[Entry]:
    """HF <-> Flax entries of InternViT."""
    p, ln = prefix, c.norm_type == "layer_norm"
    emb = (*fx, "embeddings")
    t = [Entry(f"{p}embeddings.cls_token", (*emb, "cls_token"))]
    t += [Entry(f"{p}embeddings.mask_token", (*emb, "mask_token"))] if c.use_mask_token else []
    if c.use_absolute_position_embeddings:
        t.append(Entry(f"{p}embeddings.position_embeddings", (*emb, "position_embeddings")))
    t += _linear(f"{p}embeddings.patch_embeddings.projection", (*emb, "patch_embeddings", "projection"), "conv")
    for i in range(c.num_layers):
        hf, lx = f"{p}encoder.layer.{i}", (*fx, "encoder", f"layer_{i}")
        for q in "qkv":
            t += _linear(f"{hf}.attention.{q}_proj", (*lx, "attention", f"{q}_proj"), "transpose_split",
                         "split" if c.attention_bias else None)
        if c.use_qk_norm:
            t += _norm(f"{hf}.attention.q_norm", (*lx, "attention", "q_norm"), False)
            t += _norm(f"{hf}.attention.k_norm", (*lx, "attention", "k_norm"), False)
        t += _linear(f"{hf}.attention.projection_layer", (*lx, "attention", "projection_layer"), "transpose_merge")
        t += [Entry(f"{hf}.lambda_{j}", (*lx, f"lambda_{j}")) for j in (1, 2)]
        t += _norm(f"{hf}.layernorm_before", (*lx, "layernorm_before"), ln)
        t += _norm(f"{hf}.layernorm_after", (*lx, "layernorm_after"), ln)
        t += _linear(f"{hf}.mlp.fc1", (*lx, "mlp", "fc1")) + _linear(f"{hf}.mlp.fc2", (*lx, "mlp", "fc2"))
    if not c.use_mean_pooling:
        t += _norm(f"{p}layernorm", (*fx, "layernorm"), True)
    return t


def internvl_table(cfg: InternVLConfig, layout: dict[str, str] = EXPORT_LAYOUT) -> list[Entry]:
    """The full HF <-> Flax table of an InternVL model with the given name prefixes (`detect_layout`)."""
    table = vision_table(cfg.vision, layout["tower"])
    pj, fx = layout["projector"], ("multi_modal_projector",)
    table += _norm(f"{pj}layer_norm", (*fx, "layer_norm"), True)
    table += _linear(f"{pj}linear_1", (*fx, "linear_1")) + _linear(f"{pj}linear_2", (*fx, "linear_2"))
    table += llama_convert.llama_table(cfg.text, hf_prefix=layout["lm"], hf_head=layout["head"],
                                       flax_prefix=("language_model",))
    return table


def param_shapes(model: InternVL):
    """Unboxed `jax.eval_shape` params tree (no memory allocated)."""
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])


def internvl_config(raw: dict, where: str = "config") -> InternVLConfig:
    """InternVLConfig from a config.json dict; CheckpointError naming what is unsupported."""
    if raw.get("model_type") != "internvl":
        raise CheckpointError(f"{where} holds a {raw.get('model_type')!r} model, not 'internvl' "
                              "(InternVLForConditionalGeneration; original InternVL repos with trust_remote_code "
                              "must first go through transformers' convert_internvl_weights_to_hf.py)")
    text_type = raw.get("text_config", {}).get("model_type", "qwen2")
    if text_type not in llama_convert.SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: InternVL with a {text_type!r} language model is not supported; vlm_jax "
                              f"supports {list(llama_convert.SUPPORTED_MODEL_TYPES)}")
    try:
        return InternVLConfig.from_hf(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def from_pretrained(path_or_hub_id, dtype=jnp.float32, param_dtype=None, attention_impl=None,
                    remat: str = "none", mesh=None, rules=None):
    """Loads an HF InternVL checkpoint (local dir or cached hub id) into Flax, streamed.

    Tensors are read one at a time and placed straight into their sharding (`stream.load_table`): the host never
    holds the checkpoint, and with a mesh no device holds more than its slice.

    Args:
      path_or_hub_id: directory with config.json + *.safetensors, or a hub id in the HF cache.
      dtype: compute dtype; param_dtype: dtype of the returned params (defaults to `dtype`).
      attention_impl, remat: see `InternVL`.
      mesh: a `jax.sharding.Mesh`: params are sharded by their logical axis names and `rules`; None: every param
        on the default device.
      rules: logical axis -> mesh axis rules (`mesh.DEFAULT_RULES` when None; config list form accepted).

    Returns:
      (model, params).

    Raises:
      CheckpointError: not found, not InternVL, an unsupported setting, or missing / unexpected / mis-shaped
        tensors (named).
      UserError: a param does not divide evenly over the mesh axes its rules name.
    """
    ckpt = loader.resolve_checkpoint(path_or_hub_id)
    cfg = internvl_config(loader.read_config(ckpt), where=str(ckpt))
    param_dtype = dtype if param_dtype is None else param_dtype
    tensors = stream.open_tensors(ckpt)
    layout = detect_layout(tensors)
    # A tied checkpoint that still carries a *different* lm_head is untied, as transformers does.
    text = llama_convert.drop_tied_head(tensors, cfg.text, hf_prefix=layout["lm"], hf_head=layout["head"])
    cfg = dataclasses.replace(cfg, text=text)
    model = InternVL(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat)
    abstract = stream.abstract_params(model)
    shardings = None if mesh is None else stream.shardings_for(model, mesh, rules, abstract=abstract)
    params = stream.load_table(internvl_table(cfg, layout), tensors, abstract, ignore=IGNORE, shardings=shardings)
    return model, params


def hf_config(model: InternVL):
    """A `transformers.InternVLConfig` equivalent to the module's hyper-parameters."""
    from transformers import InternVLConfig as HFConfig  # lazy: heavy import

    c, v = model.cfg, model.cfg.vision
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, image_size=list(v.image_size), patch_size=list(v.patch_size),
                  num_channels=v.num_channels, hidden_act=v.hidden_act, norm_type=v.norm_type,
                  layer_norm_eps=v.layer_norm_eps, attention_bias=v.attention_bias, use_qk_norm=v.use_qk_norm,
                  use_mean_pooling=v.use_mean_pooling, use_mask_token=v.use_mask_token,
                  use_absolute_position_embeddings=v.use_absolute_position_embeddings)
    return HFConfig(vision_config=vision, text_config=llama_convert.hf_config(c.text).to_dict(),
                    image_token_id=c.image_token_id, image_seq_length=c.tokens_per_tile,
                    downsample_ratio=c.downsample_ratio, projector_hidden_act=c.projector_act,
                    vision_feature_layer=c.vision_feature_layer, vision_feature_select_strategy="default",
                    tie_word_embeddings=c.text.tie_word_embeddings)


def to_hf(model: InternVL, params, out_dir, *, dtype=None, extra_files=None, generation_config=None) -> pathlib.Path:
    """Writes params as an HF `InternVLForConditionalGeneration` checkpoint (transformers 5's names), atomically.

    Args:
      model, params: the model and its params tree (boxed or not).
      out_dir: destination directory.
      dtype: tensor dtype in the file; None keeps the params' dtype.
      extra_files: more files (tokenizer, processor configs, chat template ...).
      generation_config: a dict written as generation_config.json (e.g. the converted InternVL2's eos).
    """
    import json

    tensors = loader.export_table(internvl_table(model.cfg), nn.meta.unbox(params), dtype=dtype)
    config = hf_config(model).to_dict()
    config["architectures"] = ["InternVLForConditionalGeneration"]
    config["dtype"] = config["torch_dtype"] = str(np.dtype(next(iter(tensors.values())).dtype))
    files = dict(extra_files or {})
    if generation_config is not None:
        files["generation_config.json"] = json.dumps(generation_config, indent=2)
    return loader.write_checkpoint(out_dir, tensors, config, files)
