"""Results a person can read: a mean +- std table per method and shot count, and the accuracy-vs-shots plot.

The writers here (`write_atomic`, `write_json`, `plot`) write on process 0 only: a multi-host run, where every
process computes the same results, leaves one copy of each file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def _is_primary() -> bool:
    # Without jax.distributed this is the only process: asking JAX would start its backend (on a GPU, grabbing
    # its memory) just to write a file.
    return not jax.distributed.is_initialized() or jax.process_index() == 0


# Column labels of the two hyperparameter protocols (`configs/dualadapter.py`), keyed by their entry in a run.
PROTOCOL_NAMES = {"methods": "paper", "realistic": "realistic"}


def summarize(runs: Sequence[Mapping[str, Any]], metric: str = "test_accuracy",
              protocol: str = "methods") -> dict[str, dict[int, dict[str, float]]]:
    """runs: [{'shots', 'seed', protocol: {name: {metric: ...}}}] -> {method: {shots: {mean, std, n}}}.

    `protocol` is the entry of each run to read: 'methods' (the papers' protocol) or 'realistic'; runs without
    it are skipped. std is the population standard deviation over seeds (numpy's default), as CoOp-style tables
    report it.
    """
    acc: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for name, res in run.get(protocol, {}).items():
            acc.setdefault(name, {}).setdefault(int(run["shots"]), []).append(float(res[metric]))
    return {name: {s: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for s, v in sorted(by.items())}
            for name, by in acc.items()}


def table(summary: Mapping[str, Mapping[int, Mapping[str, float]]], title: str = "", *,
          marks: Mapping[str, str] | None = None, notes: Sequence[str] = (),
          display: Mapping[str, str] | None = None) -> str:
    """A markdown table: one row per method, one column per shot count, cells 'mean +- std' (or 'mean' if n=1).

    Args:
      summary: from `summarize`.
      title: a '### title' line above the table.
      marks: method -> suffix of its row name (e.g. ' †' for a row obtained under another protocol).
      notes: lines under the table, one bullet each (what the marks mean, settings that depart from the paper).
      display: method -> row name, in row order (the few-shot registry's `display_names()`); methods it does not
        list come last under their own names.
    """
    return protocols_table({"": summary}, title, marks=marks, notes=notes, display=display)


def protocols_table(summaries: Mapping[str, Mapping[str, Mapping[int, Mapping[str, float]]]], title: str = "", *,
                    marks: Mapping[str, str] | None = None, notes: Sequence[str] = (),
                    display: Mapping[str, str] | None = None) -> str:
    """`table` with the protocols side by side: for each shot count one column per protocol.

    Args:
      summaries: column label (e.g. 'paper', 'realistic'; '' for none) -> summary from `summarize`.
      title, marks, notes, display: as in `table`.
    """
    marks, display = marks or {}, display or {}
    shots = sorted({s for summary in summaries.values() for by in summary.values() for s in by})
    cols = [(s, label) for s in shots for label in summaries]
    head = "| method | " + " | ".join(f"{s}-shot {label}".rstrip() for s, label in cols) + " |"
    lines = ([f"### {title}", ""] if title else []) + [head, "|" + "---|" * (len(cols) + 1)]
    names = {n for summary in summaries.values() for n in summary}
    order = {n: i for i, n in enumerate(display)}
    for name in sorted(names, key=lambda n: (order.get(n, len(order)), n)):
        cells = []
        for s, label in cols:
            c = summaries[label].get(name, {}).get(s)
            cells.append("" if c is None else f"{c['mean']:.2f}" + (f" ± {c['std']:.2f}" if c["n"] > 1 else ""))
        lines.append(f"| {display.get(name, name)}{marks.get(name, '')} | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def require_plotting():
    """matplotlib, or a one-line error naming the [viz] extra (call it before a sweep, not after)."""
    from vlm_jax.errors import import_extra

    return import_extra("matplotlib", "viz", "the sweep's accuracy-vs-shots plot")


def plot(summary: Mapping[str, Mapping[int, Mapping[str, float]]], path: str, title: str = "",
         realistic: Mapping[str, Mapping[int, Mapping[str, float]]] | None = None,
         display: Mapping[str, str] | None = None) -> None:
    """Accuracy vs shots (log2 x axis), one line per method with a +-std band, saved as PNG (process 0 only).

    `realistic`, if given, adds each method's realistic-protocol curve, dashed in the same colour; `display`: method
    -> legend name.
    """
    display = display or {}
    if not _is_primary():
        return
    matplotlib = require_plotting()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    colours = {}
    for dashed, curves in ((False, summary), (True, realistic or {})):
        for name, by in curves.items():
            shots = sorted(by)
            mean = np.array([by[s]["mean"] for s in shots])
            std = np.array([by[s]["std"] for s in shots])
            label = display.get(name, name) + (" (realistic)" if dashed else "")
            line, = ax.plot(shots, mean, marker="o", linestyle="--" if dashed else "-", label=label,
                            color=colours.get(name))
            colours.setdefault(name, line.get_color())
            ax.fill_between(shots, mean - std, mean + std, alpha=0.15, color=colours[name])
    ax.set_xscale("log", base=2)
    all_shots = sorted({s for c in (summary, realistic or {}) for by in c.values() for s in by})
    ax.set_xticks(all_shots, [str(s) for s in all_shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"), binary=True)
    plt.close(fig)


def write_atomic(path: str, write, binary: bool = False) -> None:
    """Writes via a temporary file in the same directory and renames: a reader never sees half a file.

    Process 0 only; on the other processes of a multi-host run this does nothing.
    """
    if not _is_primary():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, lambda f: json.dump(obj, f, indent=1, sort_keys=False, default=float))
