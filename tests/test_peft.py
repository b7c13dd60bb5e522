"""LoRA and soft prompts (vlm_jax.models.peft), and their use through the generic trainer."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.models import peft
from vlm_jax.models.clip import CLIPTextTower, TextConfig
from vlm_jax.train import trainer

TEXT = TextConfig(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, hidden_act="gelu",
                  layer_norm_eps=1e-5, vocab_size=50, max_position_embeddings=8, eos_token_id=49)
# q/k/v kernels f32[D, H, Dh] (1 input axis), out_proj f32[H, Dh, D] (2), fc1/fc2 f32[in, out].
TARGETS = [r".*self_attn/[qkv]_proj/kernel", (r".*self_attn/out_proj/kernel", 2), r".*mlp/fc[12]/kernel"]
ALPHA, RANK = 16.0, 4


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def text():
    """(tower, base params, untrained LoRA, ids, mask) of a tiny random CLIP text tower."""
    model = CLIPTextTower(TEXT)
    rng = np.random.default_rng(0)
    ids = np.asarray(rng.integers(0, 49, (3, 8)), np.int32)
    ids[:, -1] = 49
    mask = np.ones_like(ids)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), ids, mask)["params"])
    # Non-zero biases / norms, so a merge that touched the wrong leaf would show.
    noise = np.random.default_rng(1)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * noise.standard_normal(x.shape, np.float32), params)
    lora = peft.lora_init(params, jax.random.key(2), targets=TARGETS, rank=RANK)
    return model, params, lora, ids, mask


def pooled_merged(model, params, lora, ids, mask):
    return model.apply({"params": peft.lora_merge(params, lora, alpha=ALPHA, rank=RANK)}, ids, mask)[0]


def test_untrained_lora_is_exactly_the_base_model(text):
    model, params, lora, ids, mask = text
    layer0 = lora["encoder"]["layers_0"]
    assert set(layer0["self_attn"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert set(layer0["mlp"]) == {"fc1", "fc2"}
    assert layer0["self_attn"]["q_proj"]["kernel"]["a"].shape == (16, RANK)
    assert layer0["self_attn"]["q_proj"]["kernel"]["b"].shape == (RANK, 16)  # [H * Dh]
    assert layer0["self_attn"]["out_proj"]["kernel"]["a"].shape == (16, RANK)  # [H * Dh, r]
    assert layer0["mlp"]["fc1"]["kernel"]["b"].shape == (RANK, 24)
    bound = 1 / np.sqrt(16)  # HF PEFT's kaiming_uniform(a=sqrt(5)) on f32[r, in]
    a = np.asarray(layer0["mlp"]["fc1"]["kernel"]["a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    merged = jax.jit(functools.partial(peft.lora_merge, alpha=ALPHA, rank=RANK))(params, lora)
    assert_trees_equal(merged, jax.tree.map(jnp.asarray, params))  # W + s * A @ 0 == W bit for bit
    forward = jax.jit(lambda p: model.apply({"params": p}, ids, mask)[0])
    np.testing.assert_array_equal(forward(merged), forward(params))


def test_gradients_reach_lora_only_and_both_forms_agree(text):
    model, params, lora, ids, mask = text
    cot = np.random.default_rng(4).standard_normal((3, TEXT.hidden_size)).astype(np.float32)
    applied = set()

    def loss_merged(lora):
        return jnp.sum(pooled_merged(model, params, lora, ids, mask) * cot)

    def loss_unmerged(lora):
        with peft.lora_interceptor(lora, alpha=ALPHA, rank=RANK) as hit:
            out = model.apply({"params": params}, ids, mask)[0]
        applied.update(hit)
        return jnp.sum(out * cot)

    grad_merged = jax.jit(jax.grad(loss_merged))
    g = grad_merged(lora)
    for path, x in jax.tree_util.tree_leaves_with_path(g):
        assert np.isfinite(x).all(), path
        if path[-1].key == "b":
            assert np.abs(x).max() > 0, path
        else:  # dL/dA = s dL/dW' B^T = 0 while B = 0, as in HF PEFT
            np.testing.assert_array_equal(x, 0)
    # One normalised SGD step: B != 0 now, and of moderate size.
    scale = 0.1 / max(np.abs(x).max() for x in jax.tree.leaves(g))
    stepped = jax.tree.map(lambda p, d: np.asarray(p) - scale * np.asarray(d), lora, g)
    g2 = grad_merged(stepped)
    assert all(np.abs(x).max() > 0 and np.isfinite(x).all() for x in jax.tree.leaves(g2))
    # The unmerged (interceptor) form computes the same function, so the same gradients.
    g2_unmerged = jax.jit(jax.grad(loss_unmerged))(stepped)
    assert applied == {"encoder/layers_0/self_attn/" + p + "_proj/kernel" for p in ("q", "k", "v", "out")} | {
        f"encoder/layers_0/mlp/fc{i}/kernel" for i in (1, 2)}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g2_unmerged)):
        # Same math, different float association ((x @ A) @ B vs x @ (W + A @ B)).
        np.testing.assert_allclose(x, y, atol=1e-5 * np.abs(x).max(), rtol=0, err_msg=jax.tree_util.keystr(path))


class Heads(nn.Module):
    """x f32[B, 4] -> q heads f32[B, 2, 3] -> out f32[B, 5]: a 3-D input and a 3-D output kernel."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 3), name="q")(x)
        return nn.DenseGeneral(5, axis=(-2, -1), name="o")(h)


def test_merge_equals_explicit_low_rank_update():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((7, 4)), jnp.float32)
    params = jax.jit(Heads().init)(jax.random.key(1), x)["params"]
    lora = peft.lora_init(params, jax.random.key(2), targets=["q/kernel", ("o/kernel", 2)], rank=2)
    noise = np.random.default_rng(3)
    lora = jax.tree.map(lambda t: t + 0.3 * noise.standard_normal(t.shape, np.float32), lora)  # B != 0
    s = ALPHA / 2
    merged = jax.jit(functools.partial(peft.lora_merge, alpha=ALPHA, rank=2))(params, lora)
    explicit = {}
    for name, shape in (("q", (4, 6)), ("o", (6, 5))):
        a, b = np.asarray(lora[name]["kernel"]["a"]), np.asarray(lora[name]["kernel"]["b"])
        w = np.asarray(params[name]["kernel"]).reshape(shape)
        explicit[name] = w + s * a @ b
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]).reshape(shape), explicit[name], atol=1e-6)
        np.testing.assert_array_equal(merged[name]["bias"], params[name]["bias"])
    h = np.asarray(x) @ explicit["q"] + np.asarray(params["q"]["bias"]).reshape(-1)
    want = h @ explicit["o"] + np.asarray(params["o"]["bias"])
    np.testing.assert_allclose(jax.jit(Heads().apply)({"params": merged}, x), want, atol=1e-5, rtol=1e-5)
    with peft.lora_interceptor(lora, alpha=ALPHA, rank=2) as applied:
        got = jax.jit(Heads().apply)({"params": params}, x)
    assert applied == {"q/kernel", "o/kernel"}
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # strict: a pair whose kernel no Dense call reads (here: no such module) is an error, not a no-op.
    extra = {**lora, "conv": {"kernel": lora["q"]["kernel"]}}
    with pytest.raises(ValueError, match=r"never applied: \['conv/kernel'\]"):
        with peft.lora_interceptor(extra, alpha=ALPHA, rank=2, strict=True):
            Heads().apply({"params": params}, x)


def test_lora_dropout_only_in_the_unmerged_form():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 4)), jnp.float32)
    params = jax.jit(Heads().init)(jax.random.key(1), x)["params"]
    lora = peft.lora_init(params, jax.random.key(2), targets=["q/kernel"], rank=2)
    lora = jax.tree.map(lambda t: np.asarray(t) + 1.0, lora)

    @jax.jit
    def run(rng):
        with peft.lora_interceptor(lora, alpha=ALPHA, rank=2, dropout_rate=0.5, rng=rng):
            return Heads().apply({"params": params}, x)

    a, a2, b = run(jax.random.key(5)), run(jax.random.key(5)), run(jax.random.key(6))
    np.testing.assert_array_equal(a, a2)  # deterministic given the key
    assert np.abs(a - b).max() > 1e-3
    with pytest.raises(ValueError, match="needs an rng"):
        with peft.lora_interceptor(lora, alpha=ALPHA, rank=2, dropout_rate=0.1):
            pass


def test_bad_targets_and_pairs_raise_clearly(text):
    params = text[1]
    with pytest.raises(ValueError, match=r"match no parameter path.*encoder/layers_0/mlp/fc1/kernel") as e:
        peft.lora_init(params, jax.random.key(0), targets=[r".*q_proj/kernel", r".*gate_proj/kernel"], rank=2)
    assert "gate_proj" in str(e.value) and "q_proj/kernel'" not in str(e.value).split("available")[0]
    with pytest.raises(ValueError, match="only kernels"):  # the q bias f32[H, Dh] is 2-D but no kernel
        peft.lora_init(params, jax.random.key(0), targets=[r".*q_proj/.*"], rank=2)
    with pytest.raises(ValueError, match="only kernels"):
        peft.lora_init({"norm": {"kernel": jnp.ones(3)}}, jax.random.key(0), targets=[r".*"], rank=2)
    with pytest.raises(ValueError, match="n_in=3 is invalid"):
        peft.lora_init(params, jax.random.key(0), targets=[(r".*out_proj/kernel", 3)], rank=2)
    # First match wins (the out_proj regex is shadowed, so out_proj gets n_in = 1), and a shadowed
    # regex is not reported as matching nothing.
    chosen = peft.lora_targets(params, [r".*_proj/kernel", (r".*out_proj/kernel", 2)])
    assert chosen[("encoder", "layers_0", "self_attn", "out_proj", "kernel")] == 1 and len(chosen) == 4
    lora = peft.lora_init(params, jax.random.key(0), targets=[r".*fc1/kernel"], rank=2)
    with pytest.raises(ValueError, match="do not have rank 4"):
        peft.lora_merge(params, lora, alpha=8, rank=4)
    with pytest.raises(ValueError, match="without a kernel"):
        peft.lora_merge({"other": params["encoder"]}, lora, alpha=8, rank=2)
    # Abstract params are enough to create adapters (shape-first init of a big model).
    abstract = jax.eval_shape(lambda: params)
    lora2 = peft.lora_init(abstract, jax.random.key(0), targets=[r".*fc1/kernel"], rank=2)
    assert_trees_equal(lora2, lora)


# ----------------------------------------------------------------------------- soft prompts

B, L, D, P, V = 3, 10, 6, 4, 20
replace_span = jax.jit(peft.replace_span)  # one compile per prompt rank instead of eager op-by-op


@pytest.fixture(scope="module")
def prompt_batch():
    """(table, prompt ids, ids with the prompt at a different place per row, starts)."""
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((V, D)), jnp.float32)
    prompt_ids = np.array([11, 12, 13, 14])
    ids = rng.integers(0, 10, (B, L))
    starts = np.array([0, 3, 6])  # 6 + P == L: the span may end the row
    for r, s in enumerate(starts):
        ids[r, s:s + P] = prompt_ids
    return table, prompt_ids, jnp.asarray(ids, jnp.int32), starts


def test_find_span(prompt_batch):
    _, prompt_ids, ids, starts = prompt_batch
    np.testing.assert_array_equal(peft.find_span(ids, prompt_ids), starts)
    missing = ids.at[1, 4].set(0)  # breaks row 1's occurrence
    np.testing.assert_array_equal(peft.find_span(missing, prompt_ids), [0, -1, 6])
    np.testing.assert_array_equal(peft.find_span(ids[:, :3], prompt_ids), [-1, -1, -1])  # P > L


def test_initial_prompt_reproduces_the_embeddings(prompt_batch):
    table, prompt_ids, ids, starts = prompt_batch
    prompt = peft.soft_prompt_init(table, prompt_ids)
    assert prompt.shape == (P, D) and prompt.dtype == jnp.float32
    emb = table[ids]
    np.testing.assert_array_equal(replace_span(emb, jnp.asarray(starts), prompt), emb)
    learned = prompt + 1.0
    out = np.asarray(replace_span(emb, jnp.asarray(starts), learned))
    for r, s in enumerate(starts):  # per-row start positions
        np.testing.assert_array_equal(out[r, s:s + P], learned)
        outside = np.delete(np.arange(L), np.arange(s, s + P))
        np.testing.assert_array_equal(out[r, outside], np.asarray(emb[r])[outside])
    # start = -1 leaves the row alone; per-row prompts f32[B, P, D].
    out = replace_span(emb, jnp.array([-1, 3, 6]), jnp.stack([learned, learned * 2, learned * 3]))
    np.testing.assert_array_equal(out[0], emb[0])
    np.testing.assert_array_equal(out[1, 3:7], learned * 2)
    np.testing.assert_array_equal(out[2, 6:], learned * 3)


def test_prompt_gradients_flow_to_the_prompt_only(prompt_batch):
    table, prompt_ids, ids, starts = prompt_batch
    prompt = peft.soft_prompt_init(table, prompt_ids)
    cot = jnp.asarray(np.random.default_rng(5).standard_normal((B, L, D)), jnp.float32)
    g_emb, g_prompt = jax.jit(jax.grad(lambda e, p: jnp.sum(peft.replace_span(e, jnp.asarray(starts), p) * cot),
                                       argnums=(0, 1)))(table[ids], prompt)
    inside = np.zeros((B, L), bool)
    for r, s in enumerate(starts):
        inside[r, s:s + P] = True
    np.testing.assert_array_equal(np.asarray(g_emb)[inside], 0)
    np.testing.assert_array_equal(np.asarray(g_emb)[~inside], np.asarray(cot)[~inside])
    want = sum(np.asarray(cot)[r, s:s + P] for r, s in enumerate(starts))
    np.testing.assert_allclose(g_prompt, want, atol=1e-6)
    # The frozen table gets nothing from the replaced tokens.
    g_table = jax.jit(jax.grad(lambda t: jnp.sum(peft.replace_span(t[ids], jnp.asarray(starts), prompt) * cot)))(table)
    np.testing.assert_array_equal(np.asarray(g_table)[prompt_ids], 0)  # prompt tokens occur only in spans


# ----------------------------------------------------------------------------- through the trainer


class ToyLM(nn.Module):
    """inputs_embeds f32[B, L, D] -> logits f32[B, V] via an MLP, mean pooling and a head."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(8, name="fc1")(x)))
        return nn.Dense(V, name="head")(x.mean(1))


def test_trainer_trains_lora_and_prompt_only(prompt_batch):
    table, prompt_ids, ids, starts = prompt_batch
    net = jax.jit(ToyLM().init)(jax.random.key(0), table[ids])["params"]
    targets = [r"fc[12]/kernel"]
    params = {"base": {"embed": table, "net": net},
              "lora": peft.lora_init(net, jax.random.key(1), targets=targets, rank=2),
              "prompt": {"embeddings": peft.soft_prompt_init(table, prompt_ids)}}

    def loss_fn(p, batch, rng):
        del rng
        merged = peft.lora_merge(p["base"]["net"], p["lora"], alpha=4.0, rank=2)
        emb = peft.replace_span(p["base"]["embed"][batch["ids"]], batch["start"], p["prompt"]["embeddings"])
        logits = ToyLM().apply({"params": merged}, emb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}

    groups = [("lora/.*", 1.0), ("prompt/.*", 1.0)]
    labels = trainer.param_labels(params, groups)
    assert {k for k, m in labels.items() if m is not None} == {
        "lora/fc1/kernel/a", "lora/fc1/kernel/b", "lora/fc2/kernel/a", "lora/fc2/kernel/b", "prompt/embeddings"}
    trainable, frozen = trainer.partition(params, labels)
    assert set(trainable) == {"lora", "prompt"} and set(frozen) == {"base"}
    tx = trainer.make_optimizer({"name": "adamw", "lr": 1e-2, "decay_type": "constant"}, labels, total_steps=1)
    opt_state = jax.jit(tx.init)(trainable)
    # Optimizer state (Adam's mu and nu) exists for the 5 trainable tensors only.
    shaped = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(opt_state) if np.ndim(x)]
    assert len(shaped) == 2 * 5 and all(("'lora'" in k or "'prompt'" in k) and "'base'" not in k for k in shaped)

    before = jax.tree.map(np.array, params)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=opt_state)
    step = trainer.make_train_step(loss_fn, tx, jax.random.key(0))
    batch = {"ids": ids, "start": jnp.asarray(starts, jnp.int32), "label": jnp.array([1, 2, 3], jnp.int32)}
    state, metrics = step(state, frozen, batch)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    after = trainer.merge(jax.device_get(state.params), frozen)
    assert_trees_equal(after["base"], before["base"])  # the frozen backbone is untouched
    for name in ("fc1", "fc2"):
        assert np.abs(after["lora"][name]["kernel"]["b"]).max() > 0  # B moved off zero
    assert np.abs(after["prompt"]["embeddings"] - before["prompt"]["embeddings"]).max() > 0
