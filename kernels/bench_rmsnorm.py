"""
How much does kernels/rmsnorm.py save on the CPU? ATen ops and time of forward + backward of one RMSNorm call,
the hand-written autograd Function against autograd through PyTorch's own F.rms_norm, at the decoder's shapes
(tokens x width for RMSNorm, tokens x heads x head_dim for the qk-norm). One torch thread, as the CPU demo runs;
medians of alternating runs.

    python kernels/bench_rmsnorm.py                     # tiny preset shapes (width 64, 2 heads of 32)
    python kernels/bench_rmsnorm.py --width 1152 --heads 16
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import rmsnorm


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def fwd_bwd(fn, x, w, g):
    y = fn(x, w, 1e-6)
    return torch.autograd.grad(y, (x, w), g)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('--tokens', type=int, default=1024)
    p.add_argument('--width', type=int, default=64)
    p.add_argument('--heads', type=int, default=2)
    p.add_argument('--reps', type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    ours = lambda x, w, eps: rmsnorm.RMSNormFunction.apply(x, w, eps)
    for name, shape, wshape in (('RMSNorm', (args.tokens, args.width), (args.width,)),
                                ('qk-norm', (args.tokens, args.heads, args.width // args.heads),
                                 (args.heads, args.width // args.heads))):
        x = torch.randn(shape, requires_grad=True)
        w = torch.ones(wshape, requires_grad=True)
        g = torch.randn(shape)
        print(f"{name} {tuple(shape)}")
        times = {'F.rms_norm + autograd': [], 'RMSNormFunction': []}
        fns = dict(zip(times, (rmsnorm.rms_norm_ref, ours)))
        for label, fn in fns.items():
            with OpCount() as c:
                fwd_bwd(fn, x, w, g)
            print(f"  {label:24s} {c.n:3d} ATen ops")
        for _ in range(args.reps):                      # alternating, so both see the same machine
            for label, fn in fns.items():
                t0 = time.perf_counter()
                fwd_bwd(fn, x, w, g)
                times[label].append(time.perf_counter() - t0)
        for label, t in times.items():
            print(f"  {label:24s} {statistics.median(t) * 1e6:8.1f} us forward + backward (median of {args.reps})")


if __name__ == '__main__':
    main()
