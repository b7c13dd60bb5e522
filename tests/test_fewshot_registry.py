"""The few-shot method registry: names, the one-line error, and a method added without touching the runner."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from vlm_jax import errors
from vlm_jax.data.builtin import builtin_dataset
from vlm_jax.eval import classification
from vlm_jax.methods import fewshot_registry as registry
from vlm_jax.programs import fewshot_methods as fm
from vlm_jax.programs import fewshot_realistic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("dualadapter_config", os.path.join(ROOT, "configs", "dualadapter.py"))
da_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(da_config)


def test_names_are_the_configs_and_the_reports():
    # Every default method of the config is registered under that name, and the report's rows come from the faces.
    assert set(da_config.METHODS) <= set(registry.names())
    assert list(registry.display_names())[:5] == ["zeroshot", "tip_adapter", "tip_adapter_f", "dualadapter",
                                             "dualadapter_f"]
    for name in registry.names():
        face = registry.get(name)
        assert face.name == name and set(face.needs) <= registry.NEEDS


def test_unknown_method_is_one_line_listing_the_known_ones():
    with pytest.raises(errors.UserError) as err:
        registry.get("tip_adaptr")
    msg = str(err.value)
    assert "\n" not in msg and "'tip_adaptr'" in msg and all(n in msg for n in registry.names())
    config = da_config.get_config("runlocal")
    del config.tip_adapter
    with pytest.raises(errors.UserError, match="needs the config block config.tip_adapter"):
        registry.check(config, ["zeroshot", "tip_adapter_f"])


class _NearestMean:
    """A method defined here, in a test: the class means of the cache keys as the classifier."""

    name, display_name, order, config_block, templates = "nearest_mean", "Nearest mean", 99, None, ()
    needs = frozenset({"cache"})

    def check(self, config):
        pass

    def _result(self, ctx):
        keys, labels = np.asarray(ctx.cache["keys"]), np.asarray(ctx.cache["labels"])
        means = np.stack([keys[labels == c].mean(0) for c in range(ctx.num_classes)])
        res = {}
        registry.evaluate(res, lambda f, w: f @ w.T, (means,), ctx.tests)
        return res, means

    def run_paper(self, ctx):
        res, means = self._result(ctx)
        return {"val_accuracy": float(classification.accuracy(ctx.val["features"] @ means.T, ctx.val["labels"])),
                **res}

    def run_realistic(self, ctx):
        return {**self._result(ctx)[0], "hparams": {}}


class _Writer:
    def __init__(self):
        self.rows = []

    def write(self, step, metrics, prefix=""):
        self.rows.append((step, prefix, dict(metrics)))


def test_a_registered_method_runs_under_both_protocols_without_touching_the_runner(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "nearest_mean", _NearestMean())
    rng = np.random.default_rng(0)
    ds = builtin_dataset()
    c, d = len(ds.classnames), 8
    centers = rng.normal(size=(c, d))

    def split(n):
        y = np.arange(n) % c
        f = centers[y] + 0.3 * rng.normal(size=(n, d))
        return {"features": (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32),
                "labels": y.astype(np.int32)}

    cache = split(2 * c)
    cache = {"keys": cache["features"], "labels": cache["labels"]}
    val, test = split(3 * c), split(5 * c)
    text = {k: split(c)["features"] for k in ("template/tip_adapter", "template/dualadapter", "negative")}
    config = da_config.get_config("runlocal")
    writer = _Writer()
    kw = dict(shots=2, seed=1, workdir=None, writer=writer, rng=jax.random.key(0))
    paper = fm.run_paper(config, ["nearest_mean", "zeroshot"], None, ds, [], [], text, val, {"test": (test, None)},
                         cache, **kw)
    real = fewshot_realistic.run_realistic(config, ["nearest_mean"], None, ds, [], text, val,
                                           {"test": (test, None)}, cache, **kw)
    # An outside computation: the class means of the cache, scored by cosine.
    means = np.stack([cache["keys"][cache["labels"] == k].mean(0) for k in range(c)])
    want = 100.0 * np.mean(np.argmax(test["features"] @ means.T, 1) == test["labels"])
    assert paper["nearest_mean"]["test_accuracy"] == real["nearest_mean"]["test_accuracy"] == pytest.approx(want)
    assert want > 90.0 and list(paper) == ["nearest_mean", "zeroshot"]
    assert real["nearest_mean"]["folds"] == 2 and "seconds" in real["nearest_mean"]
    assert [p for _, p, _ in writer.rows] == ["nearest_mean/seed1/", "zeroshot/seed1/", "nearest_mean/seed1/realistic/"]
