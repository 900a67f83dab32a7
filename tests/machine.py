"""What this machine can run, for tests that must pass on any x86-64 CPU."""

import functools
import os
import subprocess
import sys

# ATen's CPU capabilities, weakest first; a CPU that runs one runs every weaker one.
CPU_CAPABILITIES = ("default", "avx2", "avx512")


@functools.cache
def best_cpu_capability() -> str:
    """The capability ATen picks on this CPU when nothing forces one.

    Asked in a fresh interpreter without ATEN_CPU_CAPABILITY: forcing a capability the CPU lacks
    is not refused by every torch build, and its kernels then die with SIGILL.
    """
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    ).stdout.split()[-1].lower()
    return out if out in CPU_CAPABILITIES else "default"


def skip_unless_cpu_runs(capability: str) -> None:
    """Skips the calling test when this CPU cannot run `capability`'s kernels."""
    import pytest

    best = best_cpu_capability()
    if CPU_CAPABILITIES.index(capability) > CPU_CAPABILITIES.index(best):
        pytest.skip(f"this CPU's best capability is {best}; {capability} kernels would not run")
