"""What this machine can run, for tests that must pass on any x86-64 CPU."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

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


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter from tests/ (its helpers importable), with `env` on top
    of this process's environment less ATEN_CPU_CAPABILITY and FASTKD_BACKEND."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("ATEN_CPU_CAPABILITY", "FASTKD_BACKEND")}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, cwd=TESTS, timeout=300)


def check_capability_variant(script: str, capability: str) -> None:
    """Runs `script` (which prints the capability it runs with, then "ok") with ATEN's kernels
    forced to `capability`; skips when this CPU cannot run them."""
    skip_unless_cpu_runs(capability)
    proc = run_python(script, ATEN_CPU_CAPABILITY=capability)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, status = proc.stdout.split()[-2:]
    assert got.lower() == capability
    assert status == "ok"
