// Mixed precision for xlab-worker: libtorch's autocast for a device type and a dtype, which the
// tch crate does not expose (it turns on CUDA's fp16 autocast only). Plain C entry points; every
// C++ exception stays on this side and turns into a nonzero return.
#include <ATen/autocast_mode.h>

extern "C" {

// device: 0 CPU, 1 CUDA. dtype: 0 bfloat16, 1 float16. Returns 0, or -1 if libtorch refused.
int xlab_autocast_enter(int device, int dtype) {
  try {
    const auto dev = device == 0 ? at::kCPU : at::kCUDA;
    at::autocast::set_autocast_dtype(dev, dtype == 0 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(dev, true);
    at::autocast::increment_nesting();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Leaves the region xlab_autocast_enter opened; the cast weights are dropped at the outermost.
int xlab_autocast_exit(int device) {
  try {
    const auto dev = device == 0 ? at::kCPU : at::kCUDA;
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dev, false);
    return 0;
  } catch (...) {
    return -1;
  }
}

int xlab_autocast_is_enabled(int device) {
  return at::autocast::is_autocast_enabled(device == 0 ? at::kCPU : at::kCUDA) ? 1 : 0;
}
}
