"""Unit tests for model.py: media <-> packed tokens, 4D RoPE, packing/tiling independence, FSQ, the
decoder KV cache, checkpoint loading, parameter counts, SigLIP2 initialisation and a tiny overfit.

Every expected value is computed independently here (plain Python / explicit indexing / a second run on
a sub-problem), never by calling the function under test twice. CPU only, tiny configs, ~seconds.
"""
import dataclasses
import itertools
import math

import pytest
import torch

import model
import structure

TINY = model.PRESETS['tiny']        # patch (4, 8, 8), width 64, 2 heads, depth 2, latent 12


def tiny(**kw):
    return dataclasses.replace(TINY, **kw)


def make(cfg, seed=0):
    """A random model with every path active (no zeroed residual branches, unlike a training init)."""
    torch.manual_seed(seed)
    return model.AToken(cfg).init_weights(zero_residual=False).eval()


def at(m, x, coords, seqlens):
    """Features or latents x at integer coords (video tokens, any order) as a packed batch with its structure."""
    kinds = ['video'] * len(seqlens)
    return model.Packed(x, coords, seqlens, kinds, [None] * len(seqlens), m.config.patch_size,
                        structure.build_structure(coords, seqlens, kinds, m.config)).to(x.device)


def decode_at(m, z, coords, seqlens):
    return m.decode(z, at(m, z, coords, seqlens))


def media(*shape, seed=0):
    """Uniform random pixels in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def raster(t, h, w):
    return torch.tensor([(a, b, c, 0) for a, b, c in itertools.product(range(t), range(h), range(w))],
                        dtype=torch.long).reshape(-1, 4)


def expected_prepare(x, patch):
    """Independent statement of the official preprocessing: pad to pt frames, truncate to a multiple of
    pt, centre-crop with top/left offset (H - H') // 2."""
    pt, ph, pw = patch
    v = x[None] if x.dim() == 3 else x
    T, H, W, _ = v.shape
    T2 = max(T, pt) // pt * pt
    H2, W2 = H // ph * ph, W // pw * pw
    top, left = (H - H2) // 2, (W - W2) // 2
    out = torch.zeros(T2, H2, W2, 3)
    n = min(T, T2)
    out[:n] = v[:n, top:top + H2, left:left + W2]
    return out, n


# -----------------------------------------------------------------------------
# 1. prepare / patchify / unpatchify


@pytest.mark.parametrize('patch', [(4, 8, 8), (2, 4, 6)])
@pytest.mark.parametrize('shape', [(40, 70, 3), (45, 70, 3), (64, 64, 3),
                                   (1, 33, 17, 3), (3, 33, 17, 3), (4, 33, 17, 3), (5, 33, 17, 3),
                                   (21, 33, 17, 3), (21, 64, 64, 3)])
def test_prepare_patchify_roundtrip(shape, patch):
    pt, ph, pw = patch
    x = media(*shape, seed=len(shape) * 100 + shape[0])
    v, kind = model.prepare(x, patch)
    assert kind == ('image' if len(shape) == 3 else 'video')
    exp, n_real = expected_prepare(x, patch)
    assert v.shape == exp.shape
    assert v.shape[0] % pt == 0 and v.shape[1] % ph == 0 and v.shape[2] % pw == 0
    assert torch.equal(v, exp)                                      # explicit crop offsets
    assert bool((v[n_real:] == 0).all())                            # padding frames exactly zero
    if len(shape) == 3 or shape[0] < pt:
        assert v.shape[0] == pt and n_real == (1 if len(shape) == 3 else shape[0])
    else:
        assert v.shape[0] == shape[0] // pt * pt

    feats, coords = model.patchify(v, patch)
    t, h, w = v.shape[0] // pt, v.shape[1] // ph, v.shape[2] // pw
    assert feats.shape == (t * h * w, pt * ph * pw * 3)
    assert torch.equal(coords, raster(t, h, w))                     # (t, row, col, 0), raster order
    # every channel by gather: channel ((a*ph + b)*pw + c)*3 + ch of token (ti, i, j)
    a, b, c, ch = (g.reshape(-1) for g in torch.meshgrid(torch.arange(pt), torch.arange(ph),
                                                          torch.arange(pw), torch.arange(3), indexing='ij'))
    ti, i, j = coords[:, 0:1], coords[:, 1:2], coords[:, 2:3]
    exp_feats = v[ti * pt + a, i * ph + b, j * pw + c, ch.expand(len(coords), -1)]
    assert torch.equal(feats, exp_feats)
    # and one entry by hand
    r = len(coords) - 2
    tt, ii, jj, _ = coords[r].tolist()
    aa, bb, cc, cch = pt - 1, ph // 2, pw - 1, 1
    assert feats[r, ((aa * ph + bb) * pw + cc) * 3 + cch] == v[tt * pt + aa, ii * ph + bb, jj * pw + cc, cch]

    assert torch.equal(model.unpatchify(feats, (t, h, w), patch), v)


def test_prepare_rejects_bad_input():
    with pytest.raises(ValueError):
        model.prepare(torch.zeros(16, 16), (4, 8, 8))
    with pytest.raises(ValueError):
        model.prepare(torch.zeros(7, 16, 3), (4, 8, 8))     # narrower than one patch


# -----------------------------------------------------------------------------
# 2. pack / unpack


def test_pack_unpack_mixed():
    patch = (4, 8, 8)
    items = [media(40, 70, 3, seed=1), media(5, 33, 17, 3, seed=2), media(64, 64, 3, seed=3),
             media(2, 16, 24, 3, seed=4)]
    p = model.pack(items, patch)
    grids = [(1, 5, 8), (1, 4, 2), (1, 8, 8), (1, 2, 3)]
    assert p.kinds == ['image', 'video', 'image', 'video']
    assert p.grids == grids
    assert p.seqlens == [a * b * c for a, b, c in grids]
    assert sum(p.seqlens) == len(p.feats) == len(p.coords)
    assert p.feats.shape[1] == 4 * 8 * 8 * 3
    assert torch.equal(p.coords, torch.cat([raster(*g) for g in grids]))
    out = model.unpack(p.feats, p, patch)
    for x, o in zip(items, out):
        exp, _ = expected_prepare(x, patch)
        exp = exp[0] if x.dim() == 3 else exp                       # images keep frame 0
        assert o.shape == exp.shape and torch.equal(o, exp)


# -----------------------------------------------------------------------------
# 3. 4D RoPE layout by hand


def test_rope_hand_computed():
    f0, f1 = 1.0, 10000.0 ** (-1 / 16)
    coords = torch.tensor([[1, 2, 3, 4]])
    ang = model.rope_angles(coords, 16, 10000.0)
    exp = torch.tensor([[1 * f0, 1 * f1, 2 * f0, 2 * f1, 3 * f0, 3 * f1, 4 * f0, 4 * f1]])
    torch.testing.assert_close(ang, exp, atol=1e-6, rtol=0)

    x = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 16) * torch.tensor([1.0, -0.5] * 8)
    y = model.Rope.make(coords, 16, 10000.0).rotate(x)
    e = []
    for m in range(8):
        a, b, th = x[0, 0, 2 * m].item(), x[0, 0, 2 * m + 1].item(), exp[0, m].item()
        e += [a * math.cos(th) - b * math.sin(th), a * math.sin(th) + b * math.cos(th)]
    torch.testing.assert_close(y, torch.tensor(e).view(1, 1, 16), atol=1e-5, rtol=0)
    # several heads share the angles; the norm of each pair is kept
    x2 = torch.randn(3, 4, 16)
    y2 = model.Rope.make(torch.randint(0, 9, (3, 4)), 16, 10000.0).rotate(x2)
    torch.testing.assert_close(y2.view(3, 4, 8, 2).norm(dim=-1), x2.view(3, 4, 8, 2).norm(dim=-1))


def test_rope_head_dim_72():
    coords = torch.randint(0, 30, (5, 4))
    ang = model.rope_angles(coords, 72, 10000.0)
    assert ang.shape == (5, 36)
    for axis in range(4):
        for j in range(9):
            exp = coords[:, axis].float() * 10000.0 ** (-j / 72)       # divided by the FULL head dim
            torch.testing.assert_close(ang[:, axis * 9 + j], exp, atol=1e-5, rtol=1e-6)
    with pytest.raises(AssertionError):
        model.rope_angles(coords, 36, 10000.0)


# -----------------------------------------------------------------------------
# 4. RoPE is relative: a global shift of coords leaves attention unchanged


@pytest.mark.parametrize('qk_norm,bias', [(True, False), (False, True)])
def test_rope_shift_invariance(qk_norm, bias):
    torch.manual_seed(0)
    attn = model.SelfAttention(64, 2, bias=bias, qk_norm=qk_norm).eval()
    if qk_norm:
        with torch.no_grad():
            attn.q_rms_norm.gamma.uniform_(0.5, 1.5)
            attn.k_rms_norm.gamma.uniform_(0.5, 1.5)
    x = torch.randn(11, 64)
    coords = torch.randint(0, 6, (11, 4))
    layout = structure.Layout.build([7, 4], [7, 4]).to('cpu')
    rope = lambda c: model.Rope.make(c, 32, 10000.0)
    with torch.no_grad():
        y0 = attn(x, rope(coords), layout)
        y1 = attn(x, rope(coords + 3), layout)
        moved = coords.clone()
        moved[2, 1] += 5
        y2 = attn(x, rope(moved), layout)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=0)
    assert (y2[:7] - y0[:7]).abs().max() > 1e-3                     # moving one token matters ...
    torch.testing.assert_close(y2[7:], y0[7:], atol=1e-6, rtol=0)   # ... only inside its own segment


# -----------------------------------------------------------------------------
# 5. samples of a packed batch are independent


def test_packed_batch_independence():
    m = make(tiny())
    items = [media(40, 70, 3, seed=1), media(21, 48, 32, 3, seed=2), media(96, 64, 3, seed=3)]
    with torch.no_grad():
        p = m.pack(items)
        h = m.encode(p)
        emb = m.embed_features(h, p)
        z, mean, logvar, _ = m.bottleneck(h)
        rec = m.decode(z, p)
        for i, (x, hs, zs, rs) in enumerate(zip(items, h.split(p.seqlens), z.split(p.seqlens),
                                                rec.split(p.seqlens))):
            q = m.pack([x])
            h1 = m.encode(q)
            torch.testing.assert_close(hs, h1, atol=1e-5, rtol=0)
            torch.testing.assert_close(emb[i:i + 1], m.embed_features(h1, q), atol=1e-5, rtol=0)
            z1 = m.bottleneck(h1)[0]
            torch.testing.assert_close(zs, z1, atol=1e-5, rtol=0)
            r1 = m.decode(z1, q)                          # an image alone: its pt = 0 slot only
            torch.testing.assert_close(rs[:, :r1.shape[1]], r1, atol=1e-5, rtol=0)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(emb[0], emb[2], atol=1e-3)
    outs = m.reconstruct(items)
    assert [tuple(o.shape) for o in outs] == [(40, 64, 3), (20, 48, 32, 3), (96, 64, 3)]
    torch.testing.assert_close(outs[1], model.unpack(rec, p, TINY.patch_size)[1], atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# 6. temporal tiles are encoded / decoded independently


def test_training_init_starts_per_token():
    """init_weights() zeroes the residual branches' output projections, so a fresh tokenizer is a per-token
    map: changing one patch changes no other token's reconstruction (exactly)."""
    torch.manual_seed(0)
    m = model.AToken(TINY).init_weights().eval()
    blocks = [b for b in m.modules() if isinstance(b, model.Block)]
    assert blocks and all(b.attn.to_out.weight.abs().max() == 0 and b.mlp.mlp[2].weight.abs().max() == 0
                          for b in blocks)
    a = media(32, 40, 3, seed=1)
    b = a.clone()
    b[:8, :8] = media(8, 8, 3, seed=2)                  # only the first 8x8 patch differs
    ra, rb = m.reconstruct([a, b])
    diff = (ra - rb).abs().amax(-1) > 0                 # (32, 40) pixels that changed
    assert diff[:8, :8].any() and not diff[8:].any() and not diff[:, 8:].any()


def test_temporal_tiles_independent():
    m = make(tiny())
    v = media(32, 16, 24, 3, seed=5)                  # 8 latent frames = 2 tiles of 4
    with torch.no_grad():
        p = m.pack([v])
        h = m.encode(p)
        half = len(h) // 2
        assert int(p.coords[half, 0]) == 4 and int(p.coords[half - 1, 0]) == 3
        for sl, frames in ((slice(half, None), v[16:]), (slice(None, half), v[:16])):
            q = m.pack([frames])
            torch.testing.assert_close(h[sl], m.encode(q), atol=1e-5, rtol=0)
        # a tile of three frames only differs from the same frames inside a longer tile
        q = m.pack([v[16:28]])
        assert (h[half:half + len(q.feats)] - m.encode(q)).abs().max() > 1e-3

        z = torch.randn(len(h), TINY.latent_channels)
        out = decode_at(m, z, p.coords, p.seqlens)
        q = m.pack([v[16:]])
        torch.testing.assert_close(out[half:], decode_at(m, z[half:], q.coords, q.seqlens), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:half], decode_at(m, z[:half], q.coords, q.seqlens), atol=1e-5, rtol=0)


def test_segments():
    """Samples: A with t = 0..5, B starting at t = 2 (t = 2..9), C an image; one token per frame, tiles of
    4 latent frames counted from each sample's first t, t re-based inside every tile."""
    t = [0, 1, 2, 3, 4, 5] + list(range(2, 10)) + [0]
    coords = torch.tensor([[ti, 1, 2, 0] for ti in t])
    order, local, lens = structure.segments(coords.numpy(), [6, 8, 1], 4)
    assert order is None
    assert lens == [4, 2, 4, 4, 1]
    assert local[:, 0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert (local[:, 1:] == coords[:, 1:].numpy()).all()
    st = structure.build_structure(coords, [6, 8, 1], ['video', 'video', 'image'], TINY)
    assert st.seg.cu_q.tolist() == [0, 4, 6, 10, 14, 15] and st.seg.cu_q.dtype == torch.int32
    assert st.seg.max_q == 4 and st.pool.cu_q.tolist() == [0, 1, 2, 3] and st.pool.cu_k.tolist() == [0, 6, 14, 15]
    assert st.sample_id.tolist() == [0] * 6 + [1] * 8 + [2]
    # tokens out of order inside a sample: sorted into segments, stably
    perm = torch.tensor([4, 0, 5, 1, 2, 3] + list(range(6, 15)))
    order2, _, lens2 = structure.segments(coords[perm].numpy(), [6, 8, 1], 4)
    assert order2 is not None and lens2 == lens
    assert perm[torch.from_numpy(order2)].tolist() == [0, 1, 2, 3, 4, 5] + list(range(6, 15))


def test_encoder_token_order_equivariance():
    """The trunk is permutation-equivariant inside a sample (position table and RoPE go by coords), also
    across temporal tiles: shuffled tokens give the shuffled features."""
    m = make(tiny())
    p = m.pack([media(24, 16, 24, 3, seed=3), media(40, 70, 3, seed=4)])
    n0 = p.seqlens[0]
    perm = torch.cat([torch.randperm(n0, generator=torch.Generator().manual_seed(0)),
                      n0 + torch.arange(p.seqlens[1])])
    with torch.no_grad():
        h = m.encode(p)
        hp = m.encode(at(m, p.feats[perm], p.coords[perm], p.seqlens))
        out = decode_at(m, h[:, :TINY.latent_channels], p.coords, p.seqlens)
        outp = decode_at(m, h[perm, :TINY.latent_channels], p.coords[perm], p.seqlens)
    torch.testing.assert_close(hp, h[perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(outp, out[perm], atol=1e-5, rtol=0)


def test_norms_by_hand():
    x = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])                  # [N=1, h=2, d=2]
    n = model.HeadRMSNorm(2, 2)
    with torch.no_grad():
        n.gamma.copy_(torch.tensor([[1.0, 2.0], [0.5, 1.0]]))
    r2 = math.sqrt(2)
    torch.testing.assert_close(n(x), torch.tensor([[[0.6 * r2, 1.6 * r2], [0.5 * r2, 0.0]]]))
    rms = model.RMSNorm(4)
    with torch.no_grad():
        rms.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    v = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    s = 1 / math.sqrt((1 + 4 + 9 + 16) / 4 + model.NORM_EPS)
    torch.testing.assert_close(rms(v), torch.tensor([[1 * s, -4 * s, 9 * s, -16 * s]]))
    ln = model.LayerNorm(4, eps=model.NORM_EPS)
    torch.testing.assert_close(ln(v.double()).float(), torch.nn.functional.layer_norm(v, (4,), eps=1e-6))
    assert ln(v.double()).dtype == torch.float64



def test_position_lookup_is_the_resized_table_per_segment():
    """structure.position_lookup's index and weights give, for every token, the g x g table bilinearly resized
    (antialias, as SigLIP2-NaFlex) to its segment's grid and read at its (row, column): against F.interpolate per
    segment, for segments of different grids, a repeated grid, a two-frame segment and an empty one."""
    g, C = 4, 3
    table = torch.randn(g * g, C, dtype=torch.float64)
    grids = [(2, 3), (5, 4), (2, 3), (1, 1), (6, 2)]
    frames = [1, 1, 1, 1, 2]
    local, lens = [], []
    for (h, w), t in zip(grids, frames):
        c = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing='ij'), -1)
        local.append(torch.cat([c.reshape(-1, 3), torch.zeros(t * h * w, 1, dtype=torch.long)], 1))
        lens.append(t * h * w)
    local.insert(2, torch.zeros(0, 4, dtype=torch.long)), lens.insert(2, 0)                 # an empty segment
    index, rows = structure.position_lookup(torch.cat(local).numpy(), lens, g)
    got = (rows.double() @ table)[index]
    assert rows.shape[0] == sum(h * w for h, w in dict.fromkeys(grids))                   # each grid once
    want = []
    for c, n in zip(local, lens):
        if n:
            h, w = int(c[:, 1].max()) + 1, int(c[:, 2].max()) + 1
            img = torch.nn.functional.interpolate(table.t().reshape(1, C, g, g), size=(h, w), mode='bilinear',
                                                  align_corners=False, antialias=True)[0]
            want.append(img[:, c[:, 1], c[:, 2]].t())
    torch.testing.assert_close(got, torch.cat(want), atol=1e-6, rtol=1e-6)


def test_gelu_compiled_form_is_the_tanh_gelu():
    """model.GELU inside torch.compile runs x * sigmoid(2u) (a traced graph with a sigmoid and no tanh); its output
    and gradient equal the tanh GELU's computed in float64 (0.5 x (1 + tanh u)), over [-10, 10]."""
    graphs = []

    def backend(gm, inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == 'call_function'})
        return gm
    x = torch.linspace(-10, 10, 20001).requires_grad_()
    y = torch.compile(model.GELU(), backend=backend, fullgraph=True)(x)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert len(graphs) == 1 and any('sigmoid' in t for t in graphs[0]) and not any('tanh' in t for t in graphs[0])
    xd = x.detach().double().requires_grad_()
    yd = 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    (rd,) = torch.autograd.grad(yd, xd, torch.ones_like(yd))
    torch.testing.assert_close(y, yd.float(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(dx, rd.float(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(model.GELU()(x), yd.float(), atol=2e-6, rtol=1e-6)      # eager: F.gelu's tanh form

# -----------------------------------------------------------------------------
# 7. FSQ by hand

SHIFT = math.atanh(0.5 / 1.5015)


def fsq_by_hand(zs):
    """Python-math FSQ of one group: codes and the index (dim 0 least significant)."""
    codes = [round(math.tanh(z + SHIFT) * 1.5015 - 0.5) / 2 for z in zs]   # round(): half to even
    return codes, sum(int(2 * c + 2) * 4 ** j for j, c in enumerate(codes))


def test_fsq_hand_computed():
    zs = [-3.0, -0.9, -0.2, 0.1, 0.6, 2.5]
    codes, index = fsq_by_hand(zs)
    assert codes == [-1.0, -0.5, 0.0, 0.0, 0.5, 0.5]            # sanity of the hand formula itself
    assert index == 0 + 1 * 4 + 2 * 16 + 2 * 64 + 3 * 256 + 3 * 1024
    c, idx = model.fsq_quantize(torch.tensor([zs]), groups=1, levels=4)
    assert c.tolist() == [codes]
    assert idx.dtype == torch.int32 and idx.tolist() == [[index]]
    assert torch.equal(model.fsq_codes_from_indices(idx, dims=6, levels=4), c)

    # many groups at once against the hand formula
    z = torch.randn(7, 48, generator=torch.Generator().manual_seed(3)) * 1.5
    c, idx = model.fsq_quantize(z, groups=8, levels=4)
    assert idx.shape == (7, 8)
    for n in range(7):
        for g in range(8):
            cg, ig = fsq_by_hand(z[n, 6 * g:6 * g + 6].tolist())
            assert torch.allclose(c[n, 6 * g:6 * g + 6], torch.tensor(cg))
            assert int(idx[n, g]) == ig
    assert torch.equal(model.fsq_codes_from_indices(idx, dims=6, levels=4), c)


def test_fsq_all_indices_roundtrip():
    idx = torch.arange(4096, dtype=torch.int32)[:, None]
    codes = model.fsq_codes_from_indices(idx, dims=6, levels=4)
    assert codes.shape == (4096, 6)
    assert set(codes.unique().tolist()) == {-1.0, -0.5, 0.0, 0.5}
    assert len(torch.unique(codes, dim=0)) == 4096
    digits = (2 * codes + 2).round().long()
    assert torch.equal((digits * 4 ** torch.arange(6)).sum(1), idx[:, 0].long())
    # latents whose bounded value sits on the code: quantize gives the same codes and index back
    z = torch.atanh((2 * codes + 0.5) / 1.5015) - SHIFT
    c2, idx2 = model.fsq_quantize(z, groups=1, levels=4)
    assert torch.equal(c2, codes) and torch.equal(idx2, idx)


def test_fsq_straight_through_gradient():
    z = torch.tensor([[-1.2, -0.3, 0.0, 0.4, 0.9, 1.7, -2.0, 0.2, 0.7, -0.6, 1.1, -0.05]], requires_grad=True)
    codes, _ = model.fsq_quantize(z, groups=2, levels=4)
    codes.sum().backward()
    exp = torch.tensor([0.5 * 1.5015 * (1 - math.tanh(v + SHIFT) ** 2) for v in z[0].tolist()])
    torch.testing.assert_close(z.grad[0], exp, atol=1e-6, rtol=1e-5)
    assert bool((z.grad != 0).all())


def test_fsq_rounds_half_to_even():
    """Find fp32 latents whose bounded value is exactly 0.5 / -1.5 / -0.5 and check the rounding:
    half to even gives codes 0, -1, 0 (round-half-up would give 0.5, -0.5, 0)."""
    for target, code in ((0.5, 0.0), (-1.5, -1.0), (-0.5, 0.0)):
        z = torch.full((1, 6), math.atanh((target + 0.5) / 1.5015) - SHIFT)
        found = None
        for direction in (1.0, -1.0):
            zz = z.clone()
            for _ in range(4000):
                if bool((model.fsq_bound(zz, 4) == target).all()):
                    found = zz
                    break
                zz = torch.nextafter(zz, torch.full_like(zz, direction * 10))
            if found is not None:
                break
        if found is None:
            pytest.skip(f'no fp32 latent with bound exactly {target} on this platform')
        codes, idx = model.fsq_quantize(found, groups=1, levels=4)
        assert codes.tolist() == [[code] * 6], (target, codes)
        assert int(idx) == sum(int(2 * code + 2) * 4 ** j for j in range(6))


# -----------------------------------------------------------------------------
# 8. tokenize / detokenize


def test_tokenize_detokenize():
    m = make(tiny(use_quantizer=True))
    with torch.no_grad():                   # spread the random latent means over the FSQ levels (init keeps them small)
        m.proj.weight.mul_(20)
    items = [media(40, 70, 3, seed=6), media(9, 24, 32, 3, seed=7)]
    toks = m.tokenize(items)
    p = m.pack(items)
    G = TINY.fsq_groups                                           # 2 groups of 6 dims: 4^6 = 4096 codes each
    assert [tuple(t.shape) for t in toks] == [(5 * 8, G), (2 * 3 * 4, G)]
    for t in toks:
        assert t.dtype == torch.int32 and int(t.min()) >= 0 and int(t.max()) < 4096
    # indices recomputed from the latent mean with the hand formula, token by token in raster order
    with torch.no_grad():
        mean = m.proj(m.encode(p)).chunk(2, -1)[0]
    allt = torch.cat(toks)
    for n in range(0, len(mean), 7):
        for g in range(G):
            assert int(allt[n, g]) == fsq_by_hand(mean[n, 6 * g:6 * g + 6].tolist())[1]
    assert len(torch.unique(allt, dim=0)) > 10                   # not a degenerate constant code (token rows)

    recs = m.reconstruct(items)
    outs = m.detokenize(toks, [tuple(r.shape[:-1]) for r in recs])   # (H, W) image, (T, H, W) video
    for r, o in zip(recs, outs):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        m.detokenize([toks[0]], [(48, 64)])
    with pytest.raises(ValueError):
        make(tiny()).tokenize(items)


# -----------------------------------------------------------------------------
# 9. decoder KV cache


def cached_pair(depth, seed=0):
    """Same weights, decoder with a 1-latent-frame cache (stride 3) and without."""
    cfg = tiny(decoder_depth=depth, decoder_cache_frames=4)
    m = make(cfg, seed)
    plain = model.AToken(tiny(decoder_depth=depth))
    plain.load_state_dict(m.state_dict())
    return m, plain.eval()


def latents(latent_frames, h=2, w=3, seed=0):
    _, coords = model.patchify(torch.zeros(latent_frames * 4, h * 8, w * 8, 3), (4, 8, 8))
    z = torch.randn(len(coords), TINY.latent_channels, generator=torch.Generator().manual_seed(seed))
    return z, coords


def test_kv_cache_short_video_equals_plain():
    m, plain = cached_pair(2)
    for frames in (1, 2, 3):
        z, c = latents(frames, seed=frames)
        with torch.no_grad():
            torch.testing.assert_close(decode_at(m, z, c, [len(c)]), decode_at(plain, z, c, [len(c)]), atol=1e-5, rtol=0)


@pytest.mark.parametrize('frames', [4, 7, 9])
def test_kv_cache_long_video_differs(frames):
    m, plain = cached_pair(2)
    z, c = latents(frames, seed=frames)
    with torch.no_grad():
        a, b = decode_at(m, z, c, [len(c)]), decode_at(plain, z, c, [len(c)])
    assert a.shape == b.shape == (len(c), 4 * 8 * 8 * 3)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-3
    # the first step (latent frames 0..2) sees no cache: it equals the plain decode of those frames alone
    first = c[:, 0] < 3
    with torch.no_grad():
        torch.testing.assert_close(a[first], decode_at(plain, z[first], c[first], [int(first.sum())]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize('cache_frames', [4, 8, 12])
def test_kv_cache_depth1_matches_windows(cache_frames):
    """Depth 1: the cached K/V of the previous step's last frames are exactly what a plain decoder computes
    for those frames, so step i equals a plain decode of [cached frames | new frames] (t re-based) on the
    new frames. With a 1-frame cache (stride 3) the steps of 7 latent frames are [0,1,2], [2|3,4,5], [5|6]."""
    k = cache_frames // 4
    s = 4 - k
    cfg = tiny(decoder_depth=1, decoder_cache_frames=cache_frames)
    m = make(cfg)
    plain = model.AToken(tiny(decoder_depth=1))
    plain.load_state_dict(m.state_dict())
    plain.eval()
    z, c = latents(7, seed=11)
    t = c[:, 0]
    windows = [(tuple(range(max(i - k, 0), min(i + s, 7))), tuple(range(i, min(i + s, 7))))
               for i in range(0, 7, s)]
    if k == 1:
        assert windows == [((0, 1, 2), (0, 1, 2)), ((2, 3, 4, 5), (3, 4, 5)), ((5, 6), (6,))]
    with torch.no_grad():
        out = decode_at(m, z, c, [len(c)])
        for window, new in windows:
            sel = torch.isin(t, torch.tensor(window))
            cw = c[sel].clone()
            cw[:, 0] -= window[0]
            o = decode_at(plain, z[sel], cw, [int(sel.sum())])
            keep = torch.isin(t[sel], torch.tensor(new))
            torch.testing.assert_close(out[torch.isin(t, torch.tensor(new))], o[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize('cache_frames', [4, 12])
def test_kv_cache_batch_independence(cache_frames):
    m = make(tiny(decoder_cache_frames=cache_frames))
    za, ca = latents(3, h=2, w=3, seed=1)
    zb, cb = latents(7, h=3, w=2, seed=2)
    zc, cc = latents(5, h=1, w=2, seed=3)
    with torch.no_grad():
        out = decode_at(m, torch.cat([za, zb, zc]), torch.cat([ca, cb, cc]), [len(ca), len(cb), len(cc)])
        alone = [decode_at(m, z, c, [len(c)]) for z, c in ((za, ca), (zb, cb), (zc, cc))]
    for o, e in zip(out.split([len(ca), len(cb), len(cc)]), alone):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# 10. from_pretrained


def official_arch(**kw):
    arch = dict(patch_size=[4, 16, 16], in_channels=3072, out_channels=3072, latent_channels=48,
                encoder_model_channels=72, encoder_num_blocks=1, encoder_num_heads=1, encoder_mlp_channels=96,
                encoder_attn_mode='full', encoder_pe_mode='joint', encoder_qk_rms_norm=False,
                encoder_use_bias=True, encoder_use_rms_norm=False,
                decoder_model_channels=72, decoder_num_blocks=1, decoder_num_heads=1, decoder_mlp_channels=96,
                decoder_attn_mode='full', decoder_pe_mode='joint', decoder_qk_rms_norm=True,
                decoder_use_bias=False, decoder_use_rms_norm=True, use_decoder=True, use_quantizer=True,
                quantizer_type='fsq', quantizer_codebook_size=4096, quantizer_feature_dim=48,
                quantizer_num_codebooks=8, quantizer_chunk_size=1)
    arch.update(kw)
    return arch


def write_yaml(path, arch):
    import yaml
    with open(path, 'w') as f:
        yaml.safe_dump({'model': {'class_name': 'x', 'model_cfg': {
            'eval_imagenet_zeroshot': False, 'disentangle_itc_rec': True, 'eval_fid': False,
            'arch_cfg': arch}}}, f)
    return str(path)


OFFICIAL_CFG = model.ModelConfig(patch_size=(4, 16, 16), encoder_width=72, encoder_depth=1, encoder_heads=1,
                                 encoder_mlp=96, decoder_width=72, decoder_depth=1, decoder_heads=1,
                                 decoder_mlp=96, latent_channels=48, use_quantizer=True, fsq_groups=8)


def random_official(seed=0):
    m = make(OFFICIAL_CFG, seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_from_pretrained_roundtrip(tmp_path):
    from safetensors.torch import save_file
    src = random_official()
    sd = src.state_dict()
    y = write_yaml(tmp_path / 'cfg.yaml', official_arch())
    torch.save(sd, tmp_path / 'ckpt.pt')
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / 'ckpt.safetensors'))
    items = [media(40, 70, 3, seed=1), media(9, 32, 48, 3, seed=2)]
    ref = src.reconstruct(items)
    ref_tok = src.tokenize(items)
    for ckpt in ('ckpt.pt', 'ckpt.safetensors'):
        m = model.AToken.from_pretrained(str(tmp_path / ckpt), y)
        assert not m.training
        assert dataclasses.asdict(m.config) == dataclasses.asdict(OFFICIAL_CFG)
        got = m.state_dict()
        assert set(got) == set(sd)
        for k in sd:
            assert torch.equal(got[k], sd[k]), k
        for a, b in zip(m.reconstruct(items), ref):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        for a, b in zip(m.tokenize(items), ref_tok):
            assert torch.equal(a, b)

    # exported tokenizer (model_config + weights) loads without a YAML
    torch.save(src.export(), tmp_path / 'export.pt')
    m = model.AToken.from_pretrained(str(tmp_path / 'export.pt'))
    assert m.config == src.config
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for a, b in zip(m.reconstruct(items), ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_from_pretrained_errors(tmp_path):
    sd = random_official().state_dict()
    y = write_yaml(tmp_path / 'cfg.yaml', official_arch())

    def load(state, name):
        path = tmp_path / name
        torch.save(state, path)
        return model.AToken.from_pretrained(str(path), y)

    extra = dict(sd, **{'decoder.extra_thing.weight': torch.zeros(3)})
    with pytest.raises(ValueError, match=r'decoder\.extra_thing\.weight'):
        load(extra, 'extra.pt')
    missing = {k: v for k, v in sd.items() if k != 'encoder.blocks.0.attn.to_qkv.bias'}
    with pytest.raises(ValueError, match=r'encoder\.blocks\.0\.attn\.to_qkv\.bias'):
        load(missing, 'missing.pt')
    shaped = dict(sd, **{'proj.weight': torch.zeros(96, 71)})
    with pytest.raises(ValueError, match=r'proj\.weight'):
        load(shaped, 'shape.pt')
    with pytest.raises(FileNotFoundError):
        model.AToken.from_pretrained(str(tmp_path / 'nope.pt'), y)

    torch.save(sd, tmp_path / 'ok.pt')
    import yaml
    bad_yaml = tmp_path / 'bad.yaml'
    bad_yaml.write_text(yaml.safe_dump({'model': {'model_cfg': {'eval_fid': False}}}))
    with pytest.raises(ValueError, match='bad.yaml'):
        model.AToken.from_pretrained(str(tmp_path / 'ok.pt'), str(bad_yaml))
    with pytest.raises(ValueError, match='encoder_attn_mode'):
        model.AToken.from_pretrained(str(tmp_path / 'ok.pt'),
                                     write_yaml(tmp_path / 'swin.yaml', official_arch(encoder_attn_mode='swin')))
    with pytest.raises(ValueError):
        model.AToken.from_pretrained(str(tmp_path / 'ok.pt'),
                                     write_yaml(tmp_path / 'cb.yaml', official_arch(quantizer_codebook_size=1000)))
    with pytest.raises(ValueError):     # a flat state dict without its YAML
        model.AToken.from_pretrained(str(tmp_path / 'ok.pt'))


# -----------------------------------------------------------------------------
# 11. parameter counts (meta device: nothing allocated)


def test_param_counts_meta():
    with torch.device('meta'):
        m = model.AToken(model.PRESETS['so400m'])
    assert m.num_params() == 845_738_048
    assert m.num_params('encoder.') == 430_542_272
    assert m.num_params('decoder.') == 415_085_184
    assert m.num_params('proj.') == 110_592
    assert len(m.state_dict()) == 563
    assert m.encoder.head_dim == m.decoder.head_dim == 72
    with torch.device('meta'):
        m32 = model.AToken(dataclasses.replace(model.PRESETS['so400m'], latent_channels=32))
        base = model.AToken(model.PRESETS['base'])
    assert m32.num_params() == 845_682_752
    assert base.encoder.head_dim == base.decoder.head_dim == 64
    assert base.num_params() < m.num_params()


# -----------------------------------------------------------------------------
# 12. SigLIP2 initialisation of the encoder


def siglip_tower(width=64, seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    tower = VisionTransformer(img_size=128, patch_size=8, embed_dim=width, depth=2, num_heads=2, mlp_ratio=2.0,
                              class_token=False, global_pool='map', num_classes=0, act_layer='gelu_tanh')
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.2)
    return tower.eval()


def test_init_from_siglip2(tmp_path, monkeypatch):
    tower = siglip_tower()
    cfg = tiny()
    # a plain SigLIP tower has no RoPE: switch it off in our encoder, so that the two compute the same thing
    monkeypatch.setattr(model.Trunk, 'rope', lambda self, coords: None)
    img = media(128, 128, 3, seed=9)
    with torch.no_grad():
        feats = tower.forward_features(img.permute(2, 0, 1)[None])[0]
        pooled = tower.forward_head(feats[None])

    sd = tower.state_dict()
    torch.save(sd, tmp_path / 'tower.pt')
    torch.save({'visual.trunk.' + k: v for k, v in sd.items()} | {'text.proj': torch.zeros(2)},
               tmp_path / 'open_clip.pt')
    for source in (tower, str(tmp_path / 'tower.pt'), str(tmp_path / 'open_clip.pt')):
        m = make(cfg, seed=1)
        dec_before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith('encoder.')}
        m.init_from_siglip2(source)
        w = m.encoder.input_layer.weight
        assert bool((w[:, 8 * 8 * 3:] == 0).all())                  # temporal slots pt > 0 are zero
        with torch.no_grad():
            p = m.pack([img])
            h = m.encode(p)
            torch.testing.assert_close(h, feats, atol=1e-5, rtol=0)
            torch.testing.assert_close(m.encoder.head(h, p.structure.pool), pooled, atol=1e-5, rtol=0)
        for k, v in dec_before.items():                             # decoder and proj untouched
            assert torch.equal(m.state_dict()[k], v), k

    with pytest.raises(ValueError):
        make(cfg).init_from_siglip2(siglip_tower(width=32))
    with pytest.raises(RuntimeError, match='no-such-siglip-model'):
        make(cfg).init_from_siglip2('no-such-siglip-model')


# -----------------------------------------------------------------------------
# 13. a tiny model overfits one image


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)       # tiny matmuls: threads only add overhead
    yield
    torch.set_num_threads(n)


def test_overfit_one_image(one_thread):
    m = make(TINY, seed=0).train()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing='ij')
    img = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), torch.sin(2 * (xx + yy))], -1) * 0.8
    x = m.pack([img])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(200):
        loss = ((m(x, sample=False)['rec'] - x.feats) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    rec = m.reconstruct([img])[0]
    psnr = 10 * math.log10(4 / ((rec - img) ** 2).mean().item())
    assert psnr >= 25, psnr


# -----------------------------------------------------------------------------
# 14. determinism / posterior sampling


def test_determinism_and_sampling():
    items = [media(24, 40, 3, seed=1), media(8, 16, 16, 3, seed=2)]
    a, b = make(TINY, seed=3), make(TINY, seed=3)
    ra, rb = a.reconstruct(items), b.reconstruct(items)
    for x, y in zip(ra, rb):
        assert torch.equal(x, y)
    c = make(TINY, seed=4)
    assert not torch.equal(c.reconstruct(items)[0], ra[0])

    a.train()
    p = a.pack(items)
    torch.manual_seed(0)
    o1 = a(p)                               # train mode: samples the posterior by default
    o2 = a(p)
    assert torch.equal(o1['mean'], o2['mean']) and torch.equal(o1['logvar'], o2['logvar'])
    assert not torch.allclose(o1['rec'], o2['rec'])
    h = o1['h']
    z1, mean1, logvar1, _ = a.bottleneck(h, sample=True)
    z2, mean2, _, _ = a.bottleneck(h, sample=True)
    assert torch.equal(mean1, mean2) and not torch.equal(z1, z2)
    # the noise is N(0, exp(logvar)): its standardised version has roughly unit variance
    eps = (z1 - mean1) / torch.exp(0.5 * logvar1)
    assert 0.8 < eps.std().item() < 1.2 and abs(eps.mean().item()) < 0.1
    o3 = a(p, sample=False)
    o4 = a(p, sample=False)
    assert torch.equal(o3['rec'], o4['rec'])
    zm, mm, _, _ = a.bottleneck(h, sample=False)
    assert torch.equal(zm, mm)


def test_3d_assets_through_the_tokenizer():
    """3D voxel assets pack as (0, i, j, k) tokens with the RGB patch in the pt = 0 slot, go through the
    same encoder/decoder next to images and videos without influencing them, and come back as
    first-slot features (the Gaussian decoder's input)."""
    cfg = tiny()
    m = make(cfg)
    g = torch.Generator().manual_seed(3)
    coords = torch.unique(torch.randint(20, 44, (300, 3), generator=g), dim=0)   # ascending raster order
    asset = {'feats': torch.rand(len(coords), 8 * 8 * 3, generator=g) * 2 - 1, 'coords': coords}
    p = model.pack([media(40, 56, 3), asset, media(8, 24, 32, 3, seed=1)], cfg.patch_size, cfg)
    assert p.kinds == ['image', '3d', 'video'] and p.seqlens[1] == len(coords)
    start = p.seqlens[0]
    tok = p.feats[start:start + len(coords)]
    assert torch.equal(tok[:, :192], asset['feats']) and tok[:, 192:].abs().sum() == 0
    assert torch.equal(p.coords[start:start + len(coords)], torch.cat([torch.zeros(len(coords), 1).long(), coords], 1))
    with torch.no_grad():
        h = m.encode(p)
        alone = m.encode(model.pack([asset], cfg.patch_size, cfg))
        torch.testing.assert_close(h[start:start + len(coords)], alone, atol=1e-5, rtol=0)
        rec = m.reconstruct([asset])[0]
        assert rec.shape == (len(coords), 192)
        # z is seen only through RoPE: a global shift along z changes nothing, flattening z does
        shifted = {'feats': asset['feats'], 'coords': coords + torch.tensor([0, 0, 5])}
        torch.testing.assert_close(m.embed([shifted]), m.embed([asset]), atol=1e-5, rtol=0)
        flat = {'feats': asset['feats'], 'coords': coords * torch.tensor([1, 1, 0])}
        assert (m.embed([flat]) - m.embed([asset])).abs().max() > 1e-4
    with pytest.raises(ValueError, match='3D asset'):
        model.pack([{'feats': torch.zeros(5, 100), 'coords': torch.zeros(5, 3)}], cfg.patch_size)
