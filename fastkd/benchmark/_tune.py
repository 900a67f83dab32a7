"""``python -m fastkd tune``: turns GPU benchmark results into the tables ``backend="auto"`` reads.

For each loss, GPU, dtype and problem size measured, the fastkd backend with the lowest
forward+backward time (summed over the row counts measured at that size) wins. Consecutive sizes
with the same winner merge into one rule, ``max_size`` being the largest size it was measured at
(the last rule of a dtype is unbounded). The table is written to ``fastkd/tuning/<key>.json``, where
an existing entry for the same GPU is replaced; see ``fastkd.backends.measured_order``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

# Per benchmark loss: the key the functional API passes to backends.choose, and the problem size
# it passes (from the benchmark case's shape).
SIZE_MEASURES: dict[str, tuple[str, str, Callable[[list[int]], int]]] = {
    "kd_loss": ("kd_loss", "classes", lambda shape: int(shape[-1])),
    # Elements per sample of the longest map (the first one of the stage variants).
    "feature_regression": (
        "feature_regression", "sample_elements", lambda shape: math.prod(shape[1:])
    ),
}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TUNING_DIR = Path(__file__).resolve().parent.parent / "tuning"


def winners(measurements: Iterable[dict], loss: str, mode: str = "fwdbwd") -> dict:
    """{dtype: [(size, [backends fastest first])]} from one GPU's measurements of `loss`."""
    _, _, size_of = SIZE_MEASURES[loss]
    totals: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for m in measurements:
        if m.get("loss") != loss or m.get("mode") != mode or m.get("derived"):
            continue
        if m.get("impl") != "fastkd" or m.get("backend") not in ("cuda", "triton"):
            continue
        key = (DTYPE_NAMES.get(m["dtype"], m["dtype"]), size_of(m["shape"]))
        totals[key][m["backend"]] += m["median_ms"]
        counts[key][m["backend"]] += 1
    out: dict[str, list[tuple[int, list[str]]]] = defaultdict(list)
    for (dtype, size), per_backend in sorted(totals.items()):
        # Compare only backends measured on the same cases.
        most = max(counts[(dtype, size)].values())
        complete = [b for b in per_backend if counts[(dtype, size)][b] == most]
        order = sorted(complete, key=lambda b: per_backend[b])
        out[dtype].append((size, order))
    return dict(out)


def rules(per_dtype: dict[str, list[tuple[int, list[str]]]]) -> list[dict]:
    out = []
    for dtype, sizes in sorted(per_dtype.items()):
        merged: list[dict] = []
        for size, order in sizes:
            if merged and merged[-1]["order"] == order:
                merged[-1]["max_size"] = size
            else:
                merged.append({"dtype": dtype, "max_size": size, "order": order})
        if merged:
            merged[-1]["max_size"] = None
        out += merged
    return out


def tune(results: dict, out_dir: Path = TUNING_DIR) -> list[Path]:
    """Writes the tables for every loss measured in `results` (a ``bench --json`` document)."""
    env = results.get("environment", {})
    gpu = env.get("gpu_name")
    if not gpu:
        raise ValueError("these results were not measured on a GPU (no gpu_name): nothing to tune")
    written = []
    for loss in sorted({m["loss"] for m in results.get("measurements", [])}):
        if loss not in SIZE_MEASURES:
            continue
        key, size_name, _ = SIZE_MEASURES[loss]
        found = rules(winners(results["measurements"], loss))
        if not found:
            continue
        path = out_dir / f"{key}.json"
        table = json.loads(path.read_text()) if path.exists() else {}
        table.update({"loss": key, "size": size_name})
        devices = [d for d in table.get("devices", []) if d.get("device") != gpu]
        devices.append(
            {
                "device": gpu,
                "source": {k: env.get(k) for k in ("git_commit", "torch", "triton")}
                | {"created": results.get("created")},
                "rules": found,
            }
        )
        table["devices"] = devices
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=2) + "\n")
        written.append(path)
    return written
