"""``python -m fastkd.train`` / ``fastkd-train``: see ``--help``."""

from __future__ import annotations

import sys

from .checkpoint import CheckpointError
from .config import ConfigError, build_parser, parse_args
from .engine import Interrupted, NonFiniteLoss, train
from .store import StoreError


def _store(argv: list[str]) -> int:
    import json

    from . import store, store_build

    if argv[:1] == ["info"] and len(argv) == 2:
        try:
            print(json.dumps(store.info(argv[1]), indent=1))
        except StoreError as e:
            print(f"fastkd.train: error: {e}", file=sys.stderr)
            return 2
        return 0
    if argv[:1] != ["build"]:
        print(STORE_USAGE, end="", file=sys.stderr)
        return 2
    try:
        store_build.build(parse_args(argv[1:]))
    except StoreError as e:
        print(f"fastkd.train: error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError) as e:
        if isinstance(e, ConfigError):
            print(STORE_USAGE, end="", file=sys.stderr)
        print(f"fastkd.train: error: {e}", file=sys.stderr)
        return 2
    return 0


STORE_USAGE = (
    "usage: python -m fastkd.train store build --output DIR [--crops M] [--topk K] "
    "[the trainer's data and teacher options]\n"
    "       python -m fastkd.train store info DIR\n")


def main(argv: list[str] | None = None) -> int:
    """Runs the trainer; returns the exit status (0 ok, 1 non-finite loss, 2 bad configuration,
    checkpoint or teacher store, 128 + signal number after SIGINT/SIGTERM, 3 after
    --stop-after-steps).

    ``store build ...`` builds a teacher store (:mod:`fastkd.train.store`), ``store info DIR``
    verifies one and prints its summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["store"]:
        return _store(argv[1:])
    try:
        cfg = parse_args(argv)
        if cfg.demo:
            from .demo import run_demo

            run_demo(cfg)
        else:
            train(cfg)
    except StoreError as e:
        print(f"fastkd.train: error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError) as e:
        if isinstance(e, ConfigError):
            print(build_parser().format_usage(), end="", file=sys.stderr)
        print(f"fastkd.train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"fastkd.train: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"fastkd.train: stopped: {e}", file=sys.stderr)
        return 128 + e.signum if e.signum is not None else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
