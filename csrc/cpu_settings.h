// The extension's CPU settings, read from the environment once (at first use) and again only when
// reload_cpu_settings() is called (the op omnisift::reload_cpu_settings). Kernels and the block cache's
// allocation path never call getenv: a setenv elsewhere in the process (which glibc does not make safe
// against concurrent getenv) cannot race with them, and a call sees one consistent set of values.
//
//   OMNISIFT_CPU_OUTPUT_CACHE_MB  bytes the cache of freed CPU blocks may hold, in MiB (unset: 1/16 of
//                                 the physical memory within [256 MiB, 4 GiB]; 0, "off", negative or
//                                 not a number: off)
//   OMNISIFT_CPU_HUGEPAGES        0/false/off: no transparent huge pages for new blocks of 32 MiB or more
//   OMNISIFT_CPU_ISA              base | avx2 | avx512: caps the instruction set of the inner loops
//                                 (another value raises a ValueError at the next kernel call)
//   OMNISIFT_CPU_BASELINE         1: the same as OMNISIFT_CPU_ISA=base
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace omnisift {

inline bool env_flag_off(const char* v) {
  return v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0);
}

// The output cache's limit when OMNISIFT_CPU_OUTPUT_CACHE_MB is unset: 1/16 of the physical memory,
// clamped to [256 MiB, 4 GiB]. Cached blocks stay mapped, so a long call's peak RSS also counts
// intermediates it already freed; the ceiling bounds what a big host keeps mapped between calls.
inline size_t default_cpu_output_cache_limit() {
  const size_t floor = size_t(256) << 20;
  const size_t ceiling = size_t(4) << 30;
#if defined(__unix__) || defined(__APPLE__)
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page_size > 0) {
    const size_t physical = static_cast<size_t>(pages) * static_cast<size_t>(page_size);
    return std::min(ceiling, std::max(floor, physical / 16));
  }
#endif
  return floor;
}

struct CpuSettings {
  std::atomic<size_t> cache_limit{0};
  std::atomic<bool> hugepages{true};
  std::atomic<int> isa_cap{2};  // 0 base, 1 avx2, 2 avx512; -1: OMNISIFT_CPU_ISA holds another value
  std::mutex mutex;             // guards bad_isa and serialises reloads
  std::string bad_isa;
};

namespace detail {

inline void read_cpu_settings(CpuSettings& s) {
  std::lock_guard<std::mutex> lock(s.mutex);
  size_t limit = default_cpu_output_cache_limit();
  if (const char* v = std::getenv("OMNISIFT_CPU_OUTPUT_CACHE_MB"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    limit = (end == v || *end != '\0' || mb <= 0) ? 0 : static_cast<size_t>(mb) << 20;
  }
  s.cache_limit.store(limit, std::memory_order_relaxed);
  s.hugepages.store(!env_flag_off(std::getenv("OMNISIFT_CPU_HUGEPAGES")), std::memory_order_relaxed);
  int cap = 2;
  if (const char* forced = std::getenv("OMNISIFT_CPU_BASELINE"); forced && forced[0] == '1') cap = 0;
  s.bad_isa.clear();
  if (const char* isa = std::getenv("OMNISIFT_CPU_ISA"); isa && *isa) {
    const std::string v(isa);
    if (v == "base" || v == "avx2" || v == "avx512") {
      cap = std::min(cap, v == "base" ? 0 : v == "avx2" ? 1 : 2);
    } else {
      cap = -1;
      s.bad_isa = v;
    }
  }
  s.isa_cap.store(cap, std::memory_order_relaxed);
}

}  // namespace detail

// The process's settings (read on first use).
inline CpuSettings& cpu_settings() {
  static CpuSettings* settings = [] {
    auto* s = new CpuSettings();  // leaked on purpose: tensors may be freed during exit
    detail::read_cpu_settings(*s);
    return s;
  }();
  return *settings;
}

// Reads the environment again (tests, or a process that changes the variables at run time).
inline bool reload_cpu_settings() {
  detail::read_cpu_settings(cpu_settings());
  return true;
}

inline size_t cpu_output_cache_limit() { return cpu_settings().cache_limit.load(std::memory_order_relaxed); }
inline bool cpu_hugepage_outputs_enabled() { return cpu_settings().hugepages.load(std::memory_order_relaxed); }

// The instruction-set cap (0 base, 1 avx2, 2 avx512), or -1 with the bad value in *bad.
inline int cpu_isa_cap(std::string* bad) {
  CpuSettings& s = cpu_settings();
  const int cap = s.isa_cap.load(std::memory_order_relaxed);
  if (cap < 0 && bad != nullptr) {
    std::lock_guard<std::mutex> lock(s.mutex);
    *bad = s.bad_isa;
  }
  return cap;
}

}  // namespace omnisift
