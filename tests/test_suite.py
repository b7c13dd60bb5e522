"""The evaluation suite on an oracle embedder (every metric 100) and an inverted one (every pairwise metric 0)."""

import numpy as np
import pytest

from vlm_jax.data import builtin
from vlm_jax.eval import suite as eval_suite


@pytest.fixture(scope="module")
def toy():
    ds = builtin.builtin_dataset()
    return ds, eval_suite.toy_suite(ds)


def _embedders(ds, sign=1.0):
    """Images and captions embedded as the one-hot of their class: a perfect model (sign=1)."""
    c = len(ds.classnames)
    by_name = {f"a photo of a {n}.": i for i, n in enumerate(ds.classnames)}
    embed_images = lambda items: np.eye(c)[[x.label for x in items]]
    embed_texts = lambda texts: sign * np.eye(c)[[by_name[t] for t in texts]] + (sign < 0) * 1.0
    return embed_images, embed_texts


def test_oracle_scores_100_everywhere(toy):
    ds, suite = toy
    m = eval_suite.evaluate(suite, *_embedders(ds))
    for key in ("t2i_R@1", "i2t_R@1", "sugarcrepe/replace_obj", "winoground/text", "winoground/image",
                "winoground/group", "classification/accuracy"):
        assert m[key] == 100.0, key


def test_inverted_embedder_fails_pairwise_tests(toy):
    ds, suite = toy
    m = eval_suite.evaluate(suite, *_embedders(ds, sign=-1.0))
    assert m["sugarcrepe/replace_obj"] == 0.0 and m["winoground/group"] == 0.0 and m["t2i_R@1"] == 0.0
