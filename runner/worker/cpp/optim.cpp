// The optimizer's side of libtorch that the tch crate does not expose: dropping a parameter's
// gradient (PyTorch's `zero_grad(set_to_none=True)`) and the fused optimizer kernels behind
// `torch.optim.SGD/Adam/AdamW(fused=True)`, which update a list of parameters in one call and
// one pass over each parameter's memory. Plain C entry points over tch's `at::Tensor*`; every
// C++ exception stays on this side and comes back as a nonzero return with its message.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; i++) {
    out.push_back(*ts[i]);
  }
  return out;
}

int failed(const std::exception& e, char* err, size_t cap) {
  if (cap > 0) {
    std::strncpy(err, e.what(), cap - 1);
    err[cap - 1] = '\0';
  }
  return -1;
}

}  // namespace

extern "C" {

// Resets each tensor's `.grad` to undefined, so the next backward pass writes a fresh gradient
// instead of adding into a zeroed one.
void xlab_drop_grads(at::Tensor* const* ts, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (ts[i]->defined() && ts[i]->grad().defined()) {
      ts[i]->mutable_grad().reset();
    }
  }
}

// One SGD step over n parameters (dampening 0, not maximizing). `bufs` are the momentum
// buffers (ignored without momentum); with `first` they are written, not read.
int xlab_fused_sgd(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* bufs, size_t n,
                   double weight_decay, double momentum, double lr, int nesterov, int first, char* err,
                   size_t cap) {
  try {
    const auto buffers = momentum != 0.0 ? list(bufs, n) : std::vector<at::Tensor>{};
    at::_fused_sgd_(list(params, n), list(grads, n), buffers, weight_decay, momentum, lr, 0.0, nesterov != 0, false,
                    first != 0);
    return 0;
  } catch (const std::exception& e) {
    return failed(e, err, cap);
  }
}

// One Adam step (AdamW with `decoupled`) over n parameters at step `step` (a one-element float
// tensor on the parameters' device, shared by all of them).
int xlab_fused_adam(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avgs,
                    at::Tensor* const* exp_avg_sqs, const at::Tensor* step, size_t n, double lr, double beta1,
                    double beta2, double weight_decay, double eps, int decoupled, char* err, size_t cap) {
  try {
    const std::vector<at::Tensor> steps(n, *step);
    const auto p = list(params, n);
    const auto g = list(grads, n);
    const auto m = list(exp_avgs, n);
    const auto v = list(exp_avg_sqs, n);
    if (decoupled != 0) {
      at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps, false, false);
    } else {
      at::_fused_adam_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps, false, false);
    }
    return 0;
  } catch (const std::exception& e) {
    return failed(e, err, cap);
  }
}
}
