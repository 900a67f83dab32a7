"""Every Triton kernel that fastkd's launchers produce compiles for sm_90 and sm_80 -- compiled,
never launched, so no GPU is needed -- without register spills; ptxas's resource report of each
kernel is written as a markdown table (docs/gpu_resources.md).

The compiler rejects what the interpreter lets through (non-constexpr globals, for one), so the
interpreter tests alone do not show that a kernel builds. tests/gpu_compile.py does the work in a
fresh interpreter without ``TRITON_INTERPRET`` (one process per target, in parallel); its
docstring describes the mechanism. ``FASTKD_WRITE_RESOURCES=1`` makes this test rewrite
docs/gpu_resources.md; otherwise the table goes to a temporary folder.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import CUDA

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve().parent / "gpu_compile.py"
ARCHS = (90, 80)
DOC = ROOT / "docs" / "gpu_resources.md"

# Constexpr values each kernel must have been compiled with: every value a launcher can choose
# (tests/gpu_compile.py's cases must keep reaching them all).
KD_BLOCKS = {16, 32, 64, 128, 256, 512, 1024, 2048, 4096}
REQUIRED = {
    "_kd_loss_fwd_kernel": {
        "NUM_T": set(range(0, 9)), "BLOCK_C": KD_BLOCKS, "HAS_KD_RW": {False, True},
        "HAS_CE": {False, True}, "HAS_CE_RW": {False, True}, "UNIT_T": {False, True},
        "SMOOTH": {False, True}, "HAS_GRAD": {False, True},
        # Sparse teachers: none (the dense kernel) to eight, every chunk width of their k entries.
        "NUM_S": set(range(0, 9)), "BLOCK_K": {16, 32, 64, 128, 256, 512, 1024},
        # Forward KL, reverse KL, JSD (REQUIRED_PER_DIVERGENCE: what each must reach).
        "DIVERGENCE": {0, 1, 2},
    },
    "_feature_regression_fwd_kernel": {
        "NUM_PAIRS": set(range(1, 9)), "P": {1, 2}, "NORMALIZE": {False, True},
        "BLOCK": KD_BLOCKS, "BLOCKS": {1, 4},
    },
    "_channel_attention_fwd_kernel": {"NUM_PAIRS": {1, 2, 3, 4}},
    "_channel_attention_bwd_kernel": {"NUM_PAIRS": {1, 2, 3, 4}},
    "_scale_grad_kernel": {"PER_ROW": {False, True}},
    "_scale_grads_kernel": {"NUM": set(range(1, 9))},
}
# The KD kernel's constexpr values compiled with each divergence: every chunk width (JSD's stop
# at 1024), no to eight dense and sparse teachers, chunked k, and each option on and off.
REQUIRED_PER_DIVERGENCE = {
    "NUM_T": {0, 1, 8}, "NUM_S": {0, 1, 8}, "BLOCK_K": {16, 1024},
    "HAS_KD_RW": {False, True}, "HAS_CE": {False, True}, "HAS_CE_RW": {False, True},
    "UNIT_T": {False, True}, "SMOOTH": {False, True}, "HAS_GRAD": {False, True},
}
DIVERGENCE_BLOCKS = {0: KD_BLOCKS, 1: KD_BLOCKS, 2: KD_BLOCKS - {2048, 4096}}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """tests/gpu_compile.py's results for every target: records, Triton version, launch count."""
    out = tmp_path_factory.mktemp("gpu_compile")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # The fastkd that this test imports, whatever the install.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    procs = []
    for arch in ARCHS:
        folder = out / f"sm{arch}"
        folder.mkdir()
        env_arch = dict(env, TRITON_CACHE_DIR=str(folder / "cache"))
        procs.append((folder, subprocess.Popen(
            [sys.executable, str(HELPER), "--arch", str(arch), "--out", str(folder)],
            cwd=ROOT, env=env_arch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )))
    records, versions, launches = [], set(), set()
    for folder, proc in procs:
        log, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"tests/gpu_compile.py failed:\n{log}"
        data = json.loads((folder / "results.json").read_text())
        versions.add(data["triton"])
        launches.add(data["launches"])
        for rec in data["records"]:
            if "ptx" in rec:
                rec["ptx"] = str(folder / rec["ptx"])
            records.append(rec)
    assert len(versions) == 1 and len(launches) == 1
    return {"records": records, "triton": versions.pop(), "launches": launches.pop()}


def _ok(compiled) -> list[dict]:
    return [r for r in compiled["records"] if "error" not in r]


def test_every_kernel_compiles(compiled):
    errors = [r for r in compiled["records"] if "error" in r]
    report = "\n\n".join(
        f"{r['kernel']} sm_{r['arch']} ({r.get('case') or r['cases'][0]}):\n{r['error'][:1500]}"
        for r in errors[:5]
    )
    assert not errors, f"{len(errors)} launches failed to compile, the first:\n{report}"


def test_no_spills(compiled):
    spilled = [
        f"{r['kernel']} sm_{r['arch']} {_spec(r)} num_warps={r['num_warps']}: "
        f"{r['registers']} registers, {r['spill_stores']} B spill stores, "
        f"{r['spill_loads']} B spill loads ({r['cases'][0]})"
        for r in _ok(compiled)
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spilled, "ptxas spilled registers:\n" + "\n".join(spilled)


def test_every_option_is_compiled_for_every_target(compiled):
    records = _ok(compiled)
    for arch in ARCHS:
        seen = defaultdict(lambda: defaultdict(set))
        for r in records:
            if r["arch"] == arch:
                for name, value in r["constexprs"].items():
                    seen[r["kernel"]][name].add(value)
        for kernel, required in REQUIRED.items():
            for name, values in required.items():
                missing = values - seen[kernel][name]
                assert not missing, f"{kernel} sm_{arch}: no kernel with {name} in {missing}"
        for div in REQUIRED["_kd_loss_fwd_kernel"]["DIVERGENCE"]:
            seen_div = defaultdict(set)
            for r in records:
                if (r["arch"] == arch and r["kernel"] == "_kd_loss_fwd_kernel"
                        and r["constexprs"]["DIVERGENCE"] == div):
                    for name, value in r["constexprs"].items():
                        seen_div[name].add(value)
            for name, values in dict(REQUIRED_PER_DIVERGENCE,
                                     BLOCK_C=DIVERGENCE_BLOCKS[div]).items():
                missing = values - seen_div[name]
                assert not missing, (
                    f"_kd_loss_fwd_kernel sm_{arch} DIVERGENCE={div}: no kernel with {name} in "
                    f"{missing}"
                )
    # The same specialisations for each target.
    specs = {a: sorted(_key(r) for r in records if r["arch"] == a) for a in ARCHS}
    assert specs[ARCHS[0]] == specs[ARCHS[1]]
    # Student dtypes reach the KD kernel's pointer types, and mixed teacher dtypes occur.
    kd = [r for r in records if r["kernel"] == "_kd_loss_fwd_kernel"]
    assert {r["types"]["s_ptr"] for r in kd} == {"*fp32", "*bf16", "*fp16"}
    assert any(len({r["types"][f"t{i}"] for i in range(3)}) == 3 for r in kd)


def test_feature_regression_divides_exactly(compiled):
    """fp32 ``/`` compiles to the approximate div.full.f32, whose x / x need not be 1: the ratio of
    two equal norms must be a correctly rounded division (div.rn) so that p=1 with normalisation
    gives an exactly zero gradient for a student equal (or proportional) to its teacher."""
    normalized = [
        r for r in _ok(compiled)
        if r["kernel"] == "_feature_regression_fwd_kernel" and r["arch"] == 90
        and r["constexprs"]["NORMALIZE"]
    ]
    assert normalized
    for r in normalized:
        ptx = Path(r["ptx"]).read_text()
        assert "div.rn.f32" in ptx, _spec(r)
        for approximate in ("div.full.f32", "div.approx.f32", "div.approx.ftz.f32"):
            assert approximate not in ptx, f"{approximate} in {_spec(r)}"


def test_resource_table(compiled, tmp_path):
    path = DOC if os.environ.get("FASTKD_WRITE_RESOURCES") == "1" else tmp_path / DOC.name
    text = resource_markdown(compiled)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    # Every kernel has its rows, every compiled kernel is counted once.
    for kernel in REQUIRED:
        assert f"`{kernel}`" in text
    assert f"{len(_ok(compiled))} kernels compiled" in text


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["equal", "proportional"])
def test_feature_regression_p1_normalized_proportional_student_has_zero_gradient(case):
    import fastkd

    g = torch.Generator().manual_seed(0)
    if case == "equal":
        teacher = torch.randn(4, 3, 15, 15, generator=g)
        student = teacher.clone()
    else:
        # Entries of +-1 over 900 elements: norms 30 and 90, exact; 90 / 30 is exactly 3 only when
        # correctly rounded (30 is not a power of 2).
        teacher = torch.randint(0, 2, (4, 4, 15, 15), generator=g).float() * 2 - 1
        student = teacher * 3
    student = student.cuda().requires_grad_()
    loss = fastkd.feature_regression_loss(student, teacher.cuda(), p=1, normalize=True,
                                          backend="triton")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(student.grad).item() == 0


# --------------------------------------------------------------------------------------------
# The markdown table

# Parameters shown in the specialisation column, by kernel (the others are in every row alike).
def _spec(r: dict) -> str:
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["constexprs"].items()]
    return " ".join(parts)


def _key(r: dict) -> tuple:
    return (r["kernel"], json.dumps(r["constexprs"], sort_keys=True),
            json.dumps(r["types"], sort_keys=True), tuple(r["ones"]), tuple(r["div16"]),
            r["num_warps"])


_DTYPE_ARGS = {
    "_kd_loss_fwd_kernel": ("s_ptr", "t0", "grad_ptr"),
    "_feature_regression_fwd_kernel": ("s0", "t0", "g0"),
    "_channel_attention_fwd_kernel": ("s0", "t0"),
    "_channel_attention_bwd_kernel": ("g0",),
    "_scale_grad_kernel": ("g_ptr",),
    "_scale_grads_kernel": ("g0",),
}


def resource_markdown(compiled: dict) -> str:
    """docs/gpu_resources.md: one row per kernel, constexprs and num_warps, with the range of
    registers per target (and of the other resources) over the argument dtypes and the integer
    arguments' specialisations (divisible by 16, equal to 1) that share them."""
    rows = defaultdict(list)
    for r in _ok(compiled):
        rows[(r["kernel"], _spec(r), r["num_warps"])].append(r)
    lines = []
    for (kernel, spec, warps), group in sorted(
        rows.items(), key=lambda kv: (kv[0][0], _sort_spec(kv[0][1]), kv[0][2])
    ):
        per_arch = [[g for g in group if g["arch"] == a] for a in ARCHS]
        dtypes = sorted({"/".join(_short(g["types"].get(a, "-")) for a in _DTYPE_ARGS[kernel])
                         for g in group})
        lines.append(
            f"| `{kernel}` | {spec} | {warps} | "
            + " | ".join(_range(g, "registers") for g in per_arch)
            + f" | {_range(group, 'spill_stores', 'spill_loads')} | {_range(group, 'shared')} | "
            f"{_range(group, 'stack')} | {len(per_arch[0])} | {_dtypes_cell(dtypes)} |"
        )
    ok = _ok(compiled)
    by_kernel = defaultdict(list)
    for r in ok:
        by_kernel[r["kernel"]].append(r)
    summary = [
        f"| `{k}` | {len(v)} | {max(r['registers'] for r in v)} | "
        f"{max(r['spill_stores'] + r['spill_loads'] for r in v)} | "
        f"{max(r['shared'] for r in v)} | {max(r['stack'] for r in v)} |"
        for k, v in sorted(by_kernel.items())
    ]
    return "\n".join([
        "# GPU resources of the Triton kernels",
        "",
        "What ptxas reports for every Triton kernel that fastkd's launchers produce, compiled",
        "(not launched) for sm_90 and sm_80 on a machine without a GPU by",
        "`tests/test_triton_gpu_compile.py` (mechanism: `tests/gpu_compile.py`). The test fails",
        "on a compile error or any spill. Regenerate this file with",
        "",
        "```",
        "FASTKD_WRITE_RESOURCES=1 pytest tests/test_triton_gpu_compile.py",
        "```",
        "",
        f"Triton {compiled['triton']}, {compiled['launches']} launches of the launchers, "
        f"{len(ok)} kernels compiled (distinct specialisations per target), "
        f"{datetime.date.today().isoformat()}.",
        "",
        "Registers per thread; spills in bytes (stores + loads); shared memory in bytes (Triton's",
        "allocation, for reductions); stack frame in bytes. A row covers the kernels of one",
        "constexpr set and warp count that differ only in argument dtypes (student/teacher/",
        "gradient pointers, listed) and in the specialisation of integer arguments (divisible by",
        "16, equal to 1); a range shows their spread, spill/shared/stack over both targets.",
        "",
        "## Summary",
        "",
        "| kernel | kernels | max registers | max spill | max shared | max stack |",
        "|---|---|---|---|---|---|",
        *summary,
        "",
        "## Every specialisation",
        "",
        "| kernel | constexprs | warps | registers sm_90 | registers sm_80 | spill | shared "
        "| stack | kernels per target | dtypes |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ])


def _sort_spec(spec: str) -> list:
    out = []
    for part in spec.split():
        name, _, value = part.partition("=")
        out.append((name, int(value) if value.lstrip("-").isdigit() else 0, value))
    return out


def _short(t: str) -> str:
    return t.lstrip("*")


def _range(group: list[dict], *keys: str) -> str:
    values = [sum(g[k] for k in keys) for g in group]
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _dtypes_cell(dtypes: list[str]) -> str:
    return " ".join(dtypes) if len(dtypes) <= 3 else f"{len(dtypes)} combinations"
