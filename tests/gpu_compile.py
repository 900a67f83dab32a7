"""Compile, never launch, every Triton kernel that fastkd's launchers produce, for GPU targets, on a
machine without a GPU; collect ptxas's resource report of each.

Run as a script (``python tests/gpu_compile.py --arch 90 --out DIR``) in a fresh interpreter
without ``TRITON_INTERPRET``: under the interpreter ``@triton.jit`` yields interpreted functions,
which cannot be compiled, and tests/conftest.py sets it before fastkd is imported.
tests/test_triton_gpu_compile.py does that and checks the results.

Mechanism (Triton 3.6 and 3.8 alike):

1. The real launchers (the ``triton_op`` functions in kernels/*.py) run on CPU tensors of the
   dtypes, shapes and strides of each case, with each module's ``wrap_triton`` replaced by a
   recorder, so every launch is captured as ``(kernel, grid, args, kwargs)`` exactly as the
   launcher built it (constexprs, ``num_warps``, tensors).
2. ``triton.runtime.driver.set_active`` installs a stand-in driver that reports
   ``GPUTarget("cuda", arch, 32)`` as the current target (device and stream are plain numbers;
   nothing is loaded or launched). ``JITFunction.warmup(*args, grid=...)`` then compiles through
   Triton's own launch path: the binder specialises the arguments as a real call does (pointer
   and integer divisibility by 16, integers equal to 1 as constants), the constexprs are bound,
   and the kernel cache keyed on that specialisation compiles each distinct kernel once per
   target. ``warmup`` stops before the launch; the stand-in driver is only asked for the target.
3. ``triton.knobs.nvidia.dump_ptxas_log`` makes Triton print the ``ptxas -v`` log of the very
   ptxas run that produced the kernel's cubin (same flags); it is captured per compile and parsed
   for registers, spill stores/loads, stack frame and static shared memory. Triton's own
   (dynamic) shared memory comes from the kernel's metadata. ``knobs.compilation.always_compile``
   makes every kernel go through ptxas (an on-disk cache hit would not).

Output: ``results.json`` (one record per distinct kernel and target; an ``error`` record for a
launch that failed to compile) and each kernel's PTX, under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------
# Launch capture


@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict
    case: str = ""


@dataclass
class _Recorder:
    """Stands in for ``torch.library.wrap_triton``: ``wrap_triton(k)[grid](*args, **kw)``."""

    launches: list = field(default_factory=list)

    def __call__(self, kernel):
        def index(grid):
            def launch(*args, **kwargs):
                self.launches.append(Launch(kernel, tuple(grid), args, kwargs))

            return launch

        return _Indexable(index)


class _Indexable:
    def __init__(self, index):
        self._index = index

    def __getitem__(self, grid):
        return self._index(grid)


KERNEL_MODULES = ("kd_loss", "feature_regression", "channel_attention", "scale_grad", "scale_grads")


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside, the launchers' ``wrap_triton`` records launches instead of running them."""
    import importlib

    modules = [importlib.import_module(f"fastkd.kernels.{m}") for m in KERNEL_MODULES]
    recorder = _Recorder()
    saved = [m.wrap_triton for m in modules]
    for m in modules:
        m.wrap_triton = recorder
    try:
        yield recorder.launches
    finally:
        for m, w in zip(modules, saved, strict=True):
            m.wrap_triton = w


# --------------------------------------------------------------------------------------------
# Cases: calls of the real launchers


def _cases() -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) for every configuration whose kernel must compile."""
    import torch
    from fastkd.kernels import channel_attention as ca
    from fastkd.kernels import feature_regression as fr
    from fastkd.kernels import kd_loss as kd
    from fastkd.kernels import scale_grad as sg
    from fastkd.kernels import scale_grads as sgs

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    dtypes = (f32, bf16, f16)
    short = {f32: "f32", bf16: "bf16", f16: "f16"}

    # ---- KD: BLOCK_C = next_pow2(C) clamped to [16, 4096]; C picks every block size, C == 1,
    # C not a multiple of 16, multi-chunk rows and the largest vocabulary.
    def kd_call(c, *, rows=4, inner=1, sdt=f32, tdts=(f32,), labels=False, kd_rw=False,
                ce=0.0, ce_rw=False, t=2.0, smooth=0.0, grad=True, offset=False, sparse=(),
                div=0):
        outer = rows // inner
        s = torch.zeros(outer, inner, c + (1 if offset else 0), dtype=sdt)
        if offset:  # a slice one element in: pointer and row stride off 16-byte alignment
            s = s[..., 1:]
        ts = [torch.zeros(outer, inner, c, dtype=d) for d in tdts]
        # Sparse teachers (after the dense ones), one k per teacher: ids [rows, k] int32 (in
        # range: the launcher checks CPU tensors), values [rows, k] and tails [rows] float32.
        ids = [torch.zeros(rows, k, dtype=torch.int32) for k in sparse]
        values = [torch.zeros(rows, k) for k in sparse]
        tails = [torch.zeros(rows) for _ in sparse]
        n = len(ts) + len(sparse)
        y = torch.zeros(rows, dtype=torch.int64) if (labels or ce) else None
        rw = torch.ones(rows).expand(n, rows) if kd_rw else None
        crw = torch.ones(rows) if ce_rw else None
        return kd.kd_loss_fwd_triton(s, ts, y, rw, crw, [1.0] * n, ce, t, smooth, -100,
                                     False, grad, ids, values, tails, div, 0.5)

    # The op's trailing arguments: the sparse teachers' ids, values and tails, the divergence.
    schema = [a.name for a in kd.kd_loss_fwd_triton._opoverload._schema.arguments]
    assert schema[12:] == ["sparse_ids", "sparse_values", "sparse_tails", "divergence", "beta"], (
        f"unexpected kd_loss_fwd_triton schema {schema}"
    )

    def kd_case(label, c, **kw):
        return (f"kd {label} C={c}", lambda: kd_call(c, **kw))

    full = dict(tdts=(f32, f32, f32), kd_rw=True, ce=0.5, ce_rw=True, smooth=0.1)
    # Every chunk width (16 .. 4096), C == 1, C not a multiple of 16, multi-chunk rows, the
    # largest vocabulary; each with the lightest and the heaviest option sets.
    for c in (1, 17, 33, 100, 250, 500, 1000, 2000, 4096, 50257, 262144):
        yield kd_case("1 teacher", c)
        yield kd_case("1 teacher, no grad, T=1", c, grad=False, t=1.0)
        yield kd_case("8 teachers, CE, smoothing, row weights", c, sdt=bf16,
                      **dict(full, tdts=(bf16,) * 8))
    yield kd_case("3 teachers, CE", 1000, tdts=(f32, f32, f32), ce=0.5)
    # Teacher counts; dtypes of student and teachers; each option off from the full set.
    for c in (1000, 32000):
        for k in range(1, 9):
            yield kd_case(f"{k} teachers, CE, row weights", c, sdt=bf16, tdts=(bf16,) * k, ce=0.5,
                          ce_rw=True, kd_rw=True)
        for opt, change in (("kd row weights", dict(kd_rw=False)),
                            ("CE", dict(ce=0.0, ce_rw=False, smooth=0.0)),
                            ("CE row weights", dict(ce_rw=False)), ("T != 1", dict(t=1.0)),
                            ("smoothing", dict(smooth=0.0)), ("grad", dict(grad=False))):
            yield kd_case(f"3 teachers, CE, smoothing, row weights, without {opt}", c,
                          **dict(full, **change))
        yield kd_case("mixed teacher dtypes", c, sdt=f16, tdts=(f32, bf16, f16), ce=0.5)
    for sdt in dtypes:
        for tdt in dtypes:
            yield kd_case(f"{short[sdt]} student, {short[tdt]} teachers", 1000, sdt=sdt,
                          tdts=(tdt, tdt))
            yield kd_case(f"{short[sdt]} student, {short[tdt]} teacher, no grad", 32000, sdt=sdt,
                          tdts=(tdt,), grad=False)
    for c in (1000, 32000):
        yield kd_case("inner > 1", c, rows=6, inner=3, **full)
        yield kd_case("unaligned student", c, offset=True, **full)

    # ---- KD with sparse teachers (NUM_S > 0): BLOCK_K = next_pow2(max k) clamped to [16, 1024].
    # Sparse counts 1..8 alone and after the most dense teachers that fit; every BLOCK_K, k == 1,
    # k == C, k wider than one chunk; every chunk width; each option off from the full set.
    def sp_case(label, c, ks, **kw):
        return kd_case(f"{label}, sparse k={list(ks)}", c, sparse=tuple(ks), **kw)

    heavy = dict(sdt=bf16, kd_rw=True, ce=0.5, ce_rw=True, smooth=0.1)
    for c in (1000, 32000):
        for ns in range(1, 9):
            ks = [(7, 64, 300, 5, 1, 100, 40, 1000)[i] for i in range(ns)]
            yield sp_case("no dense teacher", c, ks, tdts=())
            yield sp_case(f"{8 - ns} dense teachers, CE, smoothing, row weights", c, ks,
                          **dict(heavy, tdts=(bf16,) * (8 - ns)))
            yield sp_case("no dense teacher, CE, smoothing, row weights, no grad", c, ks,
                          **dict(heavy, tdts=(), grad=False))
    for k in (1, 16, 17, 64, 100, 256, 500, 1000, 1024, 3000, 4096):
        yield sp_case("1 dense teacher", 4096, [k])
        yield sp_case("no dense teacher, CE, smoothing, row weights", 4096, [k, 5],
                      **dict(heavy, tdts=()))
    for c in (1, 17, 33, 100, 250, 500, 2000, 4096, 50257, 262144):
        yield sp_case("no dense teacher, T=1, no grad", c, [min(c, 10)], tdts=(), t=1.0,
                      grad=False)
        yield sp_case("k == C", c, [c], tdts=(), t=1.0) if c <= 4096 else sp_case(
            "k = 4096", c, [4096], tdts=())
        yield sp_case("3 dense teachers, CE, smoothing, row weights", c, [min(c, 64), 1],
                      **dict(heavy, tdts=(bf16,) * 3))
    for opt, change in (("kd row weights", dict(kd_rw=False)),
                        ("CE", dict(ce=0.0, ce_rw=False, smooth=0.0)),
                        ("CE row weights", dict(ce_rw=False)), ("T != 1", dict(t=1.0)),
                        ("smoothing", dict(smooth=0.0)), ("grad", dict(grad=False))):
        yield sp_case(f"2 dense teachers, CE, smoothing, row weights, without {opt}", 32000,
                      [64, 8], **dict(heavy, tdts=(f32, f16), **change))
    for sdt in dtypes:
        yield sp_case(f"{short[sdt]} student", 1000, [20], sdt=sdt, tdts=())
    yield sp_case("inner > 1", 1000, [20, 3], rows=6, inner=3, **dict(heavy, tdts=(bf16,)))
    yield sp_case("unaligned student", 1000, [20], offset=True, **dict(heavy, tdts=(f32,)))

    # ---- KD with the other divergences (DIVERGENCE 1: reverse KL, 2: JSD; 0 above is forward
    # KL): their own sweeps and terms, so the same coverage in brief. Every chunk width with the
    # lightest and the heaviest option sets; teacher counts, dense and sparse; each option off;
    # chunked k; dtypes; layouts.
    for div in (1, 2):
        name = ("reverse KL", "JSD")[div - 1]
        for c in (1, 17, 33, 100, 250, 500, 1000, 2000, 4096, 50257):
            yield kd_case(f"{name}, 1 teacher", c, div=div)
            yield kd_case(f"{name}, 8 teachers, CE, smoothing, row weights", c, sdt=bf16, div=div,
                          **dict(full, tdts=(bf16,) * 8))
        yield kd_case(f"{name}, 1 teacher, no grad, T=1", 1000, grad=False, t=1.0, div=div)
        for c in (1000, 32000):
            for ns in (1, 2, 4, 8):
                ks = [(7, 64, 300, 5, 1, 100, 40, 1000)[i] for i in range(ns)]
                yield sp_case(f"{name}, no dense teacher", c, ks, tdts=(), div=div)
                yield sp_case(f"{name}, {8 - ns} dense teachers, CE, smoothing, row weights", c,
                              ks, div=div, **dict(heavy, tdts=(bf16,) * (8 - ns)))
            for opt, change in (("kd row weights", dict(kd_rw=False)),
                                ("CE", dict(ce=0.0, ce_rw=False, smooth=0.0)),
                                ("T != 1", dict(t=1.0)), ("grad", dict(grad=False))):
                yield sp_case(f"{name}, 2 dense teachers, CE, smoothing, row weights, without "
                              f"{opt}", c, [64, 8], div=div,
                              **dict(heavy, tdts=(f32, f16), **change))
        for k in (1, 100, 1024, 3000):
            yield sp_case(f"{name}, 1 dense teacher", 4096, [k], div=div)
        yield sp_case(f"{name}, k == C", 100, [100], tdts=(), t=1.0, div=div)
        for sdt in dtypes:
            yield kd_case(f"{name}, {short[sdt]} student and teachers", 1000, sdt=sdt,
                          tdts=(sdt, sdt), div=div)
        yield kd_case(f"{name}, inner > 1", 1000, rows=6, inner=3, div=div, **full)
        yield sp_case(f"{name}, unaligned student", 1000, [20], offset=True, div=div,
                      **dict(heavy, tdts=(f32,)))

    # ---- Feature regression: BLOCK = next_pow2(n) clamped to [16, 2048] (plain, n = numel) or
    # [16, 4096] (normalize, n = sample length); p, normalize, dtypes, layouts, pair counts,
    # gradient masks.
    def fr_call(shapes, *, sdt=f32, tdt=f32, p=2, norm=False, grads=None, cl=False):
        def make(shape, dt):
            x = torch.zeros(shape, dtype=dt)
            return x.contiguous(memory_format=torch.channels_last) if cl and x.dim() == 4 else x

        ss = [make(sh, sdt) for sh in shapes]
        ts = [make(sh, tdt) for sh in shapes]
        grads = [True] * len(shapes) if grads is None else grads
        return fr.feature_regression_fwd_triton(ss, ts, [1.0] * len(ss), p, norm, True, grads)

    def fr_case(label, shapes, **kw):
        return (f"feature_regression {label} {shapes}", lambda: fr_call(shapes, **kw))

    # Student x teacher dtype, p and normalize, NCHW and channels_last.
    for sdt in dtypes:
        for tdt in dtypes:
            for norm in (False, True):
                for p in (1, 2) if sdt == tdt else (2,):
                    for cl in (False, True):
                        name = f"{short[sdt]}/{short[tdt]} p={p} normalize={norm} cl={cl}"
                        yield fr_case(name, [(2, 8, 5, 5)], sdt=sdt, tdt=tdt, p=p, norm=norm,
                                      cl=cl)
    # Every block size (16 .. 2048 plain, 16 .. 4096 normalized), with and without gradient.
    for d in (1, 17, 33, 100, 250, 500, 1000, 2000, 4000, 50000, 262144):
        for norm in (False, True):
            yield fr_case(f"D={d} p=2 normalize={norm}", [(1, d)], sdt=bf16, norm=norm)
            yield fr_case(f"D={d} p=1 normalize={norm} no grad", [(1, d)], p=1, norm=norm,
                          grads=[False])
    # Pair counts; gradients for some pairs only.
    for k in range(1, 9):
        shapes = [(2, 64 * (i + 1), 3, 3) for i in range(k)]
        for norm in (False, True):
            yield fr_case(f"{k} pairs normalize={norm}", shapes, sdt=f16, tdt=bf16, norm=norm)
            if k in (2, 5, 8):
                mixed = [i % 2 == 0 for i in range(k)]
                yield fr_case(f"{k} pairs normalize={norm} grads={mixed}", shapes, p=1,
                              norm=norm, grads=mixed)

    # ---- Channel attention: pair counts, dtypes, NCHW / channels_last / cropped maps, C or
    # H*W of 1; the backward per layout and gradient dtype.
    def ca_map(shape, dt, fmt):
        b, c, h, w = shape
        if fmt == "cl":
            return torch.zeros(shape, dtype=dt).contiguous(memory_format=torch.channels_last)
        if fmt == "crop":
            return torch.zeros(b, c, h + 2, w + 3, dtype=dt)[:, :, 1 : h + 1, 2 : w + 2]
        if fmt == "cslice":
            return torch.zeros(b, c + 1, h, w, dtype=dt)[:, 1:]
        return torch.zeros(shape, dtype=dt)

    def ca_call(shapes, *, sdt=f32, tdt=f32, sfmt="nchw", tfmt="nchw"):
        ss = [ca_map(sh, sdt, sfmt) for sh in shapes]
        ts = [ca_map(sh, tdt, tfmt) for sh in shapes]
        _, diff = ca.channel_attention_fwd_triton(ss, ts, [1.0] * len(ss), True)
        sizes = [v for sh in shapes for v in sh]
        diffs = list(torch.zeros(diff.numel()).split([sh[0] * sh[1] for sh in shapes]))
        diffs = [d.view(sh[0], sh[1]) for d, sh in zip(diffs, shapes, strict=True)]
        return ca.channel_attention_bwd_triton(diffs, torch.tensor(1.0), sizes,
                                               [sfmt == "cl"] * len(shapes), sdt)

    def ca_case(label, shapes, **kw):
        return (f"channel_attention {label} {shapes}", lambda: ca_call(shapes, **kw))

    for sdt in dtypes:
        for tdt in dtypes:
            yield ca_case(f"{short[sdt]}/{short[tdt]}", [(2, 40, 7, 7)], sdt=sdt, tdt=tdt)
    for sfmt in ("nchw", "cl", "crop", "cslice"):
        for tfmt in ("nchw", "cl"):
            yield ca_case(f"{sfmt}/{tfmt}", [(2, 40, 7, 7)], sdt=bf16, sfmt=sfmt, tfmt=tfmt)
    for shape in ((2, 1, 7, 7), (2, 40, 1, 1), (1, 64, 8, 8)):
        for fmt in ("nchw", "cl"):
            yield ca_case(f"{fmt}", [shape], sfmt=fmt, tfmt=fmt)
    for k in range(1, 5):
        shapes = [(2, 32 * (i + 1), 16 // (i + 1), 16 // (i + 1)) for i in range(k)]
        for fmt in ("nchw", "cl"):
            yield ca_case(f"{k} pairs {fmt}", shapes, sdt=f16, tdt=f32, sfmt=fmt, tfmt=fmt)

    # ---- Backward scaling (one gradient; several gradients in one launch).
    for dt in dtypes:
        for shape in ((5, 1000), (4, 1024), (3,)):
            yield (f"scale_grad {short[dt]} {shape} scalar",
                   lambda dt=dt, shape=shape: sg.scale_grad_triton_(
                       torch.zeros(shape, dtype=dt), torch.tensor(2.0)))
            yield (f"scale_grad {short[dt]} {shape} per row",
                   lambda dt=dt, shape=shape: sg.scale_grad_triton_(
                       torch.zeros(shape, dtype=dt), torch.ones(shape[:-1] or (1,))))
        yield (f"scale_grads {short[dt]} 2 tensors",
               lambda dt=dt: sgs.scale_grads_triton_(
                   [torch.zeros(3, 100, dtype=dt), torch.zeros(2, 64, dtype=dt)],
                   torch.tensor(2.0)))
    for k in range(1, 9):
        yield (f"scale_grads {k} tensors",
               lambda k=k: sgs.scale_grads_triton_(
                   [torch.zeros(3, 100 * (i + 1)) for i in range(k)], torch.tensor(2.0)))


def record_all() -> list[Launch]:
    """Every launch of every case, each tagged with its case's label."""
    launches: list[Launch] = []
    for label, call in _cases():
        with recording() as got:
            call()
        if not got:
            raise AssertionError(f"case {label!r} launched no kernel")
        for launch in got:
            launch.case = label
        launches.extend(got)
    return launches


# --------------------------------------------------------------------------------------------
# Compilation for a target without a device


class _TargetDriver:
    """The part of a Triton driver that ``JITFunction.warmup`` consults: the target, a device
    number (the arch, so each target has its own kernel cache) and a stream (unused)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill bytes, stack frame and static shared memory from a ``ptxas -v`` log of
    one kernel; KeyError when the log has no register report (ptxas did not run)."""
    out = {}
    for key, pattern in _PTXAS.items():
        values = [int(v) for v in pattern.findall(log)]
        if not values:
            if key == "registers":
                raise KeyError(f"no ptxas register report in:\n{log}")
            values = [0]
        out[key] = max(values)
    return out


def _describe(kernel, compiled) -> dict:
    """A compiled kernel's specialisation, by parameter name: the constexpr parameters, the
    argument types, the integer arguments specialised to 1 and those known divisible by 16."""
    names = [p.name for p in kernel.params]
    declared = {p.name for p in kernel.params if p.is_constexpr}
    constants = {names[path[0]]: value for path, value in compiled.src.constants.items()}
    constexprs = {n: _plain(v) for n, v in constants.items() if n in declared}
    ones = sorted(n for n in constants if n not in declared)
    div16 = sorted(names[path[0]] for path, attr in compiled.src.attrs.items()
                   if any(a[0] == "tt.divisibility" for a in attr))
    types = {n: str(t) for n, t in compiled.src.signature.items() if t != "constexpr"}
    return {"constexprs": constexprs, "ones": ones, "div16": div16, "types": types}


def _plain(v):
    v = getattr(v, "value", v)
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def compile_launches(launches: list[Launch], arch: int, ptx_dir: str | None) -> list[dict]:
    """Compile each launch for ``arch``; one record per distinct kernel (or per failed launch)."""
    import triton
    from triton.runtime.driver import driver

    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # an on-disk cache hit would skip ptxas
    driver.set_active(_TargetDriver(arch))
    seen: dict[int, dict] = {}
    records: list[dict] = []
    for launch in launches:
        name = launch.kernel.fn.__name__
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
        except Exception as e:  # a compile error is a result, reported with its case
            records.append({"kernel": name, "arch": arch, "case": launch.case,
                            "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
            continue
        rec = seen.get(id(compiled))
        if rec is not None:
            rec["cases"].append(launch.case)
            continue
        rec = {"kernel": name, "arch": arch, "cases": [launch.case],
               "num_warps": compiled.metadata.num_warps,
               "num_stages": compiled.metadata.num_stages,
               "shared": compiled.metadata.shared, **_describe(launch.kernel, compiled)}
        try:
            rec.update(parse_ptxas_log(log.getvalue()))
        except KeyError as e:
            rec["error"] = str(e)
        if ptx_dir is not None:
            rec["ptx"] = f"{name}-sm{arch}-{len(seen)}.ptx"
            with open(os.path.join(ptx_dir, rec["ptx"]), "w") as f:
                f.write(compiled.asm["ptx"])
        seen[id(compiled)] = rec
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", required=True,
                        help="compute capability x 10, e.g. 90 or 80 (repeatable)")
    parser.add_argument("--out", required=True, help="folder for results.json and the PTX")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("gpu_compile.py needs TRITON_INTERPRET unset (compiled Triton)")
    import triton

    launches = record_all()
    records = []
    for arch in args.arch:
        records += compile_launches(launches, arch, args.out)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"triton": triton.__version__, "launches": len(launches), "records": records},
                  f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
