"""
Block-diagonal attention in plain PyTorch for devices without the Triton kernel (the CPU path).

A packed batch's segments have different lengths. Instead of one SDPA call per segment (attention_ref in
kernels/attention.py: a host loop, ops that grow with the number of segments) or one dense [N, N] mask (N^2
scores), the segments are packed into G groups of Lq query and Lk key slots (Lq, Lk = the longest segment):
  plan       host, numpy, once per batch (kernels.attention.prepare calls it when a layout moves to the device):
             first-fit of the segments into groups, longest first; the gather / scatter indices between tokens and
             slots; the mask (a slot sees the keys of its own segment). Slots a group leaves empty gather row 0
             and are masked out as keys; as queries they see every key of their group (finite, never read back,
             so they get zero gradient). A layout whose groups are whole segments (`full`) needs no mask: none is
             made, so one long segment costs no [L, L] mask.
  attention  gather q, k, v into head-major groups [h, G, L, d], one batched SDPA (or an explicit softmax for the
             Gaussian decoder's score soft-cap), scatter back: the same ops whatever the number of segments.
  GroupedAttention  short masked groups (Lq * Lk <= SMALL_SCORES): gather, scores + mask, softmax, times v, as one
             autograd Function whose backward needs no scatter-add (every token sits in exactly one slot, so the
             gradient of a gather is a gather by the inverse index). Faster than SDPA there (NOTES.md).
Constraints: q [N, h, d], k/v [M, h, d], RoPE already applied (kernels.attention.attention does it), any dtype.

    python -m pytest -q tests/test_kernels.py -k grouped      # against the per-segment reference
    python kernels/bench_attention.py                         # its row next to per-segment / padded SDPA
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# masked groups up to this many scores run GroupedAttention, larger ones and unmasked ones SDPA (measured: NOTES.md)
SMALL_SCORES = 128 * 128


@dataclass
class Plan:
    """The grouping of one layout (plan)."""
    q_gather: torch.Tensor      # [G*Lq] token of each query slot
    k_gather: torch.Tensor      # [G*Lk]
    q_scatter: torch.Tensor     # [Nq] slot of each query token
    k_scatter: torch.Tensor     # [Nk] slot of each key token
    q_real: torch.Tensor        # [G, Lq, 1] 1.0 where a query slot holds a token, 0.0 where it is empty
    mask: torch.Tensor          # [G, 1, Lq, Lk] bool, True = attend; None when full
    bias: torch.Tensor          # the same as an additive float mask (0 / -inf), for the explicit softmax; or None
    full: bool                  # every group is one whole segment: no mask needed (SDPA is faster without)
    identity: bool              # ... and in token order: no gather / scatter either (e.g. one sample)
    small: bool                 # short masked groups (Lq * Lk <= SMALL_SCORES): GroupedAttention beats SDPA

    def to(self, device):
        move = lambda x: x if x is None else x.to(device)
        return Plan(*(move(getattr(self, f)) for f in ('q_gather', 'k_gather', 'q_scatter', 'k_scatter', 'q_real',
                                                       'mask', 'bias')), self.full, self.identity, self.small)

    def mark_dynamic(self):
        """Tell torch.compile that these sizes change from batch to batch: a compiled block then serves every
        micro-batch with one graph (without this the sizes are specialised and each new size recompiles)."""
        for x in (self.q_gather, self.k_gather, self.q_scatter, self.k_scatter):
            torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(self.q_real, 0)
        torch._dynamo.maybe_mark_dynamic(self.q_real, 1)
        for x in (self.mask, self.bias):
            if x is not None:
                for dim in (0, 2, 3):
                    torch._dynamo.maybe_mark_dynamic(x, dim)
        return self


def first_fit(lq, lk, Lq, Lk):
    """Segments (lengths lq, lk) into groups of at most Lq query and Lk key slots, longest first: few, well-filled
    groups. -> (group of each segment, its first query slot, its first key slot, number of groups)."""
    S = len(lq)
    group, oq, ok = np.zeros(S, np.int64), np.zeros(S, np.int64), np.zeros(S, np.int64)
    used_q, used_k = [], []
    for i in np.argsort(-lk, kind='stable'):
        g = next((g for g in range(len(used_q)) if used_q[g] + lq[i] <= Lq and used_k[g] + lk[i] <= Lk),
                 len(used_q))
        if g == len(used_q):
            used_q.append(0), used_k.append(0)
        group[i], oq[i], ok[i] = g, used_q[g], used_k[g]
        used_q[g] += lq[i]
        used_k[g] += lk[i]
    return group, oq, ok, len(used_q)


def plan(cu_q_host, cu_k_host, max_q, max_k):
    """The grouping of a layout (cu_seqlens of queries and keys, host int32 [S+1]) -> Plan, on the host."""
    cq, ck = cu_q_host.numpy().astype(np.int64), cu_k_host.numpy().astype(np.int64)
    lq, lk = np.diff(cq), np.diff(ck)
    Lq, Lk, S = max(max_q, 1), max(max_k, 1), len(lq)
    group, oq, ok, G = first_fit(lq, lk, Lq, Lk)

    def slots(lens, cu, off, L):
        seg = np.repeat(np.arange(S), lens)                                # [n] segment of each token
        slot = group[seg] * L + off[seg] + np.arange(len(seg)) - cu[seg]
        gather, seg_of_slot = np.zeros(G * L, np.int64), np.full(G * L, -1, np.int64)
        gather[slot], seg_of_slot[slot] = np.arange(len(seg)), seg
        return slot, gather, seg_of_slot.reshape(G, L)
    q_slot, q_gather, sq = slots(lq, cq, oq, Lq)
    k_slot, k_gather, sk = slots(lk, ck, ok, Lk)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    full = bool(G == S and (lq == Lq).all() and (lk == Lk).all())
    identity = full and bool((q_gather == np.arange(len(q_gather))).all() and (k_gather == np.arange(len(k_gather))).all())
    mask = bias = None
    if not full:
        m = (sq[:, :, None] == sk[:, None, :]) | (sq[:, :, None] < 0)          # empty query slots: see all
        mask = t(m[:, None])
        bias = torch.zeros(mask.shape).masked_fill_(~mask, float('-inf'))
    return Plan(t(q_gather), t(k_gather), t(q_slot), t(k_slot), t((sq >= 0)[:, :, None].astype(np.float32)),
                mask, bias, full, identity, Lq * Lk <= SMALL_SCORES)


class GroupedAttention(torch.autograd.Function):
    """Short masked groups: gather q, k, v into the groups (head-major [h*G, L, d]), scores + mask, softmax, times v,
    back to token order; and its backward written out. Against autograd through the same ops, the backward needs
    no scatter-add: every token sits in exactly one slot, so the gradient of a gather is a gather by the inverse
    index (q_scatter, k_scatter), once the empty query slots' output gradients are zeroed (q_real); empty key slots
    get probability 0 and so no gradient."""
    @staticmethod
    def forward(ctx, q, k, v, q_gather, k_gather, q_scatter, k_scatter, q_real, bias, G, Lq, Lk):
        h, d = q.shape[1:]
        gather = lambda x, i, L: x.transpose(0, 1).index_select(1, i).view(h * G, L, d)
        qg, kg, vg = gather(q, q_gather, Lq), gather(k, k_gather, Lk), gather(v, k_gather, Lk)
        s = torch.bmm(qg, kg.transpose(1, 2))                                   # [h*G, Lq, Lk]
        s.view(h, G, Lq, Lk).mul_(d ** -0.5).add_(bias)     # bias [G, Lq, Lk]: 0, or -inf (another segment)
        p = torch.softmax(s, dim=-1)
        ctx.save_for_backward(qg, kg, vg, p, q_gather, q_scatter, k_scatter, q_real)
        ctx.dims = h, d, G, Lq
        return torch.bmm(p, vg).view(h, G * Lq, d).index_select(1, q_scatter).transpose(0, 1)   # [N, h, d]

    @staticmethod
    def backward(ctx, grad):
        qg, kg, vg, p, q_gather, q_scatter, k_scatter, q_real = ctx.saved_tensors
        h, d, G, Lq = ctx.dims
        go = grad.transpose(0, 1).index_select(1, q_gather).view(h, G, Lq, d) * q_real.to(grad.dtype)
        go = go.view(h * G, Lq, d)                                              # empty slots: 0
        dv = torch.bmm(p.transpose(1, 2), go)
        ds = torch._softmax_backward_data(torch.bmm(go, vg.transpose(1, 2)), p, -1, p.dtype)
        dq = torch.bmm(ds, kg).mul_(d ** -0.5)
        dk = torch.bmm(ds.transpose(1, 2), qg).mul_(d ** -0.5)
        back = lambda x, i: x.view(h, -1, d).index_select(1, i).transpose(0, 1)     # slots -> tokens
        return (back(dq, q_scatter), back(dk, k_scatter), back(dv, k_scatter)) + (None,) * 9


def attention(q, k, v, p, softcap=None):
    """Block-diagonal attention of q [N, h, d] against k, v [M, h, d] as grouped by Plan p (RoPE already applied).
    Non-causal, scale 1/sqrt(d); softcap c: scores c * tanh(s / c). -> [N, h, d]"""
    h, d = q.shape[1:]
    if p.mask is not None:
        G, _, Lq, Lk = p.mask.shape
    else:                                       # full groups: no mask; Lk inferred
        (G, Lq, _), Lk = p.q_real.shape, -1
    if softcap is None and p.small and not p.full:          # short, masked groups: explicit softmax
        return GroupedAttention.apply(q, k, v, p.q_gather, p.k_gather, p.q_scatter, p.k_scatter, p.q_real,
                                      p.bias[:, 0], G, Lq, Lk)
    # head-major [h, G, L, d]: gathering along the token axis of [h, N, d] views gives contiguous groups, so
    # the batched matmuls need no copies
    gather = (lambda x, i: x.transpose(0, 1).reshape(h, -1, d)) if p.identity else \
        (lambda x, i: x.transpose(0, 1).index_select(1, i))
    qg = gather(q, p.q_gather).view(h, G, Lq, d)
    kg = gather(k, p.k_gather).view(h, G, Lk, d)
    vg = gather(v, p.k_gather).view(h, G, Lk, d)
    if softcap is None:
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=None if p.full else p.mask.transpose(0, 1))
    else:                                       # the soft-cap: explicit softmax
        s = torch.matmul(qg, kg.transpose(-1, -2)).mul_(1 / math.sqrt(d))          # [h, G, Lq, Lk]
        s = softcap * torch.tanh(s / softcap)
        o = torch.matmul(torch.softmax(s if p.full else s + p.bias.transpose(0, 1), dim=-1), vg)
    o = o.reshape(h, G * Lq, d)
    return (o if p.identity else o.index_select(1, p.q_scatter)).transpose(0, 1)   # [N, h, d]
