// CUDA kernels of variable-length compaction (see varlen.cpp for the op schemas and semantics).
//
// varlen_compact:
//   1. flags[i] = keep[i] (int64, N = B*L, flags[N] = 0), then an in-place CUB DeviceScan::ExclusiveSum
//      over N + 1 items: dest[i] is the packed row of flat position i (row-major order), dest[N] = T.
//   2. one block: cu_seqlens[b] = dest[b*L], stats = (T, max row length).
//   3. without `total`: ONE device->host copy of stats (the only sync) to allocate the outputs;
//      with `total`: no sync (indices are pre-filled with -1 so that a wrong total is memory-safe).
//   4. indices[dest[i]] = i for kept i (dest < T).
//   5. one warp per packed row: the row of x copied with the widest aligned vector (16/8/4/2/1 bytes),
//      the side tensors (position ids, labels) copied by lane 0.
// All offsets are int64 (T*D may exceed 2^31). Everything runs on the current stream.
//
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h, which needs cuBLAS/cuSPARSE headers), so
// the file also compiles against a CPU-only torch wheel (tests/test_build.py; that wheel lacks the
// generated c10/cuda/impl/cuda_cmake_macros.h, so the check defines C10_CUDA_NO_CMAKE_CONFIGURE_FILE,
// which on Linux changes nothing).

#include "varlen.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/device/device_scan.cuh>

#include <cstdint>

namespace omnisift {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 32 * kWarpsPerBlock;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int grid_for(int64_t items, int64_t per_block) {
  const int64_t g = ceil_div(items, per_block);
  return static_cast<int>(g < 1 ? 1 : (g > 65535 * 8 ? 65535 * 8 : g));
}

__global__ void flags_kernel(const bool* __restrict__ keep, int64_t* __restrict__ flags, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i <= n; i += int64_t(gridDim.x) * blockDim.x)
    flags[i] = (i < n && keep[i]) ? 1 : 0;
}

__global__ void seqinfo_kernel(const int64_t* __restrict__ dest, int64_t B, int64_t L,
                               int32_t* __restrict__ cu_seqlens, int64_t* __restrict__ stats) {
  using BlockReduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  int64_t local_max = 0;
  for (int64_t b = threadIdx.x; b <= B; b += blockDim.x) {
    cu_seqlens[b] = static_cast<int32_t>(dest[b * L]);
    if (b < B) {
      const int64_t len = dest[(b + 1) * L] - dest[b * L];
      local_max = len > local_max ? len : local_max;
    }
  }
  const int64_t m = BlockReduce(tmp).Reduce(local_max, [](int64_t a, int64_t b) { return a > b ? a : b; });
  if (threadIdx.x == 0) {
    stats[0] = dest[B * L];
    stats[1] = m;
  }
}

__global__ void index_kernel(const bool* __restrict__ keep, const int64_t* __restrict__ dest, int64_t n, int64_t T,
                             int64_t* __restrict__ indices) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (keep[i]) {
      const int64_t t = dest[i];
      if (t < T) indices[t] = i;
    }
  }
}

__device__ __forceinline__ void copy_elem(char* dst, const char* src, int size) {
  switch (size) {
    case 8: *reinterpret_cast<uint64_t*>(dst) = *reinterpret_cast<const uint64_t*>(src); break;
    case 4: *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src); break;
    case 2: *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src); break;
    default:
      for (int j = 0; j < size; ++j) dst[j] = src[j];
  }
}

struct SideArgs {
  // position ids [K, B, L] (strides in bytes) -> out [K, T]; K = 0 when absent.
  const char* pos = nullptr;
  char* pos_out = nullptr;
  int64_t K = 0, psk = 0, psb = 0, psl = 0;
  int pisz = 0;
  // labels [B, L] -> out [T]; null when absent.
  const char* lab = nullptr;
  char* lab_out = nullptr;
  int64_t lsb = 0, lsl = 0;
  int lisz = 0;
};

// out[t] = src row of flat position indices[t] = (b, l) (byte offset b*sb + l*sl); invalid indices
// (outside [0, B*L)) give zero rows / zero side values. One warp per row. VecT: 16/8/4/2/1-byte words.
template <typename VecT>
__global__ void gather_rows_kernel(const char* __restrict__ src, int64_t sb, int64_t sl, int64_t L, int64_t n_src,
                                   const int64_t* __restrict__ indices, int64_t T, char* __restrict__ out,
                                   int64_t row_bytes, SideArgs side) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int64_t n_warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t n_vec = row_bytes / int64_t(sizeof(VecT));
  for (int64_t t = warp; t < T; t += n_warps) {
    const int64_t i = indices[t];
    const bool valid = i >= 0 && i < n_src;
    const int64_t b = valid ? i / L : 0, l = valid ? i % L : 0;
    VecT* dst = reinterpret_cast<VecT*>(out + t * row_bytes);
    if (valid) {
      const VecT* s = reinterpret_cast<const VecT*>(src + b * sb + l * sl);
      for (int64_t v = lane; v < n_vec; v += 32) dst[v] = s[v];
    } else {
      for (int64_t v = lane; v < n_vec; v += 32) dst[v] = VecT{};
    }
    if (lane == 0) {
      for (int64_t k = 0; k < side.K; ++k) {
        char* d = side.pos_out + (k * T + t) * side.pisz;
        if (valid)
          copy_elem(d, side.pos + k * side.psk + b * side.psb + l * side.psl, side.pisz);
        else
          for (int j = 0; j < side.pisz; ++j) d[j] = 0;
      }
      if (side.lab != nullptr) {
        char* d = side.lab_out + t * side.lisz;
        if (valid)
          copy_elem(d, side.lab + b * side.lsb + l * side.lsl, side.lisz);
        else
          for (int j = 0; j < side.lisz; ++j) d[j] = 0;
      }
    }
  }
}

// out row indices[t] (contiguous [N, D]) = src row t (byte stride ss); invalid indices are skipped.
template <typename VecT>
__global__ void scatter_rows_kernel(const char* __restrict__ src, int64_t ss, const int64_t* __restrict__ indices,
                                    int64_t T, int64_t n_out, char* __restrict__ out, int64_t row_bytes) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int64_t n_warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t n_vec = row_bytes / int64_t(sizeof(VecT));
  for (int64_t t = warp; t < T; t += n_warps) {
    const int64_t i = indices[t];
    if (i < 0 || i >= n_out) continue;
    const VecT* s = reinterpret_cast<const VecT*>(src + t * ss);
    VecT* d = reinterpret_cast<VecT*>(out + i * row_bytes);
    for (int64_t v = lane; v < n_vec; v += 32) d[v] = s[v];
  }
}

// Widest power-of-two word size (<= 16) dividing every pointer / stride / row size.
inline int vec_bytes(std::initializer_list<uint64_t> values) {
  uint64_t acc = 16;  // caps the result at 16
  for (uint64_t v : values) acc |= v;
  // The lowest set bit of the OR of all values is the largest power of two dividing every one of them.
  return static_cast<int>(acc & (~acc + 1));
}

template <typename F>
void dispatch_vec(int w, F&& f) {
  switch (w) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

void launch_gather(const at::Tensor& src, int64_t sb, int64_t sl, int64_t L, int64_t n_src,
                   const at::Tensor& indices, at::Tensor& out, int64_t row_bytes, const SideArgs& side,
                   cudaStream_t stream) {
  const int64_t T = indices.size(0);
  if (T == 0) return;
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int w = vec_bytes({reinterpret_cast<uint64_t>(sp), reinterpret_cast<uint64_t>(op),
                           static_cast<uint64_t>(sb), static_cast<uint64_t>(sl), static_cast<uint64_t>(row_bytes)});
  const int grid = grid_for(T, kWarpsPerBlock);
  dispatch_vec(w, [&](auto tag) {
    using VecT = decltype(tag);
    gather_rows_kernel<VecT><<<grid, kThreads, 0, stream>>>(sp, sb, sl, L, n_src, indices.const_data_ptr<int64_t>(),
                                                             T, op, row_bytes, side);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

CompactResult varlen_compact_cuda(const at::Tensor& x_in, const at::Tensor& keep_in,
                                  const std::optional<at::Tensor>& position_ids,
                                  const std::optional<at::Tensor>& labels, std::optional<int64_t> total) {
  check_compact_args(x_in, keep_in, position_ids, labels, total);
  const c10::cuda::CUDAGuard guard(x_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = x_in.size(0), L = x_in.size(1), D = x_in.size(2), N = B * L;
  const at::Tensor x = (x_in.stride(2) == 1 || D <= 1) ? x_in : x_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  const bool* kp = keep.const_data_ptr<bool>();
  const auto long_opts = keep.options().dtype(at::kLong);

  // 1. flags + in-place exclusive scan over N + 1 items (64-bit item count).
  auto dest = at::empty({N + 1}, long_opts);
  int64_t* dp = dest.data_ptr<int64_t>();
  flags_kernel<<<grid_for(N + 1, 256), 256, 0, stream>>>(kp, dp, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, dp, dp, N + 1, stream));
  auto temp = at::empty({static_cast<int64_t>(temp_bytes) + 1}, keep.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.data_ptr(), temp_bytes, dp, dp, N + 1, stream));

  // 2. cu_seqlens + (T, max_seqlen).
  auto cu = at::empty({B + 1}, keep.options().dtype(at::kInt));
  auto stats = at::empty({2}, long_opts);
  seqinfo_kernel<<<1, kThreads, 0, stream>>>(dp, B, L, cu.data_ptr<int32_t>(), stats.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 3. The single device->host read, only when the size is not host-known.
  int64_t T = 0, max_len = -1;
  if (total.has_value()) {
    T = *total;
  } else {
    const at::Tensor host = stats.to(at::kCPU);
    T = host.const_data_ptr<int64_t>()[0];
    max_len = host.const_data_ptr<int64_t>()[1];
  }

  // 4. indices.
  auto indices = at::empty({T}, long_opts);
  if (T > 0) {
    if (total.has_value())  // a wrong total must not leave garbage indices: -1 = "no row"
      C10_CUDA_CHECK(cudaMemsetAsync(indices.data_ptr(), 0xFF, static_cast<size_t>(T) * sizeof(int64_t), stream));
    index_kernel<<<grid_for(N, 256), 256, 0, stream>>>(kp, dp, N, T, indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 5. rows + side tensors.
  SideArgs side;
  at::Tensor pos_out, lab_out;
  if (position_ids.has_value()) {
    const at::Tensor p3 = positions_as_3d(*position_ids);
    side.K = p3.size(0);
    pos_out = position_ids->dim() == 2 ? at::empty({T}, p3.options()) : at::empty({side.K, T}, p3.options());
    side.pisz = static_cast<int>(p3.element_size());
    side.psk = p3.stride(0) * side.pisz, side.psb = p3.stride(1) * side.pisz, side.psl = p3.stride(2) * side.pisz;
    side.pos = static_cast<const char*>(p3.const_data_ptr());
    side.pos_out = static_cast<char*>(pos_out.data_ptr());
  } else {
    pos_out = at::empty({0}, long_opts);
  }
  if (labels.has_value()) {
    lab_out = at::empty({T}, labels->options());
    side.lisz = static_cast<int>(labels->element_size());
    side.lsb = labels->stride(0) * side.lisz, side.lsl = labels->stride(1) * side.lisz;
    side.lab = static_cast<const char*>(labels->const_data_ptr());
    side.lab_out = static_cast<char*>(lab_out.data_ptr());
  } else {
    lab_out = at::empty({0}, long_opts);
  }
  auto packed = at::empty({T, D}, x.options());
  const int64_t isz = static_cast<int64_t>(x.element_size());
  launch_gather(x, x.stride(0) * isz, x.stride(1) * isz, L, N, indices, packed, D * isz, side, stream);
  return {packed, indices, cu, c10::SymInt(max_len), pos_out, lab_out};
}

at::Tensor varlen_scatter_cuda(const at::Tensor& packed_in, const at::Tensor& indices_in, int64_t batch,
                               int64_t seqlen, const at::Scalar& fill) {
  check_index_args("varlen_scatter", packed_in, indices_in);
  TORCH_CHECK_VALUE(packed_in.size(0) == indices_in.size(0), "varlen_scatter: packed has ", packed_in.size(0),
                    " rows but indices has ", indices_in.size(0));
  TORCH_CHECK_VALUE(batch >= 0 && seqlen >= 0, "varlen_scatter: batch and seqlen must be >= 0, got ", batch, ", ",
                    seqlen);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t T = packed_in.size(0), D = packed_in.size(1), N = batch * seqlen;
  const at::Tensor packed = (packed_in.stride(1) == 1 || D <= 1) ? packed_in : packed_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  auto out = at::full({batch, seqlen, D}, fill, packed.options());
  const int64_t isz = static_cast<int64_t>(packed.element_size()), row_bytes = D * isz, ss = packed.stride(0) * isz;
  if (T == 0 || row_bytes == 0) return out;
  const char* sp = static_cast<const char*>(packed.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int w = vec_bytes({reinterpret_cast<uint64_t>(sp), reinterpret_cast<uint64_t>(op), static_cast<uint64_t>(ss),
                           static_cast<uint64_t>(row_bytes)});
  dispatch_vec(w, [&](auto tag) {
    using VecT = decltype(tag);
    scatter_rows_kernel<VecT><<<grid_for(T, kWarpsPerBlock), kThreads, 0, stream>>>(
        sp, ss, indices.const_data_ptr<int64_t>(), T, N, op, row_bytes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor varlen_gather_cuda(const at::Tensor& src_in, const at::Tensor& indices_in) {
  check_index_args("varlen_gather", src_in, indices_in);
  const c10::cuda::CUDAGuard guard(src_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = src_in.size(0), D = src_in.size(1), T = indices_in.size(0);
  const at::Tensor src = (src_in.stride(1) == 1 || D <= 1) ? src_in : src_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  auto out = at::empty({T, D}, src.options());
  const int64_t isz = static_cast<int64_t>(src.element_size());
  if (D > 0) launch_gather(src, 0, src.stride(0) * isz, N > 0 ? N : 1, N, indices, out, D * isz, SideArgs{}, stream);
  return out;
}

}  // namespace
}  // namespace omnisift

TORCH_LIBRARY_IMPL(omnisift, CUDA, m) {
  m.impl("varlen_compact", &omnisift::varlen_compact_cuda);
  m.impl("varlen_scatter", &omnisift::varlen_scatter_cuda);
  m.impl("varlen_gather", &omnisift::varlen_gather_cuda);
}
