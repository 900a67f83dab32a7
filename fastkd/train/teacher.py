"""Teachers for the embedded digits: trained once with a fixed recipe and cached.

The cache key is a hash of everything that determines the teacher (model, recipe, epochs, seed,
data split, precision), so a changed recipe never reuses a stale file. Teacher ``i`` of a run
(FEED uses several) is the one trained with seed ``i``, whatever the student's seed: the students
of a comparison all learn from the same teachers. The teacher's own run directory is kept next to
the cached weights (metrics, plot, checkpoint), so an interrupted teacher run resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from . import distributed
from .config import Config

# The teacher always trains on the whole training split with this recipe.
RECIPE = {
    "recipe": 1,
    "data": "sklearn digits, 70/30 stratified split (seed 0), whole training split",
    "batch_size": 64,
    "lr": 0.05,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "cosine",
}


def teacher_key(cfg: Config, seed: int) -> str:
    recipe = {**RECIPE, "model": cfg.teacher, "epochs": cfg.teacher_epochs, "seed": seed,
              "amp": cfg.amp}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cached_teacher_paths(cfg: Config, count: int, log: Callable[[str], None],
                         d: distributed.Dist) -> list[Path]:
    """Paths of teachers 0..count-1, training (and caching) the missing ones."""
    from .engine import CHECKPOINT, train

    root = Path(cfg.cache_dir) / "teachers"
    paths = []
    for seed in range(count):
        key = teacher_key(cfg, seed)
        path = root / f"{cfg.teacher}-{key}.pt"
        info = path.with_suffix(".json")
        if path.exists():
            if info.exists():
                meta = json.loads(info.read_text())
                log(f"teacher {seed}: cached {path} (val top1 {meta['val_top1']:.2f}%)")
        else:
            run_dir = root / f"{cfg.teacher}-{key}-run"
            log(f"teacher {seed}: training {cfg.teacher} ({cfg.teacher_epochs} epochs, seed "
                f"{seed}) once; it is cached at {path}")
            sub = Config(
                method="scratch", student=cfg.teacher, epochs=cfg.teacher_epochs, seed=seed,
                batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], optimizer=RECIPE["optimizer"],
                momentum=RECIPE["momentum"], weight_decay=RECIPE["weight_decay"],
                lr_schedule=RECIPE["lr_schedule"], output=str(run_dir), overwrite=True,
                resume="auto" if (run_dir / CHECKPOINT).exists() else None,
                device=cfg.device, amp=cfg.amp, threads=cfg.threads, cache_dir=cfg.cache_dir,
                progress=False,
            )
            result = train(sub, quiet=True)
            if d.is_main:
                tmp = path.with_suffix(".pt.tmp")
                shutil.copyfile(result.student_path, tmp)
                tmp.replace(path)
                info.write_text(json.dumps({
                    "model": cfg.teacher, "seed": seed, "epochs": cfg.teacher_epochs,
                    "val_top1": result.val_top1, "time_s": result.time_s, "recipe": RECIPE,
                }, indent=1))
            distributed.barrier(d)
            log(f"teacher {seed}: val top1 {result.val_top1:.2f}% after {result.time_s:.1f}s")
        paths.append(path)
    return paths
