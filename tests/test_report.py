"""Results tables and the accuracy-vs-shots plot; the argument-string parser of the configs."""

import os

import numpy as np
import pytest

from vlm_jax import config_utils
from vlm_jax.eval import report
from vlm_jax.methods import fewshot_registry


def _runs():
    # Two seeds at 1 shot, one seed at 4 shots.
    return [
        {"shots": 1, "seed": 1, "methods": {"dualadapter": {"test_accuracy": 50.0}, "zeroshot": {"test_accuracy": 40.0}}},
        {"shots": 1, "seed": 2, "methods": {"dualadapter": {"test_accuracy": 60.0}, "zeroshot": {"test_accuracy": 40.0}}},
        {"shots": 4, "seed": 1, "methods": {"dualadapter": {"test_accuracy": 70.0}}},
    ]


def test_summarize_mean_std_over_seeds():
    s = report.summarize(_runs())
    assert s["dualadapter"][1] == {"mean": 55.0, "std": 5.0, "n": 2}
    assert s["dualadapter"][4] == {"mean": 70.0, "std": 0.0, "n": 1}
    assert set(s["zeroshot"]) == {1}


def test_table_rows_in_paper_order_with_blank_cells():
    md = report.table(report.summarize(_runs()), "demo", display=fewshot_registry.display_names())
    lines = md.splitlines()
    assert lines[0] == "### demo"
    assert lines[2] == "| method | 1-shot | 4-shot |"
    assert lines[4] == "| Zero-shot CLIP | 40.00 ± 0.00 |  |"
    assert lines[5] == "| DualAdapter (training-free) | 55.00 ± 5.00 | 70.00 |"


def test_protocols_side_by_side_with_marks_and_notes():
    paper = report.summarize(_runs())
    runs = [dict(r, realistic={"dualadapter": {"test_accuracy": r["methods"]["dualadapter"]["test_accuracy"] - 10}})
            for r in _runs()]
    realistic = report.summarize(runs, protocol="realistic")
    assert realistic["dualadapter"][1] == {"mean": 45.0, "std": 5.0, "n": 2}
    assert report.summarize(_runs(), protocol="realistic") == {}  # runs without the protocol are skipped
    md = report.protocols_table({"paper": paper, "realistic": realistic}, "demo",
                                marks={"dualadapter": " ‡"}, notes=["‡ a note."],
                                display=fewshot_registry.display_names())
    lines = md.splitlines()
    assert lines[2] == "| method | 1-shot paper | 1-shot realistic | 4-shot paper | 4-shot realistic |"
    assert lines[4] == "| Zero-shot CLIP | 40.00 ± 0.00 |  |  |  |"
    assert lines[5] == "| DualAdapter (training-free) ‡ | 55.00 ± 5.00 | 45.00 ± 5.00 | 70.00 | 60.00 |"
    assert lines[-2:] == ["", "- ‡ a note."]


def test_plot_writes_a_png(tmp_path):
    path = str(tmp_path / "sub" / "plot.png")
    report.plot(report.summarize(_runs()), path, "demo", realistic=report.summarize(_runs()))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "sub") == ["plot.png"]  # no temporary file left behind


def test_write_atomic_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "results.json")
    report.write_json(path, {"a": 1})

    def boom(f):
        f.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        report.write_atomic(path, boom)
    assert open(path).read().strip().startswith("{")
    assert os.listdir(tmp_path) == ["results.json"]


def test_parse_arg_types_flags_and_unknown_names():
    c = config_utils.parse_arg("dataset=dtd,shots=4,sweep", dataset="eurosat", shots=16, sweep=False, lr=0.1)
    assert (c.dataset, c.shots, c.sweep, c.lr) == ("dtd", 4, True, 0.1)
    assert isinstance(c.shots, int)
    with pytest.raises(ValueError, match="unknown config argument 'shot'.*known: dataset"):
        config_utils.parse_arg("shot=4", dataset="eurosat", shots=16, sweep=False, lr=0.1)
    with pytest.raises(ValueError, match="needs a value"):
        config_utils.parse_arg("shots", shots=16)
    np.testing.assert_equal(config_utils.parse_arg("", shots=16).shots, 16)
