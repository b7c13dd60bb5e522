"""Zero-shot CLIP, Tip-Adapter and Tip-Adapter-F against direct numpy / torch transcriptions of the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from vlm_jax.eval import classification
from vlm_jax.methods import dualadapter, tip_adapter as tip


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _problem(seed=0, c=3, k=2, d=4, b=5):
    rng = np.random.default_rng(seed)
    keys = _unit(rng.normal(size=(c * k, d))).astype(np.float32)
    values = np.repeat(np.eye(c, dtype=np.float32), k, 0)
    feats = _unit(rng.normal(size=(b, d))).astype(np.float32)
    w = _unit(rng.normal(size=(c, d))).astype(np.float32)
    y = rng.integers(0, c, b)
    return feats, y, w, keys, values


def test_zero_shot_hand_checked():
    f = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    w = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    np.testing.assert_allclose(tip.zero_shot_logits(f, w), [[100, 0, 60], [60, 80, 100]], rtol=1e-6)


def test_logits_formula():
    feats, _, w, keys, values = _problem()
    out = tip.logits(feats, w, keys, values, alpha=1.17, beta=5.5)
    f, w64, k64 = (x.astype(np.float64) for x in (feats, w, keys))
    want = 100 * f @ w64.T + 1.17 * np.exp(-5.5 * (1 - f @ k64.T)) @ values
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    # Hand-checked: one key equal to the feature contributes exp(0) = 1 to its class.
    f1 = np.array([[1.0, 0.0]], np.float32)
    out = tip.logits(f1, np.zeros((2, 2), np.float32), np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.eye(2),
                     alpha=2.0, beta=3.0)
    np.testing.assert_allclose(out, [[2.0, 2.0 * np.exp(-3.0)]], rtol=1e-6)


def test_logits_accepts_dualadapter_caches_and_traced_hparams():
    feats, _, w, keys, _ = _problem(seed=1)
    caches = dualadapter.build_caches(keys, np.repeat(np.arange(3), 2), 3)
    params = tip.finetune_init(caches)
    np.testing.assert_array_equal(params["cache_keys"], caches.keys)
    fn = jax.jit(jax.vmap(lambda a, b: tip.logits(feats, w, params["cache_keys"], caches.values, alpha=a, beta=b)))
    out = fn(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
    np.testing.assert_allclose(out[1], tip.logits(feats, w, caches.keys, caches.values, alpha=2.0, beta=4.0),
                               rtol=1e-5, atol=1e-4)


def test_finetune_matches_torch_reference():
    feats, y, w, keys, values = _problem(seed=2, b=6)
    params = tip.finetune_init(keys)
    keys[0] = 0.0  # finetune_init copies
    assert np.any(np.asarray(params["cache_keys"])[0] != 0)
    keys = np.asarray(params["cache_keys"])
    fn = jax.jit(jax.value_and_grad(lambda p: tip.finetune_loss(p, feats, y, w, values, alpha=1.17, beta=1.0),
                                    has_aux=True))
    (loss, metrics), grads = fn(params)
    # Reference: an nn.Linear whose weight is the cache keys; affinity = adapter(f); plain cross-entropy.
    adapter = torch.nn.Linear(keys.shape[1], keys.shape[0], bias=False)
    adapter.weight = torch.nn.Parameter(torch.tensor(keys))
    f = torch.tensor(feats)
    aff = adapter(f)
    out = 100.0 * f @ torch.tensor(w).t() + ((-1) * (1.0 - 1.0 * aff)).exp() @ torch.tensor(values) * 1.17
    ref = F.cross_entropy(out, torch.tensor(y))
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ce"], ref.item(), rtol=1e-5)
    np.testing.assert_allclose(grads["cache_keys"], adapter.weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(grads["cache_keys"])) and np.any(grads["cache_keys"])
    acc = 100.0 * np.mean(out.argmax(-1).numpy() == y)
    np.testing.assert_allclose(metrics["accuracy"], acc)


def test_presets_and_grids():
    names = {"default", "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
             "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"}
    assert set(tip.PRESETS) == names
    p = tip.PRESETS["dtd"]
    assert p["search_scale"] == (13.0, 13.0) and p["search_step"] == (200, 20) and p["lr"] == 1e-3
    assert p["eps"] == 1e-4 and p["train_epoch"] == 20
    g = tip.search_grids("dtd")
    assert list(g) == ["beta", "alpha"]
    want_beta = [i * (13 - 0.1) / 200 + 0.1 for i in range(200)]
    np.testing.assert_array_equal(g["beta"], want_beta)
    np.testing.assert_array_equal(g["alpha"], classification.grid(0.1, 13.0, 20))
    assert tip.PRESETS["eurosat"]["train_epoch"] == 100
