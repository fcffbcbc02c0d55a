// Scalar math shared by the CPU and CUDA kernels: the combined margin, online softmax statistics, softplus.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define FACECL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FACECL_HOST_DEVICE inline
#endif

namespace facecl {

// Every parameter of the margin softmax, converted once on the host the way torch converts Python floats
// that meet an fp32 tensor (double arithmetic, then one rounding to float), so the kernels reproduce the
// reference bit for bit up to the accuracy of acos/cos/exp.
struct MarginParams {
  float scale;             // s
  float m1;                // multiplicative angular margin
  float m2;                // additive angular margin (ArcFace)
  float m3;                // additive cosine margin (CosFace)
  float fallback_shift;    // m2 * sin(m2): target = c - m2*sin(m2) - m3 when m1*theta + m2 > pi
  float interclass_filter; // negatives with cosine above this are zeroed (no gradient); <= 0: off
  bool uses_angle;         // m1 != 1 or m2 != 0: theta = acos(c) is needed
};

inline MarginParams make_margin_params(double scale, double m1, double m2, double m3, double interclass_filter) {
  MarginParams params;
  params.scale = static_cast<float>(scale);
  params.m1 = static_cast<float>(m1);
  params.m2 = static_cast<float>(m2);
  params.m3 = static_cast<float>(m3);
  params.fallback_shift = static_cast<float>(m2 * std::sin(m2));
  params.interclass_filter = static_cast<float>(interclass_filter);
  params.uses_angle = m1 != 1.0 || m2 != 0.0;
  return params;
}

// acos has an infinite slope at +-1: the reference clamps its input to +-(1 - 1e-7) (rounded to float).
constexpr float kAcosLow = static_cast<float>(-1.0 + 1e-7);
constexpr float kAcosHigh = static_cast<float>(1.0 - 1e-7);
constexpr float kPiFloat = static_cast<float>(3.14159265358979323846);

// Unscaled target cos(m1*theta + m2) - m3 (or the fallback) and its derivative with respect to c.
FACECL_HOST_DEVICE void margin_target(float cos_target, const MarginParams& params, float& value, float& derivative) {
  if (!params.uses_angle) {
    value = cos_target - params.m3;
    derivative = 1.0f;
    return;
  }
  const bool inside_clamp = cos_target >= kAcosLow && cos_target <= kAcosHigh;
  const float clamped = fminf(fmaxf(cos_target, kAcosLow), kAcosHigh);
  const float angle = params.m1 * acosf(clamped) + params.m2;
  if (angle <= kPiFloat) {
    value = cosf(angle) - params.m3;
    // d/dc cos(m1*acos(c) + m2) = m1 * sin(angle) / sqrt(1 - c^2); zero where the clamp is active.
    derivative = inside_clamp ? params.m1 * sinf(angle) / sqrtf(1.0f - clamped * clamped) : 0.0f;
  } else {
    value = cos_target - params.fallback_shift - params.m3;
    derivative = 1.0f;
  }
}

// Logit of a non-target entry: s * c, or 0 when the inter-class filter drops it.
FACECL_HOST_DEVICE bool is_filtered(float cosine, const MarginParams& params) {
  return params.interclass_filter > 0.0f && cosine > params.interclass_filter;
}

FACECL_HOST_DEVICE float negative_logit(float cosine, const MarginParams& params) {
  return is_filtered(cosine, params) ? 0.0f : params.scale * cosine;
}

// Online softmax statistics: (max, sum of exp(x - max)) of a set of values. Merging two partial results
// is exact: sum = sum_a * exp(max_a - max) + sum_b * exp(max_b - max). An empty set is (-inf, 0).
struct SoftmaxStats {
  float max;
  float sum_exp;
};

FACECL_HOST_DEVICE SoftmaxStats merge_stats(SoftmaxStats a, SoftmaxStats b) {
  const float new_max = fmaxf(a.max, b.max);
  if (new_max == -INFINITY) {
    return SoftmaxStats{-INFINITY, 0.0f};
  }
  const float from_a = a.max == -INFINITY ? 0.0f : a.sum_exp * expf(a.max - new_max);
  const float from_b = b.max == -INFINITY ? 0.0f : b.sum_exp * expf(b.max - new_max);
  return SoftmaxStats{new_max, from_a + from_b};
}

// Adds one value: a single exp per value (the running sum is rescaled only when the max grows).
FACECL_HOST_DEVICE void add_to_stats(SoftmaxStats& stats, float value) {
  if (value > stats.max) {
    stats.sum_exp = stats.sum_exp * expf(stats.max - value) + 1.0f;
    stats.max = value;
  } else {
    stats.sum_exp += expf(value - stats.max);
  }
}

FACECL_HOST_DEVICE float log_sum_exp(SoftmaxStats stats) {
  return stats.max == -INFINITY ? -INFINITY : stats.max + logf(stats.sum_exp);
}

// torch.nn.functional.softplus with beta 1 and threshold 20, and its derivative.
FACECL_HOST_DEVICE float softplus(float z) {
  return z > 20.0f ? z : log1pf(expf(z));
}

FACECL_HOST_DEVICE float softplus_derivative(float z) {
  if (z > 20.0f) {
    return 1.0f;
  }
  const float e = expf(z);
  return e / (e + 1.0f);
}

// UniCon: key j is a positive of query i when it is the query's own key or carries the query's label (>= 0).
FACECL_HOST_DEVICE bool is_positive(int64_t key_index, int64_t own_key, int64_t query_label, int64_t key_label) {
  return key_index == own_key || (query_label >= 0 && key_label == query_label);
}

}  // namespace facecl
