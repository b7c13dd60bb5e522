"""`vlm-jax plan` (programs/plan.py): the bytes it predicts from shapes alone equal what loading places on a
device (here one device; tests/sharded_load_child.py checks sharded meshes), the trainable count equals what
`peft.lora_init` makes, and a run that does not fit is refused in one line."""

import jax
import pytest

from vlm_jax.convert import llava as llava_convert
from vlm_jax.methods import vladva as disc
from vlm_jax.models import peft
from vlm_jax.programs import plan

import configs.vladva as vladva_config  # noqa: E402  (the repository root is on sys.path under pytest)

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def test_param_bytes_equal_the_loaded_bytes(llava15_replica):
    config = vladva_config.get_config("runlocal")
    got = plan.make_plan(config, str(llava15_replica), ONE)
    _, params = llava_convert.from_pretrained(llava15_replica)
    device = jax.devices()[0]
    loaded = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == device)
    assert got.rows["base params"] == loaded
    # LoRA: the shapes plan counts are those lora_init creates (abstractly: no memory).
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    real = jax.eval_shape(lambda: peft.lora_init(base, jax.random.key(0), targets=disc.LORA_TARGETS,
                                                 rank=config.method.lora_rank))
    planned = plan.lora_shapes(base, config.method.lora_targets, config.method.lora_rank)
    assert jax.tree.map(lambda x: x.shape, planned) == jax.tree.map(lambda x: x.shape, real)
    assert got.rows["optimizer (adamw)"] == 2 * got.rows["trainable (f32)"] > 0


def test_main_prints_the_plan_and_refuses_in_one_line(llava15_replica, capsys):
    args = ["vlm-jax plan", "--config=configs/vladva.py:runlocal", f"--config.model.checkpoint={llava15_replica}"]
    plan.main(args + ["--device_memory_gb=100"])
    out = capsys.readouterr().out
    assert "base params" in out and "activations (est.)" in out and "fits:" in out
    for extra, msg in [(["--device_memory_gb=0.001"], "the run needs"), (["--mesh=tensor=3"], "cannot be split"),
                       (["--config.nope=1"], "unknown config key")]:
        with pytest.raises(SystemExit) as e:
            plan.main(args + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        plan.main(["vlm-jax plan", "--config=configs/dualadapter.py:runlocal"])
    assert "plan supports the vladva" in capsys.readouterr().err
