"""Accuracy, the reference grid and the vectorised hyperparameter search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.eval import classification as cl
from vlm_jax.methods import dualadapter as da


def test_accuracy_basic_valid_and_subset():
    logits = jnp.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    labels = jnp.array([1, 2, 2, 0])
    # argmax: 1, 0, 2, 0 (first of tied maxima).
    np.testing.assert_allclose(cl.accuracy(logits, labels), 75.0)
    np.testing.assert_allclose(cl.accuracy(logits, labels, valid=jnp.array([True, False, True, False])), 100.0)
    np.testing.assert_allclose(cl.accuracy(logits, labels, valid=jnp.zeros(4, bool)), 0.0)
    # Subset {0, 2}: predictions 0, 0, 2, 0 in the original ids.
    np.testing.assert_allclose(cl.accuracy(logits, labels, class_subset=[0, 2]), 50.0)
    # Labels already in subset space.
    restricted = cl.restrict(logits, [0, 2])
    assert restricted.shape == (4, 2)
    np.testing.assert_allclose(cl.accuracy(restricted, jnp.array([1, 1, 1, 0])), 50.0)
    np.testing.assert_allclose(jax.jit(cl.accuracy)(logits, labels), 75.0)


def test_grid_matches_reference():
    assert cl.grid(0, 7, 200).tolist() == [i * (7 - 0) / 200 + 0 for i in range(200)]
    assert cl.grid(0.6, 1, 20).tolist() == [i * (1 - 0.6) / 20 + 0.6 for i in range(20)]
    assert cl.grid(0.1, 13, 20).tolist() == [i * (13 - 0.1) / 20 + 0.1 for i in range(20)]
    for name in da.PRESETS:
        g = da.search_grids(name)
        p = da.PRESETS[name]
        for i, k in enumerate(g):
            np.testing.assert_array_equal(g[k], cl.grid(p["search_scale"][i], p["search_scale2"][i],
                                                        p["search_step"][i]))


def _table_fn(f, table, beta, alpha, lam=0.0):
    # Example i (feature value i) is correct (label 0) iff i < table[beta, alpha, lam]: accuracies from a table.
    score = table[jnp.int32(beta), jnp.int32(alpha), jnp.int32(lam)]
    good = f[:, 0] < score
    return jnp.stack([good, ~good], -1).astype(jnp.float32)


def _search_table(table, **kw):
    table = jnp.asarray(table, jnp.float32)
    nb, na, nl = table.shape
    feats = jnp.arange(10, dtype=jnp.float32)[:, None]
    grids = {"beta": np.arange(nb, dtype=np.float64), "alpha": np.arange(na, dtype=np.float64)}
    if nl > 1:
        grids["lam"] = np.arange(nl, dtype=np.float64)
    return cl.search(_table_fn, grids, feats, jnp.zeros(10, jnp.int32), args=(table,), **kw)


def test_search_tie_breaking_first_in_loop_order():
    # 2-D: maxima 3 at (0, 1), (1, 0) and (2, 1): the reference's strict '>' keeps (beta=0, alpha=1).
    best, acc, table = _search_table(np.array([[1, 3], [3, 2], [0, 3]])[:, :, None])
    assert best == {"beta": 0.0, "alpha": 1.0} and acc == 30.0
    np.testing.assert_allclose(table, [[10, 30], [30, 20], [0, 30]])
    # 3-D: maxima at (1, 0, 1) and (1, 1, 0) and (2, 0, 0): beta outer, then alpha, then lam.
    t = np.zeros((3, 2, 2))
    t[1, 0, 1] = t[1, 1, 0] = t[2, 0, 0] = 7
    t[0, 1, 1] = 6
    best, acc, _ = _search_table(t)
    assert best == {"beta": 1.0, "alpha": 0.0, "lam": 1.0} and acc == 70.0
    # Same answer with chunking of the outer axis and tiny feature blocks (with padding).
    best2, acc2, table2 = _search_table(t, chunk=2, batch_size=3)
    assert best2 == best and acc2 == acc
    np.testing.assert_allclose(table2, 100 * t / 10)


def test_search_valid_mask():
    feats = jnp.arange(10, dtype=jnp.float32)[:, None]
    table = jnp.full((1, 1, 1), 5.0)
    valid = jnp.arange(10) < 4  # only the first 4 count, all correct
    best, acc, _ = cl.search(_table_fn, {"beta": [0.0], "alpha": [0.0]}, feats, jnp.zeros(10, jnp.int32),
                             args=(table,), valid=valid)
    assert acc == 100.0


def _dualadapter_fn(f, w_pos, w_neg, caches, beta, alpha, lam):
    return da.logits(f, w_pos, w_neg, caches, alpha=alpha, beta=beta, lam=lam)


def test_search_equals_brute_force_loop():
    rng = np.random.default_rng(1)
    c, k, d, n = 5, 3, 8, 40

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    centers = unit(rng.normal(size=(c, d)))
    keys = unit(np.repeat(centers, k, 0) + 0.3 * rng.normal(size=(c * k, d))).astype(np.float32)
    caches = da.build_caches(keys, np.repeat(np.arange(c), k), c)
    y = rng.integers(0, c, n)
    feats = jnp.asarray(unit(centers[y] + 0.5 * rng.normal(size=(n, d))), jnp.float32)
    w_pos = jnp.asarray(unit(centers + 1.5 * rng.normal(size=(c, d))), jnp.float32)
    w_neg = jnp.asarray(unit(rng.normal(size=(c, d))), jnp.float32)
    grids = {"beta": cl.grid(0, 7, 5), "alpha": cl.grid(0, 7, 4), "lam": cl.grid(0.6, 1, 3)}
    best, acc, table = cl.search(_dualadapter_fn, grids, feats, y, args=(w_pos, w_neg, caches), batch_size=16)

    one = jax.jit(lambda b, a, l: cl.accuracy(_dualadapter_fn(feats, w_pos, w_neg, caches, b, a, l), y))
    best_acc, want_best, want = 0.0, None, np.zeros((5, 4, 3))
    for (i, b), (j, a), (m, l) in itertools.product(*(enumerate(g) for g in grids.values())):
        want[i, j, m] = float(one(b, a, l))
        if want[i, j, m] > best_acc:
            best_acc, want_best = want[i, j, m], {"beta": b, "alpha": a, "lam": l}
    np.testing.assert_allclose(table, want, atol=1e-4)
    assert best == want_best and acc == pytest.approx(best_acc)
    assert len(np.unique(table)) > 3  # the grid actually matters on this problem


def test_search_errors():
    with pytest.raises(ValueError):
        cl.search(_dualadapter_fn, {}, jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError):
        cl.search(_dualadapter_fn, {"beta": []}, jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32))


def _tip(f, w, keys, values, *, beta, alpha):
    from vlm_jax.methods import tip_adapter
    return tip_adapter.logits(f, w, keys, values, alpha=alpha, beta=beta)


def test_search_folds_pools_held_out_counts_like_the_loop():
    # Oracle: the loop a cross-validated search is by hand: per setting, the correct held-out predictions summed
    # over the folds (each fold with its own cache), in numpy; the first best setting in loop order wins.
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    w = unit(rng.normal(size=(3, 6))).astype(np.float32)
    folds = []
    for n_held, n_cache in ((3, 6), (5, 9)):
        keys = unit(rng.normal(size=(n_cache, 6))).astype(np.float32)
        values = np.eye(3, dtype=np.float32)[np.arange(n_cache) % 3]
        folds.append((unit(rng.normal(size=(n_held, 6))).astype(np.float32), rng.integers(0, 3, n_held),
                      (w, keys, values)))
    grids = {"beta": cl.grid(0.1, 7, 5), "alpha": cl.grid(0.1, 30, 6)}
    best_ref, best_count = None, -1
    for beta in grids["beta"]:
        for alpha in grids["alpha"]:
            count = 0
            for f, y, (w_, k, v) in folds:
                logits = 100 * f @ w_.T + alpha * np.exp(-beta * (1 - f @ k.T)) @ v
                count += int((logits.argmax(-1) == y).sum())
            if count > best_count:
                best_ref, best_count = {"beta": beta, "alpha": alpha}, count
    best, acc, table = cl.search_folds(_tip, grids, folds)
    np.testing.assert_allclose([best["beta"], best["alpha"]], [best_ref["beta"], best_ref["alpha"]], rtol=1e-6)
    np.testing.assert_allclose(acc, 100 * best_count / 8)
    assert table.shape == (5, 6) and table.max() == acc
    with pytest.raises(ValueError):
        cl.search_folds(_tip, grids, [])
