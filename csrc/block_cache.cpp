// See block_cache.h.
#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <list>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace fastkd {
namespace {

int64_t limit_from_env() {
  constexpr int64_t kDefaultMiB = 2048;
  constexpr long long kMaxMiB = std::numeric_limits<int64_t>::max() >> 20;
  const char* text = std::getenv("FASTKD_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  if (*end != '\0' || mib < 0) {
    TORCH_WARN("fastkd: FASTKD_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", text,
               "'; using ", kDefaultMiB);
    return kDefaultMiB << 20;
  }
  return static_cast<int64_t>(std::min(mib, kMaxMiB)) << 20;
}

class BlockCache final : public c10::Allocator {
 public:
  BlockCache() : limit_(limit_from_env()) {
    // A fork while another thread holds the lock (a tensor freed on a Python thread, say) would
    // leave the child's copy locked forever: hold it across fork, and give the child a fresh one.
    pthread_atfork([] { cache_lock().lock(); }, [] { cache_lock().unlock(); },
                   [] { new (&cache_lock()) std::mutex(); });
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    Block* block = take(nbytes);
    if (block == nullptr) {
      block = new Block{c10::alloc_cpu(nbytes), nbytes};
      std::lock_guard<std::mutex> lock(mutex_);
      lend_locked(block);
    }
    // The context is the data pointer itself (a "simple" DataPtr, which copy-on-write clones
    // require); the deleter finds the block in lent_.
    return {block->ptr, block->ptr, &BlockCache::on_free, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  BlockCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, in_use_, limit_, hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      evicted = trim_locked(limit_);
    }
    release(evicted);
  }

  void clear() {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted = trim_locked(0);
    }
    release(evicted);
  }

  static std::mutex& cache_lock();

 private:
  struct Block {
    void* ptr;
    size_t size;
    std::list<Block*>::iterator lru_pos;               // valid while cached
    std::multimap<size_t, Block*>::iterator size_pos;  // valid while cached
  };

  // The smallest cached block that serves nbytes (a block of size S serves S - S/8 .. S bytes),
  // or nullptr (counted as a miss).
  Block* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = by_size_.lower_bound(nbytes);
    if (it == by_size_.end() || it->first - it->first / 8 > nbytes) {
      ++misses_;
      return nullptr;
    }
    Block* block = it->second;
    by_size_.erase(it);
    lru_.erase(block->lru_pos);
    cached_ -= static_cast<int64_t>(block->size);
    ++hits_;
    lend_locked(block);
    return block;
  }

  void lend_locked(Block* block) {
    in_use_ += static_cast<int64_t>(block->size);
    lent_.emplace(block->ptr, block);
    report_locked(block, +1);
  }

  void give_back(void* ptr) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = lent_.find(ptr);
      TORCH_INTERNAL_ASSERT(it != lent_.end(), "fastkd: freeing a block the cache did not lend");
      Block* block = it->second;
      lent_.erase(it);
      in_use_ -= static_cast<int64_t>(block->size);
      if (static_cast<int64_t>(block->size) <= limit_) {
        lru_.push_front(block);
        block->lru_pos = lru_.begin();
        block->size_pos = by_size_.emplace(block->size, block);
        cached_ += static_cast<int64_t>(block->size);
        evicted = trim_locked(limit_);
      } else {
        evicted.push_back(block);
      }
      // Under the lock, so the totals match this event and no other thread hands the block out
      // (and reports it) before its release is reported.
      report_locked(block, -1);
    }
    release(evicted);
  }

  // torch.profiler(profile_memory=True) sees these blocks as it sees the default allocator's.
  void report_locked(const Block* block, int sign) {
    c10::reportMemoryUsageToProfiler(block->ptr, sign * static_cast<int64_t>(block->size),
                                     static_cast<size_t>(in_use_),
                                     static_cast<size_t>(in_use_ + cached_),
                                     c10::Device(c10::DeviceType::CPU));
  }

  // Unlinks the least recently freed blocks until at most `limit` bytes stay cached; the caller
  // releases them after unlocking (munmap of large blocks is slow).
  std::vector<Block*> trim_locked(int64_t limit) {
    std::vector<Block*> evicted;
    while (cached_ > limit) {
      Block* block = lru_.back();
      lru_.pop_back();
      by_size_.erase(block->size_pos);
      cached_ -= static_cast<int64_t>(block->size);
      evicted.push_back(block);
    }
    return evicted;
  }

  static void release(const std::vector<Block*>& blocks) {
    for (Block* block : blocks) {
      c10::free_cpu(block->ptr);
      delete block;
    }
  }

  static void on_free(void* ptr);

  std::mutex mutex_;
  std::list<Block*> lru_;  // most recently freed first
  std::multimap<size_t, Block*> by_size_;
  std::unordered_map<void*, Block*> lent_;  // blocks handed out, by data pointer
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

std::mutex& BlockCache::cache_lock() { return cache().mutex_; }

void BlockCache::on_free(void* ptr) { cache().give_back(ptr); }

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
