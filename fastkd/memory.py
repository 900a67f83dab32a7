"""The CPU block cache that holds the memory of fastkd's large CPU outputs (the gradients its ops
write) for reuse.

With glibc's default ``malloc``, every gradient the size of a feature map is a fresh ``mmap``, and
the first write to each of its 4 KiB pages is a page fault in which the kernel maps and zeroes the
page. On common servers that costs several times the write itself. A training loop asks for the same
sizes every step, so fastkd keeps the blocks its outputs free and hands them to the next step with
their pages already mapped. Blocks under 1 MiB go to PyTorch's default CPU allocator.

The cache holds at most ``limit_bytes`` of freed blocks (``FASTKD_CPU_CACHE_MB`` when the extension
loads, default 2048; 0 turns it off), releasing the least recently freed first; a block of S bytes
serves requests of S - S/8 to S bytes. Memory in use is never touched. The kept blocks stay mapped,
so the process's resident memory can be higher by up to the limit than if ``malloc`` had returned
them. CUDA outputs use PyTorch's CUDA caching allocator as before.
"""

from __future__ import annotations

from . import _C


def cpu_cache_info() -> dict[str, int]:
    """``cached_bytes`` (freed blocks ready for reuse), ``in_use_bytes`` (blocks of live tensors),
    ``limit_bytes``, and the ``hits`` and ``misses`` of requests of 1 MiB or more since the
    extension loaded."""
    cached, in_use, limit, hits, misses = _C.cpu_cache_info()
    return {"cached_bytes": cached, "in_use_bytes": in_use, "limit_bytes": limit, "hits": hits,
            "misses": misses}


def set_cpu_cache_limit(nbytes: int) -> None:
    """Keeps at most ``nbytes`` of freed blocks (0 turns the cache off) and releases any beyond."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    _C.set_cpu_cache_limit(nbytes)


def empty_cpu_cache() -> None:
    """Releases every cached block to the system (blocks in use stay where they are)."""
    _C.empty_cpu_cache()
