"""Unit tests for losses.py: every pure loss against a hand computation (Python math / explicit loops) or
an independent reference (the `lpips` package's own forward), gradients of every term at a non-square,
non-224 resolution through a tiny AToken, the per-modality / per-task assembly of compute_losses, and the
frozen networks (frozen, eval, dtype-following, offline failures, VGG16 loading).

The frozen nets are random (random_frozen=True, the tiny SigLIP, 32 px perceptual copies): built once per
module, ~5 s. CPU only, no downloads. Run: python -m pytest tests/test_losses.py
"""
import copy
import dataclasses
import math
import time

import pytest
import torch

import losses
import model

CFG = losses.LossConfig(siglip_model='tiny', random_frozen=True, perceptual_size=32)
TINY = model.PRESETS['tiny']        # patch (4, 8, 8), encoder width 64 = tiny SigLIP embed dim


@pytest.fixture(scope='module')
def frozen():
    torch.manual_seed(0)
    return losses.FrozenNets(CFG, embed_dim=64)


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return model.AToken(TINY).init_weights(zero_residual=False).eval()


def rand(*shape, seed=0):
    """Uniform random values in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def cfg_with(**kw):
    return dataclasses.replace(CFG, **kw)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def kl_rows(s_t, s_s, tau):
    """Reference Eq. 7 in Python math: mean over rows of KL(softmax(t/tau) || softmax(s/tau))."""
    total = 0.0
    for rt, rs in zip(s_t, s_s):
        p, q = softmax([v / tau for v in rt]), softmax([v / tau for v in rs])
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total / len(s_t)


def siglip_ref(img, txt, t, b):
    """Reference SigLIP loss in Python math: -1/B sum_ij log sigmoid(z_ij (exp(t) x_i.y_j + b))."""
    img, txt = img.tolist(), txt.tolist()
    B = len(img)
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            logit = math.exp(t) * sum(a * c for a, c in zip(img[i], txt[j])) + b
            total += log_sigmoid(z * logit)
    return -total / B


def kl_ref(mean, logvar):
    """Reference diagonal-Gaussian KL to N(0, 1) in float64, summed over channels, mean over tokens."""
    m, lv = mean.double(), logvar.double()
    return (0.5 * (m ** 2 + lv.exp() - 1 - lv).sum(-1)).mean().item()


# -----------------------------------------------------------------------------
# 1-7. pure loss functions


def test_l1_hand_value():
    pred = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # |1| + |-2| + |-0.5| + |2| = 5.5 over 4 elements
    assert losses.l1_loss(pred, target).item() == pytest.approx(1.375, abs=1e-7)
    assert losses.l1_loss(pred, pred).item() == 0.0


def gram_loop(f):
    """G[b, i, j] = sum_p F[b, i, p] F[b, j, p] / (C H W), written out with Python loops."""
    B, C, H, W = f.shape
    fl = f.tolist()
    return torch.tensor([[[sum(fl[b][i][y][x] * fl[b][j][y][x] for y in range(H) for x in range(W)) / (C * H * W)
                           for j in range(C)] for i in range(C)] for b in range(B)], dtype=torch.float64)


def test_gram_matches_loops_and_is_resolution_independent():
    fx = [rand(2, 3, 2, 3, seed=1), rand(2, 5, 1, 2, seed=2)]       # two "layers" of different width
    fy = [rand(2, 3, 2, 3, seed=3), rand(2, 5, 1, 2, seed=4)]
    for f in fx:
        torch.testing.assert_close(losses.gram_matrix(f).double(), gram_loop(f), atol=1e-6, rtol=0)
    # loss = sum_l mean_{i,j} (Gx - Gy)^2, per sample
    ref = sum(((gram_loop(a) - gram_loop(b)) ** 2).mean((1, 2)) for a, b in zip(fx, fy))
    got = losses.gram_loss(fx, fy)
    assert got.shape == (2,)
    torch.testing.assert_close(got.double(), ref, atol=1e-7, rtol=1e-5)
    assert (got > 0).all()
    assert torch.equal(losses.gram_loss(fx, fx), torch.zeros(2))
    # a feature map tiled 2x2 in space has the same Gram matrix (normalised by C H W)
    for f in fx + fy:
        torch.testing.assert_close(losses.gram_matrix(f.tile(1, 1, 2, 2)), losses.gram_matrix(f),
                                   atol=1e-7, rtol=1e-6)
    tiled = losses.gram_loss([f.tile(1, 1, 2, 2) for f in fx], [f.tile(1, 1, 2, 2) for f in fy])
    torch.testing.assert_close(tiled, got, atol=1e-7, rtol=1e-5)


def test_kl_zero_for_standard_normal_and_closed_form():
    assert losses.kl_loss(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0
    mu = [[0.5, -1.0], [2.0, 0.0]]
    sigma = [[1.5, 0.5], [1.0, 2.0]]
    per_token = [0.5 * sum(m * m + s * s - 1 - math.log(s * s) for m, s in zip(mr, sr))
                 for mr, sr in zip(mu, sigma)]
    expected = sum(per_token) / 2
    logvar = torch.tensor([[math.log(s * s) for s in row] for row in sigma])
    assert losses.kl_loss(torch.tensor(mu), logvar).item() == pytest.approx(expected, rel=1e-6)
    # per-token weights: 1/n on n chosen tokens, 0 elsewhere, is the mean over those tokens alone
    mean, logvar = rand(5, 3, seed=1), rand(5, 3, seed=2)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    got = losses.kl_loss(mean, logvar, keep / 3).item()
    assert got == pytest.approx(kl_ref(mean[keep > 0], logvar[keep > 0]), rel=1e-6)
    assert got != pytest.approx(losses.kl_loss(mean, logvar).item(), rel=1e-3)
    assert losses.kl_loss(mean, logvar, torch.full((5,), 0.2)).item() == pytest.approx(kl_ref(mean, logvar), rel=1e-6)


def test_distillation_kl_hand_value_asymmetry_and_sign():
    s_t = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 1.0]]
    s_s = [[0.5, 1.0, 1.5], [1.0, 0.0, 2.0], [-1.0, 0.5, 2.5]]
    t, s = torch.tensor(s_t), torch.tensor(s_s)
    got = losses.distillation_loss(t, s, tau=2.0).item()
    assert got == pytest.approx(kl_rows(s_t, s_s, 2.0), rel=1e-5)
    assert losses.distillation_loss(t, t, tau=2.0).item() == 0.0
    swapped = losses.distillation_loss(s, t, tau=2.0).item()
    assert swapped == pytest.approx(kl_rows(s_s, s_t, 2.0), rel=1e-5)
    assert abs(swapped - got) > 1e-3                         # KL is not symmetric
    for seed in range(5):
        assert losses.distillation_loss(rand(4, 6, seed=seed) * 5, rand(4, 6, seed=seed + 10) * 5, 2.0) >= 0


def test_sigmoid_loss_hand_value_and_gradients():
    temp = losses.SigmoidTemperature()
    assert temp.logit_scale.item() == pytest.approx(math.log(10.0))
    assert temp.logit_bias.item() == -10.0
    img = torch.nn.functional.normalize(rand(3, 4, seed=5), dim=-1)
    txt = torch.nn.functional.normalize(rand(3, 4, seed=6), dim=-1)
    loss = losses.sigmoid_loss(img, txt, temp.logit_scale, temp.logit_bias)
    assert loss.item() == pytest.approx(siglip_ref(img, txt, math.log(10.0), -10.0), rel=1e-6)
    loss.backward()
    # d/db = -1/B sum z sigmoid(-z l),  d/dt = -1/B sum z sigmoid(-z l) exp(t) x.y
    dots = (img @ txt.t()).tolist()
    db = dt = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            l = 10.0 * dots[i][j] - 10.0
            g = -z / (1 + math.exp(z * l)) / 3
            db, dt = db + g, dt + g * 10.0 * dots[i][j]
    assert temp.logit_bias.grad.item() == pytest.approx(db, rel=1e-5)
    assert temp.logit_scale.grad.item() == pytest.approx(dt, rel=1e-5)
    assert temp.logit_bias.grad.item() != 0 and temp.logit_scale.grad.item() != 0


def test_lpips_from_features_equals_lpips_package(frozen):
    x, y = rand(2, 3, 48, 40, seed=7), rand(2, 3, 48, 40, seed=8)
    ours = losses.lpips_from_features(frozen.vgg_features(x), frozen.vgg_features(y), frozen.lpips.lins)
    ref = frozen.lpips(x, y).reshape(2)                # the package's forward, inputs in [-1, 1]
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours > 0).all()


def test_clip_perceptual_hand_value():
    x = torch.rand(2, 8, 3, 3)
    assert losses.clip_perceptual_loss(x, x).abs().max().item() < 1e-6
    tx = torch.tensor([[3.0, 1.0], [4.0, 0.0]]).reshape(1, 2, 1, 2)   # tokens (3, 4) and (1, 0)
    ty = torch.tensor([[4.0, 1.0], [3.0, 1.0]]).reshape(1, 2, 1, 2)   # tokens (4, 3) and (1, 1)
    expected = ((1 - 24 / 25) + (1 - 1 / math.sqrt(2))) / 2
    assert losses.clip_perceptual_loss(tx, ty).item() == pytest.approx(expected, rel=1e-6)


# -----------------------------------------------------------------------------
# 8. gradients of every term through a tiny AToken, at a non-square, non-224 resolution


CAPTIONS = ['a red square', 'two blue circles', 'a moving green line', 'a yellow star spinning']


def tiny_batch(tiny_model, with_3d=False):
    """Two 40x56 images, a 8x24x32 video, and a second video or a 3D asset of 20 voxels."""
    g = torch.Generator().manual_seed(15)
    asset = {'feats': rand(20, 8 * 8 * 3, seed=14), 'coords': torch.randperm(4 ** 3, generator=g)[:20, None]
             // torch.tensor([16, 4, 1]) % 4}                        # 20 distinct voxels (i, j, k) in 4^3
    media = [rand(40, 56, 3, seed=11), rand(40, 56, 3, seed=12), rand(8, 24, 32, 3, seed=13),
             asset if with_3d else rand(8, 24, 32, 3, seed=14)]
    packed = tiny_model.pack(media)
    torch.manual_seed(0)
    out = tiny_model(packed, sample=True)
    return packed, out


TERMS = {   # term -> (config weights, tasks, the outputs the term must reach: KL and L_sem do not see rec)
    'l1': (dict(l1=1.0, lpips=0.0, gram=0.0, clip=0.0, sem=0.0, kl=0.0), ['rec'] * 4, ['rec']),
    'lpips': (dict(l1=0.0, lpips=1.0, gram=0.0, clip=0.0, sem=0.0, kl=0.0), ['rec'] * 4, ['rec']),
    'gram': (dict(l1=0.0, lpips=0.0, gram=1.0, clip=0.0, sem=0.0, kl=0.0), ['rec'] * 4, ['rec']),
    'clip': (dict(l1=0.0, lpips=0.0, gram=0.0, clip=1.0, sem=0.0, kl=0.0), ['rec'] * 4, ['rec']),
    'kl': (dict(rec=0.0, sem=0.0, kl=1.0), ['rec'] * 4, ['mean', 'logvar']),
    'distill': (dict(rec=0.0, sem=1.0, kl=0.0), ['und', 'und', 'rec', 'rec'], ['embedding']),
    'sigmoid': (dict(rec=0.0, sem=1.0, kl=0.0), ['rec', 'rec', 'und', 'und'], ['embedding']),
}


@pytest.mark.parametrize('term', list(TERMS))
def test_every_term_has_finite_nonzero_gradient(term, frozen, tiny_model):
    packed, out = tiny_batch(tiny_model)
    assert packed.kinds == ['image', 'image', 'video', 'video'] and packed.grids[0] == (1, 5, 7)
    weights, tasks, wrt = TERMS[term]
    temperature = losses.SigmoidTemperature()
    total, logs = losses.compute_losses(out, packed, frozen, cfg_with(**weights), tasks=tasks,
                                        captions=CAPTIONS, temperature=temperature)
    assert term in logs and torch.isfinite(logs[term]) and logs[term] > 0   # gram: tiny but > 0
    extra = [temperature.logit_scale, temperature.logit_bias] if term == 'sigmoid' else []
    grads = torch.autograd.grad(total, [out[k] for k in wrt] + extra)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)  # sigmoid: t and b train too
    g = grads[0]
    if term in ('lpips', 'gram', 'clip'):
        # image-only perceptual terms: no gradient to video tokens, nor to an image's padding frames 1..3
        img_tokens = sum(packed.seqlens[:2])
        assert g[img_tokens:].abs().sum() == 0
        frames = g[:img_tokens].reshape(img_tokens, 4, 8, 8, 3)           # [N, pt, ph, pw, c]
        assert frames[:, 1:].abs().sum() == 0 and frames[:, 0].abs().sum() > 0
    if term == 'distill':
        assert g[2:].abs().sum() == 0 and g[:2].abs().sum() > 0           # videos are not distilled
    if term == 'sigmoid':
        assert g[:2].abs().sum() == 0 and g[2:].abs().sum() > 0


# -----------------------------------------------------------------------------
# 9. assembly of the total for mixed batches


def l1_ref(a, b):
    return (a.double() - b.double()).abs().sum().item() / a.numel()


def select(packed, out, ids):
    """Samples `ids` of a packed batch and of the model outputs, as their own batch."""
    cu = [0] + torch.tensor(packed.seqlens).cumsum(0).tolist()
    rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in ids])
    p = model.Packed(packed.feats[rows], packed.coords[rows], [packed.seqlens[i] for i in ids],
                     [packed.kinds[i] for i in ids], [packed.grids[i] for i in ids], packed.patch_size)
    o = {k: out[k][rows] for k in ('rec', 'mean', 'logvar')} | {'embedding': out['embedding'][ids]}
    return p, o


def image_terms_ref(frozen, rec, tgt, size):
    """LPIPS (the package's forward), Gram (einsum) and CLIP (explicit cosine) of one image pair."""
    x, y = losses.resize([rec], size), losses.resize([tgt], size)
    lp = frozen.lpips(x, y).item()
    gram = 0.0
    for a, b in zip(frozen.vgg_features(x), frozen.vgg_features(y)):
        C, H, W = a.shape[1:]
        ga, gb = (torch.einsum('bchw,bdhw->bcd', f.double(), f.double()) / (C * H * W) for f in (a, b))
        gram += ((ga - gb) ** 2).mean().item()
    s = frozen.image_size()
    ta, tb = (frozen.vision(losses.resize([f], s))[0][0].double().flatten(1) for f in (rec, tgt))  # [C, hw]
    cos = (ta * tb).sum(0) / (ta.norm(dim=0) * tb.norm(dim=0))
    return lp, gram, (1 - cos).mean().item()


def test_videos_use_l1_only(frozen, tiny_model):
    vids, vout = select(*tiny_batch(tiny_model), [2, 3])
    a, logs = losses.compute_losses(vout, vids, frozen, CFG)
    b, _ = losses.compute_losses(vout, vids, frozen, cfg_with(lpips=123.0, gram=0.0, clip=7.0))
    assert a.item() == b.item()
    assert not {'lpips', 'gram', 'clip'} & set(logs)
    r, t = vout['rec'].split(vids.seqlens), vids.feats.split(vids.seqlens)
    rec = (l1_ref(r[0], t[0]) + l1_ref(r[1], t[1])) / 2
    kl = kl_ref(vout['mean'], vout['logvar'])
    assert logs['rec'].item() == pytest.approx(rec, rel=1e-5)
    assert logs['kl'].item() == pytest.approx(kl, rel=1e-5)
    assert a.item() == pytest.approx(CFG.rec * rec + CFG.kl * kl, rel=1e-5)


def test_per_sample_average_one_image_one_video(frozen, tiny_model):
    packed, out = tiny_batch(tiny_model)
    p, o = select(packed, out, [0, 2])                                  # image 0 and video 0
    cfg = cfg_with(l1=2.0, lpips=3.0, gram=50.0, clip=0.5, rec=0.7, kl=0.01)
    total, logs = losses.compute_losses(o, p, frozen, cfg)
    # the image's L1 as compute_losses logs it for the image alone (its padding rule is pinned by
    # test_image_l1_discards_temporal_padding); the video's by hand
    l1_img = losses.compute_losses(*select(packed, out, [0])[::-1], frozen, cfg)[1]['l1'].item()
    r, t = o['rec'].split(p.seqlens), p.feats.split(p.seqlens)
    l1_vid = l1_ref(r[1], t[1])
    img_rec, img_tgt = model.unpack(o['rec'], p, p.patch_size)[0], model.unpack(p.feats, p, p.patch_size)[0]
    lp, gram, clip = image_terms_ref(frozen, img_rec, img_tgt, CFG.perceptual_size)
    assert logs['lpips'].item() == pytest.approx(lp, abs=1e-5)
    assert logs['gram'].item() == pytest.approx(gram, rel=1e-4, abs=1e-12)
    assert logs['clip'].item() == pytest.approx(clip, rel=1e-4, abs=1e-7)
    expected = (cfg.l1 * l1_img + cfg.lpips * lp + cfg.gram * gram + cfg.clip * clip + cfg.l1 * l1_vid) / 2
    assert logs['rec'].item() == pytest.approx(expected, rel=1e-5)
    assert logs['l1'].item() == pytest.approx((l1_img + l1_vid) / 2, rel=1e-5)
    kl = kl_ref(o['mean'], o['logvar'])
    assert total.item() == pytest.approx(cfg.rec * expected + cfg.kl * kl, rel=1e-5)


def test_3d_uses_view_l1_and_requires_views(frozen, tiny_model):
    p, out = tiny_batch(tiny_model, with_3d=True)
    assert p.kinds == ['image', 'image', 'video', '3d']
    pv, tv = rand(2, 8, 8, 3, seed=20).requires_grad_(), rand(2, 8, 8, 3, seed=21)
    cfg = cfg_with(lpips=0.0, gram=0.0, clip=0.0)
    total, logs = losses.compute_losses(out, p, frozen, cfg, tasks=['und', 'und', 'rec', 'rec'],
                                        captions=CAPTIONS[:2] + [None, None], views={3: (pv, tv)})
    r, t = out['rec'].split(p.seqlens), p.feats.split(p.seqlens)
    expected = (l1_ref(r[2], t[2]) + l1_ref(pv, tv)) / 2
    assert logs['rec'].item() == pytest.approx(expected, rel=1e-5)
    # the 3D sample's own token output gets no gradient from L_rec; the views do
    g_rec, g_view = torch.autograd.grad(total, [out['rec'], pv])
    assert g_rec[-p.seqlens[3]:].abs().sum() == 0 and g_rec[70:-p.seqlens[3]].abs().sum() > 0
    assert g_view.abs().sum() > 0
    with pytest.raises(ValueError, match='3D sample 3'):
        losses.compute_losses(out, p, frozen, cfg)


def test_und_without_caption_names_the_sample(frozen, tiny_model):
    packed, out = tiny_batch(tiny_model)
    with pytest.raises(ValueError, match='sample 1'):
        losses.compute_losses(out, packed, frozen, CFG, tasks=['und', 'und', 'rec', 'rec'],
                              captions=['a cat', '', None, None])
    with pytest.raises(ValueError, match='sample 0'):
        losses.compute_losses(out, packed, frozen, CFG, tasks=['und', 'rec', 'rec', 'rec'])



def test_und_without_embedding_says_embed_true(frozen, tiny_model):
    """A model output made with embed=False (reconstruction-only micro-batches) has no embedding: an
    understanding task then fails with an error that says how to get one; reconstruction alone runs."""
    packed, out = tiny_batch(tiny_model)
    no_emb = {**out, 'embedding': None}
    with pytest.raises(ValueError, match='embed=True'):
        losses.compute_losses(no_emb, packed, frozen, CFG, tasks=['und', 'und', 'rec', 'rec'],
                              captions=['a cat', 'a dog', None, None])
    a, _ = losses.compute_losses(no_emb, packed, frozen, CFG)
    b, _ = losses.compute_losses(out, packed, frozen, CFG)
    assert torch.equal(a, b)

def test_semantic_terms_per_modality_and_total(frozen, tiny_model):
    p, out = tiny_batch(tiny_model, with_3d=True)
    assert p.kinds == ['image', 'image', 'video', '3d']
    temp = losses.SigmoidTemperature()
    cfg = cfg_with(rec=0.3, sem=2.0, kl=0.5, tau=1.5)
    pv, tv = rand(2, 8, 8, 3, seed=22), rand(2, 8, 8, 3, seed=23)
    # every sample 'und': distillation for the images, the sigmoid loss for the video and the 3D sample
    total, logs = losses.compute_losses(out, p, frozen, cfg, tasks=['und'] * 4, captions=CAPTIONS, temperature=temp)
    assert {'distill', 'sigmoid'} <= set(logs) and not {'l1', 'lpips', 'gram', 'clip'} & set(logs)
    assert logs['rec'].item() == 0.0 and logs['kl'].item() == 0.0
    # distillation: images 0, 1 against their 2 captions, teacher = frozen SigLIP on frame 0
    frames = [f for f in model.unpack(p.feats, p, p.patch_size)[:2]]
    with torch.no_grad():
        teacher = frozen.vision(losses.resize(frames, frozen.image_size()))[1]
        txt = frozen.encode_text(CAPTIONS[:2])
    s = frozen.teacher_scale()
    s_t, s_s = (s * teacher @ txt.t()).tolist(), (s * out['embedding'][:2].detach() @ txt.t()).tolist()
    assert logs['distill'].item() == pytest.approx(kl_rows(s_t, s_s, cfg.tau), rel=1e-4, abs=1e-7)
    # sigmoid: the video (2) and the 3D sample (3) with their captions
    txt = frozen.encode_text(CAPTIONS[2:])
    ref = siglip_ref(out['embedding'][2:].detach(), txt, temp.logit_scale.item(), temp.logit_bias.item())
    assert logs['sigmoid'].item() == pytest.approx(ref, rel=1e-5)
    assert logs['sem'].item() == pytest.approx(logs['distill'].item() + logs['sigmoid'].item(), rel=1e-6)
    assert total.item() == pytest.approx(cfg.sem * logs['sem'].item(), rel=1e-6)
    # mixed: reconstruction for image 0 and video 2, understanding for image 1 and the 3D sample
    total, logs = losses.compute_losses(out, p, frozen, cfg, tasks=['rec', 'und', 'rec', 'und'],
                                        captions=CAPTIONS, views={3: (pv, tv)}, temperature=temp)
    assert {'distill', 'sigmoid', 'l1', 'lpips', 'gram', 'clip', 'kl'} <= set(logs)
    # only image 0 (rec) gets perceptual terms; rec samples are 0 (image) and 2 (video)
    r, t = out['rec'].split(p.seqlens), p.feats.split(p.seqlens)
    l1_img = losses.compute_losses(*select(p, out, [0])[::-1], frozen, cfg)[1]['l1'].item()
    rec = (cfg.l1 * l1_img + cfg.lpips * logs['lpips'].item() + cfg.gram * logs['gram'].item()
           + cfg.clip * logs['clip'].item() + cfg.l1 * l1_ref(r[2], t[2])) / 2
    assert logs['rec'].item() == pytest.approx(rec, rel=1e-5)
    rows = torch.cat([torch.arange(0, 35), torch.arange(70, 70 + p.seqlens[2])])
    assert logs['kl'].item() == pytest.approx(kl_ref(out['mean'][rows], out['logvar'][rows]), rel=1e-5)
    txt = frozen.encode_text(CAPTIONS[3:])                   # the 3D sample's sigmoid loss, alone
    ref = siglip_ref(out['embedding'][3:].detach(), txt, temp.logit_scale.item(), temp.logit_bias.item())
    assert logs['sigmoid'].item() == pytest.approx(ref, rel=1e-5)
    expected = cfg.rec * logs['rec'].item() + cfg.sem * logs['sem'].item() + cfg.kl * logs['kl'].item()
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert logs['total'].item() == total.item()
    # images alone with 'und': distillation only
    _, logs = losses.compute_losses(out, p, frozen, cfg, tasks=['und', 'und', 'rec', 'rec'],
                                    captions=CAPTIONS[:2] + [None, None], views={3: (pv, tv)})
    assert 'distill' in logs and 'sigmoid' not in logs
    with pytest.raises(ValueError, match="'rec' or 'und'"):
        losses.compute_losses(out, p, frozen, cfg, tasks=['both'] * 4, captions=CAPTIONS, views={3: (pv, tv)})


def test_image_und_sigmoid_with_a_trainable_text_tower(frozen, tiny_model):
    """image_und='sigmoid' + train_text (the offline demo): images join videos / 3D in one SigLIP loss
    against a trainable copy of the text tower, which gets gradients while the frozen nets get none."""
    p, out = tiny_batch(tiny_model, with_3d=True)
    temp = losses.SigmoidTemperature()
    cfg = cfg_with(image_und='sigmoid', train_text=True, rec=0.0, kl=0.0)
    text = losses.TrainableText(frozen)
    with torch.no_grad():       # a copy of the frozen tower to start with
        torch.testing.assert_close(text(CAPTIONS), frozen.encode_text(CAPTIONS), rtol=0, atol=1e-6)
    total, logs = losses.compute_losses(out, p, frozen, cfg, tasks=['und'] * 4, captions=CAPTIONS,
                                        temperature=temp, text=text)
    assert 'distill' not in logs
    with torch.no_grad():
        txt = text(CAPTIONS)
    ref = siglip_ref(out['embedding'].detach(), txt, temp.logit_scale.item(), temp.logit_bias.item())
    assert logs['sigmoid'].item() == pytest.approx(ref, rel=1e-5)
    total.backward()
    grads = [q.grad for q in text.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(q.grad is None for q in frozen.parameters())
    with pytest.raises(ValueError, match='image_und'):
        losses.LossConfig(image_und='contrastive')


# -----------------------------------------------------------------------------
# 10-12. the frozen networks


def test_frozen_nets_are_frozen_and_separate(frozen, tiny_model):
    assert all(not p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training and not any(m.training for m in frozen.modules())
    ptrs = {t.data_ptr() for t in list(frozen.parameters()) + list(frozen.buffers())}
    sd = tiny_model.state_dict()
    assert not ptrs & {v.data_ptr() for v in sd.values()}
    assert not any(k.startswith(('lpips', 'siglip')) or '.lpips.' in k for k in sd)


def test_frozen_nets_follow_dtype(frozen):
    f64 = copy.deepcopy(frozen).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in list(f64.parameters()) + list(f64.buffers())
               if t.is_floating_point())
    x = rand(1, 3, 32, 32).double()
    assert all(f.dtype == torch.float64 for f in f64.vgg_features(x))
    assert f64.encode_text(['a cat']).dtype == torch.float64
    assert frozen.encode_text(['a cat']).dtype == torch.float32       # the original is untouched


def test_frozen_nets_fail_fast_offline(frozen):
    lp = copy.deepcopy(frozen.lpips)
    with pytest.raises(RuntimeError, match='vgg_weights'):
        losses.load_vgg16(lp, losses.LossConfig(vgg_weights='/nonexistent/vgg16.pth'))
    t0 = time.time()
    with pytest.raises(RuntimeError, match='no-such-siglip-model'):
        losses.load_siglip(losses.LossConfig(siglip_model='no-such-siglip-model'), 64)
    assert time.time() - t0 < 20                                      # no network retries
    with pytest.raises(ValueError, match='random_frozen'):
        losses.load_siglip(losses.LossConfig(siglip_model='tiny', random_frozen=False), 64)


def test_encode_text(frozen):
    texts = ['a cat on a mat', 'a dog in the rain', 'a cat on a mat', 'noise']
    e = frozen.encode_text(texts)
    assert e.shape == (4, 64)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    assert torch.equal(frozen.encode_text(texts), e)                  # deterministic
    assert torch.equal(e[0], e[2])
    for i, j in [(0, 1), (0, 3), (1, 3)]:
        assert (e[i] - e[j]).abs().max() > 1e-3


def testload_vgg16_from_state_dict_file(frozen, tmp_path):
    import torchvision
    torch.manual_seed(1)
    sd = torchvision.models.vgg16().state_dict()      # random weights, torchvision's key names
    path = tmp_path / 'vgg16.pth'
    torch.save(sd, path)
    lp = copy.deepcopy(frozen.lpips)                  # an lpips.LPIPS(pnet_rand=True): other random weights
    assert not torch.equal(lp.net.slice1[0].weight, sd['features.0.weight'])
    losses.load_vgg16(lp, losses.LossConfig(vgg_weights=str(path)))
    assert torch.equal(lp.net.slice1[0].weight, sd['features.0.weight'])
    assert torch.equal(lp.net.slice5._modules['28'].weight, sd['features.28.weight'])
    assert torch.equal(lp.net.slice5._modules['28'].bias, sd['features.28.bias'])
    convs = [(i, m) for s in (lp.net.slice1, lp.net.slice2, lp.net.slice3, lp.net.slice4, lp.net.slice5)
             for i, m in s.named_children() if isinstance(m, torch.nn.Conv2d)]
    assert [i for i, _ in convs] == ['0', '2', '5', '7', '10', '12', '14', '17', '19', '21', '24', '26', '28']
    for i, m in convs:
        assert torch.equal(m.weight, sd[f'features.{i}.weight']) and torch.equal(m.bias, sd[f'features.{i}.bias'])


def test_image_l1_discards_temporal_padding(frozen, tiny_model):
    """Paper 3.2 (Eq. 2): images are single-frame videos and the temporal padding is discarded, so the
    image L1 is over frame 0 only (the LPIPS/Gram/CLIP terms already are). FAILS with losses.py as of
    87a2121/9cfce06: compute_losses averages L1 over all pt=4 frames of an image's patches, 3 of which are
    the zero padding from model.prepare, so the image L1 is ~1/4 of the paper's and 3/4 of its weight
    trains the decoder to output grey padding."""
    p, o = select(*tiny_batch(tiny_model), [0])
    _, logs = losses.compute_losses(o, p, frozen, cfg_with(lpips=0.0, gram=0.0, clip=0.0))
    frame0 = 8 * 8 * 3                                                 # feats are (pt, ph, pw, c), pt outermost
    assert logs['l1'].item() == pytest.approx(l1_ref(o['rec'][:, :frame0], p.feats[:, :frame0]), rel=1e-5)


def test_gram_loss_is_4_over_c2_of_gatys():
    """The documented normalisation: one layer's term is (4 / C^2) E_l, with Gatys et al.'s
    E_l = 1 / (4 C^2 M^2) sum_ij (A_ij - B_ij)^2 on the unnormalised Gram matrices A = F F^T (F as [C, M])."""
    fx, fy = [rand(1, 4, 3, 5, seed=5), rand(1, 6, 2, 2, seed=6)], [rand(1, 4, 3, 5, seed=7), rand(1, 6, 2, 2, seed=8)]
    want = 0.0
    for a, b in zip(fx, fy):
        C, M = a.shape[1], a.shape[2] * a.shape[3]
        A, B = (x[0].double().reshape(C, M) for x in (a, b))
        E = ((A @ A.T - B @ B.T) ** 2).sum().item() / (4 * C ** 2 * M ** 2)
        want += 4 / C ** 2 * E
    assert losses.gram_loss(fx, fy).item() == pytest.approx(want, rel=1e-5)


# -----------------------------------------------------------------------------
# global-batch semantic losses: one process (the global form equals the per-rank one), and 2 gloo ranks vs one
# process with both ranks' batches

RANK_CAPTIONS = [['a red circle', 'a blue star', 'a red circle'], ['a blue star', 'a green ring']]   # rank 0, rank 1
RANK_OTHER = [['a video', 'b video'], ['c video']]
EMB, RANK_PAD = 8, 3


def _semantic_setup():
    """Shared parameters (student encoder, trainable text table, sigmoid temperature) and each rank's inputs."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(5, EMB)
    vocab = sorted({c for r in RANK_CAPTIONS + RANK_OTHER for c in r})
    text = torch.nn.Embedding(len(vocab), EMB)
    temp = losses.SigmoidTemperature(-2.0)
    x = [torch.randn(len(c), 5) for c in RANK_CAPTIONS]                 # images
    v = [torch.randn(len(c), 5) for c in RANK_OTHER]                    # videos
    teacher = [torch.nn.functional.normalize(torch.randn(len(c), EMB), dim=-1) for c in RANK_CAPTIONS]
    return enc, text, temp, vocab, x, v, teacher


def _terms(fn, enc, text, temp, vocab, x, v, teacher, caps, other, **kw):
    embed = lambda t: torch.nn.functional.normalize(enc(t), dim=-1)
    encode = lambda texts: torch.nn.functional.normalize(text(torch.tensor([vocab.index(c) for c in texts])), dim=-1)
    frozen = type('Frozen', (), {'teacher_scale': lambda self: 10.0})()      # FrozenNets' SigLIP2 logit scale
    terms = fn(embed(x), teacher, caps, embed(v), other, frozen, CFG, temp, encode, **kw)
    return terms, [enc.weight, enc.bias, text.weight, temp.logit_scale, temp.logit_bias]


def _semantic_rank(rank, world, path):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{path}.init', rank=rank, world_size=world)
    enc, text, temp, vocab, x, v, teacher = _semantic_setup()
    terms, params = _terms(losses.semantic_terms, enc, text, temp, vocab, x[rank], v[rank], teacher[rank],
                           RANK_CAPTIONS[rank], RANK_OTHER[rank], pad=RANK_PAD)
    sum(terms.values()).backward()
    grads = []
    for p in params:                                               # what DDP / FSDP do: average over ranks
        dist.all_reduce(p.grad)
        grads.append(p.grad / world)
    torch.save(dict(terms={k: t.detach() for k, t in terms.items()}, grads=grads), f'{path}.{rank}')
    dist.destroy_process_group()


def test_global_semantic_losses_two_gloo_ranks_equal_one_process(tmp_path):
    """Eq. 7 distillation (duplicate captions within and across ranks) and the sigmoid loss, gathered over 2 gloo
    ranks with unequal micro-batches (3 + 2 images, 2 + 1 videos, padded to 3): each rank's loss equals
    semantic_terms on both batches together, and the rank-averaged gradients (student encoder, trainable text
    tower, temperature) equal that single process's gradients. float32; tolerance 1e-6 absolute, 1e-5 relative
    (the sums run in a different order)."""
    import torch.multiprocessing as mp
    path = str(tmp_path / 'pg')
    mp.spawn(_semantic_rank, args=(2, path), nprocs=2, join=True)
    enc, text, temp, vocab, x, v, teacher = _semantic_setup()
    ref, params = _terms(losses.semantic_terms, enc, text, temp, vocab, torch.cat(x), torch.cat(v),
                         torch.cat(teacher), RANK_CAPTIONS[0] + RANK_CAPTIONS[1], RANK_OTHER[0] + RANK_OTHER[1])
    sum(ref.values()).backward()
    assert set(ref) == {'distill', 'sigmoid'} and all(r > 0 for r in ref.values())
    for rank in range(2):
        got = torch.load(f'{path}.{rank}')
        for k in ref:
            torch.testing.assert_close(got['terms'][k], ref[k].detach(), atol=1e-6, rtol=1e-5)
        for g, p in zip(got['grads'], params):
            torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)
    # the local-only loss (global_batch=False) is a different number: the gather does change the loss
    local, _ = _terms(losses.semantic_terms, enc, text, temp, vocab, x[0], v[0], teacher[0], RANK_CAPTIONS[0], RANK_OTHER[0])
    assert abs(local['sigmoid'].item() - ref['sigmoid'].item()) > 1e-3


def test_global_form_on_one_rank_equals_the_per_rank_form():
    """The global-batch forms (validity mask, padded rows, duplicate captions masked in the softmax) with one
    process give the per-rank values: the pure losses with an all-real mask exactly; semantic_terms with pad = 5
    (the 5 images unpadded, the 3 videos padded) and pad = 7, and its gradients, to 1e-6 absolute, 1e-5 relative
    (float32; the text tower encodes the repeated captions too and the sums run over more columns)."""
    s_t, s_s = rand(5, 7, seed=30) * 4, rand(5, 7, seed=31) * 4
    plain = losses.distillation_loss(s_t, s_s, 2.0)
    assert torch.equal(losses.distillation_loss(s_t, s_s, 2.0, torch.ones(5), torch.ones(7, dtype=torch.bool)), plain)
    cols = torch.tensor([True, False, True, True, False, True, True])
    masked = losses.distillation_loss(s_t, s_s, 2.0, torch.ones(5), cols)
    torch.testing.assert_close(masked, losses.distillation_loss(s_t[:, cols], s_s[:, cols], 2.0), atol=1e-6, rtol=1e-5)
    img = torch.nn.functional.normalize(rand(6, 4, seed=32), dim=-1)
    txt = torch.nn.functional.normalize(rand(6, 4, seed=33), dim=-1)
    temp = losses.SigmoidTemperature(-2.0)
    plain = losses.sigmoid_loss(img, txt, temp.logit_scale, temp.logit_bias)
    assert torch.equal(losses.sigmoid_loss(img, txt, temp.logit_scale, temp.logit_bias, torch.ones(6)), plain)
    assert plain.item() == pytest.approx(siglip_ref(img, txt, math.log(10.0), -2.0), rel=1e-6)

    enc, text, temp, vocab, x, v, teacher = _semantic_setup()
    caps, other = RANK_CAPTIONS[0] + RANK_CAPTIONS[1], RANK_OTHER[0] + RANK_OTHER[1]   # 'a red circle' 2x, 'a blue star' 2x
    args = (enc, text, temp, vocab, torch.cat(x), torch.cat(v), torch.cat(teacher), caps, other)
    ref, params = _terms(losses.semantic_terms, *args)
    ref_grads = torch.autograd.grad(sum(ref.values()), params)
    assert set(ref) == {'distill', 'sigmoid'} and all(r > 0 for r in ref.values())
    for pad in (len(caps), len(caps) + 2):
        got, params = _terms(losses.semantic_terms, *args, pad=pad)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)
        for g, r in zip(torch.autograd.grad(sum(got.values()), params), ref_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
