"""ZS-LP and CLAP (arXiv 2312.12730) against the official PyTorch code transcribed, and their limits.

The reference below transcribes github jusiro/CLAP, trainers/adapters.py (`forward_lp`, `zero_shot_constraint`,
`init_lagrangian_multipliers`, the 'l2' constraint) with Dassl's SGD and per-epoch schedule (a constant warm-up
epoch, then torch's CosineAnnealingLR), fed the same batches.
"""

import importlib.util
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlm_jax import errors
from vlm_jax.methods import fewshot_registry as registry
from vlm_jax.methods.fewshot import linear_probe as lp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("dualadapter_config", os.path.join(ROOT, "configs", "dualadapter.py"))
da_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(da_config)


def _normed(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _problem(c=3, d=8, per_class=8, seed=0):
    """Class clusters with text prototypes that point roughly, not exactly, at them."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    y = np.repeat(np.arange(c), per_class)
    f = _normed(centers[y] + 0.8 * rng.normal(size=(len(y), d)))
    text = _normed(centers + 1.2 * rng.normal(size=(c, d)))
    return f, y.astype(np.int32), text


def torch_reference(features, labels, text, *, constraint, epochs, batch_size, steps, lr, momentum, warmup_epochs,
                    warmup_lr, orders):
    """The official code's adapter training (fp32) on `orders[e]`, the samples' order in epoch e."""
    base = torch.tensor(text)
    prototypes = torch.nn.Parameter(base.clone())                        # 'ZS' initialisation
    feats, labs = torch.tensor(features), torch.tensor(labels, dtype=torch.long)

    def forward_lp(f):
        image_features_norm = f / f.norm(dim=-1, keepdim=True)
        prototypes_norm = prototypes / prototypes.norm(dim=-1, keepdim=True)
        return image_features_norm @ prototypes_norm.t() * 100.0        # logit_scale.exp() of CLIP

    with torch.no_grad():                                                # init_lagrangian_multipliers
        one_hot = torch.nn.functional.one_hot(labs).to(torch.float32)
        logits_ds = forward_lp(feats)
        alpha = torch.diag(torch.softmax(logits_ds, -1).t() @ one_hot) / one_hot.sum(0)
    optim = torch.optim.SGD([prototypes], lr=lr, momentum=momentum, weight_decay=0.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr),
                                                        T_max=float(epochs))
    for e in range(epochs):
        if e >= warmup_epochs:                                          # ConstantWarmupScheduler's successor
            epoch_lr = cosine.get_last_lr()[0]
            cosine.optimizer.step()
            cosine.step()
        else:
            epoch_lr = warmup_lr
        for group in optim.param_groups:
            group["lr"] = epoch_lr
        idx = torch.tensor(np.asarray(orders[e]), dtype=torch.long)
        for b in range(steps):
            batch = idx[b * batch_size:(b + 1) * batch_size]
            loss = torch.nn.functional.cross_entropy(forward_lp(feats[batch]), labs[batch])
            if constraint:                                              # zero_shot_constraint, 'l2'
                loss = loss + torch.mean(alpha * (prototypes - base.clone()).pow(2).sum(-1))
            optim.zero_grad()
            loss.backward()
            optim.step()
    return prototypes.detach().numpy(), alpha.numpy()


@pytest.mark.parametrize("constrained", [False, True])
def test_training_matches_the_official_code(constrained):
    f, y, text = _problem()
    kw = dict(epochs=5, batch_size=8, steps=2, lr=0.1, momentum=0.9, warmup_epochs=1, warmup_lr=1e-5)
    lam = lp.penalty_weights(jnp.asarray(f), jnp.asarray(y), jnp.asarray(text)) if constrained else jnp.zeros(3)
    w, curve = lp.train(jnp.asarray(f), jnp.asarray(y), jnp.asarray(text), lam, seed=3, **kw)
    orders = [lp.epoch_order(3, e, len(y)) for e in range(kw["epochs"])]
    w_ref, alpha_ref = torch_reference(f, y, text, constraint=constrained, orders=orders, **kw)
    np.testing.assert_allclose(lp.penalty_weights(f, y, text), alpha_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-5)
    assert np.abs(w_ref - text).max() > 0.05 and curve.shape == (5,)   # it moved: the comparison can fail


def test_lambda_zero_is_the_probe_and_a_huge_lambda_stays_zero_shot():
    f, y, text = _problem(seed=1)
    kw = dict(epochs=40, batch_size=24, steps=1, momentum=0.9, warmup_epochs=0, warmup_lr=0.0, seed=0)
    probe, _ = lp.train(f, y, text, jnp.zeros(3), lr=0.1, **kw)
    clap_zero, _ = lp.train(f, y, text, 0.0 * lp.penalty_weights(f, y, text), lr=0.1, **kw)
    np.testing.assert_array_equal(clap_zero, probe)
    # lr * 2 * lambda / C < 2 (1 + momentum): a stiff but stable penalty.
    held, _ = lp.train(f, y, text, jnp.full(3, 1e4), lr=1e-4, **kw)
    free, _ = lp.train(f, y, text, jnp.zeros(3), lr=1e-4, **kw)
    assert np.abs(held - text).max() < 5e-3 and np.abs(free - text).max() > 0.05
    rng = np.random.default_rng(5)
    queries = _normed(rng.normal(size=(200, 8)))
    zero_shot = np.argmax(queries @ text.T, 1)
    np.testing.assert_array_equal(np.argmax(lp.logits(queries, held), 1), zero_shot)
    assert (np.argmax(lp.logits(queries, free), 1) != zero_shot).any()


def test_schedule_and_steps_are_the_official_loaders():
    lrs = [float(lp.epoch_lr(e, lr=0.1, epochs=300, warmup_epochs=1, warmup_lr=1e-5)) for e in (0, 1, 2, 151, 299)]
    np.testing.assert_allclose(lrs, [1e-5, 0.1, 0.05 * (1 + math.cos(math.pi / 300)), 0.05, 0.05 * (
        1 + math.cos(math.pi * 298 / 300))], rtol=1e-6, atol=1e-8)
    assert [lp.steps_per_epoch(n, 256) for n in (10, 255, 256, 1000, 16000)] == [1, 1, 1, 3, 62]


class _Views:
    def __init__(self, f, y):
        self.f, self.y, self.asked = f, y, []

    def __call__(self, n):
        self.asked.append(n)
        return {"features": self.f, "labels": self.y}


def _context(protocol, config, f, y, text, views):
    test = {"features": f[::-1].copy(), "labels": y[::-1].copy()}
    return registry.Context(config=config, protocol=protocol, shots=8, seed=1, num_classes=3,
                            text={"zeroshot": text}, few=list(range(len(y))), cache={}, caches=None,
                            tests={"test": (test, None)}, views=views,
                            val=test if protocol == "paper" else None)


def test_faces_train_on_the_k_shots_alone_under_both_protocols():
    f, y, text = _problem(seed=2)
    config = da_config.get_config("runlocal")
    for name in ("linear_probe", "clap"):
        config[name].epochs = 20
    views = _Views(f, y)
    out = {}
    for name in ("linear_probe", "clap"):
        face = registry.get(name)
        assert registry.check(config, [name]) == [face] and face.needs == {"views"}
        paper = face.run_paper(_context("paper", config, f, y, text, views))
        real = face.run_realistic(_context("realistic", config, f, y, text, views))
        assert paper["test_accuracy"] == real["test_accuracy"] and "val_accuracy" not in real
        out[name] = real
    assert views.asked == [20] * 4
    # The config's settings reach the trainer: the same result from `train` called directly.
    cfg = config.clap
    w, _ = lp.train(f, y, text, lp.penalty_weights(f, y, text), epochs=20, batch_size=24, steps=1, lr=cfg.lr,
                    momentum=cfg.momentum, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, seed=1)
    want = 100.0 * np.mean(np.argmax(lp.logits(f[::-1], w), 1) == y[::-1])
    assert out["clap"]["test_accuracy"] == pytest.approx(want)
    assert out["clap"]["lambda_mean"] > 0 and "lambda_mean" not in out["linear_probe"]
    assert list(registry.display_names())[-2:] == ["linear_probe", "clap"]


def test_bad_settings_are_one_line():
    config = da_config.get_config("runlocal")
    config.clap.epochs = 0
    with pytest.raises(errors.UserError, match=r"--config.clap.epochs=0 is out of range"):
        registry.check(config, ["linear_probe", "clap"])
