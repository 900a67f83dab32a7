// Memory for the large outputs of fastkd's CPU ops (the gradients they write), kept for reuse.
//
// Why: a gradient the size of a feature map (tens of MB) is, with glibc's default malloc, a fresh
// mmap on every call, and the kernel then faults in and zeroes every 4 KiB page as the op first
// writes it. On common servers that costs more than the write itself (measured: 96 MB of gradient
// written in about 4 ms into mapped pages, 25-60 ms into fresh ones). A training loop asks for
// the same sizes every step, so blocks freed by one step serve the next with their pages mapped.
//
// Blocks of at least kMinCachedBytes go through the cache; smaller ones, which malloc already
// serves from its heap, go to the default CPU allocator. Freed blocks are kept, most recently
// freed first, up to a limit (FASTKD_CPU_CACHE_MB at start-up, default 2048; 0 turns the cache
// off); past it the least recently freed are released. A block of S bytes serves requests of
// S - S/8 to S bytes. The cached blocks stay mapped between steps, so a process's resident memory
// can be higher by up to the limit than if malloc had returned them. Thread-safe and fork-safe;
// the tensors are ordinary CPU tensors (resizable, shareable, lazily clonable).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastkd {

constexpr size_t kMinCachedBytes = size_t{1} << 20;

// A dense tensor of `sizes` and `options` (its memory format included) for a fastkd op's output:
// from the block cache on the CPU, from at::empty elsewhere.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
// The same with `like`'s sizes and strides (like must be dense and non-overlapping).
at::Tensor empty_output_like(const at::Tensor& like);

struct BlockCacheInfo {
  int64_t cached_bytes;  // held in freed blocks, ready for reuse
  int64_t in_use_bytes;  // in blocks handed out and not yet freed
  int64_t limit_bytes;
  int64_t hits;          // requests served by a cached block
  int64_t misses;        // requests of kMinCachedBytes or more that needed new memory
};

BlockCacheInfo block_cache_info();
// Sets the limit (0 turns the cache off) and releases cached blocks beyond it.
void set_block_cache_limit(int64_t bytes);
// Releases every cached block (memory in use is not touched).
void empty_block_cache();

}  // namespace fastkd
