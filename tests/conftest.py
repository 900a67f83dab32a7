"""Test setup shared by every suite.

Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors. The switch must be set
before any Triton kernel is defined, i.e. before fastkd is imported, so it lives here.
"""

import os

import torch

if not torch.cuda.is_available():
    # Set, not defaulted: a CI environment with TRITON_INTERPRET=0 would leave the "triton" entry
    # of CPU_BACKENDS below without a way to run on this machine's CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"

# FASTKD_BACKEND (read when fastkd is imported) would turn every backend="auto" call into that
# backend, and the tests of what "auto" picks would check the environment instead. The tests that
# check the variable itself set it in a subprocess of their own.
os.environ.pop("FASTKD_BACKEND", None)

from hypothesis import settings  # noqa: E402

# Property tests run as part of the normal suite: bounded examples, no per-example deadline (the
# first call of an op may compile or warm caches).
settings.register_profile("fastkd", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("fastkd")

CUDA = torch.cuda.is_available()
# Backends that run on this machine's tensors, for parametrised tests.
CPU_BACKENDS = ("cpu", "triton", "torch") if not CUDA else ("cpu", "torch")
GPU_BACKENDS = ("cuda", "triton", "torch")
