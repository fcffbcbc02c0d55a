// CUDA kernels of the fused losses (a block per row for statistics, elementwise gradients) and their registration.
//
// Statistics: each thread folds a strided part of the row into online softmax statistics (one exp per
// value), then warps and the block merge them; thread 0 folds the row's result into the running
// statistics of earlier class blocks. Gradients: a 2-D grid (rows x column chunks), each element read
// once and overwritten with its gradient. Everything accumulates in fp32.
//
// Only c10/cuda headers are included (not ATen/cuda/CUDAContext.h, which needs cusparse.h from the pip
// nvidia packages): builds need nothing beyond CUDA_HOME.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../blockwise.h"
#include "../margin_math.h"

namespace facecl::gpu {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kElementsPerThread = 4;  // gradient kernels: column chunk per block = kThreads * this
constexpr int64_t kMaxColumnChunks = 65535;  // gridDim.y limit

__device__ __forceinline__ SoftmaxStats warp_merge(SoftmaxStats stats) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const SoftmaxStats other{__shfl_down_sync(0xffffffffu, stats.max, offset),
                             __shfl_down_sync(0xffffffffu, stats.sum_exp, offset)};
    stats = merge_stats(stats, other);
  }
  return stats;
}

// Merge over the whole block (blockDim.x == kThreads); the result is valid in thread 0. Ends with a barrier
// so that a second call may reuse the shared buffers.
__device__ SoftmaxStats block_merge(SoftmaxStats stats) {
  __shared__ float warp_max[kWarps];
  __shared__ float warp_sum[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  stats = warp_merge(stats);
  if (lane == 0) {
    warp_max[warp] = stats.max;
    warp_sum[warp] = stats.sum_exp;
  }
  __syncthreads();
  if (warp == 0) {
    stats = lane < kWarps ? SoftmaxStats{warp_max[lane], warp_sum[lane]} : SoftmaxStats{-INFINITY, 0.0f};
    stats = warp_merge(stats);
  }
  __syncthreads();
  return stats;
}

// grid: (rows); block: kThreads. Folds columns [col_offset, col_offset + num_cols) of each row.
template <typename scalar_t>
__global__ void margin_stats_kernel(const scalar_t* __restrict__ cos, int64_t row_stride, int64_t num_cols,
                                    int64_t col_offset, const int64_t* __restrict__ local_target, MarginParams params,
                                    float* __restrict__ row_max, float* __restrict__ sum_exp,
                                    float* __restrict__ target_logit) {
  const int64_t row = blockIdx.x;
  const scalar_t* cos_row = cos + row * row_stride;
  const int64_t target_column = local_target[row] - col_offset;  // in [0, num_cols) if this block holds it
  SoftmaxStats stats{-INFINITY, 0.0f};
  for (int64_t column = threadIdx.x; column < num_cols; column += blockDim.x) {
    const float cosine = static_cast<float>(cos_row[column]);
    float logit;
    if (column == target_column) {
      float value, derivative;
      margin_target(cosine, params, value, derivative);
      logit = params.scale * value;
      target_logit[row] = logit;
    } else {
      logit = negative_logit(cosine, params);
    }
    add_to_stats(stats, logit);
  }
  stats = block_merge(stats);
  if (threadIdx.x == 0) {
    const SoftmaxStats merged = merge_stats(SoftmaxStats{row_max[row], sum_exp[row]}, stats);
    row_max[row] = merged.max;
    sum_exp[row] = merged.sum_exp;
  }
}

// grid: (rows, column chunks); block: kThreads. Overwrites each cosine with d loss / d cosine.
template <typename scalar_t>
__global__ void margin_grad_kernel(scalar_t* __restrict__ cos, int64_t row_stride, int64_t num_cols, int64_t col_offset,
                                   const int64_t* __restrict__ local_target, MarginParams params,
                                   const float* __restrict__ row_max, const float* __restrict__ sum_exp,
                                   const float* __restrict__ grad_loss) {
  const int64_t row = blockIdx.x;
  scalar_t* cos_row = cos + row * row_stride;
  const int64_t target_column = local_target[row] - col_offset;
  const float max = row_max[row], sum = sum_exp[row], grad = grad_loss[row];
  const float coef = grad * params.scale / sum;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t column = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; column < num_cols;
       column += stride) {
    const float cosine = static_cast<float>(cos_row[column]);
    float result;
    if (column == target_column) {
      float value, derivative;
      margin_target(cosine, params, value, derivative);
      const float probability = expf(params.scale * value - max) / sum;
      result = grad * params.scale * (probability - 1.0f) * derivative;
    } else {
      result = is_filtered(cosine, params) ? 0.0f : coef * expf(params.scale * cosine - max);
    }
    cos_row[column] = static_cast<scalar_t>(result);
  }
}

// grid: (queries); block: kThreads. dots = q . k for keys [col_offset, col_offset + num_cols).
__global__ void unicon_stats_kernel(const float* __restrict__ dots, int64_t row_stride, int64_t num_cols,
                                    int64_t col_offset, const int64_t* __restrict__ query_labels,
                                    const int64_t* __restrict__ key_labels, const int64_t* __restrict__ own_key,
                                    float temperature, float margin, float* __restrict__ negative_max,
                                    float* __restrict__ negative_sum, float* __restrict__ positive_max,
                                    float* __restrict__ positive_sum) {
  const int64_t row = blockIdx.x;
  const float* dots_row = dots + row * row_stride;
  const int64_t own_column = own_key[row] - col_offset;
  const int64_t query_label = query_labels[row];
  SoftmaxStats negative{-INFINITY, 0.0f}, positive{-INFINITY, 0.0f};
  for (int64_t column = threadIdx.x; column < num_cols; column += blockDim.x) {
    const float similarity = dots_row[column] / temperature;
    if (is_positive(column, own_column, query_label, key_labels[col_offset + column])) {
      add_to_stats(positive, -similarity);
    } else {
      add_to_stats(negative, similarity + margin);
    }
  }
  negative = block_merge(negative);
  positive = block_merge(positive);
  if (threadIdx.x == 0) {
    negative = merge_stats(SoftmaxStats{negative_max[row], negative_sum[row]}, negative);
    positive = merge_stats(SoftmaxStats{positive_max[row], positive_sum[row]}, positive);
    negative_max[row] = negative.max;
    negative_sum[row] = negative.sum_exp;
    positive_max[row] = positive.max;
    positive_sum[row] = positive.sum_exp;
  }
}

// grid: (queries, column chunks); block: kThreads. Overwrites each dot product with d loss / d dot.
__global__ void unicon_grad_kernel(float* __restrict__ dots, int64_t row_stride, int64_t num_cols, int64_t col_offset,
                                   const int64_t* __restrict__ query_labels, const int64_t* __restrict__ key_labels,
                                   const int64_t* __restrict__ own_key, float temperature, float margin,
                                   const float* __restrict__ lse_negatives, const float* __restrict__ lse_positives,
                                   const float* __restrict__ grad_loss) {
  const int64_t row = blockIdx.x;
  float* dots_row = dots + row * row_stride;
  const int64_t own_column = own_key[row] - col_offset;
  const int64_t query_label = query_labels[row];
  const float lse_negative = lse_negatives[row], lse_positive = lse_positives[row];
  // loss = softplus(lse_neg + lse_pos); a query without negatives has loss 0 and no gradient.
  const float coef =
      lse_negative == -INFINITY ? 0.0f : grad_loss[row] * softplus_derivative(lse_negative + lse_positive);
  const float factor = coef / temperature;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t column = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; column < num_cols;
       column += stride) {
    const float similarity = dots_row[column] / temperature;
    const bool positive = is_positive(column, own_column, query_label, key_labels[col_offset + column]);
    const float exponent = positive ? -similarity - lse_positive : similarity + margin - lse_negative;
    const float weight = expf(exponent) * factor;
    dots_row[column] = positive ? -weight : weight;
  }
}

// Sum over the block (blockDim.x == kThreads), returned to every thread. Ends with a barrier.
__device__ float block_sum(float value) {
  __shared__ float warp_sums[kWarps];
  __shared__ float total;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  if (warp == 0) {
    value = lane < kWarps ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    if (lane == 0) {
      total = value;
    }
  }
  __syncthreads();
  return total;
}

// grid: (width); block: kThreads. Kept column s = start + blockIdx.x: row kept[s] of the gradient becomes
// a - (a . w) inv^2 w (no projection where |w| <= eps), a = row blockIdx.x of grad_rows, w the raw center
// row; then the non-kept rows below zero_below between kept[s - 1] and kept[s] (after kept[S - 1] for the
// last column) are zeroed. Each row belongs to one column: the blocks write disjoint rows.
template <typename scalar_t>
__global__ void sampled_center_grad_kernel(const float* __restrict__ grad_rows, int64_t grad_stride,
                                           const scalar_t* __restrict__ centers, const int64_t* __restrict__ kept,
                                           int64_t num_kept, int64_t start, const float* __restrict__ inv_norm,
                                           float max_inverse_norm, int64_t zero_below, scalar_t* __restrict__ out,
                                           int64_t dims) {
  const int64_t s = start + blockIdx.x, row = kept[s];
  const float* a = grad_rows + static_cast<int64_t>(blockIdx.x) * grad_stride;
  const scalar_t* w = centers + row * dims;
  float partial = 0.0f;
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    partial += a[d] * static_cast<float>(w[d]);
  }
  const float dot = block_sum(partial);
  const float inv = inv_norm[s];
  const float projection = inv < max_inverse_norm ? dot * inv * inv : 0.0f;
  scalar_t* out_row = out + row * dims;
  for (int64_t d = threadIdx.x; d < dims; d += blockDim.x) {
    out_row[d] = static_cast<scalar_t>(a[d] - projection * static_cast<float>(w[d]));
  }
  const int64_t gap_begin = s == 0 ? 0 : kept[s - 1] + 1;
  const int64_t gap_end = row < zero_below ? row : zero_below;
  for (int64_t index = gap_begin * dims + threadIdx.x; index < gap_end * dims; index += blockDim.x) {
    out[index] = static_cast<scalar_t>(0.0f);
  }
  if (s == num_kept - 1) {
    for (int64_t index = (row + 1) * dims + threadIdx.x; index < zero_below * dims; index += blockDim.x) {
      out[index] = static_cast<scalar_t>(0.0f);
    }
  }
}

dim3 gradient_grid(int64_t num_rows, int64_t num_cols) {
  const int64_t chunk = kThreads * kElementsPerThread;
  const int64_t chunks = std::min<int64_t>(kMaxColumnChunks, (num_cols + chunk - 1) / chunk);
  return dim3(static_cast<unsigned int>(num_rows), static_cast<unsigned int>(chunks));
}

// ---- backend for the drivers in blockwise.h -------------------------------------------------------------------

struct CudaKernels {
  static void sampled_center_grad_rows_(const Tensor& grad_rows_BD, const Tensor& centers_CD, const Tensor& kept_S,
                                        int64_t start, const Tensor& inv_norm_S, int64_t zero_rows_below,
                                        Tensor& workspace_CD) {
    const int64_t width = grad_rows_BD.size(0);
    if (width == 0) {
      return;
    }
    const c10::cuda::CUDAGuard device_guard(centers_CD.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const Tensor kept = kept_S.contiguous(), inv_norm = inv_norm_S.contiguous();
    FACECL_DISPATCH_LOSS_TYPES(centers_CD.scalar_type(), "sampled_center_grad_rows_", [&] {
      sampled_center_grad_kernel<scalar_t><<<static_cast<unsigned int>(width), kThreads, 0, stream>>>(
          grad_rows_BD.const_data_ptr<float>(), grad_rows_BD.stride(0), centers_CD.const_data_ptr<scalar_t>(),
          kept.const_data_ptr<int64_t>(), kept.size(0), start, inv_norm.const_data_ptr<float>(),
          static_cast<float>(kMaxInverseNorm), zero_rows_below, workspace_CD.mutable_data_ptr<scalar_t>(),
          centers_CD.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void margin_stats_block(const Tensor& cos_NB, const Tensor& local_target_N, int64_t col_offset,
                                 const MarginParams& params, Tensor& row_max_N, Tensor& sum_exp_N,
                                 Tensor& target_logit_N) {
    const int64_t num_rows = cos_NB.size(0), num_cols = cos_NB.size(1);
    if (num_rows == 0 || num_cols == 0) {
      return;
    }
    const c10::cuda::CUDAGuard device_guard(cos_NB.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const Tensor target_N = local_target_N.contiguous();
    FACECL_DISPATCH_LOSS_TYPES(cos_NB.scalar_type(), "margin_stats_block", [&] {
      margin_stats_kernel<scalar_t><<<static_cast<unsigned int>(num_rows), kThreads, 0, stream>>>(
          cos_NB.const_data_ptr<scalar_t>(), cos_NB.stride(0), num_cols, col_offset,
          target_N.const_data_ptr<int64_t>(), params, row_max_N.mutable_data_ptr<float>(),
          sum_exp_N.mutable_data_ptr<float>(), target_logit_N.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void margin_grad_block_(Tensor& cos_NB, const Tensor& local_target_N, int64_t col_offset,
                                 const MarginParams& params, const Tensor& row_max_N, const Tensor& sum_exp_N,
                                 const Tensor& grad_loss_N) {
    const int64_t num_rows = cos_NB.size(0), num_cols = cos_NB.size(1);
    if (num_rows == 0 || num_cols == 0) {
      return;
    }
    const c10::cuda::CUDAGuard device_guard(cos_NB.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const Tensor target_N = local_target_N.contiguous();
    FACECL_DISPATCH_LOSS_TYPES(cos_NB.scalar_type(), "margin_grad_block_", [&] {
      margin_grad_kernel<scalar_t><<<gradient_grid(num_rows, num_cols), kThreads, 0, stream>>>(
          cos_NB.mutable_data_ptr<scalar_t>(), cos_NB.stride(0), num_cols, col_offset,
          target_N.const_data_ptr<int64_t>(), params, row_max_N.const_data_ptr<float>(),
          sum_exp_N.const_data_ptr<float>(), grad_loss_N.const_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void unicon_stats_block(const Tensor& dots_BK, const Tensor& query_labels_B, const Tensor& key_labels_K,
                                 const Tensor& own_key_B, int64_t col_offset, double temperature, double margin,
                                 Tensor& negative_max_B, Tensor& negative_sum_B, Tensor& positive_max_B,
                                 Tensor& positive_sum_B) {
    const int64_t num_rows = dots_BK.size(0), num_cols = dots_BK.size(1);
    if (num_rows == 0 || num_cols == 0) {
      return;
    }
    const c10::cuda::CUDAGuard device_guard(dots_BK.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const Tensor query_labels = query_labels_B.contiguous(), key_labels = key_labels_K.contiguous(),
                 own_key = own_key_B.contiguous();
    unicon_stats_kernel<<<static_cast<unsigned int>(num_rows), kThreads, 0, stream>>>(
        dots_BK.const_data_ptr<float>(), dots_BK.stride(0), num_cols, col_offset,
        query_labels.const_data_ptr<int64_t>(), key_labels.const_data_ptr<int64_t>(),
        own_key.const_data_ptr<int64_t>(), static_cast<float>(temperature), static_cast<float>(margin),
        negative_max_B.mutable_data_ptr<float>(), negative_sum_B.mutable_data_ptr<float>(),
        positive_max_B.mutable_data_ptr<float>(), positive_sum_B.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void unicon_grad_block_(Tensor& dots_BK, const Tensor& query_labels_B, const Tensor& key_labels_K,
                                 const Tensor& own_key_B, int64_t col_offset, double temperature, double margin,
                                 const Tensor& lse_negatives_B, const Tensor& lse_positives_B,
                                 const Tensor& grad_loss_B) {
    const int64_t num_rows = dots_BK.size(0), num_cols = dots_BK.size(1);
    if (num_rows == 0 || num_cols == 0) {
      return;
    }
    const c10::cuda::CUDAGuard device_guard(dots_BK.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const Tensor query_labels = query_labels_B.contiguous(), key_labels = key_labels_K.contiguous(),
                 own_key = own_key_B.contiguous();
    unicon_grad_kernel<<<gradient_grid(num_rows, num_cols), kThreads, 0, stream>>>(
        dots_BK.mutable_data_ptr<float>(), dots_BK.stride(0), num_cols, col_offset,
        query_labels.const_data_ptr<int64_t>(), key_labels.const_data_ptr<int64_t>(),
        own_key.const_data_ptr<int64_t>(), static_cast<float>(temperature), static_cast<float>(margin),
        lse_negatives_B.const_data_ptr<float>(), lse_positives_B.const_data_ptr<float>(),
        grad_loss_B.const_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace facecl::gpu

TORCH_LIBRARY_IMPL(facecl, CUDA, m) {
  FACECL_REGISTER_FUSED_OPS(m, ::facecl::gpu::CudaKernels);
}
