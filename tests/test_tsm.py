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
    params = tsm.init_from_tower(model, clip_params)
    jax.tree.map(np.testing.assert_array_equal, params["tower"], clip_params["vision_model"])
    assert params["head"]["kernel"].shape == (32, C) and params["head"]["bias"].shape == (C,)
    x = _batch(4)["pixel_values"]
    pooled = jax.jit(clip_model.apply, static_argnames="method")({"params": clip_params}, x, method=lambda m, x: m.vision_model(x)[0])
    np.testing.assert_allclose(tsm.exemplar_features(model, params, x), pooled, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        tsm.init_from_tower(tsm.TSMClassifier(dataclasses.replace(VISION, hidden_size=16,
                                                                  intermediate_size=32), C), clip_params)


def _np_bce(z, t):
    p = 1 / (1 + np.exp(-z))
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def test_masked_bce_is_mean_over_own_labels():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, C)).astype(np.float32) * 3
    targets = (rng.random((4, C)) < 0.4).astype(np.float32)
    ds = np.array([2, 1, 2, 0])
    mask = np.asarray(tsm.dataset_class_mask(ds, OFFSETS, SIZES, C))
    got = np.asarray(tsm.masked_bce(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
    for i, d in enumerate(ds):
        lo, hi = OFFSETS[d], OFFSETS[d] + SIZES[d]
        np.testing.assert_allclose(got[i], _np_bce(logits[i, lo:hi], targets[i, lo:hi]).mean(), rtol=1e-5)
    # Logits and targets outside the mask change nothing.
    noisy = np.where(mask, logits, 1e3)
    np.testing.assert_allclose(tsm.masked_bce(noisy, np.where(mask, targets, 1 - targets), mask), got, rtol=1e-6)


def _mixed_batch(b=6, seed=0):
    """Datasets 0, 1 single-label, dataset 2 (4 labels) multi-label."""
    batch = _batch(b, seed)
    rng = np.random.default_rng(seed + 1)
    ds = np.arange(b) % len(SIZES)
    multi = ds == 2
    targets = np.asarray(jax.nn.one_hot(batch["labels"], C))
    hot = rng.random((b, C)) < 0.5
    targets = np.where(multi[:, None], hot & np.asarray(batch["class_mask"]), targets).astype(np.float32)
    labels = np.where(multi, OFFSETS[ds], np.asarray(batch["labels"]))
    return {**batch, "labels": jnp.asarray(labels, jnp.int32), "targets": jnp.asarray(targets),
            "multi_label": jnp.asarray(multi)}


def test_multilabel_loss_mixes_ce_and_bce(model):
    params = tsm.init_params(model, jax.random.key(0))
    batch = _mixed_batch()
    loss, m = jax.jit(tsm.make_loss_fn(model))(params, batch, None)
    logits, _ = model.apply({"params": params}, batch["pixel_values"])
    logits, mask = np.asarray(logits, np.float64), np.asarray(batch["class_mask"])
    per = []
    for i in range(6):
        row = logits[i][mask[i]]
        if batch["multi_label"][i]:
            per.append(_np_bce(row, np.asarray(batch["targets"])[i][mask[i]]).mean())
        else:
            row = row - row.max()
            per.append(-(row - np.log(np.exp(row).sum()))[int(batch["labels"][i]) - OFFSETS[i % 3]])
    np.testing.assert_allclose(float(loss), np.mean(per), rtol=1e-5)
    assert 0.0 <= float(m["accuracy"]) <= 1.0
    # Without the multi-label keys the loss is the plain masked CE (the multi-label rows then use 'labels').
    plain = {k: batch[k] for k in ("pixel_values", "labels", "class_mask")}
    assert abs(float(jax.jit(tsm.make_loss_fn(model))(params, plain, None)[0]) - float(loss)) > 1e-4


def test_multilabel_training_learns_sets_and_predict_joint(model):
    params = tsm.init_params(model, jax.random.key(0))
    labels = trainer.param_labels(params, tsm.PARAM_GROUPS)
    trainable, frozen = trainer.partition(params, labels)
    tx = trainer.make_optimizer({"name": "adam", "lr": 3e-3, "decay_type": "constant"}, labels, 30)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable))
    step = trainer.make_train_step(tsm.make_loss_fn(model), tx, jax.random.key(1))
    batch = _mixed_batch()
    for _ in range(30):
        state, m = step(state, frozen, batch)
    assert float(m["accuracy"]) == 1.0, m
    params = trainer.merge(state.params, frozen)
    pred = np.asarray(tsm.predict_joint(model, params, batch["pixel_values"], batch["class_mask"],
                                        batch["multi_label"]))
    assert pred.dtype == bool and pred.shape == (6, C)
    np.testing.assert_array_equal(pred, np.asarray(batch["targets"]) > 0.5)  # sets and one-hots learnt
    assert not (pred & ~np.asarray(batch["class_mask"])).any()
    np.testing.assert_array_equal(pred[~np.asarray(batch["multi_label"])].sum(1), 1)
    both, feat = tsm.predict_and_features(model, params, batch["pixel_values"], batch["class_mask"],
                                          batch["multi_label"])
    np.testing.assert_array_equal(both, pred)
    np.testing.assert_allclose(feat, tsm.exemplar_features(model, params, batch["pixel_values"]), rtol=1e-6)


def _joint_split(n, seed):
    from vlm_jax.data import vitask_tasks

    r = np.random.default_rng(seed)
    ds = (np.arange(n) % len(SIZES)).astype(np.int32)
    local = r.integers(0, np.asarray(SIZES)[ds]).astype(np.int32)
    targets = np.zeros((n, C), bool)
    targets[np.arange(n), OFFSETS[ds] + local] = True
    split = vitask_tasks.Split([None] * n, ds, local, targets, ["-"] * n)
    return split, r.normal(size=(n, 16, 16, 3)).astype(np.float32)


def test_vitask_tsm_selection_keeps_the_best_val_epoch(model):
    """The program's TSM eval (vitask.make_tsm_eval) scores the val split; fit keeps its best epoch. The val
    accuracy of the kept and of the last parameters is recomputed here from the logits (numpy)."""
    from vlm_jax.data import vitask_tasks
    from vlm_jax.programs import vitask as prog
    from vlm_jax.runtime import mesh as mesh_lib

    datasets = [vitask_tasks.TaskDataset(f"d{k}", "x", tuple(f"c{j}" for j in range(s)), False, [], [])
                for k, s in enumerate(SIZES)]
    (train, x_train), (val, x_val), (test, _) = _joint_split(24, 1), _joint_split(27, 2), _joint_split(9, 3)
    task = vitask_tasks.JointTask(datasets, OFFSETS, np.asarray(SIZES, np.int32), train, test, "normal", val)
    params = tsm.init_params(model, jax.random.key(0))

    def batches(epoch):
        order = np.random.default_rng(epoch).permutation(24)
        for i in range(3):
            idx = order[i * 8:(i + 1) * 8]
            yield {"pixel_values": x_train[idx], "labels": OFFSETS[train.dataset[idx]] + train.label[idx],
                   "class_mask": task.class_mask(train.dataset[idx])}

    fit = trainer.fit(loss_fn=tsm.make_loss_fn(model), params=params, param_groups=list(tsm.PARAM_GROUPS),
                      optim={"name": "adam", "lr": 1e-2, "decay_type": "constant"}, num_epochs=5, steps_per_epoch=3,
                      epoch_batches=batches, mesh=mesh_lib.make_mesh(), rng=jax.random.key(1),
                      eval_fn=prog.make_tsm_eval(model, params, task, lambda idx: x_val[idx]), select="accuracy")

    apply = jax.jit(model.apply)   # one compile for both calls (op-by-op dispatch was slower)

    def val_accuracy(p):   # mean over datasets of the per-dataset accuracy, in %
        logits, _ = apply({"params": p}, jnp.asarray(x_val))
        pred = np.argmax(np.where(task.class_mask(val.dataset), np.asarray(logits), -np.inf), 1)
        pred -= OFFSETS[val.dataset]
        return 100 * np.mean([np.mean(pred[val.dataset == k] == val.label[val.dataset == k]) for k in range(3)])

    acc = [r["val_accuracy"] for r in fit.history]
    assert fit.best_epoch == int(np.argmax(acc)) and fit.best_epoch != len(acc) - 1, acc  # not simply the last
    np.testing.assert_allclose(val_accuracy(fit.best_params), max(acc), atol=1e-9)
    np.testing.assert_allclose(val_accuracy(fit.state.params), acc[-1], atol=1e-9)


def test_tsm_on_the_papers_vit_in21k_structure(tmp_path):
    # VITask's TSM is "a ViT base model pre-trained on ImageNet-21K": on the replica of that checkpoint, the TSM's
    # feature is HF ViTModel's final-layernormed class token (what ViTForImageClassification classifies), its
    # tower the checkpoint's weights, and the program's loader reads the checkpoint by its model_type.
    import torch
    import transformers

    from vlm_jax.programs import vitask as vitask_program
    from vlm_jax.testing import replicas

    ckpt = replicas.resolve_offline("replica:vit-b16-in21k", str(tmp_path))
    assert vitask_program.tsm_tower_type(ckpt) == "vit"
    vision, tower = vitask_program.load_tsm_tower(ckpt)
    model = tsm.TSMClassifier(vision, C)
    params = tsm.init_from_tower(model, tower, jax.random.key(0))
    x = np.random.default_rng(0).standard_normal((2, vision.image_size, vision.image_size, 3)).astype(np.float32)
    hf = transformers.ViTModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(tsm.exemplar_features(model, params, x), want, atol=1e-5)
    assert params["head"]["kernel"].shape == (vision.hidden_size, C)
    clip_dir = convert_clip.write_random_checkpoint(tmp_path / "clip", seed=3, vision=dict(image_size=16, patch_size=8))
    assert vitask_program.tsm_tower_type(str(clip_dir)) == "clip"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(Exception, match="the TSM takes an HF ViT"):
        vitask_program.tsm_tower_type(str(tmp_path / "other"))
