"""The per-program memory plans of `vlm-jax plan` (programs/plan.py): vladva and vitask on every LVLM family of
`convert.auto` (llava, internvl, qwen2_vl), fewshot_clip on every dual encoder (HF CLIP / SigLIP, open_clip).

Sequence lengths come from the checkpoint's config and the run's config, as the programs' inputs make them
(`data.lvlm_inputs`):

  family    tokens one image takes in the LM                        vision tower's sequence per image
  llava     cfg.tokens_per_image                                     (image / patch)^2 (+ CLIP's class token)
  internvl  <img> + cfg.tokens_per_tile + </img> (one tile, pixel    (448 / patch)^2 + the class token
            shuffle k x k -> 1)
  qwen2_vl  (side / patch)^2 / merge^2, side = model.image_size or   (side / patch)^2
            lvlm_inputs.QWEN2_VL_IMAGE_SIZE

Activations are an analytic estimate of what the backward pass keeps per layer (`layer_elements`), summed over
the layers a loss backpropagates through; a forward-only pass keeps one layer's at a time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.programs import plan_core as core


@dataclasses.dataclass(frozen=True)
class Tower:
    """One LVLM family's image facts for the estimate.

    Attributes:
      image_tokens: LM positions one image takes (its whole image-token run, start / end markers included).
      patches: the vision tower's sequence length per image.
      width, mlp, heads, layers: the vision tower's dims.
    """

    image_tokens: int
    patches: int
    width: int
    mlp: int
    heads: int
    layers: int


def tower(family: str, cfg, image_size: int) -> Tower:
    """The `Tower` of a family config (`convert.auto.lvlm_config`) at the run's `model.image_size` (0: default)."""
    from vlm_jax.data import lvlm_inputs

    v = cfg.vision
    if family == "llava":
        patches = (v.image_size // v.patch_size) ** 2 + int(cfg.vision_type == "clip")
        return Tower(cfg.tokens_per_image, patches, v.hidden_size, v.intermediate_size, v.num_heads, v.num_layers)
    if family == "internvl":  # one tile per image; <img> and </img> around its context tokens
        return Tower(cfg.tokens_per_tile + 2, math.prod(v.grid) + 1, v.hidden_size, v.intermediate_size,
                     v.num_heads, v.num_layers)
    side = int(image_size) or lvlm_inputs.QWEN2_VL_IMAGE_SIZE
    g = side // v.patch_size
    return Tower(cfg.tokens_per_image((1, g, g)), g * g, v.embed_dim, v.embed_dim * v.mlp_ratio, v.num_heads,
                 v.depth)


def abstract_lvlm(ckpt: str, mc) -> tuple[str, Any, Any, Any]:
    """(family, family config, Flax model, boxed eval_shape params) of an LVLM checkpoint, from config.json only,
    built as `convert.auto.from_pretrained` builds it (model.dtype, model.param_dtype)."""
    from vlm_jax.convert import auto, stream
    from vlm_jax.models.internvl import InternVL
    from vlm_jax.models.llava import Llava
    from vlm_jax.models.qwen2_vl import Qwen2VL

    family = auto.model_type(ckpt)
    cfg = auto.lvlm_config(ckpt)
    cls = {"llava": Llava, "internvl": InternVL, "qwen2_vl": Qwen2VL}[family]
    model = cls(cfg, dtype=jnp.dtype(mc.dtype), param_dtype=jnp.dtype(mc.get("param_dtype") or mc.dtype))
    return family, cfg, model, stream.abstract_params(model)


def lm_elements(text, lengths, tensor: int) -> int:
    """Elements the LM keeps for backward over rows of the given lengths (one row each), all layers."""
    kv = text.num_kv_heads * text.head_dim
    return text.num_layers * sum(core.layer_elements(n, text.hidden_size, text.intermediate_size, text.num_heads,
                                                     kv, tensor) for n in lengths)


def tower_elements(tw: Tower, tensor: int, backward: bool = True) -> int:
    """Elements the vision tower keeps per image: every layer's for backward, one layer's for a forward pass."""
    one = core.layer_elements(tw.patches, tw.width, tw.mlp, tw.heads, tw.width, tensor)
    return one * (tw.layers if backward else 1)


def rows_per_device(batch_size: int, mesh_shape: Mapping[str, int], chunks: int = 1) -> tuple[int, int]:
    """(rows one device runs at a time, data-parallel devices)."""
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    return max(1, math.ceil(batch_size / dp / max(1, chunks))), dp


def trained_rows(tree, groups, shards, optim: Mapping[str, Any], what: str) -> dict[str, int]:
    """The trainable / optimizer / gradient rows of a params tree whose leaves `groups` select (see
    `plan_core.trainable_elements`); UserError when nothing trains."""
    from vlm_jax.train import trainer

    n = core.trainable_elements(tree, trainer.param_labels(tree, groups), shards)
    if not n:
        raise UserError(f"{what} {list(map(tuple, groups))} select no parameter: nothing trains")
    name = optim.get("name", "adamw")  # the trainer's default (trainer.make_optimizer)
    return {"trainable (f32)": 4 * n, f"optimizer ({name})": 4 * n * core.optimizer_moments(name, optim.get(
        "momentum")), "gradients (f32)": 4 * n}


# ----------------------------------------------------------------------------------------------------------
# vladva.

def vladva(config, ckpt: str, mesh_shape: Mapping[str, int]) -> core.Plan:
    """The plan of a vladva run (soft prompts + LoRA on a frozen LVLM, InfoNCE + NTP)."""
    import flax.linen as nn

    mc, tc, me, dc = config.model, config.train, config.method, config.data
    family, cfg, _, abstract = abstract_lvlm(ckpt or _vladva_checkpoint(config), mc)
    shards = core.shard_sizes(abstract, mesh_shape, config.get("mesh_rules"))
    rows = {"base params": sum(n * size for n, size in shards.values())}
    # Soft prompts: a prompt has at most one token per character (ASCII prompts; SentencePiece/BPE pieces are >= 1).
    prompt_tokens = max(len(me.image_prompt), len(me.text_prompt))
    prompt = jax.ShapeDtypeStruct((prompt_tokens, cfg.text.hidden_size), jnp.float32)
    base = nn.meta.unbox(abstract)
    tree = {"base": base, "lora": core.lora_shapes(base, me.lora_targets, me.lora_rank), "image_prompt": prompt,
            "text_prompt": prompt}
    if me.learn_temperature:
        tree["log_temperature"] = jax.ShapeDtypeStruct((), jnp.float32)
    rows.update(trained_rows(tree, [tuple(g) for g in tc.param_groups], shards, tc.optim, "train.param_groups"))
    tw = tower(family, cfg, mc.get("image_size", 0))
    b, dp = rows_per_device(tc.batch_size, mesh_shape, tc.grad_cache_chunks)
    image_len = tw.image_tokens + prompt_tokens
    long_len = dc.long_len or image_len + dc.long_caption_max_tokens
    t = mesh_shape["tensor"]
    # The image row and the long row each run the vision tower; NTP keeps the long rows' f32 logits + softmax grad.
    acts = ((lm_elements(cfg.text, (image_len, dc.text_len, long_len), t) + 2 * tower_elements(tw, t))
            * jnp.dtype(mc.dtype).itemsize + 2 * 4 * long_len * cfg.text.vocab_size // t)
    rows["activations (est.)"] = b * acts
    chunks = f", grad_cache_chunks {tc.grad_cache_chunks}" if tc.grad_cache_chunks > 1 else ""
    notes = [f"{family}: {tw.image_tokens} LM tokens and {tw.patches} vision-tower positions per image",
             f"activations for {b} rows per device (batch {tc.batch_size} over {dp} data-parallel devices{chunks}) "
             f"of {image_len} image+prompt, {dc.text_len} text and {long_len} long tokens",
             f"soft prompts counted at <= {prompt_tokens} tokens each (one per character); attention "
             f"probabilities counted as the dense attention keeps them"]
    return core.Plan(rows=rows, mesh=dict(mesh_shape), notes=notes)


def _vladva_checkpoint(config) -> str:
    """An offline replica resolved as the run resolves it (its tokenizer, hence its vocabulary, trained on the run's
    texts); any other checkpoint needs its config.json only."""
    from vlm_jax.programs import vladva as program
    from vlm_jax.testing import replicas

    if replicas.is_offline_spec(config.model.checkpoint):
        return program.resolve_checkpoints(config, program.train_data(config))[0]
    return core.checkpoint_config_dir(config.model.checkpoint)


# ----------------------------------------------------------------------------------------------------------
# vitask.

def tsm_abstract(tsm_ckpt: str, num_classes: int):
    """(TSM model, its eval_shape params) from the TSM checkpoint's config.json (HF ViT or CLIP's vision tower)."""
    import flax.linen as nn

    from vlm_jax.convert import loader
    from vlm_jax.methods import tsm as tsm_lib
    from vlm_jax.models import vit
    from vlm_jax.programs import vitask as vitask_program

    raw = loader.read_config(tsm_ckpt)
    if vitask_program.tsm_tower_type(tsm_ckpt) == "vit":
        vision = vit.ViTConfig.from_hf(raw, pooler=False, num_labels=0)
    else:
        from transformers import CLIPConfig

        from vlm_jax.models.clip import CLIP

        vision = CLIP.from_hf_config(CLIPConfig.from_dict(raw)).vision
    model = tsm_lib.TSMClassifier(vision, num_classes)
    return model, nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])


def _tsm_stage(config, model, params, mesh_shape) -> tuple[dict[str, int], str]:
    """The TSM stage's rows: every param trains (float32, replicated), the tower backpropagated."""
    sc, v = config.tsm, model.vision
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    name = sc.optim.get("name", "adamw")
    b, _ = rows_per_device(sc.batch_size, mesh_shape, sc.get("accum_steps", 1))
    patches = (v.image_size // v.patch_size) ** 2 + 1   # ViT and CLIP towers: a class token
    tw = Tower(0, patches, v.hidden_size, v.intermediate_size, v.num_heads, v.num_layers)
    rows = {"trainable (f32)": 4 * n, f"optimizer ({name})": 4 * n * core.optimizer_moments(name, sc.optim.get(
        "momentum")), "gradients (f32)": 4 * n, "activations (est.)": b * tower_elements(tw, 1) * 4}
    return rows, f"TSM stage: {n} trainable elements, {b} images of {patches} positions per device"


def vitask(config, ckpt: str, mesh_shape: Mapping[str, int]) -> core.Plan:
    """The plan of a vitask run: its peak stage among the TSM's and the LVLM's (vanilla, stage 1, stage 2)."""
    import flax.linen as nn

    from vlm_jax.methods import vitask as vitask_lib
    from vlm_jax.programs import vitask as vitask_program

    mc, tc = config.method, config.train
    inp = vitask_program.check_inputs(config)   # the data, tokenizer and prompts (no weights)
    tsm_model, tsm_params = tsm_abstract(inp.clip_dir, inp.task.num_classes)
    stages = {"tsm": _tsm_stage(config, tsm_model, tsm_params, mesh_shape)}
    family, cfg, _, abstract = abstract_lvlm(ckpt or inp.ckpt, config.model)
    shards = core.shard_sizes(abstract, mesh_shape, config.get("mesh_rules"))
    base = nn.meta.unbox(abstract)
    lora = core.lora_shapes(base, mc.lora_targets, mc.lora_rank)
    dt = tsm_model.vision.hidden_size
    connector = vitask_lib.ExemplarConnector(out_dim=cfg.text.hidden_size, hidden_dim=mc.connector_hidden or None)
    conn = nn.meta.unbox(jax.eval_shape(connector.init, jax.random.key(0), jnp.zeros((1, dt)))["params"])
    tw, t, length = tower(family, cfg, config.model.get("image_size", 0)), mesh_shape["tensor"], inp.seqs.length
    b, _ = rows_per_device(tc.batch_size, mesh_shape, tc.get("accum_steps", 1))
    itemsize = jnp.dtype(config.model.dtype).itemsize
    # LM passes per stage: vanilla the plain one; stage 1 + the exemplar pass (one more token); stage 2 + the
    # negative image's pass. Each pass runs the tower and keeps f32 logits + their softmax gradient.
    passes = {"vanilla": (length,), "stage 1": (length, length + 1), "stage 2": (length, length + 1, length)}
    groups = {"vanilla": [("lora/.*", 1.0)], "stage 1": [("lora/.*", 1.0), ("connector/.*", 1.0)],
              "stage 2": [("lora/.*", 1.0)]}
    for name, lens in passes.items():
        tree = {"base": base, "lora": lora, **({"connector": conn} if name != "vanilla" else {})}
        rows = {"base params": sum(n * size for n, size in shards.values())}
        rows.update(trained_rows(tree, groups[name], shards, tc.optim, "vitask param groups"))
        acts = ((lm_elements(cfg.text, lens, t) + len(lens) * tower_elements(tw, t)) * itemsize
                + sum(2 * 4 * n * cfg.text.vocab_size // t for n in lens) + 4 * dt)
        rows["activations (est.)"] = b * acts
        stages[name] = rows, f"{name}: {b} rows of {length} tokens per device, {len(lens)} LM pass(es)"
    peak = max(stages, key=lambda k: sum(stages[k][0].values()))
    notes = [f"peak stage: {peak} ({stages[peak][1]})", f"{family}: {tw.image_tokens} LM tokens and {tw.patches} "
             f"vision-tower positions per image"]
    notes += [f"{k}: {core.gib(sum(r.values()))} in all" for k, (r, _) in stages.items()]
    return core.Plan(rows=stages[peak][0], mesh=dict(mesh_shape), notes=notes)


# ----------------------------------------------------------------------------------------------------------
# fewshot_clip.

def abstract_dual_encoder(ckpt: str, dtype) -> tuple[Any, Any, int]:
    """(model, boxed eval_shape params, image side) of a dual encoder checkpoint, built as its loader builds it."""
    from vlm_jax.convert import dual_encoder, loader, stream
    from vlm_jax.convert import open_clip as open_clip_convert

    family, dtype = dual_encoder.detect_family(ckpt), jnp.dtype(dtype)
    if family == "open_clip":
        from vlm_jax.models.open_clip import OpenCLIP

        cfg = open_clip_convert.config_from_dict(open_clip_convert.read_config(ckpt)["model_cfg"])
        model, side = OpenCLIP(cfg, dtype=dtype, param_dtype=dtype), cfg.vision.image_size
    elif family == "clip":
        from transformers import CLIPConfig

        from vlm_jax.models.clip import CLIP

        raw = loader.read_config(ckpt)
        model, side = CLIP.from_hf_config(CLIPConfig.from_dict(raw), dtype=dtype, param_dtype=dtype), None
    else:
        from transformers import SiglipConfig

        from vlm_jax.models.siglip import SiglipModel

        raw = loader.read_config(ckpt)
        model, side = SiglipModel.from_hf_config(SiglipConfig.from_dict(raw), dtype=dtype, param_dtype=dtype), None
    side = side or raw["vision_config"].get("image_size", 224)
    return model, stream.abstract_params(model), int(side)


def fewshot_trainables(methods, num_classes: int, shots: int, dim: int, config) -> dict[str, dict[str, int]]:
    """method -> {'trainable', 'optimizer', 'data'} elements of the configured methods that train, from the shapes
    their init functions make: Tip-Adapter-F the cache keys f32[C K, D], DualAdapter-F five residuals f32[C, D]
    (both through the trainer, `optimizer` its moments); ZS-LP / CLAP the prototypes f32[C, D] by SGD with
    momentum (one trace) on `views` x C K augmented features f32[., D] held on the device (`data`)."""
    from vlm_jax.methods import dualadapter, tip_adapter

    def count(tree):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

    def moments(block):
        return core.optimizer_moments(block.optim.get("name", "adamw"), block.optim.get("momentum"))

    out = {}
    if "tip_adapter_f" in methods:
        keys = jax.ShapeDtypeStruct((num_classes * shots, dim), jnp.float32)
        n = count(jax.eval_shape(tip_adapter.finetune_init, keys))
        out["tip_adapter_f"] = {"trainable": n, "optimizer": n * moments(config.tip_adapter.train), "data": 0}
    if "dualadapter_f" in methods:
        n = count(jax.eval_shape(lambda: dualadapter.init_residuals(num_classes, dim)))
        out["dualadapter_f"] = {"trainable": n, "optimizer": n * moments(config.dualadapter.train), "data": 0}
    for m in ("linear_probe", "clap"):
        if m in methods:
            n = num_classes * dim
            out[m] = {"trainable": n, "optimizer": n * int(bool(config[m].momentum)),
                      "data": int(config[m].views) * num_classes * shots * (dim + 1)}
    return out


def image_tower_layer(ckpt: str) -> tuple[int, int, int, int] | None:
    """(positions, width, mlp, heads) of a dual encoder's ViT image tower; None for a ResNet tower."""
    from vlm_jax.convert import dual_encoder, loader
    from vlm_jax.convert import open_clip as open_clip_convert

    if dual_encoder.detect_family(ckpt) == "open_clip":
        v = open_clip_convert.config_from_dict(open_clip_convert.read_config(ckpt)["model_cfg"]).vision
        if not hasattr(v, "patch_size"):
            return None
        return (v.image_size // v.patch_size) ** 2 + 1, v.width, int(v.width * v.mlp_ratio), v.heads
    v = loader.read_config(ckpt)["vision_config"]
    side, patch = v.get("image_size", 224), v.get("patch_size", 16)
    cls = int(loader.read_config(ckpt).get("model_type") == "clip")
    return (side // patch) ** 2 + cls, v["hidden_size"], v["intermediate_size"], v["num_attention_heads"]


def fewshot_clip(config, ckpt: str, mesh_shape: Mapping[str, int]) -> core.Plan:
    """The plan of a fewshot_clip run: the frozen dual encoder plus the largest trainable set among the configured
    methods and its optimizer state; activations of the forward-only image tower (feature extraction, and the
    fine-tuning steps, which run the frozen CLIP under stop_gradient)."""
    from vlm_jax.methods import fewshot_registry
    from vlm_jax.programs import fewshot_clip as program

    methods, runs = program.check_values(config)
    faces = fewshot_registry.check(config, methods)
    num_classes = len(program.load_data(config.data).classnames)
    ckpt = ckpt or core.checkpoint_config_dir(config.model.checkpoint)
    model, abstract, side = abstract_dual_encoder(ckpt, config.model.dtype)
    dim = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=model.encode_image),
                         _unboxed(abstract), jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)).shape[-1]
    shots = max(s for s, _ in runs)
    shards = core.shard_sizes(abstract, mesh_shape, config.get("mesh_rules"))
    rows = {"base params": sum(n * size for n, size in shards.values())}
    sets = fewshot_trainables([f.name for f in faces], num_classes, shots, dim, config)
    notes = [f"{num_classes} classes, {shots} shots, embedding width {dim}"]
    if sets:
        top = max(sets, key=lambda m: sum(sets[m].values()))
        s = sets[top]
        rows.update({"trainable (f32)": 4 * s["trainable"], "optimizer": 4 * s["optimizer"],
                     "gradients (f32)": 4 * s["trainable"], "method data (f32)": 4 * s["data"]})
        notes.append(f"largest trainable set: {top} ({s['trainable']} elements); "
                     + ", ".join(f"{m} {v['trainable']}" for m, v in sets.items()))
    else:
        notes.append(f"no configured method trains ({', '.join(methods)})")
    layer = image_tower_layer(ckpt)
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    batch = max([config.data.eval_batch_size] + [config[m].train.batch_size for m in ("tip_adapter", "dualadapter")
                                                  if m in config and m + "_f" in methods])
    b = max(1, math.ceil(batch / dp))
    if layer is None:
        notes.append("ResNet image tower: its activations are not estimated")
    else:
        n, w, f, h = layer
        # Forward only: XLA frees each layer's activations once the next is computed; images f32[b, side, side, 3].
        rows["activations (est.)"] = b * (core.layer_elements(n, w, f, h, w, mesh_shape["tensor"])
                                          * jnp.dtype(config.model.dtype).itemsize + 4 * side * side * 3)
        notes.append(f"activations: one image-tower layer (forward only) for {b} images per device")
    return core.Plan(rows=rows, mesh=dict(mesh_shape), notes=notes)


def _unboxed(abstract):
    import flax.linen as nn

    return nn.meta.unbox(abstract)
