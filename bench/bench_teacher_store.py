"""Step time of distillation from a teacher store against the live teacher and plain training.

On ``--data synthetic`` ImageNet-shaped images (1000 classes) it builds a teacher store for a
ResNet-34 teacher (its size and build throughput are reported), then times three trainer set-ups
of a ResNet-18 student, step by step and interleaved (one step of each in turn, so a drift of the
machine's speed touches all three alike):

* (a) ``scratch``: the student alone;
* (b) ``kd`` with the live teacher (a ResNet-34 forward per step);
* (c) ``kd`` from the store (the stored crop replayed, the teacher's top-k read from disk).

Each step is the trainer's own: the loader's next batch (``data``), then ``engine.train_step``
with its profiler sections. Reported: the median of every section over the timed steps, and
images/s from the median step (data included). Writes ``store_bench.json``, ``store_bench.csv``
and ``README.md`` (the table and the machine) under ``--out``.

    python bench/bench_teacher_store.py --out bench/results/cpu-2026-12-03-store
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Setup:
    """One trainer set-up, stepped by hand: the run, its state, its loader iterator."""

    SECTIONS = ("data", "teacher_forward", "student_forward", "distillation_loss",
                "backward_step")

    def __init__(self, name: str, cfg) -> None:
        from fastkd.train import distributed, engine
        from fastkd.train.checkpoint import TrainState
        from fastkd.train.config import resolve
        from fastkd.train.runtime import Profiler, resolve_device

        self.name = name
        self.cfg = resolve(cfg)
        self.device = resolve_device(self.cfg)
        self.run = engine.setup(self.cfg, distributed.Dist(), self.device, lambda s: None, True,
                                time.perf_counter())
        # A profiler that never stops: every step's sections are read from its running totals.
        self.run.profiler = Profiler(10**9, self.device)
        self.state = TrainState(self.run.plan.modules, self.run.student)
        self.module, self.teacher_fn = engine.start_phase(self.run, self.state, 0, None)
        self.phase = self.run.plan.phases[0]
        self.epoch = -1
        self.batches = iter(())
        self.samples: list[dict[str, float]] = []

    def _next(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            loaders = self.run.loaders
            loaders.sampler.set_position(self.epoch, 0)
            if self.run.data.augmented:
                self.run.data.train.set_epoch(self.epoch)
            self.batches = iter(loaders.train)
            return next(self.batches)

    def step(self, record: bool) -> None:
        from fastkd.train import engine
        from fastkd.train.runtime import to_device

        run = self.run
        before = dict(run.profiler.totals)
        t0 = time.perf_counter()
        x, y, *stored = self._next()
        x = to_device(x, run.device, run.channels_last)
        y = y.to(run.device)
        data = time.perf_counter() - t0
        run.profiler.start()
        engine.train_step(run, self.state, self.phase, self.module, self.teacher_fn, x, y, 0,
                          stored or None)
        run.profiler.step_done(x.shape[0])
        if record:
            sample = {k: run.profiler.totals[k] - before[k] for k in self.SECTIONS[1:]}
            sample["data"] = data
            sample["step"] = sum(sample.values())
            self.samples.append(sample)

    def summary(self, batch: int) -> dict[str, float]:
        med = {k: statistics.median(s[k] for s in self.samples) for k in (*self.SECTIONS,
                                                                           "step")}
        return {"setup": self.name, "steps": len(self.samples),
                "images_per_s": batch / med["step"],
                **{f"{k}_ms": 1e3 * v for k, v in med.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/cpu-store")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="synthetic training images")
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each set-up")
    p.add_argument("--steps", type=int, default=15, help="timed steps of each set-up")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--amp", default="off")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    from fastkd.train import Config
    from fastkd.train import store as st
    from fastkd.train.store_build import build

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_dir = out / "store"
    common = dict(data="synthetic", synthetic_images=args.images, synthetic_classes=1000,
                  image_size=args.image_size, batch_size=args.batch_size, teacher="resnet34",
                  student="resnet18", workers=0, amp=args.amp, channels_last=args.channels_last,
                  device=args.device, threads=args.threads, progress=False, plot=False)
    load_before = os.getloadavg()
    # The store build: the teacher once over every image's crops.
    t0 = time.perf_counter()
    built = build(Config(method="kd", output=str(store_dir), crops=args.crops,
                            topk=args.topk, overwrite=True, **common), log=print)
    build_s = time.perf_counter() - t0
    size = sum((store_dir / f"{f}.npy").stat().st_size for f in st.FILES)
    build_info = {
        "images": args.images, "crops": args.crops, "k": args.topk, "classes": 1000,
        "bytes_data_files": size, "bytes_formula": st.store_bytes(args.images, args.crops, 1,
                                                                  args.topk, 1000),
        "build_s_total": build_s, "build_s_loop": built.seconds,
        "crops_per_s": built.images_per_s,
        "teacher_crops_per_s": built.meta["build"]["teacher_crops_per_s"],
        "imagenet_bytes_M8_k10": st.store_bytes(1_281_167, 8, 1, 10, 1000),
    }
    print(json.dumps(build_info, indent=1))

    setups = [
        Setup("(a) scratch", Config(method="scratch", output=str(out / "run-a"), overwrite=True,
                                    **common)),
        Setup("(b) kd, live teacher", Config(method="kd", output=str(out / "run-b"),
                                             overwrite=True, **common)),
        Setup("(c) kd from the store", Config(method="kd", teacher_store=str(store_dir),
                                              output=str(out / "run-c"), overwrite=True,
                                              **common)),
    ]
    for i in range(args.warmup + args.steps):
        for s in setups:
            s.step(record=i >= args.warmup)
        print(f"round {i + 1}/{args.warmup + args.steps}: "
              + ", ".join(f"{s.name} {1e3 * s.samples[-1]['step']:.0f} ms" if s.samples else
                          s.name for s in setups), flush=True)
    rows = [s.summary(args.batch_size) for s in setups]
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_scratch"] = r["images_per_s"] / base
    machine = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(), "device": str(setups[0].device),
        # Other processes on the machine: the 1-minute load average before and after.
        "load_average_1min": [load_before[0], os.getloadavg()[0]],
    }
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "store_bench.json").write_text(json.dumps(
        {"machine": machine, "settings": settings, "build": build_info, "steps": rows,
         "samples": {s.name: s.samples for s in setups}}, indent=1))
    with open(out / "store_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| set-up | images/s | vs scratch | step ms | data | teacher | student fwd | loss | "
        "backward + step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['images_per_s']:.1f} | {r['vs_scratch']:.2f}x | "
            f"{r['step_ms']:.0f} | {r['data_ms']:.1f} | {r['teacher_forward_ms']:.1f} | "
            f"{r['student_forward_ms']:.0f} | {r['distillation_loss_ms']:.1f} | "
            f"{r['backward_step_ms']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (out / "README.md").write_text(
        "# Teacher store: step time (synthetic ImageNet-shaped data)\n\n"
        f"`python bench/bench_teacher_store.py --out {args.out}` "
        f"({' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in settings.items())})\n\n"
        f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"{machine['device']}; {machine['date']}, commit {machine['commit']}; 1-minute load "
        f"average {machine['load_average_1min'][0]:.1f} before, "
        f"{machine['load_average_1min'][1]:.1f} after (other processes share the cores).\n\n"
        f"ResNet-34 teacher -> ResNet-18 student, {args.image_size}x{args.image_size} images, "
        f"batch {args.batch_size}, 1000 classes, fp32 unless --amp; medians of {args.steps} "
        "interleaved steps per set-up (ms per step and per section):\n\n"
        f"{table}\n\n"
        f"Store: {args.images} images x {args.crops} crops, k={args.topk}: {size:,} bytes of "
        f"data files (formula {build_info['bytes_formula']:,}); built in {build_s:.1f}s "
        f"(teacher loop {built.seconds:.1f}s, {built.images_per_s:.1f} crops/s). ImageNet-1k "
        f"with M=8, k=10: {build_info['imagenet_bytes_M8_k10']:,} bytes.\n")


if __name__ == "__main__":
    main()
