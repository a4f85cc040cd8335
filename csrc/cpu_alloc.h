// Large CPU outputs of the extension's kernels: reused blocks, and transparent huge pages for new ones.
//
// Writing a freshly mapped output costs more than the copy that fills it: every 4 KiB page faults on
// its first write, and a fault costs more than copying the page. Fresh mappings are the rule, not the
// exception: glibc serves blocks of 32 MiB or more (its largest mmap threshold) with a new mmap every
// call, and smaller ones come back from its heap already mapped only while nothing else trimmed the
// heap (running a model between two calls can trim it), so without a cache every call would fault its
// large outputs in anew.
//
// So blocks of 256 KiB or more come from a cache of freed blocks, as CUDA's caching allocator does on
// the GPU: a block is reused for a request of at least half its size, so a steady stream of calls
// faults nothing. The 256 KiB floor sits below the selector's intermediates (1,024,000 bytes each at
// omni7b-20s), so that they are reused too. Two users: the kernels' outputs (empty_cpu_output,
// always), and torch's CPU allocator while a cpu_allocator_scope is open (the Python fast path opens
// one around each CPU call, so that its GEMM outputs and other intermediates reuse blocks too; smaller
// blocks are then plain posix_memalign).
// A freed block is kept while the cache holds at most OMNISIFT_CPU_OUTPUT_CACHE_MB (default: 1/16 of
// the physical memory, at least 256 MiB and at most 4 GiB; the oldest blocks are freed to make room;
// 0 turns the cache off; read once, see cpu_settings.h); release_cpu_output_cache() frees every
// cached block. The default grows with the memory because a long clip's blocks are large (a
// 300-second clip's survivors and packed output are ~0.4-0.5 GB each): a cache too small for both
// frees them after every call and faults them in again on the next. A new block of 32 MiB or more
// gets 2 MiB pages (posix_memalign 2 MiB + MADV_HUGEPAGE; OMNISIFT_CPU_HUGEPAGES=0 turns that off);
// smaller blocks keep 4 KiB pages, with which they are faster in the project's benchmarks. A block's
// bytes are not cleared for reuse (allocators never clear).
//
// Every block's DataPtr has context == data and the one deleter release_block (a side table holds the
// capacities), so torch treats them as plain allocations (raw_deleter, copy-on-write clones).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>

#include "cpu_settings.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

namespace omnisift {

namespace detail {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinCachedBytes = size_t(256) << 10;   // smaller blocks: torch's allocator
constexpr size_t kSmallBlockStep = size_t(256) << 10;   // capacities below 2 MiB: multiples of this
constexpr size_t kMinHugePageBytes = size_t(32) << 20;  // glibc's largest mmap threshold

struct Block {
  void* ptr;
  size_t capacity;  // bytes: a multiple of 2 MiB, or of kSmallBlockStep below 2 MiB
};

// Freed blocks (most recent last) and the capacity of every live block. Leaked on purpose: tensors
// may be freed during exit.
struct BlockCache {
  std::mutex mutex;
  std::vector<Block> blocks;
  std::unordered_map<void*, size_t> live;
  size_t bytes = 0;
};

inline BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

// The DataPtr deleter (context == data, so torch sees a plain data pointer): keeps the block for
// reuse within the cache's limit (dropping the oldest blocks to make room), else frees it.
inline void release_block(void* ptr) {
  std::vector<void*> to_free;
  {
    BlockCache& c = block_cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    const auto it = c.live.find(ptr);  // absent: a small block of CachedCPUAllocator (or nullptr)
    size_t capacity = it == c.live.end() ? 0 : it->second;
    if (it != c.live.end()) c.live.erase(it);
#if defined(__GLIBC__)
    // A block handed out inside a scope but freed outside it with plain free() (oneDNN frees its raw
    // buffers with whatever allocator is current then) leaves a stale entry; should glibc give that
    // address to a smaller block that comes back here, do not keep it as a block of the old capacity.
    if (capacity > 0 && malloc_usable_size(ptr) < capacity) capacity = 0;
#endif
    const size_t limit = capacity == 0 ? 0 : cpu_output_cache_limit();
    if (capacity == 0 || capacity > limit) {
      to_free.push_back(ptr);
    } else {
      size_t drop = 0;
      while (drop < c.blocks.size() && c.bytes + capacity > limit) {
        c.bytes -= c.blocks[drop].capacity;
        to_free.push_back(c.blocks[drop].ptr);
        ++drop;
      }
      c.blocks.erase(c.blocks.begin(), c.blocks.begin() + static_cast<std::ptrdiff_t>(drop));
      c.blocks.push_back(Block{ptr, capacity});
      c.bytes += capacity;
    }
  }
  for (void* p : to_free) std::free(p);
}

// A block of at least nbytes: the smallest cached one of capacity below twice the request, else a
// new one (2 MiB pages from 32 MiB on). nullptr when memory runs out.
inline void* acquire_block(size_t nbytes, bool use_cache) {
  const size_t step = nbytes >= kHugePage ? kHugePage : kSmallBlockStep;
  const size_t capacity = (nbytes + step - 1) / step * step;
  BlockCache& c = block_cache();
  if (use_cache) {
    std::lock_guard<std::mutex> lock(c.mutex);
    size_t best = c.blocks.size();
    for (size_t i = 0; i < c.blocks.size(); ++i) {
      const size_t cap = c.blocks[i].capacity;
      if (cap >= capacity && cap < 2 * capacity && (best == c.blocks.size() || cap < c.blocks[best].capacity)) {
        best = i;
      }
    }
    if (best != c.blocks.size()) {
      const Block b = c.blocks[best];
      c.bytes -= b.capacity;
      c.blocks.erase(c.blocks.begin() + static_cast<std::ptrdiff_t>(best));
      c.live.insert_or_assign(b.ptr, b.capacity);
      return b.ptr;
    }
  }
  void* block = nullptr;
  const bool huge = capacity >= kMinHugePageBytes && cpu_hugepage_outputs_enabled();
  if (posix_memalign(&block, huge ? kHugePage : 64, capacity) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) (void)madvise(block, capacity, MADV_HUGEPAGE);  // advice: a no-op where THP is off
#endif
  std::lock_guard<std::mutex> lock(c.mutex);
  c.live.insert_or_assign(block, use_cache ? capacity : 0);  // capacity 0: freed, never cached
  return block;
}

// torch's CPU allocator while a cpu_allocator_scope is open: blocks of 256 KiB or more from the cache,
// smaller ones from posix_memalign (64-byte aligned, as torch's own). One deleter for every block
// (oneDNN allocates through raw_allocate/raw_deallocate, which need it).
struct CachedCPUAllocator final : public c10::Allocator {
  c10::Allocator* previous = nullptr;
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::kCPU);
    if (n == 0) return {nullptr, nullptr, &release_block, cpu};
    void* p = nullptr;
    if (n >= kMinCachedBytes && cpu_output_cache_limit() > 0) {
      p = acquire_block(n, true);
    } else if (posix_memalign(&p, 64, n) != 0) {
      p = nullptr;
    }
    TORCH_CHECK(p != nullptr, "omnisift: CPU out of memory allocating ", n, " bytes");
    return {p, p, &release_block, cpu};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release_block; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

struct AllocatorScopeState {
  std::mutex mutex;
  int depth = 0;
  int suspended = 0;
  CachedCPUAllocator allocator;
};

inline AllocatorScopeState& allocator_scope_state() {
  static AllocatorScopeState* state = new AllocatorScopeState();
  return *state;
}

}  // namespace detail

// Opens (enter) or closes a scope in which torch's CPU allocator serves allocations of 256 KiB or more
// from the cache (nested and concurrent scopes share one; the allocator in place before the first is
// restored when the last closes). c10::SetCPUAllocator keeps an allocator of higher priority that
// someone else installed: the scope then changes nothing. Returns whether the cache is in place.
inline bool cpu_allocator_scope(bool enter) {
  auto& st = detail::allocator_scope_state();
  std::lock_guard<std::mutex> lock(st.mutex);
  if (enter) {
    if (st.depth++ == 0) {
      st.allocator.previous = c10::GetCPUAllocator();
      if (st.suspended == 0) c10::SetCPUAllocator(&st.allocator, /*priority=*/0);
    }
  } else if (st.depth > 0 && --st.depth == 0) {
    if (c10::GetCPUAllocator() == &st.allocator) c10::SetCPUAllocator(st.allocator.previous, /*priority=*/0);
  }
  return c10::GetCPUAllocator() == &st.allocator;
}

// Suspends (suspend) or resumes an open scope: while suspended, torch's own allocator is back. For
// memory that outlives the scope and is freed through whatever allocator is current at that time
// (oneDNN's reordered weights: ideep frees with GetCPUAllocator()->raw_deallocate): a block of the
// cache freed outside the cache would leave it a stale entry. Returns whether the cache is in place.
inline bool cpu_allocator_suspend(bool suspend) {
  auto& st = detail::allocator_scope_state();
  std::lock_guard<std::mutex> lock(st.mutex);
  if (suspend) {
    if (st.suspended++ == 0 && c10::GetCPUAllocator() == &st.allocator) {
      c10::SetCPUAllocator(st.allocator.previous, /*priority=*/0);
    }
  } else if (st.suspended > 0 && --st.suspended == 0 && st.depth > 0) {
    c10::SetCPUAllocator(&st.allocator, /*priority=*/0);
  }
  return c10::GetCPUAllocator() == &st.allocator;
}

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

// The bytes the cache may hold now (0: off).
inline int64_t cpu_output_cache_limit_bytes() { return static_cast<int64_t>(cpu_output_cache_limit()); }

// Bytes held by the cache now.
inline int64_t cpu_output_cache_bytes() {
  detail::BlockCache& c = detail::block_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return static_cast<int64_t>(c.bytes);
}

// Copies one output row with non-temporal stores (SSE2, every x86-64 CPU has them) when the
// destination is 16-byte aligned and the row is long: a large output is written once and not read
// back soon, and streaming stores skip reading each destination line first (a third of the traffic of
// a cached copy). Elsewhere memcpy. Call stream_fence() before the output is handed over.
// next_src (optional): the source row copied next, prefetched into L2 line by line alongside (the
// gathered rows are scattered, and each is too short a stream for the hardware prefetcher to ramp
// up).
inline void copy_row_streaming(char* dst, const char* src, size_t bytes, const char* next_src = nullptr) {
#if defined(__x86_64__) || defined(_M_X64)
  if (bytes >= 4096 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    size_t i = 0;
    for (; i + 64 <= bytes; i += 64) {
      if (next_src) _mm_prefetch(next_src + i, _MM_HINT_T1);
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    if (i < bytes) std::memcpy(dst + i, src + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void stream_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

// at::empty(sizes, options) for a kernel's CPU output; outputs of 256 KiB or more come from the cache of
// freed blocks when it holds one that fits, else from a new block (2 MiB pages from 32 MiB on).
inline at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  const bool cached = cpu_output_cache_limit() > 0;
  const bool huge = nbytes >= detail::kMinHugePageBytes && cpu_hugepage_outputs_enabled();
  if (!options.device().is_cpu() || nbytes < detail::kMinCachedBytes || !(cached || huge)) {
    return at::empty(sizes, options);
  }
  void* block = detail::acquire_block(nbytes, cached);
  if (block == nullptr) return at::empty(sizes, options);
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes,
                       c10::DataPtr(block, block, &detail::release_block, c10::Device(c10::kCPU)),
                       c10::GetCPUAllocator(), /*resizable=*/true);
  at::Tensor out = at::empty({0}, options);
  out.set_(std::move(storage), 0, sizes);
  return out;
}

}  // namespace omnisift
