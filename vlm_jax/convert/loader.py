"""Shared HF <-> Flax checkpoint machinery (MaxText style), used by every model family.

A model family describes its conversion as a *table*: a list of `Entry(hf_name, flax_path,
kind)`. `apply_table` turns an HF state dict into a Flax params tree and checks it against the
`jax.eval_shape(model.init, ...)` tree; `export_table` is its exact inverse. Transform kinds:

  identity          x                                  (biases, norms, embeddings, scalars)
  transpose         Linear f32[out, in] -> f32[in, out]
  conv              Conv2d f32[O, I, kh, kw] -> f32[kh, kw, I, O]
  transpose_split   Linear into heads f32[H*K, D] -> f32[D, H, K]    (q/k/v kernels)
  split             bias f32[H*K] -> f32[H, K]                       (q/k/v biases)
  transpose_merge   Linear out of heads f32[D, H*K] -> f32[H, K, D]  (attention output kernel)

Weights are read from *.safetensors only (single file or sharded with an index) with the numpy
backend, never torch. The families' `from_pretrained` load through `vlm_jax.convert.stream`, which
reads one tensor at a time and places it straight into its sharding; `load_tensors` + `apply_table`
(everything in host memory) remain for tests and small tools. Errors a user can fix raise `CheckpointError` with a message that names
the file or tensors involved and says what to do.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import flax.linen as nn
import ml_dtypes
import numpy as np
from flax import traverse_util

from vlm_jax.errors import CheckpointError
from vlm_jax.runtime.hub import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, resolve_checkpoint, safetensors_files  # noqa: F401


class Entry(NamedTuple):
    """One row of a conversion table."""

    hf_name: str  # e.g. 'text_model.encoder.layers.0.self_attn.q_proj.weight'
    flax_path: tuple[str, ...]  # e.g. ('text_model', 'encoder', 'layers_0', 'self_attn', 'q_proj', 'kernel')
    kind: str = "identity"


class _Transform(NamedTuple):
    to_flax: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (hf tensor, flax shape) -> flax
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # flax shape -> expected hf shape


TRANSFORMS: dict[str, _Transform] = {
    "identity": _Transform(lambda x, s: x, lambda x: x, lambda s: tuple(s)),
    "transpose": _Transform(lambda x, s: x.T, lambda x: x.T, lambda s: tuple(s[::-1])),
    "conv": _Transform(lambda x, s: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1),
                       lambda s: (s[3], s[2], s[0], s[1])),
    "transpose_split": _Transform(lambda x, s: x.T.reshape(s), lambda x: x.reshape(x.shape[0], -1).T,
                                  lambda s: (math.prod(s[1:]), s[0])),
    "split": _Transform(lambda x, s: x.reshape(s), lambda x: x.reshape(-1), lambda s: (math.prod(s),)),
    "transpose_merge": _Transform(lambda x, s: x.T.reshape(s), lambda x: x.reshape(-1, x.shape[-1]).T,
                                  lambda s: (s[-1], math.prod(s[:-1]))),
}


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    """config.json as a dict (CheckpointError if unreadable)."""
    path = pathlib.Path(ckpt_dir) / CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None


# ----------------------------------------------------------------------------- safetensors I/O

# safetensors dtype tags -> numpy; ml_dtypes provides the ones numpy lacks (bf16, fp8).
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_raw(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Parses a safetensors file by hand (8-byte header size, JSON header, raw little-endian data).

    Used when the installed safetensors' numpy backend rejects a dtype (older releases cannot
    return bfloat16 to numpy).
    """
    data = path.read_bytes()
    (n,) = np.frombuffer(data[:8], "<u8") if len(data) >= 8 else (None,)
    if n is None or 8 + n > len(data):
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file (bad header); "
                              f"re-download or re-export it")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out, base = {}, 8 + n
    for name, info in header.items():
        start, end = info["data_offsets"]
        if base + end > len(data):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file (tensor {name!r} runs past "
                                  f"the end); re-download or re-export it")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(data[base + start:base + end], dtype).reshape(info["shape"]).copy()
    return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads one safetensors file into numpy arrays (bfloat16 via ml_dtypes)."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    try:
        with safe_open(path, framework="np") as f:
            names = list(f.keys())
            try:
                return {k: f.get_tensor(k) for k in names}
            except (TypeError, ValueError, KeyError):  # dtype the numpy backend cannot represent
                pass
        return _read_raw(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({msg}); "
                              f"re-download or re-export it") from None


def merge_shards(ckpt_dir: str | os.PathLike, read: Callable[[pathlib.Path], dict]) -> dict:
    """`read(file)` over every safetensors file of a checkpoint, merged; a tensor in two shards is an error."""
    tensors: dict = {}
    for f in safetensors_files(pathlib.Path(ckpt_dir)):
        part = read(f)
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise CheckpointError(f"{f}: tensors also present in another shard: {dup}")
        tensors.update(part)
    return tensors


def load_tensors(ckpt_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory, merged across shards."""
    return merge_shards(ckpt_dir, read_safetensors)


# ----------------------------------------------------------------------------- tables


def _contiguous(x: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it turns 0-d arrays (logit_scale) into shape (1,).
    x = np.asarray(x)
    return x if x.flags.c_contiguous else x.copy(order="C")


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(nn.meta.unbox(tree))


def _fmt(path: tuple[str, ...]) -> str:
    return "/".join(path)


def table_problems(table: Sequence[Entry], hf_shapes: dict[str, tuple[int, ...]], targets: dict,
                   ignore: Iterable[str] = ()) -> list[str]:
    """Every way a checkpoint's tensors fail to match a table and the model (empty when they match).

    Args:
      table: conversion entries.
      hf_shapes: HF name -> shape of every tensor in the checkpoint.
      targets: the flat (path tuple -> abstract array) params of the model.
      ignore: regexes (re.fullmatch) of HF tensors that may be present and are dropped.

    Returns:
      One line per kind of problem, each naming all the tensors or params concerned: params the
      table misses, table paths the model lacks, missing / unexpected tensors, wrong shapes.
    """
    ignore = [re.compile(p) for p in ignore]
    by_hf = {e.hf_name: e for e in table}
    problems = []
    uncovered = sorted(_fmt(p) for p in set(targets) - {e.flax_path for e in table})
    if uncovered:
        problems.append(f"model params not in the conversion table (bug in the table): {uncovered}")
    stale = sorted(_fmt(e.flax_path) for e in table if e.flax_path not in targets)
    if stale:
        problems.append(f"conversion table paths the model does not have (bug in the table): {stale}")
    missing = sorted(n for n in by_hf if n not in hf_shapes)
    if missing:
        problems.append(f"missing tensors: {missing}")
    extra = sorted(n for n in hf_shapes if n not in by_hf and not any(p.fullmatch(n) for p in ignore))
    if extra:
        problems.append(f"unexpected tensors: {extra}")
    for e in table:
        if e.hf_name not in hf_shapes or e.flax_path not in targets:
            continue
        target = tuple(targets[e.flax_path].shape)
        want = TRANSFORMS[e.kind].hf_shape(target)
        if tuple(hf_shapes[e.hf_name]) != want:
            problems.append(f"wrong shape for {e.hf_name}: expected {want} (flax {_fmt(e.flax_path)} "
                            f"{target}), got {tuple(hf_shapes[e.hf_name])}")
    return problems


def apply_table(table: Sequence[Entry], hf_tensors: dict[str, np.ndarray], target_shapes,
                *, ignore: Iterable[str] = (), dtype=None) -> dict:
    """HF state dict -> Flax params, checked against the model's shape tree.

    Args:
      table: conversion entries.
      hf_tensors: HF name -> array.
      target_shapes: the params tree of `jax.eval_shape(model.init, ...)` (boxed or not).
      ignore: regexes (re.fullmatch) of HF tensors that may be present and are dropped, e.g.
        non-persistent buffers such as `.*position_ids`.
      dtype: dtype of every output leaf; None keeps each target leaf's dtype.

    Returns:
      A nested dict of numpy arrays with exactly the structure of `target_shapes`.

    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped tensor at once.
    """
    targets = _flat(target_shapes)
    problems = table_problems(table, {n: tuple(x.shape) for n, x in hf_tensors.items()}, targets, ignore)
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    params = {}
    for e in table:
        target = targets[e.flax_path]
        out_dtype = np.dtype(dtype if dtype is not None else target.dtype)
        x = TRANSFORMS[e.kind].to_flax(np.asarray(hf_tensors[e.hf_name]), tuple(target.shape))
        params[e.flax_path] = _contiguous(x.astype(out_dtype))
    return traverse_util.unflatten_dict(params)


def export_table(table: Sequence[Entry], params, *, dtype=None) -> dict[str, np.ndarray]:
    """Flax params -> HF state dict (the exact inverse of `apply_table`).

    Args:
      table: conversion entries.
      params: the params tree (boxed or not, on any device).
      dtype: dtype of every output tensor; None keeps each param's dtype.

    Raises:
      CheckpointError: a param is not covered by the table or a table path is missing.
    """
    flat = _flat(params)
    uncovered = sorted(_fmt(p) for p in set(flat) - {e.flax_path for e in table})
    absent = sorted(_fmt(e.flax_path) for e in table if e.flax_path not in flat)
    if uncovered or absent:
        raise CheckpointError(f"params do not match the conversion table: not in table {uncovered}, "
                              f"not in params {absent}")
    out = {}
    for e in table:
        x = np.asarray(flat[e.flax_path])  # device_get for jax arrays
        if dtype is not None:
            x = x.astype(dtype)
        out[e.hf_name] = _contiguous(TRANSFORMS[e.kind].to_hf(x))
    return out


# ----------------------------------------------------------------------------- writing


def write_checkpoint(out_dir: str | os.PathLike, tensors: dict[str, np.ndarray], config: dict,
                     extra_files: dict[str, str | bytes] | None = None) -> pathlib.Path:
    """Writes config.json + model.safetensors (+ extra files) atomically.

    Everything is written into a temporary sibling directory first; only when every file is
    complete is it renamed into place (a new directory), or its files are `os.replace`d one by
    one into an existing directory. A failure leaves `out_dir` untouched.

    Args:
      out_dir: destination directory (created if needed).
      tensors: HF name -> array (bfloat16 via ml_dtypes is fine).
      config: the config.json content.
      extra_files: file name -> content (tokenizer files, preprocessor_config.json ...).

    Returns:
      The output directory.
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # metadata format=pt: transformers refuses safetensors files without it.
        save_file({k: _contiguous(v) for k, v in tensors.items()}, tmp / WEIGHTS_NAME,
                  metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
        if not out.exists():
            os.rename(tmp, out)
            return out
        # Existing directory: drop stale weights that would shadow or mix with the new ones.
        for stale in list(out.glob("*.safetensors")) + [out / INDEX_NAME]:
            if stale.is_file() and not (tmp / stale.name).exists():
                stale.unlink()
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
