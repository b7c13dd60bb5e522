"""The metric writer: metrics.jsonl keeps the names as given; TensorBoard gets tags it accepts without
renaming (and without logging a line per scalar)."""

import json
import struct

import pytest

from vlm_jax.runtime import metrics


@pytest.mark.parametrize("name", ["test/VITask w/ EP [generated]/builtin_a/accuracy", "vanilla (L_van)/mean",
                                  "train/loss", "a.b-c/d_e", "ünï code"])
def test_tensorboard_tags_are_what_tensorboardx_would_make_them(name):
    from tensorboardX.summary import _clean_tag   # the rule tensorboardX applies (and logs) itself

    assert metrics.tensorboard_tag(name) == _clean_tag(name)


def test_writer_keeps_names_in_jsonl_and_writes_clean_tags(tmp_path, caplog):
    w = metrics.MetricWriter(str(tmp_path))
    with caplog.at_level("INFO"):
        w.write(3, {"VITask w/ EP/acc": 0.5}, prefix="test/")
    w.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "test/VITask w/ EP/acc": 0.5}
    assert not [r for r in caplog.records if "illegal" in r.getMessage()]
    assert _scalar_tags(tmp_path / "tensorboard") == ["test/VITask_w/_EP/acc"]


def _scalar_tags(logdir):
    """The scalar tags in a TensorBoard event file (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    (path,) = logdir.iterdir()
    data, tags, i = path.read_bytes(), [], 0
    while i < len(data):
        n = struct.unpack("<Q", data[i:i + 8])[0]
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        tags += [v.tag for v in event.summary.value]
        i += 12 + n + 4
    return tags
