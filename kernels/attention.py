"""
Fused block-diagonal (varlen) attention with 4D RoPE on q and k, in Triton.

AToken packs every batch into one token set: segment i (a sample x temporal tile) is the query rows
q[cu_q[i]:cu_q[i+1]] against the key rows k[cu_k[i]:cu_k[i+1]], non-causal, scale 1/sqrt(d). With
cu_q != cu_k the keys of a segment may start with extra rows: the decoder KV cache puts the cached
keys of the previous latent frames there (the model's KV-cache decode). Every encoder and decoder layer runs
this, so it is the inner loop of the tokenizer.

Algorithm: FlashAttention-2 (Dao 2023, arXiv 2307.08691) as laid out in the Triton fused-attention
tutorial (python/tutorials/06-fused-attention.py):
  forward   one program per (query block, head); online softmax over the key blocks of its segment;
            stores O and the row log-sum-exp (base 2) for the backward.
  backward  delta = rowsum(dO * O) (one torch line); one program per (key block, head) loops over the
            query blocks of its segment and accumulates dK, dV; one program per (query block, head)
            loops over the key blocks and accumulates dQ. P is recomputed from the stored LSE.
  varlen    the host lists every BLOCK-row tile of every segment as (segment, first row), longest
            segments first, so a 1024 px image and a 64 px image in one batch waste no programs.
  4D RoPE   (official layout, as model.Rope) applied in registers: head_dim splits into four
            blocks t|x|y|z, block a rotates its interleaved pairs (2m, 2m+1) by
            coord_a * theta^(-j/head_dim), j = 0..d/8-1. Rotation in fp32, cast back to the input
            dtype before the dot (as model.Rope.rotate). The backward re-rotates q and k and applies
            the inverse rotation (angle -> -angle) to dq, dk before storing them.
  head_dim  tl.arange needs powers of two, so the head dim is split into D0 = the largest power of two
            <= d plus a second part of D1 = max(16, next power of two of the rest) columns, masked:
            72 = 64 + 16 (8 used), 64 = 64, 96 = 64 + 32. Two dots instead of padding 72 to 128
            (tl.dot needs K >= 16, hence 16 and not 8). Pairs never straddle the split (d0 is even).
  soft-cap  optional scores c * tanh(s / c) (the Gaussian decoder's), derivative (1 - tanh^2).

Constraints: q [N, h, d], k/v [M, h, d] with unit stride in d (other strides are free, so the q, k, v
views of a fused qkv projection need no copy); fp16, bf16 or fp32 (fp32 dots use ieee precision, for
tests); d >= 16, d % 8 == 0 with RoPE; cu_* int32 [S+1] from 0 to N / M; coords int [N, 4] / [M, 4].
Segments with queries but no keys give zeros (the reference gives NaN). The model passes the host copies
of cu_q, cu_k that the packed batch carries (cu_host), so no call reads the device; without them the host
copies are made once per cu tensor. Not causal, no dropout: AToken needs neither.

Runs on CUDA; on CPU only under the Triton interpreter (TRITON_INTERPRET=1 set before this module is
imported; tests/conftest.py does that when there is no GPU). `attention()` at the end is the one entry point
the model calls: the kernel for CUDA tensors it supports, the grouped pure-torch path (kernels/grouped.py)
elsewhere or with ATOKEN_ATTENTION=reference; `attention_ref` (one SDPA per segment) is what both are tested
against.

    python -m pytest -q tests/test_kernels.py           # CPU: interpreter; GPU: compiled, bf16 too
    python kernels/bench_attention.py                    # TFLOP/s vs SDPA / FlexAttention
"""
import math
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from kernels import grouped

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:         # CPU-only installs: the reference path still works
    HAS_TRITON = False

# triton.jit reads this when the kernels below are defined; we only mirror it to give a clear error
INTERPRET = os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'on', 'yes')
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# 'auto' | 'reference' (the pure-torch path on CUDA too, e.g. ATOKEN_ATTENTION=reference python train.py ...); tests
# and benchmarks set it directly
BACKEND = os.environ.get('ATOKEN_ATTENTION', 'auto')

# -----------------------------------------------------------------------------
# reference: pure torch, one SDPA per segment (the host loop the real paths avoid). RoPE, when wanted, is applied
# by the caller with the model's one pure-torch RoPE (model.Rope.rotate), exactly as the entry point below does.


def rope_freqs(head_dim, theta, device=None):
    """theta^(-j/head_dim), j = 0..head_dim/8-1, fp32 [d/8] (official: divided by the full head dim); the fused
    kernel's frequency table."""
    j = torch.arange(head_dim // 8, device=device, dtype=torch.float32)
    return theta ** (-j / head_dim)


def attention_ref(q, k, v, cu_q, cu_k, softcap=None):
    """The reference of attention(): q [N, h, d] against k, v [M, h, d] per segment of cu_q / cu_k (host int
    [S+1]); differentiable; any device."""
    out, bq, bk = [], cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        qi = q[bq[i]:bq[i + 1]].transpose(0, 1)                                 # [h, n, d]
        ki, vi = (x[bk[i]:bk[i + 1]].transpose(0, 1) for x in (k, v))          # [h, m, d]
        if softcap is None:
            o = F.scaled_dot_product_attention(qi, ki, vi)
        else:
            s = qi @ ki.transpose(1, 2) / math.sqrt(q.shape[-1])                 # [h, n, m]
            o = torch.softmax(softcap * torch.tanh(s / softcap), dim=-1) @ vi
        out.append(o.transpose(0, 1))                                            # [n, h, d]
    return torch.cat(out) if out else q.new_zeros(q.shape)


# -----------------------------------------------------------------------------
# Triton kernels, innermost first

if HAS_TRITON:
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _load(ptr, rows, rmask, stride, col0, C: tl.constexpr, D: tl.constexpr):
        """Rows `rows` of one head, head-dim columns col0..col0+C-1 (columns >= D read as 0): [R, C]."""
        cols = col0 + tl.arange(0, C)
        return tl.load(ptr + rows[:, None] * stride + cols[None, :],
                       mask=rmask[:, None] & (cols[None, :] < D), other=0.0)

    @triton.jit
    def _store(ptr, x, rows, rmask, stride, col0, D: tl.constexpr):
        C: tl.constexpr = x.shape[1]
        cols = col0 + tl.arange(0, C)
        tl.store(ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols[None, :] < D))

    @triton.jit
    def _rope(x, Pos, Freq, rows, rmask, col0, D: tl.constexpr, sign):
        """Rotate the interleaved pairs of x [R, C] fp32 (head-dim columns col0..) by sign * angle.

        pair m = column // 2 belongs to axis m // (D/8) (t, x, y, z) and frequency j = m % (D/8):
        angle = coords[row, axis] * Freq[j], computed in fp32 exactly as model.rope_angles."""
        R: tl.constexpr = x.shape[0]
        C: tl.constexpr = x.shape[1]
        m = col0 // 2 + tl.arange(0, C // 2)                                     # pair index [C/2]
        pmask = m < D // 2
        pos = tl.load(Pos + rows[:, None] * 4 + (m // (D // 8))[None, :],
                      mask=rmask[:, None] & pmask[None, :], other=0)              # [R, C/2]
        ang = pos.to(tl.float32) * tl.load(Freq + m % (D // 8), mask=pmask, other=0.0)[None, :]
        cos, sin = tl.cos(ang), sign * tl.sin(ang)
        a, b = tl.split(tl.reshape(x, [R, C // 2, 2]))                           # even, odd columns
        return tl.reshape(tl.join(a * cos - b * sin, a * sin + b * cos), [R, C])

    @triton.jit
    def _load_qk(ptr, Pos, Freq, rows, rmask, stride, col0, C: tl.constexpr, D: tl.constexpr,
                 ROPE: tl.constexpr):
        """A q or k tile, rotated in fp32 and cast back to the input dtype (as model.Rope.rotate)."""
        x = _load(ptr, rows, rmask, stride, col0, C, D)
        if ROPE:
            x = _rope(x.to(tl.float32), Pos, Freq, rows, rmask, col0, D, 1.0).to(ptr.dtype.element_ty)
        return x

    @triton.jit
    def _logits(s, scale, softcap, SOFTCAP: tl.constexpr):
        """Raw q.k -> (logits in log2 units, tanh(s/c) for the soft-cap derivative; s when no cap)."""
        s = s * scale
        t = s
        if SOFTCAP:             # tanh via exp (portable to the interpreter): sign(x)(1-e^-2|x|)/(1+e^-2|x|)
            e = tl.exp(-2.0 * tl.abs(s / softcap))
            t = tl.where(s >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
            s = softcap * t
        return s * LOG2E, t

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, PosQ, PosK, Freq, CuQ, CuK, BlkSeg, BlkStart,
                  sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_n, so_h, n_heads, scale, softcap,
                  D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ROPE: tl.constexpr,
                  SOFTCAP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        # 1. this program's query rows (one tile of one segment) and head; the segment's key range
        blk, hd = tl.program_id(0), tl.program_id(1)
        seg = tl.load(BlkSeg + blk)
        rows = tl.load(BlkStart + blk) + tl.arange(0, BM)
        rmask = rows < tl.load(CuQ + seg + 1)
        k_lo, k_hi = tl.load(CuK + seg), tl.load(CuK + seg + 1)
        Q, K, V, O = Q + hd * sq_h, K + hd * sk_h, V + hd * sv_h, O + hd * so_h
        # 2. rotated q, in two head-dim parts
        q0 = _load_qk(Q, PosQ, Freq, rows, rmask, sq_n, 0, D0, D, ROPE)
        if D1 > 0:
            q1 = _load_qk(Q, PosQ, Freq, rows, rmask, sq_n, D0, D1, D, ROPE)
            acc1 = tl.zeros([BM, D1], tl.float32)
        acc0 = tl.zeros([BM, D0], tl.float32)
        m_i = tl.full([BM], float('-inf'), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        # 3. online softmax over the segment's key tiles (base 2)
        for n0 in range(k_lo, k_hi, BN):
            cols = n0 + tl.arange(0, BN)
            cmask = cols < k_hi
            k0 = _load_qk(K, PosK, Freq, cols, cmask, sk_n, 0, D0, D, ROPE)
            s = tl.dot(q0, tl.trans(k0), input_precision=PREC)                   # [BM, BN]
            if D1 > 0:
                k1 = _load_qk(K, PosK, Freq, cols, cmask, sk_n, D0, D1, D, ROPE)
                s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
            s, _ = _logits(s, scale, softcap, SOFTCAP)
            s = tl.where(cmask[None, :], s, float('-inf'))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v0 = _load(V, cols, cmask, sv_n, 0, D0, D)
            acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PREC)
            if D1 > 0:
                v1 = _load(V, cols, cmask, sv_n, D0, D1, D)
                acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PREC)
            m_i = m_new
        # 4. normalise (rows without keys give 0), store O and LSE
        l_i = tl.where(l_i > 0, l_i, 1.0)
        _store(O, acc0 / l_i[:, None], rows, rmask, so_n, 0, D)
        if D1 > 0:
            _store(O, acc1 / l_i[:, None], rows, rmask, so_n, D0, D)
        tl.store(LSE + rows * n_heads + hd, m_i + tl.log2(l_i), mask=rmask)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, PosQ, PosK, Freq, CuQ, CuK, BlkSeg, BlkStart,
                       sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sdo_n, sdo_h, sdk_n, sdk_h, n_heads, scale,
                       softcap, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ROPE: tl.constexpr,
                       SOFTCAP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        # 1. this program's key rows and head; the segment's query range
        blk, hd = tl.program_id(0), tl.program_id(1)
        seg = tl.load(BlkSeg + blk)
        cols = tl.load(BlkStart + blk) + tl.arange(0, BN)
        cmask = cols < tl.load(CuK + seg + 1)
        q_lo, q_hi = tl.load(CuQ + seg), tl.load(CuQ + seg + 1)
        Q, K, V, DO = Q + hd * sq_h, K + hd * sk_h, V + hd * sv_h, DO + hd * sdo_h
        DK, DV = DK + hd * sdk_h, DV + hd * sdk_h
        # 2. rotated k and v, stay in registers; fp32 accumulators
        k0 = _load_qk(K, PosK, Freq, cols, cmask, sk_n, 0, D0, D, ROPE)
        v0 = _load(V, cols, cmask, sv_n, 0, D0, D)
        dk0, dv0 = tl.zeros([BN, D0], tl.float32), tl.zeros([BN, D0], tl.float32)
        if D1 > 0:
            k1 = _load_qk(K, PosK, Freq, cols, cmask, sk_n, D0, D1, D, ROPE)
            v1 = _load(V, cols, cmask, sv_n, D0, D1, D)
            dk1, dv1 = tl.zeros([BN, D1], tl.float32), tl.zeros([BN, D1], tl.float32)
        # 3. loop over the segment's query tiles: P^T from the stored LSE, then dV, dP, dS, dK
        for m0 in range(q_lo, q_hi, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < q_hi
            q0 = _load_qk(Q, PosQ, Freq, rows, rmask, sq_n, 0, D0, D, ROPE)
            do0 = _load(DO, rows, rmask, sdo_n, 0, D0, D)
            sT = tl.dot(k0, tl.trans(q0), input_precision=PREC)                  # [BN, BM]
            dpT = tl.dot(v0, tl.trans(do0), input_precision=PREC)                # [BN, BM]
            if D1 > 0:
                q1 = _load_qk(Q, PosQ, Freq, rows, rmask, sq_n, D0, D1, D, ROPE)
                do1 = _load(DO, rows, rmask, sdo_n, D0, D1, D)
                sT += tl.dot(k1, tl.trans(q1), input_precision=PREC)
                dpT += tl.dot(v1, tl.trans(do1), input_precision=PREC)
            sT, tT = _logits(sT, scale, softcap, SOFTCAP)
            lse = tl.load(LSE + rows * n_heads + hd, mask=rmask, other=0.0)
            pT = tl.where(rmask[None, :], tl.exp2(sT - lse[None, :]), 0.0)       # [BN, BM]
            delta = tl.load(Delta + rows * n_heads + hd, mask=rmask, other=0.0)
            dsT = pT * (dpT - delta[None, :])                    # dL/d(logit), natural units
            if SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            dv0 += tl.dot(pT.to(do0.dtype), do0, input_precision=PREC)
            dk0 += tl.dot(dsT.to(q0.dtype), q0, input_precision=PREC)
            if D1 > 0:
                dv1 += tl.dot(pT.to(do1.dtype), do1, input_precision=PREC)
                dk1 += tl.dot(dsT.to(q1.dtype), q1, input_precision=PREC)
        # 4. dk back through the rotation (R^T = rotation by -angle), store
        dk0 = dk0 * scale
        if ROPE:
            dk0 = _rope(dk0, PosK, Freq, cols, cmask, 0, D, -1.0)
        _store(DK, dk0, cols, cmask, sdk_n, 0, D)
        _store(DV, dv0, cols, cmask, sdk_n, 0, D)
        if D1 > 0:
            dk1 = dk1 * scale
            if ROPE:
                dk1 = _rope(dk1, PosK, Freq, cols, cmask, D0, D, -1.0)
            _store(DK, dk1, cols, cmask, sdk_n, D0, D)
            _store(DV, dv1, cols, cmask, sdk_n, D0, D)

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, PosQ, PosK, Freq, CuQ, CuK, BlkSeg, BlkStart,
                     sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sdo_n, sdo_h, sdq_n, sdq_h, n_heads, scale,
                     softcap, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ROPE: tl.constexpr,
                     SOFTCAP: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        # 1. this program's query rows and head; the segment's key range
        blk, hd = tl.program_id(0), tl.program_id(1)
        seg = tl.load(BlkSeg + blk)
        rows = tl.load(BlkStart + blk) + tl.arange(0, BM)
        rmask = rows < tl.load(CuQ + seg + 1)
        k_lo, k_hi = tl.load(CuK + seg), tl.load(CuK + seg + 1)
        Q, K, V, DO, DQ = Q + hd * sq_h, K + hd * sk_h, V + hd * sv_h, DO + hd * sdo_h, DQ + hd * sdq_h
        # 2. rotated q, dO, LSE and delta of these rows
        q0 = _load_qk(Q, PosQ, Freq, rows, rmask, sq_n, 0, D0, D, ROPE)
        do0 = _load(DO, rows, rmask, sdo_n, 0, D0, D)
        dq0 = tl.zeros([BM, D0], tl.float32)
        if D1 > 0:
            q1 = _load_qk(Q, PosQ, Freq, rows, rmask, sq_n, D0, D1, D, ROPE)
            do1 = _load(DO, rows, rmask, sdo_n, D0, D1, D)
            dq1 = tl.zeros([BM, D1], tl.float32)
        lse = tl.load(LSE + rows * n_heads + hd, mask=rmask, other=0.0)
        delta = tl.load(Delta + rows * n_heads + hd, mask=rmask, other=0.0)
        # 3. loop over the segment's key tiles: P, dP, dS, dQ += dS K
        for n0 in range(k_lo, k_hi, BN):
            cols = n0 + tl.arange(0, BN)
            cmask = cols < k_hi
            k0 = _load_qk(K, PosK, Freq, cols, cmask, sk_n, 0, D0, D, ROPE)
            v0 = _load(V, cols, cmask, sv_n, 0, D0, D)
            s = tl.dot(q0, tl.trans(k0), input_precision=PREC)                   # [BM, BN]
            dp = tl.dot(do0, tl.trans(v0), input_precision=PREC)                 # [BM, BN]
            if D1 > 0:
                k1 = _load_qk(K, PosK, Freq, cols, cmask, sk_n, D0, D1, D, ROPE)
                v1 = _load(V, cols, cmask, sv_n, D0, D1, D)
                s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
                dp += tl.dot(do1, tl.trans(v1), input_precision=PREC)
            s, t = _logits(s, scale, softcap, SOFTCAP)
            p = tl.where(cmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq0 += tl.dot(ds.to(k0.dtype), k0, input_precision=PREC)
            if D1 > 0:
                dq1 += tl.dot(ds.to(k1.dtype), k1, input_precision=PREC)
        # 4. dq back through the rotation, store
        dq0 = dq0 * scale
        if ROPE:
            dq0 = _rope(dq0, PosQ, Freq, rows, rmask, 0, D, -1.0)
        _store(DQ, dq0, rows, rmask, sdq_n, 0, D)
        if D1 > 0:
            dq1 = dq1 * scale
            if ROPE:
                dq1 = _rope(dq1, PosQ, Freq, rows, rmask, D0, D, -1.0)
            _store(DQ, dq1, rows, rmask, sdq_n, D0, D)


# -----------------------------------------------------------------------------
# host side: block lists, launch configuration, autograd wrapper


def head_dim_split(d):
    """(D0, D1): the two power-of-two column tiles covering head dim d (D1 = 0 when d is a power of 2)."""
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return d0, 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())


def block_list(cu, block):
    """cu [S+1] (on the CPU) -> (segment, first row) int32 of every `block`-row tile of every segment,
    longest segments first (they finish last, so they should start first)."""
    lens = cu[1:] - cu[:-1]                                                     # [S]
    order = torch.argsort(lens, descending=True, stable=True)
    nblk = (lens[order] + block - 1) // block                                   # tiles per segment
    seg = torch.repeat_interleave(order, nblk)                                  # [n_tiles]
    first = torch.repeat_interleave(torch.cumsum(nblk, 0) - nblk, nblk)         # list index of seg's tile 0
    start = cu[seg] + (torch.arange(len(seg)) - first) * block
    return seg.to(torch.int32), start.to(torch.int32)


def launch_config(device, dtype):
    """Tile sizes (BM query rows, BN key rows) per kernel.

    GPU values measured on one H100 (torch 2.11, Triton 3.6, bf16, d = 72 with RoPE, the bench's 'full'
    workload): fwd (128, 32), dK/dV (32, 128), dQ (128, 32) at 8 warps, 2 stages ran 6.0 ms forward and
    16.9 ms forward+backward, the fastest of 8 candidates. Two candidates were WRONG or crashed there, so any
    change here must rerun the GPU tests (tests/test_kernels.py):
      fwd (128, 64), 8 warps: forward off by ~1 at d = 72 (fine at d = 64): the 16-wide second head-dim
                              part with 128-row tiles miscompiles;
      (64, 64) at 4 warps:    illegal memory access (at 8 warps it is correct, 1.6x slower than the above).
    """
    if device.type != 'cuda':   # the interpreter: small tiles, BM != BN so both loops cross tiles
        return dict(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16), num_warps=1, num_stages=1)
    if dtype == torch.float32:  # tests: ieee fp32 dots need twice the shared memory
        return dict(fwd=(64, 32), dkdv=(32, 32), dq=(32, 32), num_warps=4, num_stages=1)
    return dict(fwd=(128, 32), dkdv=(32, 128), dq=(128, 32), num_warps=8, num_stages=2)


def _check(q, k, v, cu_q, cu_k, pos_q, pos_k, cu_host=None):
    """Raise ValueError unless the inputs are what the kernels assume; returns cu_q, cu_k on the CPU."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"expected q [N, h, d] and k, v [M, h, d], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q, k, v must share one dtype of {KERNEL_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if q.device.type != 'cuda' and not INTERPRET:
        raise ValueError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before importing "
                         "kernels.attention")
    if min(x.stride(-1) for x in (q, k, v)) != 1 or max(x.stride(-1) for x in (q, k, v)) != 1:
        raise ValueError("q, k, v need unit stride in the head dim")
    d = q.shape[-1]
    if d < 16:
        raise ValueError(f"head_dim must be >= 16, got {d}")
    for cu in (cu_q, cu_k):
        if cu.dtype != torch.int32 or cu.dim() != 1 or len(cu) != len(cu_q) or cu.device != q.device:
            raise ValueError("cu_q, cu_k must be int32 [S+1] on q's device, both of the same length S+1")
    hq, hk = (_host(cu_q), _host(cu_k)) if cu_host is None else (_host(cu_host[0]), _host(cu_host[1]))
    for name, (cu, _), n in (('cu_q', hq, len(q)), ('cu_k', hk, len(k))):
        if cu[0] != 0 or cu[-1] != n or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must rise from 0 to {n}, got {cu.tolist()}")
    if (pos_q is None) != (pos_k is None):
        raise ValueError("give both coords_q and coords_k, or neither")
    if pos_q is not None:
        if d % 8:
            raise ValueError(f"4D RoPE needs head_dim divisible by 8, got {d}")
        if pos_q.shape != (len(q), 4) or pos_k.shape != (len(k), 4) or pos_q.is_floating_point() \
                or pos_k.is_floating_point():
            raise ValueError(f"coords must be integer [N, 4] / [M, 4], got {tuple(pos_q.shape)}, "
                             f"{tuple(pos_k.shape)}")
    return hq, hk


# Every layer of a trunk attends over the same segments: the model passes one cu tensor to all of them. Its host
# copy and block lists are made once, not per layer and per kernel: a device->host copy waits for the GPU to
# drain, so doing it 3 x depth times per step serialised host and GPU (seen in a Base step's profile on H100).
_LAST_CU = []      # the few cu tensors seen last: [(weakref, _version, host copy, {(block, device): block list})]


def _host(cu):
    """cu -> (its CPU copy, a dict caching its block lists); reused while the same, unmodified tensor comes back
    (a trunk's layers share one cu, the pooling head and a KV cache bring a second pair)."""
    for last in _LAST_CU:
        if last[0]() is cu and last[1] == cu._version:
            return last[2], last[3]
    last = (weakref.ref(cu), cu._version, cu.cpu(), {})
    _LAST_CU[:] = [last] + _LAST_CU[:3]
    return last[2], last[3]


def _blocks(host, block, device):
    """block_list(cu, block) on `device`, cached with cu's host copy."""
    cu, cache = host
    if (block, device) not in cache:
        cache[(block, device)] = [x.to(device, non_blocking=True) for x in block_list(cu, block)]
    return cache[(block, device)]


# The kernels as two custom ops (torch.library), so that torch.compile keeps a transformer block with this attention
# in one graph (train.compile_blocks: fullgraph=True) and the autograd formula is registered once. cu_q_host /
# cu_k_host are the packed batch's host copies of cu_q / cu_k: the block lists come from them, nothing is read back.


@torch.library.custom_op('atoken::varlen_attention', mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   cu_q_host: torch.Tensor, cu_k_host: torch.Tensor, pos_q: Optional[torch.Tensor],
                   pos_k: Optional[torch.Tensor], rope_theta: float, softcap: Optional[float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> O [N, h, d] and the row log-sum-exp (base 2) [N, h] fp32, for the backward."""
    hq, hk = _check(q, k, v, cu_q, cu_k, pos_q, pos_k, (cu_q_host, cu_k_host))
    N, h, d = q.shape
    dev, cfg = q.device, launch_config(q.device, q.dtype)
    pos_q, pos_k, freq, meta = _rope_args(q, pos_q, pos_k, rope_theta, softcap, cfg)
    o = torch.empty(N, h, d, device=dev, dtype=q.dtype)                         # [N, h, d]
    lse = torch.empty(N, h, device=dev, dtype=torch.float32)                    # base-2 log-sum-exp
    scale, cap = 1.0 / math.sqrt(d), float(softcap or 1.0)
    if N and len(k):
        BM, BN = cfg['fwd']
        seg, start = _blocks(hq, BM, dev)                                       # query tiles
        _attn_fwd[(len(seg), h)](
            q, k, v, o, lse, pos_q, pos_k, freq, cu_q, cu_k, seg, start,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), h, scale, cap, BM=BM, BN=BN, **meta)
    else:
        o.zero_()
        lse.zero_()
    return o, lse


@_attention_fwd.register_fake
def _(q, k, v, cu_q, cu_k, cu_q_host, cu_k_host, pos_q, pos_k, rope_theta, softcap):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op('atoken::varlen_attention_backward', mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, cu_q_host: torch.Tensor,
                   cu_k_host: torch.Tensor, pos_q: Optional[torch.Tensor], pos_k: Optional[torch.Tensor],
                   rope_theta: float, softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv: dK/dV per key tile, dQ per query tile, P recomputed from the stored LSE."""
    N, h, d = q.shape
    if not (N and len(k)):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cfg = launch_config(q.device, q.dtype)
    hq, hk = _host(cu_q_host), _host(cu_k_host)
    pos_q, pos_k, freq, meta = _rope_args(q, pos_q, pos_k, rope_theta, softcap, cfg)
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)                                    # [N, h] FA2: rowsum(dO * O)
    # every row lies in some segment (checked), so the kernels write every row of dq, dk, dv
    dq = torch.empty(N, h, d, device=q.device, dtype=q.dtype)
    dk, dv = (torch.empty(len(k), h, d, device=k.device, dtype=k.dtype) for _ in range(2))
    common = (pos_q, pos_k, freq, cu_q, cu_k)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    scale, cap = 1.0 / math.sqrt(d), float(softcap or 1.0)
    BM, BN = cfg['dkdv']
    kseg, kstart = _blocks(hk, BN, q.device)                                    # key tiles
    _attn_bwd_dkdv[(len(kseg), h)](q, k, v, do, lse, delta, dk, dv, *common, kseg, kstart, *strides,
                                   dk.stride(0), dk.stride(1), h, scale, cap, BM=BM, BN=BN, **meta)
    BM, BN = cfg['dq']
    qseg, qstart = _blocks(hq, BM, q.device)                                    # query tiles
    _attn_bwd_dq[(len(qseg), h)](q, k, v, do, lse, delta, dq, *common, qseg, qstart, *strides,
                                 dq.stride(0), dq.stride(1), h, scale, cap, BM=BM, BN=BN, **meta)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, cu_q, cu_k, cu_q_host, cu_k_host, pos_q, pos_k, rope_theta, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _rope_args(q, pos_q, pos_k, rope_theta, softcap, cfg):
    """Kernel arguments of RoPE (int32 coords, frequencies) and the compile-time constants."""
    d, dev = q.shape[-1], q.device
    rope = pos_q is not None
    if rope:
        pos_q, pos_k = (p.to(device=dev, dtype=torch.int32).contiguous() for p in (pos_q, pos_k))
        freq = rope_freqs(d, rope_theta, dev)
    else:
        pos_q = pos_k = freq = q.new_zeros(1, dtype=torch.float32)             # unused by the kernels
    d0, d1 = head_dim_split(d)
    meta = dict(D=d, D0=d0, D1=d1, ROPE=rope, SOFTCAP=softcap is not None,
                PREC='ieee' if q.dtype == torch.float32 else 'tf32',
                num_warps=cfg['num_warps'], num_stages=cfg['num_stages'])
    return pos_q, pos_k, freq, meta


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, cu_q_host, cu_k_host, pos_q, pos_k, rope_theta, softcap = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, cu_q_host, cu_k_host,
                          *((pos_q, pos_k) if pos_q is not None else ()))
    ctx.rope_theta, ctx.softcap, ctx.rope = rope_theta, softcap, pos_q is not None


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_q, cu_k, cu_q_host, cu_k_host, *pos = ctx.saved_tensors
    pos_q, pos_k = pos if ctx.rope else (None, None)
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, cu_q, cu_k, cu_q_host, cu_k_host, pos_q, pos_k,
                                ctx.rope_theta, ctx.softcap)
    return dq, dk, dv, *[None] * 8


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# the low-level kernel call, and the one entry point the model calls


def varlen_attention(q, k, v, cu_q, cu_k, coords_q=None, coords_k=None, rope_theta=10000.0, softcap=None,
                     cu_host=None):
    """The Triton kernel: block-diagonal attention over packed segments, with 4D RoPE on q and k when coords are
    given (CUDA tensors, or any under TRITON_INTERPRET=1).

    q [N, h, d]; k, v [M, h, d]; cu_q, cu_k int32 [S+1]: segment i is q[cu_q[i]:cu_q[i+1]] against
    k[cu_k[i]:cu_k[i+1]] (a KV-cache prefix is just more keys). coords_q [N, 4], coords_k [M, 4] integer
    (t, x, y, z), or None for no RoPE. softcap c: scores c * tanh(s / c). Returns [N, h, d].
    cu_host: (cu_q, cu_k) already on the CPU (the packed batch's structure carries them): then the kernel's
    block lists are made from them and nothing is read back from the device.
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernel needs triton, which is not installed")
    if cu_host is None:                         # one host copy per cu tensor (cached), as in a plain call
        cu_host = (_host(cu_q)[0], _host(cu_k)[0])
    return _attention_fwd(q, k, v, cu_q, cu_k, *cu_host, coords_q, coords_k, float(rope_theta),
                          None if softcap is None else float(softcap))[0]


def use_triton(q):
    """Whether attention on tensors like q runs the Triton kernel: CUDA, a dtype and head dim it supports, and not
    switched off (ATOKEN_ATTENTION=reference)."""
    return HAS_TRITON and BACKEND != 'reference' and q.is_cuda and q.dtype in KERNEL_DTYPES and q.shape[-1] >= 16


def layout_plan(cu_q_host, cu_k_host, max_q, max_k, device):
    """What attention() needs on `device` beyond the cu_seqlens, made on the host once per batch when a layout moves
    there (structure.to_device): nothing for the Triton kernel on CUDA (it lists its blocks from the host copies
    of cu itself), the grouping of the pure-torch path (kernels/grouped.py) on any other device."""
    if torch.device(device).type == 'cuda' and HAS_TRITON and BACKEND != 'reference':
        return None
    return grouped.plan(cu_q_host, cu_k_host, max_q, max_k).to(device).mark_dynamic()


def attention(q, k, v, layout, rope_q=None, rope_k=None, softcap=None):
    """Block-diagonal attention over a packed batch's segments: the one attention call of the model.

    q [N, h, d], k/v [M, h, d]; layout (structure.Layout): segment i is the queries cu_q[i]:cu_q[i+1] against the
    keys cu_k[i]:cu_k[i+1]; rope_q / rope_k: the 4D RoPE of q / k (model.Rope: .coords, .theta, .rotate), or None.
    Non-causal, scale 1/sqrt(d); softcap c: scores c * tanh(s / c) (the Gaussian decoder's). CUDA: the Triton
    kernel, RoPE fused into it. Elsewhere: RoPE, then the grouped pure-torch path over the layout's plan."""
    if use_triton(q):
        return varlen_attention(q, k, v, layout.cu_q, layout.cu_k, None if rope_q is None else rope_q.coords,
                                None if rope_k is None else rope_k.coords,
                                10000.0 if rope_q is None else rope_q.theta, softcap,
                                cu_host=(layout.cu_q_host, layout.cu_k_host))
    if rope_q is not None:
        q, k = rope_q.rotate(q), rope_k.rotate(k)
    plan = layout.plan      # None only for a layout prepared for the Triton kernel that it cannot take (e.g. fp64)
    if plan is None:
        plan = grouped.plan(layout.cu_q_host, layout.cu_k_host, layout.max_q, layout.max_k).to(q.device)
    return grouped.attention(q, k, v, plan, softcap)
