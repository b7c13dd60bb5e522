"""`vlm-jax plan --compile`: XLA's own memory figures for the program's REAL jitted train step, beside the plan's
analytic rows.

The step is the one the run builds: the program's inputs (`vladva.train_data`, its checkpoint, tokens and row
lengths), its loss (`methods.vladva.make_loss_fn`), its params (`vladva.initial_params`) split and placed as
`trainer.fit` places them (`trainer.param_labels` / `partition` / `make_optimizer` / `placed_shardings` /
`state_shardings`) and its step (`trainer.make_train_step`), lowered on abstract inputs (`jax.ShapeDtypeStruct`
with their shardings: no weight is read) and compiled for the local devices. `compiled.memory_analysis()` gives
per device: argument bytes (the state, the frozen params and the batch), output bytes, temp bytes (XLA's
scratch: the activations it keeps) and alias bytes (outputs written into donated arguments, the state).

jit drops arguments the step never reads (`keep_unused=False`: e.g. the vision tower's layers after LLaVA's
vision_feature_layer), so XLA's argument bytes can be below the plan's parameter rows by exactly those leaves.
Planned for vladva only; the other programs get one line saying so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

COMPILED = ("vladva",)


def _sds(x, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _master(x) -> jax.ShapeDtypeStruct:
    """The trainer's float32 master copy of a trainable leaf (`trainer._master`), abstractly."""
    up = jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4
    return jax.ShapeDtypeStruct(x.shape, jnp.float32 if up else x.dtype, sharding=x.sharding)


def abstract_step_args(params, groups, optim: Mapping[str, Any], total_steps: int, mesh):
    """(tx, abstract TrainState, abstract frozen params, state shardings) as `trainer.fit` builds them from `params`
    (ShapeDtypeStructs; a leaf with a NamedSharding on `mesh` keeps it, the others are replicated)."""
    from vlm_jax.train import trainer

    labels = trainer.param_labels(params, groups)
    trainable, frozen = trainer.partition(params, labels)
    trainable = jax.tree.map(_master, trainable)
    tx = trainer.make_optimizer(optim, labels, total_steps)
    shardings = trainer.state_shardings(tx, trainer.placed_shardings(trainable, mesh), trainable, mesh)
    state = jax.eval_shape(lambda p: trainer.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                        opt_state=tx.init(p)), trainable)
    state = jax.tree.map(_sds, state, shardings)
    frozen = jax.tree.map(_sds, frozen, trainer.placed_shardings(frozen, mesh))
    return tx, state, frozen, shardings


def analysis(compiled) -> dict[str, int]:
    """XLA's per-device memory figures of a compiled executable."""
    m = compiled.memory_analysis()
    return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes}


def nbytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def vladva_step(config, mesh_shape: Mapping[str, int]) -> dict[str, Any]:
    """Lowers and compiles vladva's train step on abstract inputs; {'memory': `analysis`, 'state', 'frozen',
    'batch': their bytes per device, 'unused': the bytes of the arguments jit pruned, 'prompt_tokens': the soft
    prompts' real lengths}."""
    import dataclasses

    from vlm_jax.convert import stream
    from vlm_jax.data import lvlm_inputs, pairs, tokenize
    from vlm_jax.methods import vladva as disc
    from vlm_jax.programs import plan_programs, runner
    from vlm_jax.programs import vladva as program
    from vlm_jax.runtime import mesh as mesh_lib
    from vlm_jax.train import trainer

    mc, tc, dc, me = config.model, config.train, config.data, config.method
    data = program.train_data(config)
    ckpt, _ = program.resolve_checkpoints(config, data)   # as the run: a replica's tokenizer trained on its texts
    family, cfg, model, abstract = plan_programs.abstract_lvlm(ckpt, mc)
    tok = tokenize.load_tokenizer(ckpt)
    inputs = lvlm_inputs.for_checkpoint(ckpt, cfg, tok, mc.get("image_size", 0))
    tokens = program.prompt_tokens(ckpt, config, tok, inputs)
    split = [pairs.split_captions(tokens, (s, l)) for _, s, l in data[0]]
    long_len = program.check_lengths(tokens, dc, [l for _, l in split if l])
    tokens = pairs.Tokens(tokens.fmt, dataclasses.replace(tokens.spec, long_len=long_len))
    mesh = mesh_lib.make_mesh(dict(mesh_shape))
    rules = mesh_lib.rules_from_config(config.get("mesh_rules"))
    base = jax.tree.map(_sds, _unbox(abstract),
                        stream.shardings_for(model, mesh, rules, abstract=abstract))
    rng = jax.random.key(config.rng_seed)
    params = jax.eval_shape(lambda b: program.initial_params(b, tokens, me, rng), base)
    params["base"] = base   # eval_shape forgets the shardings the load gives the base
    bs = runner.batch_size(tc.batch_size, len(data[0]), mesh)
    tx, state, frozen, shardings = abstract_step_args(params, [tuple(g) for g in tc.param_groups],
                                                      tc.optim.to_dict(), tc.epochs * (len(data[0]) // bs), mesh)
    loss_fn = disc.make_loss_fn(model, lora_alpha=me.lora_alpha, lora_rank=me.lora_rank, temperature=me.temperature,
                                ntp_weight=me.ntp_weight, grad_cache_chunks=tc.grad_cache_chunks)
    step = trainer.make_train_step(loss_fn, tx, rng, state_shardings=shardings)
    (image, short, long), = [(data[0][0][0], split[0][0], split[0][1])]
    one = pairs.train_batch(tokens, inputs.load_batch([program._source(image)]), [short], [long])
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((bs, *x.shape[1:]), x.dtype,
                                                        sharding=mesh_lib.batch_sharding(mesh)), one)
    lowered = step.lower(state, frozen, batch)
    # The leaves jit kept (its private `kept_var_idx`; a jax without it fails here, loudly): the others are pruned.
    kept = lowered._lowering.compile_args["kept_var_idx"]
    leaves = jax.tree.leaves((state, frozen, batch))
    return {"memory": analysis(lowered.compile()), "state": nbytes(state), "frozen": nbytes(frozen),
            "batch": nbytes(batch), "unused": nbytes([x for i, x in enumerate(leaves) if i not in kept]),
            "prompt_tokens": (len(tokens.image_prompt), len(tokens.text_prompt))}


def _unbox(abstract):
    import flax.linen as nn

    return nn.meta.unbox(abstract)


def compiled_rows(config, mesh_shape: Mapping[str, int]) -> tuple[dict[str, int] | None, str]:
    """(XLA's figures or None, a line saying what was compiled or why not)."""
    if config.program not in COMPILED:
        return None, f"--compile: compiles the {', '.join(COMPILED)} train step so far, not {config.program!r}'s"
    need = math.prod(mesh_shape.values())
    if need > jax.device_count():
        return None, (f"--compile: mesh {dict(mesh_shape)} needs {need} devices, {jax.device_count()} present "
                      f"here: not compiled")
    got = vladva_step(config, mesh_shape)
    return got["memory"], (f"--compile: XLA memory_analysis of the {config.program} train step on "
                           f"{jax.devices()[0].platform}, {need} device(s); arguments: state {got['state']}, frozen "
                           f"params {got['frozen']}, batch {got['batch']} bytes, of which {got['unused']} unused "
                           f"(pruned by jit)")
