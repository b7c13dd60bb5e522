"""Recall@k (ALBEF protocol, pessimistic ties, blocked), SugarCrepe, Winoground and the results table."""

import numpy as np
import pytest

from vlm_jax.eval import retrieval as rt

# 3 orthonormal images, 6 unit captions (2 per image), so scores are just the caption's coordinates.
IMAGES = np.eye(3, dtype=np.float32)
TEXTS = np.array([
    [0.8, 0.6, 0.0],    # t0 (image 0): images .8 .6 0   -> own image first, t2i rank 0
    [0.0, 0.28, 0.96],  # t1 (image 0): images 0 .28 .96 -> rank 2
    [0.6, 0.8, 0.0],    # t2 (image 1): images .6 .8 0   -> rank 0
    [0.28, 0.0, 0.96],  # t3 (image 1): images .28 0 .96 -> rank 2
    [0.0, 0.96, 0.28],  # t4 (image 2): images 0 .96 .28 -> rank 1
    [0.6, 0.0, 0.8],    # t5 (image 2): images .6 0 .8   -> rank 0
], np.float32)
C2I = np.array([0, 0, 1, 1, 2, 2], np.int32)
# i2t rows (scores over t0..t5):
#   image 0: .8 0 .6 .28 0 .6    best own .8 (t0); no other caption >= .8        -> rank 0
#   image 1: .6 .28 .8 0 .96 0   best own .8 (t2); t4 (.96) is above            -> rank 1
#   image 2: 0 .96 0 .96 .28 .8  best own .8 (t5); t1, t3 (.96) are above        -> rank 2


def test_recall_hand_computed():
    i2t, t2i = rt.retrieval_ranks(IMAGES, TEXTS, C2I)
    np.testing.assert_array_equal(i2t, [0, 1, 2])
    np.testing.assert_array_equal(t2i, [0, 2, 0, 2, 1, 0])
    r = rt.retrieval_recall(IMAGES, TEXTS, C2I, ks=(1, 2, 3))
    expected = {"i2t_R@1": 100 / 3, "i2t_R@2": 200 / 3, "i2t_R@3": 100.0,
                "t2i_R@1": 50.0, "t2i_R@2": 400 / 6, "t2i_R@3": 100.0}
    assert set(r) == set(expected) | {"rsum"}
    for k, v in expected.items():
        assert r[k] == pytest.approx(v), k
    assert r["rsum"] == pytest.approx(sum(expected.values()))
    # L2-normalised inside: positive rescaling of any row changes nothing.
    scale_i, scale_t = np.array([[2.0], [0.1], [7.0]]), np.arange(1, 7, dtype=np.float32)[:, None]
    assert rt.retrieval_recall(IMAGES * scale_i, TEXTS * scale_t, C2I, ks=(1, 2, 3)) == pytest.approx(r)


def test_ties_count_against_the_query():
    images = np.eye(2, dtype=np.float32)
    # Image 0's caption ties with image 1's first caption on image 0; image 1's two captions tie each other.
    texts = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    c2i = np.array([0, 1, 1])
    i2t, t2i = rt.retrieval_ranks(images, texts, c2i)
    # image 0: own t0 = 1, wrong t1 = 1 (tie, counts) -> rank 1; image 1: own t1 = 0, t2 = 1, best 1 -> rank 0.
    np.testing.assert_array_equal(i2t, [1, 0])
    # t1 scores image 0 (1) above its own image 1 (0) -> rank 1; t0 and t2 are clear wins.
    np.testing.assert_array_equal(t2i, [0, 1, 0])
    # Collapsed embeddings: every score ties, so nothing is retrieved before all wrong candidates.
    i2t, t2i = rt.retrieval_ranks(np.ones((3, 4)), np.ones((6, 4)), C2I)
    np.testing.assert_array_equal(i2t, [4, 4, 4])
    np.testing.assert_array_equal(t2i, [2] * 6)
    r = rt.retrieval_recall(np.zeros((3, 4)), np.zeros((6, 4)), C2I, ks=(1, 4, 5))
    assert (r["i2t_R@1"], r["i2t_R@4"], r["i2t_R@5"]) == (0.0, 0.0, 100.0)
    assert r["t2i_R@1"] == 0.0


def _albef_recall(image_emb, text_emb, c2i, ks):
    """ALBEF's itm_eval loops (argsort, first ground-truth position), valid when there are no ties."""
    img = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    txt = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    s = img @ txt.T
    i2t = [min(np.where(np.argsort(s[i])[::-1] == t)[0][0] for t in np.where(c2i == i)[0])
           for i in range(len(img))]
    t2i = [np.where(np.argsort(s[:, t])[::-1] == c2i[t])[0][0] for t in range(len(txt))]
    out = {f"i2t_R@{k}": 100.0 * np.mean(np.array(i2t) < k) for k in ks}
    out.update({f"t2i_R@{k}": 100.0 * np.mean(np.array(t2i) < k) for k in ks})
    return out


def test_matches_albef_and_blocks_do_not_matter():
    rng = np.random.default_rng(0)
    num_images, dim = 23, 8
    c2i = np.concatenate([np.arange(num_images)] * 5 + [rng.integers(0, num_images, 4)])  # 5-9 captions each
    image_emb = rng.normal(size=(num_images, dim)).astype(np.float32)
    text_emb = (image_emb[c2i] + 1.5 * rng.normal(size=(len(c2i), dim))).astype(np.float32)
    ks = (1, 5, 10)
    full = rt.retrieval_recall(image_emb, text_emb, c2i, ks, block_size=10_000)
    ref = _albef_recall(image_emb, text_emb, c2i, ks)
    for k, v in ref.items():
        assert full[k] == pytest.approx(v), k
    assert 0 < full["i2t_R@1"] < 100 and 0 < full["t2i_R@1"] < 100  # a non-trivial case
    ranks = rt.retrieval_ranks(image_emb, text_emb, c2i, block_size=10_000)
    for block in (1, 4, 7, 23, 24):
        got = rt.retrieval_ranks(image_emb, text_emb, c2i, block_size=block)
        np.testing.assert_array_equal(got[0], ranks[0])
        np.testing.assert_array_equal(got[1], ranks[1])


def test_blocked_memory_is_bounded():
    # The compiled program never holds the I x T score matrix: its temporaries stay well below it.
    import jax
    num_images, num_texts, dim, block = 512, 2560, 16, 32
    args = (jax.ShapeDtypeStruct((num_images, dim), np.float32), jax.ShapeDtypeStruct((num_texts, dim), np.float32),
            jax.ShapeDtypeStruct((num_texts,), np.int32))
    stats = rt._ranks.lower(*args, image_block=block, text_block=block).compile().memory_analysis()
    if stats is None:
        pytest.skip("no memory analysis on this backend")
    assert stats.temp_size_in_bytes < num_images * num_texts * 4 / 3


def test_recall_input_errors():
    with pytest.raises(ValueError, match="no caption"):
        rt.retrieval_recall(IMAGES, TEXTS, np.array([0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="outside"):
        rt.retrieval_recall(IMAGES, TEXTS, np.array([0, 0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match="caption_to_image"):
        rt.retrieval_recall(IMAGES, TEXTS, C2I[:5])
    with pytest.raises(ValueError, match=r"f32\[I, D\]"):
        rt.retrieval_recall(IMAGES, TEXTS[:, :2], C2I)
    with pytest.raises(ValueError, match="NaN"):
        rt.retrieval_recall(IMAGES, np.where(TEXTS > 0.9, np.nan, TEXTS), C2I)
    with pytest.raises(ValueError, match="ks"):
        rt.retrieval_recall(IMAGES, TEXTS, C2I, ks=(0,))


def test_pairwise_and_sugarcrepe():
    # wins: 3>1 yes, 2>2 tie (no), 1>2 no, 5>4 yes.
    assert rt.pairwise_accuracy([3, 2, 1, 5], [1, 2, 2, 4]) == 50.0
    with pytest.raises(ValueError):
        rt.pairwise_accuracy([1, 2], [1])

    def pair(wins, n):  # n pairs of which `wins` have pos > neg
        return np.r_[np.ones(wins), np.zeros(n - wins)], np.full(n, 0.5)

    acc = {"replace_obj": (9, 10), "replace_att": (8, 10), "replace_rel": (4, 5), "swap_obj": (1, 4),
           "swap_att": (3, 4), "add_obj": (1, 2), "add_att": (7, 7)}
    out = rt.sugarcrepe_scores({c: pair(*a) for c, a in acc.items()})
    per = {"replace_obj": 90.0, "replace_att": 80.0, "replace_rel": 80.0, "swap_obj": 25.0, "swap_att": 75.0,
           "add_obj": 50.0, "add_att": 100.0}
    for c, v in per.items():
        assert out[c] == pytest.approx(v)
    assert out["replace"] == pytest.approx(250 / 3)   # unweighted over categories
    assert out["swap"] == pytest.approx(50.0)
    assert out["add"] == pytest.approx(75.0)
    assert out["average"] == pytest.approx(sum(per.values()) / 7)
    # A partial run reports only complete groups.
    part = rt.sugarcrepe_scores({c: pair(*acc[c]) for c in ("swap_obj", "swap_att", "add_obj")})
    assert set(part) == {"swap_obj", "swap_att", "add_obj", "swap"}


def test_winoground_definitions():
    s = np.array([
        [[1.0, 0.0], [0.0, 1.0]],      # both right: text, image, group
        [[0.9, 0.1], [0.95, 0.99]],    # text right (.9>.1, .99>.95); image wrong (s00 .9 < s10 .95)
        [[0.5, 0.6], [0.1, 0.9]],      # text wrong (.5<.6); image right (.5>.1, .9>.6)
        [[0.5, 0.5], [0.5, 0.5]],      # all tied: nothing
    ])
    assert rt.winoground_scores(s) == {"text": 50.0, "image": 50.0, "group": 25.0}
    assert rt.winoground_scores(s[1:2]) == {"text": 100.0, "image": 0.0, "group": 0.0}
    with pytest.raises(ValueError, match="N, 2, 2"):
        rt.winoground_scores(np.zeros((3, 2)))


def test_format_table():
    rows = {"CLIP ViT-L": {"t2i_R@1": 65.01, "i2t_R@1": 85.2},
            "VladVA|7B": {"t2i_R@1": 85.04, "i2t_R@1": None},
            "E5-V": {"t2i_R@1": float("nan")}}
    got = rt.format_table(rows, {"t2i_R@1": "Flickr T2I R@1", "i2t_R@1": "Flickr I2T R@1"}, bold_best=True)
    assert got == ("| model | Flickr T2I R@1 | Flickr I2T R@1 |\n"
                   "|---|---:|---:|\n"
                   "| CLIP ViT-L | 65.0 | **85.2** |\n"
                   "| VladVA\\|7B | **85.0** | – |\n"
                   "| E5-V | – | – |\n")
    plain = rt.format_table(rows, ["i2t_R@1"], digits=2, title="Flickr30k")
    assert plain.splitlines()[:4] == ["### Flickr30k", "", "| model | i2t_R@1 |", "|---|---:|"]
    assert "| CLIP ViT-L | 85.20 |" in plain
