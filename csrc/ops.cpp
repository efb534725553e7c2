// Schemas of the compiled kernels, in one place. Each device folder registers its kernels with
// TORCH_LIBRARY_IMPL(litefpn, CPU|CUDA). The public operators (`litefpn::up2_fuse`, ...) are
// defined in Python (litefpn_kernels/ops.py) with their fake kernels and autograd; they call these
// `_*` kernels for the `cpu` and `cuda` backends.
#include <Python.h>
#include <torch/library.h>

// `import litefpn_kernels._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY_FRAGMENT(litefpn, m) {
  // out = alpha*gate_coarse*Up2(coarse) + beta*gate_fine*fine; alpha, beta from the raw weights
  // (both or neither given), computed inside the kernel.
  m.def("_up2_fuse_fwd(Tensor coarse, Tensor fine, Tensor? w_coarse, Tensor? w_fine, "
        "Tensor? gate_coarse, Tensor? gate_fine, float eps) -> Tensor");
  // -> (grad_coarse, grad_fine, sum_coarse, sum_fine). With need_sums, sum_coarse[n,c] =
  // sum_hw grad_out*Up2(coarse) and sum_fine[n,c] = sum_hw grad_out*fine (fp32, [N, C],
  // unweighted and ungated); otherwise both are empty fp32 tensors of shape [0].
  m.def("_up2_fuse_bwd(Tensor grad_out, Tensor coarse, Tensor fine, Tensor? w_coarse, "
        "Tensor? w_fine, Tensor? gate_coarse, Tensor? gate_fine, float eps, bool need_sums) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
