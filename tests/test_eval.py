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


def test_flags_types_and_errors():
    """eval.py reads its flags with the repo's one mechanism (configurator.apply_flags), with the same syntax."""
    import configurator
    cfg = configurator.apply_flags(ev.EvalConfig(), ['--n_images=3', '--res=32,64', '--random_nets', '--fid=false',
                                                     '--latent=fsq', '--out_dir=x'])
    got = (cfg.n_images, cfg.res, cfg.random_nets, cfg.fid, cfg.latent, cfg.out_dir)
    assert got == (3, (32, 64), True, False, 'fsq', 'x')
    assert ev.config_from_argv(['--res=(16, 48)', '--fid=0']).res == (16, 48)
    with pytest.raises(ValueError, match='bogus'):
        configurator.apply_flags(ev.EvalConfig(), ['--bogus=1'])
    with pytest.raises(ValueError, match='n_images'):
        configurator.apply_flags(ev.EvalConfig(), ['--n_images=many'])
    with pytest.raises(ValueError, match='res'):
        configurator.apply_flags(ev.EvalConfig(), ['--res=32'])
    with pytest.raises(ValueError, match='random_nets'):
        configurator.apply_flags(ev.EvalConfig(), ['--random_nets=maybe'])
    with pytest.raises(ValueError, match='out_dir needs a value'):
        configurator.apply_flags(ev.EvalConfig(), ['--out_dir'])


# -----------------------------------------------------------------------------
# the command line end to end


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A tiny random tokenizer with FSQ, exported as model.export() writes it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pt'
    torch.save(model.AToken(tiny_config(use_quantizer=True)).init_weights().export(), path)
    return str(path)


def test_cli_builtin_images_videos(tmp_path, exported, inception_weights, i3d_stand_in):
    r = run_cli(tmp_path, f'--checkpoint={exported}', '--n_images=2', '--n_videos=2', '--n_3d=0', '--res=32,48',
                '--frames=4', '--latent=fsq', '--decoder_cache_frames=4', '--max_grids=1',
                f'--fid_weights={inception_weights}', f'--fvd_weights={i3d_stand_in}')
    out = tmp_path / 'out'
    assert r['counts'] == {'image': {'evaluated': 2, 'skipped': 0}, 'video': {'evaluated': 2, 'skipped': 0}}
    assert 'rfid' in r['metrics']['image'] and 'rfvd' not in r['metrics']['video']     # 4-frame clips: no I3D clip
    assert any('shorter than 16 frames' in w for w in r['warnings'])
    for kind in ('image', 'video'):
        m = r['metrics'][kind]
        assert {'psnr', 'ssim', 'lpips', 'code_usage', 'code_ppl', 'zs_top1', 'zs_top5', 't2m_R@1',
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
    assert '## Reconstruction' in md and '| image |' in md and 'rfid' in md and '## Understanding' in md


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
                '--views_3d=2', '--view_res_3d=32', '--max_grids=1', '--turntable=3')
    m = r['metrics']['3d']
    assert r['counts']['3d'] == {'evaluated': 2, 'skipped': 0}
    assert r['grids'] == ['3d_000.png', '3d_000_turntable.mp4']         # one shown sample, its turntable
    import av
    with av.open(str(tmp_path / 'out' / '3d_000_turntable.mp4')) as f:
        frames = [fr.to_ndarray(format='rgb24') for fr in f.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (32, 32, 3)
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


def test_understanding_with_a_known_text_tower():
    emb = torch.tensor([[1.0, 0.1, 0], [0, 1, 0], [0.2, 0, 1], [0, 1, 0.3]])
    labels, names = [0, 1, 2, 0], ['red circle', 'orange star', 'blue cube']
    ce = ev.zero_shot_classifier(FakeText(), [ev.with_article(n) for n in names], ev.TEMPLATES['image'])
    torch.testing.assert_close(ce, torch.eye(3))
    zs, per_class = ev.zero_shot_scores(ev.zero_shot_predict(emb, ce), labels, names)
    assert zs['zs_top1'] == 0.75 and zs['zs_top5'] == 1.0 and zs['zs_chance_top1'] == 1 / 3
    assert per_class == {'red circle': 0.5, 'orange star': 1.0, 'blue cube': 1.0}
    # captions of samples 0, 1, 3: 0 -> circle, 1 -> star, 3 -> circle (ties count for it)
    m = ev.retrieval_metrics(emb[[0, 1, 3]], [['a red circle'], ['an orange star'], ['a red circle on a background']],
                             FakeText())
    assert m['t2m_R@1'] == 2 / 3 and m['m2t_R@1'] == 2 / 3 and m['t2m_R@5'] == 1.0



def test_unavailable_metric_weights_are_skipped_with_a_note(tmp_path, exported):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r = ev.main([f'--checkpoint={exported}', f'--lpips_weights={tmp_path / "no_alexnet.pth"}', '--n_images=1',
                     '--n_videos=0', '--n_3d=0', '--res=32,32', '--understanding=false', f'--out_dir={tmp_path}'])
    assert set(r['metrics']['image']) == {'psnr', 'ssim', 'bicubic_psnr', 'code_usage', 'code_ppl'}
    assert any(w.startswith('LPIPS skipped') and 'no_alexnet.pth' in w for w in r['warnings'])


# -----------------------------------------------------------------------------
# rFID / rFVD networks (random weights saved to files: no network), protocols, streaming


def random_inception(path, live_64=None):
    """torch-fidelity's TF-Inception with random weights, saved as the state-dict file --fid_weights takes.
    Convolutions get He-normal weights so features stay O(1) through the ~90 layers. live_64: keep only the
    first live_64 channels of the '64' pool alive (the others exactly 0), so that its 64 x 64 covariances of
    a few images are full rank on the live block and every FID implementation is exact there."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Blank(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):    # keep the random initialisation
            return None

    torch.save({}, str(path) + '.empty')
    torch.manual_seed(0)
    net = Blank('inception-v3-compat', ['2048'], feature_extractor_weights_path=str(path) + '.empty')
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
    if live_64:
        with torch.no_grad():
            net.Conv2d_2b_3x3.bn.weight[live_64:] = 0
            net.Conv2d_2b_3x3.bn.bias[live_64:] = 0
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope='module')
def inception_weights(tmp_path_factory):
    return random_inception(tmp_path_factory.mktemp('fid') / 'inception.pth')


class StandInI3D(torch.nn.Module):
    """A stand-in for StyleGAN-V's i3d_torchscript.pt with its calling convention: x [B, 3, T, H, W] in uint8
    levels; rescale maps them to [-1, 1], resize would go to 224 x 224 (here: 8 x 8, cheap); features [B, 6]:
    channel means and standard deviations."""
    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if not (rescale and resize and return_features):
            raise ValueError('called with the wrong flags')
        x = x / 127.5 - 1
        B, C, T = x.shape[0], x.shape[1], x.shape[2]
        x = torch.nn.functional.interpolate(x.reshape(B, C * T, x.shape[3], x.shape[4]), size=(8, 8),
                                            mode='bilinear', align_corners=False).reshape(B, C, T, 8, 8)
        return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)


@pytest.fixture(scope='module')
def i3d_stand_in(tmp_path_factory):
    path = tmp_path_factory.mktemp('fvd') / 'i3d_torchscript.pt'
    torch.jit.save(torch.jit.script(StandInI3D()), str(path))
    return str(path)


def test_fid_equals_torch_fidelity_on_two_folders(tmp_path):
    """Our rFID path (files -> [-1, 1] -> uint8 -> TF-Inception -> streaming statistics -> Frechet distance)
    equals torch-fidelity's own calculate_metrics on the same folders and the same weights file. Layer '64'
    (the first pool) keeps it fast; the network, resize and formula are those of layer '2048'."""
    import torch_fidelity
    w = random_inception(tmp_path / 'w.pth', live_64=3)
    rng = np.random.default_rng(0)
    sets = {}
    for d, n, lo in (('a', 6, 0), ('b', 5, 100)):                               # b: brighter on average
        (tmp_path / d).mkdir()
        sets[d] = [rng.integers(lo, 256, (37, 53, 3), dtype=np.uint8) for _ in range(n)]
        sets[d][0][:10] = 255                                                     # some structure
        for i, a in enumerate(sets[d]):
            Image.fromarray(a).save(tmp_path / d / f'{i}.png')
    lib = torch_fidelity.calculate_metrics(input1=str(tmp_path / 'a'), input2=str(tmp_path / 'b'), fid=True,
                                           feature_layer_fid='64', feature_extractor_weights_path=w, cuda=False,
                                           cache=False, verbose=False, save_cpu_ram=True, batch_size=4)
    net = ev.InceptionFID(w, layer='64')
    stats = {}
    for d in ('a', 'b'):
        stats[d] = ev.FrechetStats()
        for f in sorted((tmp_path / d).iterdir()):
            x = model.from_uint8(torch.from_numpy(np.array(Image.open(f))))  # what the loaders give
            stats[d].add(net(x[None]))
    ours = ev.frechet_of_stats(stats['a'], stats['b'])
    assert ours > 0.1 and abs(ours - lib['frechet_inception_distance']) <= 1e-6 * ours


def test_inception_fid_default_is_the_2048_pool(inception_weights):
    f = ev.InceptionFID(inception_weights)(torch.rand(1, 40, 30, 3) * 2 - 1)
    assert f.shape == (1, 2048) and f.dtype == torch.float64 and f.abs().sum() > 0


def test_frechet_stats_streaming_equals_direct():
    """Past D rows the statistics fold into running sums (bounded memory): same distance as from all rows."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 4, generator=g, dtype=torch.float64), 2 + torch.randn(25, 4, generator=g, dtype=torch.float64)
    sa, sb = ev.FrechetStats(), ev.FrechetStats()
    for k in range(0, 30, 7):
        sa.add(a[k:k + 7])
    sb.add(b[:3]), sb.add(b[3:])
    assert sa.sum is not None and sa.count() == 30 and len(sa.rows) == 0
    few = ev.FrechetStats()
    few.add(a[:3])
    assert few.sum is None                                                       # still rows: 3 <= D = 4
    expect = ev.frechet_distance(a, b)
    assert abs(ev.frechet_of_stats(sa, sb) - expect) < 1e-9 * expect
    resumed = ev.FrechetStats().load(torch.load(io.BytesIO(_saved(sa.state())), weights_only=False))
    assert abs(ev.frechet_of_stats(resumed, sb) - expect) < 1e-9 * expect


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_fvd_with_a_stand_in_torchscript_vs_scipy(i3d_stand_in):
    """rFVD: 16-frame clips, uint8 levels, the StyleGAN-V call; Frechet distance as scipy's sqrtm formula."""
    from scipy import linalg
    net = ev.I3DFVD(i3d_stand_in)
    g = torch.Generator().manual_seed(1)
    real = [torch.rand(33, 12, 10, 3, generator=g) * 2 - 1 for _ in range(5)]    # 2 clips each, 1 frame left over
    fake = [(v + 0.3 * torch.randn(v.shape, generator=g)).clamp(-1, 1) for v in real]
    sr, sf = ev.FrechetStats(), ev.FrechetStats()
    for r, f in zip(real, fake):
        sr.add(net(r)), sf.add(net(f))
    assert sr.count() == 10
    feats = lambda vs: torch.cat([StandInI3D()(model.to_uint8(v[:32]).float().reshape(2, 16, 12, 10, 3)
                                               .permute(0, 4, 1, 2, 3), True, True, True) for v in vs]).double().numpy()
    a, b = feats(real), feats(fake)
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expect = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    assert abs(ev.frechet_of_stats(sr, sf) - expect) < 1e-6 * expect
    assert len(net(real[0][:15])) == 0                                           # shorter than 16 frames: no clip


def test_missing_weight_files_name_their_flag(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match='--fid_weights'):
        ev.InceptionFID(str(tmp_path / 'nope.pth'))
    with pytest.raises(FileNotFoundError, match='--fvd_weights'):
        ev.I3DFVD(str(tmp_path / 'nope.pt'))
    (tmp_path / 'junk.pt').write_bytes(b'not torchscript')
    with pytest.raises(ValueError, match='--fvd_weights'):
        ev.I3DFVD(str(tmp_path / 'junk.pt'))
    with pytest.raises(ValueError, match='--images'):
        ev.main([f'--checkpoint={exported}', '--protocol=imagenet256'])
    with pytest.raises(ValueError, match='--captions'):
        ev.main([f'--checkpoint={exported}', '--protocol=msrvtt', f'--videos={tmp_path}'])
    with pytest.raises(ValueError, match='imagenet256'):
        ev.main([f'--checkpoint={exported}', '--protocol=imagenet', f'--images={tmp_path}'])


def test_resize_center_crop_equals_torchvision():
    import torchvision.transforms as T
    rng = np.random.default_rng(3)
    tv = T.Compose([T.Resize(256), T.CenterCrop(256)])
    for w, h in ((301, 257), (257, 383), (199, 141), (513, 255)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = ev.resize_center_crop(im, 256)
        assert ours.size == (256, 256)
        assert np.array_equal(np.asarray(ours), np.asarray(tv(im)))


def test_protocol_sets_its_settings_and_flags_win(tmp_path):
    cfg = ev.config_from_argv(['--protocol=imagenet256', f'--images={tmp_path}'])
    assert (cfg.resize_crop, cfg.templates, cfg.fid) == (256, 'imagenet', True)
    cfg = ev.config_from_argv(['--protocol=tokenbench720', f'--videos={tmp_path}', '--decoder_cache_frames=0'])
    assert cfg.native and cfg.frames == 0 and cfg.decoder_cache_frames == 0
    assert set(ev.PROTOCOLS) == {'imagenet256', 'coco256', 'tokenbench720', 'davis1080', 'msrvtt', 'msvd', 'toys4k'}


def test_zero_shot_folder_per_class_by_hand(tmp_path):
    """3 class folders (2, 3 and 1 images); predictions chosen by hand: per-class top-1 1/2, 2/3, 1/1."""
    for cls, n in (('apple_tree', 2), ('bus', 3), ('cat', 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            write_photo(tmp_path / cls / f'{i}.png', (40, 30), i)
    ds = ev.ProtocolImages(str(tmp_path), 32, (4, 8, 8))
    assert ds.classes == ['apple tree', 'bus', 'cat'] and len(ds) == 6
    labels = [ds[i].label for i in range(6)]
    assert labels == [0, 0, 1, 1, 1, 2] and ds[0].media.shape == (32, 32, 3)
    class_emb = torch.eye(3)
    emb = torch.tensor([[1., 0, 0], [0, 1, 0],                 # apple: right, wrong
                        [0, 1, 0], [0, .9, 1], [.2, 1, 0],     # bus: right, wrong, right
                        [0, 0, 1]])                            # cat: right
    zs, per_class = ev.zero_shot_scores(ev.zero_shot_predict(emb, class_emb), labels, ds.classes)
    assert per_class == {'apple tree': 0.5, 'bus': 2 / 3, 'cat': 1.0}
    assert zs['zs_top1'] == 4 / 6 and abs(zs['zs_mean_class_top1'] - (0.5 + 2 / 3 + 1) / 3) < 1e-12
    assert zs['zs_top5'] == 1.0                                 # 3 classes: every label in the top 3


def test_recall_at_k_by_hand_4x4():
    sim = torch.tensor([[0.9, 0.1, 0.3, 0.2],      # query 0: its item ranks 1st
                        [0.8, 0.5, 0.6, 0.1],      # query 1: 3rd (0.8, 0.6 beat 0.5)
                        [0.1, 0.2, 0.3, 0.4],      # query 2: 2nd
                        [0.5, 0.6, 0.7, 0.1]])     # query 3: 4th
    assert ev.recall_at_k(sim, ks=(1, 2, 3, 4)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    # several right items (MSVD: many captions per video): the best one counts
    match = torch.eye(4, dtype=torch.bool)
    match[3, 2] = True
    assert ev.recall_at_k(sim, ks=(1,), match=match) == {1: 0.5}


def test_frame_averaging():
    assert ev.frame_indices(100, 12) == [int(x) for x in np.linspace(0, 99, 12)]
    assert ev.frame_indices(5, 12) == [0, 1, 2, 3, 4]
    f = torch.tensor([[3.0, 0.0], [0.0, 0.5]])           # normalised: (1, 0) and (0, 1) -> mean (0.5, 0.5)
    torch.testing.assert_close(ev.average_frame_embeddings(f), torch.tensor([1.0, 1.0]) / math.sqrt(2))


def write_video(path, frames, size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    with av.open(str(path), 'w') as c:
        s = c.add_stream('mpeg4', rate=8)
        s.width, s.height, s.pix_fmt = size[0], size[1], 'yuv420p'
        for k in range(frames):
            frame = np.clip(rng.normal(128, 40, (size[1], size[0], 3)) + 5 * k, 0, 255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_cli_video_protocols_native_fvd_and_retrieval(tmp_path, exported, i3d_stand_in):
    vids = tmp_path / 'videos'
    vids.mkdir()
    for i, n in enumerate((16, 20, 17)):
        write_video(vids / f'{i}.mp4', n, seed=i)
    r = run_cli(tmp_path, f'--checkpoint={exported}', '--protocol=davis1080', f'--videos={vids}',
                f'--fvd_weights={i3d_stand_in}', '--max_grids=1')
    m = r['metrics']['video']
    assert r['counts']['video'] == {'evaluated': 3, 'skipped': 0} and r['protocol']['name'] == 'davis1080'
    assert {'psnr', 'ssim', 'lpips', 'rfvd'} <= set(m) and math.isfinite(m['rfvd'])
    assert r['config']['native'] and r['model_config']['decoder_cache_frames'] == 4
    (tmp_path / 'caps.json').write_text(json.dumps({'0.mp4': 'a grey clip', '1.mp4': ['noise', 'more noise'],
                                                    '2.mp4': 'brighter'}))
    r = run_cli(tmp_path, f'--checkpoint={exported}', '--protocol=msvd', f'--videos={vids}',
                f'--captions={tmp_path / "caps.json"}', '--resize_crop=32', '--retrieval_frames=3')
    m = r['metrics']['video']
    assert {'t2m_R@1', 't2m_R@10', 'm2t_R@1'} <= set(m) and m['t2m_R@10'] == 1.0 and 'psnr' not in m
    assert r['counts']['video']['evaluated'] == 3


def test_cli_imagenet_protocol_on_class_folders(tmp_path, exported, inception_weights):
    root = tmp_path / 'val'
    for cls in ('n01', 'n02', 'n03'):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            write_photo(root / cls / f'{i}.jpg', (70, 50), i + 10 * len(cls), quality=90)
    r = run_cli(tmp_path, f'--checkpoint={exported}', '--protocol=imagenet256', f'--images={root}',
                '--resize_crop=32', f'--fid_weights={inception_weights}', '--max_grids=0')
    m = r['metrics']['image']
    assert {'psnr', 'ssim', 'rfid', 'zs_top1', 'zs_top5', 'zs_mean_class_top1'} <= set(m)
    assert set(r['per_class']['image']) == {'n01', 'n02', 'n03'} and m['zs_chance_top1'] == 1 / 3
    assert r['protocol']['paper']['So/C']['rfid'] == 0.209


def test_interrupted_run_resumes_to_the_same_result(tmp_path, exported, monkeypatch):
    flags = [f'--checkpoint={exported}', '--n_images=4', '--n_videos=0', '--n_3d=0', '--res=32,48', '--fid=false',
             '--batch_tokens=1', '--save_every=1', '--max_grids=0']
    whole = run_cli(tmp_path / 'a', *flags)
    calls, real = [], ev.run_batch

    def crash_on_third(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(ev, 'run_batch', crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_cli(tmp_path / 'b', *flags)
    part = torch.load(tmp_path / 'b' / 'out' / 'partial_image.pt', weights_only=False)
    assert part['next'] == 2
    monkeypatch.setattr(ev, 'run_batch', real)
    resumed = run_cli(tmp_path / 'b', *flags)
    assert resumed['metrics'] == whole['metrics'] and resumed['counts'] == whole['counts']
    assert not (tmp_path / 'b' / 'out' / 'partial_image.pt').exists()


def test_zero_shot_per_attribute_by_hand():
    """Class names of two words (colour, shape): each attribute scored on its own, chance 1 / its values."""
    names = ['red circle', 'blue circle', 'red square', 'blue square', 'green star']
    labels = [0, 1, 2, 3, 4, 0]
    top1 = [2, 1, 0, 4, 4, 1]        # colour right: 1,1,1,0,1,0 -> 4/6; shape right: 0,1,0,0,1,1 -> 3/6
    topk = torch.tensor([[p, (p + 1) % 5] for p in top1])
    out, _ = ev.zero_shot_scores(topk, labels, names, {'colour': 0, 'shape': 1})
    assert out['zs_top1'] == pytest.approx(2 / 6)
    assert out['zs_colour_top1'] == pytest.approx(4 / 6) and out['zs_shape_top1'] == pytest.approx(3 / 6)
    assert out['zs_chance_colour'] == pytest.approx(1 / 3) and out['zs_chance_shape'] == pytest.approx(1 / 3)
    assert 'zs_colour_top1' not in ev.zero_shot_scores(topk, labels, names)[0]


def test_side_by_side_enlarges_small_pictures():
    """Tiles smaller than 256 px are enlarged by an integer factor (nearest): the longer side reaches 256, every
    source pixel becomes an s x s block; large pictures stay as they are."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(32, 48, 3, generator=g) * 2 - 1, torch.rand(32, 48, 3, generator=g) * 2 - 1
    out = ev.side_by_side(a, b)
    s = 6                                                    # ceil(256 / 48)
    assert out.shape == (32 * s, 3 * 48 * s + 8, 3) and out.dtype == torch.uint8
    left = out[:, :48 * s].reshape(32, s, 48, s, 3)
    assert (left == left[:, :1, :, :1]).all()                # constant s x s blocks
    assert torch.equal(left[:, 0, :, 0], ev.to_uint8_truncated(a))     # ... of the original's pixels
    big = torch.zeros(300, 200, 3)
    assert ev.side_by_side(big, big).shape == (300, 608, 3)


def test_report_pictures_truncate_where_metrics_round():
    """The report's uint8 truncates as the official savers do; model.to_uint8 (the metrics') rounds."""
    x = torch.tensor([-1.0, 0.999, 1.0, 2.0])                # 0.999 -> 254.87
    assert ev.to_uint8_truncated(x).tolist() == [0, 254, 255, 255]
    assert model.to_uint8(x).tolist() == [0, 255, 255, 255]


def test_learning_curves_png(tmp_path):
    """run_dir/eval_<step>/report.json -> curves.png: a point per evaluation at its step and value (image PSNR
    20 at the first step lands at the plot's left edge, 0.5/11 of the height above the bottom), None without
    two evaluations."""
    from PIL import Image
    assert ev.learning_curves(str(tmp_path), {}) is None
    for step, psnr in ((100, 20.0), (300, 30.0)):
        os.makedirs(tmp_path / f'eval_{step}')
        (tmp_path / f'eval_{step}' / 'report.json').write_text(json.dumps(
            {'metrics': {'image': {'psnr': psnr, 'zs_top1': 0.1, 'zs_shape_top1': 0.3}}}))
    path = ev.learning_curves(str(tmp_path), {'psnr image': 25.0, 'zs image shape': 1 / 6})
    img = Image.open(path).convert('RGB')
    assert img.size == (1040, 360 + 16 * 4 + 8)                              # 2 panels, legend rows below
    assert img.getpixel((48 + 10, 360 + 8)) == (31, 119, 180)               # the legend's first line: image
    # PSNR panel: y range 19.5..30.5 over pixels 312..48; x = 48 at step 100
    assert img.getpixel((48, 300)) == (31, 119, 180)
    assert img.getpixel((48 + 424, 48 + 12)) == (31, 119, 180)              # 30 dB at step 300
