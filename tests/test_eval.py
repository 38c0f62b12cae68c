"""Tests for eval.py: metrics against hand-computed, closed-form and independent reference values, the config
flags, checkpoint loading and the command line end to end (built-in data, folders of real files with bad
ones in them, an official-format checkpoint, errors). CPU, no network: --random_nets everywhere."""
import io
import json
import math
import os
import warnings
from dataclasses import asdict

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter

import data
import eval as ev
import losses
import model

OFFICIAL = os.path.join(os.path.dirname(__file__), 'data', 'official_tiny.pt')


def tiny_config(**kw):
    base = dict(patch_size=(4, 8, 8), encoder_width=32, encoder_depth=1, encoder_heads=2, encoder_mlp=64,
                decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp=64, latent_channels=16,
                fsq_groups=4, fsq_levels=4, gs_width=32, gs_depth=1, gs_heads=1, gs_mlp=64, gs_per_voxel=4,
                gs_resolution=16)
    return model.ModelConfig(**{**base, **kw})


def run_cli(tmp_path, *flags):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')             # torchvision deprecations, data.py's "skipped" lines
        return ev.main([f'--out_dir={tmp_path / "out"}', '--random_nets', *flags])


def unit(x):
    return torch.as_tensor(x, dtype=torch.float64) * 2 - 1      # [0, 1] -> the [-1, 1] convention


# -----------------------------------------------------------------------------
# pixel metrics


def test_psnr_of_a_known_mse():
    x = torch.zeros(2, 16, 16, 3)                       # mid-grey 0.5 in [0, 1]
    y = x + 0.2                                         # 0.6: MSE = 0.01 -> 20 dB
    torch.testing.assert_close(ev.psnr(x, y), torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.isinf(ev.psnr(x, x)).all()
    # one value over all pixels and channels of each image, as skimage.metrics.peak_signal_noise_ratio
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 24, 3)), rng.random((20, 24, 3))
    expect = 10 * np.log10(1 / np.mean((a - b) ** 2))
    assert abs(ev.psnr(unit(a), unit(b)).item() - expect) < 1e-9
    assert abs(ev.psnr(a, b, value_range=(0, 1)).item() - expect) < 1e-9
    # uint8 arrays are read as [0, 255]
    a8, b8 = (a * 255).astype(np.uint8), (b * 255).astype(np.uint8)
    expect8 = 10 * np.log10(255 ** 2 / np.mean((a8.astype(float) - b8) ** 2))
    assert abs(ev.psnr(a8, b8).item() - expect8) < 1e-9


def ssim_reference(a, b):
    """scikit-image's structural_similarity(a, b, data_range=1, channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False), written out with scipy: Gaussian filter (truncate 3.5 -> 11
    taps), SSIM map, 5-pixel borders cropped, mean; then the mean over channels."""
    out = []
    for c in range(a.shape[-1]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        f = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5, mode='reflect')
        ux, uy = f(x), f(y)
        vx, vy, vxy = f(x * x) - ux * ux, f(y * y) - uy * uy, f(x * y) - ux * uy
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
        out.append(s[5:-5, 5:-5].mean())
    return float(np.mean(out))


def test_ssim_identical_is_one():
    x = torch.rand(3, 20, 17, 3) * 2 - 1
    torch.testing.assert_close(ev.ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_ssim_matches_reference_random_pair():
    rng = np.random.default_rng(1)
    a = rng.random((23, 31, 3))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert abs(ev.ssim(unit(a), unit(b)).item() - ssim_reference(a, b)) < 1e-10
    c = rng.random((23, 31, 3))                                     # unrelated images: SSIM near 0
    assert abs(ev.ssim(unit(a), unit(c)).item() - ssim_reference(a, c)) < 1e-10


def test_bicubic_baseline_budget_by_hand():
    """The non-learned codec at the latent's float budget: 48 floats per 16x16 patch = 3 floats per 4x4
    pixels (a factor 4 per side) for images; a video frame has a quarter of that (pt = 4): factor 8."""
    cfg = model.ModelConfig()                                   # official: patch (4, 16, 16), latent 48
    assert ev.latent_floats_per_pixel('image', cfg) == 48 / 256
    assert ev.latent_floats_per_pixel('video', cfg) == 48 / 1024
    x = torch.full((40, 24, 3), 0.3)
    torch.testing.assert_close(ev.bicubic_baseline(x, 48 / 256), x)          # constants survive
    y = torch.rand(2, 40, 24, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(ev.bicubic_baseline(y, 3.0), y)               # 3 floats per pixel: lossless
    # a texture loses detail as the budget shrinks: factor 1 < 2 < 4 < 8 per side
    t = torch.linspace(0, 12, 48)
    img = torch.stack(torch.broadcast_tensors(t.sin()[:, None], (0.7 * t).cos()[None], torch.tensor(0.1)),
                      -1)                                                      # (48, 48, 3)
    scores = [ev.psnr(ev.bicubic_baseline(img, b), img).item() for b in (3.0, 0.75, 0.1875, 3 / 64)]
    assert scores[0] == math.inf and scores[1] > scores[2] > scores[3]


def test_psnr_ssim_on_photo_like_distortions():
    """A built-in image (smooth regions, edges, texture) under JPEG, blur and noise, as the real-photo checks."""
    img = data.SyntheticImages(1, 'val', res=(96, 96), patch_size=(4, 16, 16))[0].media
    a = ((img.numpy() + 1) * 127.5).round().astype(np.uint8)
    pil = Image.fromarray(a)
    buf = io.BytesIO()
    pil.save(buf, 'JPEG', quality=20)
    noisy = np.clip(a + np.random.default_rng(2).normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    for d in (np.asarray(Image.open(buf)), np.asarray(pil.filter(ImageFilter.GaussianBlur(1.5))), noisy):
        x, y = a / 255.0, d / 255.0
        assert abs(ev.psnr(unit(x), unit(y)).item() - 10 * np.log10(1 / np.mean((x - y) ** 2))) < 1e-9
        assert abs(ev.ssim(unit(x), unit(y)).item() - ssim_reference(x, y)) < 1e-9
        assert abs(ev.ssim(a, d).item() - ssim_reference(x, y)) < 1e-9           # uint8 input
        assert abs(ev.ssim(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32),
                           value_range=(0, 1)).item() - ssim_reference(x, y)) < 1e-6          # float32 [0, 1]


def test_lpips_zero_for_identical():
    torch.manual_seed(0)
    m = ev.LPIPSMetric(random=True)
    x = torch.rand(2, 32, 40, 3) * 2 - 1
    d = m(x, x)
    assert d.shape == (2,) and d.abs().max() < 1e-6
    assert (m(x, x.flip(1)) > 0).all()


# -----------------------------------------------------------------------------
# distribution metrics


def with_moments(n, mu, cov, seed):
    """n samples whose sample mean is exactly mu and sample covariance (n - 1) exactly cov."""
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.t()))).t()       # sample cov = I
    return torch.as_tensor(mu, dtype=torch.float64) + z @ torch.linalg.cholesky(cov).t()


def closed_form(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); the trace of the root from the eigenvalues of S1 S2."""
    root = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(np.sum((np.asarray(mu1) - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * root)


def test_frechet_identical_sets_is_zero():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    assert abs(ev.frechet_distance(x, x)) < 1e-9
    y = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))        # fewer samples than dims
    assert abs(ev.frechet_distance(y, y)) < 1e-9


def test_frechet_diagonal_closed_form():
    mu1, mu2 = [0.0, 1.0, -2.0], [1.0, 1.0, 0.5]
    d1, d2 = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([9.0, 1.0, 1.0], dtype=torch.float64)
    a, b = with_moments(50, mu1, torch.diag(d1), 0), with_moments(60, mu2, torch.diag(d2), 1)
    # diagonal: sum (mu1 - mu2)^2 + sum (sqrt(d1) - sqrt(d2))^2
    by_hand = (1 + 0 + 6.25) + ((1 - 3) ** 2 + (2 - 1) ** 2 + (0.5 - 1) ** 2)
    assert abs(ev.frechet_distance(a, b) - by_hand) < 1e-9


def test_frechet_commuting_and_general_covariances():
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    s1 = q @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) @ q.t()     # same eigenvectors:
    s2 = q @ torch.diag(torch.tensor([4.0, 1.0, 0.5, 2.0], dtype=torch.float64)) @ q.t()     # S1, S2 commute
    mu1, mu2 = [0.0, 0.5, 1.0, -1.0], [0.2, 0.0, 1.0, 0.0]
    a, b = with_moments(30, mu1, s1, 4), with_moments(25, mu2, s2, 5)
    pairs = [(1, 4), (2, 1), (3, 0.5), (4, 2)]                  # commuting: sum (sqrt(l1) - sqrt(l2))^2
    expect = 0.04 + 0.25 + 0 + 1 + sum((math.sqrt(x) - math.sqrt(y)) ** 2 for x, y in pairs)
    assert abs(ev.frechet_distance(a, b) - expect) < 1e-9
    s3 = torch.tensor([[2.0, 0.3, 0, 0], [0.3, 1.0, 0.2, 0], [0, 0.2, 0.5, 0], [0, 0, 0, 1.5]], dtype=torch.float64)
    c = with_moments(40, mu2, s3, 6)                                              # S1, S3 do not commute
    assert abs(ev.frechet_distance(a, c) - closed_form(mu1, s1.numpy(), mu2, s3.numpy())) < 1e-8


def test_frechet_few_samples_many_dims_and_sampling():
    """N < D takes the nuclear-norm route: same value as the direct formula on the sample moments."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(5, 12, generator=g, dtype=torch.float64)
    b = torch.randn(7, 12, generator=g, dtype=torch.float64) * 2
    expect = closed_form(a.mean(0).numpy(), torch.cov(a.t()).numpy(), b.mean(0).numpy(), torch.cov(b.t()).numpy())
    assert abs(ev.frechet_distance(a, b) - expect) < 1e-6 * expect
    # large samples of N(0, I) and N(1, 4 I) in 3-D: ||1||^2 + 3 (1 - 2)^2 = 6, up to sampling error
    x, y = torch.randn(20000, 3, generator=g), 1 + 2 * torch.randn(20000, 3, generator=g)
    assert abs(ev.frechet_distance(x, y) - 6.0) < 0.15


# -----------------------------------------------------------------------------
# understanding metrics


def test_recall_at_k_constructed():
    # the match of query i (column i) is beaten by exactly r_i other items
    r = [0, 1, 4, 9, 2]
    sim = torch.zeros(5, 12)
    for i, ri in enumerate(r):
        sim[i, i] = 1.0
        others = [j for j in range(12) if j != i][:ri]
        sim[i, others] = 2.0
    rec = ev.recall_at_k(sim, ks=(1, 5, 10))              # 5 queries, 12 items: item i matches query i
    assert rec == {1: 1 / 5, 5: 4 / 5, 10: 1.0}
    assert ev.recall_at_k(torch.eye(4) + 0.1) == {1: 1.0, 5: 1.0, 10: 1.0}
    # media-to-text is the transpose: here media 0 ranks its caption below caption 1
    t2m = torch.tensor([[1.0, 0.0], [2.0, 1.5]])
    assert ev.recall_at_k(t2m, ks=(1,)) == {1: 0.5} and ev.recall_at_k(t2m.t(), ks=(1,)) == {1: 0.5}
    assert ev.recall_at_k(torch.tensor([[1.0, 0.0], [0.5, 1.5]]).t(), ks=(1,)) == {1: 1.0}


def test_zero_shot_accuracy_constructed():
    class_emb = torch.eye(6)
    # sample i's scores over the 6 classes; its label sits at rank 0, 1, 5 and 0
    media = torch.tensor([[9., 1, 2, 3, 4, 5], [5, 9, 1, 2, 3, 4], [9, 8, 7, 6, 5, 1], [0, 0, 0, 9, 0, 0]])
    labels = torch.tensor([0, 0, 5, 3])
    assert ev.zero_shot_accuracy(media, labels, class_emb, k=1) == 0.5
    assert ev.zero_shot_accuracy(media, labels, class_emb, k=2) == 0.75
    assert ev.zero_shot_accuracy(media, labels, class_emb, k=6) == 1.0


def test_class_embeddings_prompt_ensemble():
    table = {'a cat': [1.0, 0.0], 'photo of cat': [0.0, 2.0], 'a dog': [3.0, 0.0], 'photo of dog': [3.0, 0.0]}
    enc = lambda texts: torch.tensor([table[t] for t in texts])
    ce = ev.class_embeddings(enc, ['cat', 'dog'], ['a {}', 'photo of {}'])
    s = math.sqrt(0.5)
    torch.testing.assert_close(ce, torch.tensor([[s, s], [1.0, 0.0]]))


def test_codebook_stats():
    uniform = torch.arange(16).repeat(3)[:, None].repeat(1, 2)                 # [48, 2]
    uniform[:, 1] = 5                                                           # group 1: one code
    st = ev.codebook_stats(uniform, codebook_size=16)
    assert st['usage'] == [1.0, 1 / 16]
    assert abs(st['perplexity'][0] - 16) < 1e-9 and abs(st['perplexity'][1] - 1) < 1e-9
    two = ev.codebook_stats(torch.tensor([[0], [1], [0], [1]]), codebook_size=4096)
    assert abs(two['perplexity'][0] - 2) < 1e-9 and two['usage'][0] == 2 / 4096


# -----------------------------------------------------------------------------
# config flags


def test_parse_overrides_types_and_errors():
    cfg = ev.parse_overrides(ev.EvalConfig(), ['--n_images=3', '--res=32,64', '--random_nets', '--fid=false',
                                               '--latent=fsq', '--out_dir=x'])
    got = (cfg.n_images, cfg.res, cfg.random_nets, cfg.fid, cfg.latent, cfg.out_dir)
    assert got == (3, (32, 64), True, False, 'fsq', 'x')
    with pytest.raises(ValueError, match='bogus'):
        ev.parse_overrides(ev.EvalConfig(), ['--bogus=1'])
    with pytest.raises(ValueError, match='n_images'):
        ev.parse_overrides(ev.EvalConfig(), ['--n_images=many'])
    with pytest.raises(ValueError, match='res'):
        ev.parse_overrides(ev.EvalConfig(), ['--res=32'])
    with pytest.raises(ValueError, match='random_nets'):
        ev.parse_overrides(ev.EvalConfig(), ['--random_nets=maybe'])


# -----------------------------------------------------------------------------
# the command line end to end


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A tiny random tokenizer with FSQ, exported as model.export() writes it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pt'
    torch.save(model.AToken(tiny_config(use_quantizer=True)).init_weights().export(), path)
    return str(path)


def test_cli_builtin_images_videos(tmp_path, exported):
    r = run_cli(tmp_path, f'--checkpoint={exported}', '--n_images=2', '--n_videos=2', '--n_3d=0', '--res=32,48',
                '--frames=4', '--latent=fsq', '--decoder_cache_frames=4', '--max_grids=1')
    out = tmp_path / 'out'
    assert r['counts'] == {'image': {'evaluated': 2, 'skipped': 0}, 'video': {'evaluated': 2, 'skipped': 0}}
    for kind, dist in (('image', 'rfid'), ('video', 'rfvd')):
        m = r['metrics'][kind]
        assert {'psnr', 'ssim', 'lpips', dist, 'code_usage', 'code_ppl', 'zs_top1', 'zs_top5', 't2m_R@1',
                'm2t_R@10', 'bicubic_psnr'} <= set(m)
        assert m['zs_chance_top1'] == 1 / len(data.CLASSES) and 0 <= m['zs_top5'] <= 1
        assert len(r['codebook'][kind]['usage']) == 4
    assert r['grids'] == ['images_000.png', 'videos_000.mp4']
    assert Image.open(out / 'images_000.png').size[0] > 0
    with av.open(str(out / 'videos_000.mp4')) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 4
    loaded = json.loads((out / 'report.json').read_text())
    assert loaded == r                                               # strict JSON, round-trips
    assert {'metrics', 'counts', 'skipped', 'config', 'checkpoint', 'model_config', 'git_commit', 'device',
            'torch', 'wall_s', 'warnings', 'codebook'} <= set(loaded)
    assert loaded['config']['res'] == [32, 48] and loaded['model_config']['decoder_cache_frames'] == 4
    assert loaded['checkpoint']['kind'] == 'export' and any('RANDOM' in w for w in loaded['warnings'])
    md = (out / 'report.md').read_text()
    assert '## Reconstruction' in md and '| image |' in md and 'rfvd' in md and '## Understanding' in md


def test_cli_training_checkpoint_3d_with_gaussian_decoder(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    tok = model.AToken(cfg).init_weights()
    ema = {k: v + 0.01 for k, v in tok.state_dict().items()}
    ck = dict(model=tok.state_dict(), ema=ema, model_config=asdict(cfg), step=3,
              loss_config=asdict(losses.LossConfig(siglip_model='tiny', random_frozen=True)),
              gs_decoder=model.GaussianDecoder(cfg).state_dict())
    torch.save(ck, tmp_path / 'train.pt')
    loaded, info = ev.load_tokenizer(ev.EvalConfig(checkpoint=str(tmp_path / 'train.pt')))
    assert info['weights'] == 'ema' and info['kind'] == 'training'
    assert all(torch.equal(v, ema[k]) for k, v in loaded.state_dict().items())
    r = run_cli(tmp_path, f'--checkpoint={tmp_path / "train.pt"}', '--n_images=0', '--n_videos=0', '--n_3d=2',
                '--views_3d=2', '--view_res_3d=32', '--max_grids=1')
    m = r['metrics']['3d']
    assert r['counts']['3d'] == {'evaluated': 2, 'skipped': 0} and r['grids'] == ['3d_000.png']
    assert {'feat_psnr', 'psnr', 'ssim', 'lpips', 'zs_top1', 't2m_R@1'} <= set(m)
    assert m['zs_chance_top1'] == 1 / 5 and r['checkpoint']['weights'] == 'ema'
    assert r['checkpoint']['gs_decoder'] == 'training checkpoint'
    assert (tmp_path / 'out' / '3d_000.png').exists()


def write_photo(path, size, seed, **save):
    """A photo-like test image: a colour gradient, a few shapes and mild noise."""
    rng = np.random.default_rng(seed)
    W, H = size
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    a = np.stack([x, y, 1 - x * y], -1) * 200 + rng.normal(0, 8, (H, W, 3))
    a[H // 4: H // 2, W // 3: 2 * W // 3] = rng.integers(0, 256, 3)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, **save)


def test_cli_image_folder_with_bad_files(tmp_path, exported):
    folder = tmp_path / 'photos'
    folder.mkdir()
    write_photo(folder / 'a.jpg', (80, 60), 0, quality=90)
    write_photo(folder / 'b.png', (48, 64), 1)
    write_photo(folder / 'c.jpg', (100, 50), 2, quality=75)
    jpg = (folder / 'a.jpg').read_bytes()
    (folder / 'truncated.jpg').write_bytes(jpg[:len(jpg) // 2])        # header fine, decoding fails
    (folder / 'empty.png').write_bytes(b'')                              # fails when scanning
    r = run_cli(tmp_path, f'--checkpoint={exported}', f'--images={folder}', '--res=48,64', '--fid=false')
    assert r['counts'] == {'image': {'evaluated': 3, 'skipped': 2}}
    assert sorted(os.path.basename(s['source']) for s in r['skipped']) == ['empty.png', 'truncated.jpg']
    assert all(s['reason'] for s in r['skipped'])
    m = r['metrics']['image']
    assert math.isfinite(m['psnr']) and 0 < m['ssim'] <= 1 and 'zs_top1' not in m      # no labels, no captions
    md = (tmp_path / 'out' / 'report.md').read_text()
    assert 'truncated.jpg' in md and 'empty.png' in md and '## Skipped inputs' in md


def test_cli_video_and_asset_folders(tmp_path, exported):
    import render3d
    vids = tmp_path / 'videos'
    vids.mkdir()
    for name, n in (('a.mp4', 8), ('b.mp4', 6)):
        with av.open(str(vids / name), 'w') as c:
            s = c.add_stream('mpeg4', rate=8)
            s.width, s.height, s.pix_fmt = 48, 32, 'yuv420p'
            for k in range(n):
                frame = np.full((32, 48, 3), 20 * k, np.uint8)
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    (vids / 'garbage.mp4').write_bytes(b'not a video at all' * 20)
    assets = tmp_path / 'assets'
    mesh, _, caption = render3d.procedural_mesh(3)
    pack = render3d.pack_asset(mesh, n_views=2, resolution=32, patch_size=(4, 8, 8), grid=16)
    render3d.write_prepared(str(assets / 'obj'), pack, dict(caption=caption, patch=[8, 8], voxels=len(pack['coords'])))
    (assets / 'broken').mkdir()
    r = run_cli(tmp_path, f'--checkpoint={exported}', f'--videos={vids}', f'--assets={assets}', '--res=32,48',
                '--frames=8', '--fid=false', '--understanding=false')
    assert r['counts'] == {'video': {'evaluated': 2, 'skipped': 1}, '3d': {'evaluated': 1, 'skipped': 1}}
    assert sorted(os.path.basename(s['source']) for s in r['skipped']) == ['broken', 'garbage.mp4']
    assert math.isfinite(r['metrics']['video']['psnr']) and math.isfinite(r['metrics']['3d']['feat_psnr'])
    assert any('no Gaussian decoder' in w for w in r['warnings'])


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """official_tiny as Apple ships a model: a flat state dict + a YAML with model.model_cfg.arch_cfg."""
    ref = torch.load(OFFICIAL, weights_only=False)
    root = tmp_path_factory.mktemp('official')
    torch.save(ref['state_dict'], root / 'atoken.pt')
    (root / 'atoken.yaml').write_text(yaml.safe_dump(
        {'model': {'class_name': 'x', 'model_cfg': {'arch_cfg': ref['arch_cfg']}}}))
    return root, ref['arch_cfg']


def test_cli_official_checkpoint_fsq_and_gaussian_decoder(tmp_path, official):
    root, _ = official
    gs = torch.load(os.path.join(os.path.dirname(OFFICIAL), 'official_gs_tiny.pt'), weights_only=False)
    torch.save(gs['state_dict'], tmp_path / 'gs.pt')
    (tmp_path / 'gs.yaml').write_text(yaml.safe_dump({'model': {'class_name': 'x', **gs['config']}}))
    r = run_cli(tmp_path, f'--checkpoint={root / "atoken.pt"}', f'--config={root / "atoken.yaml"}', '--latent=fsq',
                f'--gs_checkpoint={tmp_path / "gs.pt"}', f'--gs_config={tmp_path / "gs.yaml"}', '--n_images=2',
                '--n_videos=0', '--n_3d=1', '--views_3d=2', '--view_res_3d=32', '--res=32,64', '--fid=false')
    m = r['metrics']['image']
    assert r['checkpoint']['kind'] == 'official' and r['counts']['image']['evaluated'] == 2
    assert len(r['codebook']['image']['usage']) == 8 and 0 < m['code_usage'] <= 1
    assert {'zs_top1', 'zs_top5', 't2m_R@1', 'm2t_R@5'} <= set(m)           # 72-wide random text tower
    assert r['model_config']['encoder_width'] == 72 and r['model_config']['patch_size'] == [4, 16, 16]
    assert {'psnr', 'ssim', 'lpips', 'feat_psnr'} <= set(r['metrics']['3d']) and '3d_000.png' in r['grids']


def test_errors(tmp_path, official):
    root, arch = official
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        ev.main([f'--checkpoint={tmp_path / "nope.pt"}', f'--out_dir={tmp_path}'])
    torch.save(model.AToken(tiny_config()).init_weights().export(), tmp_path / 'cont.pt')
    with pytest.raises(ValueError, match='quantizer'):
        ev.main([f'--checkpoint={tmp_path / "cont.pt"}', '--latent=fsq', f'--out_dir={tmp_path}'])
    with pytest.raises(ValueError, match='--bogus'):
        ev.main([f'--checkpoint={tmp_path / "cont.pt"}', '--bogus=1'])
    (tmp_path / 'wide.yaml').write_text(yaml.safe_dump(
        {'model': {'model_cfg': {'arch_cfg': {**arch, 'encoder_model_channels': 96}}}}))
    with pytest.raises(ValueError, match='encoder.input_layer.weight'):          # names the mismatched keys
        ev.main([f'--checkpoint={root / "atoken.pt"}', f'--config={tmp_path / "wide.yaml"}', f'--out_dir={tmp_path}'])
    ours = model.AToken(tiny_config()).init_weights().export()
    ours['model_config']['encoder_width'] = 48                                 # config and weights disagree
    torch.save(ours, tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match='encoder.input_layer.weight'):
        ev.main([f'--checkpoint={tmp_path / "bad.pt"}', f'--out_dir={tmp_path}'])
    with pytest.raises(ValueError, match='needs --config'):
        ev.main([f'--checkpoint={root / "atoken.pt"}', f'--out_dir={tmp_path}'])


def test_evaluate_in_memory_restores_model_state(tmp_path):
    tok = model.AToken(tiny_config()).init_weights().train()
    cfg = ev.EvalConfig(n_images=1, n_videos=1, n_3d=0, res=(32, 32), frames=8, random_nets=True, fid=False,
                        decoder_cache_frames=4, out_dir=str(tmp_path), max_grids=0)
    res = ev.evaluate(tok, cfg)
    assert tok.training and tok.config.decoder_cache_frames == 0
    assert set(res['metrics']) == {'image', 'video'} and res['grids'] == []
    assert any('no text tower' in w for w in res['warnings'])


class FakeText:
    """A text tower that embeds a string as the one-hot of the first class word it contains (else zeros)."""
    words = ['circle', 'star', 'cube']

    def encode_text(self, texts):
        return torch.stack([sum(torch.eye(3)[i] for i, w in enumerate(self.words) if w in t) + torch.zeros(3)
                            for t in texts])


def test_understanding_metrics_with_a_known_text_tower():
    emb = torch.tensor([[1.0, 0.1, 0], [0, 1, 0], [0.2, 0, 1], [0, 1, 0.3]])
    labels, names = [0, 1, 2, 0], ['red circle', 'orange star', 'blue cube']
    captions = ['a red circle', 'an orange star', '', 'a red circle on a background']
    m, notes = ev.understanding_metrics(emb, labels, captions, names, ev.TEMPLATES['image'], FakeText())
    assert m['zs_top1'] == 0.75 and m['zs_top5'] == 1.0 and m['zs_chance_top1'] == 1 / 3
    # captions of samples 0, 1, 3 (sample 2 has none): 0 -> circle, 1 -> star, 3 -> circle (ties count for it)
    assert m['t2m_R@1'] == 2 / 3 and m['m2t_R@1'] == 2 / 3 and m['t2m_R@5'] == 1.0 and not notes
    m, notes = ev.understanding_metrics(torch.ones(2, 5), [0, 1], ['a', 'b'], names, ['{}'], FakeText())
    assert m == {} and 'width 5 != text tower width 3' in notes[0]


def test_inception_sees_minus_one_to_one():
    """torchvision's Inception-v3 ImageNet weights expect (x - 0.5) / 0.5 (its transform_input), i.e. our range."""
    f = ev.FeatureExtractor('inception', random=True)
    f.net = lambda x: x.mean((2, 3))                                  # what the network would be fed
    out = f(torch.full((1, 40, 30, 3), 0.25))
    torch.testing.assert_close(out, torch.full((1, 3), 0.25))


def test_unavailable_metric_weights_are_skipped_with_a_note(tmp_path, exported):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r = ev.main([f'--checkpoint={exported}', f'--lpips_weights={tmp_path / "no_alexnet.pth"}', '--n_images=1',
                     '--n_videos=0', '--n_3d=0', '--res=32,32', '--understanding=false', f'--out_dir={tmp_path}'])
    assert set(r['metrics']['image']) == {'psnr', 'ssim', 'bicubic_psnr', 'code_usage', 'code_ppl'}
    assert any(w.startswith('LPIPS skipped') and 'no_alexnet.pth' in w for w in r['warnings'])
