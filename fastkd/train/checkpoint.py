"""Checkpoints: the training state, atomic writes, exact resumption, clear errors.

:class:`TrainState` is everything that persists from one step to the next -- the trained modules,
the optimizer, the gradient scaler, the learning-rate schedule, the position (epoch, step within
it, steps so far, phase), the unfinished epoch's metric sums, the metric history -- and a
checkpoint is that state plus the configuration and the random-number states of torch (CPU and
CUDA), numpy and Python for every rank. It is written to a temporary file in the same directory
and renamed over the old one (``os.replace``), so a crash or a signal mid-write never leaves a
truncated checkpoint. It is read with ``torch.load(weights_only=True)``: everything in it is
tensors, numbers, strings and containers.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .config import RUNTIME_FIELDS

FORMAT = "fastkd-train-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from another configuration."""


@dataclass
class TrainState:
    """What persists from step to step; :meth:`checkpoint` and :meth:`load` are its file form."""

    # Everything trained: the student and the method's own modules (connectors, heads, ...).
    modules: dict[str, nn.Module]
    # The student, whose weights are also saved under its own key names ("model").
    student: Any
    # The optimizer, scaler and learning rate of the phase being trained (set when it starts).
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    schedule: Callable[[int], float] | None = None
    phase: int = 0
    # Position: epochs done (over all phases), steps done in the current one, steps in all.
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    # The current epoch's running sums (loss, accuracy, ...) on the device; None between epochs.
    sums: dict[str, torch.Tensor] | None = None
    # One metrics row per finished epoch.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Wall time of the processes before this one; training time and images over all of them.
    elapsed_s: float = 0.0
    train_time_s: float = 0.0
    train_images: int = 0

    def checkpoint(self, config: dict[str, Any], world_size: int, rng: list[dict[str, Any]],
                   elapsed_s: float, finished: bool) -> dict[str, Any]:
        """The checkpoint's contents (tensors, numbers, strings and containers only)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": config,
            "world_size": world_size,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "model": self.student.weights(),
            "position": {"epoch": self.epoch, "step": self.step, "global_step": self.global_step},
            "optimizer": self.optimizer.state_dict(),
            "optimizer_phase": self.phase,
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": rng,
            "epoch_sums": None if self.sums is None else {k: v.cpu() for k, v in self.sums.items()},
            "history": list(self.history),
            "elapsed_s": elapsed_s,
            "train_time_s": self.train_time_s,
            "train_images": self.train_images,
            "finished": finished,
        }

    def load(self, saved: dict[str, Any], path: str | os.PathLike) -> None:
        """Modules, position, sums, history and times from a checkpoint read by :func:`load`.

        The optimizer and scaler are loaded by the phase they belong to when it starts
        (``saved["optimizer_phase"]``); RNG states by the caller, who knows the rank.
        """
        modules = saved.get("modules", {})
        if set(modules) != set(self.modules):
            raise CheckpointError(
                f"--resume: {path} holds modules {sorted(modules)}, this run trains "
                f"{sorted(self.modules)}"
            )
        for name, module in self.modules.items():
            try:
                module.load_state_dict(modules[name])
            except RuntimeError as e:
                raise CheckpointError(
                    f"--resume: {path}: the saved {name} does not fit this run's model ({e})"
                ) from None
        pos = saved["position"]
        self.epoch, self.step, self.global_step = pos["epoch"], pos["step"], pos["global_step"]
        self.sums = saved["epoch_sums"]
        self.history = list(saved["history"])
        self.elapsed_s = saved["elapsed_s"]
        self.train_time_s = saved["train_time_s"]
        self.train_images = saved["train_images"]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a trainer checkpoint; CheckpointError if it is missing, unreadable or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"--resume: {path} is corrupt or not a checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); delete it or pass --overwrite to start "
            "afresh"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"--resume: {path} is not a fastkd trainer checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"--resume: {path} has checkpoint format version {state.get('version')}, this "
            f"trainer reads version {VERSION}"
        )
    return state


def check_matches(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """CheckpointError listing every setting (other than runtime ones) that differs."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k not in RUNTIME_FIELDS and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"--resume: {path} was written by a run with a different configuration; run with the "
            "same settings (or --overwrite to start afresh). Differences: " + "; ".join(diffs)
        )


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a weights file: a plain state dict, a fastkd ``student.pt``, or a fastkd
    trainer checkpoint (its exported student)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"--teacher-weights: no such file: {path}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"--teacher-weights: cannot read {path} as a state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        state = state["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--teacher-weights: {path} does not hold a state dict of tensors")
    return state
