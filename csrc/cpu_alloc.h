// Large CPU outputs of the extension's kernels, backed by transparent huge pages where the OS has them.
//
// glibc serves every block of 32 MiB or more (its largest mmap threshold) with a fresh mmap, so every
// 4 KiB page of such an output faults on first write, on every call. On the project's 2-core VMs that
// made the gather of the 34 MB packed output of omni7b-20s take 20-26 ms, three to five times the copy
// itself; with 2 MiB pages (17 faults, zeroing by the kernel included) 5-7.4 ms (python -m
// bench.cpu_choices, and profiles of the end-to-end call).
// Smaller blocks usually come back from glibc's heap already mapped, so they are left to at::empty.
// This is what torch's own THP_MEM_ALLOC_ENABLE=1 does for every tensor of 2 MiB or more; here it is
// limited to the kernels' outputs of at least 32 MiB.
//
// The storage stays resizable (a later resize_ allocates with torch's CPU allocator and frees this
// block with free()). OMNISIFT_CPU_HUGEPAGES=0 turns it off (then at::empty). Without Linux's
// MADV_HUGEPAGE it is always at::empty.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace omnisift {

inline bool cpu_hugepage_outputs_enabled() {
  const char* v = std::getenv("OMNISIFT_CPU_HUGEPAGES");
  return v == nullptr || !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 ||
                           std::strcmp(v, "off") == 0);
}

namespace detail {
inline void free_hugepage_block(void* p) { std::free(p); }
}  // namespace detail

// at::empty(sizes, options) for CPU options, huge-page backed when the buffer is at least 32 MiB.
inline at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t(2) << 20;
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  constexpr size_t kMinBytes = size_t(32) << 20;
  if (options.device().is_cpu() && nbytes >= kMinBytes && cpu_hugepage_outputs_enabled()) {
    const size_t padded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* block = nullptr;
    if (posix_memalign(&block, kHugePage, padded) == 0) {
      (void)madvise(block, padded, MADV_HUGEPAGE);  // advice: a no-op where THP is off
      c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes,
                           c10::DataPtr(block, block, &detail::free_hugepage_block, c10::Device(c10::kCPU)),
                           c10::GetCPUAllocator(), /*resizable=*/true);
      at::Tensor out = at::empty({0}, options);
      out.set_(std::move(storage), 0, sizes);
      return out;
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace omnisift
