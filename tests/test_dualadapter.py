"""DualAdapter: hand-checked small cases and comparisons with a torch transcription of the reference formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm_jax.methods import dualadapter as da

RTOL, ATOL = 1e-5, 1e-5


def _unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _random_problem(seed=0, c=4, k=3, d=6, b=5):
    rng = np.random.default_rng(seed)
    keys = _unit(rng.normal(size=(c * k, d))).astype(np.float32)
    labels = np.repeat(np.arange(c), k)
    feats = _unit(rng.normal(size=(b, d))).astype(np.float32)
    y = rng.integers(0, c, b)
    w_t, w_u, w_n = (_unit(rng.normal(size=(c, d))).astype(np.float32) for _ in range(3))
    return keys, labels, feats, y, w_t, w_u, w_n


# ---------------------------------------------------------------------------------------------- text side


def test_text_classifier_array_and_list():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 4, 5)).astype(np.float32)
    expect = _unit(_unit(emb).mean(1))
    np.testing.assert_allclose(da.text_classifier(jnp.asarray(emb)), expect, rtol=RTOL, atol=ATOL)
    ragged = [rng.normal(size=(p, 5)).astype(np.float32) for p in (1, 3, 2)]
    expect = np.stack([_unit(_unit(e).mean(0)) for e in ragged])
    np.testing.assert_allclose(da.text_classifier(ragged), expect, rtol=RTOL, atol=ATOL)


def test_positive_classifier_is_not_renormalised():
    w_t = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    w_u = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    out = np.asarray(da.positive_classifier(w_t, w_u))
    np.testing.assert_allclose(out, [[0.45, 0.55], [0.0, 1.0]], atol=1e-7)
    assert np.linalg.norm(out[0]) < 1.0  # the reference uses the mix as is
    np.testing.assert_array_equal(da.positive_classifier(w_t), w_t)


# ---------------------------------------------------------------------------------------------- caches


def test_soft_values_hand_checked():
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    # class 0: e1, e1, e2 -> cos rows sum - 1 = [1, 1, 0], avg = [.5, .5, 0], conf = softmax([5, 5, 0]).
    # class 1: e3, e3, e3 -> all equal -> conf = 1/3, value = 1.
    keys = np.stack([e1, e1, e2, e3, e3, e3])
    caches = da.build_caches(keys, [0, 0, 0, 1, 1, 1], 2)
    z = 2 * math.exp(5) + 1
    conf = np.array([math.exp(5) / z, math.exp(5) / z, 1 / z])
    expect = np.zeros((6, 2))
    expect[:3, 0] = 3 * conf
    expect[3:, 1] = 1.0
    np.testing.assert_allclose(caches.soft_values, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(caches.values, np.repeat(np.eye(2), 3, 0))
    assert caches.shots == 3 and caches.num_classes == 2


def test_negative_keys_hand_checked():
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    # Class means are e1, e2, e3: every class's negatives are the two others.
    keys = np.stack([e1, e1, e2, e2, e3, e3])
    caches = da.build_caches(keys, [0, 0, 1, 1, 2, 2], 3)
    s = 1 / math.sqrt(2)
    expect = np.array([[0, s, s]] * 2 + [[s, 0, s]] * 2 + [[s, s, 0]] * 2)
    np.testing.assert_allclose(caches.neg_keys, expect, atol=1e-6)


def test_negative_keys_pair_shots_by_index():
    # Shot s of the negative key averages shot s of the other classes.
    e = np.eye(4, dtype=np.float32)
    keys = np.stack([e[0], _unit(e[0] + 0.1 * e[3]), e[1], e[2]])  # class 0: 2 shots, class 1: e1, e2
    caches = da.build_caches(keys, [0, 0, 1, 1], 2)
    np.testing.assert_allclose(caches.neg_keys[0], e[1], atol=1e-6)  # class 0 shot 0 <- class 1 shot 0
    np.testing.assert_allclose(caches.neg_keys[1], e[2], atol=1e-6)
    np.testing.assert_allclose(caches.neg_keys[2], e[0], atol=1e-6)
    np.testing.assert_allclose(caches.neg_keys[3], _unit(e[0] + 0.1 * e[3]), atol=1e-6)


def test_negative_keys_tie_excludes_self():
    # Classes 0 and 1 are identical, so S[0, 0] == S[0, 1]: the class itself is the one left out.
    e = np.eye(3, dtype=np.float32)
    keys = np.stack([e[0], e[0], e[0], e[0], e[2], e[2]])
    caches = da.build_caches(keys, [0, 0, 1, 1, 2, 2], 3)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(caches.neg_keys[0], [s, 0, s], atol=1e-6)
    np.testing.assert_allclose(caches.neg_keys[2], [s, 0, s], atol=1e-6)


def _torch_reference_caches(keys, c, k, temperature=0.1):
    """Transcription of utils.generate_soft_label / generate_pseudo_negative_cache in float32."""
    keys = torch.tensor(keys)
    d = keys.shape[-1]
    kk = keys.reshape(c, k, d)
    values = F.one_hot(torch.arange(c).repeat_interleave(k), c).float().reshape(c, k, c)
    soft = torch.zeros(c, k, c)
    for i in range(c):
        avg = ((kk[i] @ kk[i].t()).sum(1) - 1) / (k - 1)
        soft[i] = values[i] * F.softmax(avg / temperature, dim=0)[:, None] * k
    means = F.normalize(kk.mean(1), dim=1)
    _, idx = torch.topk(means @ means.t(), k=c - 1, largest=False, dim=1)
    neg = torch.stack([kk[idx[i]].mean(0) for i in range(c)])
    return soft.reshape(-1, c).numpy(), F.normalize(neg.reshape(-1, d), dim=1).numpy()


def test_caches_match_torch_reference():
    keys, labels, *_ = _random_problem(seed=1, c=5, k=4, d=8)
    caches = da.build_caches(keys, labels, 5)
    soft, neg = _torch_reference_caches(keys, 5, 4)
    np.testing.assert_allclose(caches.soft_values, soft, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(caches.neg_keys, neg, rtol=1e-5, atol=1e-6)


def test_build_caches_order_invariance():
    keys, labels, *_ = _random_problem(seed=2, c=3, k=2, d=5)
    ref = da.build_caches(keys, labels, 3)
    # Interleave the classes (class-major -> shot-major); the within-class order is kept.
    perm = np.arange(6).reshape(3, 2).T.reshape(-1)
    out = da.build_caches(keys[perm], labels[perm], 3)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_array_equal(a, b)
    # Swapping two shots of one class swaps the matching rows of keys and soft values.
    swap = np.array([1, 0, 2, 3, 4, 5])
    out = da.build_caches(keys[swap], labels[swap], 3)
    np.testing.assert_array_equal(out.keys, ref.keys[swap])
    np.testing.assert_allclose(out.soft_values, ref.soft_values[swap], rtol=1e-6)


def test_build_caches_one_shot_is_one_hot():
    keys, labels, *_ = _random_problem(seed=3, c=4, k=1, d=5)
    caches = da.build_caches(keys, labels, 4)
    np.testing.assert_array_equal(caches.soft_values, np.eye(4))
    np.testing.assert_array_equal(caches.values, np.eye(4))


def test_build_caches_errors():
    keys = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="same number of shots"):
        da.build_caches(keys, [0, 0, 0, 1], 2)
    with pytest.raises(ValueError, match="same number of shots"):
        da.build_caches(keys, [0, 0, 1, 1], 3)  # class 2 has no shot
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        da.build_caches(keys, [0, 0, 1, 2], 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        da.build_caches(keys, [0, 0, 0, 0], 1)


# ---------------------------------------------------------------------------------------------- logits


def _numpy_logits(f, w_pos, w_neg, keys, neg_keys, soft, values, alpha, beta, lam):
    f, w_pos, w_neg, keys, neg_keys = (np.asarray(x, np.float64) for x in (f, w_pos, w_neg, keys, neg_keys))
    pos = 100 * f @ w_pos.T + alpha * np.exp(-beta * (1 - f @ keys.T)) @ soft
    neg = 15 * (1 - f @ w_neg.T) + alpha * np.exp(-beta * (f @ neg_keys.T)) @ values
    return lam * pos + (1 - lam) * neg


def test_logits_formula():
    keys, labels, feats, _, w_t, w_u, w_n = _random_problem(seed=4)
    caches = da.build_caches(keys, labels, 4)
    w_pos = da.positive_classifier(w_t, w_u)
    out = da.logits(feats, w_pos, w_n, caches, alpha=1.7, beta=3.0, lam=0.7)
    expect = _numpy_logits(feats, w_pos, w_n, caches.keys, caches.neg_keys, caches.soft_values, caches.values,
                           1.7, 3.0, 0.7)
    assert out.shape == (5, 4)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-4)


def test_logits_vmap_over_grid():
    keys, labels, feats, _, w_t, w_u, w_n = _random_problem(seed=5)
    caches = da.build_caches(keys, labels, 4)
    w_pos = da.positive_classifier(w_t, w_u)
    grid = jnp.array([[0.5, 1.0, 0.6], [2.0, 4.0, 0.9]])
    fn = jax.jit(jax.vmap(lambda p: da.logits(feats, w_pos, w_n, caches, alpha=p[0], beta=p[1], lam=p[2])))
    out = fn(grid)
    for i, (a, b, l) in enumerate(np.asarray(grid)):
        np.testing.assert_allclose(out[i], da.logits(feats, w_pos, w_n, caches, alpha=a, beta=b, lam=l),
                                   rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- fine-tuning


def _torch_reference_step(res, feats, y, w_t, w_u, w_n, keys, neg_keys, soft, values, shots, alpha, beta, lam,
                          consistency):
    """Transcription of the reference training step in float32 with the reference's [D, C] weight layout."""
    t = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in res.items()}
    f = torch.tensor(feats)
    wt, wu, wn = (torch.tensor(np.asarray(w)).t() for w in (w_t, w_u, w_n))  # [D, C]
    # PositiveAdapter.
    k1 = F.normalize(torch.tensor(np.asarray(keys)) + t["res_keys"].repeat_interleave(shots, 0), dim=1)
    nk1 = F.normalize(torch.tensor(np.asarray(neg_keys)), dim=1)
    wt1, wu1, wn1 = F.normalize(wt + t["res_template"].t(), dim=0), F.normalize(wu + t["res_cupl"].t(), dim=0), \
        F.normalize(wn, dim=0)
    # NegativeAdapter.
    nk2 = F.normalize(nk1 + t["res_neg_keys"].repeat_interleave(shots, 0), dim=1)
    wn2 = F.normalize(wn1 + t["res_neg"].t(), dim=0)
    k2, wt2, wu2 = F.normalize(k1, dim=1), F.normalize(wt1, dim=0), F.normalize(wu1, dim=0)
    # Logits.
    w = 0.45 * wt2 + 0.55 * wu2
    pos = 100.0 * f @ w + ((-1) * (beta - beta * (f @ k2.t()))).exp() @ torch.tensor(np.asarray(soft)) * alpha
    neg = 100.0 * (1 - f @ wn2) * 0.15 + ((-1) * (beta - beta * (1 - f @ nk2.t()))).exp() @ torch.tensor(
        np.asarray(values)) * alpha
    out = lam * pos + (1 - lam) * neg
    ce = F.cross_entropy(out, torch.tensor(y))
    # Consistency: the reference applies CosineSimilarity(dim=1) to [D, C]; per_class is over [C, D].
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-7)
    if consistency == "reference":
        dist = 0.45 * (1 - cos(w, wt)) + 0.55 * (1 - cos(w, wu))
    else:
        dist = 0.45 * (1 - cos(w.t(), wt.t())) + 0.55 * (1 - cos(w.t(), wu.t()))
    cons = dist.mean()
    rerank = _torch_rerank(f, w.t(), torch.tensor(y))
    loss = ce + rerank + 8 * cons
    loss.backward()
    return ({"loss": loss.item(), "ce": ce.item(), "rerank": rerank.item(), "consistency": cons.item()},
            {k: v.grad.numpy() for k, v in t.items()})


def _torch_rerank(feats, protos, labels, scale=4.0, knn=3):
    """Transcription of main.adaptive_reranking_loss."""
    knn = min(knn, protos.shape[0])
    dist = torch.cdist(feats, protos, p=2)
    sd, si = torch.sort(dist, dim=1)
    anchor = ((feats - protos[labels]) ** 2).sum(-1).sqrt()[:, None]
    margins = (1.0 - (protos[si[:, :knn]] * protos[labels][:, None]).sum(-1)) / scale
    return torch.clamp(anchor + margins - sd[:, :knn], min=0).mean()


def test_rerank_matches_torch():
    rng = np.random.default_rng(6)
    feats = _unit(rng.normal(size=(7, 5))).astype(np.float32)
    protos = (0.8 * _unit(rng.normal(size=(4, 5)))).astype(np.float32)
    y = rng.integers(0, 4, 7)
    for knn in (1, 3, 10):
        got = da.adaptive_reranking_loss(feats, protos, y, scale=4.0, knn=knn)
        want = _torch_rerank(torch.tensor(feats), torch.tensor(protos), torch.tensor(y), knn=knn).item()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(da.adaptive_reranking_loss(feats, protos, y)) > 0


def test_rerank_hand_checked():
    # One sample at the origin-facing point, 2 prototypes: knn = 2 covers both.
    f = np.array([[1.0, 0.0]], np.float32)
    p = np.array([[0.6, 0.0], [0.0, 0.8]], np.float32)
    # d = [0.4, sqrt(1.64)], anchor (y=0) = 0.4, margins = (1 - p_k.p_0) / 4 = [(1-.36)/4, 1/4].
    want = np.mean([max(0, 0.4 + 0.16 - 0.4), max(0, 0.4 + 0.25 - math.sqrt(1.64))])
    np.testing.assert_allclose(da.adaptive_reranking_loss(f, p, np.array([0]), knn=2), want, rtol=1e-6)


@pytest.mark.parametrize("mode", ["per_class", "reference"])
def test_consistency_matches_torch(mode):
    rng = np.random.default_rng(7)
    w_pos, w_t, w_u = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3))
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-7)
    a, b, c = (torch.tensor(x) for x in (w_pos, w_t, w_u))
    if mode == "reference":
        a, b, c = a.t(), b.t(), c.t()  # the reference's [D, C] layout
    want = (0.45 * (1 - cos(a, b)) + 0.55 * (1 - cos(a, c))).mean().item()
    np.testing.assert_allclose(da.consistency_loss(w_pos, w_t, w_u, mode), want, rtol=1e-5, atol=1e-6)
    # The two readings differ.
    other = "reference" if mode == "per_class" else "per_class"
    assert abs(float(da.consistency_loss(w_pos, w_t, w_u, other)) - want) > 1e-3


def test_zero_residuals_leave_classifiers_unchanged():
    keys, labels, _, _, w_t, w_u, w_n = _random_problem(seed=8)
    caches = da.build_caches(keys, labels, 4)
    res = da.init_residuals(4, 6)
    assert set(res) == {"res_template", "res_cupl", "res_keys", "res_neg", "res_neg_keys"}
    w_pos, wt, wu, wn, k, nk = da.adapt(res, w_t, w_u, w_n, caches)
    for got, want in [(wt, w_t), (wu, w_u), (wn, w_n), (k, caches.keys), (nk, caches.neg_keys),
                      (w_pos, da.positive_classifier(w_t, w_u))]:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_param_groups():
    groups = da.param_groups(da.init_residuals(3, 2))
    assert groups == {"res_template": "positive", "res_cupl": "positive", "res_keys": "positive",
                      "res_neg": "negative", "res_neg_keys": "negative"}
    with pytest.raises(KeyError):
        da.param_groups({"bogus": jnp.zeros(2)})


@pytest.mark.parametrize("mode", ["reference", "per_class"])
def test_finetune_loss_and_grads_match_torch(mode):
    keys, labels, feats, y, w_t, w_u, w_n = _random_problem(seed=9, c=4, k=3, d=6, b=8)
    caches = da.build_caches(keys, labels, 4)
    rng = np.random.default_rng(10)
    res = {k: jnp.asarray(0.05 * rng.normal(size=v.shape), jnp.float32) for k, v in da.init_residuals(4, 6).items()}
    hp = dict(alpha=1.5, beta=2.0, lam=0.75)
    fn = jax.jit(jax.value_and_grad(lambda r: da.finetune_loss(r, feats, y, w_t, w_u, w_n, caches,
                                                                consistency=mode, **hp), has_aux=True))
    (loss, metrics), grads = fn(res)
    want, want_grads = _torch_reference_step(res, feats, y, w_t, w_u, w_n, caches.keys, caches.neg_keys,
                                             caches.soft_values, caches.values, caches.shots, consistency=mode, **hp)
    for name in ("loss", "ce", "rerank", "consistency"):
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(loss, want["loss"], rtol=1e-4)
    assert 0.0 <= float(metrics["accuracy"]) <= 100.0
    for name, g in grads.items():
        np.testing.assert_allclose(g, want_grads[name], rtol=1e-3, atol=1e-5, err_msg=name)


def test_finetune_grads_finite_and_nonzero_at_init():
    keys, labels, feats, y, w_t, w_u, w_n = _random_problem(seed=11, b=6)
    caches = da.build_caches(keys, labels, 4)
    res = da.init_residuals(4, 6)
    grads = jax.jit(jax.grad(lambda r: da.finetune_loss(r, feats, y, w_t, w_u, w_n, caches, alpha=1.0, beta=1.0,
                                                        lam=0.75)[0]))(res)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
        assert np.any(np.abs(g) > 0), name
    # Without CuPL the cupl residual is unused.
    grads = jax.jit(jax.grad(lambda r: da.finetune_loss(r, feats, y, w_t, None, w_n, caches, alpha=1.0, beta=1.0,
                                                        lam=0.75)[0]))(res)
    assert not np.any(grads["res_cupl"]) and np.any(grads["res_template"])


# ---------------------------------------------------------------------------------------------- presets


def test_presets():
    names = {"default", "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
             "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"}
    assert set(da.PRESETS) == names
    required = {"search_scale", "search_scale2", "search_step", "init_beta", "init_alpha", "init_lambda", "lr",
                "eps", "train_epoch", "augment_epoch", "seed"}
    for name, p in da.PRESETS.items():
        assert required <= set(p), name
        assert len(p["search_scale"]) == len(p["search_scale2"]) == len(p["search_step"]) == 3
    g = da.search_grids("default")
    assert list(g) == ["beta", "alpha", "lam"]
    assert [len(v) for v in g.values()] == [200, 40, 20]
    assert g["beta"][1] == 7 / 200 and g["lam"][0] == 0.6 and g["lam"][-1] == 19 * 0.4 / 20 + 0.6
    assert da.PRESETS["eurosat"]["search_step"] == (200, 20, 10) and da.PRESETS["fgvc_aircraft"]["lr"] == 5e-4
