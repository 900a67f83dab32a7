"""The timer behind every benchmark figure (``time_rotations``, used by ``python -m fastkd bench``
and the pytest-benchmark suites alike), input-buffer rotation, peak memory and the copy-bandwidth
roofline.

* CPU: wall time (``time.perf_counter``) of single calls, repeated until a per-measurement time
  budget is spent (at least ``MIN_REPS`` calls), after a warm-up, each call prepared as
  ``CACHE_STATES`` says. The implementations compared in one case are timed round-robin, call by
  call (``time_cpu_interleaved``): on a shared or virtualised CPU the speed drifts by whole factors
  within minutes, and interleaving gives every implementation the same drift, so their ratios hold.
* CUDA: ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed between calls), and
  ``torch.cuda.max_memory_allocated`` for peak memory.
* Both: the timed function cycles through enough copies of the inputs that together they exceed
  twice the last-level cache (L2 on a GPU), so a call does not find its inputs in cache just
  because the previous call read them. A measurement keeps every call's time; figures are their
  median (and 20th/80th percentiles).
"""

from __future__ import annotations

import glob
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._core import Inputs

MIN_REPS = 5
MAX_REPS = 100_000
# Upper bound on copies per case: tiny inputs would otherwise need thousands of copies.
MAX_COPIES = 4096
_FALLBACK_CACHE = 32 << 20


@dataclass
class Timing:
    """The time of every timed call of one measurement, in ms, in the order they were taken."""

    samples_ms: list[float]

    @property
    def reps(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p20_ms(self) -> float:
        return _quantile(sorted(self.samples_ms), 0.2)

    @property
    def p80_ms(self) -> float:
        return _quantile(sorted(self.samples_ms), 0.8)


def cache_bytes(device: str) -> int:
    """The last-level cache the rotation must defeat: L2 on a GPU, the largest CPU cache level
    (from sysfs; 32 MiB where it cannot be read)."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0)) or _FALLBACK_CACHE
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or _FALLBACK_CACHE


def rotation_copies(set_bytes: int, cache: int) -> int:
    """How many copies of a `set_bytes` input set together exceed twice `cache`."""
    if set_bytes <= 0:
        return 1
    return max(1, min(MAX_COPIES, 2 * cache // set_bytes + 1))


class Rotation:
    """Calls `fn` on the next input set each time; `clear()` drops the gradients the next call
    would otherwise accumulate into (the timers call it outside the timed region)."""

    def __init__(self, fn: Callable[..., torch.Tensor], sets: list[Inputs], backward: bool):
        self.fn = fn
        self.sets = sets
        self.backward = backward
        self.index = 0

    def clear(self) -> None:
        for t in self.sets[self.index].differentiable:
            t.grad = None

    def all_differentiable(self) -> list[torch.Tensor]:
        return [t for s in self.sets for t in s.differentiable]

    def __call__(self) -> None:
        args = self.sets[self.index].args
        self.index = self.index + 1 if self.index + 1 < len(self.sets) else 0
        loss = self.fn(*args)
        if self.backward:
            loss.backward()


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class CacheScrub:
    """Reads a buffer of twice the last-level cache, untimed: the CPU-side counterpart of
    do_bench's L2 flush. It writes back the dirty lines the previous call left (eager code leaves
    tens of MB of intermediates), which would otherwise be charged to whichever implementation
    runs next, and evicts every input."""

    def __init__(self) -> None:
        self.buffer = torch.ones(2 * cache_bytes("cpu") // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.sum()


# What a timed CPU call finds in the caches (`time_cpu_interleaved`'s `cache`):
# "steady" -- a scrub, then one untimed call of the same implementation on another input copy: the
#   state of a training loop, which runs the loss once per step. Its own code, Python objects and
#   allocator are warm, and the dirty lines in cache are its own previous call's; its inputs come
#   from DRAM. The CPU counterpart of do_bench, whose host-side code is warm and L2 flushed.
# "cold" -- the scrub alone: code and data both come from DRAM, which charges every call the
#   instruction and data misses of the Python interpreter, the dispatcher and autograd as well
#   (a few hundred microseconds on a 2-core VM, whatever the size of the loss).
CACHE_STATES = ("steady", "cold")


def time_cpu_interleaved(
    rots: list[Rotation], budget_ms: float, warmup_ms: float, cache: str = "steady"
) -> list[Timing]:
    """`time_cpu` for several implementations at once: one timed call of each in turn, until
    each has had `budget_ms` (at least MIN_REPS calls), each prepared as `cache` says (see
    CACHE_STATES). Consecutive calls, whichever implementation makes them, use consecutive input
    copies.
    """
    if cache not in CACHE_STATES:
        raise ValueError(f"cache must be one of {CACHE_STATES}, got {cache!r}")
    turn = 0
    scrub = CacheScrub()

    def call(rot: Rotation, timed: bool) -> float:
        nonlocal turn
        if timed:
            scrub()
            if cache == "steady":
                call(rot, False)
        rot.index = turn % len(rot.sets)
        turn += 1
        rot.clear()
        start = time.perf_counter()
        rot()
        return time.perf_counter() - start if timed else 0.0

    deadline = time.perf_counter() + warmup_ms / 1e3 * len(rots)
    rounds = 0
    while rounds < 3 or time.perf_counter() < deadline:
        for rot in rots:
            call(rot, False)
        rounds += 1
    times: list[list[float]] = [[] for _ in rots]
    # The budget counts the timed calls alone, not the scrubs and untimed calls between them.
    spent, budget = 0.0, budget_ms / 1e3 * len(rots)
    while len(times[0]) < MAX_REPS and (len(times[0]) < MIN_REPS or spent < budget):
        for rot, acc in zip(rots, times, strict=True):
            acc.append(call(rot, True))
            spent += acc[-1]
    return [Timing([t * 1e3 for t in acc]) for acc in times]


def time_cuda(rot: Rotation, rep_ms: float, warmup_ms: float) -> Timing:
    from triton.testing import do_bench

    times = do_bench(
        rot,
        warmup=warmup_ms,
        rep=rep_ms,
        grad_to_none=rot.all_differentiable() or None,
        return_mode="all",
    )
    return Timing([float(t) for t in times])


def time_rotations(
    rots: list[Rotation], device: str, rep_ms: float, warmup_ms: float, cpu_cache: str = "steady"
) -> list[Timing]:
    """Times each rotation's calls (every implementation of one case and mode, or just one) with
    this device's timer: do_bench one after the other on CUDA, round-robin on the CPU with
    `cpu_cache` (see CACHE_STATES). `rep_ms` is the time spent timing each rotation."""
    if device == "cuda":
        return [time_cuda(rot, rep_ms, warmup_ms) for rot in rots]
    return time_cpu_interleaved(rots, rep_ms, warmup_ms, cpu_cache)


def peak_cuda_bytes(rot: Rotation) -> int:
    """Memory one call allocates beyond what was allocated before it (its workspace, outputs and,
    in fwdbwd, the gradient), from ``torch.cuda.max_memory_allocated``."""
    rot.clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rot()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def copy_bandwidth(device: str, nbytes: int, budget_ms: float) -> dict:
    """GB/s of copying a large buffer, counting bytes read plus bytes written: the roofline a
    memory-bound loss is held to. The copy goes into a preallocated buffer: on the CPU a fresh
    ``clone`` would also time the page faults of first-touching new memory."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    if device == "cuda":
        from triton.testing import do_bench

        median = float(
            do_bench(lambda: dst.copy_(src), warmup=25, rep=budget_ms, return_mode="median")
        )
    else:
        # Caches scrubbed before each call, as for the losses; the buffers are far larger anyway.
        rot = Rotation(lambda: dst.copy_(src), [Inputs(())], backward=False)
        median = time_cpu_interleaved([rot], budget_ms, budget_ms / 4, "cold")[0].median_ms
    moved = 2 * nbytes
    return {"bytes": moved, "median_ms": median, "gbps": moved / (median * 1e-3) / 1e9}
