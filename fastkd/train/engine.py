"""The training loop: :func:`train`, from a configuration to a trained student.

Read it top to bottom: :func:`train` resolves the configuration and the device, :func:`setup`
loads the data, provides the teachers (training and caching missing built-in ones first, each in a
run of its own), builds the student and the method's plan (:mod:`fastkd.train.methods`) and the
loaders; then every epoch is :func:`train_one_epoch` and, when due, :func:`evaluate`. What
persists from step to step is one :class:`~fastkd.train.checkpoint.TrainState`, which is also
what a checkpoint saves.

Per step: the teacher side runs in eval mode under ``torch.inference_mode`` (and autocast), the
phase's module (student, plus connectors / transforms / heads) runs forward -- wrapped in DDP under
torchrun -- the method's loss goes through fastkd's ops, then backward and the optimizer step. The
learning rate is set every step from a pure function of the step (warm-up, then cosine / step /
constant), so resuming needs only the step counter.

Reliability: a checkpoint at the end of every epoch and every ``--checkpoint-every`` steps
(atomic); ``--resume`` restores modules, optimizer, scaler, RNG states, position and the unfinished
epoch's sums, and the sampler restarts the epoch where it stopped; SIGINT/SIGTERM finish the
current step, checkpoint and raise :class:`Interrupted`; a non-finite loss raises
:class:`NonFiniteLoss` without overwriting the last good checkpoint. Host synchronisation is kept
off the GPU's critical path: losses and accuracies accumulate on the device and are read at
``--log-interval`` and epoch ends; per-step synchronisation happens only with ``--profile-steps``.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from . import distributed, methods, store, teacher
from .checkpoint import TrainState
from .config import SYNTHETIC, Config, ConfigError, resolve
from .loaders import Data, Loaders, build_loaders, load_data
from .metrics import MetricsLog, epoch_line, plot_history, profile_table, summary_table
from .models import StagedNet, build_model, check_model_name
from .optim import Schedule, build_optimizer, peak_lr
from .runtime import (
    Profiler,
    StopFlag,
    autocast,
    prepare,
    resolve_device,
    to_device,
    torch_settings,
)

CHECKPOINT = "checkpoint.pt"
STUDENT = "student.pt"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM: a checkpoint was saved and the run stopped."""

    def __init__(self, message: str, signum: int | None) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class RunResult:
    output: Path
    history: list[dict[str, Any]]
    val_top1: float | None
    best_val_top1: float | None
    time_s: float
    train_time_s: float
    images_per_s: float
    student_path: Path | None


@dataclass
class Run:
    """What one process's run uses and does not checkpoint: set up once by :func:`setup`."""

    cfg: Config
    d: distributed.Dist
    device: torch.device
    log: Callable[[str], None]  # rank 0 only, silent when quiet
    output: Path
    channels_last: bool
    progress: bool
    data: Data
    student: StagedNet
    plan: methods.Plan
    loaders: Loaders
    resume_path: Path | None
    profiler: Profiler
    t_start: float  # wall time of this process's run starts here (set-up included)
    stop: StopFlag = field(default_factory=StopFlag)
    steps_this_process: int = 0


# -- main -----------------------------------------------------------------------------------------


def train(cfg: Config, *, log: Callable[[str], None] | None = None,
          quiet: bool = False, phases: int | None = None) -> RunResult:
    """Runs one training job described by ``cfg`` (resolved here). See the module docstring.

    ``phases``: train only the method's first ``phases`` phases (a teacher store's build trains
    DIH's heads this way)."""
    t_start = time.perf_counter()
    cfg = resolve(cfg, world_size=distributed.env_world_size())
    if cfg.method is None:
        raise ConfigError("train() needs a --method")
    own_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    device = resolve_device(cfg)
    d = distributed.init(device.type)
    try:
        with torch_settings(cfg, d, device):
            run = setup(cfg, d, device, log or _print, quiet, t_start)
            if phases is not None:
                run.plan = methods.Plan(run.plan.phases[:phases], run.plan.modules)
            return fit(run)
    finally:
        if own_group:
            distributed.shutdown(d)


# -- set-up ---------------------------------------------------------------------------------------


def setup(cfg: Config, d: distributed.Dist, device: torch.device, log: Callable[[str], None],
          quiet: bool, t_start: float) -> Run:
    """Everything a run needs before its first step, each setting checked before any training
    (a missing built-in teacher's) starts."""
    embedded = cfg.data is None
    store.check_method(cfg)
    check_model_name(cfg.student, embedded, "student")
    if cfg.method != "scratch":
        check_model_name(cfg.teacher, embedded, "teacher")
    resume_path = _check_output(cfg)
    data = load_data(cfg)
    methods.check(cfg, data.num_classes)
    stored = None
    if cfg.teacher_store is not None:
        # The store stands in for the teacher: the training set replays its crops.
        src = store.source(cfg)
        sha = store.run_teacher_sha256(cfg, src, log if not quiet and d.is_main else _silent)
        stored = store.open_for_run(cfg, src, sha)
        data = Data(store.ReplayDataset(src, stored, cfg.seed), data.val, data.num_classes,
                    data.input_shape, True)
    per_rank = cfg.batch_size // d.world_size
    if len(data.train) // d.world_size < per_rank:
        raise ConfigError(
            f"--batch-size {cfg.batch_size}: the training set has {len(data.train)} "
            f"images, fewer than one batch per rank ({per_rank} x {d.world_size} ranks)"
        )
    teachers = []
    if cfg.method != "scratch" and stored is None:
        paths = provide_teacher_weights(cfg, teacher.count(cfg), log if not quiet else _silent, d)
        teachers = teacher.build_teachers(cfg, paths, data.num_classes, data.input_shape)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, data.num_classes,
                          with_features=methods.needs_features(cfg.method, "student"),
                          input_shape=data.input_shape)
    ctx = methods.Context(cfg, student, teachers, data.num_classes, data.input_shape)
    if stored is None:
        plan = methods.build(ctx)
    else:
        plan = methods.build_from_store(ctx, store.teacher_fn(cfg, stored.meta, device))
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    for module in [*plan.modules.values(), *teachers]:
        prepare(module, device, channels_last)
    # Distinct streams per rank for anything random after initialisation (DDP keeps weights
    # identical by broadcasting rank 0's at wrap time).
    torch.manual_seed(cfg.seed + d.rank)
    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    return Run(
        cfg=cfg, d=d, device=device,
        log=log if d.is_main and not quiet else _silent,
        output=Path(cfg.output), channels_last=channels_last,
        progress=progress and d.is_main and not quiet,
        data=data, student=student, plan=plan,
        loaders=build_loaders(cfg, data, d, device, per_rank), resume_path=resume_path,
        profiler=Profiler(cfg.profile_steps, device), t_start=t_start,
    )


def _silent(message: str) -> None:
    pass


def _print(message: str) -> None:
    print(message, flush=True)


def _check_output(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None; refuses to clobber an earlier run."""
    existing = Path(cfg.output) / CHECKPOINT
    if cfg.resume is not None:
        return existing if cfg.resume == "auto" else Path(cfg.resume)
    if existing.exists() and not cfg.overwrite:
        raise ConfigError(
            f"--output {cfg.output} already holds a checkpoint; pass --resume to continue "
            "that run, --overwrite to replace it, or another --output"
        )
    return None


def provide_teacher_weights(cfg: Config, count: int, log: Callable[[str], None],
                            d: distributed.Dist) -> list[str | None]:
    """Weight files of the run's ``count`` teachers (None: random init, for throughput runs).

    On the embedded data without ``--teacher-weights``, a built-in teacher missing from the cache
    is trained first by a run of its own -- a scratch run, which has no teacher, so this is as
    deep as the recursion goes -- and cached.
    """
    if cfg.data == SYNTHETIC and not cfg.teacher_weights:
        log(f"--data synthetic: {count} randomly initialised teacher(s), for throughput only")
        return [None] * count
    if cfg.teacher_weights:
        return list(cfg.teacher_weights)
    entries = teacher.cache_entries(cfg, count)
    for entry in entries:
        if entry.path.exists():
            if entry.info.exists():
                meta = json.loads(entry.info.read_text())
                log(f"teacher {entry.seed}: cached {entry.path} (val top1 "
                    f"{meta['val_top1']:.2f}%)")
            continue
        log(f"teacher {entry.seed}: training {cfg.teacher} ({cfg.teacher_epochs} epochs, seed "
            f"{entry.seed}) once; it is cached at {entry.path}")
        resume = (entry.run_dir / CHECKPOINT).exists()
        result = train(teacher.run_config(cfg, entry, resume), quiet=True)
        if d.is_main:
            teacher.store(cfg, entry, result.student_path, result.val_top1, result.time_s)
        distributed.barrier(d)
        log(f"teacher {entry.seed}: val top1 {result.val_top1:.2f}% after {result.time_s:.1f}s")
    return [str(entry.path) for entry in entries]


def resume(run: Run, state: TrainState) -> dict[str, Any]:
    """Loads the checkpoint at ``run.resume_path`` into ``state`` and this rank's RNG states;
    returns it (its optimizer state is loaded when its phase starts)."""
    path = run.resume_path
    saved = ckpt.load(path)
    ckpt.check_matches(saved["config"], run.cfg.to_dict(), str(path))
    state.load(saved, path)
    rngs = saved["rng"]
    if saved.get("world_size") != run.d.world_size:
        run.log(f"warning: {path} was written by {saved.get('world_size')} ranks, resuming "
                f"on {run.d.world_size}: the data order differs from an uninterrupted run")
    ckpt.set_rng_state(rngs[run.d.rank] if run.d.rank < len(rngs) else rngs[0])
    run.log(f"resuming {path} at epoch {state.epoch + 1}, step {state.step}")
    return saved


def _phase_of(plan: methods.Plan, epoch: int) -> tuple[int, int]:
    """(phase index, epoch within the phase) of the run's ``epoch``."""
    for i, phase in enumerate(plan.phases):
        if epoch < phase.epochs:
            return i, epoch
        epoch -= phase.epochs
    raise AssertionError("epoch beyond the plan")


# -- the loop -------------------------------------------------------------------------------------


def fit(run: Run) -> RunResult:
    """Trains every phase of the plan, epoch by epoch, from the checkpoint if resuming."""
    cfg, plan = run.cfg, run.plan
    if run.d.is_main:
        run.output.mkdir(parents=True, exist_ok=True)
    state = TrainState(plan.modules, run.student)
    saved = resume(run, state) if run.resume_path is not None else None
    metrics = MetricsLog(run.output, run.d.is_main, state.history)
    if run.d.is_main:
        (run.output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    total_epochs = sum(p.epochs for p in plan.phases)
    run.log(_header(run))
    started = None
    with run.stop:
        while state.epoch < total_epochs:
            index, local_epoch = _phase_of(plan, state.epoch)
            phase = plan.phases[index]
            if started != index:
                module, teacher_fn = start_phase(run, state, index, saved)
                started, saved = index, None
            t0 = time.perf_counter()
            row, images_per_s = train_one_epoch(run, state, phase, module, teacher_fn,
                                                local_epoch, total_epochs)
            if (local_epoch + 1) % cfg.eval_every == 0 or local_epoch + 1 == phase.epochs:
                row.update(evaluate(run, phase))
            row["epoch_time_s"] = time.perf_counter() - t0
            row["images_per_s"] = images_per_s
            metrics.append(row)
            run.log(epoch_line(row, total_epochs))
            state.epoch, state.step, state.sums = state.epoch + 1, 0, None
            save_checkpoint(run, state, finished=state.epoch == total_epochs)
    return finish(run, state, metrics)


def start_phase(run: Run, state: TrainState, index: int, saved: dict[str, Any] | None
                ) -> tuple[nn.Module, Callable | None]:
    """Freezes all but the phase's trainable modules, gives ``state`` the phase's optimizer,
    scaler and schedule (from ``saved`` when it was checkpointed in this phase); returns the
    module to train (DDP-wrapped, compiled) and the teacher-side function."""
    cfg = run.cfg
    phase = run.plan.phases[index]
    for m in run.plan.modules.values():
        m.requires_grad_(False).eval()
    for m in phase.trainable:
        m.requires_grad_(True).train()
    base_lr = peak_lr(cfg, phase.lr)
    state.optimizer = build_optimizer(cfg, phase.trainable, base_lr)
    state.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    state.schedule = Schedule(cfg, base_lr, phase.epochs, run.loaders.steps_per_epoch)
    state.phase = index
    if saved is not None and saved.get("optimizer_phase") == index:
        state.optimizer.load_state_dict(saved["optimizer"])
        if state.scaler is not None and saved.get("scaler") is not None:
            state.scaler.load_state_dict(saved["scaler"])
    module = phase.module
    if run.d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    teacher_fn = phase.teacher
    if cfg.compile:
        module = torch.compile(module)
        # A teacher store's reader is not a model: it stays eager.
        if teacher_fn is not None and cfg.teacher_store is None:
            teacher_fn = torch.compile(teacher_fn)
    return module, teacher_fn


# -- one epoch ------------------------------------------------------------------------------------


def train_one_epoch(run: Run, state: TrainState, phase: methods.Phase, module: nn.Module,
                    teacher_fn: Callable | None, local_epoch: int, total_epochs: int
                    ) -> tuple[dict[str, Any], float]:
    """Trains epoch ``state.epoch`` from step ``state.step`` on; returns its metrics row
    (training columns) and its images/s."""
    cfg, loaders = run.cfg, run.loaders
    loaders.sampler.set_position(state.epoch, state.step * loaders.per_rank_batch)
    if run.data.augmented:
        run.data.train.set_epoch(state.epoch)
    state.sums = (_new_sums(run.device) if state.sums is None
                  else {k: v.to(run.device) for k, v in state.sums.items()})
    check_every = 1 if run.device.type == "cpu" else cfg.log_interval
    bar = _progress_bar(run, state, phase, total_epochs)
    clock = _Clock(run, state)
    lr = 0.0
    run.profiler.start()
    for x, y, *stored in _batches(loaders.train, loaders.steps_per_epoch - state.step):
        # stored: a teacher store's rows for the batch (ids, values), read by the phase's teacher.
        x = to_device(x, run.device, run.channels_last)
        y = y.to(run.device, non_blocking=True)
        lr = state.schedule(local_epoch * loaders.steps_per_epoch + state.step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        run.profiler.mark("data")
        loss, parts, out = train_step(run, state, phase, module, teacher_fn, x, y, local_epoch,
                                      stored or None)
        if run.profiler.step_done(x.shape[0] * run.d.world_size):
            _report_profile(run)
        _accumulate(state.sums, loss, parts, out.get("logits"), y)
        clock.images += x.shape[0]
        state.step += 1
        state.global_step += 1
        run.steps_this_process += 1
        if bar is not None:
            bar.update(1)
            if state.step % cfg.log_interval == 0:
                bar.set_postfix(loss=f"{(state.sums['loss'] / state.sums['rows']).item():.4f}",
                                lr=f"{lr:.3g}")
        step_checkpoint = cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0
        if (state.step % check_every == 0 or step_checkpoint or run.stop.signum is not None
                or _step_limit(run)):
            clock.lap()
            _check_stop(run, state, phase)
            if step_checkpoint and state.step < loaders.steps_per_epoch:
                save_checkpoint(run, state)
        run.profiler.start()
    if bar is not None:
        bar.close()
    seconds = clock.lap()
    _check_stop(run, state, phase)
    # The rate of the epoch's last step (also when a resumed epoch had no step left to run).
    lr = state.schedule((local_epoch + 1) * loaders.steps_per_epoch - 1)
    row = _train_row(run, state, phase, local_epoch, lr)
    return row, clock.epoch_images * run.d.world_size / max(seconds, 1e-9)


def train_step(run: Run, state: TrainState, phase: methods.Phase, module: nn.Module,
               teacher_fn: Callable | None, x: torch.Tensor, y: torch.Tensor, local_epoch: int,
               stored: list[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """Teacher forward (or the teacher store's rows of the batch, ``stored``), student forward,
    the method's loss, backward and the optimizer step."""
    prof = run.profiler
    with autocast(run.cfg, run.device):
        tout = None
        if teacher_fn is not None:
            with torch.inference_mode():
                tout = teacher_fn(x if stored is None else stored)
        prof.mark("teacher_forward")
        out = module(x, tout)
        prof.mark("student_forward")
        loss, parts = phase.loss(out, tout, y, local_epoch + 1)
        prof.mark("distillation_loss")
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        loss.backward()
        state.optimizer.step()
    prof.mark("backward_step")
    return loss, parts, out


def _batches(loader: DataLoader, count: int) -> Iterator[tuple[torch.Tensor, ...]]:
    for i, batch in enumerate(loader):
        if i >= count:
            break
        yield batch


class _Clock:
    """Training time and images, added to the state at each synchronisation point (so a
    checkpoint carries them) and for the whole epoch."""

    def __init__(self, run: Run, state: TrainState) -> None:
        self.world_size = run.d.world_size
        self.state = state
        self.start = self.t0 = time.perf_counter()
        self.images = self.epoch_images = 0

    def lap(self) -> float:
        """Adds the time and images since the last lap to the state; returns the epoch's time."""
        now = time.perf_counter()
        self.state.train_time_s += now - self.t0
        self.state.train_images += self.images * self.world_size
        self.epoch_images += self.images
        self.t0, self.images = now, 0
        return now - self.start


def _new_sums(device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.zeros((), dtype=torch.float64, device=device)
            for k in ("loss", "correct", "count", "rows", "bad")}


@torch.no_grad()
def _accumulate(sums: dict[str, torch.Tensor], loss: torch.Tensor,
                parts: dict[str, torch.Tensor], logits: torch.Tensor | None,
                y: torch.Tensor) -> None:
    """Adds a step's loss (non-finite values counted, not summed), accuracy and loss parts to the
    epoch's sums, on the device."""
    n = y.shape[0]
    detached = loss.detach().double()
    finite = torch.isfinite(detached)
    sums["bad"] += (~finite).double()
    sums["loss"] += torch.where(finite, detached, 0.0) * n
    sums["rows"] += n
    if logits is not None:
        sums["correct"] += (logits.argmax(-1) == y).sum().double()
        sums["count"] += n
    for name, value in parts.items():
        key = "part_" + name
        if key not in sums:
            sums[key] = torch.zeros((), dtype=torch.float64, device=value.device)
        sums[key] += value.double() * n


def _step_limit(run: Run) -> bool:
    limit = run.cfg.stop_after_steps
    return limit is not None and run.steps_this_process >= limit


def _check_stop(run: Run, state: TrainState, phase: methods.Phase) -> None:
    """Stops on a non-finite loss (any rank), or checkpoints and stops on a signal or
    ``--stop-after-steps`` (any rank)."""
    device = run.device
    flags = torch.stack([
        state.sums["bad"].clamp(max=1.0),
        torch.tensor(1.0 if run.stop.signum is not None else 0.0, dtype=torch.float64,
                     device=device),
        torch.tensor(1.0 if _step_limit(run) else 0.0, dtype=torch.float64, device=device),
    ])
    if run.d.enabled:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad, signalled, step_limit = (bool(v) for v in flags.tolist())
    if bad:
        last = run.output / CHECKPOINT
        keep = (f"the last good checkpoint {last} is kept" if last.exists()
                else "no checkpoint was written yet")
        raise NonFiniteLoss(
            f"the {phase.name} loss of {run.cfg.method} became NaN or infinite at epoch "
            f"{state.epoch + 1}, step {state.step}; {keep}. Try a lower --lr, --warmup-epochs, "
            "or --amp off"
        )
    if signalled or step_limit:
        save_checkpoint(run, state)
        signum = run.stop.signum
        why = (f"{signal.Signals(signum).name} received" if signum is not None
               else f"--stop-after-steps {run.cfg.stop_after_steps}")
        raise Interrupted(
            f"{why}: checkpoint saved at epoch {state.epoch + 1}, step {state.step} to "
            f"{run.output / CHECKPOINT}; continue with --resume",
            signum,
        )


def _train_row(run: Run, state: TrainState, phase: methods.Phase, local_epoch: int,
               lr: float) -> dict[str, Any]:
    """The epoch's training metrics, summed over the ranks."""
    keys = sorted(state.sums)
    packed = torch.stack([state.sums[k] for k in keys])
    distributed.all_reduce_sum(run.d, packed)
    s = dict(zip(keys, packed.tolist(), strict=True))
    rows = max(1.0, s["rows"])
    row: dict[str, Any] = {
        "epoch": state.epoch + 1, "phase": phase.name, "phase_epoch": local_epoch + 1, "lr": lr,
        "train_loss": s["loss"] / rows,
        "train_top1": 100.0 * s["correct"] / s["count"] if s["count"] else None,
    }
    for k in keys:
        if k.startswith("part_"):
            row["train_" + k[len("part_"):]] = s[k] / rows
    return row


def evaluate(run: Run, phase: methods.Phase) -> dict[str, float]:
    """Validation loss, top-1 and top-5 of everything the phase scores (the student, DIH's
    heads), over the whole validation set split across the ranks."""
    for m in run.plan.modules.values():
        m.eval()
    names: list[str] | None = None
    totals: torch.Tensor | None = None
    with torch.inference_mode(), autocast(run.cfg, run.device):
        for x, y in run.loaders.val:
            x = to_device(x, run.device, run.channels_last)
            y = y.to(run.device, non_blocking=True)
            outs = phase.evaluate(x)
            if names is None:
                names = list(outs)
                totals = torch.zeros(3 * len(names) + 1, dtype=torch.float64, device=run.device)
            vals = []
            for n in names:
                logits = outs[n].float()
                k = min(5, logits.shape[-1])
                top = logits.topk(k, dim=-1).indices
                vals += [
                    F.cross_entropy(logits, y, reduction="sum").double(),
                    (top[:, 0] == y).sum().double(),
                    (top == y[:, None]).any(-1).sum().double(),
                ]
            vals.append(torch.tensor(float(y.shape[0]), dtype=torch.float64, device=run.device))
            totals += torch.stack(vals)
    for m in phase.trainable:
        m.train()
    if names is None:
        totals = torch.zeros(1, dtype=torch.float64, device=run.device)
        names = []
    distributed.all_reduce_sum(run.d, totals)
    t = totals.tolist()
    n = max(1.0, t[-1])
    result = {}
    for i, name in enumerate(names):
        prefix = "val" if name == "student" else f"val_{name}"
        result[f"{prefix}_loss"] = t[3 * i] / n
        result[f"{prefix}_top1"] = 100.0 * t[3 * i + 1] / n
        result[f"{prefix}_top5"] = 100.0 * t[3 * i + 2] / n
    return result


# -- checkpoints, logs and the end of the run -----------------------------------------------------


def save_checkpoint(run: Run, state: TrainState, finished: bool = False) -> None:
    """Writes ``state`` (with every rank's RNG states) to ``<output>/checkpoint.pt``, atomically."""
    rngs = [ckpt.rng_state()]
    if run.d.enabled:
        gathered: list[Any] = [None] * run.d.world_size
        torch.distributed.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if run.d.is_main:
        contents = state.checkpoint(run.cfg.to_dict(), run.d.world_size, rngs,
                                    _elapsed(run, state), finished)
        ckpt.atomic_save(contents, run.output / CHECKPOINT)
    distributed.barrier(run.d)


def _elapsed(run: Run, state: TrainState) -> float:
    return state.elapsed_s + time.perf_counter() - run.t_start


def _progress_bar(run: Run, state: TrainState, phase: methods.Phase, total_epochs: int):
    if not run.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=run.loaders.steps_per_epoch, initial=state.step, leave=False,
                dynamic_ncols=True, desc=f"epoch {state.epoch + 1}/{total_epochs} {phase.name}")


def _report_profile(run: Run) -> None:
    report = run.profiler.report()
    if run.d.is_main:
        (run.output / "profile.json").write_text(json.dumps(report, indent=1))
    run.log(profile_table(report, Profiler.SECTIONS))


def _header(run: Run) -> str:
    cfg = run.cfg
    desc = methods.describe(cfg)
    source = cfg.teacher if cfg.method != "scratch" else "(no teacher)"
    if cfg.teacher_store is not None:
        source = f"teacher store {cfg.teacher_store} ({cfg.teacher})"
    return (
        f"{cfg.method}: {cfg.student} <- {source} | "
        + ", ".join(f"{k}={v}" for k, v in desc.items() if k != "method")
        + f" | {len(run.data.train)} train / {len(run.data.val)} val images, "
        f"{run.loaders.steps_per_epoch} steps/epoch, {run.d.world_size} rank(s) on {run.device}"
    )


def finish(run: Run, state: TrainState, metrics: MetricsLog) -> RunResult:
    """Exports the student, plots, prints the summary; the run's result."""
    cfg, history = run.cfg, state.history
    student_path = None
    if run.d.is_main:
        student_path = run.output / STUDENT
        ckpt.atomic_save(run.student.weights(), student_path)
    if run.d.is_main and cfg.plot:
        plot_history(history, run.output / "plot.png",
                     f"{cfg.method}: {cfg.student}, seed {cfg.seed}")
    metrics.close()
    student_rows = [r for r in history if r.get("val_top1") is not None
                    and r["phase"] == "student"]
    final = student_rows[-1]["val_top1"] if student_rows else None
    best = max((r["val_top1"] for r in student_rows), default=None)
    ips = state.train_images / state.train_time_s if state.train_time_s else 0.0
    result = RunResult(run.output, history, final, best, _elapsed(run, state),
                       state.train_time_s, ips, student_path)
    run.log(summary_table(cfg.method, final, best, len(history), result.time_s, ips))
    run.log(f"wrote {run.output}/ (checkpoint.pt, student.pt, metrics.csv, metrics.json, "
            "plot.png, tb/)")
    distributed.barrier(run.d)
    return result
