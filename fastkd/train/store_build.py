"""``python -m fastkd.train store build``: the teacher-store build as a job of the trainer.

The store itself (layout, build loop, verification, replay) is :mod:`fastkd.train.store`; this
module adds what the build takes from the training engine -- the teacher's weights (the cached
built-in teacher, trained first when missing) and, for ``--method dih``, the intermediate heads,
trained on the frozen teacher by the trainer's own heads phase -- so the engine can read stores
without importing the build.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed, engine
from .config import Config, ConfigError, resolve
from .runtime import resolve_device, torch_settings
from .store import STORE_METHODS, BuildResult, build_store


def build(cfg: Config, log: Callable[[str], None] | None = None) -> BuildResult:
    """Builds (or finishes) the teacher store ``cfg.output`` for the training set and teacher
    ``cfg`` names: ``cfg.crops`` augmentations per image, the top ``cfg.topk`` log-probabilities
    of each; chunks of ``cfg.batch_size`` images, shared out over torchrun's ranks."""
    if cfg.method is None:
        cfg = dataclasses.replace(cfg, method="kd")
    if cfg.student is None and cfg.data is not None:
        # The build trains no student (DIH's heads run builds one it does not train): --student
        # is optional here.
        cfg = dataclasses.replace(cfg, student=cfg.teacher)
    if cfg.method not in STORE_METHODS:
        raise ConfigError(f"store build --method {cfg.method}: a store serves "
                          f"{', '.join(STORE_METHODS)} (the teacher's class probabilities)")
    if cfg.teacher_store is not None:
        raise ConfigError("store build writes a store (--output); drop --teacher-store")
    if cfg.output is None:
        raise ConfigError("store build needs --output DIR (the store's directory)")
    say = log or (lambda s: print(s, flush=True))
    cfg = resolve(cfg, world_size=distributed.env_world_size())
    own_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    device = resolve_device(cfg)
    d = distributed.init(device.type)
    try:
        with torch_settings(cfg, d, device):
            return build_store(cfg, d, device, say if d.is_main else (lambda s: None),
                               engine.provide_teacher_weights, dih_heads)
    finally:
        if own_group:
            distributed.shutdown(d)


def dih_heads(cfg: Config, log: Callable[[str], None]) -> nn.Module:
    """DIH's intermediate heads, trained on the frozen teacher by the trainer's heads phase (a
    run of its own under ``<store>/dih-heads``, resumed if it was cut off)."""
    run_dir = Path(cfg.output) / "dih-heads"
    done = run_dir / engine.CHECKPOINT
    if done.exists():
        saved = ckpt.load(done)
        if saved.get("finished"):
            log(f"dih: heads from {done}")
            return _heads_module(saved)
    log(f"dih: training the intermediate heads ({cfg.dih_head_epochs} epochs) in {run_dir}")
    heads_cfg = dataclasses.replace(
        cfg, output=str(run_dir), resume="auto" if done.exists() else None, overwrite=True,
        plot=False, progress=False)
    engine.train(heads_cfg, quiet=True, phases=1)
    return _heads_module(ckpt.load(done))


def _heads_module(saved: dict[str, Any]) -> nn.Module:
    """The heads (a ModuleList of Linear layers) from a dih run's checkpoint."""
    state = saved["modules"]["heads"]
    layers = []
    i = 0
    while f"{i}.weight" in state:
        weight = state[f"{i}.weight"]
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": state[f"{i}.bias"]})
        layers.append(layer)
        i += 1
    return nn.ModuleList(layers).requires_grad_(False)
