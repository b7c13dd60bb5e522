"""The scaffold every program shares: checkpoint specs, batch sizes on the mesh, epoch batches, LVLM loading,
and the results a run leaves in its workdir.

A program (`fewshot_clip`, `vladva`, `vitask`) reads its config, checks it, then goes through these steps in
the same order: resolve checkpoints (`resolve_checkpoint`) -> mesh -> load and shard (`load_lvlm`) -> writer ->
fit (`train.trainer.fit` on `epoch_batches`) -> evaluation -> `write_results` (results.md, results.json, the
table printed once).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlm_jax import errors
from vlm_jax.data import pipeline
from vlm_jax.eval import report
from vlm_jax.runtime import cache, hub
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.testing import replicas


def resolve_checkpoint(spec: str, config_file: str | None, texts: Sequence[str] = ()) -> str:
    """A checkpoint directory for a config's `spec`: a local directory, a hub id in the local HF cache, or an
    open_clip directory, or an offline checkpoint ('replica:<name>', 'builtin:tiny-clip';
    `testing.replicas.resolve_offline`) written into the
    cache (`runtime.cache.models_dir`), its tokenizer trained on `texts`.

    Raises:
      UserError: one line; a missing checkpoint also points at `config_file`'s offline `:runlocal` default
        (when a config file is given).
    """
    if replicas.is_offline_spec(spec):
        return replicas.resolve_offline(spec, cache.models_dir(), texts)
    from vlm_jax.convert import open_clip as open_clip_convert

    if os.path.isdir(os.path.expanduser(spec)) and open_clip_convert.is_open_clip_dir(os.path.expanduser(spec)):
        return os.path.expanduser(spec)   # open_clip's layout (open_clip_config.json, no config.json)
    try:
        return str(hub.resolve_checkpoint(spec))
    except errors.UserError as e:
        if config_file is None:
            raise
        raise errors.UserError(f"{e} (or try the offline default: --config={config_file}:runlocal)") from None


def batch_size(want: int, n: int, mesh) -> int:
    """The largest multiple of the mesh's data-parallel size <= min(want, n) (at least that size)."""
    div = mesh_lib.batch_divisor(mesh)
    return max(div, min(want, n) // div * div)


def accum_steps(section: Mapping[str, Any], bs: int, mesh, key: str) -> int:
    """`<key>.accum_steps` (gradient accumulation), checked against the batch size before any training."""
    k = int(section.get("accum_steps", 1))
    div = mesh_lib.batch_divisor(mesh)
    if k < 1 or bs % (k * div):
        raise errors.UserError(f"{key}.accum_steps={k} needs a batch size ({bs}) divisible by {k} x the {div} "
                               f"data-parallel devices: change {key}.batch_size or {key}.accum_steps")
    return k


def epoch_batches(n: int, bs: int, seed: Sequence[int], make: Callable[[np.ndarray, int, int], Any], *,
                  mesh=None, rowwise: bool = True) -> pipeline.EpochBatches:
    """The trainer's `epoch_batches` (`data.pipeline`): each epoch a fresh permutation of the n rows (a pure
    function of (seed, epoch), so a resumed run sees the same batches), cut into n // bs full batches
    `make(idx, epoch, i)`, built ahead of the step in grain's threads and placed on the mesh ahead. With `mesh`
    and several processes each host builds only its rows (`rowwise`: `make` must then be row-wise)."""
    return pipeline.epoch_batches(n, bs, seed, make, mesh=mesh, rowwise=rowwise)


def make_mesh(config) -> tuple[Any, tuple[tuple[str, Any], ...]]:
    """(mesh, logical-axis rules) of a config: `config.mesh` (axis sizes) and `config.mesh_rules` (pairs that
    replace entries of `mesh.DEFAULT_RULES`), both checked here, before any work."""
    return mesh_lib.make_mesh(config.mesh.to_dict()), mesh_lib.rules_from_config(config.get("mesh_rules"))


def load_lvlm(ckpt: str, model_config, mesh, rules=None):
    """(model, params) of an LVLM checkpoint of any supported family (`convert.auto`: llava, internvl, qwen2_vl),
    streamed one tensor at a time and each placed by its logical axis names and `rules` (`make_mesh`; None: the
    defaults): replicated on the default data-parallel mesh, sharded when the mesh has 'fsdp' / 'tensor' axes, so
    no device ever holds the whole model. `model_config`: the config's `model` block (dtype, param_dtype)."""
    from vlm_jax.convert import auto

    return auto.from_pretrained(
        ckpt, dtype=jnp.dtype(model_config.dtype),
        param_dtype=jnp.dtype(model_config.get("param_dtype") or model_config.dtype), mesh=mesh, rules=rules)


def write_results(workdir: str, md: str, out: dict[str, Any]) -> dict[str, Any]:
    """results.md and results.json written atomically into `workdir`; the table printed once (primary host)."""
    report.write_atomic(os.path.join(workdir, "results.md"), lambda f: f.write(md))
    report.write_json(os.path.join(workdir, "results.json"), out)
    if mesh_lib.is_primary():
        print("\n" + md, flush=True)
    return out
