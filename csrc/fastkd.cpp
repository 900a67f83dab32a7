// The fastkd operator library: every op's schema, and the Python module that loads them.
//
// Kernels register themselves per device in csrc/cpu/<loss>.cpp and csrc/cuda/<loss>.cu;
// autograd and fake (meta) implementations are registered from Python (fastkd/ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastkd, m) {
  // Soft-target cross-entropy family (Hinton KD, CE-mixed KD, guided KD, teacher cohorts), one
  // pass per row. See csrc/cpu/kd_loss.cpp for the exact contract of every argument.
  m.def(
      "kd_loss_fwd(Tensor student, Tensor[] teachers, Tensor? labels, Tensor? kd_row_weights, "
      "Tensor? ce_row_weights, float[] kd_coefs, float ce_coef, float temperature, "
      "float label_smoothing, int ignore_index, bool per_row, bool compute_grad) "
      "-> (Tensor loss, Tensor grad)");
  // Backward of every loss whose forward already wrote the gradient: grad *= grad_output, in
  // place, row by row when grad_output has one value per row. Does nothing when grad_output is a
  // scalar exactly equal to 1 (read on the device, no host sync).
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // Channel attention (Channel Distillation): every (student, teacher) pair of one call at once.
  // The forward reads each map once and returns the loss and `diff`, the concatenation of every
  // pair's [B, C] block of dloss/dS (one value per channel, see csrc/channel_attention.h), so the
  // backward is a pure broadcast of grad_output * diff. The backward takes the students' shapes,
  // memory formats and dtype, not the students themselves: saving them would keep every student
  // map alive (and bound to its version counter) only for its metadata. One dtype per backward
  // call (ScalarType[] is not supported by torch.library's schema checks): students of mixed
  // dtypes take one backward call per dtype.
  m.def(
      "channel_attention_fwd(Tensor[] students, Tensor[] teachers, float[] weights, bool mean) "
      "-> (Tensor loss, Tensor diff)");
  m.def(
      "channel_attention_bwd(Tensor[] diffs, Tensor grad_output, SymInt[] sizes, "
      "bool[] channels_last, ScalarType dtype) -> Tensor[]");
  // Feature regression (FitNet hints, neighbourhood distillation, FEED): a list of (student,
  // teacher) pairs of equal shape [B, ...], each dense with every sample contiguous and both in one
  // layout; loss = sum_i weights[i] * (mean or sum) of |s - t|^p, p in {1, 2}, after L2-normalising
  // every sample when `normalize`. All pairs run in one launch. Returns the scalar loss and, per
  // pair, the student's gradient in its dtype and strides (an empty [0] tensor where
  // compute_grad[i] is false). See csrc/feature_regression.h for the exact contract.
  m.def(
      "feature_regression_fwd(Tensor[] students, Tensor[] teachers, float[] weights, int p, "
      "bool normalize, bool mean, bool[] compute_grad) -> (Tensor loss, Tensor[] grads)");
  // Backward of one-pass losses with several gradients: every grad *= grad_output (a scalar), in
  // place, in one launch; nothing is written when grad_output is exactly 1 (read on the device).
  m.def("scale_grads_(Tensor(a!)[] grads, Tensor grad_output) -> ()");
}

static PyModuleDef fastkd_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastkd_module);
  if (module == nullptr) return nullptr;
#ifdef FASTKD_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
