"""Results of a benchmark run: the machine description, JSON, the stdout table and the PNG plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import torch

SCHEMA = "fastkd-bench/1"
MODE_ORDER = {"fwd": 0, "fwdbwd": 1, "bwd": 2}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout fastkd runs from; ``FASTKD_COMMIT`` overrides, for copies
    of the tree that carry no git metadata."""
    if os.environ.get("FASTKD_COMMIT"):
        return os.environ["FASTKD_COMMIT"], None
    where = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def environment(device: str, cache: int) -> dict:
    import fastkd

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    commit, dirty = git_commit()
    return {
        "device": device,
        "device_name": gpu or cpu_model(),
        "gpu_name": gpu,
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cache_bytes": cache,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastkd": fastkd.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _key(m: dict) -> tuple[str, str, str]:
    return m["case"], m["mode"], m["impl"]


class Results:
    """Every measurement of one or more runs on one machine."""

    def __init__(self, env: dict):
        self.env = env
        self.created = now()
        self.runs: list[dict] = []
        self.measurements: list[dict] = []
        self.skipped: list[dict] = []

    @classmethod
    def load(cls, path: str | os.PathLike) -> Results:
        data = json.loads(Path(path).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{path} is not a fastkd benchmark file (schema {SCHEMA})")
        res = cls(data["environment"])
        res.created = data["created"]
        res.runs = data["runs"]
        res.measurements = data["measurements"]
        res.skipped = data["skipped"]
        return res

    def add_run(self, info: dict) -> int:
        self.runs.append(info)
        return len(self.runs) - 1

    def merge(self, measurements: list[dict], skipped: list[dict]) -> None:
        """Adds a run's records. A new measurement of a (case, mode, impl) replaces an earlier
        measurement or skip of it; a new skip replaces an earlier skip only, so a later run cut
        short by its time budget does not erase what an earlier run measured."""
        measured = {_key(m) for m in measurements}
        self.measurements = [m for m in self.measurements if _key(m) not in measured]
        self.measurements += measurements
        have = {_key(m) for m in self.measurements}
        new_skips = {_key(s) for s in skipped}
        self.skipped = [s for s in self.skipped if _key(s) not in have | new_skips]
        self.skipped += [s for s in skipped if _key(s) not in have]

    def annotated(self) -> list[dict]:
        """Measurements with their speedups over eager and torch.compile of the same case/mode."""
        times = {_key(m): m["median_ms"] for m in self.measurements}
        out = []
        for m in self.measurements:
            m = dict(m)
            for peer in ("eager", "compile"):
                ref = times.get((m["case"], m["mode"], peer))
                ok = ref is not None and ref > 0 and m["median_ms"] > 0
                m[f"speedup_vs_{peer}"] = ref / m["median_ms"] if ok else None
            out.append(m)
        return out

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "created": self.created,
            "environment": self.env,
            "copy_bandwidth_gbps": self.copy_gbps(),
            "runs": self.runs,
            "measurements": self.annotated(),
            "skipped": self.skipped,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes atomically, so a run stopped midway leaves the last complete file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the results from other users
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    def copy_gbps(self) -> float | None:
        return self.runs[-1]["copy_bandwidth"]["gbps"] if self.runs else None


def _fmt_time(ms: float) -> str:
    if abs(ms) < 1:
        return f"{ms * 1e3:.1f} us"
    if ms < 1000:
        return f"{ms:.3f} ms"
    return f"{ms / 1e3:.2f} s"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def table(res: Results, run: int | None = None) -> str:
    """A fixed-width table of the measurements of one run (default: all), with speedups taken
    over everything in `res`, and a summary of what was skipped and why."""
    annotated = [m for m in res.annotated() if run is None or m["run"] == run]
    skipped = [s for s in res.skipped if run is None or s["run"] == run]
    env = res.env
    copy = res.copy_gbps()
    head = [
        f"fastkd benchmark on {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"triton {env['triton']}, commit {(env['git_commit'] or 'unknown')[:12]}",
        f"copy bandwidth (read + write): {_fmt(copy, '.1f', ' GB/s')}; GB/s counts the fewest "
        "bytes each loss must move; bwd = fwdbwd - fwd",
    ]
    cols = [
        "shape",
        "dtype",
        "variant",
        "mode",
        "impl",
        "median",
        "GB/s",
        "%copy",
        "vs eager",
        "vs compile",
        "peak mem",
        "rel.err",
    ]
    rows = []
    for m in annotated:
        impl = f"fastkd[{m['backend']}]" if m["impl"] == "fastkd" and m["backend"] else m["impl"]
        pct = None if m["copy_fraction"] is None else 100 * m["copy_fraction"]
        rows.append(
            [
                "x".join(map(str, m["shape"])),
                m["dtype"],
                m["variant"],
                m["mode"],
                impl,
                _fmt_time(m["median_ms"]),
                _fmt(m["gbps"], ".1f"),
                _fmt(pct, ".1f", "%"),
                _fmt(m["speedup_vs_eager"], ".2f", "x"),
                _fmt(m["speedup_vs_compile"], ".2f", "x"),
                _fmt_bytes(m["peak_mem_bytes"]),
                _fmt(m["rel_err"], ".0e"),
            ]
        )
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    left = {0, 1, 2, 3, 4}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = head + ["", line(cols), line(["-" * w for w in widths])]
    previous = None
    for m, r in zip(annotated, rows, strict=True):
        if previous is not None and previous != m["case"]:
            out.append("")
        previous = m["case"]
        out.append(line(r))
    if skipped:
        reasons: dict[tuple[str, str], int] = {}
        for s in skipped:
            reasons[(s["impl"], s["reason"])] = reasons.get((s["impl"], s["reason"]), 0) + 1
        out += ["", f"skipped ({len(skipped)}):"]
        out += [f"  {impl}: {reason} (x{n})" for (impl, reason), n in reasons.items()]
    return "\n".join(out)


def markdown(res: Results, modes: tuple[str, ...] = ("fwdbwd",)) -> str:
    """A Markdown table for a README: one row per case and mode, fastkd (backend auto) beside
    PyTorch eager and torch.compile, and fastkd's share of the copy bandwidth."""
    by_key = {_key(m): m for m in res.annotated()}
    cols = ["loss", "shape", "dtype", "variant", "mode", "fastkd", "eager", "compile",
            "vs eager", "vs compile", "fastkd %copy"]
    rows = []

    def peer_time(case: str, mode: str, name: str) -> str:
        peer = by_key.get((case, mode, name))
        return "-" if peer is None else _fmt_time(peer["median_ms"])

    for (case, mode, impl), m in by_key.items():
        if impl != "fastkd" or mode not in modes:
            continue
        pct = None if m["copy_fraction"] is None else 100 * m["copy_fraction"]
        rows.append([
            m["loss"], "x".join(map(str, m["shape"])), m["dtype"], m["variant"], mode,
            _fmt_time(m["median_ms"]), peer_time(case, mode, "eager"),
            peer_time(case, mode, "compile"),
            _fmt(m["speedup_vs_eager"], ".2f", "x"), _fmt(m["speedup_vs_compile"], ".2f", "x"),
            _fmt(pct, ".0f", "%"),
        ])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def plot(res: Results, path: str | os.PathLike) -> None:
    """GB/s of each implementation per case, one panel per (dtype, mode), with the copy-bandwidth
    roofline; log scale, since launch-bound small cases and large ones differ by orders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [m for m in res.annotated() if not m["derived"] and m["gbps"]]
    several_losses = len({m["loss"] for m in ms}) > 1

    def group(m: dict) -> str:
        label = f"{'x'.join(map(str, m['shape']))}\n{m['variant']}"
        return f"{m['loss']}\n{label}" if several_losses else label

    panels: dict[tuple[str, str], list[dict]] = {}
    for m in sorted(ms, key=lambda m: (m["dtype"], MODE_ORDER[m["mode"]])):
        panels.setdefault((m["dtype"], m["mode"]), []).append(m)
    if not panels:
        panels[("-", "fwd")] = []
    impls = list(dict.fromkeys(m["impl"] for m in ms))
    copy = res.copy_gbps()
    most = max(len({group(m) for m in sel}) for sel in panels.values())
    width = min(40.0, max(8.0, 0.6 * most * max(1, len(impls)) ** 0.5 + 3))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.6 * len(panels)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bar = 0.8 / max(1, len(impls))
    for ax, ((dtype, mode), sel) in zip(axes[:, 0], panels.items(), strict=True):
        groups = list(dict.fromkeys(group(m) for m in sel))
        where = {g: i for i, g in enumerate(groups)}
        for j, impl in enumerate(impls):
            mine = [m for m in sel if m["impl"] == impl]
            if mine:
                xs = [where[group(m)] - 0.4 + bar * (j + 0.5) for m in mine]
                ax.bar(xs, [m["gbps"] for m in mine], bar, label=impl, color=colors[j % 10])
        if copy:
            ax.axhline(
                copy, color="black", linestyle="--", linewidth=1, label=f"copy {copy:.0f} GB/s"
            )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_yscale("log")
        tops = [m["gbps"] for m in sel] + ([copy] if copy else [])
        if tops:
            ax.set_ylim(top=2.5 * max(tops))
        ax.set_ylabel("GB/s over the fewest bytes")
        ax.set_title(f"{res.env['device_name']}: {dtype} {mode}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
