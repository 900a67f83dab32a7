"""Command line of fastkd: ``python -m fastkd COMMAND ...``.

Commands:
  bench    time the losses against PyTorch eager, torch.compile and Liger-Kernel
  report   print (and plot) results saved by ``bench --json``
  tune     write the backend tables ``backend="auto"`` reads, from GPU benchmark results

The reference trainer has its own entry point, ``python -m fastkd.train``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .benchmark import _cli as bench_cli

    parser = argparse.ArgumentParser(
        prog="python -m fastkd",
        description="fastkd: fused knowledge-distillation losses for PyTorch.",
        epilog="Run 'python -m fastkd COMMAND --help' for a command's options. "
        "The reference trainer is 'python -m fastkd.train'.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    bench_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
