"""HF `LlamaForCausalLM` / `Qwen2ForCausalLM` <-> `vlm_jax.models.llama.CausalLM`.

The conversion table, loading, export, parameter counting from shapes alone, and a tiny random
offline checkpoint. Scanned models (`scan_layers=True`) are converted through the per-layer
table and then stacked: `layers_{i}/...` leaves become one `layers/...` leaf with a leading
layer axis, so a single table serves both layouts.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import loader, stream
from vlm_jax.convert.loader import CheckpointError, Entry
from vlm_jax.models.llama import CausalLM, DecoderConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Non-persistent buffers that older checkpoints carry.
IGNORE = (r".*rotary_emb\.inv_freq",)


def _layer(hf: str, fx: tuple[str, ...], cfg: DecoderConfig) -> list[Entry]:
    """Entries of one decoder layer, `hf` = 'model.layers.3', `fx` its Flax path."""
    att, t = (*fx, "self_attn"), []
    for p in "qkv":
        t.append(Entry(f"{hf}.self_attn.{p}_proj.weight", (*att, f"{p}_proj", "kernel"), "transpose_split"))
        if cfg.qkv_bias:
            t.append(Entry(f"{hf}.self_attn.{p}_proj.bias", (*att, f"{p}_proj", "bias"), "split"))
    t.append(Entry(f"{hf}.self_attn.o_proj.weight", (*att, "o_proj", "kernel"), "transpose_merge"))
    if cfg.o_bias:
        t.append(Entry(f"{hf}.self_attn.o_proj.bias", (*att, "o_proj", "bias")))
    for p in ("gate_proj", "up_proj", "down_proj"):
        t.append(Entry(f"{hf}.mlp.{p}.weight", (*fx, "mlp", p, "kernel"), "transpose"))
        if cfg.mlp_bias:
            t.append(Entry(f"{hf}.mlp.{p}.bias", (*fx, "mlp", p, "bias")))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        t.append(Entry(f"{hf}.{norm}.weight", (*fx, norm, "scale")))
    return t


def llama_table(cfg: DecoderConfig, *, hf_prefix: str = "model.", hf_head: str = "lm_head",
                flax_prefix: tuple[str, ...] = ()) -> list[Entry]:
    """The HF <-> Flax table of an unscanned `CausalLM`.

    Args:
      cfg: the decoder hyper-parameters (depth, biases, tying).
      hf_prefix: prefix of the base model's tensors ('model.' for *ForCausalLM; a LLaVA
        checkpoint nests it, e.g. 'model.language_model.').
      hf_head: name of the output projection ('lm_head'); no entry when embeddings are tied.
      flax_prefix: path of the CausalLM params inside a larger tree.
    """
    fx = (*flax_prefix, "model")
    table = [Entry(f"{hf_prefix}embed_tokens.weight", (*fx, "embed_tokens", "embedding")),
             Entry(f"{hf_prefix}norm.weight", (*fx, "norm", "scale"))]
    if not cfg.tie_word_embeddings:
        table.append(Entry(f"{hf_head}.weight", (*flax_prefix, "lm_head", "kernel"), "transpose"))
    for i in range(cfg.num_layers):
        table += _layer(f"{hf_prefix}layers.{i}", (*fx, f"layers_{i}"), cfg)
    return table


def table_for(model: CausalLM) -> list[Entry]:
    return llama_table(model.cfg)


def param_shapes(model: CausalLM):
    """Unboxed `jax.eval_shape` params tree of `model` (no memory allocated)."""
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])


def param_count(model: CausalLM) -> int:
    """Number of parameters, from shapes only (a 7B model costs no memory)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(model)))


# ----------------------------------------------------------------------------- scanned layout


def stack_layers(params: dict, num_layers: int) -> dict:
    """Per-layer params {'model': {'layers_{i}': T}} -> scanned {'model': {'layers': T stacked}}."""
    model = dict(params["model"])
    layers = [model.pop(f"layers_{i}") for i in range(num_layers)]
    model["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    return {**params, "model": model}


def unstack_layers(params: dict, num_layers: int) -> dict:
    """The inverse of `stack_layers`."""
    model = dict(params["model"])
    stacked = model.pop("layers")
    for i in range(num_layers):
        model[f"layers_{i}"] = jax.tree.map(lambda x: np.asarray(x)[i], stacked)
    return {**params, "model": model}


# ----------------------------------------------------------------------------- loading


def _hf_config_class(model_type: str):
    import transformers  # lazy: heavy import, only needed to read/write configs

    return {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]


def decoder_config(raw: dict, where: str = "config") -> DecoderConfig:
    """DecoderConfig from a config.json dict; CheckpointError naming unsupported settings."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where} holds a {model_type!r} model; vlm_jax decoder LMs support model_type "
                              f"{list(SUPPORTED_MODEL_TYPES)}")
    try:
        return DecoderConfig.from_hf(_hf_config_class(model_type).from_dict(raw))
    except (ValueError, TypeError, KeyError) as e:  # transformers validates rope keys with KeyError
        raise CheckpointError(f"{where}: {e}") from None


def drop_tied_head(tensors: dict, cfg: DecoderConfig, hf_prefix: str = "model.",
                   hf_head: str = "lm_head") -> DecoderConfig:
    """Reconciles a `{hf_head}.weight` tensor with `cfg.tie_word_embeddings`, as transformers 5 does.

    Tied checkpoints normally have no lm_head tensor. When one is there and equals the input
    embedding, it is dropped from `tensors` (in place; arrays or `stream.LazyTensor`s, compared
    block by block). When it differs, transformers does NOT tie (it keeps both and warns), so
    neither do we: the tensor stays and the returned config has tie_word_embeddings=False.

    Returns:
      The config to build the model with (`cfg` itself unless untied).
    """
    name = f"{hf_head}.weight"
    if not cfg.tie_word_embeddings or name not in tensors:
        return cfg
    head, embed = tensors[name], tensors.get(f"{hf_prefix}embed_tokens.weight")
    if embed is not None and stream.array_equal(embed, head):
        del tensors[name]
        return cfg
    warnings.warn(f"tie_word_embeddings is set but the checkpoint's {name} differs from the input embedding; "
                  f"loading them untied, as transformers does (set tie_word_embeddings=false in config.json "
                  f"to silence this)", stacklevel=3)
    return dataclasses.replace(cfg, tie_word_embeddings=False)




def from_pretrained(path_or_hub_id, dtype=jnp.float32, param_dtype=None, attention_impl=None,
                    remat: str = "none", scan_layers: bool = False, mesh=None, rules=None):
    """Loads an HF Llama / Qwen2 causal LM checkpoint (local dir or cached hub id) into Flax.

    Tensors are read one at a time and placed straight into their sharding (`stream.load_table`):
    the host never holds the checkpoint, and with a mesh no device holds more than its slice.

    Args:
      path_or_hub_id: directory with config.json + *.safetensors, or a hub id in the HF cache.
      dtype: compute dtype of the returned module.
      param_dtype: dtype of the returned params (each tensor is cast as it is read); defaults to `dtype`.
      attention_impl, remat, scan_layers: see `CausalLM`. Scanned params are stacked per device slice.
      mesh: a `jax.sharding.Mesh` (`vlm_jax.runtime.mesh.make_mesh`): params are sharded by their logical
        axis names and `rules`. None: every param on the default device.
      rules: logical axis -> mesh axis rules (`mesh.DEFAULT_RULES` when None; config list form accepted).

    Returns:
      (model, params): a `CausalLM` and its plain (unboxed) params tree of `jax.Array`s.

    Raises:
      CheckpointError: not found, another model_type, unsupported settings (rope type, sliding
        window), or missing / unexpected / mis-shaped tensors (named).
      UserError: a param does not divide evenly over the mesh axes its rules name.
    """
    ckpt = loader.resolve_checkpoint(path_or_hub_id)
    cfg = decoder_config(loader.read_config(ckpt), where=str(ckpt))
    tensors = stream.open_tensors(ckpt)
    cfg = drop_tied_head(tensors, cfg)
    param_dtype = dtype if param_dtype is None else param_dtype
    model = CausalLM(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat,
                     scan_layers=scan_layers)
    # The table is per layer: checked against the unscanned shapes, stacked per leaf if scanned.
    flat_model = model.clone(scan_layers=False)
    flat = stream.abstract_params(flat_model)
    shardings = None if mesh is None else stream.shardings_for(model, mesh, rules,
                                                               abstract=None if scan_layers else flat)
    params = stream.load_table(table_for(flat_model), tensors, flat, ignore=IGNORE, shardings=shardings,
                               stack=[("model",)] if scan_layers else ())
    return model, params


# ----------------------------------------------------------------------------- export


def hf_config(model_or_cfg):
    """A `transformers.LlamaConfig` / `Qwen2Config` equivalent to the module's hyper-parameters."""
    c = model_or_cfg.cfg if isinstance(model_or_cfg, CausalLM) else model_or_cfg
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta, **dict(c.rope_scaling)}
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
              hidden_act=c.hidden_act, rms_norm_eps=c.rms_norm_eps, rope_parameters=rope,
              max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
              bos_token_id=c.bos_token_id, pad_token_id=c.pad_token_id,
              eos_token_id=list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id)
    if c.model_type == "llama":
        if c.qkv_bias != c.o_bias:
            raise ValueError("HF LlamaConfig has one attention_bias for q/k/v and o; this config differs")
        kw.update(head_dim=c.head_dim, attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    elif (c.qkv_bias, c.o_bias, c.mlp_bias) != (True, False, False) or c.head_dim != c.hidden_size // c.num_heads:
        raise ValueError("HF Qwen2Config has q/k/v biases only and head_dim = hidden_size / heads; this config differs")
    return _hf_config_class(c.model_type)(**kw)


def to_hf(model: CausalLM, params, out_dir, *, dtype=None, extra_files=None) -> pathlib.Path:
    """Writes params as an HF checkpoint (config.json + model.safetensors) atomically.

    Args:
      model: the `CausalLM` (scanned or not).
      params: its params tree (boxed or not).
      out_dir: destination; loadable by `transformers.AutoModelForCausalLM.from_pretrained`.
      dtype: tensor dtype in the file; None keeps the params' dtype.
      extra_files: more files for the directory (tokenizer files ...).

    Returns:
      The output directory.
    """
    params = nn.meta.unbox(params)
    if model.scan_layers:
        params = unstack_layers(params, model.cfg.num_layers)
    tensors = loader.export_table(table_for(model), params, dtype=dtype)
    config = hf_config(model).to_dict()
    config["architectures"] = [ARCHITECTURES[model.cfg.model_type]]
    config["dtype"] = config["torch_dtype"] = str(np.dtype(tensors["model.norm.weight"].dtype))
    return loader.write_checkpoint(out_dir, tensors, config, extra_files)


TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def write_random_checkpoint(out_dir, *, model_type: str = "llama", seed: int = 0, dtype=jnp.float32,
                            extra_files=None, **overrides) -> pathlib.Path:
    """Writes a tiny random decoder LM (no tokenizer) as an offline HF checkpoint directory.

    Args:
      out_dir: destination directory.
      model_type: 'llama' or 'qwen2'.
      seed: PRNG seed; norms and biases are randomised too, so the model is not degenerate.
      dtype: parameter dtype stored in the file.
      extra_files: more files (e.g. a tokenizer).
      **overrides: HF config fields over TINY.
    """
    cfg = DecoderConfig.from_hf(_hf_config_class(model_type)(**{**TINY, **overrides}))
    model = CausalLM(cfg, param_dtype=dtype)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), *model.init_inputs())["params"])
    # numpy noise: jax.random per leaf would compile one small program per parameter shape.
    noise = np.random.default_rng(seed + 1)
    params = jax.tree.map(lambda x: (np.asarray(x, np.float32) + 0.05 * noise.standard_normal(x.shape)).astype(
        x.dtype), params)
    return to_hf(model, params, out_dir, extra_files=extra_files)
