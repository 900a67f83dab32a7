"""``python -m fastkd.train`` / ``fastkd-train``: see ``--help``."""

from __future__ import annotations

import sys

from .checkpoint import CheckpointError
from .config import ConfigError, build_parser, parse_args
from .engine import Interrupted, NonFiniteLoss, train


def main(argv: list[str] | None = None) -> int:
    """Runs the trainer; returns the exit status (0 ok, 1 non-finite loss, 2 bad configuration or
    checkpoint, 128 + signal number after SIGINT/SIGTERM, 3 after --stop-after-steps)."""
    try:
        cfg = parse_args(argv)
        if cfg.demo:
            from .demo import run_demo

            run_demo(cfg)
        else:
            train(cfg)
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
