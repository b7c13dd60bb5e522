"""`vlm-jax plan --config=configs/vladva.py[:args] [--config.a.b=v] [--mesh=data=8,fsdp=1,tensor=1]
[--device_memory_gb=N]`: the memory a run needs per device, before anything is loaded.

Reads only the checkpoint's config.json (no weights needed; an offline replica spec is written first, as the run
would) and builds the parameter tree with `jax.eval_shape`, so a 7B model costs nothing. Per device, on the
requested mesh:

  base params       each leaf's shard (its NamedSharding from the logical-axis rules, `runtime.mesh`) in the
                    storage dtype (model.param_dtype or model.dtype): exactly what the sharded load places.
  trainable         the trained tensors (LoRA pairs on method.lora_targets, soft prompts) as the trainer keeps
                    them: float32 master copies, replicated (they are created unsharded, `trainer._initial_state`).
  optimizer state   Adam / AdamW: two float32 moments per trainable element (SGD with momentum: one; without: 0).
  gradients         one float32 copy of the trainable tensors.
  activations       an analytic estimate of what the backward pass keeps (see `activation_bytes`): an estimate,
                    not a measurement; XLA's fusion and rematerialisation move it either way.

The run is refused, in one line, when the sum exceeds --device_memory_gb or the memory the first device reports
(GPU / TPU; a CPU reports none). Programs: vladva and vitask on every LVLM family (llava, internvl, qwen2_vl),
fewshot_clip on every dual encoder; the per-program planners are in `plan_programs`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.programs import argv as argv_lib
from vlm_jax.runtime import mesh as mesh_lib

GiB = 1024 ** 3
PLANNED = ("vladva", "vitask", "fewshot_clip")


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


def _check_program(config):
    if config.program not in PLANNED:
        raise UserError(f"plan supports the {', '.join(PLANNED)} program(s) so far, not {config.program!r}")


def make_plan(config, ckpt: str | None, mesh_shape: Mapping[str, int]) -> Plan:
    """The per-device memory plan of `config` on `mesh_shape` (`plan_programs`: one planner per program).

    Args:
      config: the run's ConfigDict (config.program picks the planner).
      ckpt: the checkpoint directory of config.model.checkpoint (its config.json is all that is read); None:
        resolved as the program resolves it (`checkpoint_config_dir`; vitask: `vitask.check_inputs`).
      mesh_shape: the mesh axis sizes (`resolve_mesh`).
    """
    from vlm_jax.programs import plan_programs

    _check_program(config)
    return getattr(plan_programs, config.program)(config, ckpt, mesh_shape)


def detected_memory() -> int | None:
    """The first device's memory in bytes (GPU / TPU `memory_stats()['bytes_limit']`), None where unknown (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def check_fits(plan: Plan, device_memory_gb: float | None) -> str:
    """The verdict line; UserError (one line) when the plan exceeds the given or the detected memory."""
    limit = device_memory_gb * GiB if device_memory_gb else detected_memory()
    where = "--device_memory_gb" if device_memory_gb else "the detected device memory"
    if limit is None:
        return "fits: unknown (this backend reports no device memory; pass --device_memory_gb=N)"
    if plan.total > limit:
        raise UserError(f"the run needs {gib(plan.total)} per device on mesh {plan.mesh} but {where} is "
                        f"{gib(limit)}: shard the params (--mesh=fsdp=N), lower train.batch_size, raise "
                        f"train.grad_cache_chunks or use model.param_dtype=bfloat16")
    return f"fits: {gib(plan.total)} of {gib(int(limit))} ({where})"


def _flags(argv: Sequence[str]):
    """--config (with --config.a.b=v overrides, as the launcher) on a private absl FlagValues, plus the rest."""
    from absl import flags
    from ml_collections import config_flags

    fv, argv = flags.FlagValues(), ["vlm-jax plan", *argv]
    # sys_argv: config_flags finds the --config.a.b=v overrides in it (by default it reads sys.argv).
    config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:args]", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_string("mesh", "", "data=N,fsdp=N,tensor=N (default: the config's mesh)", flag_values=fv)
    flags.DEFINE_float("device_memory_gb", None, "memory per device in GiB (default: detected)", flag_values=fv)
    try:
        fv(argv)
    except Exception as e:  # absl flags.Error, or the config file's own error
        raise UserError(f"vlm-jax plan: bad flag or unknown config key: {' '.join(str(e).split())}") from None
    if fv.config is None:
        raise UserError("vlm-jax plan: --config=configs/<method>.py[:args] is required")
    return fv


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


def _mesh_arg(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(",") if part)}
    except ValueError:
        raise UserError(f"--mesh={text!r}: expected data=N,fsdp=N,tensor=N") from None


def _main(argv: Sequence[str]) -> None:
    fv = _flags(argv)
    config = fv.config
    _check_program(config)  # before resolving (perhaps writing) the checkpoint
    mesh_shape = resolve_mesh(_mesh_arg(fv.mesh) if fv.mesh else dict(config.get("mesh", {})), jax.device_count())
    plan = make_plan(config, None, mesh_shape)
    print(plan.table())
    print(check_fits(plan, fv.device_memory_gb))


def main(argv: Sequence[str] | None = None) -> None:
    """`vlm-jax plan`: argv[0] is the program name ('vlm-jax plan'), the flags follow; errors exit 2."""
    argv_lib.run(_main, argv)
