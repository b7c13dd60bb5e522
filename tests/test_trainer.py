"""The generic trainer: optimizer parity with torch, trainable/frozen split, best epoch, resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.runtime import mesh as mesh_lib
from vlm_jax.train import trainer


def _params():
    return {"backbone": {"w": jnp.ones((3, 2))}, "adapter": {"pos": jnp.zeros((2,)), "neg": jnp.zeros((2,))}}


def test_param_labels_first_match_wins_and_unmatched_are_frozen():
    labels = trainer.param_labels(_params(), [("adapter/neg", 5.0), ("adapter/.*", 1.0)])
    assert labels == {"backbone/w": None, "adapter/pos": 1.0, "adapter/neg": 5.0}


def test_partition_merge_roundtrip_and_no_state_for_frozen():
    params = _params()
    labels = trainer.param_labels(params, [("adapter/.*", 1.0)])
    trainable, frozen = trainer.partition(params, labels)
    assert set(trainable) == {"adapter"} and set(frozen) == {"backbone"}
    merged = trainer.merge(trainable, frozen)
    jax.tree.map(np.testing.assert_array_equal, merged, params)
    tx = trainer.make_optimizer({"name": "adamw", "lr": 1e-3}, labels, 10)
    state_leaves = jax.tree.leaves(tx.init(trainable))
    assert sum(x.size for x in state_leaves if x.ndim) == 2 * 4  # mu and nu of the 4 adapter scalars only


def test_no_trainable_parameter_is_an_error():
    labels = trainer.param_labels(_params(), [("nothing", 1.0)])
    with pytest.raises(ValueError, match="no parameter trainable"):
        trainer.make_optimizer({"name": "adamw", "lr": 1e-3}, labels, 10)


def test_adamw_cosine_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a, b, x0 = rng.normal(size=(8, 4)), rng.normal(size=(8,)), rng.normal(size=(4,))
    steps, lr, mult = 12, 0.05, 5.0

    labels = {"x": mult}
    tx = trainer.make_optimizer({"name": "adamw", "lr": lr, "eps": 1e-3, "weight_decay": 0.1}, labels, steps)
    params = {"x": jnp.asarray(x0, jnp.float32)}
    opt = tx.init(params)
    loss = lambda p: jnp.sum((jnp.asarray(a, jnp.float32) @ p["x"] - b) ** 2)
    for _ in range(steps):
        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        params = jax.tree.map(lambda p, u: p + u, params, upd)

    xt = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    topt = torch.optim.AdamW([{"params": [xt], "lr": lr * mult}], eps=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, steps)
    at, bt = torch.tensor(a), torch.tensor(b)
    for _ in range(steps):
        topt.zero_grad()
        ((at @ xt - bt) ** 2).sum().backward()
        topt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(params["x"]), xt.detach().numpy(), rtol=1e-4, atol=1e-5)


def _regression_problem(seed=0, n=32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)

    def loss_fn(params, batch, rng):
        del rng
        pred = batch["x"] @ params["head"]["w"] * params["frozen"]["scale"]
        err = jnp.mean((pred - batch["y"]) ** 2)
        return err, {"mse": err}

    def epoch_batches(epoch):
        order = np.random.default_rng(epoch).permutation(n)
        for i in range(0, n, 8):
            idx = order[i:i + 8]
            yield {"x": x[idx], "y": y[idx]}

    params = {"head": {"w": jnp.zeros((3,))}, "frozen": {"scale": jnp.ones(())}}
    return loss_fn, epoch_batches, params, x, y


def _fit(workdir, num_epochs, eval_fn=None):
    loss_fn, epoch_batches, params, _, _ = _regression_problem()
    return trainer.fit(loss_fn=loss_fn, params=params, param_groups=[("head/.*", 1.0)],
                       optim={"name": "adam", "lr": 0.1, "decay_type": "constant"}, num_epochs=num_epochs,
                       steps_per_epoch=4, epoch_batches=epoch_batches, mesh=mesh_lib.make_mesh(),
                       rng=jax.random.key(0), eval_fn=eval_fn, workdir=workdir, select="score")


def test_fit_reduces_loss_and_keeps_frozen_out_of_the_state(tmp_path):
    result = _fit(None, 5)
    assert result.history[-1]["train_loss"] < 0.2 * result.history[0]["train_loss"]
    assert set(result.state.params) == {"head"}


def test_fit_selects_best_epoch_with_strict_ties():
    scores = iter([1.0, 3.0, 3.0, 2.0])
    result = _fit(None, 4, eval_fn=lambda p: {"score": next(scores)})
    assert result.best_epoch == 1
    assert result.best_metrics["val_score"] == 3.0


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    full = _fit(str(tmp_path / "a"), 4)
    _fit(str(tmp_path / "b"), 2)               # "killed" after two epochs, checkpoint on disk
    resumed = _fit(str(tmp_path / "b"), 4)     # restarts, continues at epoch 2
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]   # the first two restored from the checkpoint
    assert resumed.history == full.history
    np.testing.assert_array_equal(np.asarray(resumed.state.params["head"]["w"]),
                                  np.asarray(full.state.params["head"]["w"]))


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_lib.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="needs 4 devices"):
        mesh_lib.make_mesh({"data": 4})


def test_bf16_compute_with_float32_master_weights():
    """A bf16 LLaVA (compute and frozen storage) trains float32 LoRA / prompts; its loss tracks float32's."""
    transformers = pytest.importorskip("transformers")
    from vlm_jax.methods import vladva as disc
    from vlm_jax.models import llava as llava_lib
    from vlm_jax.models import peft

    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
        image_token_id=120)
    f32 = llava_lib.Llava.from_hf_config(config)
    import flax.linen as nn
    # Random weights from the parameter shapes (norm scales near 1): no compile of `init` (2 s of this test).
    shapes = nn.meta.unbox(jax.eval_shape(f32.init, jax.random.key(0), *f32.init_inputs())["params"])
    rng = np.random.default_rng(0)
    base = jax.tree_util.tree_map_with_path(
        lambda path, s: (float(path[-1].key == "scale") + 0.05 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
    t, b = f32.cfg.tokens_per_image, 4
    image = np.array([[1] + [120] * t + [30, 31]] * b, np.int32)
    text = rng.integers(40, 100, size=(b, 6)).astype(np.int32)
    batch = dict(image_ids=image, image_mask=np.ones_like(image), text_ids=text, text_mask=np.ones_like(text),
                 pixel_values=rng.normal(size=(b, 16, 16, 3)).astype(np.float32), has_short=np.ones(b, bool),
                 image_prompt_start=np.full(b, 1 + t, np.int32))

    def run(dtype):
        model = llava_lib.Llava.from_hf_config(config, dtype=dtype, param_dtype=dtype)
        frozen = jax.tree.map(lambda x: x.astype(dtype), base)            # frozen base stored in `dtype`
        params = {"base": frozen, "lora": peft.lora_init(base, jax.random.key(1), targets=disc.LORA_TARGETS,
                                                         rank=2),
                  "image_prompt": peft.soft_prompt_init(frozen["language_model"]["model"]["embed_tokens"][
                      "embedding"], [30, 31], dtype=dtype)}               # bf16 in: the trainer upcasts it
        loss_fn = disc.make_loss_fn(model, lora_alpha=4, lora_rank=2, ntp_weight=0.0)
        return trainer.fit(loss_fn=loss_fn, params=params, param_groups=[("lora/.*", 1.0), ("image_prompt", 1.0)],
                           optim={"name": "adam", "lr": 1e-2}, num_epochs=1, steps_per_epoch=3,
                           epoch_batches=lambda e: [batch] * 3, mesh=mesh_lib.make_mesh(), rng=jax.random.key(0))

    full, mixed = run(jnp.float32), run(jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(mixed.state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(mixed.state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(mixed.history[0]["train_loss"], full.history[0]["train_loss"], rtol=3e-2)
    assert mixed.history[0]["train_loss"] != full.history[0]["train_loss"]       # it really ran in bf16
    start = np.asarray(base["language_model"]["model"]["embed_tokens"]["embedding"][np.array([30, 31])])
    assert np.abs(np.asarray(mixed.state.params["image_prompt"]) - start).max() > 1e-3   # the prompt trained


def test_state_shardings_with_several_lr_groups():
    """multi_transform (one group per lr multiplier) leaves MaskedNodes in the optimizer state."""
    params = {"a": jnp.ones((4,)), "b": jnp.ones((3,))}
    labels = trainer.param_labels(params, [("a", 5.0), ("b", 1.0)])
    tx = trainer.make_optimizer({"name": "adamw", "lr": 1e-3}, labels, 10)
    mesh = mesh_lib.make_mesh()
    sh = trainer.state_shardings(tx, trainer.placed_shardings(params, mesh), params, mesh)
    state = jax.jit(lambda p: trainer.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                    out_shardings=sh)(params)
    assert len(jax.tree.leaves(state.opt_state)) == len(jax.tree.leaves(tx.init(params)))


def test_restore_only_returns_the_kept_state_and_never_trains(tmp_path):
    """`vlm-jax eval` / `predict`: fit restores a finished training, refuses an unfinished or missing one in one
    line, and `trained.restore_fit` reads back the params fit kept (the best epoch's, else the final state's)."""
    from vlm_jax import errors
    from vlm_jax.programs import trained

    scores = iter([1.0, 3.0, 2.0])
    done = _fit(str(tmp_path / "w"), 3, eval_fn=lambda p: {"score": next(scores)})
    plain = _fit(str(tmp_path / "p"), 2)
    steps = sorted(os.listdir(tmp_path / "w" / "checkpoints" / "train"))
    with trainer.restore_only():
        again = _fit(str(tmp_path / "w"), 3, eval_fn=lambda p: pytest.fail("evaluated: trained an epoch"))
        with pytest.raises(errors.UserError, match=r"^train: the checkpoint in .* is at step 12 of 20: the training "
                                                   "did not finish"):
            _fit(str(tmp_path / "w"), 5, eval_fn=lambda p: {"score": 0.0})
        with pytest.raises(errors.UserError, match=r"^train: no checkpoint in .*checkpoints/train"):
            _fit(str(tmp_path / "empty"), 3)
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints" / "train")) == steps   # nothing saved
    assert again.best_epoch == done.best_epoch == 1 and again.history == done.history
    np.testing.assert_array_equal(np.asarray(again.best_params["head"]["w"]), np.asarray(done.best_params["head"]["w"]))
    kept = trained.restore_fit(str(tmp_path / "w"), "train")
    assert (kept.epoch, kept.step) == (1, 12)
    np.testing.assert_array_equal(kept.params["head"]["w"], np.asarray(done.best_params["head"]["w"]))
    final = trained.restore_fit(str(tmp_path / "p"), "train")   # no eval: the last epoch's state
    assert (final.epoch, final.step) == (1, 8)
    np.testing.assert_array_equal(final.params["head"]["w"], np.asarray(plain.state.params["head"]["w"]))
