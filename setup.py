"""Builds the one extension ``fastkd._C``.

* C++ CPU kernels always. Each ``csrc/cpu/<loss>.cpp`` is compiled once per CPU capability
  (DEFAULT, and AVX2 / AVX512 on x86-64) from small generated wrapper files, the way ATen builds
  its kernels, and the DEFAULT build picks the best one at run time with
  ``at::get_cpu_capability()`` (which honours ``ATEN_CPU_CAPABILITY``, so tests can force each
  variant).
* CUDA kernels whenever torch is a CUDA build and ``nvcc`` is found -- also on a machine without a
  GPU, so every ``.cu`` file is compiled in CI. ``FASTKD_BUILD_CUDA=0|1|auto`` (default auto).
  ``FASTKD_CUDA_ARCHS`` (default ``80;90a``) lists the SASS targets; PTX of the newest plain arch is
  embedded for newer GPUs.
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

# Target flags per capability. GCC's `#pragma GCC target` does not define the ISA macros that the
# ATen/Sleef headers test, so the wrapper defines them itself.
CPU_CAPABILITIES = {
    "AVX2": ("avx2,fma,f16c,bmi,bmi2", ["__AVX__", "__AVX2__", "__FMA__", "__F16C__"]),
    "AVX512": (
        "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2",
        ["__AVX__", "__AVX2__", "__FMA__", "__F16C__", "__AVX512F__", "__AVX512BW__",
         "__AVX512VL__", "__AVX512DQ__"],
    ),
}


def _build_cuda() -> bool:
    mode = os.environ.get("FASTKD_BUILD_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"FASTKD_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    available = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None
        or (CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    )
    if mode == "1" and not available:
        sys.exit("FASTKD_BUILD_CUDA=1 but torch is not a CUDA build or nvcc was not found")
    return mode != "0" and available


def _capability_wrappers(cpu_sources: list[str]) -> list[str]:
    """Writes one wrapper per (source, capability) under build/ and returns their paths."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    out_dir = os.path.join(ROOT, "build", "cpu_capability")
    os.makedirs(out_dir, exist_ok=True)
    wrappers = []
    for src in cpu_sources:
        name = os.path.splitext(os.path.basename(src))[0]
        for cap, (target, macros) in CPU_CAPABILITIES.items():
            path = os.path.join(out_dir, f"{name}.{cap}.cpp")
            lines = [f'#pragma GCC target("{target}")']
            lines += [f"#define {m} 1" for m in macros]
            lines += [
                f"#define CPU_CAPABILITY {cap}",
                f"#define CPU_CAPABILITY_{cap}",
                f'#include "{os.path.join(ROOT, src)}"',
            ]
            text = "\n".join(lines) + "\n"
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            wrappers.append(os.path.relpath(path, ROOT))
    return wrappers


def _nvidia_include_dirs() -> list[str]:
    """CUDA headers torch includes (cublas, cusparse, ...) ship in the nvidia wheels."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _cuda_arch_flags() -> list[str]:
    spec = os.environ.get("FASTKD_CUDA_ARCHS", "80;90a")
    archs = [a.strip() for a in spec.split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    plain = [a for a in archs if a.isdigit()]
    if plain:
        newest = max(plain, key=int)
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def extensions():
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    sources = ["csrc/fastkd.cpp", "csrc/autograd.cpp", "csrc/block_cache.cpp"] + cpu_sources
    sources += _capability_wrappers(cpu_sources)
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _build_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FASTKD_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                      "--expt-relaxed-constexpr"] + _cuda_arch_flags()
        return [
            CUDAExtension(
                "fastkd._C",
                sources,
                include_dirs=include_dirs + _nvidia_include_dirs(),
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fastkd._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    package_dir={"fastkd.kernels": "kernels"},
)
