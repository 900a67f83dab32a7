// See block_cache.h.
#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <list>
#include <map>
#include <mutex>
#include <string>

namespace fastkd {
namespace {

int64_t limit_from_env() {
  constexpr int64_t kDefaultMiB = 2048;
  const char* text = std::getenv("FASTKD_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  if (*end != '\0' || mib < 0) {
    TORCH_WARN("fastkd: FASTKD_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", text,
               "'; using ", kDefaultMiB);
    return kDefaultMiB << 20;
  }
  return static_cast<int64_t>(mib) << 20;
}

class BlockCache final : public c10::Allocator {
 public:
  BlockCache() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCachedBytes) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    Block* block = take(nbytes);
    if (block == nullptr) {
      block = new Block{c10::alloc_cpu(nbytes), nbytes};
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ += static_cast<int64_t>(nbytes);
    }
    report(block->ptr, static_cast<int64_t>(block->size));
    return {block->ptr, block, &BlockCache::on_free, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  BlockCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, limit_, hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked();
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t limit = limit_;
    limit_ = 0;
    trim_locked();
    limit_ = limit;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
    std::list<Block*>::iterator lru_pos;             // valid while cached
    std::multimap<size_t, Block*>::iterator size_pos;  // valid while cached
  };

  // A cached block of nbytes .. nbytes + nbytes / 8, or nullptr (counted as a miss).
  Block* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = by_size_.lower_bound(nbytes);
    if (it == by_size_.end() || it->first > nbytes + nbytes / 8) {
      ++misses_;
      return nullptr;
    }
    Block* block = it->second;
    by_size_.erase(it);
    lru_.erase(block->lru_pos);
    cached_ -= static_cast<int64_t>(block->size);
    in_use_ += static_cast<int64_t>(block->size);
    ++hits_;
    return block;
  }

  // torch.profiler(profile_memory=True) sees these blocks as it sees the default allocator's.
  void report(void* ptr, int64_t delta) {
    int64_t in_use, cached;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use = in_use_;
      cached = cached_;
    }
    c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<size_t>(in_use),
                                     static_cast<size_t>(in_use + cached),
                                     c10::Device(c10::DeviceType::CPU));
  }

  void give_back(Block* block) {
    report(block->ptr, -static_cast<int64_t>(block->size));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= static_cast<int64_t>(block->size);
      if (static_cast<int64_t>(block->size) <= limit_) {
        lru_.push_front(block);
        block->lru_pos = lru_.begin();
        block->size_pos = by_size_.emplace(block->size, block);
        cached_ += static_cast<int64_t>(block->size);
        trim_locked();
        return;
      }
    }
    release(block);
  }

  // Releases the least recently freed blocks until the cache holds at most limit_ bytes.
  void trim_locked() {
    while (cached_ > limit_) {
      Block* block = lru_.back();
      lru_.pop_back();
      by_size_.erase(block->size_pos);
      cached_ -= static_cast<int64_t>(block->size);
      release(block);
    }
  }

  static void release(Block* block) {
    c10::free_cpu(block->ptr);
    delete block;
  }

  static void on_free(void* ctx);

  std::mutex mutex_;
  std::list<Block*> lru_;  // most recently freed first
  std::multimap<size_t, Block*> by_size_;
  int64_t cached_ = 0;  // bytes in freed blocks
  int64_t in_use_ = 0;  // bytes in blocks handed out
  int64_t limit_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
BlockCache& cache() {
  static BlockCache* instance = new BlockCache();
  return *instance;
}

void BlockCache::on_free(void* ctx) { cache().give_back(static_cast<Block*>(ctx)); }

constexpr c10::DispatchKeySet kCpuKeys{c10::DispatchKey::CPU};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().type() != c10::DeviceType::CPU) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &cache(), kCpuKeys,
                                   c10::typeMetaToScalarType(options.dtype()),
                                   options.memory_format_opt());
}

at::Tensor empty_output_like(const at::Tensor& like) {
  if (!like.is_cpu()) return at::empty_strided(like.sizes(), like.strides(), like.options());
  return at::detail::empty_strided_generic(like.sizes(), like.strides(), &cache(), kCpuKeys,
                                           like.scalar_type());
}

BlockCacheInfo block_cache_info() { return cache().info(); }

void set_block_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "fastkd: the CPU block cache limit must be >= 0 bytes, got ", bytes);
  cache().set_limit(bytes);
}

void empty_block_cache() { cache().clear(); }

}  // namespace fastkd
