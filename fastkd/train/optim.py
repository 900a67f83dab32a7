"""Optimizers and the learning-rate schedule.

The rate is a pure function of the phase's step (warm-up, then cosine / step / constant), set
before every step, so resuming needs only the step counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import Config


def build_optimizer(cfg: Config, modules: list[nn.Module], lr: float) -> torch.optim.Optimizer:
    """``--optimizer`` over the trainable parameters of ``modules``; weights of rank >= 2 are
    decayed, biases and norm parameters are not."""
    decay, no_decay, seen = [], [], set()
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    import timm.optim

    if cfg.optimizer == "lars":
        return timm.optim.Lars(groups, lr=lr, momentum=cfg.momentum)
    return timm.optim.Lamb(groups, lr=lr)


def peak_lr(cfg: Config, phase_lr: float | None) -> float:
    """A phase's peak rate: its own or ``--lr``, scaled with the batch under ``--lr-scaling``."""
    peak = cfg.lr if phase_lr is None else phase_lr
    return peak * (cfg.batch_size / cfg.lr_base_batch if cfg.lr_scaling == "linear" else 1.0)


def lr_at(cfg: Config, base_lr: float, epochs: int, steps_per_epoch: int, step: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of a phase of ``epochs`` epochs."""
    total = epochs * steps_per_epoch
    warm = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    if step < warm:
        return base_lr * (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return base_lr
    if cfg.lr_schedule == "step":
        epoch = step // steps_per_epoch
        return base_lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
    t = (step - warm) / max(1, total - warm)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedule:
    """The learning rate of one phase as a function of the phase's step."""

    cfg: Config
    base_lr: float
    epochs: int
    steps_per_epoch: int

    def __call__(self, step: int) -> float:
        return lr_at(self.cfg, self.base_lr, self.epochs, self.steps_per_epoch, step)
