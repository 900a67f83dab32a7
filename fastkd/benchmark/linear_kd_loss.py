"""Benchmark cases of ``fastkd.linear_kd_loss``: KD through a language model's output head.

One case is ``N`` tokens of hidden size ``H`` (student and teacher alike) and ``C`` classes, shape
``NxHxC``; forward KL at ``T = 1`` (the on-policy LM setting), every label counted, the teacher a
``fastkd.LinearTeacher`` (its head fused too). Implementations, each called as
``fn(h, W, t_hidden, t_weight, labels)`` and differentiated w.r.t. ``h`` and ``W``:

* ``fastkd``         -- ``fastkd.linear_kd_loss`` (chunk_size=None).
* ``fastkd-unfused`` -- ``fastkd.kd_loss(h @ W.T, t_hidden @ t_weight.T)``: the fused loss kernel
  on materialised logits.
* ``eager``          -- PyTorch as KD code is usually written: both logits materialised, the
  softmaxes in float32 (``F.kl_div`` of two ``log_softmax`` with ``log_target=True``, times
  ``T^2``).
* ``compile``        -- ``torch.compile`` of ``eager``.
* ``liger`` / ``liger-compiled`` -- Liger-Kernel's ``LigerFusedLinearJSDLoss`` in its forward-KL
  setting (``beta=0``: ``KL(teacher || student)``), hard loss off (``weight_hard_loss=0``,
  ``weight_soft_loss=1``), its default chunk of 1024 rows, ``compiled=False`` / ``True``. It
  omits the ``T^2`` factor: its loss is multiplied by ``T^2`` (1 here) to compare.

Two ways to run them:

* ``python -m fastkd bench --loss linear_kd_loss`` times them in-process with the rest of the
  suite (``BENCH`` below; peers ``eager``, ``compile`` and ``liger``, the last being Liger's
  default ``compiled=True``); on CUDA it also reports the peak memory of a call.
* ``python -m fastkd bench-head`` (``main`` below) measures the peak extra resident memory of
  one forward+backward call of every (dtype, implementation) in a fresh Python process
  (``_child``), then times them all in one more fresh process per dtype, interleaved call by
  call (``_timing_child``; the median of ``--rounds`` calls each): a machine whose speed drifts
  then slows them alike. This is the table in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastkd

from ._core import Case, Impl, Inputs, LossBench, Selection, Skip, constant, fastkd_impls

TEMPERATURE = 1.0
IMPLS = ("fastkd", "fastkd-unfused", "eager", "compile", "liger", "liger-compiled")
DEFAULT_IMPLS = ("fastkd", "fastkd-unfused", "eager", "liger", "liger-compiled")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_head_inputs(
    rows: int, hidden: int, classes: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """``h [N, H]`` and ``W [C, H]`` (requiring grad), ``t_hidden [N, H]``, ``t_weight [C, H]``
    and int64 labels ``[N]``; logits of about unit scale."""
    g = torch.Generator().manual_seed(seed)
    scale = hidden**-0.5

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    h = randn(rows, hidden).requires_grad_()
    w = randn(classes, hidden, s=scale).requires_grad_()
    th = randn(rows, hidden)
    tw = randn(classes, hidden, s=scale)
    y = torch.randint(0, classes, (rows,), generator=g)
    return h, w, th, tw, y


def fastkd_fn(backend: str = "auto", chunk_size: int | None = None):
    def fn(h, w, th, tw, y):
        return fastkd.linear_kd_loss(
            h, w, fastkd.LinearTeacher(th, tw), y, temperature=TEMPERATURE,
            chunk_size=chunk_size, backend=backend,
        )

    return fn


def unfused(h, w, th, tw, y):
    with torch.no_grad():
        t = th @ tw.T
    return fastkd.kd_loss(h @ w.T, t, y, temperature=TEMPERATURE)


def eager(h, w, th, tw, y):
    T = TEMPERATURE
    with torch.no_grad():
        t = th @ tw.T
    s = h @ w.T
    loss = F.kl_div(
        F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1),
        reduction="batchmean", log_target=True,
    )
    return loss * T * T


def liger_fn(compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    crit = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=TEMPERATURE,
        compiled=compiled,
    )

    def fn(h, w, th, tw, y):
        return crit(h, w, th, tw, y) * (TEMPERATURE * TEMPERATURE)

    return fn


def liger_reason() -> str | None:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception as e:  # not installed, or failing to import
        return f"Liger-Kernel is unavailable ({type(e).__name__}: {e})"
    return None


def impl_fn(name: str):
    if name == "fastkd":
        chunk = os.environ.get("FASTKD_BENCH_CHUNK_SIZE")
        return fastkd_fn(chunk_size=int(chunk) if chunk else None)
    if name == "fastkd-unfused":
        return unfused
    if name == "eager":
        return eager
    if name == "compile":
        return torch.compile(eager, dynamic=False)
    if name in ("liger", "liger-compiled"):
        return liger_fn(name == "liger-compiled")
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")


# --- the in-process harness (python -m fastkd bench --loss linear_kd_loss) ---------------------


class LinearKDLossBench(LossBench):
    name = "linear_kd_loss"
    variants = {"kl": "forward KL at T=1 through the output head, teacher as LinearTeacher"}
    default_variants = ("kl",)
    shapes = ((4096, 1024, 32000),)
    quick_shapes = ((256, 64, 1000),)

    def cases(self, sel: Selection) -> list[Case]:
        shapes = sel.shapes or (self.quick_shapes if sel.quick else self.shapes)
        for shape in shapes:
            if len(shape) != 3:
                raise ValueError(
                    f"{self.name}: shapes are NxHxC (tokens, hidden size, classes), got "
                    f"{'x'.join(map(str, shape))}"
                )
        return super().cases(sel)

    def make_inputs(self, case: Case, device: str, requires_grad: bool, seed: int) -> Inputs:
        h, w, th, tw, y = make_head_inputs(*case.shape, case.torch_dtype, seed)
        h, w, th, tw, y = (x.to(device) for x in (h, w, th, tw, y))
        h.requires_grad_(requires_grad)
        w.requires_grad_(requires_grad)
        return Inputs((h, w, th, tw, y), (h, w) if requires_grad else ())

    def impls(self, case: Case, sel: Selection) -> list[Impl | Skip]:
        from fastkd.functional.kd_loss import _choose_backend

        stub = torch.empty((0, case.shape[2]), dtype=case.torch_dtype, device=sel.device)
        out = fastkd_impls(sel, lambda b: _choose_backend(stub, [stub], b), fastkd_fn)
        for peer in sel.peers:
            if peer == "eager":
                out.append(Impl("eager", constant(eager)))
            elif peer in ("compile", "compile-max-autotune"):
                mode = None if peer == "compile" else "max-autotune-no-cudagraphs"

                def build(mode=mode):
                    torch._dynamo.reset()
                    return torch.compile(eager, mode=mode, dynamic=False)

                out.append(Impl(peer, build))
            elif peer == "liger":
                reason = liger_reason()
                out.append(
                    Skip("liger", reason) if reason else Impl("liger", lambda: liger_fn(True))
                )
        return out

    def min_bytes(self, case: Case, mode: str) -> int:
        n, hdim, c = case.shape
        e = torch.empty((), dtype=case.torch_dtype).element_size()
        reads = (2 * n * hdim + 2 * c * hdim) * e + 8 * n
        writes = (n * hdim + c * hdim) * e
        return {"fwd": reads, "fwdbwd": reads + writes, "bwd": writes}[mode]

    def reference(self, case: Case, inputs: Inputs) -> float | None:
        # A float32 recomputation costs as much as the case itself; the fresh-process benchmark
        # (``main``) compares every implementation's loss with fastkd's instead.
        return None


BENCH = LinearKDLossBench()


# --- one fresh process per (dtype, implementation): time and peak memory ---------------------

# Memory is measured with glibc's mmap threshold fixed at 64 KiB (freed buffers go back to the
# system at once, for every implementation alike) and fastkd's CPU block cache off, so that the
# resident set before a call holds only what is live.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "FASTKD_CPU_CACHE_MB": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Resets the process's resident high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(spec: dict) -> dict:
    """Memory of one implementation, in this (fresh) process: builds the inputs, then measures

    * ``first_peak_extra``: the resident high-water mark during the first forward+backward call
      minus the resident set before it (includes one-time costs: kernel JIT, torch.compile),
    * ``peak_extra``: the same for the second call, the high-water mark reset before it (the
      steady-state cost of a training step).
    """
    torch.set_num_threads(spec["threads"])
    h, w, th, tw, y = make_head_inputs(*spec["shape"], DTYPES[spec["dtype"]], spec["seed"])
    fn = impl_fn(spec["impl"])
    first_time, first_peak, value = _step(fn, h, w, th, tw, y, memory=True)
    second_time, peak, _ = _step(fn, h, w, th, tw, y, memory=True)
    return {
        "value": value,
        "first_time_s": first_time,
        "second_time_s": second_time,
        "first_peak_extra_bytes": first_peak,
        "peak_extra_bytes": peak,
    }


def _step(fn, h, w, th, tw, y, memory: bool = False) -> tuple[float, int, float]:
    """One forward+backward call (gradients cleared first, untimed): its time, its peak extra
    resident bytes (with `memory`; else 0) and the loss."""
    import gc

    h.grad = None
    w.grad = None
    rss = 0
    if memory:
        gc.collect()
        rss = _status_kib("VmRSS")
        if not _reset_peak():
            raise RuntimeError("cannot reset the resident high-water mark (/proc/self/clear_refs)")
    t0 = time.perf_counter()
    loss = fn(h, w, th, tw, y)
    loss.backward()
    elapsed = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - rss) * 1024 if memory else 0
    return elapsed, peak, float(loss)


def _timing_child(spec: dict) -> dict:
    """Times of every implementation in this one process, interleaved: one untimed call of each
    (compiles, first-touch), then ``rounds`` rounds of one timed forward+backward call of each,
    every other round in reverse order, so that a machine whose speed drifts affects them alike."""
    torch.set_num_threads(spec["threads"])
    h, w, th, tw, y = make_head_inputs(*spec["shape"], DTYPES[spec["dtype"]], spec["seed"])
    fns = {impl: impl_fn(impl) for impl in spec["impls"]}
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    values = {impl: _step(fn, h, w, th, tw, y)[2] for impl, fn in fns.items()}
    norms = {impl: [float(h.grad.float().norm()), float(w.grad.float().norm())] for impl in fns}
    order = list(fns)
    for round_ in range(spec["rounds"]):
        for impl in order if round_ % 2 == 0 else order[::-1]:
            times[impl].append(_step(fns[impl], h, w, th, tw, y)[0])
    return {"times_s": times, "values": values, "grad_norms_last": norms}


def _run_child(spec: dict, timeout: float, timing: bool = False) -> dict:
    env = dict(os.environ, **CHILD_ENV)
    flag = "--timing-child" if timing else "--child"
    cmd = [sys.executable, "-m", "fastkd.benchmark.linear_kd_loss", flag, json.dumps(spec)]
    try:
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {out.returncode}: {' | '.join(tail)}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f}"


def markdown_table(results: list[dict]) -> str:
    """One row per (dtype, implementation): median time, speedup of fastkd over it, peak extra
    memory (steady and first call) and its ratio to eager's, the loss's relative difference from
    fastkd's."""
    lines = [
        "| dtype | implementation | fwd+bwd median (s) | fastkd speedup | peak extra (MiB) "
        "| vs eager | first call peak (MiB) | loss rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        rows = [r for r in results if r["dtype"] == dtype]
        by = {r["impl"]: r for r in rows if "error" not in r}
        ours, base = by.get("fastkd"), by.get("eager")
        for r in rows:
            if "error" in r:
                lines.append(f"| {dtype} | {r['impl']} | {r['error']} | | | | | |")
                continue
            speed = (
                f"{r['median_s'] / ours['median_s']:.2f}x" if ours and ours["median_s"] else ""
            )
            ratio = (
                f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.2f}"
                if base and base["peak_extra_bytes"] else ""
            )
            diff = (
                f"{abs(r['value'] - ours['value']) / abs(ours['value']):.1e}"
                if ours and ours["value"] else ""
            )
            lines.append(
                f"| {dtype} | {r['impl']} | {r['median_s']:.2f} | {speed} | "
                f"{_mib(r['peak_extra_bytes'])} | {ratio} | {_mib(r['first_peak_extra_bytes'])} "
                f"| {diff} |"
            )
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-head",
        help="time and peak memory of linear_kd_loss (fused LM head) against eager and "
        "Liger-Kernel, one fresh process per case",
        description="Time and peak memory of fastkd.linear_kd_loss against materialised logits "
        "(fastkd kd_loss, PyTorch eager) and Liger-Kernel's LigerFusedLinearJSDLoss (forward-KL "
        "setting), each (dtype, implementation) in a fresh Python process on the CPU.",
    )
    _add_arguments(p)
    p.set_defaults(func=_run_main, parser=p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="4096x1024x32000", help="NxHxC (default 4096x1024x32000)")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(DEFAULT_IMPLS))
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed calls of each implementation, interleaved in one process (default 3)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        help="fastkd's chunk_size (default: None, its own rule)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    p.add_argument("--json", metavar="PATH", help="write the results (and environment) here")
    p.add_argument("--markdown", metavar="PATH", help="write the Markdown table here")


def _run_main(args: argparse.Namespace) -> int:
    from ._report import environment
    from ._timing import cache_bytes

    shape = [int(s) for s in args.shape.lower().split("x")]
    if len(shape) != 3 or min(shape) < 1:
        args.parser.error(f"--shape must be NxHxC, got {args.shape!r}")
    impls = list(args.impl)
    if args.chunk_size is not None:
        if args.chunk_size < 1:
            args.parser.error("--chunk-size must be >= 1")
        os.environ["FASTKD_BENCH_CHUNK_SIZE"] = str(args.chunk_size)
    if args.rounds < 1:
        args.parser.error("--rounds must be >= 1")
    reason = liger_reason()
    if reason:
        skipped = [i for i in impls if i.startswith("liger")]
        impls = [i for i in impls if not i.startswith("liger")]
    results = []
    for dtype in args.dtype:
        base = {"dtype": dtype, "shape": shape, "threads": args.threads, "seed": args.seed}
        memory = {}
        for impl in impls:
            r = _run_child(dict(base, impl=impl), args.timeout)
            memory[impl] = r
            msg = r.get("error") or (
                f"peak extra {_mib(r['peak_extra_bytes'])} MiB (first call "
                f"{_mib(r['first_peak_extra_bytes'])} MiB), loss {r['value']:.6g}"
            )
            print(f"{dtype} {impl} memory: {msg}", file=sys.stderr, flush=True)
        timing = _run_child(dict(base, impls=impls, rounds=args.rounds), args.timeout, True)
        if "error" in timing:
            print(f"{dtype} timing: {timing['error']}", file=sys.stderr, flush=True)
        for impl in impls:
            r = {"impl": impl, "dtype": dtype, "memory_run": memory[impl]}
            if "error" in memory[impl] or "error" in timing:
                r["error"] = memory[impl].get("error") or timing["error"]
            else:
                times = timing["times_s"][impl]
                r.update(
                    value=timing["values"][impl],
                    times_s=times,
                    median_s=statistics.median(times),
                    peak_extra_bytes=memory[impl]["peak_extra_bytes"],
                    first_peak_extra_bytes=memory[impl]["first_peak_extra_bytes"],
                )
                print(f"{dtype} {impl}: median {r['median_s']:.2f} s of "
                      f"{', '.join(f'{t:.2f}' for t in times)}", file=sys.stderr, flush=True)
            results.append(r)
        if reason:
            results += [{"impl": i, "dtype": dtype, "error": reason} for i in skipped]
        if args.json:
            _save(args, shape, results, environment("cpu", cache_bytes("cpu")))
    table = markdown_table(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0 if all("error" not in r for r in results) else 1


def _save(args, shape, results, env) -> None:
    Path(args.json).write_text(json.dumps({
        "command": "python -m fastkd bench-head " + " ".join(sys.argv[2:]),
        "shape": {"N": shape[0], "H": shape[1], "C": shape[2]},
        "temperature": TEMPERATURE,
        "threads": args.threads,
        "rounds": args.rounds,
        "fastkd_chunk_size": args.chunk_size,
        "peak_memory": "per (dtype, implementation) a fresh process (glibc "
        "MALLOC_MMAP_THRESHOLD_=65536, FASTKD_CPU_CACHE_MB=0); peak extra = VmHWM during one "
        "forward+backward call (reset through /proc/self/clear_refs before it) minus VmRSS before "
        "it; the second call is reported, the first (one-time costs included) beside it",
        "timer": "time.perf_counter around forward+backward; per dtype one fresh process runs "
        "every implementation: one untimed call each, then `rounds` rounds of one timed call "
        "each, interleaved, every other round in reverse order; median per implementation",
        "environment": env,
        "results": results,
    }, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--timing-child"]:
        print(json.dumps(_timing_child(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(prog="python -m fastkd bench-head")
    _add_arguments(p)
    args = p.parse_args(argv)
    args.parser = p
    return _run_main(args)


if __name__ == "__main__":
    sys.exit(main())
