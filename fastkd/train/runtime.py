"""The process the trainer runs in: its device, threads and precision, a stop flag for SIGINT and
SIGTERM, and a profiler of the first steps. Nothing here persists across a resume."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from . import distributed
from .config import Config, ConfigError


def _device(cfg: Config, d: distributed.Dist) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def resolve_device(cfg: Config) -> torch.device:
    """This process's device; fills in ``--amp auto`` for it (in place)."""
    device = _device(cfg, distributed.Dist(local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
    if cfg.amp == "auto":
        cfg.amp = "bf16" if device.type == "cuda" else "off"
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or off")
    return device


@contextlib.contextmanager
def torch_settings(cfg: Config, d: distributed.Dist, device: torch.device) -> Iterator[None]:
    """Intra-op threads (restored on exit) and the CUDA math settings of a run."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif cfg.data is None:
        # The digits' 8x8 convolutions gain nothing from intra-op threads, and on shared cores
        # the threads' barriers cost several times the work.
        torch.set_num_threads(1)
    elif d.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world_size))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def autocast(cfg: Config, device: torch.device):
    if cfg.amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def prepare(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


class StopFlag:
    """Installs SIGINT/SIGTERM handlers that ask the loop to stop after the current step; a
    second signal falls back to the default behaviour. Restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Profiler:
    """Wall time per section of the first ``steps`` steps, synchronising the device."""

    SECTIONS = ("data", "teacher_forward", "student_forward", "distillation_loss",
                "backward_step")

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = steps
        self.device = device
        self.totals = dict.fromkeys(self.SECTIONS, 0.0)
        self.count = 0
        self.images = 0
        self._t = 0.0

    @property
    def active(self) -> bool:
        return self.count < self.steps

    def start(self) -> None:
        if self.active:
            self._sync()
            self._t = time.perf_counter()

    def mark(self, section: str) -> None:
        if self.active:
            self._sync()
            now = time.perf_counter()
            self.totals[section] += now - self._t
            self._t = now

    def step_done(self, images: int) -> bool:
        """Counts a profiled step; True when it was the last one (time to report)."""
        if not self.active:
            return False
        self.count += 1
        self.images += images
        return not self.active

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def report(self) -> dict[str, Any]:
        total = sum(self.totals.values())
        return {
            "steps": self.count,
            "images": self.images,
            "images_per_s": self.images / total if total else 0.0,
            "ms_per_step": {k: 1e3 * v / max(1, self.count) for k, v in self.totals.items()},
            "share": {k: v / total if total else 0.0 for k, v in self.totals.items()},
        }
