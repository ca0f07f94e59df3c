// Python bindings of the CPU fused ops (noprop_fast.cpu_ops loads this extension and wraps each
// pair of forward / backward functions in an autograd Function). The GIL is released: the ops
// run OpenMP teams and call ATen, and hold no Python objects.
#include <torch/extension.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CPU fused ops of noprop_fast (noise injection, block loss, block linear, head)";
  const auto release = py::call_guard<py::gil_scoped_release>();
  module.def("philox_randn", &noprop::philox_randn, "randn(seed, offset + i), i < numel", release);
  module.def("noise_forward", &noprop::noise_forward, release);
  module.def("noise_backward", &noprop::noise_backward, release);
  module.def("block_loss_forward", &noprop::block_loss_forward, release);
  module.def("block_loss_backward", &noprop::block_loss_backward, release);
  module.def("block_linear_forward", &noprop::block_linear_forward, release);
  module.def("block_linear_backward", &noprop::block_linear_backward, release);
  module.def("softmax_head_forward", &noprop::softmax_head_forward, release);
  module.def("softmax_head_backward", &noprop::softmax_head_backward, release);
}
