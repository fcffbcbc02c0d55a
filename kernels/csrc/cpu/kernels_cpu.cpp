// CPU kernels of the fused losses (rows split by at::parallel_for, vectorisable tile loops) and their CPU registration.
//
// Each row is processed in tiles of kTile columns: the tile is converted to fp32 logits in a thread-local
// buffer, then max, sum of exp and gradients run as plain loops over that buffer that the compiler
// vectorises (`omp simd` reductions, a branch-free exp). The loops are compiled for AVX-512, AVX2 and
// baseline x86-64 and the best one is picked at load time (GCC/Clang target_clones). Below AVX-512 (no
// masked instructions) GCC vectorises the exp's clamps and selects only under -fno-trapping-math (setup.py);
// without it those clones stay scalar, ~6x slower (tests/kernels/test_cpu_vectorisation.py checks the speed).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cstdint>
#include <cstring>

#include "../blockwise.h"
#include "../margin_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__INTEL_COMPILER)
#define FACECL_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FACECL_VECTOR_CLONES
#endif

namespace facecl::cpu {
namespace {

using at::Tensor;

constexpr int64_t kTile = 1024;   // columns per tile: 4 KB of fp32 logits, stays in L1
constexpr int64_t kRowGrain = 4;  // rows per parallel task at least

// ---- vectorisable primitives ------------------------------------------------------------------------------------

// exp(x) with ~1e-7 relative error, in plain arithmetic so loops calling it vectorise: x = k*ln2 + r, exp(r)
// by a degree-7 polynomial on |r| <= ln2/2, 2^k built in the exponent bits. Returns 0 below -87.34 (where
// exp leaves the normal floats: the sums always hold a term exp(0) = 1) and propagates NaN.
inline float exp_vectorisable(float x) {
  constexpr float kLowest = -87.33654f;
  float clamped = x < kLowest ? kLowest : x;
  clamped = clamped > 88.0f ? 88.0f : clamped;
  const float k_float = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = clamped - k_float * 0.693145751953125f;                                    // ln2, high part
  r = r - k_float * 1.42860682030941723212e-6f;                                        // ln2, low part
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const int32_t k = static_cast<int32_t>(k_float);
  const float result = poly * std::bit_cast<float>((k + 127) << 23);
  return x < kLowest ? 0.0f : (x != x ? x : result);
}

FACECL_VECTOR_CLONES float max_of(const float* values, int64_t count) {
  float result = -INFINITY;
#pragma omp simd reduction(max : result)
  for (int64_t j = 0; j < count; ++j) {
    result = values[j] > result ? values[j] : result;
  }
  return result;
}

// sum_j exp(values[j] - shift)
FACECL_VECTOR_CLONES float sum_exp_shifted(const float* values, int64_t count, float shift) {
  float result = 0.0f;
#pragma omp simd reduction(+ : result)
  for (int64_t j = 0; j < count; ++j) {
    result += exp_vectorisable(values[j] - shift);
  }
  return result;
}

// Conversion of a tile of cosines (any input type) to the fp32 logits s * c, 0 where the filter drops c.
template <typename scalar_t>
inline void cosines_to_logits_body(const scalar_t* cosines, float* logits, int64_t count, float scale, float filter) {
  if (filter > 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) {
      const float c = static_cast<float>(cosines[j]);
      logits[j] = c > filter ? 0.0f : scale * c;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) {
      logits[j] = scale * static_cast<float>(cosines[j]);
    }
  }
}

FACECL_VECTOR_CLONES void cosines_to_logits(const float* c, float* out, int64_t n, float scale, float filter) {
  cosines_to_logits_body(c, out, n, scale, filter);
}
FACECL_VECTOR_CLONES void cosines_to_logits(const c10::BFloat16* c, float* out, int64_t n, float scale, float filter) {
  cosines_to_logits_body(c, out, n, scale, filter);
}
FACECL_VECTOR_CLONES void cosines_to_logits(const c10::Half* c, float* out, int64_t n, float scale, float filter) {
  cosines_to_logits_body(c, out, n, scale, filter);
}

// Gradient of a tile, written over the cosines: coef * exp(logit - row max), 0 for filtered entries.
template <typename scalar_t>
inline void softmax_grad_body(scalar_t* cosines, int64_t count, float scale, float filter, float row_max, float coef) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const float c = static_cast<float>(cosines[j]);
    const float grad = coef * exp_vectorisable(scale * c - row_max);
    cosines[j] = static_cast<scalar_t>((filter > 0.0f && c > filter) ? 0.0f : grad);
  }
}

FACECL_VECTOR_CLONES void softmax_grad(float* c, int64_t n, float scale, float filter, float row_max,
                                       float coef) {
  softmax_grad_body(c, n, scale, filter, row_max, coef);
}
FACECL_VECTOR_CLONES void softmax_grad(c10::BFloat16* c, int64_t n, float scale, float filter, float row_max,
                                       float coef) {
  softmax_grad_body(c, n, scale, filter, row_max, coef);
}
FACECL_VECTOR_CLONES void softmax_grad(c10::Half* c, int64_t n, float scale, float filter, float row_max,
                                       float coef) {
  softmax_grad_body(c, n, scale, filter, row_max, coef);
}

// UniCon tile: negatives get s + margin (positives -inf), positives get -s (negatives -inf); s = dot / T.
FACECL_VECTOR_CLONES void split_similarities(const float* dots, const int64_t* key_labels, int64_t count,
                                             int64_t own_column, int64_t query_label, float temperature, float margin,
                                             float* negatives, float* positives) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const float similarity = dots[j] / temperature;
    const bool positive = j == own_column || (query_label >= 0 && key_labels[j] == query_label);
    negatives[j] = positive ? -INFINITY : similarity + margin;
    positives[j] = positive ? -similarity : -INFINITY;
  }
}

// UniCon gradient tile over the dot products: d loss / d dot = coef / T * (negative ? p_neg : -p_pos).
FACECL_VECTOR_CLONES void unicon_grad_tile(float* dots, const int64_t* key_labels, int64_t count, int64_t own_column,
                                           int64_t query_label, float temperature, float margin, float lse_negatives,
                                           float lse_positives, float coef) {
  const float factor = coef / temperature;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const float similarity = dots[j] / temperature;
    const bool positive = j == own_column || (query_label >= 0 && key_labels[j] == query_label);
    const float exponent = positive ? -similarity - lse_positives : similarity + margin - lse_negatives;
    const float weight = exp_vectorisable(exponent) * factor;
    dots[j] = positive ? -weight : weight;
  }
}

// Folds a tile of fp32 values into running softmax statistics (two vectorised passes over the tile).
inline void fold_tile(SoftmaxStats& stats, const float* values, int64_t count) {
  const float tile_max = max_of(values, count);
  if (tile_max == -INFINITY) {
    return;  // every value masked out
  }
  const float new_max = stats.max > tile_max ? stats.max : tile_max;
  const float rescaled = stats.max == -INFINITY ? 0.0f : stats.sum_exp * std::exp(stats.max - new_max);
  stats = SoftmaxStats{new_max, rescaled + sum_exp_shifted(values, count, new_max)};
}

// ---- row kernels ----------------------------------------------------------------------------------------------

template <typename scalar_t>
void margin_stats_rows(const Tensor& cos_NB, const int64_t* local_target, int64_t col_offset,
                       const MarginParams& params, float* row_max, float* sum_exp, float* target_logit) {
  const int64_t num_rows = cos_NB.size(0), num_cols = cos_NB.size(1), row_stride = cos_NB.stride(0);
  const scalar_t* base = cos_NB.const_data_ptr<scalar_t>();
  at::parallel_for(0, num_rows, kRowGrain, [&](int64_t row_begin, int64_t row_end) {
    float logits[kTile];
    for (int64_t row = row_begin; row < row_end; ++row) {
      const scalar_t* cos_row = base + row * row_stride;
      const int64_t target_column = local_target[row] - col_offset;  // in [0, num_cols) if the block holds it
      const bool owns_target = target_column >= 0 && target_column < num_cols;
      SoftmaxStats stats{-INFINITY, 0.0f};
      for (int64_t tile_start = 0; tile_start < num_cols; tile_start += kTile) {
        const int64_t count = std::min(kTile, num_cols - tile_start);
        cosines_to_logits(cos_row + tile_start, logits, count, params.scale, params.interclass_filter);
        if (owns_target && target_column >= tile_start && target_column < tile_start + count) {
          float value, derivative;
          margin_target(static_cast<float>(cos_row[target_column]), params, value, derivative);
          logits[target_column - tile_start] = params.scale * value;
          target_logit[row] = params.scale * value;
        }
        fold_tile(stats, logits, count);
      }
      const SoftmaxStats merged = merge_stats(SoftmaxStats{row_max[row], sum_exp[row]}, stats);
      row_max[row] = merged.max;
      sum_exp[row] = merged.sum_exp;
    }
  });
}

template <typename scalar_t>
void margin_grad_rows_(Tensor& cos_NB, const int64_t* local_target, int64_t col_offset, const MarginParams& params,
                       const float* row_max, const float* sum_exp, const float* grad_loss) {
  const int64_t num_rows = cos_NB.size(0), num_cols = cos_NB.size(1), row_stride = cos_NB.stride(0);
  scalar_t* base = cos_NB.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, num_rows, kRowGrain, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      scalar_t* cos_row = base + row * row_stride;
      const int64_t target_column = local_target[row] - col_offset;
      const bool owns_target = target_column >= 0 && target_column < num_cols;
      // d loss_i / d logit_ij = softmax_ij - [j = target]; d logit / d cos = s (times the margin's slope on
      // the target).
      const float coef = grad_loss[row] * params.scale / sum_exp[row];
      float target_value = 0.0f, target_derivative = 0.0f;
      if (owns_target) {
        margin_target(static_cast<float>(cos_row[target_column]), params, target_value, target_derivative);
      }
      softmax_grad(cos_row, num_cols, params.scale, params.interclass_filter, row_max[row], coef);
      if (owns_target) {
        const float probability = std::exp(params.scale * target_value - row_max[row]) / sum_exp[row];
        cos_row[target_column] =
            static_cast<scalar_t>(grad_loss[row] * params.scale * (probability - 1.0f) * target_derivative);
      }
    }
  });
}

void unicon_stats_rows(const Tensor& dots_BK, const int64_t* query_labels, const int64_t* key_labels,
                       const int64_t* own_key, int64_t col_offset, float temperature, float margin,
                       float* negative_max, float* negative_sum, float* positive_max, float* positive_sum) {
  const int64_t num_rows = dots_BK.size(0), num_cols = dots_BK.size(1), row_stride = dots_BK.stride(0);
  const float* base = dots_BK.const_data_ptr<float>();
  at::parallel_for(0, num_rows, 1, [&](int64_t row_begin, int64_t row_end) {
    float negatives[kTile], positives[kTile];
    for (int64_t row = row_begin; row < row_end; ++row) {
      const float* dots_row = base + row * row_stride;
      SoftmaxStats negative{-INFINITY, 0.0f}, positive{-INFINITY, 0.0f};
      for (int64_t tile_start = 0; tile_start < num_cols; tile_start += kTile) {
        const int64_t count = std::min(kTile, num_cols - tile_start);
        split_similarities(dots_row + tile_start, key_labels + col_offset + tile_start, count,
                           own_key[row] - col_offset - tile_start, query_labels[row], temperature, margin, negatives,
                           positives);
        fold_tile(negative, negatives, count);
        fold_tile(positive, positives, count);
      }
      negative = merge_stats(SoftmaxStats{negative_max[row], negative_sum[row]}, negative);
      positive = merge_stats(SoftmaxStats{positive_max[row], positive_sum[row]}, positive);
      negative_max[row] = negative.max;
      negative_sum[row] = negative.sum_exp;
      positive_max[row] = positive.max;
      positive_sum[row] = positive.sum_exp;
    }
  });
}

void unicon_grad_rows_(Tensor& dots_BK, const int64_t* query_labels, const int64_t* key_labels,
                       const int64_t* own_key, int64_t col_offset, float temperature, float margin,
                       const float* lse_negatives, const float* lse_positives, const float* grad_loss) {
  const int64_t num_rows = dots_BK.size(0), num_cols = dots_BK.size(1), row_stride = dots_BK.stride(0);
  float* base = dots_BK.mutable_data_ptr<float>();
  at::parallel_for(0, num_rows, 1, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      float* dots_row = base + row * row_stride;
      // loss = softplus(z), z = lse_neg + lse_pos; a query without negatives has loss 0 and no gradient.
      const bool has_negatives = lse_negatives[row] != -INFINITY;
      const float coef =
          has_negatives ? grad_loss[row] * softplus_derivative(lse_negatives[row] + lse_positives[row]) : 0.0f;
      unicon_grad_tile(dots_row, key_labels + col_offset, num_cols, own_key[row] - col_offset, query_labels[row],
                       temperature, margin, lse_negatives[row], lse_positives[row], coef);
    }
  });
}

// Sampled normalised op, rows kept[start, start + width) of the gradient (see sampled_center_grad_rows_ in
// blockwise.h): row kept[s] = a_j - (a_j . w) inv^2 w (no projection where |w| <= eps), w the raw center row;
// then the non-kept rows below zero_below between kept[s - 1] and kept[s] (after kept[S - 1] for the last) are
// zeroed. Each row belongs to one s, so the parallel tasks write disjoint rows.
template <typename scalar_t>
void sampled_center_grad_rows(const float* grad_rows, int64_t grad_stride, const scalar_t* centers,
                              const int64_t* kept, int64_t num_kept, int64_t start, int64_t width,
                              const float* inv_norm, int64_t zero_below, scalar_t* out, int64_t dims) {
  at::parallel_for(0, width, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t s = start + j, row = kept[s];
      const float* a = grad_rows + j * grad_stride;
      const scalar_t* w = centers + row * dims;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dims; ++d) {
        dot += a[d] * static_cast<float>(w[d]);
      }
      const float inv = inv_norm[s];
      const float projection = static_cast<double>(inv) < kMaxInverseNorm ? dot * inv * inv : 0.0f;
      scalar_t* out_row = out + row * dims;
#pragma omp simd
      for (int64_t d = 0; d < dims; ++d) {
        out_row[d] = static_cast<scalar_t>(a[d] - projection * static_cast<float>(w[d]));
      }
      const int64_t gap_begin = s == 0 ? 0 : kept[s - 1] + 1, gap_end = std::min(row, zero_below);
      if (gap_begin < gap_end) {
        std::memset(static_cast<void*>(out + gap_begin * dims), 0, (gap_end - gap_begin) * dims * sizeof(scalar_t));
      }
      if (s == num_kept - 1 && row + 1 < zero_below) {
        std::memset(static_cast<void*>(out + (row + 1) * dims), 0, (zero_below - row - 1) * dims * sizeof(scalar_t));
      }
    }
  });
}

// ---- backend for the drivers in blockwise.h -------------------------------------------------------------------

struct CpuKernels {
  static void sampled_center_grad_rows_(const Tensor& grad_rows_BD, const Tensor& centers_CD, const Tensor& kept_S,
                                        int64_t start, const Tensor& inv_norm_S, int64_t zero_rows_below,
                                        Tensor& workspace_CD) {
    const Tensor kept = kept_S.contiguous(), inv_norm = inv_norm_S.contiguous();
    FACECL_DISPATCH_LOSS_TYPES(centers_CD.scalar_type(), "sampled_center_grad_rows_", [&] {
      sampled_center_grad_rows<scalar_t>(grad_rows_BD.const_data_ptr<float>(), grad_rows_BD.stride(0),
                                         centers_CD.const_data_ptr<scalar_t>(), kept.const_data_ptr<int64_t>(),
                                         kept.size(0), start, grad_rows_BD.size(0), inv_norm.const_data_ptr<float>(),
                                         zero_rows_below, workspace_CD.mutable_data_ptr<scalar_t>(),
                                         centers_CD.size(1));
    });
  }

  static void margin_stats_block(const Tensor& cos_NB, const Tensor& local_target_N, int64_t col_offset,
                                 const MarginParams& params, Tensor& row_max_N, Tensor& sum_exp_N,
                                 Tensor& target_logit_N) {
    const Tensor target_N = local_target_N.contiguous();
    FACECL_DISPATCH_LOSS_TYPES(cos_NB.scalar_type(), "margin_stats_block", [&] {
      margin_stats_rows<scalar_t>(cos_NB, target_N.const_data_ptr<int64_t>(), col_offset, params,
                                  row_max_N.mutable_data_ptr<float>(), sum_exp_N.mutable_data_ptr<float>(),
                                  target_logit_N.mutable_data_ptr<float>());
    });
  }

  static void margin_grad_block_(Tensor& cos_NB, const Tensor& local_target_N, int64_t col_offset,
                                 const MarginParams& params, const Tensor& row_max_N, const Tensor& sum_exp_N,
                                 const Tensor& grad_loss_N) {
    const Tensor target_N = local_target_N.contiguous();
    FACECL_DISPATCH_LOSS_TYPES(cos_NB.scalar_type(), "margin_grad_block_", [&] {
      margin_grad_rows_<scalar_t>(cos_NB, target_N.const_data_ptr<int64_t>(), col_offset, params,
                                  row_max_N.const_data_ptr<float>(), sum_exp_N.const_data_ptr<float>(),
                                  grad_loss_N.const_data_ptr<float>());
    });
  }

  static void unicon_stats_block(const Tensor& dots_BK, const Tensor& query_labels_B, const Tensor& key_labels_K,
                                 const Tensor& own_key_B, int64_t col_offset, double temperature, double margin,
                                 Tensor& negative_max_B, Tensor& negative_sum_B, Tensor& positive_max_B,
                                 Tensor& positive_sum_B) {
    const Tensor query_labels = query_labels_B.contiguous(), key_labels = key_labels_K.contiguous(),
                 own_key = own_key_B.contiguous();
    unicon_stats_rows(dots_BK, query_labels.const_data_ptr<int64_t>(), key_labels.const_data_ptr<int64_t>(),
                      own_key.const_data_ptr<int64_t>(), col_offset, static_cast<float>(temperature),
                      static_cast<float>(margin), negative_max_B.mutable_data_ptr<float>(),
                      negative_sum_B.mutable_data_ptr<float>(), positive_max_B.mutable_data_ptr<float>(),
                      positive_sum_B.mutable_data_ptr<float>());
  }

  static void unicon_grad_block_(Tensor& dots_BK, const Tensor& query_labels_B, const Tensor& key_labels_K,
                                 const Tensor& own_key_B, int64_t col_offset, double temperature, double margin,
                                 const Tensor& lse_negatives_B, const Tensor& lse_positives_B,
                                 const Tensor& grad_loss_B) {
    const Tensor query_labels = query_labels_B.contiguous(), key_labels = key_labels_K.contiguous(),
                 own_key = own_key_B.contiguous();
    unicon_grad_rows_(dots_BK, query_labels.const_data_ptr<int64_t>(), key_labels.const_data_ptr<int64_t>(),
                      own_key.const_data_ptr<int64_t>(), col_offset, static_cast<float>(temperature),
                      static_cast<float>(margin), lse_negatives_B.const_data_ptr<float>(),
                      lse_positives_B.const_data_ptr<float>(), grad_loss_B.const_data_ptr<float>());
  }
};

}  // namespace
}  // namespace facecl::cpu

TORCH_LIBRARY_IMPL(facecl, CPU, m) {
  FACECL_REGISTER_FUSED_OPS(m, ::facecl::cpu::CpuKernels);
}
