"""Trained tensors out of vlm_jax: LoRA as a Hugging Face PEFT adapter, LoRA merged into an HF checkpoint, and any
other trained tree (soft prompts, the VITask connector, DualAdapter residuals and caches) as safetensors + JSON.

PEFT adapter. A LoRA pair of `models.peft` sits at a Flax kernel path with A f32[in, r] and B f32[r, out], in and
out being the kernel's flattened input / output axes. The family's conversion table maps that kernel to an HF
`nn.Linear` weight f32[out, in] by one of 'transpose' (Dense f32[in, out]), 'transpose_split' (q/k/v
f32[D, H, K]) or 'transpose_merge' (o f32[H, K, D]); each is W_hf = reshape(W, [in, out]).T, so
delta W_hf = s (A B).T = s B.T A.T and PEFT's lora_A.weight = A.T f32[r, in], lora_B.weight = B.T f32[out, r],
with PEFT's scaling lora_alpha / r = ours. PEFT finds layers by the *module names of the loaded HF model*, which
since transformers 4.52 differ from the names on disk (e.g. 'model.language_model.layers.0...' in memory,
'language_model.model.layers.0...' in llava-hf's files), so the adapter is written with the in-memory names
(`HF_MODULE_LAYOUTS`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
from flax import traverse_util

from vlm_jax.convert import loader
from vlm_jax.errors import UserError

PyTree = Any
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ARRAYS_WEIGHTS = "arrays.safetensors"
ARRAYS_INDEX = "arrays.json"
# Table kinds whose HF tensor is an nn.Linear weight equal to reshape(kernel, [in, out]).T (see the module doc).
LINEAR_KINDS = ("transpose", "transpose_split", "transpose_merge")
# In-memory module prefixes of the HF models (transformers >= 4.52), per family; names as `*_table(cfg, layout)`.
HF_MODULE_LAYOUTS = {
    "llava": dict(tower="model.vision_tower.vision_model.", projector="model.multi_modal_projector.",
                  lm="model.language_model.", head="lm_head"),
    "internvl": dict(tower="model.vision_tower.", projector="model.multi_modal_projector.",
                     lm="model.language_model.", head="lm_head"),
    "qwen2_vl": dict(vision="model.visual.", lm="model.language_model.", head="lm_head"),
}


def family_of(model) -> str:
    """'llava', 'internvl' or 'qwen2_vl' for an LVLM module; UserError for anything else."""
    from vlm_jax.models.internvl import InternVL
    from vlm_jax.models.llava import Llava
    from vlm_jax.models.qwen2_vl import Qwen2VL

    for cls, name in ((Llava, "llava"), (InternVL, "internvl"), (Qwen2VL, "qwen2_vl")):
        if isinstance(model, cls):
            return name
    raise UserError(f"export to Hugging Face supports the LLaVA, InternVL and Qwen2-VL LVLMs, not "
                    f"{type(model).__name__}")


def _family(name: str):
    """The family's convert module and table builder."""
    from vlm_jax.convert import internvl, llava, qwen2_vl

    return {"llava": (llava, llava.llava_table), "internvl": (internvl, internvl.internvl_table),
            "qwen2_vl": (qwen2_vl, qwen2_vl.qwen2_vl_table)}[name]


def hf_table(model, layout: dict[str, str] | None = None) -> list[loader.Entry]:
    """The family's HF <-> Flax table, with the in-memory module names unless `layout` is given."""
    family = family_of(model)
    if getattr(model, "scan_layers", False):
        raise UserError("export needs an unscanned model (model.scan_layers=False): the HF tables are per layer")
    return _family(family)[1](model.cfg, layout or HF_MODULE_LAYOUTS[family])


def _pairs(lora: PyTree) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """{kernel path: (A, B)} as host arrays; UserError on a malformed tree."""
    flat = traverse_util.flatten_dict(lora)
    pairs = {}
    for path in flat:
        if path[-1] not in ("a", "b") or (*path[:-1], "a") not in flat or (*path[:-1], "b") not in flat:
            raise UserError(f"malformed LoRA tree: {'/'.join(path)} is not half of an {{'a', 'b'}} pair")
        pairs[path[:-1]] = (np.asarray(flat[(*path[:-1], "a")]), np.asarray(flat[(*path[:-1], "b")]))
    return pairs


def peft_tensors(lora: PyTree, table: list[loader.Entry], *, rank: int) -> dict[str, np.ndarray]:
    """LoRA pairs -> PEFT's state dict {'base_model.model.<module>.lora_{A,B}.weight': f32[r, in] / f32[out, r]}.

    Args:
      lora: a `peft.lora_init` tree (host or device arrays).
      table: the model's table with in-memory module names (`hf_table`).
      rank: LoRA rank r (checked against every pair).

    Raises:
      UserError: a pair whose kernel has no nn.Linear entry in the table (an embedding or conv target, or a model
        other than the table's), or whose shapes do not fit that kernel.
    """
    entries = {e.flax_path: e for e in table}
    out = {}
    for path, (a, b) in sorted(_pairs(lora).items()):
        name = "/".join(path)
        entry = entries.get(path)
        if entry is None or entry.kind not in LINEAR_KINDS or not entry.hf_name.endswith(".weight"):
            raise UserError(f"LoRA on {name} has no nn.Linear counterpart in the Hugging Face model; a PEFT adapter "
                            f"holds Linear LoRA only: export with --format=merged or --format=arrays")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise UserError(f"LoRA pair {name}: a {a.shape} / b {b.shape} do not have rank {rank}")
        module = entry.hf_name[:-len(".weight")]
        out[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        out[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    if not out:
        raise UserError("the run has no LoRA parameters to export as a PEFT adapter")
    return out


def peft_config(tensors: dict[str, np.ndarray], *, rank: int, alpha: float, base_model: str) -> dict:
    """adapter_config.json of plain LoRA (no dropout, no bias, not rsLoRA) on exactly the modules in `tensors`."""
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    modules = sorted(k[len(prefix):-len(suffix)] for k in tensors if k.endswith(suffix))
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": int(rank),
            "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
            # Full module names: PEFT matches a target by equality or as a '.'-suffix, so nothing else is hit.
            "target_modules": modules, "inference_mode": True}


def write_dir(out_dir, tensors: dict[str, np.ndarray], weights_name: str, json_files: dict[str, Any],
              metadata: dict[str, str] | None = None) -> pathlib.Path:
    """Writes one safetensors file + JSON files into `out_dir` atomically (a temp sibling, then moved in)."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp / weights_name,
                  metadata={"format": "pt", **(metadata or {})})
        for name, content in json_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_peft_adapter(out_dir, model, lora: PyTree, *, rank: int, alpha: float, base_model: str) -> pathlib.Path:
    """Writes adapter_config.json + adapter_model.safetensors, loadable by
    `peft.PeftModel.from_pretrained(<HF model of base_model>, out_dir)`.

    Args:
      out_dir: destination directory.
      model: the LVLM module the LoRA was trained on (Llava, InternVL or Qwen2VL; unscanned).
      lora: its `peft.lora_init`-shaped tree.
      rank, alpha: the run's LoRA rank and alpha.
      base_model: the base checkpoint (hub id or directory), written as base_model_name_or_path.
    """
    tensors = peft_tensors(lora, hf_table(model), rank=rank)
    config = peft_config(tensors, rank=rank, alpha=alpha, base_model=str(base_model))
    return write_dir(out_dir, tensors, ADAPTER_WEIGHTS, {ADAPTER_CONFIG: config})


def write_merged(out_dir, model, base: PyTree, lora: PyTree | None, *, rank: int, alpha: float,
                 extra_files: dict | None = None, dtype=None) -> pathlib.Path:
    """Writes base + (alpha / rank) A B as a full HF checkpoint of the family (`to_hf`, the hub's names)."""
    from vlm_jax.models import peft

    params = peft.lora_merge(base, lora, alpha=alpha, rank=rank) if lora else base
    return _family(family_of(model))[0].to_hf(model, params, out_dir, dtype=dtype, extra_files=extra_files)


def write_arrays(out_dir, trees: dict[str, PyTree], what: dict[str, str], *, source: dict | None = None
                 ) -> pathlib.Path:
    """Writes named trained trees as arrays.safetensors ('/'-joined paths) + arrays.json describing them.

    Args:
      out_dir: destination directory.
      trees: {name: pytree of arrays}, e.g. {'image_prompt': f32[P, D], 'connector': {...}}.
      what: {name: one line saying what it is and how it is used}; every name needs one.
      source: extra facts for the JSON (method, base checkpoint, LoRA alpha/rank...).

    Returns:
      The directory; arrays.json = {'tensors': {path: {'shape', 'dtype', 'what'}}, 'source': ...}.
    """
    missing = sorted(set(trees) - set(what))
    if missing:
        raise ValueError(f"write_arrays: no description for {missing}")
    tensors, index = {}, {}
    for name, tree in trees.items():
        flat = traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {(): tree}
        for path, x in flat.items():
            key = "/".join((name, *map(str, path)))
            tensors[key] = np.asarray(x)
            index[key] = {"shape": list(tensors[key].shape), "dtype": str(tensors[key].dtype), "what": what[name]}
    if not tensors:
        raise UserError("nothing to export: the run kept no trained arrays")
    return write_dir(out_dir, tensors, ARRAYS_WEIGHTS, {ARRAYS_INDEX: {"tensors": index, "source": source or {}}})


def read_arrays(out_dir) -> dict[str, PyTree]:
    """The inverse of `write_arrays`: {name: nested dict of numpy arrays (or the array itself)}."""
    flat = loader.read_safetensors(pathlib.Path(out_dir) / ARRAYS_WEIGHTS)
    trees: dict[str, Any] = {}
    for key, x in flat.items():
        name, *path = key.split("/")
        if not path:
            trees[name] = x
        else:
            trees.setdefault(name, {})[tuple(path)] = x
    return {k: v if not isinstance(v, dict) else traverse_util.unflatten_dict(v) for k, v in trees.items()}
