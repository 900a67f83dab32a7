"""The main job: every method against scratch on the embedded digits, over several seeds.

``python -m fastkd.train --demo`` trains (or loads the cached) teacher(s), then trains the built-in
student with each of ``--demo-methods`` for each of ``--demo-seeds``, in this process, one run
after the other, and reports per method: validation top-1 (mean +- sample std over the seeds), the
difference to scratch and whether it exceeds the seeds' spread, the wall time of one run and the
training throughput. Every run keeps its own output directory (checkpoint, metrics, plot); the
summary goes to ``demo.csv``, ``demo.json`` and ``demo.png`` under ``--output``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

from ..data import IMAGE_SHAPE, NUM_CLASSES
from . import distributed
from .config import Config, ConfigError, resolve
from .engine import RunResult, provide_teacher_weights, train
from .loaders import load_data
from .metrics import table
from .models import build_model
from .runtime import resolve_device


def _params(name: str) -> int:
    return sum(p.numel() for p in build_model(
        name, NUM_CLASSES, with_features=False, input_shape=IMAGE_SHAPE).parameters())


def run_demo(cfg: Config) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    if distributed.env_world_size() > 1:
        raise ConfigError("--demo runs its jobs one after the other in one process; run it "
                          "without torchrun")
    base = resolve(cfg)
    resolve_device(base)
    out = Path(base.output)

    def say(line: str) -> None:
        print(line, flush=True)

    data = load_data(base)
    say(
        f"fastkd demo: {base.student} ({_params(base.student):,} parameters) trained on "
        f"{len(data.train)} digits ({base.train_fraction:.0%} of the training split), scored on "
        f"{len(data.val)}; teacher {base.teacher} ({_params(base.teacher):,} parameters) trained "
        f"on the whole split. {base.epochs} epochs, batch {base.batch_size}, lr {base.lr}, seeds "
        f"{', '.join(map(str, base.demo_seeds))}."
    )
    # The teachers first, so that their one-off training is not charged to the first method.
    t_teacher = time.perf_counter()
    if any(m != "scratch" for m in base.demo_methods):
        count = base.feed_teachers if "feed" in base.demo_methods else 1
        provide_teacher_weights(base, count, say, distributed.Dist())
    teacher_s = time.perf_counter() - t_teacher

    results: dict[str, list[RunResult]] = {}
    for method in base.demo_methods:
        for seed in base.demo_seeds:
            run = dataclasses.replace(
                cfg, method=method, seed=seed, demo=False, output=str(out / method / f"seed{seed}"),
                overwrite=True, resume=None, progress=False, plot=False,
            )
            result = train(run, quiet=True)
            results.setdefault(method, []).append(result)
            say(f"  {method:<8} seed {seed}: val top1 {result.val_top1:6.2f}%  "
                f"{result.time_s:5.1f}s  {result.images_per_s:6.0f} images/s")

    store_s = None
    if base.demo_store and any(m in base.demo_methods for m in ("kd", "topk")):
        store_s = _store_rows(cfg, base, out, results, say)

    summary = _summarise(results)
    rows = []
    for s in summary:
        rows.append([
            s["method"], f"{s['top1_mean']:.2f} +- {s['top1_std']:.2f}", s["vs_scratch"],
            f"{s['time_s']:.1f}", f"{s['images_per_s']:.0f}",
        ])
    say("")
    say(table(["method", "val top1 % (mean +- std)", "vs scratch", "time/run s", "images/s"],
              rows))
    total = time.perf_counter() - t0
    if store_s is not None:
        say(f"\nteacher store ({STORE_CROPS} crops x {len(data.train)} images, top "
            f"{STORE_TOPK}) built in {store_s:.1f}s; +aug: the live teacher on crop + flip "
            "augmented images; @store: the same augmentation replayed from the store, no "
            "teacher in the loop.")
    say(f"\nteacher(s) ready in {teacher_s:.1f}s; demo total {total:.1f}s. "
        f"Runs, metrics and plots under {out}/; summary in demo.csv, demo.json, demo.png.")
    out.mkdir(parents=True, exist_ok=True)
    _write(out, summary, results, base, total, teacher_s)
    return summary


# The demo's teacher store: 16 crops per image (about half the 30 epochs' fresh draws) and the
# teacher's 5 most likely of the 10 classes.
STORE_CROPS = 16
STORE_TOPK = 5
STORE_METHODS = ("scratch", "kd", "topk")


def _store_rows(cfg: Config, base: Config, out: Path, results: dict[str, list[RunResult]],
                say) -> float:
    """Rows '<method>+aug' (live teacher, --augment) and '<method>@store' (from a store built
    here); returns the store's build time."""
    from .store_build import build

    methods = [m for m in STORE_METHODS if m in base.demo_methods]
    t0 = time.perf_counter()
    store_dir = out / "store"
    build(dataclasses.replace(cfg, method="kd", demo=False, output=str(store_dir),
                              crops=STORE_CROPS, topk=STORE_TOPK, overwrite=True, progress=False),
          log=lambda line: None)
    store_s = time.perf_counter() - t0
    runs = [(f"{m}+aug", {"method": m, "augment": True}) for m in methods]
    runs += [(f"{m}@store", {"method": m, "teacher_store": str(store_dir)})
             for m in methods if m != "scratch"]
    for name, kw in runs:
        for seed in base.demo_seeds:
            run = dataclasses.replace(
                cfg, **kw, seed=seed, demo=False, output=str(out / name / f"seed{seed}"),
                overwrite=True, resume=None, progress=False, plot=False,
            )
            result = train(run, quiet=True)
            results.setdefault(name, []).append(result)
            say(f"  {name:<10} seed {seed}: val top1 {result.val_top1:6.2f}%  "
                f"{result.time_s:5.1f}s  {result.images_per_s:6.0f} images/s")
    return store_s


def _summarise(results: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    stats = {}
    for method, runs in results.items():
        accs = [r.val_top1 for r in runs]
        stats[method] = {
            "method": method,
            "seeds": len(runs),
            "top1": accs,
            "top1_mean": statistics.fmean(accs),
            "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "time_s": statistics.fmean(r.time_s for r in runs),
            "images_per_s": statistics.fmean(r.images_per_s for r in runs),
        }
    ref = stats.get("scratch")
    for method, s in stats.items():
        if ref is None:
            s["vs_scratch"] = "-"
        elif method == "scratch":
            s["vs_scratch"] = "(baseline)"
        else:
            delta = s["top1_mean"] - ref["top1_mean"]
            noise = max(s["top1_std"], ref["top1_std"])
            if delta > noise:
                verdict = "better"
            elif delta > 0:
                verdict = "better, within noise"
            elif delta > -noise:
                verdict = "not better, within noise"
            else:
                verdict = "worse"
            s["delta"] = delta
            s["vs_scratch"] = f"{delta:+.2f} {verdict}"
    return list(stats.values())


def _write(out: Path, summary: list[dict[str, Any]], results: dict[str, list[RunResult]],
           cfg: Config, total: float, teacher_s: float) -> None:
    import csv

    with open(out / "demo.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "top1_mean", "top1_std", "vs_scratch", "time_s", "images_per_s",
                    "top1_per_seed"])
        for s in summary:
            w.writerow([s["method"], f"{s['top1_mean']:.4f}", f"{s['top1_std']:.4f}",
                        s["vs_scratch"], f"{s['time_s']:.2f}", f"{s['images_per_s']:.1f}",
                        " ".join(f"{a:.2f}" for a in s["top1"])])
    (out / "demo.json").write_text(json.dumps({
        "summary": summary, "total_s": total, "teacher_s": teacher_s,
        "config": cfg.to_dict(),
    }, indent=1))
    _plot(out / "demo.png", summary, results)


def _plot(path: Path, summary: list[dict[str, Any]], results: dict[str, list[RunResult]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [s["method"] for s in summary]
    means = [s["top1_mean"] for s in summary]
    stds = [s["top1_std"] for s in summary]
    colors = ["grey" if n == "scratch" else "tab:blue" for n in names]
    ax_bar.bar(names, means, yerr=stds, capsize=4, color=colors)
    if "scratch" in names:
        ax_bar.axhline(means[names.index("scratch")], color="grey", linestyle="--", linewidth=1)
    low = min(m - s for m, s in zip(means, stds, strict=True))
    ax_bar.set(ylim=(max(0.0, low - 3), 100), ylabel="val top-1 % (mean +- std over seeds)",
               title="final accuracy")
    for method, runs in results.items():
        # x: epochs that trained the student (nd's block-wise phase counts, dih's head training
        # on the teacher does not).
        curves = []
        for run in runs:
            heads = sum(1 for r in run.history if r["phase"] == "heads")
            curves.append([(r["epoch"] - heads, r["val_top1"]) for r in run.history
                           if r["phase"] != "heads" and r.get("val_top1") is not None])
        n = min(len(c) for c in curves)
        epochs = [e for e, _ in curves[0][:n]]
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        ax_curve.plot(epochs, mean, marker=".", label=method,
                      linestyle="--" if method == "scratch" else "-")
    ax_curve.set(xlabel="epoch of the student's training", ylabel="val top-1 % (mean over seeds)",
                 title="validation accuracy", ylim=(max(0.0, low - 15), 100))
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
