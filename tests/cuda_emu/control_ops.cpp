// Test controls of the host emulation: which kernels ran, and a switch to 64-bit indexing.
#include <torch/library.h>

#include "cuda_emu/runtime.h"

TORCH_LIBRARY_FRAGMENT(litefpn_emu, m) {
  // "<kernel instantiation>@<blocks>" for every launch since the last call, in order.
  m.def("_launches() -> str[]", [] { return litefpn::emu::take_launch_log(); });
  // With on, every op takes its 64-bit index kernels whatever the tensor sizes.
  m.def("_force_int64(bool on) -> ()", [](bool on) { litefpn::emu::set_force_int64(on); });
}
