"""VITask's pure pieces: losses against numpy on small random logits, sequence surgery, the connector."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.methods import vitask

B, L, V = 3, 7, 11


def _data(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, L, V)).astype(np.float32) * 2
    other = rng.normal(size=(B, L, V)).astype(np.float32) * 2
    ids = rng.integers(0, V, size=(B, L)).astype(np.int32)
    answer = np.zeros((B, L), np.int32)
    answer[0, 4:] = 1
    answer[1, 5:6] = 1
    answer[2, 2:5] = 1
    return logits, other, ids, answer


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _targets(answer):
    return [(b, t) for b in range(B) for t in range(L - 1) if answer[b, t + 1]]


def test_answer_nll_matches_numpy_and_ignores_other_positions():
    logits, other, ids, answer = _data()
    lp = _log_softmax(logits.astype(np.float64))
    want = np.mean([-lp[b, t, ids[b, t + 1]] for b, t in _targets(answer)])
    got = vitask.answer_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(answer))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Changing logits / ids outside the predicting positions changes nothing.
    keep = np.zeros((B, L), bool)
    for b, t in _targets(answer):
        keep[b, t] = True
    logits2 = np.where(keep[..., None], logits, other)
    ids2 = np.where(np.pad(keep, ((0, 0), (1, 0)))[:, :L], ids, (ids + 1) % V)
    np.testing.assert_allclose(vitask.answer_nll(logits2, ids2, answer), got, rtol=1e-6)
    assert float(vitask.answer_nll(logits, ids, np.zeros_like(answer))) == 0.0


@pytest.mark.parametrize("direction", vitask.DIRECTIONS)
def test_rda_zero_when_equal_positive_otherwise_matches_numpy(direction):
    logits, other, _, answer = _data(1)
    assert abs(float(vitask.rda_loss(logits, logits, answer, direction=direction))) < 1e-6
    got = vitask.rda_loss(logits, other, answer, direction=direction)
    ls, lt = _log_softmax(logits.astype(np.float64)), _log_softmax(other.astype(np.float64))
    if direction == "student_teacher":
        kl = (np.exp(ls) * (ls - lt)).sum(-1)
    else:
        kl = (np.exp(lt) * (lt - ls)).sum(-1)
    want = np.mean([kl[b, t] for b, t in _targets(answer)])
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="direction"):
        vitask.rda_loss(logits, other, answer, direction="both")


@pytest.mark.parametrize("direction", vitask.DIRECTIONS)
def test_rda_gradient_only_to_student(direction):
    logits, other, _, answer = _data(2)
    gs, gt = jax.grad(lambda s, t: vitask.rda_loss(s, t, answer, direction=direction), argnums=(0, 1))(
        jnp.asarray(logits), jnp.asarray(other))
    assert np.all(np.asarray(gt) == 0)
    assert np.abs(np.asarray(gs)).max() > 0
    # Only the predicting positions of answer tokens get a gradient.
    keep = np.zeros((B, L), bool)
    for b, t in _targets(answer):
        keep[b, t] = True
    assert np.all(np.asarray(gs)[~keep] == 0)


def test_crt_is_cross_entropy_of_logit_difference():
    logits, other, ids, answer = _data(3)
    lp = _log_softmax(logits.astype(np.float64) - other.astype(np.float64))
    want = np.mean([-lp[b, t, ids[b, t + 1]] for b, t in _targets(answer)])
    np.testing.assert_allclose(vitask.crt_loss(logits, other, ids, answer), want, rtol=1e-5)
    # Equal to answer_nll on the difference; a shared offset on both passes cancels.
    np.testing.assert_allclose(vitask.crt_loss(logits, other, ids, answer),
                               vitask.answer_nll(logits - other, ids, answer), rtol=1e-6)
    np.testing.assert_allclose(vitask.crt_loss(logits + 5.0, other + 5.0, ids, answer), want, rtol=1e-5)


def test_total_loss_per_stage():
    l_van, l_ep, rda, crt = 1.0, 2.0, 0.5, 0.25
    assert float(vitask.total_loss(1, l_van, l_ep, rda, crt, alpha=2.0, beta=3.0)) == pytest.approx(4.0)
    assert float(vitask.total_loss(1, l_van, l_ep, rda)) == pytest.approx(3.5)
    assert float(vitask.total_loss(2, l_van, l_ep, rda, crt, alpha=2.0, beta=3.0)) == pytest.approx(4.75)
    with pytest.raises(ValueError, match="CRT"):
        vitask.total_loss(2, l_van, l_ep, rda)
    with pytest.raises(ValueError, match="stage"):
        vitask.total_loss(3, l_van, l_ep, rda, crt)


IMG = 9


def test_insert_exemplar_positions_per_row():
    ids = np.array([[1, IMG, IMG, 5, 6, 0],      # right-padded: after image at 3
                    [0, 1, IMG, IMG, 7, 8],      # left-padded: at 4
                    [1, 4, 5, 6, 7, 8],          # no image: 0
                    [1, 3, IMG, IMG, IMG, IMG]], np.int32)  # image last: at L
    mask = (ids != 0).astype(np.int32)
    mask[1, 0] = 0
    pos = vitask.exemplar_position(jnp.asarray(ids), IMG)
    np.testing.assert_array_equal(pos, [3, 4, 0, 6])
    b, length, d = ids.shape[0], ids.shape[1], 4
    embeds = np.arange(b * length * d, dtype=np.float32).reshape(b, length, d)
    ex = -np.arange(1, b * d + 1, dtype=np.float32).reshape(b, d)
    out, m = jax.jit(vitask.insert_exemplar)(embeds, mask, ex, pos)
    assert out.shape == (b, length + 1, d) and m.shape == (b, length + 1)
    for r, p in enumerate(np.asarray(pos)):
        np.testing.assert_array_equal(out[r, p], ex[r])
        np.testing.assert_array_equal(np.delete(np.asarray(out[r]), p, 0), embeds[r])
        assert m[r, p] == 1
        np.testing.assert_array_equal(np.delete(np.asarray(m[r]), p), mask[r])
    # The connector's [B, 1, D] output is accepted too.
    out2, _ = vitask.insert_exemplar(embeds, mask, ex[:, None], pos)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(vitask.remove_token(out, pos), embeds)


def test_drop_exemplar_logits_aligns_the_two_passes():
    """Teacher-forced NLL of the exemplar sequence == that of the aligned logits on the plain sequence."""
    logits, _, ids, answer = _data(4)
    ids[:, 1:3] = IMG
    pos = vitask.exemplar_position(jnp.asarray(ids), IMG)  # 3 in every row
    answer[2, 2] = 0  # answers only after the image tokens
    rng = np.random.default_rng(5)
    ep_logits = rng.normal(size=(B, L + 1, V)).astype(np.float32)
    ep_ids = vitask.insert_token(jnp.asarray(ids), 0, pos)
    ep_answer = vitask.insert_token(jnp.asarray(answer), 0, pos)
    aligned = vitask.drop_exemplar_logits(jnp.asarray(ep_logits), pos)
    assert aligned.shape == (B, L, V)
    np.testing.assert_allclose(vitask.answer_nll(aligned, ids, answer),
                               vitask.answer_nll(ep_logits, ep_ids, ep_answer), rtol=1e-6)
    # Position 0 (no image tokens): row 0 predicts plain token 0 and is dropped.
    x = jnp.arange(B * (L + 1) * 2, dtype=jnp.float32).reshape(B, L + 1, 2)
    np.testing.assert_array_equal(vitask.drop_exemplar_logits(x, jnp.zeros(B, jnp.int32)), x[:, 1:])


def test_connector_shape_and_logical_axes():
    conn = vitask.ExemplarConnector(out_dim=16, hidden_dim=12)
    feat = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)), jnp.float32)
    variables = conn.init(jax.random.PRNGKey(0), feat)
    out = conn.apply(variables, feat)
    assert out.shape == (2, 1, 16) and out.dtype == jnp.float32
    params = variables["params"]
    assert params["linear_1"]["kernel"].names == ("embed_vision", "mlp")
    assert params["linear_2"]["kernel"].names == ("mlp", "embed")
    assert params["linear_1"]["kernel"].value.shape == (8, 12)
    specs = nn.get_partition_spec(params)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    assert all(is_spec(s) for s in jax.tree.leaves(specs, is_leaf=is_spec))
    assert specs["norm"]["scale"] == jax.sharding.PartitionSpec("norm")
    # Matches the reference computation.
    p = nn.unbox(params)
    x = np.asarray(feat, np.float64)
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    x = x * p["norm"]["scale"] + p["norm"]["bias"]
    h = x @ p["linear_1"]["kernel"] + p["linear_1"]["bias"]
    h = np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=False), np.float64)
    want = h @ p["linear_2"]["kernel"] + p["linear_2"]["bias"]
    np.testing.assert_allclose(out[:, 0], want, rtol=1e-4, atol=1e-5)
