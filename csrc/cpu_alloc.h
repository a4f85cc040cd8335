// Large CPU outputs of the extension's kernels: reused blocks, and transparent huge pages for new ones.
//
// On the project's 2-core VMs a 4 KiB page fault costs 1.5-4 us, so writing a freshly mapped output
// costs more than the copy that fills it: the gather of the 34 MB packed output of omni7b-20s took
// 20-26 ms with 4 KiB pages against 5-7.4 ms with 2 MiB pages. Fresh mappings are the rule, not the
// exception: glibc serves blocks of 32 MiB or more (its largest mmap threshold) with a new mmap every
// call, and smaller ones come back from its heap already mapped only while nothing else trimmed the
// heap; after a call of the release-style loop (or of a model) the fast path's two outputs of
// omni7b-20s bf16 (14 and 17 MB) faulted about 7,500 pages per call, 8-12 ms of a 45 ms call.
//
// So the kernels' outputs of 1 MiB or more come from a small cache of freed output blocks, as CUDA's
// caching allocator does on the GPU: a block is reused for a request of at least half its size, so a
// steady stream of calls faults nothing. A freed block is kept while the cache holds at most
// OMNISIFT_CPU_OUTPUT_CACHE_MB (default 256; the oldest blocks are freed to make room; 0 turns the cache
// off); torch.ops.omnisift.release_cpu_output_cache() frees every cached block. A new block of 32 MiB or
// more gets 2 MiB pages (posix_memalign 2 MiB + MADV_HUGEPAGE; OMNISIFT_CPU_HUGEPAGES=0 turns that off;
// smaller blocks with 2 MiB pages measured slower, so they are plain). A block's bytes are not cleared
// for reuse: every kernel here writes all of its output.
//
// The storage stays resizable (a later resize_ allocates with torch's CPU allocator and hands this
// block back to the cache).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace omnisift {

inline bool env_flag_off(const char* v) {
  return v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0);
}

inline bool cpu_hugepage_outputs_enabled() { return !env_flag_off(std::getenv("OMNISIFT_CPU_HUGEPAGES")); }

// Bytes the output cache may hold: OMNISIFT_CPU_OUTPUT_CACHE_MB (default 256; 0 turns the cache off).
inline size_t cpu_output_cache_limit() {
  const char* v = std::getenv("OMNISIFT_CPU_OUTPUT_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t(256) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0' || mb <= 0) return 0;  // 0, negative or not a number: off
  return static_cast<size_t>(mb) << 20;
}

namespace detail {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinCachedBytes = size_t(1) << 20;     // smaller outputs: at::empty
constexpr size_t kMinHugePageBytes = size_t(32) << 20;  // glibc's largest mmap threshold

struct Block {
  void* ptr;
  size_t capacity;  // bytes, a multiple of 2 MiB
};

// Freed output blocks, most recent last. Leaked on purpose: tensors may be freed during exit.
struct BlockCache {
  std::mutex mutex;
  std::vector<Block> blocks;
  size_t bytes = 0;
};

inline BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

// The smallest cached block of capacity in [capacity, 2 * capacity), or {nullptr, 0}.
inline Block take_cached_block(size_t capacity) {
  BlockCache& c = block_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  size_t best = c.blocks.size();
  for (size_t i = 0; i < c.blocks.size(); ++i) {
    const size_t cap = c.blocks[i].capacity;
    if (cap >= capacity && cap < 2 * capacity && (best == c.blocks.size() || cap < c.blocks[best].capacity)) best = i;
  }
  if (best == c.blocks.size()) return Block{nullptr, 0};
  const Block b = c.blocks[best];
  c.bytes -= b.capacity;
  c.blocks.erase(c.blocks.begin() + static_cast<std::ptrdiff_t>(best));
  return b;
}

// The DataPtr deleter: keeps the block for reuse within the cache's limit (dropping the oldest blocks
// to make room), else frees it.
inline void release_block(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  const size_t limit = cpu_output_cache_limit();
  std::vector<void*> to_free;
  if (b->capacity > limit) {
    to_free.push_back(b->ptr);
  } else {
    BlockCache& c = block_cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    size_t drop = 0;
    while (drop < c.blocks.size() && c.bytes + b->capacity > limit) {
      c.bytes -= c.blocks[drop].capacity;
      to_free.push_back(c.blocks[drop].ptr);
      ++drop;
    }
    c.blocks.erase(c.blocks.begin(), c.blocks.begin() + static_cast<std::ptrdiff_t>(drop));
    c.blocks.push_back(*b);
    c.bytes += b->capacity;
  }
  delete b;
  for (void* p : to_free) std::free(p);
}

inline void* allocate_block(size_t capacity) {
  void* block = nullptr;
  const bool huge = capacity >= kMinHugePageBytes && cpu_hugepage_outputs_enabled();
  if (posix_memalign(&block, huge ? kHugePage : 64, capacity) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) (void)madvise(block, capacity, MADV_HUGEPAGE);  // advice: a no-op where THP is off
#endif
  return block;
}

}  // namespace detail

// Frees every cached block; returns the bytes released.
inline int64_t release_cpu_output_cache() {
  detail::BlockCache& c = detail::block_cache();
  std::vector<detail::Block> blocks;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    blocks.swap(c.blocks);
    c.bytes = 0;
  }
  int64_t bytes = 0;
  for (const auto& b : blocks) {
    bytes += static_cast<int64_t>(b.capacity);
    std::free(b.ptr);
  }
  return bytes;
}

// Bytes held by the cache now.
inline int64_t cpu_output_cache_bytes() {
  detail::BlockCache& c = detail::block_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return static_cast<int64_t>(c.bytes);
}

// at::empty(sizes, options) for a kernel's CPU output; outputs of 1 MiB or more come from the cache of
// freed outputs when it holds a block that fits, else from a new block (2 MiB pages from 32 MiB on).
inline at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  const bool cached = cpu_output_cache_limit() > 0;
  const bool huge = nbytes >= detail::kMinHugePageBytes && cpu_hugepage_outputs_enabled();
  if (!options.device().is_cpu() || nbytes < detail::kMinCachedBytes || !(cached || huge)) {
    return at::empty(sizes, options);
  }
  const size_t capacity = (nbytes + detail::kHugePage - 1) / detail::kHugePage * detail::kHugePage;
  detail::Block block = cached ? detail::take_cached_block(capacity) : detail::Block{nullptr, 0};
  if (block.ptr == nullptr) {
    block = detail::Block{detail::allocate_block(capacity), capacity};
    if (block.ptr == nullptr) return at::empty(sizes, options);
  }
  // The deleter's context: the block and its capacity (a cached block may be up to 2x the request).
  auto* ctx = new detail::Block(block);
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes,
                       c10::DataPtr(block.ptr, ctx, &detail::release_block, c10::Device(c10::kCPU)),
                       c10::GetCPUAllocator(), /*resizable=*/true);
  at::Tensor out = at::empty({0}, options);
  out.set_(std::move(storage), 0, sizes);
  return out;
}

}  // namespace omnisift
