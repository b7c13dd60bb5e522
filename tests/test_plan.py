"""`vlm-jax plan` (programs/plan.py, plan_core.py, plan_programs.py, plan_compile.py): the bytes it predicts from shapes alone
equal what loading places on a device (here one device, one replica per LVLM family; tests/sharded_load_child.py
checks sharded meshes), the trainable counts equal what the programs' init functions make, XLA's argument bytes of
the real compiled step equal the plan's rows, and a run that does not fit is refused in one line."""

import json

import jax
import jax.numpy as jnp
import pytest

from vlm_jax.methods import dualadapter, tip_adapter
from vlm_jax.methods import vladva as disc
from vlm_jax.models import peft
from vlm_jax.programs import plan, plan_compile, plan_core, runner
from vlm_jax.runtime import mesh as mesh_lib

import configs.dualadapter as dualadapter_config  # noqa: E402  (the repository root is on sys.path under pytest)
import configs.vitask as vitask_config  # noqa: E402
import configs.vladva as vladva_config  # noqa: E402

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.fixture(scope="module")
def family_replica(request, tmp_path_factory):
    """The llava-1.5 replica (the session's) or an InternVL / Qwen2-VL replica written for this module."""
    from vlm_jax.testing import replicas

    def get(name):
        if name == "llava-1.5":
            return request.getfixturevalue("llava15_replica")
        return replicas.write_replica(name, tmp_path_factory.mktemp("replica") / name)
    return get


@pytest.mark.parametrize("name", ["llava-1.5", "internvl2-2b", "qwen2-vl"])
def test_param_bytes_equal_the_loaded_bytes(family_replica, name):
    ckpt = family_replica(name)
    config = vladva_config.get_config("runlocal")
    got = plan.make_plan(config, str(ckpt), ONE)
    mesh = mesh_lib.make_mesh(ONE)
    _, params = runner.load_lvlm(str(ckpt), config.model, mesh)
    device = jax.devices()[0]
    loaded = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == device)
    assert got.rows["base params"] == loaded
    assert json.load(open(ckpt / "config.json"))["model_type"] in got.notes[0]
    # LoRA: the shapes plan counts are those lora_init creates (abstractly: no memory).
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    real = jax.eval_shape(lambda: peft.lora_init(base, jax.random.key(0), targets=disc.LORA_TARGETS,
                                                 rank=config.method.lora_rank))
    planned = plan_core.lora_shapes(base, config.method.lora_targets, config.method.lora_rank)
    assert jax.tree.map(lambda x: x.shape, planned) == jax.tree.map(lambda x: x.shape, real)
    assert got.rows["optimizer (adamw)"] == 2 * got.rows["trainable (f32)"] > 0


def _count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def test_fewshot_clip_plan_counts_the_largest_trainable_set():
    config = dualadapter_config.get_config("runlocal")
    got = plan.make_plan(config, None, ONE)
    ckpt = plan_core.checkpoint_config_dir(config.model.checkpoint)
    dim = json.load(open(f"{ckpt}/config.json"))["projection_dim"]   # the HF config: the embedding width
    from vlm_jax.data import builtin
    c, k = len(builtin.builtin_dataset().classnames), config.data.shots
    tip = _count(tip_adapter.finetune_init(jnp.zeros((c * k, dim))))
    dual = _count(dualadapter.init_residuals(c, dim))
    assert got.rows["trainable (f32)"] == 4 * max(tip, dual)
    assert got.rows["optimizer"] == 2 * got.rows["trainable (f32)"]   # AdamW: two moments


def test_vitask_plan_reports_its_peak_stage(llava15_replica):
    config = vitask_config.get_config("runlocal")
    with config.unlocked():
        config.model.checkpoint = str(llava15_replica)
    got = plan.make_plan(config, None, ONE)
    # Stage 2 (three LM passes: plain, exemplar, negative) peaks; it trains the LoRA only.
    assert got.notes[0].startswith("peak stage: stage 2")
    params = runner.load_lvlm(str(llava15_replica), config.model, mesh_lib.make_mesh(ONE))[1]
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    lora = jax.eval_shape(lambda: peft.lora_init(base, jax.random.key(0), targets=config.method.lora_targets,
                                                 rank=config.method.lora_rank))
    assert got.rows["trainable (f32)"] == 4 * _count(lora)
    assert any(n.startswith("tsm: ") for n in got.notes)


def test_compiled_step_arguments_equal_the_plan(llava15_replica):
    """XLA's argument bytes of vladva's real step == the plan's rows, up to exactly: the soft prompts (planned at
    one token per character, compiled at their real token counts), the int32 step and optimizer counts, the
    batch, and the arguments jit prunes as unused."""
    config = vladva_config.get_config("runlocal")
    with config.unlocked():
        config.model.checkpoint = str(llava15_replica)
    got = plan.make_plan(config, None, ONE)
    xla = plan_compile.vladva_step(config, ONE)
    me, width = config.method, 32   # the replica's LM width (its config.json text_config.hidden_size)
    assert json.load(open(llava15_replica / "config.json"))["text_config"]["hidden_size"] == width
    planned_tokens = max(len(me.image_prompt), len(me.text_prompt))
    excess = (2 * planned_tokens - sum(xla["prompt_tokens"])) * width * 4 * 3   # param + Adam's mu and nu
    counts = 4 * (1 + 2)   # the step; adamw's ScaleByAdamState.count and the schedule's count (one lr group)
    r = got.rows
    assert xla["frozen"] == r["base params"]
    assert xla["state"] == r["trainable (f32)"] + r["optimizer (adamw)"] - excess + counts
    assert xla["memory"]["argument"] == xla["state"] + xla["frozen"] + xla["batch"] - xla["unused"]
    assert xla["memory"]["alias"] == xla["state"]   # the donated state is updated in place
    assert 0 < xla["unused"] < r["base params"]


def test_main_prints_the_plan_and_refuses_in_one_line(llava15_replica, capsys):
    args = ["vlm-jax plan", "--config=configs/vladva.py:runlocal", f"--config.model.checkpoint={llava15_replica}"]
    plan.main(args + ["--device_memory_gb=100", "--compile", "--mesh=data=2"])
    out = capsys.readouterr().out
    assert "base params" in out and "activations (est.)" in out and "fits:" in out
    assert "needs 2 devices, 1 present here: not compiled" in out
    for extra, msg in [(["--device_memory_gb=0.001"], "the run needs"), (["--mesh=tensor=3"], "cannot be split"),
                       (["--config.nope=1"], "unknown config key")]:
        with pytest.raises(SystemExit) as e:
            plan.main(args + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
