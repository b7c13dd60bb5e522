"""Caption readers on tiny files: manifest, Karpathy splits, SugarCrepe, Winoground, and their errors."""

import json
import os

import numpy as np
import pytest

from vlm_jax.data import captions as cap
from vlm_jax.data.fewshot import DatasetError
from vlm_jax.errors import UserError


def _touch(*paths):
    for p in paths:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").close()  # readers never decode images: empty files are enough


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_manifest(tmp_path):
    _touch(str(tmp_path / "img" / "a.jpg"))
    lines = [{"image": "img/a.jpg", "short_caption": " a dog. ", "long_caption": "A brown dog runs."},
             {"image": "img/b.jpg", "long_caption": "Only long."},
             {"image": "/abs/c.jpg", "short_caption": "only short", "long_caption": ""}]
    path = _write(tmp_path / "m.jsonl", "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]))
    pairs = cap.read_manifest(path)  # relative to the manifest's folder by default
    assert pairs == [cap.CaptionPair(str(tmp_path / "img/a.jpg"), "a dog.", "A brown dog runs."),
                     cap.CaptionPair(str(tmp_path / "img/b.jpg"), None, "Only long."),
                     cap.CaptionPair("/abs/c.jpg", "only short", None)]
    assert cap.read_manifest(path, image_root=tmp_path)[1].image == str(tmp_path / "img/b.jpg")


@pytest.mark.parametrize("bad_line, message", [
    ('{"image": "a.jpg", "short_caption": "x"', r"m\.jsonl:3: bad JSON"),
    ('["a.jpg", "x"]', r"m\.jsonl:3: .*JSON object"),
    ('{"short_caption": "x"}', r"m\.jsonl:3: missing or empty 'image'"),
    ('{"image": "a.jpg", "short_caption": " ", "long_caption": null}', r"m\.jsonl:3: no caption"),
    ('{"image": "a.jpg", "short_caption": 3}', r"m\.jsonl:3: 'short_caption' must be a string"),
])
def test_manifest_bad_line_names_it(tmp_path, bad_line, message):
    _touch(str(tmp_path / "a.jpg"))
    path = _write(tmp_path / "m.jsonl", '{"image": "a.jpg", "short_caption": "ok"}\n\n' + bad_line + "\n")
    with pytest.raises(DatasetError, match=message):
        cap.read_manifest(path)


def test_manifest_missing_things(tmp_path):
    with pytest.raises(DatasetError, match="caption manifest not found: .*nope.jsonl"):
        cap.read_manifest(tmp_path / "nope.jsonl")
    empty = _write(tmp_path / "e.jsonl", "\n")
    with pytest.raises(DatasetError, match="no entries"):
        cap.read_manifest(empty)
    path = _write(tmp_path / "m.jsonl", '\n{"image": "gone.jpg", "short_caption": "x"}\n')
    with pytest.raises(DatasetError, match=r"m\.jsonl:2 refers to a missing image: .*gone\.jpg") as e:
        cap.read_manifest(path)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="image folder not found"):
        cap.read_manifest(path, image_root=tmp_path / "no_such_dir")


def _karpathy(images):
    return {"images": images, "dataset": "x"}


def _entry(name, split, sentences, filepath=None):
    e = {"filename": name, "split": split, "sentences": [{"raw": s, "tokens": s.split()} for s in sentences]}
    if filepath:
        e["filepath"] = filepath
    return e


def test_karpathy_flickr_and_coco(tmp_path):
    root = tmp_path / "flickr"
    _touch(str(root / "2.jpg"))
    path = _write(tmp_path / "dataset_flickr30k.json", json.dumps(_karpathy([
        _entry("1.jpg", "train", ["t"]),
        _entry("2.jpg", "test", ["a ", "b", "c"]),
        _entry("3.jpg", "val", ["v"]),
        _entry("4.jpg", "test", ["d", "e"]),
    ])))
    rs = cap.read_karpathy(path, root)
    assert rs.image_paths == [str(root / "2.jpg"), str(root / "4.jpg")]
    assert rs.captions == ["a", "b", "c", "d", "e"]
    assert rs.caption_to_image.dtype == np.int32
    np.testing.assert_array_equal(rs.caption_to_image, [0, 0, 0, 1, 1])
    assert rs.image_to_captions == [[0, 1, 2], [3, 4]]
    trimmed = cap.read_karpathy(path, root, captions_per_image=2)
    assert trimmed.captions == ["a", "b", "d", "e"] and trimmed.image_to_captions == [[0, 1], [2, 3]]

    coco = tmp_path / "coco"
    _touch(str(coco / "train2014" / "t.jpg"))
    path = _write(tmp_path / "dataset_coco.json", json.dumps(_karpathy([
        _entry("t.jpg", "train", ["x"], "train2014"), _entry("r.jpg", "restval", ["y"], "val2014"),
        _entry("s.jpg", "test", ["z"], "val2014")])))
    rs = cap.read_karpathy(path, coco, split=("train", "restval"))
    assert rs.image_paths == [str(coco / "train2014/t.jpg"), str(coco / "val2014/r.jpg")]
    assert rs.captions == ["x", "y"]


def test_karpathy_errors(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    path = _write(tmp_path / "k.json", json.dumps(_karpathy([_entry("1.jpg", "train", ["t"])])))
    with pytest.raises(DatasetError, match=r"no images in split \['test'\]; splits present: \['train'\]"):
        cap.read_karpathy(path, root)
    with pytest.raises(DatasetError, match=r"missing image: .*img/1\.jpg"):
        cap.read_karpathy(path, root, split="train")
    bad = _write(tmp_path / "b.json", json.dumps({"annotations": []}))
    with pytest.raises(DatasetError, match="no 'images' list"):
        cap.read_karpathy(bad, root)
    no_raw = _write(tmp_path / "r.json", json.dumps(_karpathy([{"filename": "1.jpg", "split": "test",
                                                                 "sentences": [{"tokens": []}]}])))
    with pytest.raises(DatasetError, match=r"images\[0\] \(1\.jpg\) sentence 0: missing or empty 'raw'"):
        cap.read_karpathy(no_raw, root)
    with pytest.raises(DatasetError, match="not valid JSON"):
        cap.read_karpathy(_write(tmp_path / "x.json", "{"), root)


def test_sugarcrepe(tmp_path):
    coco = tmp_path / "val2017"
    _touch(str(coco / "000000000139.jpg"), str(coco / "000000000285.jpg"))
    sc = tmp_path / "sugar_crepe"
    sc.mkdir()
    _write(sc / "replace_obj.json", json.dumps({
        "0": {"filename": "000000000139.jpg", "caption": "A cat.", "negative_caption": "A dog."},
        "1": {"filename": "000000000285.jpg", "caption": "A bear.", "negative_caption": "A cow."}}))
    _write(sc / "add_att.json", json.dumps({
        "7": {"filename": "000000000285.jpg", "caption": "A bear.", "negative_caption": "A red bear."}}))
    _write(sc / "notes.txt", "ignored")
    out = cap.read_sugarcrepe(sc, coco)
    assert list(out) == ["add_att", "replace_obj"]
    assert out["replace_obj"][1] == (str(coco / "000000000285.jpg"), "A bear.", "A cow.")
    image, pos, neg = out["add_att"][0]
    assert (pos, neg) == ("A bear.", "A red bear.") and out["add_att"][0].negative_caption == neg
    assert list(cap.read_sugarcrepe(sc / "add_att.json", coco)) == ["add_att"]
    assert list(cap.read_sugarcrepe([sc / "replace_obj.json"], coco)) == ["replace_obj"]

    _write(sc / "swap_att.json", json.dumps({"5": {"filename": "000000000139.jpg", "caption": "x"}}))
    with pytest.raises(DatasetError, match=r"swap_att\.json: id 5: missing or empty 'negative_caption'"):
        cap.read_sugarcrepe(sc, coco)
    _write(sc / "swap_att.json", json.dumps({"5": {"filename": "missing.jpg", "caption": "x",
                                                   "negative_caption": "y"}}))
    with pytest.raises(DatasetError, match=r"SugarCrepe swap_att refers to a missing image: .*missing\.jpg"):
        cap.read_sugarcrepe(sc, coco)
    with pytest.raises(DatasetError, match="SugarCrepe file not found"):
        cap.read_sugarcrepe(tmp_path / "none.json", coco)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DatasetError, match="no .json files"):
        cap.read_sugarcrepe(empty_dir, coco)


def test_winoground(tmp_path):
    images = tmp_path / "images"
    _touch(str(images / "ex_0_img_0.png"), str(images / "ex_0_img_1.png"))
    rows = [{"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1",
             "caption_0": "an old person kisses a young person", "caption_1": "a young person kisses an old person",
             "tag": "Noun", "num_main_preds": 1},
            {"id": 1, "image_0": "ex_1_img_0", "image_1": "ex_1_img_1", "caption_0": "a", "caption_1": "b"}]
    path = _write(tmp_path / "examples.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    items = cap.read_winoground(path, images)
    assert items[0] == cap.WinogroundItem(0, str(images / "ex_0_img_0.png"), str(images / "ex_0_img_1.png"),
                                          rows[0]["caption_0"], rows[0]["caption_1"], "Noun")
    assert items[1].tag is None and items[1].image_1 == str(images / "ex_1_img_1.png")

    bad = _write(tmp_path / "bad.jsonl", json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "caption_1": None}))
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: missing or empty 'caption_1'"):
        cap.read_winoground(bad, images)
    bad = _write(tmp_path / "bad.jsonl", json.dumps(rows[0]) + "\nnot json\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: bad JSON"):
        cap.read_winoground(bad, images)
    swapped = _write(tmp_path / "s.jsonl", json.dumps(rows[1]) + "\n")
    with pytest.raises(DatasetError, match=r"missing image: .*ex_1_img_0\.png"):
        cap.read_winoground(swapped, images)
    with pytest.raises(DatasetError, match="Winoground: image folder not found"):
        cap.read_winoground(path, tmp_path / "nope")
