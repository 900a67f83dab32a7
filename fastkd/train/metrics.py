"""Per-epoch metrics to CSV, JSON and TensorBoard, the curves as a PNG, the log's lines and tables.

Only rank 0 writes. The CSV and JSON are rewritten whole after every epoch from the history the
checkpoint carries, so a resumed run's files are exactly an uninterrupted run's.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, output: Path, enabled: bool, history: list[dict[str, Any]]) -> None:
        self.output = output
        self.enabled = enabled
        self.history = history
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(output / "tb"), purge_step=len(history) + 1)

    def append(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        self.write_files()
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch" and math.isfinite(value):
                    self._tb.add_scalar(key, value, row["epoch"])
            self._tb.flush()

    def write_files(self) -> None:
        seen: list[str] = []
        for row in self.history:
            seen += [k for k in row if k not in seen]
        # Position, then training, then validation columns, then timings.
        def group(key: str) -> int:
            return 1 if key.startswith("train_") else 2 if key.startswith("val_") else (
                3 if key in ("epoch_time_s", "images_per_s") else 0)

        keys = sorted(seen, key=lambda k: (group(k), seen.index(k)))
        tmp = self.output / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: _fmt(row.get(k)) for k in keys})
        os.replace(tmp, self.output / "metrics.csv")
        tmp = self.output / ".metrics.json.tmp"
        tmp.write_text(json.dumps(self.history, indent=1))
        os.replace(tmp, self.output / "metrics.json")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy and loss per epoch (train and validation); phase changes as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    for key, style in (("train_top1", "--"), ("val_top1", "-")):
        pts = [(e, r[key]) for e, r in zip(epochs, history, strict=True) if r.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), style, label=key)
    for key, style in (("train_loss", "--"), ("val_loss", "-")):
        pts = [(e, r[key]) for e, r in zip(epochs, history, strict=True) if r.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), style, label=key)
    for prev, row in itertools.pairwise(history):
        if row["phase"] != prev["phase"]:
            for ax in (ax_acc, ax_loss):
                ax.axvline(prev["epoch"] + 0.5, color="grey", linestyle=":")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *map(line, cells[1:])])


def epoch_line(row: dict[str, Any], total_epochs: int) -> str:
    """One metrics row as a log line."""
    parts = [f"epoch {row['epoch']:>3}/{total_epochs} {row['phase']:<7}",
             f"loss {row['train_loss']:.4f}"]
    if row.get("train_top1") is not None:
        parts.append(f"train top1 {row['train_top1']:5.1f}%")
    if row.get("val_top1") is not None:
        parts.append(f"val top1 {row['val_top1']:5.1f}% (loss {row['val_loss']:.4f})")
    heads = [f"{k[4:-5]} {v:.1f}%" for k, v in row.items()
             if k.startswith("val_head") and k.endswith("_top1")]
    if heads:
        parts.append("val " + ", ".join(heads))
    parts.append(f"{row['epoch_time_s']:.2f}s")
    return " | ".join(parts)


def profile_table(report: dict[str, Any], sections: tuple[str, ...]) -> str:
    rows = [[k, f"{report['ms_per_step'][k]:.2f}", f"{100 * report['share'][k]:.1f}"]
            for k in sections]
    return (f"profile of {report['steps']} steps ({report['images_per_s']:.0f} images/s "
            "with synchronisation):\n" + table(["section", "ms/step", "%"], rows))


def summary_table(method: str, final: float | None, best: float | None, epochs: int,
                  time_s: float, images_per_s: float) -> str:
    """The table a run ends with."""
    rows = [[method, _pct(final), _pct(best), epochs, f"{time_s:.1f}", f"{images_per_s:.0f}"]]
    return table(["method", "val top1 %", "best %", "epochs", "time s", "images/s"], rows)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
