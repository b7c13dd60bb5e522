"""HF `Qwen2VLForConditionalGeneration` <-> `vlm_jax.models.qwen2_vl.Qwen2VL`.

The table is the vision tower's tensors plus the Qwen2 LM's (`convert.llama.llama_table`). Names on disk
depend on who wrote them; each part's prefix is detected:

  part     hub checkpoints (Qwen/Qwen2-VL-*, transformers 4)   transformers 5 save_pretrained   written by `to_hf`
  vision   visual.                                             model.visual.                    visual.
  LM       model. + lm_head                                    model.language_model. + lm_head  model. + lm_head

The export uses the hub's names, which every transformers version reads (5 renames them on load).

Vision tensors (prefix V, block i):

  V.patch_embed.proj.weight [E, C, T, P, P]   -> visual/patch_embed (same layout)
  V.blocks.i.norm{1,2}.{weight,bias}          -> visual/blocks_i/norm{1,2}/{scale,bias}
  V.blocks.i.attn.qkv.{weight,bias} [3E, E]   -> visual/blocks_i/attn/qkv/kernel [E, 3, H, Dh] (+ bias [3, H, Dh])
  V.blocks.i.attn.proj.{weight,bias} [E, E]   -> visual/blocks_i/attn/proj/kernel [H, Dh, E]
  V.blocks.i.mlp.fc{1,2}.{weight,bias}        -> visual/blocks_i/mlp/fc{1,2}
  V.merger.ln_q / merger.mlp.{0,2}            -> visual/merger/ln_q, mlp_0, mlp_2
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
from vlm_jax.convert.loader import CheckpointError, Entry
from vlm_jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig

LAYOUTS = (dict(vision="visual.", lm="model.", head="lm_head"),
           dict(vision="model.visual.", lm="model.language_model.", head="lm_head"))
EXPORT_LAYOUT = LAYOUTS[0]
IGNORE = (r".*rotary_emb\.inv_freq",)


def detect_layout(names) -> dict[str, str]:
    """The name prefixes of a checkpoint's parts: {'vision', 'lm', 'head'} (one of `LAYOUTS`)."""
    names = set(names)
    for layout in LAYOUTS:
        if f"{layout['vision']}patch_embed.proj.weight" in names and f"{layout['lm']}embed_tokens.weight" in names:
            return dict(layout)
    raise CheckpointError("not a Qwen2-VL checkpoint: found no patch embedding + token embedding under any of "
                          f"{[(lay['vision'], lay['lm']) for lay in LAYOUTS]}")


def vision_table(cfg: Qwen2VLConfig, prefix: str = "visual.") -> list[Entry]:
    """Entries of the vision tower (see the module doc)."""
    fx = ("visual",)
    table = [Entry(f"{prefix}patch_embed.proj.weight", (*fx, "patch_embed"))]
    for i in range(cfg.vision.depth):
        hf, blk = f"{prefix}blocks.{i}", (*fx, f"blocks_{i}")
        for norm in ("norm1", "norm2"):
            table += [Entry(f"{hf}.{norm}.weight", (*blk, norm, "scale")),
                      Entry(f"{hf}.{norm}.bias", (*blk, norm, "bias"))]
        table += [Entry(f"{hf}.attn.qkv.weight", (*blk, "attn", "qkv", "kernel"), "transpose_split"),
                  Entry(f"{hf}.attn.qkv.bias", (*blk, "attn", "qkv", "bias"), "split"),
                  Entry(f"{hf}.attn.proj.weight", (*blk, "attn", "proj", "kernel"), "transpose_merge"),
                  Entry(f"{hf}.attn.proj.bias", (*blk, "attn", "proj", "bias"))]
        for fc in ("fc1", "fc2"):
            table += [Entry(f"{hf}.mlp.{fc}.weight", (*blk, "mlp", fc, "kernel"), "transpose"),
                      Entry(f"{hf}.mlp.{fc}.bias", (*blk, "mlp", fc, "bias"))]
    merger = (*fx, "merger")
    table += [Entry(f"{prefix}merger.ln_q.weight", (*merger, "ln_q", "scale")),
              Entry(f"{prefix}merger.ln_q.bias", (*merger, "ln_q", "bias"))]
    for j in (0, 2):
        table += [Entry(f"{prefix}merger.mlp.{j}.weight", (*merger, f"mlp_{j}", "kernel"), "transpose"),
                  Entry(f"{prefix}merger.mlp.{j}.bias", (*merger, f"mlp_{j}", "bias"))]
    return table


def qwen2_vl_table(cfg: Qwen2VLConfig, layout: dict[str, str] = EXPORT_LAYOUT) -> list[Entry]:
    """The full HF <-> Flax table with the given name prefixes (`detect_layout`)."""
    return vision_table(cfg, layout["vision"]) + llama_convert.llama_table(
        cfg.text, hf_prefix=layout["lm"], hf_head=layout["head"], flax_prefix=("language_model",))


def param_shapes(model: Qwen2VL):
    """Unboxed `jax.eval_shape` params tree (no memory allocated)."""
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])


def qwen2_vl_config(raw: dict, where: str = "config") -> Qwen2VLConfig:
    """Qwen2VLConfig from a config.json dict; CheckpointError naming what is unsupported."""
    if raw.get("model_type") != "qwen2_vl":
        raise CheckpointError(f"{where} holds a {raw.get('model_type')!r} model, not 'qwen2_vl' "
                              "(Qwen2VLForConditionalGeneration)")
    try:
        return Qwen2VLConfig.from_hf(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def from_pretrained(path_or_hub_id, dtype=jnp.float32, param_dtype=None, attention_impl=None,
                    remat: str = "none", mesh=None, rules=None):
    """Loads an HF Qwen2-VL checkpoint (local dir or cached hub id) into Flax, streaming (`stream.load_table`).

    Args:
      path_or_hub_id: directory with config.json + *.safetensors, or a hub id in the HF cache.
      dtype: compute dtype; param_dtype: dtype of the returned params, each tensor cast as it is read
        (defaults to `dtype`).
      attention_impl, remat: see `Qwen2VL`.
      mesh: a `jax.sharding.Mesh`: params are sharded by their logical axis names and `rules`. None: every
        param on the default device.
      rules: logical axis -> mesh axis rules (`mesh.DEFAULT_RULES` when None; config list form accepted).

    Returns:
      (model, params).

    Raises:
      CheckpointError: not found, not Qwen2-VL, unsupported settings, or missing / unexpected / mis-shaped
        tensors (named).
      UserError: a param does not divide evenly over the mesh axes its rules name.
    """
    ckpt = loader.resolve_checkpoint(path_or_hub_id)
    cfg = qwen2_vl_config(loader.read_config(ckpt), where=str(ckpt))
    param_dtype = dtype if param_dtype is None else param_dtype
    tensors = stream.open_tensors(ckpt)
    layout = detect_layout(tensors)
    # A tied checkpoint that still carries a *different* lm_head is untied, as transformers does.
    text = llama_convert.drop_tied_head(tensors, cfg.text, hf_prefix=layout["lm"], hf_head=layout["head"])
    cfg = dataclasses.replace(cfg, text=text)
    model = Qwen2VL(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat)
    abstract = stream.abstract_params(model)
    shardings = None if mesh is None else stream.shardings_for(model, mesh, rules, abstract=abstract)
    params = stream.load_table(qwen2_vl_table(cfg, layout), tensors, abstract, ignore=IGNORE, shardings=shardings)
    return model, params


def hf_config(model: Qwen2VL):
    """A `transformers.Qwen2VLConfig` equivalent to the module's hyper-parameters."""
    from transformers import Qwen2VLConfig as HFConfig  # lazy: heavy import

    c, v, t = model.cfg, model.cfg.vision, model.cfg.text
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                hidden_act=t.hidden_act, rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                 "mrope_section": list(t.mrope_section)},
                tie_word_embeddings=t.tie_word_embeddings, bos_token_id=t.bos_token_id, pad_token_id=t.pad_token_id,
                eos_token_id=list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id)
    vision = dict(depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.hidden_size, hidden_act=v.hidden_act,
                  mlp_ratio=v.mlp_ratio, num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                  spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                  rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
    ids = {k: getattr(c, k) for k in ("video_token_id", "vision_start_token_id", "vision_end_token_id")
           if getattr(c, k) is not None}
    return HFConfig(text_config=text, vision_config=vision, image_token_id=c.image_token_id,
                    tie_word_embeddings=t.tie_word_embeddings, **ids)


def to_hf(model: Qwen2VL, params, out_dir, *, dtype=None, extra_files=None) -> pathlib.Path:
    """Writes params as an HF `Qwen2VLForConditionalGeneration` checkpoint (the hub's names), atomically."""
    tensors = loader.export_table(qwen2_vl_table(model.cfg), nn.meta.unbox(params), dtype=dtype)
    config = hf_config(model).to_dict()
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    config["dtype"] = config["torch_dtype"] = str(np.dtype(next(iter(tensors.values())).dtype))
    return loader.write_checkpoint(out_dir, tensors, config, extra_files)
