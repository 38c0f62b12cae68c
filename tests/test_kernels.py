"""
Tests of kernels/: the Triton kernel (kernels/attention.py) against the pure-torch reference (forward, dq, dk, dv),
the grouped pure-torch path (kernels/grouped.py, what the model runs on CPU) against the reference, the reference
against dense masked SDPA, and the CPU RMSNorm op (kernels/rmsnorm.py) against PyTorch's. RoPE in the references is
the model's one pure-torch RoPE (model.Rope).

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below and in
tests/conftest.py before kernels.attention is imported), with tiny shapes: about 15 s on 2 CPU cores.
With a GPU the same cases run compiled, plus bf16 / fp16 cases at realistic lengths.

    python -m pytest -q tests/test_kernels.py
"""
import os

import torch

if not torch.cuda.is_available():       # must precede the import of kernels.attention (triton.jit reads it)
    os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest

import model
import structure
from kernels import grouped, rmsnorm
from kernels.attention import attention, attention_ref, layout_plan, use_triton, varlen_attention

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')

# name: (head_dim, query lengths, key lengths, RoPE, softcap). Lengths are not tile multiples (interpreter
# tiles are 16 and 32), differ a lot between segments; keys longer than queries = a KV-cache prefix;
# a segment with keys but no queries must still give zero dk, dv.
CASES = {
    'd72-rope-kvprefix': (72, [1, 0, 17, 40], [5, 3, 17, 43], True, None),
    'd72-plain': (72, [33], [33], False, None),
    'd64-rope-fusedqkv': (64, [1, 17, 40], [1, 17, 40], True, None),
    'd64-softcap': (64, [3, 50], [3, 50], False, 1.5),
}


def cu_seqlens(lengths, device):
    """[l0, l1, ...] -> [0, l0, l0+l1, ...] int32 (flash-attention convention)."""
    return torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device, torch.int32)


def make_inputs(d, lq, lk, rope, dtype=torch.float32, heads=2, device=DEVICE, seed=0):
    """Random q [N, h, d], k, v [M, h, d] (views of one fused qkv tensor when lq == lk, as in the model),
    cu_q, cu_k, and coords in [0, 16) or None."""
    g = torch.Generator().manual_seed(seed)
    N, M = sum(lq), sum(lk)
    if lq == lk:
        qkv = torch.randn(N, 3, heads, d, generator=g).to(device, dtype).requires_grad_()
        q, k, v = qkv.unbind(1)                                                 # strided [N, h, d] views
    else:
        q = torch.randn(N, heads, d, generator=g).to(device, dtype).requires_grad_()
        k, v = (torch.randn(M, heads, d, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    cu_q, cu_k = cu_seqlens(lq, device), cu_seqlens(lk, device)
    cq = torch.randint(0, 16, (N, 4), generator=g).to(device) if rope else None
    ck = torch.randint(0, 16, (M, 4), generator=g).to(device) if rope else None
    return q, k, v, cu_q, cu_k, cq, ck


def reference(q, k, v, cu_q, cu_k, cq=None, ck=None, softcap=None, theta=10000.0):
    """The reference with RoPE from coords: model.Rope, then one SDPA per segment."""
    if cq is not None:
        d = q.shape[-1]
        q, k = model.Rope.make(cq, d, theta).rotate(q), model.Rope.make(ck, d, theta).rotate(k)
    return attention_ref(q, k, v, cu_q.cpu(), cu_k.cpu(), softcap)


def run(backend, q, k, v, cu_q, cu_k, cq, ck, softcap, do):
    """Output and (dq, dk, dv) of the Triton kernel or the reference for the upstream gradient do."""
    f = varlen_attention if backend == 'triton' else reference
    o = f(q, k, v, cu_q, cu_k, cq, ck, softcap=softcap)
    return o, torch.autograd.grad(o, (q, k, v), do)


# -----------------------------------------------------------------------------
# the kernel vs the reference, fp32


@pytest.mark.parametrize('case', CASES)
def test_kernel_matches_reference_fp32(case):
    d, lq, lk, rope, softcap = CASES[case]
    q, k, v, cu_q, cu_k, cq, ck = make_inputs(d, lq, lk, rope)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device)
    o, grads = run('triton', q, k, v, cu_q, cu_k, cq, ck, softcap, do)
    o_ref, grads_ref = run('reference', q, k, v, cu_q, cu_k, cq, ck, softcap, do)
    # fp32 rounding: measured max abs error <= 2e-6 on CPU (interpreter: fp32 numpy dots) for values of
    # order 1; GPU fp32 runs use ieee-precision dots, same tolerance
    for name, a, b in zip(('o', 'dq', 'dk', 'dv'), (o, *grads), (o_ref, *grads_ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f'{case} {name}: {m}')
    if 0 in lq:                         # keys of a segment without queries get exactly zero gradient
        s = lq.index(0)
        assert grads[1][sum(lk[:s]):sum(lk[:s + 1])].abs().max() == 0


def test_cpu_takes_the_grouped_path():
    """On the CPU the entry point never runs the kernel: a layout moved there carries the grouped path's plan."""
    q = make_inputs(72, [5, 9], [5, 9], True, device='cpu')[0]
    assert not use_triton(q)
    layout = structure.Layout.build([5, 9], [5, 9]).to('cpu')
    assert isinstance(layout.plan, grouped.Plan)
    assert isinstance(layout_plan(layout.cu_q_host, layout.cu_k_host, 9, 9, 'cpu'), grouped.Plan)


def test_plan_memory_is_what_attention_computes():
    """A layout whose groups are whole segments needs no mask: one 4,096-token segment (one 2,048 px image of 32 px
    patches) makes no [4096, 4096] mask or bias (they took 4 GiB + 16 GiB for one 2048 x 2048 image at 8 px)."""
    p = grouped.plan(torch.tensor([0, 4096], dtype=torch.int32), torch.tensor([0, 4096], dtype=torch.int32), 4096, 4096)
    assert p.full and p.identity and p.mask is None and p.bias is None
    assert sum(x.numel() * x.element_size() for x in (p.q_gather, p.k_gather, p.q_scatter, p.k_scatter, p.q_real)) \
        < 200_000
    masked = grouped.plan(torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 3, 8], dtype=torch.int32), 5, 5)
    assert not masked.full and masked.mask.shape == (2, 1, 5, 5)     # 3 + 5 tokens do not fit one 5-slot group


# -----------------------------------------------------------------------------
# the grouped path (the model's attention on CPU) vs the reference, and the reference vs dense SDPA (CPU, cheap)


@pytest.mark.parametrize('softcap', [None, 30.0])
@pytest.mark.parametrize('small_scores', [0, 10 ** 9], ids=['sdpa', 'explicit'])
def test_grouped_path_matches_reference(softcap, small_scores, monkeypatch):
    """The model's attention call on CPU (RoPE from model.Rope, then the segments grouped: one masked SDPA, or
    GroupedAttention for short groups) == the per-segment reference loop; uneven segments, one without queries."""
    lq, lk = [1, 0, 17, 40, 3], [5, 3, 17, 43, 60]
    q, k, v, cu_q, cu_k, cq, ck = make_inputs(72, lq, lk, True, device='cpu')
    theta = 10000.0
    monkeypatch.setattr(grouped, 'SMALL_SCORES', small_scores)    # both CPU paths: SDPA and explicit softmax
    layout = structure.Layout.build(lq, lk).to('cpu')
    assert layout.plan.mask.shape[0] < len(lq)      # some segments share a group
    assert layout.plan.small == bool(small_scores)
    rq, rk = (model.Rope.make(c, 72, theta) for c in (cq, ck))
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    got = attention(q, k, v, layout, rq, rk, softcap)
    want = reference(q, k, v, cu_q, cu_k, cq, ck, softcap, theta)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    do = torch.randn_like(got)                      # gradients too: empty slots must contribute nothing
    g1 = torch.autograd.grad(got, (q, k, v), do)
    g2 = torch.autograd.grad(want, (q, k, v), do)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_reference_matches_dense_masked_sdpa():
    """Block-diagonal semantics: one SDPA over all tokens with a segment mask gives the same output."""
    lq, lk = [4, 17, 9], [6, 17, 30]
    q, k, v, cu_q, cu_k, _, _ = make_inputs(64, lq, lk, False, device='cpu')
    seg_q = torch.repeat_interleave(torch.arange(3), torch.tensor(lq))
    seg_k = torch.repeat_interleave(torch.arange(3), torch.tensor(lk))
    mask = seg_q[:, None] == seg_k[None, :]                                     # [N, M]
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(reference(q, k, v, cu_q, cu_k), dense, atol=1e-6, rtol=1e-5)


def test_rope_is_relative():
    """Shifting every coordinate by one constant leaves attention unchanged (paper: relative 4D RoPE)."""
    q, k, v, cu_q, cu_k, cq, ck = make_inputs(72, [7, 20], [7, 20], True, device='cpu')
    shift = torch.tensor([3, -5, 11, 2])
    a = reference(q, k, v, cu_q, cu_k, cq, ck)
    b = reference(q, k, v, cu_q, cu_k, cq + shift, ck + shift)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the autograd wrapper refuses what the kernel does not handle


def bad_inputs():
    q, k, v, cu_q, cu_k, cq, ck = (x.detach() if x is not None else None
                                   for x in make_inputs(64, [3, 5], [4, 5], True, device=DEVICE))
    return {
        'float64': ((q.double(), k.double(), v.double(), cu_q, cu_k, cq, ck), 'dtype'),
        'mixed dtype': ((q.half(), k, v, cu_q, cu_k, cq, ck), 'dtype'),
        'k/v shapes': ((q, k, v[:-1], cu_q, cu_k, cq, ck), 'expected q'),
        'cu int64': ((q, k, v, cu_q.long(), cu_k, cq, ck), 'int32'),
        'cu total': ((q, k, v, cu_q, cu_k - 1, cq, ck), 'rise from 0'),
        'one coords': ((q, k, v, cu_q, cu_k, cq, None), 'coords_q and coords_k'),
        'coords shape': ((q, k, v, cu_q, cu_k, cq[:, :3], ck), 'coords'),
        'rope head_dim': ((q[..., :20], k[..., :20], v[..., :20], cu_q, cu_k, cq, ck), 'divisible by 8'),
        'head_dim stride': ((q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cu_q, cu_k, None, None),
                            'unit stride'),
    }


@pytest.mark.parametrize('name', list(bad_inputs()))
def test_wrapper_rejects_bad_inputs(name):
    args, message = bad_inputs()[name]
    with pytest.raises(ValueError, match=message):
        varlen_attention(*args)


def test_kernel_compiles_in_one_graph():
    """The kernel is a custom op: torch.compile(fullgraph=True) keeps it inside the graph (no break), and the
    compiled forward and gradients equal the eager kernel's; host copies of cu given, as the model passes them."""
    from torch._dynamo.testing import CompileCounterWithBackend
    q, k, v, cu_q, cu_k, cq, ck = make_inputs(72, [5, 0, 17], [9, 3, 17], True)
    host = (cu_q.cpu(), cu_k.cpu())

    def f(q, k, v):
        return varlen_attention(q, k, v, cu_q, cu_k, cq, ck, softcap=None, cu_host=host)
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    o1 = compiled(q, k, v)
    g1 = torch.autograd.grad(o1, (q, k, v), do)
    o2 = f(q, k, v)
    g2 = torch.autograd.grad(o2, (q, k, v), do)
    assert counter.frame_count == 1 and counter.op_count >= 1
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ref = reference(q, k, v, cu_q, cu_k, cq, ck)
    torch.testing.assert_close(o1, ref, atol=1e-5, rtol=0)


def test_segment_cache_follows_cu():
    """The host copy of cu (and its block lists) is reused while the same unmodified tensor comes back, as across
    a trunk's layers; an in-place edit or a new tensor with other segments must not reuse it."""
    q, k, v, cu, _, _, _ = make_inputs(64, [17, 40], [17, 40], False)
    q, k, v = (x.detach() for x in (q, k, v))
    for step in range(3):
        if step == 1:
            cu = cu_seqlens([7, 50], q.device)                                  # a new tensor, same _version
        if step == 2:
            cu[1] = 50                                                          # in place: segments 50 + 7
        ref = reference(q, k, v, cu, cu)
        for _ in range(2):                                                      # second call: from the cache
            torch.testing.assert_close(varlen_attention(q, k, v, cu, cu), ref, atol=1e-5, rtol=1e-5)
    bad = cu.clone()
    bad[1] = 80                                                                 # falls: still rejected
    with pytest.raises(ValueError, match='must rise'):
        varlen_attention(q, k, v, bad, bad)


# -----------------------------------------------------------------------------
# fp16 / bf16: the interpreter checks fp16 on tiny shapes (its tl.dot is wrong for bf16); the GPU both


def check_low_precision(dtype, d, lq, lk, heads):
    q, k, v, cu_q, cu_k, cq, ck = make_inputs(d, lq, lk, True, dtype=dtype, heads=heads)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, dtype)
    o, grads = run('triton', q, k, v, cu_q, cu_k, cq, ck, None, do)
    o_lp, grads_lp = run('reference', q, k, v, cu_q, cu_k, cq, ck, None, do)     # same precision
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o32, grads32 = run('reference', q32, k32, v32, cu_q, cu_k, cq, ck, None, do.float())
    # tolerance (FlashAttention's test criterion): the kernel's error against the fp32 reference is at most
    # twice that of the reference path run in the same low precision, plus 1e-3 (bf16 ulp at 1 is 8e-3)
    for name, a, b, c in zip(('o', 'dq', 'dk', 'dv'), (o, *grads), (o_lp, *grads_lp), (o32, *grads32)):
        err, err_lp = (a.float() - c).abs().max().item(), (b.float() - c).abs().max().item()
        assert err <= 2 * err_lp + 1e-3, f'{dtype} {name}: kernel error {err:.3g} vs reference {err_lp:.3g}'


def test_kernel_fp16():
    check_low_precision(torch.float16, 72, [1, 17, 40], [5, 17, 43], heads=2)


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('d', [72, 64])
@pytest.mark.parametrize('prefix', [False, True])
def test_kernel_low_precision_gpu(dtype, d, prefix):
    lq = [1, 100, 1000, 257, 4096]
    check_low_precision(dtype, d, lq, [n + 64 * prefix for n in lq], heads=4)


# -----------------------------------------------------------------------------
# kernels/rmsnorm.py: the hand-written backward against autograd through PyTorch's own rms_norm


@pytest.mark.parametrize('shape,wshape', [((37, 64), (64,)), ((37, 2, 32), (2, 32))], ids=['RMSNorm', 'HeadRMSNorm'])
def test_rms_norm_backward_matches_autograd(shape, wshape):
    """The hand-written backward of kernels/rmsnorm.py (the CPU op) against autograd through the plain formula in
    float64: the input's and the weight's gradients (RMSNorm weight [C]; the qk-norm's gamma [h, d])."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    w = (torch.rand(wshape, generator=g) + 0.5).requires_grad_()
    up = torch.randn(shape, generator=g)
    y = rmsnorm.rms_norm(x, w, 1e-6)
    dx, dw = torch.autograd.grad(y, (x, w), up)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
    rx, rw = torch.autograd.grad(yd, (xd, wd), up.double())
    torch.testing.assert_close(y, yd.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, rx.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, rw.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rmsnorm.rms_norm_ref(x, w, 1e-6), y, atol=1e-5, rtol=1e-5)   # PyTorch's own
