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
  activations       an analytic estimate of what the backward pass keeps (`plan_programs`: each family's image
                    tokens and tower, each program's passes): an estimate, not a measurement; XLA's fusion and
                    rematerialisation move it either way.
  --compile         the program's real jitted train step lowered and compiled on abstract inputs for the local
                    devices, XLA's `memory_analysis()` printed beside the rows (`plan_compile`; vladva only).

The run is refused, in one line, when the sum exceeds --device_memory_gb or the memory the first device reports
(GPU / TPU; a CPU reports none). Programs: vladva and vitask on every LVLM family (llava, internvl, qwen2_vl),
fewshot_clip on every dual encoder; the per-program planners are in `plan_programs`, the shared arithmetic in
`plan_core`. Modules: plan (CLI, verdict), plan_core, plan_programs, plan_compile.
"""


from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

from vlm_jax.errors import UserError
from vlm_jax.programs import argv as argv_lib
from vlm_jax.programs.plan_core import GiB, Plan, gib, resolve_mesh

PLANNED = ("vladva", "vitask", "fewshot_clip")


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
    flags.DEFINE_bool("compile", False, "also lower + compile the real train step on abstract inputs and print "
                      "XLA's memory_analysis (local devices only)", flag_values=fv)
    try:
        fv(argv)
    except Exception as e:  # absl flags.Error, or the config file's own error
        raise UserError(f"vlm-jax plan: bad flag or unknown config key: {' '.join(str(e).split())}") from None
    if fv.config is None:
        raise UserError("vlm-jax plan: --config=configs/<method>.py[:args] is required")
    return fv


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
    if fv.compile:
        from vlm_jax.programs import plan_compile

        got, line = plan_compile.compiled_rows(config, mesh_shape)
        print(line)
        for name, b in (got or {}).items():
            print(f"  XLA {name:<16}{gib(b):>14}")
    print(check_fits(plan, fv.device_memory_gb))


def main(argv: Sequence[str] | None = None) -> None:
    """`vlm-jax plan`: argv[0] is the program name ('vlm-jax plan'), the flags follow; errors exit 2."""
    argv_lib.run(_main, argv)
