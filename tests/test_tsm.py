"""VITask's task-specific model (vlm_jax.methods.tsm)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.convert import clip as convert_clip
from vlm_jax.methods import tsm
from vlm_jax.models import clip
from vlm_jax.train import trainer

VISION = clip.VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, image_size=16, patch_size=8)
SIZES = (2, 3, 4)  # three jointly trained datasets, 9 classes
C = sum(SIZES)
OFFSETS = tsm.dataset_offsets(SIZES)


@pytest.fixture(scope="module")
def model():
    return tsm.TSMClassifier(VISION, C)


def _batch(b=6, seed=0):
    rng = np.random.default_rng(seed)
    ds = np.arange(b) % len(SIZES)
    labels = OFFSETS[ds] + rng.integers(0, np.asarray(SIZES)[ds])
    return {"pixel_values": jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32),
            "labels": jnp.asarray(labels, jnp.int32),
            "class_mask": tsm.dataset_class_mask(ds, OFFSETS, SIZES, C)}


def test_dataset_class_mask():
    m = np.asarray(tsm.dataset_class_mask(jnp.array([0, 1, 2, 1]), OFFSETS, SIZES, C))
    assert m.shape == (4, C) and m.dtype == bool
    np.testing.assert_array_equal(np.where(m[1])[0], [2, 3, 4])
    np.testing.assert_array_equal(np.where(m[2])[0], [5, 6, 7, 8])
    np.testing.assert_array_equal(m.sum(1), [2, 3, 4, 3])


def test_masked_softmax_is_subset_softmax():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(5, C)) * 5, jnp.float32)
    # the largest logit is always outside the mask: unmasked argmax would be wrong
    logits = logits.at[:, 0].set(100.0)
    ds = np.array([1, 2, 1, 2, 1])
    mask = tsm.dataset_class_mask(ds, OFFSETS, SIZES, C)
    ml = tsm.masked_logits(logits, mask)
    p = np.asarray(jax.nn.softmax(ml))
    assert np.all(p[~np.asarray(mask)] == 0)
    for i, d in enumerate(ds):
        lo, hi = OFFSETS[d], OFFSETS[d] + SIZES[d]
        np.testing.assert_allclose(p[i, lo:hi], jax.nn.softmax(logits[i, lo:hi]), rtol=1e-6)
    pred = np.argmax(np.asarray(ml), -1)
    assert np.asarray(mask)[np.arange(5), pred].all()


def test_predict_stays_in_mask_and_features(model):
    params = tsm.init_params(model, jax.random.key(0))
    # a huge bias on class 0 makes it the unmasked argmax everywhere
    params["head"]["bias"] = params["head"]["bias"].at[0].set(1e4)
    batch = _batch(6)
    logits, feat = jax.jit(model.apply)({"params": params}, batch["pixel_values"])
    assert logits.shape == (6, C) and feat.shape == (6, 32)
    assert (np.argmax(logits, -1) == 0).all()
    pred = np.asarray(tsm.predict(model, params, batch["pixel_values"], batch["class_mask"]))
    assert pred.dtype == np.int32
    assert np.asarray(batch["class_mask"])[np.arange(6), pred].all()
    ex = tsm.exemplar_features(model, params, batch["pixel_values"])
    assert ex.shape == (6, VISION.hidden_size) and ex.dtype == jnp.float32
    np.testing.assert_array_equal(ex, feat)


def test_adam_steps_reduce_loss(model):
    params = tsm.init_params(model, jax.random.key(0))
    labels = trainer.param_labels(params, tsm.PARAM_GROUPS)
    assert all(v == 1.0 for v in labels.values())
    trainable, frozen = trainer.partition(params, labels)
    tx = trainer.make_optimizer({"name": "adam", "lr": 3e-3, "decay_type": "constant"}, labels, 10)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable))
    step = trainer.make_train_step(tsm.make_loss_fn(model), tx, jax.random.key(1))
    batch = _batch(6)
    losses = []
    for _ in range(8):
        state, m = step(state, frozen, batch)
        losses.append(float(m["loss"]))
        assert 0.0 <= float(m["accuracy"]) <= 1.0
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


def test_init_from_clip(model, tmp_path):
    ckpt = convert_clip.write_random_checkpoint(tmp_path / "clip", seed=3, vision=dict(image_size=16, patch_size=8))
    clip_model, clip_params = convert_clip.from_pretrained(ckpt)
    assert clip_model.vision == VISION
    params = tsm.init_from_clip(model, clip_params)
    jax.tree.map(np.testing.assert_array_equal, params["tower"], clip_params["vision_model"])
    assert params["head"]["kernel"].shape == (32, C) and params["head"]["bias"].shape == (C,)
    x = _batch(4)["pixel_values"]
    pooled = jax.jit(clip_model.apply, static_argnames="method")({"params": clip_params}, x, method=lambda m, x: m.vision_model(x)[0])
    np.testing.assert_allclose(tsm.exemplar_features(model, params, x), pooled, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        tsm.init_from_clip(tsm.TSMClassifier(dataclasses.replace(VISION, hidden_size=16,
                                                                  intermediate_size=32), C), clip_params)
