// TORCH_LIBRARY schemas of the fused FaceCL loss ops (namespace facecl) and the Python module toolkit._C.
//
// Implementations: cpu/kernels_cpu.cpp (CPU), cuda/kernels_cuda.cu (CUDA). Fake (meta) functions and
// autograd are registered from Python in toolkit/ops/registration.py.
//
// Margin softmax protocol (rows N = gathered batch, C = this rank's classes, every statistic fp32 of shape N):
//   stats    -> (row_max, sum_exp, target_logit): local max of the margin logits, sum of exp(logit - local max),
//               the margin target logit when this rank owns the row's target column (local_target >= 0), else 0;
//   ranks combine: max = all_reduce_max(row_max); sum = all_reduce_sum(sum_exp * exp(row_max - max));
//               target = all_reduce_sum(target_logit); loss = log(sum) + max - target;
//   backward -> d(sum_i grad_loss_i * loss_i) / d(cos) from the global (max, sum); the cosine variant
//               writes it over its input buffer (margin_softmax_ce_backward_), the linear variant returns
//               the gradients of embeddings and centers.
// The non-"_stats" forward ops are the single-process losses: (loss, row_max, sum_exp) per row.
// normalized_linear_*: centers raw (not normalised); the stats op also returns their inverse norms and a
//   workspace the size of the centers, which the backward overwrites with the centers' gradient.
// sampled_normalized_linear_*: the same on the kept rows `kept` (S sorted indices into the C centers; the
//   targets index the kept columns): inverse norms of the S kept rows, a C x D workspace that becomes the
//   gradient of all C centers (rows not kept: zero), no S x D copy of the kept centers.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import toolkit._C` loads this library, whose static initialisers register the ops; the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_definition = {
      PyModuleDef_HEAD_INIT, "_C", "FaceCL fused loss kernels (ops in torch.ops.facecl)", -1, nullptr,
  };
  return PyModule_Create(&module_definition);
}
}

TORCH_LIBRARY(facecl, m) {
  m.def(
      "margin_softmax_ce_stats(Tensor cos_logits, Tensor local_target, float scale, float m1, float m2, float m3, "
      "float interclass_filter) -> (Tensor row_max, Tensor sum_exp, Tensor target_logit)");
  m.def(
      "margin_softmax_ce(Tensor cos_logits, Tensor local_target, float scale, float m1, float m2, float m3, "
      "float interclass_filter) -> (Tensor loss, Tensor row_max, Tensor sum_exp)");
  m.def(
      "margin_softmax_ce_backward_(Tensor(a!) cos_logits, Tensor local_target, Tensor row_max, Tensor sum_exp, "
      "Tensor grad_loss, float scale, float m1, float m2, float m3, float interclass_filter) -> ()");
  m.def(
      "linear_margin_softmax_ce_stats(Tensor embeddings, Tensor centers, Tensor local_target, float scale, float m1, "
      "float m2, float m3, float interclass_filter, int block_size) -> (Tensor row_max, Tensor sum_exp, "
      "Tensor target_logit)");
  m.def(
      "linear_margin_softmax_ce(Tensor embeddings, Tensor centers, Tensor local_target, float scale, float m1, "
      "float m2, float m3, float interclass_filter, int block_size) -> (Tensor loss, Tensor row_max, Tensor sum_exp)");
  m.def(
      "linear_margin_softmax_ce_backward(Tensor grad_loss, Tensor embeddings, Tensor centers, Tensor local_target, "
      "Tensor row_max, Tensor sum_exp, float scale, float m1, float m2, float m3, float interclass_filter, "
      "int block_size) -> (Tensor grad_embeddings, Tensor grad_centers)");
  m.def(
      "normalized_linear_margin_softmax_ce_stats(Tensor embeddings, Tensor centers, Tensor local_target, float scale, "
      "float m1, float m2, float m3, float interclass_filter, int block_size) -> (Tensor row_max, Tensor sum_exp, "
      "Tensor target_logit, Tensor inv_norm, Tensor workspace)");
  m.def(
      "normalized_linear_margin_softmax_ce_backward_(Tensor grad_loss, Tensor embeddings, Tensor centers, "
      "Tensor local_target, Tensor row_max, Tensor sum_exp, Tensor inv_norm, Tensor(a!) workspace, float scale, "
      "float m1, float m2, float m3, float interclass_filter, int block_size) -> Tensor grad_embeddings");
  m.def(
      "sampled_normalized_linear_margin_softmax_ce_stats(Tensor embeddings, Tensor centers, Tensor kept, "
      "Tensor local_target, float scale, float m1, float m2, float m3, float interclass_filter, int block_size) -> "
      "(Tensor row_max, Tensor sum_exp, Tensor target_logit, Tensor inv_norm, Tensor workspace)");
  m.def(
      "sampled_normalized_linear_margin_softmax_ce_backward_(Tensor grad_loss, Tensor embeddings, Tensor centers, "
      "Tensor kept, Tensor local_target, Tensor row_max, Tensor sum_exp, Tensor inv_norm, Tensor(a!) workspace, "
      "float scale, float m1, float m2, float m3, float interclass_filter, int block_size) -> Tensor grad_embeddings");
  m.def(
      "unicon_loss(Tensor query, Tensor keys, Tensor query_labels, Tensor key_labels, Tensor own_key, "
      "float temperature, float margin, int block_size) -> (Tensor loss, Tensor lse_negatives, "
      "Tensor lse_positives)");
  m.def(
      "unicon_loss_backward(Tensor grad_loss, Tensor query, Tensor keys, Tensor query_labels, Tensor key_labels, "
      "Tensor own_key, Tensor lse_negatives, Tensor lse_positives, float temperature, float margin, int block_size, "
      "bool compute_grad_keys) -> (Tensor grad_query, Tensor grad_keys)");
}
