"""open_clip checkpoints <-> `vlm_jax.models.open_clip.OpenCLIP`: table, loading, export.

The format is the open_clip hub layout: a directory with

  open_clip_config.json         {"model_cfg": {...}, "preprocess_cfg": {...}} (model_cfg as open_clip's
                                model_configs/*.json; preprocess_cfg: mean, std, interpolation, resize_mode)
  open_clip_model.safetensors   open_clip's state dict (visual.*, transformer.*, token_embedding.weight, ...)

`open_clip_pytorch_model.bin` (a torch pickle) is refused with a hint to convert it: weights are read from
safetensors only, never unpickled. The text is tokenised by CLIP's BPE (`vlm_jax.data.tokenize.OpenCLIPTokenizer`,
ids equal to open_clip's SimpleTokenizer): from vocab.json + merges.txt in the directory when it has them, else
from the vocabulary file that ships inside the open-clip-torch package.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np

from vlm_jax.convert import loader, stream
from vlm_jax.convert.loader import CheckpointError, Entry
from vlm_jax.models.open_clip import OpenCLIP, OpenCLIPConfig, ResNetConfig, config_from_dict, config_to_dict

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
TORCH_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
# BatchNorm's step counter and the causal mask buffer that older exports saved: not parameters.
IGNORE = (r".*num_batches_tracked", r"attn_mask", r"visual\.attn_mask")


def is_open_clip_dir(path) -> bool:
    return (pathlib.Path(path) / CONFIG_NAME).is_file()


def _norm(hf, fx):
    return [Entry(f"{hf}.weight", (*fx, "scale")), Entry(f"{hf}.bias", (*fx, "bias"))]


def _dense(hf, fx, kind="transpose"):
    return [Entry(f"{hf}.weight", (*fx, "kernel"), kind), Entry(f"{hf}.bias", (*fx, "bias"))]


def _bn(hf, fx):
    return [Entry(f"{hf}.{a}", (*fx, b)) for a, b in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                                                      ("running_var", "var"))]


def _resblock(hf, fx):
    return [*_norm(f"{hf}.ln_1", (*fx, "ln_1")),
            Entry(f"{hf}.attn.in_proj_weight", (*fx, "attn_in_proj", "kernel"), "transpose_split"),
            Entry(f"{hf}.attn.in_proj_bias", (*fx, "attn_in_proj", "bias"), "split"),
            *_dense(f"{hf}.attn.out_proj", (*fx, "attn_out_proj"), "transpose_merge"),
            *_norm(f"{hf}.ln_2", (*fx, "ln_2")),
            *_dense(f"{hf}.mlp.c_fc", (*fx, "mlp_c_fc")), *_dense(f"{hf}.mlp.c_proj", (*fx, "mlp_c_proj"))]


def _transformer(hf, fx, layers):
    return [e for i in range(layers) for e in _resblock(f"{hf}.resblocks.{i}", (*fx, f"resblocks_{i}"))]


def _resnet(c: ResNetConfig) -> list[Entry]:
    v = ("visual",)
    t = []
    for i in (1, 2, 3):
        t += [Entry(f"visual.conv{i}.weight", (*v, f"conv{i}", "kernel"), "conv"),
              *_bn(f"visual.bn{i}", (*v, f"bn{i}"))]
    for stage, blocks in enumerate(c.layers, start=1):
        for j in range(blocks):
            hf, fx = f"visual.layer{stage}.{j}", (*v, f"layer{stage}_{j}")
            for k in (1, 2, 3):
                t += [Entry(f"{hf}.conv{k}.weight", (*fx, f"conv{k}", "kernel"), "conv"),
                      *_bn(f"{hf}.bn{k}", (*fx, f"bn{k}"))]
            if j == 0:  # the first block of every stage changes width (stage 1) or stride (the others)
                t += [Entry(f"{hf}.downsample.0.weight", (*fx, "downsample_0", "kernel"), "conv"),
                      *_bn(f"{hf}.downsample.1", (*fx, "downsample_1"))]
    a = (*v, "attnpool")
    t.append(Entry("visual.attnpool.positional_embedding", (*a, "positional_embedding")))
    for p in ("q", "k", "v"):
        t += [Entry(f"visual.attnpool.{p}_proj.weight", (*a, f"{p}_proj", "kernel"), "transpose_split"),
              Entry(f"visual.attnpool.{p}_proj.bias", (*a, f"{p}_proj", "bias"), "split")]
    return t + _dense("visual.attnpool.c_proj", (*a, "c_proj"), "transpose_merge")


def open_clip_table(cfg: OpenCLIPConfig) -> list[Entry]:
    """The open_clip <-> Flax table of a CLIP with a ModifiedResNet or ViT image tower."""
    if isinstance(cfg.vision, ResNetConfig):
        table = _resnet(cfg.vision)
    else:
        v = ("visual",)
        table = [Entry("visual.conv1.weight", (*v, "conv1", "kernel"), "conv"),
                 Entry("visual.class_embedding", (*v, "class_embedding")),
                 Entry("visual.positional_embedding", (*v, "positional_embedding")),
                 *_norm("visual.ln_pre", (*v, "ln_pre")), *_norm("visual.ln_post", (*v, "ln_post")),
                 Entry("visual.proj", (*v, "proj")),
                 *_transformer("visual.transformer", (*v, "transformer"), cfg.vision.layers)]
    table += [Entry("token_embedding.weight", ("token_embedding", "embedding")),
              Entry("positional_embedding", ("positional_embedding",)),
              *_norm("ln_final", ("ln_final",)), Entry("text_projection", ("text_projection",)),
              Entry("logit_scale", ("logit_scale",)),
              *_transformer("transformer", ("transformer",), cfg.text.layers)]
    if cfg.logit_bias:
        table.append(Entry("logit_bias", ("logit_bias",)))
    return table


def read_config(ckpt_dir) -> dict:
    """open_clip_config.json of a checkpoint directory, checked (CheckpointError names what is wrong)."""
    root = pathlib.Path(ckpt_dir)
    path = root / CONFIG_NAME
    if not root.is_dir():
        raise CheckpointError(f"open_clip checkpoint directory {os.fspath(ckpt_dir)!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable open_clip config ({e})") from None
    if not isinstance(raw.get("model_cfg"), dict):
        raise CheckpointError(f"{path} has no 'model_cfg' (the open_clip hub layout: model_cfg + preprocess_cfg)")
    return raw


def weights_file(ckpt_dir) -> pathlib.Path:
    """The safetensors weights of an open_clip directory; a torch-only one is refused with the way out."""
    root = pathlib.Path(ckpt_dir)
    if (root / WEIGHTS_NAME).is_file():
        return root / WEIGHTS_NAME
    if (root / TORCH_WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"{root} has only {TORCH_WEIGHTS_NAME} (a torch pickle, not read here): convert it once with "
            f"`python -c \"import torch, safetensors.torch as s; s.save_file({{k: v.contiguous() for k, v in "
            f"torch.load('{root / TORCH_WEIGHTS_NAME}', map_location='cpu').items()}}, '{root / WEIGHTS_NAME}')\"` "
            f"or download {WEIGHTS_NAME} from the same hub repository")
    raise CheckpointError(f"{root} has no {WEIGHTS_NAME}")


def from_pretrained(ckpt_dir, dtype=jnp.float32, param_dtype=None, mesh=None, rules=None):
    """Loads an open_clip checkpoint directory into Flax, streaming one tensor at a time.

    Args:
      ckpt_dir: a directory in the open_clip hub layout (see the module docstring).
      dtype: compute dtype of the returned module.
      param_dtype: dtype of the returned params; defaults to `dtype`.
      mesh: a `jax.sharding.Mesh` to shard the params on (None: the default device).
      rules: logical axis -> mesh axis rules.

    Returns:
      (model, params): an `OpenCLIP` and its plain params tree.

    Raises:
      CheckpointError: not an open_clip directory, an unsupported model_cfg, torch-only weights, or tensors that
        do not match the config.
    """
    raw = read_config(ckpt_dir)
    try:
        cfg = config_from_dict(raw["model_cfg"])
    except ValueError as e:
        raise CheckpointError(f"{pathlib.Path(ckpt_dir) / CONFIG_NAME}: {e}") from None
    model = OpenCLIP(cfg, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype)
    abstract = stream.abstract_params(model)
    shardings = None if mesh is None else stream.shardings_for(model, mesh, rules, abstract=abstract)
    tensors = stream.open_safetensors(weights_file(ckpt_dir))
    params = stream.load_table(open_clip_table(cfg), tensors, abstract, ignore=IGNORE, shardings=shardings)
    return model, params


def to_open_clip(model: OpenCLIP, params, out_dir, *, preprocess_cfg: dict | None = None, dtype=None,
                 extra_files=None) -> pathlib.Path:
    """Writes params in the open_clip hub layout (open_clip_config.json + open_clip_model.safetensors), atomically.

    The directory loads with open_clip (`create_model('local-dir:' + out_dir)`, or `create_model(name)` +
    `load_checkpoint(model, out_dir/open_clip_model.safetensors)`) and with `from_pretrained` here.

    Args:
      model: the module.
      params: its params tree.
      out_dir: destination directory.
      preprocess_cfg: open_clip's preprocess_cfg (mean, std, interpolation, resize_mode); default OpenAI's.
      dtype: tensor dtype in the file; None keeps the params'.
      extra_files: more files (e.g. vocab.json + merges.txt of a custom tokenizer).
    """
    from safetensors.numpy import save_file

    from vlm_jax.data import preprocess

    tensors = loader.export_table(open_clip_table(model.cfg), params, dtype=dtype)
    pp = preprocess_cfg or dict(mean=list(preprocess.CLIP_MEAN), std=list(preprocess.CLIP_STD),
                                interpolation="bicubic", resize_mode="shortest")
    config = json.dumps({"model_cfg": config_to_dict(model.cfg), "preprocess_cfg": pp}, indent=2) + "\n"
    out = pathlib.Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
        save_file({k: np.ascontiguousarray(v) if v.ndim else v for k, v in tensors.items()},
                  pathlib.Path(tmp) / WEIGHTS_NAME, metadata={"format": "pt"})
        files = {CONFIG_NAME: config, **(extra_files or {})}
        for name, content in files.items():
            (pathlib.Path(tmp) / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        out.mkdir(exist_ok=True)
        for f in pathlib.Path(tmp).iterdir():
            os.replace(f, out / f.name)
    return out
