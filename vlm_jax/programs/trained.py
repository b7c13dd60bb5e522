"""A trained run, loaded from its workdir: what `vlm-jax eval`, `predict` and `export` start from.

A workdir (`vlm-jax train`) holds config.json (the resolved config), results.json once the run finished, and
one orbax checkpoint folder per training (`checkpoints/<fit name>`, `train.trainer.fit`): e.g.
'dualadapter_f-4shot-seed1' (few-shot CLIP), 'vladva', 'tsm' + 'vanilla' + 'vitask_stage1' + 'vitask_stage2'
(VITask). Each step's items are 'state' (the trainable params, float32 master weights, and the optimizer state),
'best' (the trainable params of the epoch the run kept, when it selected one on a metric) and 'meta' (position,
history, checksums). `restore_fit` reads the kept params back as host arrays: 'best' when the run kept an epoch,
else the final 'state', verified against the checksums written with them.

`load(workdir)` gathers it all: the config, the program ('fewshot_clip', 'vladva', 'vitask'), the base checkpoints
resolved exactly as the run resolved them (the program's own `runner.resolve_checkpoint` calls, so an offline
replica gets the same tokenizer), the base model and params, and every fit's kept params.

Training-free few-shot methods (zero-shot CLIP, Tip-Adapter, DualAdapter) keep nothing in a checkpoint: their
classifiers and caches are rebuilt from the config (text prompts, the K shots drawn with the run's seed), which is
what `fewshot_clip.run` does under `scratch_workdir` + `trainer.restore_only` (see `vlm-jax eval`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from vlm_jax import errors

if TYPE_CHECKING:   # jax is imported where it is used: a bad --workdir is one quick line
    import jax

PyTree = Any
PROGRAMS = ("fewshot_clip", "vladva", "vitask")   # the programs whose workdirs these commands understand


class NotAWorkdir(errors.UserError):
    """The directory is not the workdir of a vlm_jax run (or not one this version can read)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """A workdir's run, as written by `vlm-jax train` (nothing loaded yet).

    Attributes:
      workdir: the absolute path.
      config: the run's config (config.json), a ConfigDict.
      program: the config's program, one of `PROGRAMS`.
      results: results.json, or None when the run has not finished.
    """
    workdir: str
    config: ml_collections.ConfigDict
    program: str
    results: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class Fit:
    """The params one training kept (`train.trainer.fit` named `name`).

    Attributes:
      name: the fit's name, its folder under checkpoints/.
      step: the checkpoint step read (the last one written).
      epoch: the kept epoch (the best on the run's metric, else the last).
      params: the trainable params of that epoch, host numpy arrays (float32 master weights), the tree the
        program trained (e.g. {'lora', 'image_prompt', 'text_prompt'} for VladVA).
    """
    name: str
    step: int
    epoch: int
    params: PyTree


@dataclasses.dataclass(frozen=True)
class Trained:
    """A loaded run (`load`).

    Attributes:
      run: the run (config, program, results).
      checkpoints: role -> resolved base checkpoint directory: 'model' (the CLIP, or the LVLM), plus 'clip'
        (VladVA's CLIP baseline, when configured) or 'tsm' (VITask's task-specific model's tower).
      model: the base model: a `convert.dual_encoder.DualEncoder` (few-shot CLIP; `.model`, `.params`) or the
        LVLM's Flax module (None when loaded with `with_model=False`).
      base: the LVLM's base params, placed on the mesh (None for few-shot CLIP: `model.params`; or unloaded).
      fits: fit name -> `Fit`, every training of the workdir.
    """
    run: Run
    checkpoints: dict[str, str]
    model: Any
    base: PyTree
    fits: dict[str, Fit]


# ----------------------------------------------------------------------------------------------------------
# The run.

def read_run(workdir: str) -> Run:
    """The run of `workdir` (config.json, results.json); nothing heavy is imported or loaded.

    Raises:
      NotAWorkdir: not a directory, no or unreadable config.json, or a program this version does not have.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise NotAWorkdir(f"--workdir {workdir} is not a directory")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise NotAWorkdir(f"{workdir} is not the workdir of a run: it has no config.json (vlm-jax train writes one)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise NotAWorkdir(f"{path} cannot be read: {' '.join(str(e).split())}") from None
    program = raw.get("program") if isinstance(raw, dict) else None
    if program not in PROGRAMS:
        raise NotAWorkdir(f"{path} names program {program!r}, which this version of vlm_jax cannot evaluate "
                          f"(known: {', '.join(PROGRAMS)}): written by another version?")
    results = None
    if os.path.isfile(os.path.join(workdir, "results.json")):
        with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
    return Run(workdir, ml_collections.ConfigDict(raw), program, results)


def with_overrides(run: Run, args: Sequence[str]) -> Run:
    """`run` with `--config.KEY=VALUE` arguments applied to its config, parsed as the launcher parses them.

    Only the keys that do not change what was trained are accepted: `runtime.workdir.RESUME_EXEMPT` (where the
    data lives, the mesh, evaluation batch size, sets and evaluators), e.g. for data moved since training or
    other hardware.

    Raises:
      UserError: a key the run's config does not have, one that would change what was trained, or a bad value.
    """
    if not args:
        return run
    from absl import flags
    from ml_collections import config_flags

    from vlm_jax.programs import commands
    from vlm_jax.runtime import workdir as workdir_lib

    for arg in args:
        key = arg[len("--config."):].split("=", 1)[0]
        node: Any = run.config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise errors.UserError(f"unknown config key: --config.{key} is not a key of {run.workdir}/config.json")
            node = node[part]
        if not any(fnmatch.fnmatchcase(key, p) for p in workdir_lib.RESUME_EXEMPT):
            raise errors.UserError(
                f"--config.{key} would change what the run trained: eval and predict take only keys matching "
                f"{', '.join(workdir_lib.RESUME_EXEMPT)} (to change {key}, train again with vlm-jax train)")
    values, argv = flags.FlagValues(), ["vlm-jax", *args]
    try:   # sys_argv: config_flags finds the overrides in it (by default it reads sys.argv)
        holder = config_flags.DEFINE_config_dict("config", run.config.copy_and_resolve_references(),
                                                 flag_values=values, sys_argv=argv)
        values(argv)
    except Exception as e:  # noqa: BLE001 - absl's flags.Error, or the config's own (a value of the wrong type)
        raise errors.UserError(commands.flag_error(e)) from None
    return dataclasses.replace(run, config=holder.value)


def program_module(run: Run):
    """The `vlm_jax.programs` module that ran `run` (its `run(config, workdir)`)."""
    return importlib.import_module(f"vlm_jax.programs.{run.program}")


@contextlib.contextmanager
def version_errors(run: Run) -> Iterator[None]:
    """Turns a config key the code asks for but config.json lacks (a workdir of another version) into one line."""
    try:
        yield
    except (AttributeError, KeyError) as e:
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        if "ml_collections" not in tb.tb_frame.f_code.co_filename:
            raise
        raise NotAWorkdir(f"{run.workdir}/config.json lacks a key this version of vlm_jax reads "
                          f"({' '.join(str(e).split())[:160]}): written by another version?") from None


@contextlib.contextmanager
def scratch_workdir(run: Run, config: ml_collections.ConfigDict | None = None) -> Iterator[str]:
    """A temporary workdir that sees `run`'s checkpoints and feature cache (links) and its config.json: a
    program run in it under `trainer.restore_only()` evaluates the kept state and writes its results, metrics
    and TensorBoard events there, never into the run's workdir. Removed afterwards.

    `config`: the config.json to write instead of the run's (a caller that changed keys which do not change
    what was trained, e.g. few-shot CLIP's methods or protocol)."""
    tmp = tempfile.mkdtemp(prefix="vlm-jax-")
    try:
        for name in ("checkpoints", "features"):
            if os.path.isdir(os.path.join(run.workdir, name)):
                os.symlink(os.path.join(run.workdir, name), os.path.join(tmp, name))
        if config is None:
            shutil.copyfile(os.path.join(run.workdir, "config.json"), os.path.join(tmp, "config.json"))
        else:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                f.write(config.to_json_best_effort(indent=1))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints.

def fit_names(workdir: str) -> list[str]:
    """The fits with a checkpoint folder in `workdir`, sorted."""
    root = os.path.join(workdir, "checkpoints")
    return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))) if os.path.isdir(root) else []


def _restore_kept(manager, step: int) -> tuple[dict[str, Any], str, PyTree]:
    """(meta, the kept item: 'best' when the run selected an epoch else 'state', its tree) of `step`, as host
    arrays."""
    import jax
    import orbax.checkpoint as ocp

    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    item = "best" if meta.get("best_epoch", -1) >= 0 else "state"
    tree = manager.item_metadata(step)[item].tree
    target = {"params": tree["params"]} if item == "state" else tree
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), target)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    got = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)}))[item]
    return meta, item, got


def _damaged(workdir: str, directory: str, step: int, why: str) -> errors.UserError:
    return errors.UserError(
        f"checkpoint step {step} in {directory} is damaged ({why}): rerun `vlm-jax train` with the run's --config "
        f"and --workdir={workdir} to retrain from the newest good step, then run this command again")


def restore_fit(workdir: str, name: str) -> Fit:
    """The params fit `name` kept ('best' if the run selected an epoch, else the final state's), as host arrays.

    Only the newest step is read: an older one is a training that had not finished. When the newest is damaged,
    the training's resume (`train.checkpoints.restore_newest`) would go back to the newest good step and train
    again from there, which is what the error says to do.

    Raises:
      UserError: no checkpoint of that name, or its newest step cannot be read or does not match its checksum.
    """
    import jax
    import orbax.checkpoint as ocp

    from vlm_jax.runtime import mesh as mesh_lib
    from vlm_jax.train import checkpoints as ckpt_lib

    directory = os.path.join(workdir, "checkpoints", name)
    if not os.path.isdir(directory):
        raise errors.UserError(f"no checkpoint {name!r} in {workdir}/checkpoints (there: "
                               f"{', '.join(fit_names(workdir)) or 'none'})")
    handlers = {"best": ocp.PyTreeCheckpointHandler(), "state": ocp.PyTreeCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    # save_interval_steps=0, create=False: what read_only implies (orbax warns about each when they are left out).
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    step = manager.latest_step()
    if step is None:
        raise errors.UserError(f"{directory} holds no finished checkpoint step")
    try:
        # As the training's resume reads a damaged step: without tensorstore's late 'Event loop is closed' noise.
        with ckpt_lib._quiet_closed_event_loop():
            meta, item, got = _restore_kept(manager, step)
    except Exception as e:  # noqa: BLE001 - whatever a damaged or foreign folder raises
        raise _damaged(workdir, directory, step, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
    finally:
        manager.close()
    params = got["params"] if item == "state" else got
    want = meta.get("checksum", {}).get(item)
    if want is not None:
        # On this process's own device: every process of a multi-process eval checks its own host copy.
        sums, _ = ckpt_lib.tree_checksum(params, mesh_lib.make_mesh({"data": 1}, jax.local_devices()[:1]))
        # The state's checksums run over (step, params..., optimizer state...): the params' are 1..n.
        if sums != (want if item == "best" else want[1:1 + len(sums)]):
            raise _damaged(workdir, directory, step, f"its {item} params do not match the checksum written with them")
    epoch = int(meta["best_epoch"]) if item == "best" else int(meta["epoch"]) - 1
    return Fit(name, int(step), epoch, params)


# ----------------------------------------------------------------------------------------------------------
# The base checkpoints and the whole run.

def resolve_checkpoints(run: Run) -> dict[str, str]:
    """role -> base checkpoint directory, resolved by the program's own calls (see `Trained.checkpoints`)."""
    from vlm_jax.programs import runner

    config = run.config
    with version_errors(run):
        if run.program == "fewshot_clip":
            return {"model": runner.resolve_checkpoint(config.model.checkpoint, "configs/dualadapter.py")}
        module = program_module(run)
        if run.program == "vladva":
            ckpt, clip = module.resolve_checkpoints(config, module.train_data(config))
            return {"model": ckpt, **({"clip": clip} if clip else {})}
        inputs = module.check_inputs(config)   # vitask: the task's texts train an offline replica's tokenizer
        return {"model": inputs.ckpt, "tsm": inputs.clip_dir}


def load(workdir: str | Run, mesh: jax.sharding.Mesh | None = None, with_model: bool = True,
         checkpoints: dict[str, str] | None = None, fits: Sequence[str] | None = None) -> Trained:
    """The trained run of `workdir` (see the module docstring).

    Args:
      workdir: a workdir written by `vlm-jax train`, or its `Run` (e.g. `with_overrides`: its config is used).
      mesh: where the LVLM's base params go (default: the run's config.mesh).
      with_model: load the base model and params (False: config, checkpoints and fits only).
      checkpoints: the base checkpoints when the caller has resolved them already (`resolve_checkpoints`).
      fits: the fits to restore (default: every fit of the workdir); one the workdir lacks is left out.

    Raises:
      UserError: not a workdir, a config of another version, a base checkpoint that cannot be found, no
        checkpoint at all, or a damaged one (one line each).
    """
    from vlm_jax.programs import runner

    run = workdir if isinstance(workdir, Run) else read_run(workdir)
    names = fit_names(run.workdir)
    if not names and run.program != "fewshot_clip":
        raise errors.UserError(f"{run.workdir} holds no checkpoint: its training did not save one yet")
    checkpoints = checkpoints or resolve_checkpoints(run)
    kept = {n: restore_fit(run.workdir, n) for n in names if fits is None or n in fits}
    model = base = None
    if with_model:
        with version_errors(run):
            if run.program == "fewshot_clip":
                from vlm_jax.convert import dual_encoder
                model = dual_encoder.load_dual_encoder(checkpoints["model"], run.config.model.dtype)
            else:
                run_mesh, rules = runner.make_mesh(run.config)   # the run's config.mesh_rules too
                model, base = runner.load_lvlm(checkpoints["model"], run.config.model, mesh or run_mesh, rules)
    return Trained(run, checkpoints, model, base, kept)
