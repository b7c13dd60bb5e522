"""runtime/metrics.MetricWriter's optional W&B writer (offline mode: no account, no network) and the one-line
error naming the [wandb] extra when the package is missing."""

import json
import struct
import sys
import time

import pytest

from vlm_jax.errors import MissingExtra, import_extra
from vlm_jax.runtime.metrics import MetricWriter

BLOCK, HEADER = 32768, 7  # W&B's .wandb file: a 7-byte header, then LevelDB-log records in 32 KiB blocks


def wandb_records(path):
    """The protobuf `Record`s of a .wandb file (LevelDB log format: crc32c u32, length u16, type u8, payload;
    types FULL=1, FIRST=2, MIDDLE=3, LAST=4 join a record split over blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, parts, out = open(path, "rb").read(), HEADER, b"", []
    assert data[:4] == b":W&B", data[:8]
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(pb.Record.FromString(parts))
            parts = b""
    return out


def finished_records(path, timeout_s: float = 60.0):
    """The records once the run's 'exit' record is written: wandb's service process may still be writing the
    file after `finish()` returns (seen when stdout is not a terminal)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = wandb_records(path)
        except Exception:  # noqa: BLE001 - a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_run_gets_the_scalars_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    writer = MetricWriter(str(workdir), wandb_project="vlm_jax_test", run_config={"method": {"lora_rank": 4}})
    writer.write(1, {"loss": 2.5}, prefix="train/")
    writer.write(2, {"loss": 1.5, "accuracy": 0.25}, prefix="train/")
    writer.close()
    (run_file,) = workdir.glob("wandb/offline-run-*/run-*.wandb")
    records = finished_records(run_file)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 2.5), (2, 1.5)]
    assert history[1]["train/accuracy"] == 0.25
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "vlm_jax_test" and run.display_name == "run"
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in run.config.update}
    assert config["method"] == {"lora_rank": 4}
    # metrics.jsonl stays the source of truth beside it.
    assert [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"pip install 'vlm_jax\[wandb\]'") as e:
        MetricWriter(str(tmp_path), wandb_project="p")
    assert "\n" not in str(e.value)
    for module, extra in (("tensorflow_datasets", "tfds"), ("matplotlib", "viz")):
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(MissingExtra, match=rf"vlm_jax\[{extra}\]"):
            import_extra(module, extra, "x")
