"""Teachers: how many a run uses, the cache of the built-in teachers, and the frozen models.

The built-in teachers of the embedded digits are trained once with a fixed recipe and cached. The
cache key is a hash of everything that determines the teacher (model, recipe, epochs, seed, data
split, precision), so a changed recipe never reuses a stale file. Teacher ``i`` of a run (FEED
uses several) is the one trained with seed ``i``, whatever the student's seed: the students of a
comparison all learn from the same teachers. The teacher's own run directory is kept next to the
cached weights (metrics, plot, checkpoint), so an interrupted teacher run resumes.

This module only describes and loads teachers; training a missing one is a run of its own, which
``fastkd.train.engine`` starts before the student's run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config
from .methods import needs_features
from .models import StagedNet, build_model

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


def count(cfg: Config) -> int:
    """How many teachers the method distils from."""
    return cfg.feed_teachers if cfg.method == "feed" else 1


def teacher_key(cfg: Config, seed: int) -> str:
    recipe = {**RECIPE, "model": cfg.teacher, "epochs": cfg.teacher_epochs, "seed": seed,
              "amp": cfg.amp}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CachedTeacher:
    """Built-in teacher ``seed`` in the cache: its weights, a JSON summary, its run directory."""

    seed: int
    path: Path
    info: Path
    run_dir: Path


def cache_entries(cfg: Config, n: int) -> list[CachedTeacher]:
    """The cache entries of built-in teachers 0..n-1 (present or not)."""
    root = Path(cfg.cache_dir) / "teachers"
    entries = []
    for seed in range(n):
        stem = f"{cfg.teacher}-{teacher_key(cfg, seed)}"
        path = root / f"{stem}.pt"
        entries.append(CachedTeacher(seed, path, path.with_suffix(".json"), root / f"{stem}-run"))
    return entries


def run_config(cfg: Config, entry: CachedTeacher, resume: bool) -> Config:
    """The scratch run that trains ``entry`` with the recipe (``resume``: its run was cut off)."""
    return Config(
        method="scratch", student=cfg.teacher, epochs=cfg.teacher_epochs, seed=entry.seed,
        batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], optimizer=RECIPE["optimizer"],
        momentum=RECIPE["momentum"], weight_decay=RECIPE["weight_decay"],
        lr_schedule=RECIPE["lr_schedule"], output=str(entry.run_dir), overwrite=True,
        resume="auto" if resume else None, device=cfg.device, amp=cfg.amp, threads=cfg.threads,
        cache_dir=cfg.cache_dir, progress=False,
    )


def store(cfg: Config, entry: CachedTeacher, weights: Path, val_top1: float,
          time_s: float) -> None:
    """Puts a trained teacher's ``weights`` file into the cache, with its summary."""
    tmp = entry.path.with_suffix(".pt.tmp")
    shutil.copyfile(weights, tmp)
    tmp.replace(entry.path)
    entry.info.write_text(json.dumps({
        "model": cfg.teacher, "seed": entry.seed, "epochs": cfg.teacher_epochs,
        "val_top1": val_top1, "time_s": time_s, "recipe": RECIPE,
    }, indent=1))


def build_teachers(cfg: Config, paths: list[str | None], num_classes: int,
                   input_shape: tuple[int, int, int]) -> list[StagedNet]:
    """The frozen teachers in eval mode, with the weights of ``paths`` (None: random init)."""
    teachers = []
    for i, path in enumerate(paths):
        torch.manual_seed(cfg.seed + 1000 + i)
        net = build_model(cfg.teacher, num_classes,
                          with_features=needs_features(cfg.method, "teacher"),
                          input_shape=input_shape)
        if path is not None:
            net.load_weights(ckpt.read_weights(path), f"--teacher-weights {path}")
        net.eval().requires_grad_(False)
        teachers.append(net)
    return teachers
