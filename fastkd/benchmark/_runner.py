"""Runs the selected cases of each loss and records one measurement per (case, mode, impl).

``Runner.measure`` is the one path from an implementation to a measurement, for
``python -m fastkd bench`` (through ``Runner.run``) and the pytest-benchmark suites in ``bench/``.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._core import TIMED_MODES, Case, Impl, Inputs, LossBench, Selection, Skip
from ._timing import (
    Rotation,
    Timing,
    cache_bytes,
    copy_bandwidth,
    peak_cuda_bytes,
    rotation_copies,
    time_rotations,
)

# Relative difference from the float32 reference above which a value is flagged: reduced-precision
# eager code (log_softmax and kl_div in bf16) is legitimately off by a few per cent.
VALUE_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}


@dataclass
class Settings:
    rep_ms: float  # CUDA: do_bench's `rep`; CPU: time budget of one measurement
    warmup_ms: float
    copy_bytes: int  # size of the buffer copied for the roofline
    budget_s: float | None = None  # wall-clock budget of the whole run; the rest is skipped
    cpu_cache: str = "steady"  # what a timed CPU call finds in cache: see _timing.CACHE_STATES

    @staticmethod
    def defaults(device: str, quick: bool) -> Settings:
        if device == "cuda":
            return Settings(20.0 if quick else 100.0, 5.0 if quick else 25.0, 512 << 20)
        return Settings(
            20.0 if quick else 400.0, 10.0 if quick else 100.0, 64 << 20 if quick else 256 << 20
        )


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Runner:
    """Times every case and calls `on_record` after each case (to save partial results)."""

    def __init__(self, sel: Selection, settings: Settings):
        self.sel = sel
        self.settings = settings
        self.run_index = 0
        self.on_record: Callable[[], None] = lambda: None
        self.log: Callable[[str], None] = _log
        self.measurements: list[dict] = []
        self.skipped: list[dict] = []
        self.copy: dict | None = None
        self.started = time.monotonic()
        self.cache = cache_bytes(sel.device)

    def measure_copy_bandwidth(self) -> dict:
        self.copy = copy_bandwidth(
            self.sel.device, self.settings.copy_bytes, max(self.settings.rep_ms, 50.0)
        )
        return self.copy

    def out_of_time(self) -> bool:
        budget = self.settings.budget_s
        return budget is not None and time.monotonic() - self.started > budget

    def run(self, benches: list[LossBench]) -> None:
        for bench in benches:
            for case in bench.cases(self.sel):
                self.run_case(bench, case)
                self.on_record()

    def _skip(self, case: Case, mode: str, impl: str, reason: str) -> None:
        self.skipped.append(
            {"case": case.key, "mode": mode, "impl": impl, "reason": reason, "run": self.run_index}
        )

    def run_case(self, bench: LossBench, case: Case) -> None:
        impls = bench.impls(case, self.sel)
        runnable = [i for i in impls if isinstance(i, Impl)]
        modes = [m for m in TIMED_MODES if m in self.sel.modes or "bwd" in self.sel.modes]
        for impl in impls:
            if isinstance(impl, Skip):
                for mode in modes:
                    self._skip(case, mode, impl.name, impl.reason)
        timed: dict[tuple[str, str], dict] = {}
        checked, expected = False, None
        for mode in modes:
            if self.out_of_time():
                for impl in runnable:
                    self._skip(case, mode, impl.name, "the run's time budget was spent")
                continue
            self.log(f"{case.key} {mode}")
            try:
                sets = self.input_sets(bench, case, mode)
            except Exception as e:
                for impl in runnable:
                    self._skip(case, mode, impl.name, f"inputs: {_reason(e)}")
                sets = None
            if sets is None:
                _free(collect=True)
                continue
            if not checked:
                # Every mode's inputs hold the same values (same seed): one reference per case.
                checked = True
                expected = self._reference(bench, case, sets[0])
            for m, _ in self.measure(bench, case, mode, runnable, sets, expected):
                timed[(mode, m["impl"])] = m
            del sets
            _free()
        if "bwd" in self.sel.modes:
            for impl in runnable:
                fwd, both = timed.get(("fwd", impl.name)), timed.get(("fwdbwd", impl.name))
                if fwd is not None and both is not None:
                    self.measurements.append(self._derived_bwd(bench, case, impl, fwd, both))

    def measure(
        self,
        bench: LossBench,
        case: Case,
        mode: str,
        impls: list[Impl],
        sets: list[Inputs],
        expected: float | None = None,
    ) -> list[tuple[dict, Timing]]:
        """Times `impls` of `case` in `mode` on the rotated input `sets` together and records each
        as a measurement (returned with its timing); an implementation that fails to run, or that
        the run's time budget leaves out, is recorded as skipped. `expected`: the reference value
        the implementations' values are checked against (None: not checked)."""
        if self.copy is None:
            self.measure_copy_bandwidth()
        ready = []
        for impl in impls:
            if self.out_of_time():
                self._skip(case, mode, impl.name, "the run's time budget was spent")
                continue
            prepared = self._prepare(case, mode, impl, sets)
            if prepared is not None:
                ready.append((impl, *prepared))
        if not ready:
            return []
        out = []
        with torch.set_grad_enabled(mode == "fwdbwd"):
            timings = time_rotations(
                [rot for _, rot, _ in ready],
                self.sel.device,
                self.settings.rep_ms,
                self.settings.warmup_ms,
                self.settings.cpu_cache,
            )
            for (impl, rot, value), timing in zip(ready, timings, strict=True):
                peak = peak_cuda_bytes(rot) if self.sel.device == "cuda" else None
                m = self._keep(bench, case, mode, impl, rot, value, expected, timing, peak)
                out.append((m, timing))
        return out

    def _reference(self, bench: LossBench, case: Case, inputs: Inputs) -> float | None:
        try:
            return bench.reference(case, inputs)
        except Exception as e:
            self.log(f"  reference failed ({_reason(e)}); values are not checked")
        # Outside the except block, where the exception no longer holds the failed call's tensors.
        _free(collect=True)
        return None

    def input_sets(self, bench: LossBench, case: Case, mode: str) -> list[Inputs]:
        """The case's inputs for `mode` and enough copies of them to exceed twice the cache."""
        base = bench.make_inputs(case, self.sel.device, mode == "fwdbwd", self.sel.seed)
        copies = rotation_copies(base.nbytes, self.cache)
        return [base] + [base.clone() for _ in range(copies - 1)]

    def _record(self, bench: LossBench, case: Case, mode: str, impl: Impl) -> dict:
        return {
            "loss": case.loss,
            "case": case.key,
            "shape": list(case.shape),
            "dtype": case.dtype,
            "variant": case.variant,
            "mode": mode,
            "impl": impl.name,
            "backend": impl.backend,
            "bytes": bench.min_bytes(case, mode),
            "run": self.run_index,
        }

    def _prepare(
        self, case: Case, mode: str, impl: Impl, sets: list[Inputs]
    ) -> tuple[Rotation, float] | None:
        """Builds `impl`, makes its first call (which compiles what needs compiling) and returns
        its input rotation and loss value, or None (recorded as skipped) if it fails."""
        backward = mode == "fwdbwd"
        try:
            fn = impl.build()
            rot = Rotation(fn, sets, backward)
            with torch.set_grad_enabled(backward):
                loss = fn(*sets[0].args)
                if backward:
                    loss.backward()
                value = float(loss.detach().float())
                del loss
        except Exception as e:
            self._skip(case, mode, impl.name, _reason(e))
            self.log(f"  {impl.name}: skipped ({_reason(e)})")
            value = None
        finally:
            for s in sets:
                for t in s.differentiable:
                    t.grad = None
        if value is None:
            # Outside the except block, where the exception no longer holds the failed call's
            # tensors.
            _free(collect=True)
            return None
        return rot, value

    def _keep(
        self,
        bench: LossBench,
        case: Case,
        mode: str,
        impl: Impl,
        rot: Rotation,
        value: float,
        expected: float | None,
        timing: Timing,
        peak: int | None,
    ) -> dict:
        for s in rot.sets:
            for t in s.differentiable:
                t.grad = None
        m = self._record(bench, case, mode, impl)
        gbps = m["bytes"] / (timing.median_ms * 1e-3) / 1e9
        rel = None if expected is None else abs(value - expected) / max(abs(expected), 1e-12)
        m.update(
            median_ms=timing.median_ms,
            p20_ms=timing.p20_ms,
            p80_ms=timing.p80_ms,
            reps=timing.reps,
            copies=len(rot.sets),
            gbps=gbps,
            copy_fraction=gbps / self.copy["gbps"],
            peak_mem_bytes=peak,
            value=value,
            rel_err=rel,
            derived=False,
        )
        if rel is not None and not rel <= VALUE_TOLERANCE.get(case.dtype, 1e-3):
            self.log(
                f"  {impl.name}: value {value:.6g} differs from the reference "
                f"{expected:.6g} by {rel:.2e}"
            )
        self.measurements.append(m)
        return m

    def _derived_bwd(self, bench: LossBench, case: Case, impl: Impl, fwd: dict, both: dict) -> dict:
        m = self._record(bench, case, "bwd", impl)
        median = both["median_ms"] - fwd["median_ms"]
        gbps = m["bytes"] / (median * 1e-3) / 1e9 if median > 0 else None
        m.update(
            median_ms=median,
            p20_ms=None,
            p80_ms=None,
            reps=None,
            copies=both["copies"],
            gbps=gbps,
            copy_fraction=None if gbps is None else gbps / self.copy["gbps"],
            peak_mem_bytes=None,
            value=None,
            rel_err=None,
            derived=True,
        )
        return m


def _reason(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first}"[:400]


def _free(collect: bool = False) -> None:
    """Returns cached device memory between cases. `collect` also breaks reference cycles, which
    a caught exception's traceback forms with the tensors of the failed call (a full collection
    costs a noticeable fraction of a second, so only then)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
