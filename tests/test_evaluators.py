"""Evaluators declared in the config (`config.evals`, train/evaluators.py): run by the trainer every N steps and
after the last step, written under their name; the few-shot program's selection accuracy as one of them."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import errors
from vlm_jax.data.types import Example
from vlm_jax.programs import fewshot_clip, fewshot_methods
from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.runtime.metrics import MetricWriter
from vlm_jax.train import evaluators

from configs import dualadapter as da_config
from configs import vladva as vladva_config


class _Encoder(nn.Module):
    def setup(self):
        self.proj = nn.Dense(4)

    def encode_image(self, x):
        return self.proj(x.reshape(x.shape[0], -1))


class _Backbone:
    """Stands in for `fewshot_clip.Backbone`: a linear image encoder over 6-dim 'images'."""
    def __init__(self):
        self.model, self.mesh = _Encoder(), mesh_lib.make_mesh()
        self.params = self.model.init(jax.random.key(0), jnp.zeros((1, 6)), method=_Encoder.encode_image)["params"]

    @staticmethod
    def augment_transform(item):
        ex, seed = item
        return np.random.default_rng([*seed, ex.label]).normal(size=6).astype(np.float32) + ex.label


def _split(n, seed):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 4)).astype(np.float32)
    return {"features": f / np.linalg.norm(f, axis=-1, keepdims=True), "labels": rng.integers(0, 3, n).astype(np.int32)}


def _finetune(tmp_path, evals, **kw):
    bb = _Backbone()
    few = [Example(f"/x/{i}.png", i % 3, f"c{i % 3}") for i in range(12)]
    tc = ml_collections.ConfigDict(dict(epochs=3, batch_size=4, optim=dict(name="adam", lr=0.1),
                                        param_groups=[("adapter/.*", 1.0)]))

    def loss(adapter, f, labels, scale):
        logp = jax.nn.log_softmax(scale * f @ adapter["w"])
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)), {}

    writer = MetricWriter(str(tmp_path), tensorboard=False)
    fit = fewshot_methods.finetune(
        bb, few, tc, name="probe", adapter={"w": jnp.zeros((4, 3))}, consts={"scale": jnp.ones(())},
        method_loss=loss, eval_logits=lambda a, f, scale: scale * f @ a["w"], seed=1, workdir=None, writer=writer,
        rng=jax.random.key(0), evals=evals, tests={"test": (_split(20, 2), None)}, **kw)
    writer.close()
    return fit


def test_declared_evaluators_run_every_n_steps_and_at_the_end(tmp_path):
    val = _split(16, 1)
    fit = _finetune(tmp_path, {"val": {"type": "selection", "every_steps": 2}, "t": {"type": "test"}}, select_on=val)
    assert [r["step"] for r in fit.evals["val"]] == [2, 4, 6, 8, 9]      # 3 epochs x 3 steps; the last once
    assert [r["step"] for r in fit.evals["t"]] == [9]
    # The selection evaluator is the per-epoch evaluation of today: equal at the epoch ends it shares (step 6).
    assert fit.evals["val"][2]["accuracy"] == fit.history[1]["val_accuracy"]
    # Outside reference: numpy's argmax accuracy of the final weights on the test split.
    test = _split(20, 2)
    w = np.asarray(fit.state.params["adapter"]["w"])
    want = 100 * np.mean(np.argmax(test["features"] @ w, -1) == test["labels"])
    assert fit.evals["t"][-1]["accuracy"] == pytest.approx(want, abs=1e-4)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "probe/val/accuracy" in r] == [2, 4, 6, 8, 9]
    assert [r["step"] for r in rows if "probe/t/accuracy" in r] == [9]


def test_undeclared_evaluators_keep_the_per_epoch_selection(tmp_path):
    fit = _finetune(tmp_path, None, select_on=_split(16, 1))
    assert fit.evals == {} and [r["epoch"] for r in fit.history] == [0, 1, 2]
    assert all("val_accuracy" in r for r in fit.history)


def test_selection_without_a_selection_split_is_one_line(tmp_path):
    with pytest.raises(errors.UserError, match="needs a selection split"):
        _finetune(tmp_path, {"v": {"type": "selection"}}, keep_epoch=1)


def _check_fewshot(config):
    fewshot_clip.check_choices(config)


def _check_vitask(config):
    from vlm_jax.programs import vitask
    vitask.check_inputs(config)


@pytest.mark.parametrize("program, evals, match", [
    ("dualadapter", {"v": {"type": "suite"}},
     r"evals.v.type='suite' is not an evaluator of this program: use one of selection, test"),
    ("dualadapter", {"v": {"type": "test", "every": 5}}, r"evals.v: unknown key 'every' for type 'test'"),
    ("dualadapter", {"v": {"type": "test", "every_steps": -1}}, r"evals.v.every_steps=-1"),
    ("vitask", {"v": {"type": "suite"}},
     r"evals.v.type='suite' is not an evaluator of this program: use one of ranking"),
    ("vitask", {"v": {"type": "ranking", "split": "train"}}, r"evals.v.split='train': use one of val, test"),
    ("vitask", {"v": {"type": "ranking", "every": 2}}, r"evals.v: unknown key 'every' for type 'ranking'"),
])
def test_unknown_evaluator_type_or_key_is_one_line_before_any_work(program, evals, match):
    from configs import vitask as vitask_config

    module, check = {"dualadapter": (da_config, _check_fewshot), "vitask": (vitask_config, _check_vitask)}[program]
    config = module.get_config("runlocal")
    config.evals = evals
    with pytest.raises(errors.UserError, match=match) as e:
        check(config)
    assert "\n" not in str(e.value)


def test_every_config_declares_evals_and_mesh_rules_by_one_name():
    from configs import vitask as vitask_config
    for cfg in (da_config.get_config("runlocal"), vladva_config.get_config("runlocal"),
                vitask_config.get_config("runlocal")):
        assert tuple(cfg.mesh_rules) == ()
    assert evaluators.check(vladva_config.get_config("runlocal").evals, {"suite": lambda: None}) == []

