"""The ``bench`` and ``report`` commands of ``python -m fastkd``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from ..backends import CHOICES as BACKEND_CHOICES
from ..memory import cpu_cache_info
from . import available_losses, load_loss
from ._core import DTYPES, MODES, PEERS, LossBench, Selection, parse_shape, shape_str
from ._report import Results, environment, markdown, now, plot, table
from ._runner import Runner, Settings
from ._timing import CACHE_STATES

BENCH_EPILOG = """\
Every case is timed for fastkd (backend auto, plus each --backend) and each peer. GB/s counts the
fewest bytes the loss must move (each input read once, each output written once) and %copy
compares it with the copy bandwidth measured at the start of the run.

examples:
  python -m fastkd bench                              all KD cases on the GPU (else the CPU)
  python -m fastkd bench --device cpu --quick --peers eager
  python -m fastkd bench --shapes 8192x32000 --dtype bf16 --variants plain ce guided cohort3 \\
      --backend triton cuda --peers eager compile liger --json kd.json --plot kd.png
  python -m fastkd bench --list                       losses, variants and default shapes
  python -m fastkd report kd.json --plot kd.png       table and plot of saved results
"""


# Environment variables that change what a run measures (allocator, threads, kernels chosen).
_TIMING_ENV_PREFIXES = ("MALLOC_", "FASTKD_", "ATEN_", "OMP_", "MKL_", "THP_", "TRITON_",
                        "CUDA_", "LD_PRELOAD", "PYTORCH_")


def _timing_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_TIMING_ENV_PREFIXES)}


def _shape(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from .linear_kd_loss import add_parser as add_head_parser

    _add_bench_parser(sub)
    add_head_parser(sub)
    _add_report_parser(sub)
    _add_tune_parser(sub)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time fastkd's losses against PyTorch eager, torch.compile and Liger-Kernel",
        description="Time fastkd's losses against PyTorch eager, torch.compile and Liger-Kernel; "
        "print a table, and write JSON and a PNG plot.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--loss",
        nargs="+",
        metavar="NAME",
        help=f"losses to run (default: all of {', '.join(available_losses())})",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where to run (default: cuda when a GPU is visible, else cpu)",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=tuple(DTYPES),
        default=["fp32", "bf16"],
        help="logit dtypes (default: fp32 bf16)",
    )
    p.add_argument(
        "--mode",
        nargs="+",
        choices=MODES,
        default=["fwd", "fwdbwd"],
        help="fwd (no gradient), fwdbwd (loss.backward() included) and bwd "
        "(derived: fwdbwd - fwd); default: fwd fwdbwd",
    )
    p.add_argument(
        "--backend",
        nargs="+",
        choices=BACKEND_CHOICES,
        default=[],
        help="fastkd backends to time in addition to auto (e.g. triton cuda)",
    )
    p.add_argument(
        "--peers",
        nargs="*",
        choices=PEERS,
        default=["eager", "compile", "liger"],
        help="implementations to compare with (default: eager compile liger; "
        "compile-max-autotune on request; no value: fastkd alone). Liger-Kernel is "
        "skipped when it is not installed or the device is the CPU",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=_shape,
        metavar="ROWSxC",
        help="logit shapes, e.g. 1024x1000 512x32000 (default: the loss's own)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="loss variants (see --list; default: the loss's own)",
    )
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON to PATH")
    p.add_argument(
        "--append",
        action="store_true",
        help="add to the results already in --json PATH (same machine) instead of "
        "replacing them; a new measurement replaces an old one of the same case",
    )
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot of GB/s to PATH")
    p.add_argument(
        "--quick", action="store_true", help="small shapes and short timing, for smoke tests"
    )
    p.add_argument(
        "--rep-ms",
        type=_positive,
        metavar="MS",
        help="time spent timing each measurement (do_bench's rep on CUDA; default "
        "100 on CUDA, 400 on CPU, 20 with --quick)",
    )
    p.add_argument(
        "--warmup-ms", type=_positive, metavar="MS", help="warm-up time of each measurement"
    )
    p.add_argument(
        "--cpu-cache",
        choices=CACHE_STATES,
        default="steady",
        help="CPU only, what each timed call finds in cache: steady (default; caches scrubbed, "
        "then one untimed call of the same implementation, as in a training loop: code warm, "
        "inputs in DRAM) or cold (scrubbed: code and inputs in DRAM)",
    )
    p.add_argument(
        "--budget",
        type=_positive,
        metavar="SECONDS",
        help="wall-clock budget of the run: what has not started by then is recorded as skipped",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads of torch (torch.set_num_threads); on a CPU shared with "
        "other work, fewer threads than cores give steadier timings",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="list the losses, their variants and default shapes, and exit",
    )
    p.set_defaults(func=run_bench, parser=p)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "report",
        help="print the table (and plot) of saved benchmark results",
        description="Print the table of a JSON file written by "
        "'python -m fastkd bench --json', and optionally plot it.",
    )
    r.add_argument("json", metavar="PATH", help="results written by bench --json")
    r.add_argument("--plot", metavar="PATH", help="write a PNG plot to PATH")
    r.add_argument(
        "--markdown",
        action="store_true",
        help="print a Markdown summary instead (fastkd beside eager and torch.compile, one row "
        "per case)",
    )
    r.add_argument(
        "--mode",
        action="append",
        choices=MODES,
        help="a mode in the --markdown summary; repeat for several (default: fwdbwd)",
    )
    r.set_defaults(func=run_report, parser=r)


def _add_tune_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "tune",
        help="write the backend tables backend='auto' reads, from GPU benchmark results",
        description="From results of 'python -m fastkd bench --device cuda --backend cuda triton "
        "--json PATH', write fastkd/tuning/<loss>.json: per GPU, dtype and problem size, the "
        "fastkd backend with the lowest forward+backward time.",
    )
    t.add_argument("json", metavar="PATH", help="results written by bench --json on a GPU")
    t.add_argument(
        "--out", metavar="DIR", type=Path, help="where to write the tables (default: fastkd/tuning)"
    )
    t.set_defaults(func=run_tune, parser=t)


def _list() -> int:
    for name in available_losses():
        bench = load_loss(name)
        print(f"{name}")
        print(f"  default shapes: {' '.join(shape_str(s) for s in bench.shapes)}")
        print(f"  quick shapes:   {' '.join(shape_str(s) for s in bench.quick_shapes)}")
        print(f"  variants (default: {' '.join(bench.default_variants)}):")
        for variant, what in bench.variants.items():
            print(f"    {variant:<10} {what}")
    return 0


def _selection(args: argparse.Namespace) -> tuple[list[LossBench], Selection]:
    """The losses and the selection the command line asks for (usage errors exit here)."""
    parser: argparse.ArgumentParser = args.parser
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.append and not args.json:
        parser.error("--append needs --json PATH")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        benches = [load_loss(n) for n in (args.loss or available_losses())]
    except ValueError as e:
        parser.error(str(e))
    if args.variants:
        # Variants belong to losses: each loss runs the requested variants it defines, a loss that
        # defines none of them is left out, and a variant that no loss defines is an error.
        unknown = [v for v in args.variants if not any(v in b.variants for b in benches)]
        if unknown:
            parser.error(
                f"unknown variant(s) {', '.join(unknown)}; choose from "
                + "; ".join(f"{b.name}: {', '.join(b.variants)}" for b in benches)
            )
        benches = [b for b in benches if any(v in b.variants for v in args.variants)]
    sel = Selection(
        device=device,
        dtypes=args.dtype,
        modes=args.mode,
        backends=args.backend,
        peers=args.peers,
        shapes=args.shapes,
        variants=args.variants,
        quick=args.quick,
        seed=args.seed,
    )
    try:
        for bench in benches:
            bench.cases(sel)
    except ValueError as e:
        parser.error(str(e))
    return benches, sel


def _run_info(
    args: argparse.Namespace, benches: list[LossBench], runner: Runner, copy: dict
) -> dict:
    """What the JSON records of one run: the command, the selection and how it was timed."""
    sel, settings, cuda = runner.sel, runner.settings, runner.sel.device == "cuda"
    return {
        "started": now(),
        "command": "python -m fastkd " + shlex.join(args.argv),
        "selection": {
            "device": sel.device,
            "losses": [b.name for b in benches],
            "dtypes": list(sel.dtypes),
            "modes": list(sel.modes),
            "backends": list(sel.backends),
            "peers": list(sel.peers),
            "shapes": None if sel.shapes is None else [list(s) for s in sel.shapes],
            "variants": None if sel.variants is None else list(sel.variants),
            "quick": sel.quick,
            "seed": sel.seed,
        },
        "settings": {
            "timer": "triton.testing.do_bench: CUDA events, L2 flushed, median"
            if cuda
            else "time.perf_counter around each call, median; caches: " + settings.cpu_cache,
            "rep_ms": settings.rep_ms,
            "warmup_ms": settings.warmup_ms,
            "budget_s": settings.budget_s,
            "rotation": f"input copies exceeding 2 x {runner.cache} bytes of cache",
            "peak_memory": "torch.cuda.max_memory_allocated during one call minus the memory "
            "allocated before it"
            if cuda
            else None,
            "threads": torch.get_num_threads(),
            # fastkd's own CPU outputs reuse freed blocks up to this many bytes (fastkd.memory;
            # FASTKD_CPU_CACHE_MB=0 times them with fresh memory, as the peers get it).
            "fastkd_cpu_block_cache_bytes": cpu_cache_info()["limit_bytes"],
            "environment_variables": _timing_env(),
        },
        "copy_bandwidth": copy,
    }


def run_bench(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    benches, sel = _selection(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = Settings.defaults(sel.device, args.quick)
    if args.rep_ms:
        settings.rep_ms = args.rep_ms
    if args.warmup_ms:
        settings.warmup_ms = args.warmup_ms
    settings.budget_s = args.budget
    settings.cpu_cache = args.cpu_cache

    runner = Runner(sel, settings)
    env = environment(sel.device, runner.cache)
    if args.append and Path(args.json).exists():
        res = Results.load(args.json)
        if res.env["device_name"] != env["device_name"] or res.env["device"] != sel.device:
            args.parser.error(
                f"{args.json} holds results of {res.env['device_name']} "
                f"({res.env['device']}); write this run to another file"
            )
    else:
        res = Results(env)
    copy = runner.measure_copy_bandwidth()
    runner.log(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['bytes'] >> 20} MiB moved)")
    runner.run_index = res.add_run(_run_info(args, benches, runner, copy))

    def save() -> None:
        res.merge(runner.measurements, runner.skipped)
        if args.json:
            res.save(args.json)

    runner.on_record = save
    runner.run(benches)
    save()
    print(table(res, run=runner.run_index), flush=True)
    if args.plot:
        plot(res, args.plot)
    if not runner.measurements:
        print("nothing was measured", file=sys.stderr)
        return 1
    return 0


def run_report(args: argparse.Namespace) -> int:
    try:
        res = Results.load(args.json)
    except (OSError, ValueError, KeyError) as e:
        args.parser.error(f"cannot read {args.json}: {e}")
    if args.markdown:
        print(markdown(res, tuple(args.mode or ["fwdbwd"])))
    else:
        print(table(res))
    if args.plot:
        plot(res, args.plot)
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from ._tune import TUNING_DIR, tune

    try:
        results = json.loads(Path(args.json).read_text())
        written = tune(results, args.out or TUNING_DIR)
    except (OSError, ValueError, KeyError) as e:
        args.parser.error(f"cannot tune from {args.json}: {e}")
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("no fastkd cuda/triton forward+backward measurements to tune from")
    return 0
