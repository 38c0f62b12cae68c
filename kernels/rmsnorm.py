"""
RMSNorm with a hand-written backward for the CPU: y = x * r * w, r = rsqrt(mean(x^2) + eps) over the last dim.

On the CPU, F.rms_norm is a decomposition that autograd runs op by op, forward and backward; the autograd Function
below runs fewer (kernels/bench_rmsnorm.py counts both), and each decoder block runs four norms (two RMSNorms, the
q and k norms), so on a small model the op count is the cost. CUDA has a fused rms_norm kernel, which rms_norm() uses there.
  forward   r = rsqrt(mean(x^2) + eps), xh = x * r, y = xh * w
  backward  dx = r * (g*w - xh * mean(g*w * xh)), dw = sum over rows of (g * xh)
Constraints: x [..., D] fp32 (rms_norm casts), w the trailing dims of x.

    python -m pytest -q tests/test_kernels.py -k rms      # against F.rms_norm, values and gradients
    python kernels/bench_rmsnorm.py                       # ops and time per call vs F.rms_norm
"""
import torch
import torch.nn.functional as F


def rms_norm_ref(x, w, eps):
    """The reference: PyTorch's own rms_norm in fp32, cast back to x's dtype."""
    return (F.rms_norm(x.float(), x.shape[-1:], eps=eps) * w).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        r = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))          # [..., 1]
        xh = x * r
        ctx.save_for_backward(xh, r, w)
        return xh * w

    @staticmethod
    def backward(ctx, g):
        xh, r, w = ctx.saved_tensors
        gw = g * w
        dx = (gw - xh * (gw * xh).mean(-1, keepdim=True)) * r
        dw = (g * xh).reshape(-1, *w.shape).sum(0).to(w.dtype)               # w: the trailing dims of x
        return dx, dw, None


def rms_norm(x, w, eps):
    """x * rsqrt(mean(x^2) + eps) * w over the last dim, computed in fp32, cast back to x's dtype: the fused kernel
    on CUDA, the Function above elsewhere."""
    if x.is_cuda:
        return rms_norm_ref(x, w, eps)
    return RMSNormFunction.apply(x.float(), w, eps).to(x.dtype)
