// Device-independent drivers of the fused losses: argument checks, walks over class/key blocks, at::mm calls.
//
// Each driver is a template over a `Kernels` backend (CpuKernels in cpu/kernels_cpu.cpp, CudaKernels in
// cuda/kernels_cuda.cu) that supplies four row-wise block kernels:
//
//   margin_stats_block(cos_NB, local_target_N, col_offset, params, row_max_N, sum_exp_N, target_logit_N)
//       folds columns [col_offset, col_offset + B) of every row into the running softmax statistics
//       (row max, sum of exp(logit - row max)) and writes the margin target logit of rows whose target
//       column lies in the block;
//   margin_grad_block_(cos_NB, local_target_N, col_offset, params, row_max_N, sum_exp_N, grad_loss_N)
//       overwrites the block with d(sum_i grad_loss_i * loss_i) / d(cos);
//   unicon_stats_block / unicon_grad_block_: the same for UniCon similarities (two statistics per row:
//       negatives s + margin and positives -s);
//   sampled_center_grad_rows_(grad_rows_BD, centers_CD, kept_S, start, inv_norm_S, zero_rows_below, workspace_CD)
//       for the sampled normalised op: row kept_S[start + j] of workspace_CD = the normalisation's backward of
//       row j of grad_rows_BD (fp32) against the raw center row kept_S[start + j], and zeroes the rows below
//       zero_rows_below that lie between kept_S[start + j - 1] and kept_S[start + j] (see the sampled op).
//
// The drivers never allocate a rows x classes tensor: the cosine-buffer op works in place on its input, the
// linear and UniCon ops hold one rows x block fp32 buffer at a time.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "margin_math.h"

// The input types of every kernel: fp32, bf16, fp16 (all accumulate in fp32).
#define FACECL_DISPATCH_LOSS_TYPES(TYPE, NAME, ...)                                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                     \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)              \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace facecl {

using at::Tensor;

inline void check_float_input(const Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kBFloat16 ||
                  tensor.scalar_type() == at::kHalf,
              "facecl: ", name, " must be float32, bfloat16 or float16, got ", tensor.scalar_type());
}

inline void check_matrix(const Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.dim() == 2, "facecl: ", name, " must be 2-D, got shape ", tensor.sizes());
  TORCH_CHECK(tensor.size(1) <= 1 || tensor.stride(1) == 1,
              "facecl: ", name, " must have contiguous rows (stride 1 along dim 1), got strides ", tensor.strides());
  TORCH_CHECK(tensor.size(0) <= 1 || tensor.stride(0) >= tensor.size(1),
              "facecl: ", name, " must not have overlapping rows, got shape ", tensor.sizes(), " and strides ",
              tensor.strides());
  check_float_input(tensor, name);
}

inline void check_index_vector(const Tensor& index, int64_t length, const Tensor& like, const char* name) {
  TORCH_CHECK(index.dim() == 1 && index.size(0) == length, "facecl: ", name, " must have shape [", length,
              "], got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, "facecl: ", name, " must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.device() == like.device(), "facecl: ", name, " is on ", index.device(), ", expected ",
              like.device());
}

inline void check_stat_vector(const Tensor& stat, int64_t length, const Tensor& like, const char* name) {
  TORCH_CHECK(stat.dim() == 1 && stat.size(0) == length, "facecl: ", name, " must have shape [", length, "], got ",
              stat.sizes());
  TORCH_CHECK(stat.scalar_type() == at::kFloat, "facecl: ", name, " must be float32, got ", stat.scalar_type());
  TORCH_CHECK(stat.device() == like.device(), "facecl: ", name, " is on ", stat.device(), ", expected ",
              like.device());
}

// Values in [low, high) or -1. Checked on the CPU only: on a GPU the check would cost a host sync.
inline void check_index_range(const Tensor& index, int64_t high, bool allow_minus_one, const char* name) {
  if (!index.device().is_cpu() || index.numel() == 0) {
    return;
  }
  const int64_t low = allow_minus_one ? -1 : 0;
  const int64_t min_value = index.min().item<int64_t>();
  const int64_t max_value = index.max().item<int64_t>();
  TORCH_CHECK(min_value >= low && max_value < high, "facecl: ", name, " must lie in [", low, ", ", high,
              "), got values from ", min_value, " to ", max_value);
}

// Columns per block: one N x block fp32 buffer of about 64 MB (16M logits: 4096 classes for 4096 rows). Much
// smaller blocks make the matrix products slow (measured on CPU: 512 classes per block, 1.45x the time).
inline int64_t resolve_block_size(int64_t block_size, int64_t num_rows, int64_t num_cols) {
  if (block_size > 0) {
    return block_size;
  }
  const int64_t budget = int64_t{1} << 24;
  const int64_t fitting = budget / std::max<int64_t>(num_rows, 1);
  return std::max<int64_t>(64, std::min<int64_t>(std::max<int64_t>(num_cols, 1), fitting));
}

// N x width view on the first N*width floats of a flat scratch buffer: contiguous whatever the width.
inline Tensor scratch_view(const Tensor& flat, int64_t num_rows, int64_t width) {
  return flat.narrow(0, 0, num_rows * width).view({num_rows, width});
}

// F.normalize's eps: a vector is divided by max(|x|, eps).
constexpr double kNormalizeEps = 1e-12;
// The fp32 inverse norm of a vector shorter than eps (1 / fp32(eps)): such rows get no projection.
constexpr double kMaxInverseNorm = static_cast<double>(1.0f / static_cast<float>(kNormalizeEps));

// A fresh CPU tensor of hundreds of MB (the C x D workspace that becomes the centers' gradient) costs one page
// fault per 4 KB page at its first touch: measured on one core, zeroing a fresh 195 MiB tensor took 85 ms, of
// which 77 ms were page faults (8 ms once the pages exist). Advising transparent huge pages (2 MB) on it
// before the first touch cut that to 19 ms. Linux only; the advice is ignored where THP is off ("never"),
// harmless on memory already touched, and not asked for below 4 MB or on a GPU.
inline void advise_huge_pages(const Tensor& tensor) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!tensor.device().is_cpu()) {
    return;
  }
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + tensor.nbytes()) & ~(kHugePage - 1);
  if (last >= first + 2 * kHugePage) {
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: failure changes nothing
  }
#else
  (void)tensor;
#endif
}

inline std::tuple<Tensor, Tensor, Tensor> empty_margin_stats(int64_t num_rows, const Tensor& like) {
  const auto options = like.options().dtype(at::kFloat);
  return {at::full({num_rows}, -INFINITY, options), at::zeros({num_rows}, options), at::zeros({num_rows}, options)};
}

template <typename Kernels>
struct FusedOps {
  // ---- margin softmax on a cosine buffer (N x C) ------------------------------------------------------------

  static std::tuple<Tensor, Tensor, Tensor> margin_softmax_ce_stats(const Tensor& cos_NC, const Tensor& local_target_N,
                                                                    double scale, double m1, double m2, double m3,
                                                                    double interclass_filter) {
    check_matrix(cos_NC, "cos_logits");
    check_index_vector(local_target_N, cos_NC.size(0), cos_NC, "local_target");
    check_index_range(local_target_N, cos_NC.size(1), true, "local_target");
    const MarginParams params = make_margin_params(scale, m1, m2, m3, interclass_filter);
    auto [row_max_N, sum_exp_N, target_logit_N] = empty_margin_stats(cos_NC.size(0), cos_NC);
    Kernels::margin_stats_block(cos_NC, local_target_N, 0, params, row_max_N, sum_exp_N, target_logit_N);
    return {row_max_N, sum_exp_N, target_logit_N};
  }

  static std::tuple<Tensor, Tensor, Tensor> margin_softmax_ce(const Tensor& cos_NC, const Tensor& local_target_N,
                                                              double scale, double m1, double m2, double m3,
                                                              double interclass_filter) {
    auto [row_max_N, sum_exp_N, target_logit_N] =
        margin_softmax_ce_stats(cos_NC, local_target_N, scale, m1, m2, m3, interclass_filter);
    Tensor loss_N = at::log(sum_exp_N) + row_max_N - target_logit_N;
    return {loss_N, row_max_N, sum_exp_N};
  }

  static void margin_softmax_ce_backward_(const Tensor& cos_NC, const Tensor& local_target_N, const Tensor& row_max_N,
                                          const Tensor& sum_exp_N, const Tensor& grad_loss_N, double scale, double m1,
                                          double m2, double m3, double interclass_filter) {
    check_matrix(cos_NC, "cos_logits");
    const int64_t num_rows = cos_NC.size(0);
    check_index_vector(local_target_N, num_rows, cos_NC, "local_target");
    check_index_range(local_target_N, cos_NC.size(1), true, "local_target");
    check_stat_vector(row_max_N, num_rows, cos_NC, "row_max");
    check_stat_vector(sum_exp_N, num_rows, cos_NC, "sum_exp");
    check_stat_vector(grad_loss_N, num_rows, cos_NC, "grad_loss");
    const MarginParams params = make_margin_params(scale, m1, m2, m3, interclass_filter);
    Tensor buffer = cos_NC;  // written in place: the caller hands the buffer over
    Kernels::margin_grad_block_(buffer, local_target_N, 0, params, row_max_N.contiguous(), sum_exp_N.contiguous(),
                                grad_loss_N.contiguous());
  }

  // ---- fused linear margin softmax: embeddings (N x D) against centers (C x D), blockwise ------------------

  // num_columns: the columns local_target_N indexes (default: the centers' rows; the sampled op: the kept rows).
  static void check_linear_inputs(const Tensor& emb_ND, const Tensor& centers_CD, const Tensor& local_target_N,
                                  int64_t num_columns = -1) {
    check_matrix(emb_ND, "embeddings");
    check_matrix(centers_CD, "centers");
    TORCH_CHECK(emb_ND.size(1) == centers_CD.size(1), "facecl: embeddings have ", emb_ND.size(1),
                " dims but centers have ", centers_CD.size(1));
    TORCH_CHECK(emb_ND.device() == centers_CD.device(), "facecl: embeddings on ", emb_ND.device(),
                " but centers on ", centers_CD.device());
    check_index_vector(local_target_N, emb_ND.size(0), emb_ND, "local_target");
    check_index_range(local_target_N, num_columns < 0 ? centers_CD.size(0) : num_columns, true, "local_target");
  }

  static std::tuple<Tensor, Tensor, Tensor> linear_margin_softmax_ce_stats(
      const Tensor& emb_ND, const Tensor& centers_CD, const Tensor& local_target_N, double scale, double m1, double m2,
      double m3, double interclass_filter, int64_t block_size) {
    check_linear_inputs(emb_ND, centers_CD, local_target_N);
    const MarginParams params = make_margin_params(scale, m1, m2, m3, interclass_filter);
    const int64_t num_rows = emb_ND.size(0), num_classes = centers_CD.size(0);
    auto [row_max_N, sum_exp_N, target_logit_N] = empty_margin_stats(num_rows, emb_ND);
    if (num_rows == 0 || num_classes == 0) {
      return {row_max_N, sum_exp_N, target_logit_N};
    }
    const int64_t block = resolve_block_size(block_size, num_rows, num_classes);
    const Tensor emb_float_ND = emb_ND.to(at::kFloat);
    const Tensor scratch = at::empty({num_rows * std::min(block, num_classes)}, emb_float_ND.options());
    for (int64_t start = 0; start < num_classes; start += block) {
      const int64_t width = std::min(block, num_classes - start);
      const Tensor centers_block_float = centers_CD.narrow(0, start, width).to(at::kFloat);  // width x D
      Tensor cos_NB = scratch_view(scratch, num_rows, width);
      at::mm_out(cos_NB, emb_float_ND, centers_block_float.t());
      Kernels::margin_stats_block(cos_NB, local_target_N, start, params, row_max_N, sum_exp_N, target_logit_N);
    }
    return {row_max_N, sum_exp_N, target_logit_N};
  }

  static std::tuple<Tensor, Tensor, Tensor> linear_margin_softmax_ce(const Tensor& emb_ND, const Tensor& centers_CD,
                                                                     const Tensor& local_target_N, double scale,
                                                                     double m1, double m2, double m3,
                                                                     double interclass_filter, int64_t block_size) {
    auto [row_max_N, sum_exp_N, target_logit_N] = linear_margin_softmax_ce_stats(
        emb_ND, centers_CD, local_target_N, scale, m1, m2, m3, interclass_filter, block_size);
    Tensor loss_N = at::log(sum_exp_N) + row_max_N - target_logit_N;
    return {loss_N, row_max_N, sum_exp_N};
  }

  static std::tuple<Tensor, Tensor> linear_margin_softmax_ce_backward(
      const Tensor& grad_loss_N, const Tensor& emb_ND, const Tensor& centers_CD, const Tensor& local_target_N,
      const Tensor& row_max_N, const Tensor& sum_exp_N, double scale, double m1, double m2, double m3,
      double interclass_filter, int64_t block_size) {
    check_linear_inputs(emb_ND, centers_CD, local_target_N);
    const int64_t num_rows = emb_ND.size(0), num_classes = centers_CD.size(0);
    check_stat_vector(row_max_N, num_rows, emb_ND, "row_max");
    check_stat_vector(sum_exp_N, num_rows, emb_ND, "sum_exp");
    check_stat_vector(grad_loss_N, num_rows, emb_ND, "grad_loss");
    const MarginParams params = make_margin_params(scale, m1, m2, m3, interclass_filter);
    const Tensor emb_float_ND = emb_ND.to(at::kFloat);
    Tensor grad_emb_float_ND = at::zeros_like(emb_float_ND);
    Tensor grad_centers_CD = at::empty_like(centers_CD, at::MemoryFormat::Contiguous);
    if (num_rows == 0 || num_classes == 0) {
      grad_centers_CD.zero_();
      return {grad_emb_float_ND.to(emb_ND.scalar_type()), grad_centers_CD};
    }
    const Tensor max_N = row_max_N.contiguous(), sum_N = sum_exp_N.contiguous(), grad_N = grad_loss_N.contiguous();
    const int64_t block = resolve_block_size(block_size, num_rows, num_classes);
    const Tensor scratch = at::empty({num_rows * std::min(block, num_classes)}, emb_float_ND.options());
    const bool centers_are_float = centers_CD.scalar_type() == at::kFloat;
    for (int64_t start = 0; start < num_classes; start += block) {
      const int64_t width = std::min(block, num_classes - start);
      const Tensor centers_block_float = centers_CD.narrow(0, start, width).to(at::kFloat);  // width x D
      Tensor grad_NB = scratch_view(scratch, num_rows, width);
      at::mm_out(grad_NB, emb_float_ND, centers_block_float.t());  // recomputed cosines
      Kernels::margin_grad_block_(grad_NB, local_target_N, start, params, max_N, sum_N, grad_N);
      grad_emb_float_ND.addmm_(grad_NB, centers_block_float);
      Tensor grad_centers_block = grad_centers_CD.narrow(0, start, width);  // width x D, contiguous
      if (centers_are_float) {
        at::mm_out(grad_centers_block, grad_NB.t(), emb_float_ND);
      } else {
        grad_centers_block.copy_(at::mm(grad_NB.t(), emb_float_ND));
      }
    }
    return {grad_emb_float_ND.to(emb_ND.scalar_type()), grad_centers_CD};
  }

  // ---- fused linear margin softmax on raw centers: normalisation fused, logits kept in the gradient's memory ----
  //
  // cos = emb_ND . (w_c / max(|w_c|, eps)) for every center row w_c: the centers are never normalised into a
  // copy; their inverse norms inv_C (C floats) scale each block of products. The backward of the
  // normalisation is applied to the gradient in place:
  //   a_c  = inv_c * sum_n G[n, c] emb[n]                 (G = dL/dcos)
  //   dw_c = a_c - (a_c . w_c) inv_c^2 w_c                 (|w_c| > eps; below eps F.normalize divides by eps
  //                                                         and dw_c = a_c, no projection)
  // Workspace: one C x D tensor of the centers' dtype, which ends up holding the centers' gradient. When
  // N <= D and the centers are fp32 the forward keeps every block's N x width cosines in it (block b at
  // float offset start_b * N, contiguous); the backward walks the blocks last to first, turns each block's
  // cosines into its gradient rows and writes them at offset start_b * D >= start_b * N, which only ever
  // overwrites cosines of blocks already done. So the N x C logits cost no memory beyond the gradient, and
  // the backward does two matrix products per block instead of three. Otherwise the backward recomputes
  // each block's cosines into a scratch block.
  // The cache holds cosines, not the forward's exp(logit - max): caching those would spare the backward its
  // exp per element, but the vectorised CPU exp costs ~1 ns per element (the backward's softmax pass is ~2%
  // of the step at N = D = 512, C = 100k, of which a multiply would save at most ~1.5%), against a reference
  // max per (row, block), an extra write pass in the forward and a second kernel pair per backend.

  // Columns per block for the normalised op: temporaries of N x block and block x D stay near 8 MB. Sampled,
  // the block x D gather buffer is held to about 4 MB (2048 classes at D = 512): measured on CPU (N = D = 512,
  // S = 20,000 of 100,000), blocks of 4096, 2048 and 1024 kept columns took the same time (405, 401, 399 ms),
  // and at C = 100,000 the 4 MB saved are 2% of the gradient (the peak target is 1.05x the gradient).
  static int64_t normalized_block_size(int64_t block_size, int64_t num_rows, int64_t num_classes, int64_t dims,
                                       bool sampled = false) {
    if (block_size > 0) {
      return block_size;
    }
    const int64_t budget = int64_t{1} << 21;
    int64_t block = budget / std::max<int64_t>({num_rows, dims, 1});
    if (sampled) {
      block = std::min<int64_t>(block, (budget / 2) / std::max<int64_t>(dims, 1));
    }
    return std::max<int64_t>(64, std::min<int64_t>(std::max<int64_t>(num_classes, 1), block));
  }

  static bool caches_cosines(const Tensor& emb_ND, const Tensor& centers_CD) {
    return emb_ND.size(0) <= centers_CD.size(1) && centers_CD.scalar_type() == at::kFloat;
  }

  // N x width cosines of block [start, start + width) in the workspace (the cached layout above).
  static Tensor cached_block(const Tensor& workspace_CD, int64_t num_rows, int64_t start, int64_t width) {
    return workspace_CD.view({-1}).narrow(0, start * num_rows, num_rows * width).view({num_rows, width});
  }

  // ---- sampled (Partial FC with sample rate < 1): only the kept rows of the centers take part --------------
  //
  // kept_S: S strictly increasing row indices into centers_CD (C x D); local_target_N indexes the S kept
  // columns. Column j of the logits is center row kept_S[j]: each block of kept columns is gathered from the
  // raw centers into one block-sized fp32 buffer (no S x D copy), inv_norm_S holds the S inverse norms, and
  // the backward writes the gradient rows straight into the dense C x D workspace (row kept_S[j]), whose
  // other rows are zero: the workspace is the gradient of the whole centers_CD parameter, with no S x D
  // temporary and no scatter through autograd's index backward.
  // The cosine cache works as without sampling, on kept positions: block [start, start + width) of kept
  // columns at float offset start * N. Sorted indices make kept_S[j] >= j, so the gradient row of kept
  // column j (float offset kept_S[j] * D >= j * D >= start * N) never overwrites cosines of a block not yet
  // done (they end at float start * N). The forward zeroes the floats past the cache (S * N onwards); the
  // rows that held cosines (below ceil(S * N / D)) and are not kept are zeroed by the backward, each block
  // zeroing the non-kept rows between its kept rows (those rows also lie at or past row start), so every
  // row of the gradient ends up written: its gradient if kept, else zero.
  static void check_kept(const Tensor& kept_S, const Tensor& centers_CD) {
    TORCH_CHECK(kept_S.dim() == 1, "facecl: kept must be 1-D, got shape ", kept_S.sizes());
    check_index_vector(kept_S, kept_S.size(0), centers_CD, "kept");
    const int64_t num_kept = kept_S.size(0);
    TORCH_CHECK(num_kept <= centers_CD.size(0), "facecl: kept has ", num_kept, " rows but there are only ",
                centers_CD.size(0), " centers");
    check_index_range(kept_S, centers_CD.size(0), false, "kept");
    // Strictly increasing (the cache layout above relies on it). Checked on the CPU only, as the ranges.
    if (kept_S.device().is_cpu() && num_kept > 1) {
      TORCH_CHECK((kept_S.narrow(0, 1, num_kept - 1) > kept_S.narrow(0, 0, num_kept - 1)).all().item<bool>(),
                  "facecl: kept must be strictly increasing (sorted, no repeats)");
    }
  }

  // Kept rows [start, start + width) of the raw centers as a contiguous width x D fp32 block: gathered into
  // `buffer` (fp32 centers) or gathered and converted (other dtypes).
  static Tensor gather_block_float(const Tensor& centers_CD, const Tensor& kept_S, int64_t start, int64_t width,
                                   const Tensor& buffer) {
    const Tensor rows_B = kept_S.narrow(0, start, width);
    if (buffer.defined()) {
      Tensor block_BD = scratch_view(buffer, width, centers_CD.size(1));
      at::index_select_out(block_BD, centers_CD, 0, rows_B);
      return block_BD;
    }
    return at::index_select(centers_CD, 0, rows_B).to(at::kFloat);
  }

  // Both normalised ops, with (kept_S defined) or without sampling. Without sampling this is the code the
  // op had before sampling existed: no gather, no extra pass.
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> normalized_stats(
      const Tensor& emb_ND, const Tensor& centers_CD, const Tensor& kept_S, const Tensor& local_target_N, double scale,
      double m1, double m2, double m3, double interclass_filter, int64_t block_size) {
    const bool sampled = kept_S.defined();
    if (sampled) {
      check_kept(kept_S, centers_CD);
    }
    const int64_t num_rows = emb_ND.size(0), num_classes = centers_CD.size(0), dims = centers_CD.size(1);
    const int64_t num_cols = sampled ? kept_S.size(0) : num_classes;
    check_linear_inputs(emb_ND, centers_CD, local_target_N, num_cols);
    TORCH_CHECK(centers_CD.is_contiguous(), "facecl: centers must be contiguous");
    const MarginParams params = make_margin_params(scale, m1, m2, m3, interclass_filter);
    auto [row_max_N, sum_exp_N, target_logit_N] = empty_margin_stats(num_rows, emb_ND);
    // 1 / max(|w_c|, eps), eps = 1e-12 as F.normalize: C floats (sampled: S, computed block by block below).
    const Tensor inv_norm_C =
        sampled ? at::empty({num_cols}, centers_CD.options().dtype(at::kFloat))
                : at::linalg_vector_norm(centers_CD, 2, at::IntArrayRef{1}, false, at::kFloat)
                      .clamp_min_(kNormalizeEps)
                      .reciprocal_();
    const bool cache = caches_cosines(emb_ND, centers_CD);
    // Becomes the gradient. The op's output is defined everywhere: the loop below writes the cached cosines
    // over the first S * N floats (S = C without sampling), and only the rest is zeroed (all of it when
    // nothing is cached, none of it at N == D and S == C, where zeroing the whole C x D was a memset of
    // about 1% of the step).
    Tensor workspace_CD = at::empty_like(centers_CD, at::MemoryFormat::Contiguous);
    advise_huge_pages(workspace_CD);  // before its first touch (below)
    const int64_t cached_floats = cache ? num_cols * num_rows : 0;
    workspace_CD.view({-1}).narrow(0, cached_floats, workspace_CD.numel() - cached_floats).zero_();
    if (num_cols == 0 || (num_rows == 0 && !sampled)) {
      return {row_max_N, sum_exp_N, target_logit_N, inv_norm_C, workspace_CD};
    }
    const int64_t block = normalized_block_size(block_size, num_rows, num_cols, dims, sampled);
    const Tensor emb_float_ND = emb_ND.to(at::kFloat);
    const Tensor scratch = cache ? Tensor() : at::empty({num_rows * std::min(block, num_cols)}, emb_float_ND.options());
    const Tensor gather_buffer = sampled && centers_CD.scalar_type() == at::kFloat
                                     ? at::empty({std::min(block, num_cols) * dims}, emb_float_ND.options())
                                     : Tensor();
    for (int64_t start = 0; start < num_cols; start += block) {
      const int64_t width = std::min(block, num_cols - start);
      const Tensor centers_block_float =  // width x D, raw
          sampled ? gather_block_float(centers_CD, kept_S, start, width, gather_buffer)
                  : centers_CD.narrow(0, start, width).to(at::kFloat);
      Tensor inv_norm_B = inv_norm_C.narrow(0, start, width);
      if (sampled) {
        at::linalg_vector_norm_out(inv_norm_B, centers_block_float, 2, at::IntArrayRef{1}, false, at::kFloat);
        inv_norm_B.clamp_min_(kNormalizeEps).reciprocal_();
      }
      if (num_rows == 0) {
        continue;  // sampled with no rows: only the inverse norms
      }
      Tensor cos_NB = cache ? cached_block(workspace_CD, num_rows, start, width) : scratch_view(scratch, num_rows, width);
      at::mm_out(cos_NB, emb_float_ND, centers_block_float.t());
      cos_NB.mul_(inv_norm_B.unsqueeze(0));  // raw products -> cosines
      Kernels::margin_stats_block(cos_NB, local_target_N, start, params, row_max_N, sum_exp_N, target_logit_N);
    }
    return {row_max_N, sum_exp_N, target_logit_N, inv_norm_C, workspace_CD};
  }

  // Returns the embeddings' gradient; writes the centers' gradient into workspace_CD (see above).
  static Tensor normalized_backward_(const Tensor& grad_loss_N, const Tensor& emb_ND, const Tensor& centers_CD,
                                     const Tensor& kept_S, const Tensor& local_target_N, const Tensor& row_max_N,
                                     const Tensor& sum_exp_N, const Tensor& inv_norm_C, const Tensor& workspace_CD,
                                     double scale, double m1, double m2, double m3, double interclass_filter,
                                     int64_t block_size) {
    const bool sampled = kept_S.defined();
    if (sampled) {
      check_kept(kept_S, centers_CD);
    }
    const int64_t num_rows = emb_ND.size(0), num_classes = centers_CD.size(0), dims = centers_CD.size(1);
    const int64_t num_cols = sampled ? kept_S.size(0) : num_classes;
    check_linear_inputs(emb_ND, centers_CD, local_target_N, num_cols);
    check_stat_vector(row_max_N, num_rows, emb_ND, "row_max");
    check_stat_vector(sum_exp_N, num_rows, emb_ND, "sum_exp");
    check_stat_vector(grad_loss_N, num_rows, emb_ND, "grad_loss");
    check_stat_vector(inv_norm_C, num_cols, centers_CD, "inv_norm");
    TORCH_CHECK(workspace_CD.sizes() == centers_CD.sizes() && workspace_CD.is_contiguous() &&
                    workspace_CD.scalar_type() == centers_CD.scalar_type(),
                "facecl: workspace must be a contiguous ", centers_CD.sizes(), " ", centers_CD.scalar_type(),
                " tensor (the forward's), got ", workspace_CD.sizes(), " ", workspace_CD.scalar_type());
    if (sampled) {
      TORCH_CHECK(centers_CD.is_contiguous(), "facecl: centers must be contiguous");
    }
    const MarginParams params = make_margin_params(scale, m1, m2, m3, interclass_filter);
    const Tensor emb_float_ND = emb_ND.to(at::kFloat);
    Tensor grad_emb_float_ND = at::zeros_like(emb_float_ND);
    if (num_rows == 0 || num_cols == 0) {
      workspace_CD.zero_();
      return grad_emb_float_ND.to(emb_ND.scalar_type());
    }
    const bool cache = caches_cosines(emb_ND, centers_CD);
    const Tensor max_N = row_max_N.contiguous(), sum_N = sum_exp_N.contiguous(), grad_N = grad_loss_N.contiguous();
    const int64_t block = normalized_block_size(block_size, num_rows, num_cols, dims, sampled);
    const int64_t num_blocks = (num_cols + block - 1) / block;
    const Tensor scratch = cache ? Tensor() : at::empty({num_rows * std::min(block, num_cols)}, emb_float_ND.options());
    const Tensor gather_buffer = sampled && centers_CD.scalar_type() == at::kFloat
                                     ? at::empty({std::min(block, num_cols) * dims}, emb_float_ND.options())
                                     : Tensor();
    // Sampled and cached: rows below this one held cosines; the non-kept ones among them are zeroed here.
    const int64_t zero_rows_below = sampled && cache ? (num_cols * num_rows + dims - 1) / dims : 0;
    Tensor workspace = workspace_CD;
    const Tensor workspace_flat = workspace_CD.view({-1});
    for (int64_t index = num_blocks - 1; index >= 0; --index) {  // last to first: see the layout above
      const int64_t start = index * block, width = std::min(block, num_cols - start);
      const Tensor centers_block_float =  // width x D, raw
          sampled ? gather_block_float(centers_CD, kept_S, start, width, gather_buffer)
                  : centers_CD.narrow(0, start, width).to(at::kFloat);
      const Tensor inv_norm_B = inv_norm_C.narrow(0, start, width);
      Tensor grad_NB;
      if (cache) {
        grad_NB = cached_block(workspace_CD, num_rows, start, width);  // holds this block's cosines
      } else {
        grad_NB = scratch_view(scratch, num_rows, width);
        at::mm_out(grad_NB, emb_float_ND, centers_block_float.t());
        grad_NB.mul_(inv_norm_B.unsqueeze(0));  // recomputed cosines
      }
      Kernels::margin_grad_block_(grad_NB, local_target_N, start, params, max_N, sum_N, grad_N);  // dL/dcos
      grad_NB.mul_(inv_norm_B.unsqueeze(0));  // dL/d(emb . w_c)
      grad_emb_float_ND.addmm_(grad_NB, centers_block_float);
      if (sampled) {
        // a_c into the block buffer (the gathered centers are no longer needed: the row kernel reads the raw
        // center rows), then the normalisation's backward straight into the kept rows of the workspace.
        Tensor grad_centers_BD = centers_block_float;
        at::mm_out(grad_centers_BD, grad_NB.t(), emb_float_ND);
        Kernels::sampled_center_grad_rows_(grad_centers_BD, centers_CD, kept_S, start, inv_norm_C, zero_rows_below,
                                           workspace);
        continue;
      }
      Tensor grad_centers_BD = at::mm(grad_NB.t(), emb_float_ND);  // width x D: a_c
      // Normalisation backward: dw_c = a_c - (a_c . w_c) inv_c^2 w_c where |w_c| > eps.
      const Tensor projection_B = at::bmm(grad_centers_BD.unsqueeze(1), centers_block_float.unsqueeze(2))
                                      .view({width})
                                      .mul_(inv_norm_B)
                                      .mul_(inv_norm_B)
                                      .mul_(inv_norm_B < kMaxInverseNorm);
      // Only now is this block's cached cosine memory free: its gradient rows may overwrite it.
      Tensor workspace_BD = workspace_flat.narrow(0, start * dims, width * dims).view({width, dims});
      at::addcmul_out(workspace_BD, grad_centers_BD, centers_block_float, projection_B.unsqueeze(1), -1.0);
    }
    return grad_emb_float_ND.to(emb_ND.scalar_type());
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> normalized_linear_margin_softmax_ce_stats(
      const Tensor& emb_ND, const Tensor& centers_CD, const Tensor& local_target_N, double scale, double m1, double m2,
      double m3, double interclass_filter, int64_t block_size) {
    return normalized_stats(emb_ND, centers_CD, Tensor(), local_target_N, scale, m1, m2, m3, interclass_filter,
                            block_size);
  }

  static Tensor normalized_linear_margin_softmax_ce_backward_(
      const Tensor& grad_loss_N, const Tensor& emb_ND, const Tensor& centers_CD, const Tensor& local_target_N,
      const Tensor& row_max_N, const Tensor& sum_exp_N, const Tensor& inv_norm_C, const Tensor& workspace_CD,
      double scale, double m1, double m2, double m3, double interclass_filter, int64_t block_size) {
    return normalized_backward_(grad_loss_N, emb_ND, centers_CD, Tensor(), local_target_N, row_max_N, sum_exp_N,
                                inv_norm_C, workspace_CD, scale, m1, m2, m3, interclass_filter, block_size);
  }

  // Sampled: (row_max_N, sum_exp_N, target_logit_N, inv_norm_S, workspace_CD); local_target_N indexes kept_S.
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sampled_normalized_linear_margin_softmax_ce_stats(
      const Tensor& emb_ND, const Tensor& centers_CD, const Tensor& kept_S, const Tensor& local_target_N, double scale,
      double m1, double m2, double m3, double interclass_filter, int64_t block_size) {
    return normalized_stats(emb_ND, centers_CD, kept_S, local_target_N, scale, m1, m2, m3, interclass_filter,
                            block_size);
  }

  // Sampled: returns the embeddings' gradient; workspace_CD becomes the gradient of all C centers (rows not
  // kept are zero).
  static Tensor sampled_normalized_linear_margin_softmax_ce_backward_(
      const Tensor& grad_loss_N, const Tensor& emb_ND, const Tensor& centers_CD, const Tensor& kept_S,
      const Tensor& local_target_N, const Tensor& row_max_N, const Tensor& sum_exp_N, const Tensor& inv_norm_S,
      const Tensor& workspace_CD, double scale, double m1, double m2, double m3, double interclass_filter,
      int64_t block_size) {
    return normalized_backward_(grad_loss_N, emb_ND, centers_CD, kept_S, local_target_N, row_max_N, sum_exp_N,
                                inv_norm_S, workspace_CD, scale, m1, m2, m3, interclass_filter, block_size);
  }

  // ---- UniCon: queries (B x D) against keys (K x D), blockwise over the keys -------------------------------

  static void check_unicon_inputs(const Tensor& query_BD, const Tensor& keys_KD, const Tensor& query_labels_B,
                                  const Tensor& key_labels_K, const Tensor& own_key_B, double temperature) {
    check_matrix(query_BD, "query");
    check_matrix(keys_KD, "keys");
    TORCH_CHECK(query_BD.size(1) == keys_KD.size(1), "facecl: query has ", query_BD.size(1), " dims but keys have ",
                keys_KD.size(1));
    TORCH_CHECK(query_BD.device() == keys_KD.device(), "facecl: query on ", query_BD.device(), " but keys on ",
                keys_KD.device());
    TORCH_CHECK(temperature > 0.0, "facecl: temperature must be > 0, got ", temperature);
    const int64_t num_queries = query_BD.size(0), num_keys = keys_KD.size(0);
    TORCH_CHECK(num_keys > 0 || num_queries == 0, "facecl: unicon_loss needs at least one key (the query's own)");
    check_index_vector(query_labels_B, num_queries, query_BD, "query_labels");
    check_index_vector(key_labels_K, num_keys, query_BD, "key_labels");
    check_index_vector(own_key_B, num_queries, query_BD, "own_key");
    check_index_range(own_key_B, num_keys, false, "own_key");
  }

  static std::tuple<Tensor, Tensor, Tensor> unicon_loss(const Tensor& query_BD, const Tensor& keys_KD,
                                                        const Tensor& query_labels_B, const Tensor& key_labels_K,
                                                        const Tensor& own_key_B, double temperature, double margin,
                                                        int64_t block_size) {
    check_unicon_inputs(query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, temperature);
    const int64_t num_queries = query_BD.size(0), num_keys = keys_KD.size(0);
    const auto options = query_BD.options().dtype(at::kFloat);
    Tensor negative_max_B = at::full({num_queries}, -INFINITY, options);
    Tensor negative_sum_B = at::zeros({num_queries}, options);
    Tensor positive_max_B = at::full({num_queries}, -INFINITY, options);
    Tensor positive_sum_B = at::zeros({num_queries}, options);
    if (num_queries > 0) {
      const int64_t block = resolve_block_size(block_size, num_queries, num_keys);
      const Tensor query_float_BD = query_BD.to(at::kFloat);
      const Tensor scratch = at::empty({num_queries * std::min(block, num_keys)}, options);
      for (int64_t start = 0; start < num_keys; start += block) {
        const int64_t width = std::min(block, num_keys - start);
        Tensor dots_BB = scratch_view(scratch, num_queries, width);
        at::mm_out(dots_BB, query_float_BD, keys_KD.narrow(0, start, width).to(at::kFloat).t());
        Kernels::unicon_stats_block(dots_BB, query_labels_B, key_labels_K, own_key_B, start, temperature, margin,
                                    negative_max_B, negative_sum_B, positive_max_B, positive_sum_B);
      }
    }
    // A query with no negative at all has lse_negatives = -inf and loss softplus(-inf) = 0.
    Tensor lse_negatives_B = negative_max_B + at::log(negative_sum_B);
    Tensor lse_positives_B = positive_max_B + at::log(positive_sum_B);
    Tensor loss_B = at::softplus(lse_negatives_B + lse_positives_B, 1.0, 20.0);
    return {loss_B, lse_negatives_B, lse_positives_B};
  }

  static std::tuple<Tensor, Tensor> unicon_loss_backward(const Tensor& grad_loss_B, const Tensor& query_BD,
                                                         const Tensor& keys_KD, const Tensor& query_labels_B,
                                                         const Tensor& key_labels_K, const Tensor& own_key_B,
                                                         const Tensor& lse_negatives_B, const Tensor& lse_positives_B,
                                                         double temperature, double margin, int64_t block_size,
                                                         bool compute_grad_keys) {
    check_unicon_inputs(query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, temperature);
    const int64_t num_queries = query_BD.size(0), num_keys = keys_KD.size(0);
    check_stat_vector(grad_loss_B, num_queries, query_BD, "grad_loss");
    check_stat_vector(lse_negatives_B, num_queries, query_BD, "lse_negatives");
    check_stat_vector(lse_positives_B, num_queries, query_BD, "lse_positives");
    const Tensor query_float_BD = query_BD.to(at::kFloat);
    Tensor grad_query_float_BD = at::zeros_like(query_float_BD);
    Tensor grad_keys_KD = compute_grad_keys ? at::zeros_like(keys_KD, at::MemoryFormat::Contiguous)
                                            : at::empty({0, keys_KD.size(1)}, keys_KD.options());
    if (num_queries == 0) {
      return {grad_query_float_BD.to(query_BD.scalar_type()), grad_keys_KD};
    }
    const Tensor grad_B = grad_loss_B.contiguous(), lse_neg_B = lse_negatives_B.contiguous(),
                 lse_pos_B = lse_positives_B.contiguous();
    const int64_t block = resolve_block_size(block_size, num_queries, num_keys);
    const Tensor scratch = at::empty({num_queries * std::min(block, num_keys)}, query_float_BD.options());
    const bool keys_are_float = keys_KD.scalar_type() == at::kFloat;
    for (int64_t start = 0; start < num_keys; start += block) {
      const int64_t width = std::min(block, num_keys - start);
      const Tensor keys_block_float = keys_KD.narrow(0, start, width).to(at::kFloat);  // width x D
      Tensor grad_BB = scratch_view(scratch, num_queries, width);
      at::mm_out(grad_BB, query_float_BD, keys_block_float.t());  // recomputed dot products
      Kernels::unicon_grad_block_(grad_BB, query_labels_B, key_labels_K, own_key_B, start, temperature, margin,
                                  lse_neg_B, lse_pos_B, grad_B);
      grad_query_float_BD.addmm_(grad_BB, keys_block_float);
      if (compute_grad_keys) {
        Tensor grad_keys_block = grad_keys_KD.narrow(0, start, width);
        if (keys_are_float) {
          at::mm_out(grad_keys_block, grad_BB.t(), query_float_BD);
        } else {
          grad_keys_block.copy_(at::mm(grad_BB.t(), query_float_BD));
        }
      }
    }
    return {grad_query_float_BD.to(query_BD.scalar_type()), grad_keys_KD};
  }
};

// Registers every op of the library for one dispatch key (CPU or CUDA) with the backend's drivers.
#define FACECL_REGISTER_FUSED_OPS(m, Kernels)                                                          \
  m.impl("margin_softmax_ce_stats", &::facecl::FusedOps<Kernels>::margin_softmax_ce_stats);               \
  m.impl("margin_softmax_ce", &::facecl::FusedOps<Kernels>::margin_softmax_ce);                           \
  m.impl("margin_softmax_ce_backward_", &::facecl::FusedOps<Kernels>::margin_softmax_ce_backward_);       \
  m.impl("linear_margin_softmax_ce_stats", &::facecl::FusedOps<Kernels>::linear_margin_softmax_ce_stats); \
  m.impl("linear_margin_softmax_ce", &::facecl::FusedOps<Kernels>::linear_margin_softmax_ce);             \
  m.impl("linear_margin_softmax_ce_backward", &::facecl::FusedOps<Kernels>::linear_margin_softmax_ce_backward); \
  m.impl("normalized_linear_margin_softmax_ce_stats",                                                  \
         &::facecl::FusedOps<Kernels>::normalized_linear_margin_softmax_ce_stats);                         \
  m.impl("normalized_linear_margin_softmax_ce_backward_",                                              \
         &::facecl::FusedOps<Kernels>::normalized_linear_margin_softmax_ce_backward_);                     \
  m.impl("sampled_normalized_linear_margin_softmax_ce_stats",                                         \
         &::facecl::FusedOps<Kernels>::sampled_normalized_linear_margin_softmax_ce_stats);                 \
  m.impl("sampled_normalized_linear_margin_softmax_ce_backward_",                                     \
         &::facecl::FusedOps<Kernels>::sampled_normalized_linear_margin_softmax_ce_backward_);             \
  m.impl("unicon_loss", &::facecl::FusedOps<Kernels>::unicon_loss);                                       \
  m.impl("unicon_loss_backward", &::facecl::FusedOps<Kernels>::unicon_loss_backward)

}  // namespace facecl
