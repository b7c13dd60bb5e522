"""TFDS caption datasets (array_record, built offline in tmp_path; no TensorFlow needed)."""

import io

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.fewshot import DatasetError

CAPTIONS = [["a red square.", "red on black."], [], ["a blue square.", "blue!", "a third caption."]]


def _tiny_caption_tfds(data_dir):
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
                "long": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(), "test": self._generate_examples()}

        def _generate_examples(self):
            for i, caps in enumerate(CAPTIONS):
                img = np.zeros((6, 7, 3), np.uint8)
                img[..., i] = 100 + i
                buf = io.BytesIO()  # pre-encoded PNG: encoding an array would need TensorFlow
                Image.fromarray(img).save(buf, format="PNG")
                yield i, {"image": io.BytesIO(buf.getvalue()),
                          "captions": {"id": list(range(len(caps))), "text": caps},
                          "long": f"a long description of image {i}."}

    TinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "tiny_captions"


def test_tfds_caption_pairs(tmp_path):
    from vlm_jax.data.tfds_source import tfds_caption_pairs
    name = _tiny_caption_tfds(tmp_path)
    pairs = tfds_caption_pairs(name, tmp_path)
    assert len(pairs) == 2  # the caption-less image is skipped
    by_short = {p.short_caption: p for p in pairs}
    assert set(by_short) == {"a red square.", "a blue square."}
    red = by_short["a red square."]
    assert red.long_caption is None and red.image.path is None
    assert red.image.array.shape == (6, 7, 3) and red.image.array.dtype == np.uint8
    assert red.image.array[0, 0].tolist() == [100, 0, 0]
    assert by_short["a blue square."].image.array[0, 0].tolist() == [0, 0, 102]
    with_long = tfds_caption_pairs(name, tmp_path, long_caption_key="long")
    assert len(with_long) == 3  # the long caption alone keeps the third image
    assert {p.short_caption for p in with_long} == {"a red square.", "a blue square.", None}
    assert all(p.long_caption.startswith("a long description") for p in with_long)
    assert len(tfds_caption_pairs(name, tmp_path, long_caption_key="long", max_examples=1)) == 1


def test_tfds_retrieval_set(tmp_path):
    from vlm_jax.data.tfds_source import tfds_retrieval_set
    name = _tiny_caption_tfds(tmp_path)
    images, captions, c2i = tfds_retrieval_set(name, tmp_path)
    assert len(images) == 2 and len(captions) == 5 and c2i.dtype == np.int32
    for text, idx in zip(captions, c2i):
        colour = next(j for j, caps in enumerate(CAPTIONS) if text in caps)
        assert images[idx].array[0, 0, colour] == 100 + colour
    assert sorted(np.bincount(c2i).tolist()) == [2, 3]


def test_tfds_caption_errors(tmp_path):
    from vlm_jax.data.tfds_source import tfds_caption_pairs, tfds_retrieval_set
    name = _tiny_caption_tfds(tmp_path)
    with pytest.raises(DatasetError, match=r"no feature 'captions/caption'.*'captions/text'") as err:
        tfds_caption_pairs(name, tmp_path, caption_key="captions/caption")
    assert "\n" not in str(err.value) and "'image'" in str(err.value)
    with pytest.raises(DatasetError, match="no feature 'img'"):
        tfds_retrieval_set(name, tmp_path, image_key="img")
    with pytest.raises(DatasetError, match="no split 'validation'"):
        tfds_retrieval_set(name, tmp_path, split="validation")
    with pytest.raises(DatasetError, match="not found.*file_format=array_record"):
        tfds_caption_pairs("no_such_captions_xyz", tmp_path)


def test_vladva_reads_tfds(tmp_path):
    from configs import vladva
    from vlm_jax.programs import vladva as vladva_program
    name = _tiny_caption_tfds(tmp_path)
    dc = vladva.get_config().data
    dc.name, dc.retrieval_json, dc.tfds_data_dir = f"tfds:{name}", f"tfds:{name}", str(tmp_path)
    train, extra = vladva_program.load_pairs(dc)
    assert extra == [] and sorted(s for _, s, _ in train) == ["a blue square.", "a red square."]
    settings = {"resize": {"shortest_edge": 4}, "crop": [4, 4], "rescale": 1 / 255, "mean": [0.5] * 3,
                "std": [0.5] * 3, "resample": 3, "convert_rgb": True}  # `preprocess.image_settings` form
    assert vladva_program._load(train[0][0], settings).shape == (4, 4, 3)
    images, captions, c2i = vladva_program.build_suite(dc).retrieval
    assert len(images) == 2 and len(captions) == 5 and c2i.tolist() == sorted(c2i.tolist())
