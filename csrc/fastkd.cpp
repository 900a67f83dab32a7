// The fastkd operator library: every op's schema, and the Python module that loads them.
//
// Kernels register themselves per device in csrc/cpu/<loss>.cpp and csrc/cuda/<loss>.cu;
// autograd and fake (meta) implementations are registered from Python (fastkd/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "block_cache.h"
#include "kd_loss.h"

TORCH_LIBRARY(fastkd, m) {
  // Soft-target cross-entropy family (Hinton KD, CE-mixed KD, guided KD, teacher cohorts), one
  // pass per row. See csrc/kd_loss.h for the exact contract of every argument. Sparse (top-k)
  // teachers come after the dense ones in kd_coefs and kd_row_weights; `teachers` may be empty
  // when there is at least one sparse teacher. Tensor[] takes no default in a schema, so every
  // caller passes the three sparse lists (empty lists: no sparse teacher). `divergence` is a
  // fastkd::Divergence code (0 forward KL, 1 reverse KL, 2 JSD(beta)).
  m.def(
      "kd_loss_fwd(Tensor student, Tensor[] teachers, Tensor? labels, Tensor? kd_row_weights, "
      "Tensor? ce_row_weights, float[] kd_coefs, float ce_coef, float temperature, "
      "float label_smoothing, int ignore_index, bool per_row, bool compute_grad, "
      "Tensor[] sparse_ids, Tensor[] sparse_values, Tensor[] sparse_tails, int divergence=0, "
      "float beta=0.5) "
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

// The CPU block cache's controls (fastkd.memory wraps them).
static PyObject* cpu_cache_info(PyObject*, PyObject*) {
  const fastkd::BlockCacheInfo info = fastkd::block_cache_info();
  return Py_BuildValue("(LLLLL)", static_cast<long long>(info.cached_bytes),
                       static_cast<long long>(info.in_use_bytes),
                       static_cast<long long>(info.limit_bytes), static_cast<long long>(info.hits),
                       static_cast<long long>(info.misses));
}

static PyObject* set_cpu_cache_limit(PyObject*, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  if (bytes < 0) {
    PyErr_Format(PyExc_ValueError, "the CPU cache limit must be >= 0 bytes, got %lld", bytes);
    return nullptr;
  }
  fastkd::set_block_cache_limit(bytes);
  Py_RETURN_NONE;
}

static PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  fastkd::empty_block_cache();
  Py_RETURN_NONE;
}

#ifdef FASTKD_WITH_CUDA
// fastkd._C.kd_cuda_launch_plan(rows, cols, teachers, sparse_teachers, divergence,
// student_bytes, teacher_bytes, with_grad, sms, l2_bytes, clusters): the CUDA KD kernels' launch
// plan for that call on that GPU, as (kernel, threads_per_row, blocks, threads, split) with
// kernel "resident", "split" or "stream". No GPU is needed: the plan is host code.
static PyObject* kd_cuda_launch_plan(PyObject*, PyObject* args) {
  long long rows, cols, l2_bytes;
  int teachers, sparse, divergence, student_bytes, teacher_bytes, with_grad, sms, clusters;
  if (!PyArg_ParseTuple(args, "LLiiiiipiLp", &rows, &cols, &teachers, &sparse, &divergence,
                        &student_bytes, &teacher_bytes, &with_grad, &sms, &l2_bytes, &clusters)) {
    return nullptr;
  }
  if (rows < 1 || cols < 1 || teachers < 0 || sparse < 0 || teachers + sparse < 1 ||
      teachers + sparse > fastkd::kMaxTeachers || sms < 1 || l2_bytes < 0) {
    PyErr_SetString(PyExc_ValueError,
                    "kd_cuda_launch_plan: rows, cols and sms must be >= 1, l2_bytes >= 0, and "
                    "1 to max_teachers teachers in all");
    return nullptr;
  }
  fastkd::KDLossArgs a;
  a.rows = rows;
  a.cols = cols;
  a.num_teachers = teachers;
  a.num_sparse = sparse;
  a.divergence = divergence;
  static char unused;  // the plan only asks whether there is a gradient
  a.grad = with_grad ? &unused : nullptr;
  const fastkd::KDCudaLaunchPlan p = fastkd::kd_cuda_launch_plan(
      a, student_bytes, teacher_bytes, sms, l2_bytes, clusters != 0);
  static const char* const kinds[] = {"resident", "split", "stream"};
  return Py_BuildValue("(siLii)", kinds[p.kernel], p.threads_per_row,
                       static_cast<long long>(p.blocks), p.threads, p.split);
}
#endif

static PyMethodDef fastkd_methods[] = {
#ifdef FASTKD_WITH_CUDA
    {"kd_cuda_launch_plan", kd_cuda_launch_plan, METH_VARARGS,
     "the CUDA KD kernels' launch plan for a call and a GPU shape (host code, no GPU needed)"},
#endif
    {"cpu_cache_info", cpu_cache_info, METH_NOARGS,
     "(cached_bytes, in_use_bytes, limit_bytes, hits, misses) of the CPU block cache"},
    {"set_cpu_cache_limit", set_cpu_cache_limit, METH_O, "sets the CPU block cache's limit"},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "releases every cached CPU block"},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef fastkd_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastkd_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastkd_module);
  if (module == nullptr) return nullptr;
#ifdef FASTKD_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  // Teachers one kd_loss_fwd call takes; the Python layers and the Triton kernel read it from here.
  PyModule_AddIntConstant(module, "max_teachers", fastkd::kMaxTeachers);
  return module;
}
