"""Locating checkpoints on disk or in the local Hugging Face cache, never over the network.

The ground floor of checkpoint handling: the model families (`vlm_jax.convert`), the tokenizer loader
(`vlm_jax.data.tokenize`) and the runner all find their files through `resolve_checkpoint`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

from vlm_jax.errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith((".", "-"))


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, *, weights: bool = True,
                       cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Finds a checkpoint directory without touching the network.

    Args:
      path_or_hub_id: a local directory, or a hub id (`openai/clip-vit-base-patch32`) that is
        looked up only in the local Hugging Face cache.
      weights: also require config.json and *.safetensors (False for tokenizer-only use).
      cache_dir: HF hub cache to look in; None means the default (HF_HUB_CACHE / HF_HOME).

    Returns:
      The directory.

    Raises:
      CheckpointError: not found, or (weights=True) no config.json / no safetensors weights.
    """
    name = os.fspath(path_or_hub_id)
    path = pathlib.Path(name).expanduser()
    if not path.is_dir():
        if path.exists():
            raise CheckpointError(f"checkpoint {name!r} is a file; pass the directory that holds "
                                  f"config.json and *.safetensors")
        if not _looks_like_hub_id(name):
            raise CheckpointError(f"checkpoint directory {name!r} does not exist; pass a local directory with "
                                  f"config.json + *.safetensors, or a hub id present in the local HF cache")
        from huggingface_hub import constants, snapshot_download

        try:
            path = pathlib.Path(snapshot_download(name, local_files_only=True, cache_dir=cache_dir))
        except Exception:  # noqa: BLE001 - every failure mode means "not in the cache"
            raise CheckpointError(
                f"checkpoint {name!r} not found: no such local directory, and no such hub id in the local "
                f"Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}); pass a local directory with "
                f"config.json + *.safetensors, or run `hf download {name}` on a machine with internet "
                f"access and copy the cache here") from None
    if weights:
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}; pass the directory written by "
                                  f"save_pretrained / `hf download` (config.json + *.safetensors)")
        if not safetensors_files(path):
            torch_only = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
            hint = (f"it has only PyTorch weights ({', '.join(sorted(torch_only))}); re-save them as safetensors "
                    f"with transformers `save_pretrained(out_dir)` or download the safetensors files"
                    if torch_only else "download or export the *.safetensors weights into it")
            raise CheckpointError(f"{path} has no *.safetensors weights: {hint}")
    return path


def safetensors_files(ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of a checkpoint: the index's shards, model.safetensors, or all *.safetensors."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    index = ckpt_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e}); re-download it") from None
        files = [ckpt_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in the directory: {missing}; "
                                  f"the download is incomplete, re-download it")
        return files
    if (ckpt_dir / WEIGHTS_NAME).is_file():
        return [ckpt_dir / WEIGHTS_NAME]
    return sorted(ckpt_dir.glob("*.safetensors"))
