"""The CUDA kernels' resource use, read from the built extension (no GPU needed).

``cuobjdump -res-usage`` reports, per kernel and SASS target, the registers, the stack frame,
shared memory and local memory of every compiled kernel; ``cuobjdump -elf`` gives the kernel's
``__launch_bounds__`` thread count (EIATTR_MAX_THREADS). A kernel must not spill (no local memory,
no stack frame: ptxas puts spilled registers there), and its registers times its launch-bound
threads must fit one SM's 64K-register file, so that a block of the size the launcher intends can
run at all.

``FASTKD_WRITE_RESOURCES=1 pytest tests/test_cuda_resources.py`` rewrites docs/cuda_resources.md
with the table of the extension as built here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

import fastkd

REGISTERS_PER_SM = 65536
DOC = Path(__file__).resolve().parent.parent / "docs" / "cuda_resources.md"

pytestmark = pytest.mark.skipif(
    not fastkd._C.with_cuda, reason="fastkd._C was built without its CUDA kernels"
)


def _cuobjdump() -> str:
    """cuobjdump from the CUDA toolkit, else the copy that ships with Triton."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for path in (Path(home) / "bin" / "cuobjdump",):
        if path.exists():
            return str(path)
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    pytest.skip("cuobjdump not found (CUDA toolkit or Triton's NVIDIA backend)")


def _demangle(names: list[str]) -> dict[str, str]:
    if not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    # Drop the return type and the parameter list: the kernel and its template arguments remain.
    short = [re.sub(r"^void ", "", d.replace("(anonymous namespace)::", "")).split("(")[0]
             for d in out]
    return dict(zip(names, short, strict=True))


def kernel_resources() -> list[dict]:
    """One row per (SASS target, kernel) of the built extension."""
    tool = _cuobjdump()
    lib = fastkd._C.__file__
    usage = subprocess.run([tool, "-res-usage", lib], capture_output=True, text=True,
                           check=True).stdout
    rows, arch, name = [], None, None
    for line in usage.splitlines():
        if m := re.match(r"arch = (sm_\w+)", line.strip()):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif name and line.strip().startswith("REG:"):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append({"arch": arch, "mangled": name, "registers": int(fields["REG"]),
                         "stack": int(fields["STACK"]), "shared": int(fields["SHARED"]),
                         "local": int(fields["LOCAL"])})
            name = None
    elf = subprocess.run([tool, "-elf", lib], capture_output=True, text=True, check=True).stdout
    threads, arch, section, want = {}, None, None, False
    for line in elf.splitlines():
        s = line.strip()
        if m := re.match(r"arch = (sm_\w+)", s):
            arch = m.group(1)
        elif s.startswith(".nv.info."):
            section = s[len(".nv.info."):]
        elif s == "Attribute:\tEIATTR_MAX_THREADS" or s.endswith("EIATTR_MAX_THREADS"):
            want = True
        elif want and s.startswith("Value:"):
            dims = [int(v, 16) for v in s.split()[1:4]]
            threads[(arch, section)] = dims[0] * dims[1] * dims[2]
            want = False
    names = _demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["kernel"] = names[r["mangled"]]
        r["max_threads"] = threads.get((r["arch"], r["mangled"]))
    return rows


def _family(kernel: str) -> str:
    return kernel.split("<")[0].removeprefix("fastkd::")


def _table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(_family(r["kernel"]), r["arch"])].append(r)
    lines = [
        "| kernel | target | instantiations | registers | launch bound (threads) "
        "| registers x threads | shared (B) | spill: local + stack (B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (family, arch), rs in sorted(groups.items()):
        regs = sorted({r["registers"] for r in rs})
        bounds = sorted({r["max_threads"] for r in rs if r["max_threads"]})
        worst = max(r["registers"] * (r["max_threads"] or 0) for r in rs)
        lines.append(
            f"| `{family}` | {arch} | {len(rs)} | {regs[0]}-{regs[-1]} "
            f"| {', '.join(map(str, bounds)) or '-'} | {worst or '-'} "
            f"| {max(r['shared'] for r in rs)} | {max(r['local'] + r['stack'] for r in rs)} |"
        )
    return "\n".join(lines) + "\n"


def test_cuda_kernels_fit_their_launch_bounds_without_spilling(tmp_path):
    rows = kernel_resources()
    assert rows, "cuobjdump found no kernels in the extension"
    assert {r["arch"] for r in rows} >= {"sm_80", "sm_90a"}, {r["arch"] for r in rows}
    spills = [f"{r['arch']} {r['kernel']}: local {r['local']} B, stack {r['stack']} B"
              for r in rows if r["local"] or r["stack"]]
    assert not spills, "kernels that spill:\n" + "\n".join(spills)
    too_big = [f"{r['arch']} {r['kernel']}: {r['registers']} registers x {r['max_threads']}"
               for r in rows
               if r["max_threads"] and r["registers"] * r["max_threads"] > REGISTERS_PER_SM]
    assert not too_big, "kernels whose launch bound cannot be met:\n" + "\n".join(too_big)

    text = (
        "# CUDA kernels: registers, shared memory and spills\n\n"
        "Read from the built extension with `cuobjdump -res-usage` (registers, stack, shared and "
        "local memory per kernel and target) and `cuobjdump -elf` (the `__launch_bounds__` thread "
        "count), by `tests/test_cuda_resources.py`, which fails on any spill (local memory or a "
        "stack frame) and on a kernel whose registers times its launch-bound threads exceed one "
        "SM's 65536 registers. Regenerate with "
        "`FASTKD_WRITE_RESOURCES=1 pytest tests/test_cuda_resources.py`. Rows group a kernel's "
        "template instantiations (student and teacher dtypes, vector width, options).\n\n"
        + _table(rows)
    )
    out = DOC if os.environ.get("FASTKD_WRITE_RESOURCES") == "1" else tmp_path / DOC.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def test_split_kernel_keeps_several_rows_per_sm():
    """The KD split kernel is launched for kSplitBlocksPerSM CTAs (rows, or slices of rows) per SM
    (its __launch_bounds__): its registers, allocated in steps of 8 per thread, must allow it."""
    header = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "kd_loss_kernels.cuh"
    per_sm = int(re.search(r"constexpr int kSplitBlocksPerSM = (\d+);", header.read_text())[1])
    split = "kd_cuda::kd_loss_split_kernel"
    rows = [r for r in kernel_resources() if _family(r["kernel"]) == split]
    assert rows, "the extension has no kd_loss_split_kernel"
    short = [f"{r['arch']} {r['kernel']}: {r['registers']} registers"
             for r in rows
             if -(-r["registers"] // 8) * 8 * r["max_threads"] * per_sm > REGISTERS_PER_SM]
    assert not short, f"fewer than {per_sm} blocks per SM:\n" + "\n".join(short)
