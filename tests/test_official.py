"""Our AToken against numbers produced by Apple's official code (apple/ml-atoken) for a tiny random model.

tests/data/official_tiny.pt (made with Apple's code): the official modules built on CPU with width 72,
one head of 72, one block per side, FSQ 8 x 4096, random weights under the official key names, fed an
odd-sized image (40x70), a large image (290x275, whose 18x17 grid upsamples the 16x16 position table)
and a 21-frame video (20 frames kept: two temporal tiles of 4 + 1 latent frames).
"""
import os

import pytest
import torch

import convert
import model

REF = torch.load(os.path.join(os.path.dirname(__file__), 'data', 'official_tiny.pt'), weights_only=False)
TOL = 1e-4   # the bar; we measure ~1e-6 in fp32


@pytest.fixture(scope='module')
def tok():
    m = model.AToken(model.ModelConfig.from_official(REF['arch_cfg']))
    model.load_strict(m, REF['state_dict'])
    return m.eval()


def channels_first(media):
    v = media[None] if media.dim() == 3 else media        # images keep frame 0 -> (1, H, W, 3)
    return v.permute(0, 3, 1, 2)                          # official layout [T', 3, H', W']


@pytest.mark.parametrize('name', ['image', 'image_big', 'video'])
def test_matches_official(tok, name):
    x, ref = REF['inputs'][name], REF['outputs'][name]
    p = tok.pack([x])
    assert torch.equal(p.coords, ref['coords'][:, 1:].long())     # (t, row, col, z) in token order
    with torch.no_grad():
        h = tok.encode(p)
        emb = tok.embed_features(h, p)
        z, mean, logvar, idx = tok.bottleneck(h)
        rec_fsq = model.unpack(tok.decode(z, p), p, tok.config.patch_size)[0]
        rec_mean = model.unpack(tok.decode(mean, p), p, tok.config.patch_size)[0]
    torch.testing.assert_close(h, ref['enc_full'], atol=TOL, rtol=0)
    torch.testing.assert_close(emb, ref['embedding'], atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat([mean, logvar], 1), ref['moments'], atol=TOL, rtol=0)
    torch.testing.assert_close(z, ref['fsq_codes'], atol=0, rtol=0)
    assert idx.dtype == torch.int32 and torch.equal(idx, ref['fsq_indices'])
    torch.testing.assert_close(channels_first(rec_mean), ref['recon_from_mean'], atol=TOL, rtol=0)
    torch.testing.assert_close(channels_first(rec_fsq), ref['recon_from_fsq'], atol=TOL, rtol=0)


def test_public_api_matches_official(tok):
    """reconstruct / embed / tokenize on a mixed batch give the official per-sample numbers."""
    names = ['image', 'video', 'image_big']
    media = [REF['inputs'][n] for n in names]
    recs, embs, toks = tok.reconstruct(media), tok.embed(media), tok.tokenize(media)
    for i, n in enumerate(names):
        ref = REF['outputs'][n]
        torch.testing.assert_close(channels_first(recs[i]), ref['recon_from_fsq'], atol=TOL, rtol=0)
        torch.testing.assert_close(embs[i:i + 1], ref['embedding'], atol=TOL, rtol=0)
        assert torch.equal(toks[i], ref['fsq_indices'])
    shapes = [r.shape for r in recs]          # full output shapes, channel axis included
    for r, d in zip(recs, tok.detokenize(toks, shapes)):
        torch.testing.assert_close(d, r, atol=1e-6, rtol=0)


def test_continuous_model_uses_mean(tok):
    """Without the quantizer (So/C) the same weights decode the posterior mean deterministically."""
    cont = model.AToken(model.ModelConfig.from_official({**REF['arch_cfg'], 'use_quantizer': False}))
    model.load_strict(cont, REF['state_dict'])
    rec = cont.eval().reconstruct([REF['inputs']['video']])[0]
    torch.testing.assert_close(channels_first(rec), REF['outputs']['video']['recon_from_mean'], atol=TOL, rtol=0)
