"""
How fast is kernels/attention.py? TFLOP/s of forward and forward+backward of varlen attention with 4D RoPE
on a packed mixed-resolution batch (images of many sizes + 16-frame video tiles, So400m heads: 16 x 72),
against PyTorch SDPA with each backend and the packing it needs (per-segment loop, padding + key mask,
nested jagged tensors), FlexAttention with a document mask, and the grouped pure-torch path the model runs on CPU
(kernels/grouped.py). The end-to-end training step is bench/bench_step.py's.

FLOPs (useful work only; padded and masked methods are credited the same):
  forward         4 * h * d * sum_i n_i * m_i      (QK^T and PV, 2 FLOPs per multiply-add)
  forward+back    3.5 x forward                    (the backward recomputes QK^T: 5 matmuls vs 2)
Every method includes applying 4D RoPE to q and k (the kernel does it in registers, the others with one complex
multiply in torch, as model.Rope). The block mask / block lists are built outside the timed region for
FlexAttention, inside it for the kernel (one host copy of cu_seqlens per call).

    python kernels/bench_attention.py               # CPU: small batch, reference/SDPA/Flex/grouped rows
    python kernels/bench_attention.py --size full   # GPU: 64-1024 px images + video tiles
    options: --heads 16 --head_dim 72 --dtype bfloat16 --reps 10
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import argparse
import logging
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels.attention as kattn
from kernels import grouped

# (kind, frames, height, width) at patch (4, 16, 16): tokens = frames/4 * h/16 * w/16
WORKLOADS = {
    'small': [('image', 1, 64, 64), ('image', 1, 128, 96), ('image', 1, 192, 192), ('image', 1, 256, 256),
              ('video', 16, 128, 128)],
    'full': [('image', 1, s, s) for s in (64, 128, 256, 384, 512, 768, 1024)] +
            [('image', 1, 512, 256), ('video', 16, 256, 256), ('video', 16, 256, 256), ('video', 16, 512, 512)],
}


def packed_coords(workload, device):
    """(t, row, col, 0) coords [N, 4] of every token, segment by segment, and the segment lengths."""
    coords, lens = [], []
    for _, T, H, W in workload:
        t, h, w = max(T // 4, 1), H // 16, W // 16
        g = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing='ij')
        coords.append(torch.stack([*g, torch.zeros_like(g[0])], -1).reshape(-1, 4))
        lens.append(t * h * w)
    return torch.cat(coords).to(device), lens


# -----------------------------------------------------------------------------
# the methods: each maps (q, k, v) [N, h, d] -> [N, h, d] with RoPE at the packed coords


def make_methods(coords, lens, cu, device):
    S, L, N = len(lens), max(lens), sum(lens)
    lens_t = torch.tensor(lens, device=device)
    seg = torch.repeat_interleave(torch.arange(S, device=device), lens_t)        # [N] segment of each token
    pos = torch.arange(N, device=device) - cu[:-1].long()[seg]                  # [N] position in segment
    key_mask = (torch.arange(L, device=device)[None] < lens_t[:, None])[:, None, None]  # [S, 1, 1, L]
    rot = {}

    def rope(q, k):             # 4D RoPE as model.Rope (this file may not import model.py): one complex multiply
        if 'r' not in rot:
            ang = (coords.float()[:, :, None] * kattn.rope_freqs(q.shape[-1], 10000.0, q.device)).flatten(1)
            rot['r'] = torch.polar(torch.ones_like(ang), ang)[:, None]         # [N, 1, d/2]
        turn = lambda x: torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * rot['r'])
        return turn(q).flatten(-2).to(q.dtype), turn(k).flatten(-2).to(k.dtype)
    plan = grouped.plan(cu.cpu(), cu.cpu(), max(lens), max(lens)).to(device)

    def loop(backend):
        def f(q, k, v):
            q, k = rope(q, k)
            with sdpa_kernel(backend):
                return kattn.attention_ref(q, k, v, cu.cpu(), cu.cpu())
        return f

    def padded(backend):
        def f(q, k, v):
            q, k = rope(q, k)
            pad = lambda x: x.new_zeros(S, L, *x.shape[1:]).index_put((seg, pos), x).transpose(1, 2)
            with sdpa_kernel(backend):                                          # [S, h, L, d]
                o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_mask)
            return o.transpose(1, 2)[seg, pos]                                  # [N, h, d]
        return f

    def nested(backend):
        def f(q, k, v):
            q, k = rope(q, k)
            nt = lambda x: torch.nested.nested_tensor_from_jagged(x, cu.long()).transpose(1, 2)  # [S, h, j, d]
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(nt(q), nt(k), nt(v)).transpose(1, 2).values()
        return f

    methods = {'triton kernel (RoPE fused)': lambda q, k, v: kattn.varlen_attention(q, k, v, cu, cu, coords, coords),
               'grouped pure torch (the model on CPU)': lambda q, k, v: grouped.attention(*rope(q, k), v, plan)}
    backends = [('flash', SDPBackend.FLASH_ATTENTION), ('efficient', SDPBackend.EFFICIENT_ATTENTION),
                ('cudnn', SDPBackend.CUDNN_ATTENTION), ('math', SDPBackend.MATH)]
    for name, b in backends:
        methods[f'sdpa {name}: per-segment loop'] = loop(b)
        methods[f'sdpa {name}: padding + mask'] = padded(b)
        methods[f'sdpa {name}: nested jagged'] = nested(b)
    methods['flex attention: document mask'] = make_flex(seg, rope, N, device)
    return methods


def make_flex(seg, rope, N, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block_mask = create_block_mask(lambda b, h, qi, ki: seg[qi] == seg[ki], None, None, N, N, device=device)
    flex = torch.compile(flex_attention) if device.type == 'cuda' else flex_attention

    def f(q, k, v):
        q, k = rope(q, k)
        o = flex(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=block_mask)  # [1, h, N, d]
        return o[0].transpose(0, 1)
    return f


# -----------------------------------------------------------------------------
# timing


def timeit(fn, reps, warmup, device):
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_attention(args, device, dtype):
    coords, lens = packed_coords(WORKLOADS[args.size], device)
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(device, torch.int32)
    N, h, d = sum(lens), args.heads, args.head_dim
    flops = 4 * h * d * sum(n * n for n in lens)
    print(f"workload '{args.size}': {len(lens)} segments, lengths {lens}, N = {N} tokens, h = {h}, d = {d}, "
          f"{dtype}")
    print(f"FLOPs: forward = 4*h*d*sum(n_i^2) = {flops / 1e9:.3f} GFLOP; forward+backward = 3.5 x forward")
    g = torch.Generator(device='cpu').manual_seed(0)
    q, k, v = (torch.randn(N, h, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    do = torch.randn(N, h, d, generator=g).to(device, dtype)
    q0, k0, v0 = q.detach(), k.detach(), v.detach()                             # forward-only timing
    ref = make_methods(coords, lens, cu, device)['sdpa math: per-segment loop'](q, k, v).float()
    print(f"{'method':40s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} {'max|err|':>9s}")
    for name, fn in make_methods(coords, lens, cu, device).items():
        if 'triton' in name and device.type != 'cuda':
            print(f"{name:40s} needs CUDA (the interpreter is for tests, not timing)")
            continue
        cells, why, err = [], '', ''
        try:
            with torch.no_grad():
                err = f"{(fn(q0, k0, v0).float() - ref).abs().max().item():9.2e}"
                t = timeit(lambda: fn(q0, k0, v0), args.reps, args.warmup, device)
            cells += [f"{t * 1e3:9.2f}", f"{flops / t / 1e12:8.3f}"]
            t = timeit(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), args.reps, args.warmup, device)
            cells += [f"{t * 1e3:11.2f}", f"{3.5 * flops / t / 1e12:8.3f}"]
        except Exception as e:    # a backend that cannot run this case: say why and go on
            why = f"n/a: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:60]}"
        cells += [''] * (4 - len(cells))
        print(f"{name:40s} {cells[0]:>9s} {cells[1]:>8s} {cells[2]:>11s} {cells[3]:>8s} {err:>9s} {why}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('--size', choices=list(WORKLOADS), default=None, help='small on CPU, full on CUDA')
    p.add_argument('--heads', type=int, default=16)
    p.add_argument('--head_dim', type=int, default=72)
    p.add_argument('--dtype', default='bfloat16', help='on CUDA; CPU runs fp32')
    p.add_argument('--reps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    args = p.parse_args()
    warnings.filterwarnings('ignore')                           # SDPA / nested-tensor backend chatter
    logging.getLogger('torch').setLevel(logging.ERROR)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dtype = getattr(torch, args.dtype) if device.type == 'cuda' else torch.float32
    args.size = args.size or ('full' if device.type == 'cuda' else 'small')
    name = torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    print(f"device: {name}, torch {torch.__version__}, triton {'yes' if kattn.HAS_TRITON else 'no'}")
    bench_attention(args, device, dtype)


if __name__ == '__main__':
    main()
