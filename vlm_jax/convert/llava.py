"""HF `LlavaForConditionalGeneration` <-> `vlm_jax.models.llava.Llava`.

The table is assembled from the families' own tables (CLIP or SigLIP tower, Llama/Qwen2 LM) plus the
projector's four tensors. The tensor names on disk vary with the transformers version that wrote them,
so each part's prefix is detected from the names:

  part        prefixes seen                                               written by `to_hf`
  tower       vision_tower.vision_model. (hub llava-hf, transformers 4),  vision_tower.vision_model.
              vision_tower. (transformers 5 save_pretrained),
              model.vision_tower[.vision_model]. (in-memory names)
  projector   multi_modal_projector., model.multi_modal_projector.        multi_modal_projector.
  LM          language_model.model. + language_model.lm_head,            language_model.model. +
              model.language_model. + lm_head                             language_model.lm_head

The export uses the hub's names, which every transformers version reads.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import clip as clip_convert
from vlm_jax.convert import llama as llama_convert
from vlm_jax.convert import loader, stream
from vlm_jax.convert import siglip as siglip_convert
from vlm_jax.convert.loader import CheckpointError, Entry
from vlm_jax.models.llava import Llava, LlavaConfig

TOWER_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                  "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
LM_PREFIXES = (("language_model.model.", "language_model.lm_head"), ("model.language_model.", "lm_head"))
EXPORT_LAYOUT = dict(tower="vision_tower.vision_model.", projector="multi_modal_projector.",
                     lm="language_model.model.", head="language_model.lm_head")
IGNORE = (r".*\.position_ids",)


def detect_layout(names) -> dict[str, str]:
    """The name prefix of each part in a checkpoint: {'tower', 'projector', 'lm', 'head'}."""
    names = set(names)

    def find(candidates, probe, what):
        for prefix in candidates:
            if any(n.startswith(prefix + probe) for n in names):
                return prefix
        raise CheckpointError(f"not a LLaVA checkpoint: found no {what} tensors under any of {list(candidates)}")

    tower = find(TOWER_PREFIXES, "embeddings.patch_embedding.", "vision tower")
    projector = find(PROJECTOR_PREFIXES, "linear_1.", "projector")
    lm = find([p for p, _ in LM_PREFIXES], "embed_tokens.", "language model")
    return dict(tower=tower, projector=projector, lm=lm, head=dict(LM_PREFIXES)[lm])


def llava_table(cfg: LlavaConfig, layout: dict[str, str] = EXPORT_LAYOUT) -> list[Entry]:
    """The full HF <-> Flax table of a LLaVA model with the given name prefixes (`detect_layout`)."""
    p = layout
    if cfg.vision_type == "clip":
        table = clip_convert.clip_vision_table(cfg.vision.num_layers, hf=p["tower"].rstrip("."), fx=("vision_tower",))
    else:
        table = siglip_convert.siglip_table(cfg.vision.num_layers, use_head=False, prefix=p["tower"],
                                            flax_prefix=("vision_tower",))
    for name in ("linear_1", "linear_2"):
        table.append(Entry(f"{p['projector']}{name}.weight", ("multi_modal_projector", name, "kernel"), "transpose"))
        if cfg.projector_bias:
            table.append(Entry(f"{p['projector']}{name}.bias", ("multi_modal_projector", name, "bias")))
    table += llama_convert.llama_table(cfg.text, hf_prefix=p["lm"], hf_head=p["head"], flax_prefix=("language_model",))
    return table


def param_shapes(model: Llava):
    """Unboxed `jax.eval_shape` params tree (no memory allocated)."""
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])


def llava_config(raw: dict, where: str = "config") -> LlavaConfig:
    """LlavaConfig from a config.json dict; CheckpointError naming what is unsupported."""
    if raw.get("model_type") != "llava":
        raise CheckpointError(f"{where} holds a {raw.get('model_type')!r} model, not 'llava' "
                              "(LlavaForConditionalGeneration)")
    text_type = raw.get("text_config", {}).get("model_type", "llama")
    if text_type not in llama_convert.SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: LLaVA with a {text_type!r} language model is not supported; vlm_jax "
                              f"supports {list(llama_convert.SUPPORTED_MODEL_TYPES)}")
    try:
        return LlavaConfig.from_hf(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def from_pretrained(path_or_hub_id, dtype=jnp.float32, param_dtype=None, attention_impl=None,
                    remat: str = "none", mesh=None, rules=None):
    """Loads an HF LLaVA checkpoint (local dir or cached hub id) into Flax.

    Tensors are read one at a time and placed straight into their sharding (`stream.load_table`):
    the host never holds the checkpoint, and with a mesh no device holds more than its slice.

    Args:
      path_or_hub_id: directory with config.json + *.safetensors, or a hub id in the HF cache.
      dtype: compute dtype; param_dtype: dtype of the returned params, each tensor cast as it is read
        (defaults to `dtype`).
      attention_impl, remat: see `Llava`.
      mesh: a `jax.sharding.Mesh` (`vlm_jax.train.mesh.make_mesh`): params are sharded by their logical
        axis names and `rules`. None: every param on the default device.
      rules: logical axis -> mesh axis rules (`mesh.DEFAULT_RULES` when None; config list form accepted).

    Returns:
      (model, params).

    Raises:
      CheckpointError: not found, not LLaVA, an unsupported tower or LM, or missing / unexpected /
        mis-shaped tensors (named).
      UserError: a param does not divide evenly over the mesh axes its rules name.
    """
    ckpt = loader.resolve_checkpoint(path_or_hub_id)
    cfg = llava_config(loader.read_config(ckpt), where=str(ckpt))
    param_dtype = dtype if param_dtype is None else param_dtype
    tensors = stream.open_tensors(ckpt)
    layout = detect_layout(tensors)
    # A tied checkpoint that still carries a *different* lm_head is untied, as transformers does.
    text = llama_convert.drop_tied_head(tensors, cfg.text, hf_prefix=layout["lm"], hf_head=layout["head"])
    cfg = dataclasses.replace(cfg, text=text)
    model = Llava(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat)
    ignore = list(IGNORE)
    if cfg.vision_type == "siglip":
        # LLaVA never runs SigLIP's pooling head; checkpoints that carry it load without it.
        ignore.append(siglip_convert.head_pattern(layout["tower"]))
    abstract = stream.abstract_params(model)
    shardings = None if mesh is None else stream.shardings_for(model, mesh, rules, abstract=abstract)
    params = stream.load_table(llava_table(cfg, layout), tensors, abstract, ignore=ignore, shardings=shardings)
    return model, params


def hf_config(model: Llava):
    """A `transformers.LlavaConfig` equivalent to the module's hyper-parameters."""
    from transformers import CLIPVisionConfig, LlavaConfig as HFConfig  # lazy: heavy import

    c = model.cfg
    if c.vision_type == "clip":
        v = c.vision
        vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                  hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, image_size=v.image_size,
                                  patch_size=v.patch_size, num_channels=v.num_channels)
    else:
        vision = siglip_convert.hf_config(c.vision)
    text = llama_convert.hf_config(c.text)
    layer = c.vision_feature_layer if isinstance(c.vision_feature_layer, int) else list(c.vision_feature_layer)
    return HFConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=c.image_token_id,
                    vision_feature_layer=layer, vision_feature_select_strategy=c.select_strategy,
                    projector_hidden_act=c.projector_act, multimodal_projector_bias=c.projector_bias,
                    tie_word_embeddings=c.text.tie_word_embeddings)


def to_hf(model: Llava, params, out_dir, *, dtype=None, extra_files=None) -> pathlib.Path:
    """Writes params as an HF `LlavaForConditionalGeneration` checkpoint (the hub's names), atomically."""
    tensors = loader.export_table(llava_table(model.cfg), nn.meta.unbox(params), dtype=dtype)
    config = hf_config(model).to_dict()
    config["architectures"] = ["LlavaForConditionalGeneration"]
    config["dtype"] = config["torch_dtype"] = str(np.dtype(next(iter(tensors.values())).dtype))
    return loader.write_checkpoint(out_dir, tensors, config, extra_files)


REPLICA_PREFIX = "replica:"


def resolve_checkpoint(spec: str, cache_root: str, texts, config_file: str) -> str:
    """A LLaVA checkpoint directory for `spec`: a local dir, a hub id in the HF cache, or an offline replica
    'replica:<name>[?qk_std=<float>]' (`vlm_jax.testing.replicas`: 'replica:llava-1.5',
    'replica:llava-interleave-qwen'; `qk_std`: the std of its LM's q_proj / k_proj kernels, see that module).

    A replica's tokenizer is trained on `texts` (the run's prompts and captions), so its folder is keyed by them
    (and by its options): a run with other texts never picks up a tokenizer that splits them differently. A
    missing checkpoint is one UserError line that also points at `config_file`'s offline `:runlocal` default.
    """
    from vlm_jax.errors import UserError

    if spec.startswith(REPLICA_PREFIX):
        from vlm_jax.testing import replicas

        name, options = parse_replica_spec(spec)
        path = pathlib.Path(cache_root) / f"replica-{name}-{texts_key(texts, options)}"
        if not (path / "config.json").exists():
            try:
                replicas.write_replica(name, path, texts, **options)
            except FileExistsError:  # another run wrote it first (the write is atomic): use theirs
                pass
        return str(path)
    if spec == "builtin:tiny-llava":
        raise UserError("model.checkpoint='builtin:tiny-llava' was replaced by the offline replicas of the real "
                        "checkpoints: use 'replica:llava-1.5' or 'replica:llava-interleave-qwen'")
    try:
        return str(loader.resolve_checkpoint(spec))
    except UserError as e:
        raise UserError(f"{e} (or try the offline default: --config={config_file}:runlocal)") from None


def parse_replica_spec(spec: str) -> tuple[str, dict[str, float]]:
    """'replica:<name>[?qk_std=<float>]' -> (name, {'qk_std': float} or {}); anything else is a UserError."""
    from vlm_jax.errors import UserError
    from vlm_jax.testing import replicas

    name, _, query = spec[len(REPLICA_PREFIX):].partition("?")
    if name not in replicas.REPLICAS:
        raise UserError(f"unknown replica {spec!r}; known: "
                        f"{', '.join(REPLICA_PREFIX + n for n in replicas.REPLICAS)}")
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key != "qk_std" or not eq:
            raise UserError(f"replica option {item!r} in {spec!r} is not known: the only one is qk_std=<float>")
        try:
            std = float(value)
        except ValueError:
            std = math.nan
        if not (math.isfinite(std) and std > 0):
            raise UserError(f"replica option {item!r} in {spec!r}: qk_std must be a finite number > 0")
        options[key] = std
    return name, options


def texts_key(texts, options=None) -> str:
    """A short stable key of a replica's tokenizer corpus and options (for cache folder names)."""
    import hashlib

    # The salt changes whenever the replicas' structure or weights do, so a stale cached one is never reused.
    extra = [f"{k}={v!r}" for k, v in sorted((options or {}).items())]
    return hashlib.sha256("\x00".join(["replica-v1", *texts, *extra]).encode()).hexdigest()[:12]
