"""The shared arithmetic of `vlm-jax plan` (programs/plan.py): the `Plan` table, per-device parameter shards
from the logical-axis rules, LoRA shapes, optimizer moments, one transformer layer's activations, and the
checkpoint's config.json location. Imported by the planners (`plan_programs`) and the CLI (`plan`)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.runtime import mesh as mesh_lib

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device of each part (`rows`), the mesh it was planned for and the facts behind the estimate."""

    rows: dict[str, int]
    mesh: dict[str, int]
    notes: list[str]

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def table(self) -> str:
        lines = [f"memory per device on mesh {self.mesh} ({math.prod(self.mesh.values())} devices):"]
        lines += [f"  {name:<20}{gib(b):>14}" for name, b in self.rows.items()]
        lines += [f"  {'total':<20}{gib(self.total):>14}"] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def gib(b: int) -> str:
    return f"{b / GiB:.3f} GiB" if b >= GiB // 10 else f"{b / 2 ** 20:.3f} MiB"


def resolve_mesh(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """The mesh axes sizes with a -1 axis resolved against `num_devices` (as `mesh.make_mesh` does)."""
    sizes = {a: int(shape.get(a, -1 if a == "data" else 1)) for a in mesh_lib.MESH_AXES}
    unknown = sorted(set(shape) - set(mesh_lib.MESH_AXES))
    if unknown or list(sizes.values()).count(-1) > 1:
        raise UserError(f"bad mesh {dict(shape)}: axes are {mesh_lib.MESH_AXES}, at most one of them -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    for a, s in sizes.items():
        if s == -1:
            if num_devices % fixed:
                raise UserError(f"{num_devices} devices cannot be split into mesh {dict(shape)}")
            sizes[a] = num_devices // fixed
    return sizes


def shard_sizes(abstract_boxed, mesh_shape: Mapping[str, int], rules=None) -> dict[str, tuple[int, int]]:
    """Per leaf of a boxed `jax.eval_shape` params tree: (elements one device holds, itemsize), by '/'-path.

    Args:
      abstract_boxed: `stream.abstract_params(model)` (ShapeDtypeStructs in nn.Partitioned boxes).
      mesh_shape: {'data', 'fsdp', 'tensor'} sizes.
      rules: logical axis -> mesh axis rules (config list form or tuples); None: `mesh.DEFAULT_RULES`, as the
        programs load.
    """
    import flax.linen as nn
    from flax import traverse_util

    mesh = jax.sharding.AbstractMesh(tuple(mesh_shape[a] for a in mesh_lib.MESH_AXES), mesh_lib.MESH_AXES)
    shardings = traverse_util.flatten_dict(
        mesh_lib.param_shardings(abstract_boxed, mesh, mesh_lib.rules_from_config(rules)), sep="/")
    leaves = traverse_util.flatten_dict(nn.meta.unbox(abstract_boxed), sep="/")
    out, bad = {}, []
    for k, x in leaves.items():
        try:
            out[k] = (math.prod(shardings[k].shard_shape(x.shape)), np.dtype(x.dtype).itemsize)
        except ValueError:  # jax's IndivisibleError: the loader refuses such a mesh too
            bad.append(f"{k} {tuple(x.shape)} over {shardings[k].spec}")
    if bad:
        raise UserError(f"params do not divide evenly over mesh {dict(mesh_shape)}: {'; '.join(bad[:4])}"
                        f"{' ...' if len(bad) > 4 else ''} ({len(bad)} in all); choose other fsdp / tensor sizes")
    return out


def param_bytes(abstract_boxed, mesh_shape: Mapping[str, int], rules=None) -> int:
    """Bytes one device holds of the params, each leaf sharded by its logical axis names (see `shard_sizes`)."""
    return sum(n * size for n, size in shard_sizes(abstract_boxed, mesh_shape, rules).values())


def lora_shapes(abstract_base, targets, rank: int) -> dict:
    """The {kernel path: {'a': f32[in, r], 'b': f32[r, out]}} ShapeDtypeStructs `peft.lora_init` makes."""
    from flax import traverse_util

    from vlm_jax.models import peft

    flat = peft._flat(abstract_base)
    chosen = peft.lora_targets(abstract_base, [tuple(t) if isinstance(t, (list, tuple)) else t for t in targets])
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return traverse_util.unflatten_dict({p: {"a": sds(math.prod(flat[p].shape[:n]), rank),
                                             "b": sds(rank, math.prod(flat[p].shape[n:]))}
                                         for p, n in chosen.items()})


def layer_elements(tokens: int, width: int, mlp: int, heads: int, kv_width: int, tensor: int) -> int:
    """Elements one pre-norm transformer layer keeps for backward per sequence of `tokens`: the norms' inputs and
    outputs and the attention output (6 D), q, k, v (D + 2 Dkv), the MLP's gate, up and product (3 F), the
    softmax probabilities (H L, dense attention). Heads and MLP split over the 'tensor' axis."""
    return tokens * (6 * width + (width + 2 * kv_width + 3 * mlp + heads * tokens) // tensor)


def trainable_elements(tree, labels: Mapping[str, Any], base_shards: Mapping[str, tuple[int, int]]) -> int:
    """Elements per device of the trainable leaves: a base leaf keeps its sharding (the trainer's master copy is
    placed like it), the new tensors (LoRA, prompts) are replicated."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(tree, sep="/")
    return sum(base_shards[k[len("base/"):]][0] if k.startswith("base/") else math.prod(flat[k].shape)
               for k, mult in labels.items() if mult is not None)


def optimizer_moments(name: str, momentum) -> int:
    """float32 state tensors per trainable tensor of the trainer's optimizers (Adam: mu and nu; SGD: the momentum
    trace when momentum is set)."""
    if name in ("adam", "adamw"):
        return 2
    if name == "sgd":
        return 1 if momentum else 0
    raise UserError(f"unknown optimizer train.optim.name={name!r}: use 'adamw', 'adam' or 'sgd'")


def checkpoint_config_dir(spec: str) -> str:
    """The directory of the checkpoint's config.json: an offline replica is written as the run would write it; a
    directory or a cached hub id needs config.json only (plan before downloading the weights)."""
    from vlm_jax.programs import runner
    from vlm_jax.runtime import hub
    from vlm_jax.testing import replicas

    from vlm_jax.convert import open_clip as open_clip_convert

    if replicas.is_offline_spec(spec):
        return runner.resolve_checkpoint(spec, None)
    local = os.path.expanduser(spec)
    if os.path.isdir(local) and open_clip_convert.is_open_clip_dir(local):
        return local   # open_clip's layout: open_clip_config.json instead of config.json
    path = hub.resolve_checkpoint(spec, weights=False)
    if not (path / hub.CONFIG_NAME).is_file():
        raise UserError(f"{path} has no {hub.CONFIG_NAME}: plan needs the checkpoint's config.json (e.g. "
                        f"`hf download {spec} config.json`)")
    return str(path)
