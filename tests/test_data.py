"""Tests for data.py: the built-in data, real image/video files written here with PIL and PyAV, bad input,
resolution/clip sampling and token-budget packing (ranks, workers). CPU, no network, ~15 s."""
import json
import os
import warnings

import av
import numpy as np
import pytest
import torch
from PIL import Image

import data
import model

PS = (4, 8, 8)   # tiny patch size (pt, ph, pw)


def level(k):
    """Grey level of frame k in the test videos, so that decoded frames tell their index."""
    return 8 + 6 * k


def write_video(path, codec, n, fps=10, hw=(48, 64)):
    with av.open(str(path), 'w') as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = hw[1], hw[0], 'yuv420p'
        for k in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((*hw, 3), level(k), np.uint8), format='rgb24')
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def frame_indices(video):
    """(T, H, W, 3) in [-1, 1] from write_video -> the frame index each frame shows."""
    grey = (video.mean(dim=(1, 2, 3)) + 1) * 127.5
    idx = (grey - level(0)) / (level(1) - level(0))
    assert (idx - idx.round()).abs().max() < 0.35, idx          # codecs keep flat grey within ~2 levels
    return idx.round().long().tolist()


def index_of(ds, name):
    """Index of the file called `name` in a folder dataset."""
    return [os.path.basename(ds.source(i)) for i in range(len(ds))].index(name)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('media')
    img = root / 'images'
    (img / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {'a.png': rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
              'b.jpg': rng.integers(0, 256, (30, 50, 3), dtype=np.uint8),
              'sub/c.bmp': rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)}
    for name, a in arrays.items():
        Image.fromarray(a).save(img / name)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img / 'big.jpg', quality=95)
    jpg = (img / 'big.jpg').read_bytes()
    (img / 'truncated.jpg').write_bytes(jpg[:len(jpg) // 2])      # header fine, decoding fails
    (img / 'empty.png').write_bytes(b'')
    (img / 'text.png').write_text('not an image')
    (img / 'notes.txt').write_text('ignored: not an image extension')
    (img / 'big.jpg').unlink()
    with open(img / 'manifest.jsonl', 'w') as f:
        for row in [dict(file='a.png', caption='a cat', label='cat'),
                    dict(file='b.jpg', caption='a dog', label='dog'),
                    dict(file='sub/c.bmp', label='cat'), dict(file='missing.png', caption='gone')]:
            f.write(json.dumps(row) + '\n')
    (img / 'manifest.csv').write_text('file,caption,label\na.png,a cat,cat\nmissing.png,gone,dog\n')

    vid = root / 'videos'
    vid.mkdir()
    write_video(vid / 'a.mp4', 'libx264', 40)
    write_video(vid / 'b.webm', 'libvpx-vp9', 24)                 # webm/mkv store no frame count
    write_video(vid / 'c.mkv', 'libx264', 20, hw=(32, 48))
    write_video(vid / 'd.mov', 'libx264', 16)
    bad = root / 'bad_videos'
    bad.mkdir()
    (bad / 'garbage.mp4').write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (bad / 'empty.mov').write_bytes(b'')
    mkv = (vid / 'c.mkv').read_bytes()
    cluster = mkv.index(b'\x1f\x43\xb6\x75')                      # header intact, no frame data
    (bad / 'noframes.mkv').write_bytes(mkv[:cluster + 8])
    write_video(bad / 'ok.mp4', 'libx264', 12)
    return dict(root=root, images=img, videos=vid, bad=bad, arrays=arrays)


# -----------------------------------------------------------------------------
# built-in data


def test_synthetic_deterministic():
    for cls in (data.SyntheticImages, data.SyntheticVideos):
        a, b = cls(6, seed=3, res=(32, 64), patch_size=PS), cls(6, seed=3, res=(32, 64), patch_size=PS)
        for key in [0, 5, (2, 0), (2, 7)]:
            x, y = a[key], b[key]
            assert torch.equal(x.media, y.media)
            assert (x.caption, x.label, x.source) == (y.caption, y.label, y.source)
        other = cls(6, seed=4, res=(32, 64), patch_size=PS)
        assert not any(a[i].media.shape == other[i].media.shape and torch.equal(a[i].media, other[i].media)
                       for i in range(6))
        # a new epoch draws a new size, not a new scene: the class and caption stay
        assert (a[(1, 0)].caption, a[(1, 0)].label) == (a[(1, 9)].caption, a[(1, 9)].label)


def test_synthetic_splits_disjoint():
    train = data.SyntheticImages(40, 'train', res=(32, 32), patch_size=PS)
    val = data.SyntheticImages(40, 'val', res=(32, 32), patch_size=PS)
    tr = [train[i] for i in range(40)]
    va = [val[i] for i in range(40)]
    assert not {s.source for s in tr} & {s.source for s in va}
    assert not any(a.media.shape == b.media.shape and torch.equal(a.media, b.media) for a in tr for b in va)
    assert len({s.label for s in tr + va}) > 15                     # classes vary (48 in all)


def test_synthetic_samples():
    images = data.SyntheticImages(20, res=(32, 64), patch_size=PS)
    videos = data.SyntheticVideos(8, res=(32, 48), patch_size=PS, frames=12)
    for ds, kind in [(images, 'image'), (videos, 'video')]:
        for i in range(len(ds)):
            s = ds[(i, 1)]
            assert s.kind == kind and s.media.dtype == torch.float32
            assert s.media.dim() == (3 if kind == 'image' else 4)
            assert -1 <= s.media.min() and s.media.max() <= 1 and s.media.std() > 0.05
            H, W = s.media.shape[-3:-1]
            assert H % 8 == 0 and W % 8 == 0 and ds.res[0] <= max(H, W) <= ds.res[1]
            if kind == 'video':
                assert s.media.shape[0] % 4 == 0 and 4 <= s.media.shape[0] <= 12
                assert not torch.equal(s.media[0], s.media[-1])       # something moves
            assert data.CLASSES[s.label] == s.class_name and s.class_name in s.caption
            packed = model.pack([s.media], PS)
            assert packed.seqlens == [ds.num_tokens((i, 1))]          # token count known without rendering


def counting_render(monkeypatch):
    """Replace data.render_scene by a wrapper that records the (H, W, frames) of each call."""
    calls, real = [], data.render_scene

    def counted(scene, H, W, t):
        calls.append((H, W, len(t)))
        return real(scene, H, W, t)
    monkeypatch.setattr(data, 'render_scene', counted)
    return calls


def native_render(ds, i, video):
    """The native-size render of sample i, computed here from the documented streams, as float on the uint8
    grid, (T, H, W, 3), with its caption."""
    rng = np.random.default_rng([ds.seed, data.CONTENT, data.SPLITS[ds.split], i, 0])
    aspect = np.exp(rng.uniform(-np.log(2), np.log(2)))
    long = ds.res[1]
    H, W = (long, max(1, round(long / aspect))) if aspect > 1 else (max(1, round(long * aspect)), long)
    scene = data.random_scene(rng, video)
    t = torch.arange(ds._length(i), dtype=torch.float32) if video else torch.zeros(1)
    x = data.render_scene(scene, H, W, t)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u8.float() / 127.5 - 1, data.scene_caption(rng, scene)


def on_uint8_grid(x):
    k = (x + 1) * 127.5
    return (k - k.round()).abs().max() < 1e-4 and torch.equal(k.round().to(torch.uint8).float() / 127.5 - 1, x)


@pytest.mark.parametrize('video', [False, True])
def test_synthetic_renders_once_then_resizes(monkeypatch, video):
    ds = (data.SyntheticVideos(6, res=(32, 48), patch_size=PS, frames=8) if video else
          data.SyntheticImages(6, res=(32, 64), patch_size=PS))
    expected = {i: native_render(ds, i, video) for i in range(6)}          # before counting render calls
    calls = counting_render(monkeypatch)
    assert ds.cache_bytes() == 0
    # (a) the same key twice: one render (at the native size, every frame), identical items
    first = ds[(2, 0)]
    saved = first.media.clone()
    first.media.add_(1)                                                     # the caller owns its copy
    again = ds[(2, 0)]
    native, caption = expected[2]
    assert calls == [(*native.shape[1:3], native.shape[0])]
    assert torch.equal(again.media, saved) and (again.caption, again.label) == (first.caption, first.label)
    drawn = 0 if tuple(saved.shape[-3:-1]) == tuple(native.shape[1:3]) else saved.numel()   # its size is kept
    assert again.caption == caption and ds.cache_bytes() == native.numel() + drawn
    # (b) other epochs draw other sizes: nothing new rendered, an antialiased bilinear resize of the cached
    # native render, re-quantised to the uint8 grid; at the native size, the cached render itself
    sizes, resized = set(), 0
    kept = {} if drawn == 0 else {(2, tuple(saved.shape[-3:-1])): saved.numel()}
    for i in range(6):
        native, caption = expected[i]
        for epoch in range(1, 8):
            s = ds[(i, epoch)]
            media = s.media if video else s.media[None]
            hw = tuple(media.shape[1:3])
            sizes.add((i, hw))
            if hw == tuple(native.shape[1:3]):
                want = native
            else:
                y = torch.nn.functional.interpolate(native.permute(0, 3, 1, 2), size=hw, mode='bilinear',
                                                    align_corners=False, antialias=True).permute(0, 2, 3, 1)
                want = ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).float() / 127.5 - 1
                resized += 1
                kept[(i, hw)] = want.numel()                            # each drawn size is kept (uint8)
            assert torch.equal(media, want) and s.caption == caption
            assert media.is_contiguous() and s.media.dtype == torch.float32
            assert ds.num_tokens((i, epoch)) == model.pack([s.media], PS).seqlens[0]
    assert len(calls) == 6 and resized > 6 and len({hw for i, hw in sizes if i == 2}) > 1   # one render each
    assert ds.cache_bytes() == sum(n.numel() for n, _ in expected.values()) + sum(kept.values())
    # a curriculum that changes res changes the native size: that sample is rendered anew
    ds.res = (32, 32)
    assert max(ds[(2, 0)].media.shape[-3:-1]) == 32 and len(calls) == 7 and calls[-1][:2] != calls[0][:2]


def test_synthetic_pixels_on_uint8_grid():
    # (c) every value is k / 127.5 - 1 for an integer k, also after a resize, images and videos
    images = data.SyntheticImages(8, 'val', res=(16, 64), patch_size=PS)
    videos = data.SyntheticVideos(4, 'val', res=(16, 48), patch_size=PS, frames=8)
    for ds in (images, videos):
        for i in range(len(ds)):
            for epoch in range(3):
                assert on_uint8_grid(ds[(i, epoch)].media)


def test_built_in_batch_never_makes_the_float_copy():
    """A built-in sample carries uint8 pixels; collate packs them as they are, and the float media (u / 127.5 - 1)
    is made only when read: a training batch makes none."""
    cfg = model.ModelConfig(patch_size=PS)
    for ds in (data.SyntheticImages(6, 'val', res=(16, 32), patch_size=PS),
               data.SyntheticVideos(3, 'val', res=(16, 32), patch_size=PS, frames=8)):
        items = [ds[(i, 0)] for i in range(len(ds))]
        batch = data.collate(items, cfg)
        assert batch.packed.feats.dtype == torch.uint8
        assert all(s._media is None for s in items)                       # nothing was converted
        assert torch.equal(model.pack([s.media for s in items], PS).feats, model.from_uint8(batch.packed.feats))
        assert all(torch.equal(s.media, s.pixels.float() / 127.5 - 1) for s in items)


# -----------------------------------------------------------------------------
# resolution and clip sampling


def test_sample_resolution():
    rng = np.random.default_rng(0)
    for _ in range(200):
        H, W = rng.integers(20, 2000, 2)
        h, w = data.sample_resolution(rng, (H, W), (64, 512), (16, 16))
        assert h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16
        assert 64 <= max(h, w) <= min(512, max(64, round(max(H, W) / 16) * 16))
        if min(h, w) >= 64:                                          # rounding moves a side by < 8 px
            assert abs(h / w - H / W) < (H / W) * 16 / min(h, w)
    assert data.sample_resolution(rng, (20, 30), (64, 512), (16, 16)) == (48, 64)   # tiny: up to min


def test_sample_clip():
    rng = np.random.default_rng(0)
    strides = set()
    for _ in range(100):
        c = data.sample_clip(rng, 100, 30.0, 'recon', 32, 4)
        strides.add(c.step)
        assert len(c) % 4 == 0 and 4 <= len(c) <= 32 and c[0] >= 0 and c[-1] < 100
    assert strides == set(range(1, 13))             # both branches: 1-3 (consistency) and 4-12 (diversity)
    c = data.sample_clip(rng, 3000, 25.0, 'understand', 64, 4)      # 2 minutes at 25 fps
    assert (c.step, len(c)) == (25, 64)
    c = data.sample_clip(rng, 50, 25.0, 'understand', 64, 4)        # 2 s: stride shrinks to fit 4 frames
    assert len(c) == 4 and c[-1] < 50
    with pytest.raises(ValueError, match='3 frames'):
        data.sample_clip(rng, 3, 25.0, 'recon', 32, 4)


# -----------------------------------------------------------------------------
# real files


def test_image_folder(files):
    with pytest.warns(UserWarning) as record:
        ds = data.ImageFolder(str(files['images']), res=(64, 64), patch_size=PS)
    assert sorted(os.path.basename(s) for s, _ in ds.skipped) == ['empty.png', 'text.png'] and len(record) == 2
    assert all('skipped' in str(w.message) for w in record)
    names = [os.path.basename(ds.source(i)) for i in range(len(ds))]
    assert sorted(names) == ['a.png', 'b.jpg', 'c.bmp', 'truncated.jpg']
    s = ds[index_of(ds, 'a.png')]                                   # 48x64 png at longer side 64: no resize
    assert s.media.shape == (48, 64, 3) and s.kind == 'image' and s.label == -1 and s.caption == ''
    expected = torch.from_numpy(files['arrays']['a.png']).float() / 127.5 - 1
    assert torch.allclose(s.media, expected, atol=1e-6)
    j = index_of(ds, 'b.jpg')
    b = ds[j]                                                       # 30x50 jpg upsampled to 64 wide
    assert b.media.shape == (40, 64, 3) and -1 <= b.media.min() and b.media.max() <= 1
    assert ds.num_tokens(j) == 5 * 8


def test_truncated_image_skipped_or_strict(files):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ds = data.ImageFolder(str(files['images']), res=(32, 64), patch_size=PS)
        strict_rows = data.ImageFolder(str(files['images'] / 'manifest.csv'), res=(32, 64), patch_size=PS)
    i = index_of(ds, 'truncated.jpg')
    with pytest.warns(UserWarning, match=r'skipped .*truncated\.jpg'):
        item = ds[i]
    assert isinstance(item, data.Skipped) and 'truncated' in item.reason
    ds.strict = True
    with pytest.raises(ValueError, match=r'truncated\.jpg'):
        ds[i]
    with pytest.raises(ValueError, match=r'empty\.png'):
        data.ImageFolder(str(files['images']), patch_size=PS, strict=True)
    with pytest.raises(ValueError, match=r'missing\.png'):
        data.ImageFolder(str(files['images'] / 'manifest.csv'), patch_size=PS, strict=True)
    assert len(strict_rows) == 1 and strict_rows.skipped[0][1] == 'file not found'


def test_manifests(files):
    with pytest.warns(UserWarning, match=r'skipped .*missing\.png: file not found'):
        ds = data.ImageFolder(str(files['images'] / 'manifest.jsonl'), res=(32, 64), patch_size=PS)
    assert len(ds) == 3 and len(ds.skipped) == 1 and ds.classes == ['cat', 'dog']
    got = {os.path.basename(s.source): (s.caption, s.label, s.class_name) for s in (ds[i] for i in range(3))}
    assert got == {'a.png': ('a cat', 0, 'cat'), 'b.jpg': ('a dog', 1, 'dog'), 'c.bmp': ('', 0, 'cat')}
    with pytest.warns(UserWarning, match='missing'):
        csv_ds = data.ImageFolder(str(files['images'] / 'manifest.csv'), res=(32, 64), patch_size=PS)
    assert csv_ds[0].caption == 'a cat' and csv_ds.classes == ['cat']


def test_video_folder_recon(files):
    ds = data.VideoFolder(str(files['videos']), 'recon', res=(32, 64), patch_size=PS, max_frames=16)
    assert sorted(os.path.basename(ds.source(i)) for i in range(len(ds))) == ['a.mp4', 'b.webm', 'c.mkv', 'd.mov']
    assert ds.skipped == []
    frames = {os.path.basename(e[0]): e[3][0] for e in ds.entries}
    assert frames == {'a.mp4': 40, 'b.webm': 24, 'c.mkv': 20, 'd.mov': 16}   # webm/mkv: counted packets
    strides = set()
    for epoch in range(4):
        for i in range(len(ds)):
            s = ds[(i, epoch)]
            T, H, W, C = s.media.shape
            assert s.kind == 'video' and C == 3 and T % 4 == 0 and 4 <= T <= 16
            assert H % 8 == 0 and W % 8 == 0 and 32 <= max(H, W) <= 64
            assert -1 <= s.media.min() and s.media.max() <= 1
            idx = frame_indices(s.media)
            step = idx[1] - idx[0]
            assert 1 <= step <= 12 and idx == list(range(idx[0], idx[0] + step * T, step))   # sample_clip's strides
            assert idx[-1] < frames[os.path.basename(s.source)]
            assert model.pack([s.media], PS).seqlens == [ds.num_tokens((i, epoch))]
            strides.add(step)
    assert len(strides) > 1


def test_video_folder_understand(files):
    ds = data.VideoFolder(str(files['videos']), 'understand', res=(32, 32), patch_size=PS)
    idx = frame_indices(ds[index_of(ds, 'a.mp4')].media)            # 40 frames at 10 fps: 1 fps -> 4 frames
    assert len(idx) == 4 and np.diff(idx).tolist() == [10, 10, 10]
    assert len(frame_indices(ds[index_of(ds, 'd.mov')].media)) == 4     # 1.6 s: the stride shrinks to fit 4


def test_bad_videos(files):
    with pytest.warns(UserWarning) as record:
        ds = data.VideoFolder(str(files['bad']), res=(32, 64), patch_size=PS)
    assert len(ds) == 1 and len(record) == 3
    reasons = {os.path.basename(s): r for s, r in ds.skipped}
    assert set(reasons) == {'garbage.mp4', 'empty.mov', 'noframes.mkv'}
    assert reasons['empty.mov'] == 'empty file' and reasons['noframes.mkv'] == 'no decodable frames'
    with pytest.raises(ValueError, match=r'cannot read .*(garbage\.mp4|empty\.mov|noframes\.mkv)'):
        data.VideoFolder(str(files['bad']), patch_size=PS, strict=True)


def test_no_usable_files_names_folder(tmp_path):
    (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8 nope')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=str(tmp_path)):
        data.ImageFolder(str(tmp_path), patch_size=PS)
    with pytest.raises(ValueError, match=str(tmp_path)):
        data.VideoFolder(str(tmp_path), patch_size=PS)
    with pytest.raises(FileNotFoundError, match='nowhere'):
        data.ImageFolder(str(tmp_path / 'nowhere'), patch_size=PS)


# -----------------------------------------------------------------------------
# packing


def mixed(n_img=30, n_vid=10):
    return data.Concat([data.SyntheticImages(n_img, res=(16, 64), patch_size=PS),
                        data.SyntheticVideos(n_vid, res=(16, 32), patch_size=PS, frames=8)])


def test_sampler_budget_ranks_once():
    ds, budget = mixed(), 160
    for epoch in range(2):
        per_rank, steps = [], []
        for rank in range(2):
            sampler = data.TokenBudgetSampler(ds, budget, seed=1, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            for b in batches:
                assert sum(ds.num_tokens(k) for k in b) <= budget and all(e == epoch for _, e in b)
            per_rank.append([i for b in batches for i, _ in b])
            steps.append(len(batches))
        assert steps[0] == steps[1]                                             # DDP: same step count
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(len(ds)))       # every sample exactly once
    s0, s1 = data.TokenBudgetSampler(ds, budget), data.TokenBudgetSampler(ds, budget)
    s1.set_epoch(1)
    assert list(s0) != list(s1)                                                 # reshuffled per epoch


def test_sampler_even_steps_by_splitting():
    batches = data.even_out([[0, 1, 2], [3]], 3)
    assert len(batches) == 3 and sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert data.even_out([[0], [1], [2]], 2) == [[0], [1], [2], [0]]          # singletons: documented repeat


def test_sampler_no_sample_fits_names_one():
    ds = data.SyntheticImages(4, res=(64, 64), patch_size=PS)               # 64 tokens at least per image
    with pytest.raises(ValueError, match=r'no sample of SyntheticImages \(4, e\.g\. synthetic:train:image:\d+\) fits'):
        list(data.TokenBudgetSampler(ds, budget=20))


def test_sampler_max_samples_closes_batches():
    ds = data.SyntheticImages(10, res=(32, 32), patch_size=PS)              # 16 tokens per image
    batches = list(data.TokenBudgetSampler(ds, budget=1000, max_samples=3))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    tight = list(data.TokenBudgetSampler(ds, budget=20, max_samples=3))  # 8-16 tokens per image: tokens close first
    assert all(len(b) <= 2 and sum(ds.num_tokens(k) for k in b) <= 20 for b in tight)
    assert sorted(i for b in tight for i, _ in b) == list(range(10))


def epoch_over(ds, key_tokens, least):
    """The first epoch in which sample 0 draws at least `least` tokens."""
    return next(e for e in range(200) if key_tokens((0, e)) >= least)


def test_oversized_image_is_drawn_smaller_and_reported(tmp_path):
    """A 200x160 photo among small ones, over the budget at its drawn size: the epoch completes with it drawn at a
    smaller size inside the stage's range (aspect kept), and the report names it."""
    rng = np.random.default_rng(0)
    for name, hw in (('0big.png', (160, 200)), ('1.png', (32, 40)), ('2.png', (40, 32))):
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(tmp_path / name)
    ds = data.ImageFolder(str(tmp_path), res=(32, 192), patch_size=PS)
    epoch = epoch_over(ds, ds.num_tokens, 200)
    budget = ds.num_tokens((0, epoch)) - 1
    sampler = data.TokenBudgetSampler(ds, budget)
    sampler.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=lambda items: items)
    seen = {os.path.basename(s.source): s.media.shape for b in loader for s in b}
    assert sorted(seen) == ['0big.png', '1.png', '2.png']                 # the epoch completed, nothing left out
    h, w, _ = seen['0big.png']
    assert (h // 8) * (w // 8) <= budget and 32 <= max(h, w) and abs(w / h - 1.25) < 1.25 * 8 / h
    assert ds.num_tokens((0, epoch, budget)) == (h // 8) * (w // 8)       # num_tokens and decoding agree
    report = sampler.report(epoch)
    assert '1 made smaller' in report and '0 left out' in report and f'0big.png: {budget + 1} -> ' in report


def test_oversized_clip_is_shortened_then_drawn_smaller(tmp_path):
    """A 40-frame video over the budget: first the same clip cut shorter (same start and stride, not below 16
    frames), and below that budget 16 frames at a smaller size; decoded frames are the planned ones."""
    write_video(tmp_path / 'long.mp4', 'libx264', 40)
    write_video(tmp_path / 'short.mp4', 'libx264', 8)
    ds = data.VideoFolder(str(tmp_path), mode='recon', res=(32, 64), patch_size=PS)
    i = index_of(ds, 'long.mp4')
    assert i == 0
    epoch = epoch_over(ds, lambda k: len(ds._plan(k)[2]), 24)
    _, hw, clip = ds._plan((0, epoch))
    per_latent = (hw[0] // 8) * (hw[1] // 8)
    budget = ds.num_tokens((0, epoch)) - 1
    _, hw2, clip2 = ds._plan((0, epoch, budget))
    assert hw2 == hw and clip2 == clip[:len(clip) - 4]                     # one latent frame fewer
    sampler = data.TokenBudgetSampler(ds, budget)
    sampler.set_epoch(epoch)
    got = [ds[k] for b in sampler for k in b]
    long = next(s for s in got if s.source.endswith('long.mp4'))
    assert len(got) == 2 and frame_indices(long.media) == list(clip2) and long.media.shape[1:3] == hw
    assert 'long.mp4: ' in sampler.report(epoch) and '1 made smaller' in sampler.report(epoch)
    small = 4 * per_latent - 1                                             # 16 frames no longer fit at hw
    _, hw3, clip3 = ds._plan((0, epoch, small))
    assert len(clip3) == 16 and clip3[:2] == clip[:2] and max(hw3) < max(hw) and 4 * (hw3[0] // 8) * (hw3[1] // 8) <= small


def test_oversized_asset_is_left_out_and_named(tmp_path):
    """A 3D asset has one size: over the budget it is left out of the epoch (named in the report), the rest runs."""
    import render3d
    counts = []
    for name, seed, grid in (('a', 7, 16), ('b', 3, 8)):
        mesh, _, caption = render3d.procedural_mesh(seed)
        pack = render3d.pack_asset(mesh, n_views=2, resolution=16, patch_size=PS, grid=grid)
        render3d.write_prepared(str(tmp_path / name), pack, dict(caption=caption, patch=[8, 8],
                                                                voxels=len(pack['coords'])))
        counts.append(len(pack['coords']))
    assert counts[0] > counts[1]
    ds = data.AssetFolder(str(tmp_path), patch_size=PS)
    loader = data.make_loader(ds, budget=counts[0] - 1, config=PS)
    sources = [s for batch in loader for s in batch.sources]
    assert [os.path.basename(s) for s in sources] == ['b']
    report = loader.batch_sampler.report(0)
    assert '0 made smaller (lower resolution / shorter clip), 1 left out' in report
    assert f"a: left out, {counts[0]} tokens at its smallest size, over the budget of {counts[0] - 1}" in report


def test_loader_packs_and_workers_agree():
    ds, budget = mixed(), 200
    batches = {}
    for workers in (0, 2):
        loader = data.make_loader(ds, budget, PS, seed=2, num_workers=workers)
        loader.batch_sampler.set_epoch(1)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2])
    seen = []
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a.packed.feats, b.packed.feats) and a.captions == b.captions and a.sources == b.sources
        p = a.packed
        assert isinstance(p, model.Packed) and sum(p.seqlens) == p.feats.shape[0] <= budget
        assert p.feats.shape[1] == 4 * 8 * 8 * 3 and p.coords.shape == (p.feats.shape[0], 4)
        assert len(p.seqlens) == len(a.captions) == len(a.labels) == len(a.sources) and a.skipped == []
        seen += a.sources
    assert sorted(seen) == sorted(ds.source(i) for i in range(len(ds)))
    assert {k for b in batches[0] for k in b.packed.kinds} == {'image', 'video'}


def test_loader_skips_bad_files_and_reports(files):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ds = data.Concat([data.ImageFolder(str(files['images']), res=(32, 64), patch_size=PS),
                          data.VideoFolder(str(files['videos']), res=(32, 48), patch_size=PS, max_frames=8)])
        loader = data.make_loader(ds, 200, PS, num_workers=2)
        batches = list(loader)
    skipped = [s for b in batches for s in b.skipped]
    assert [os.path.basename(s) for s, _ in skipped] == ['truncated.jpg']
    assert sum(len(b.sources) for b in batches) == len(ds) - 1
    report = data.skip_report(ds, skipped)
    assert report.startswith('3 files skipped (2 when scanning, 1 when decoding)') and 'truncated.jpg' in report


def test_tiny_model_runs_on_a_packed_batch():
    torch.manual_seed(0)
    tok = model.AToken(model.PRESETS['tiny']).init_weights()
    batch = next(iter(data.make_loader(mixed(6, 2), 400, model.PRESETS['tiny'])))
    assert batch.packed.feats.dtype == torch.uint8               # pixels travel as uint8
    with pytest.raises(ValueError, match='uint8'):
        tok(batch.packed)
    p = batch.packed.to('cpu')
    assert p.feats.dtype == torch.float32 and -1 <= p.feats.min() and p.feats.max() <= 1
    out = tok(p)
    assert out['rec'].shape == p.feats.shape and out['embedding'].shape[0] == len(batch.captions)


# ---------------------------------------------------------------------------------------------------------
# 3D


def test_synthetic_3d_deterministic_and_split():
    import model
    a = data.Synthetic3D(3, 'train', seed=0, views=2, view_res=32, grid=16, patch_size=(4, 8, 8))
    b = data.Synthetic3D(3, 'train', seed=0, views=2, view_res=32, grid=16, patch_size=(4, 8, 8))
    v = data.Synthetic3D(3, 'val', seed=0, views=2, view_res=32, grid=16, patch_size=(4, 8, 8))
    for i in range(3):
        s, t = a[i], b[i]
        assert s.kind == '3d' and s.caption == t.caption and s.label == a.classes.index(s.class_name)
        assert torch.equal(s.media['feats'], t.media['feats']) and torch.equal(s.media['coords'], t.media['coords'])
        f, c = s.media['feats'], s.media['coords']
        assert f.shape == (len(c), 8 * 8 * 3) and f.min() >= -1 and f.max() <= 1
        assert c.min() >= 0 and c.max() < 16 and a.num_tokens(i) == len(c)
        assert s.media['views'].shape == (2, 32, 32, 3) and len(s.media['cameras']) == 2
        assert s.class_name in s.caption
    train = {a[i].media['coords'].numpy().tobytes() + a[i].caption.encode() for i in range(3)}
    assert not train & {v[i].media['coords'].numpy().tobytes() + v[i].caption.encode() for i in range(3)}
    # a packed batch carries the tokens and the ground-truth views of its 3D samples
    batch = data.collate([a[0], data.SyntheticImages(1, res=(32, 32), patch_size=(4, 8, 8))[0]], (4, 8, 8))
    assert batch.packed.kinds == ['3d', 'image'] and batch.packed.seqlens[0] == a.num_tokens(0)
    assert batch.views[0][0].shape == (2, 32, 32, 3) and batch.views[1] is None
    p = batch.packed.to('cpu')          # uint8 on the wire; 3D features come from 8-bit renders: exact
    torch.testing.assert_close(p.feats[:a.num_tokens(0), :192], a[0].media['feats'], atol=1e-6, rtol=0)
    assert p.feats.shape[1] == 192                              # one-frame samples only: the pt = 0 slot


def test_asset_folder(tmp_path):
    import render3d
    mesh, _, caption = render3d.procedural_mesh(7)
    pack = render3d.pack_asset(mesh, n_views=2, resolution=32, patch_size=(4, 8, 8), grid=16)
    render3d.write_prepared(str(tmp_path / 'obj'), pack, dict(caption=caption, patch=[8, 8],
                                                             voxels=len(pack['coords'])))
    (tmp_path / 'broken').mkdir()                                     # no meta.json: skipped, named
    with pytest.warns(UserWarning, match='broken'):
        ds = data.AssetFolder(str(tmp_path), patch_size=(4, 8, 8))
    assert len(ds) == 1 and len(ds.skipped) == 1 and 'broken' in ds.skipped[0][0]
    s = ds[0]
    assert s.kind == '3d' and s.caption == caption and ds.num_tokens(0) == len(pack['coords'])
    torch.testing.assert_close(s.media['feats'], pack['feats'] * 2 - 1, atol=1 / 255, rtol=0)
    assert torch.equal(s.media['coords'], pack['coords'])
    with pytest.raises(ValueError, match='broken'):
        data.AssetFolder(str(tmp_path), patch_size=(4, 8, 8), strict=True)
    with pytest.raises(ValueError, match='no usable'):
        data.AssetFolder(str(tmp_path / 'broken'), patch_size=(4, 8, 8))


@pytest.mark.parametrize('video', [False, True])
def test_collate_ships_built_in_pixels_as_they_are(video):
    """Built-in samples carry their uint8 levels: collate packs those directly, and the batch equals the one
    packed from the float media and quantised (the path every other dataset takes)."""
    import dataclasses
    ds = (data.SyntheticVideos(4, res=(32, 48), patch_size=PS, frames=8) if video else
          data.SyntheticImages(6, res=(32, 64), patch_size=PS))
    items = [ds[(i, 1)] for i in range(len(ds))]
    assert all(s.pixels.dtype == torch.uint8 and torch.equal(model.from_uint8(s.pixels), s.media) for s in items)
    a = data.collate(items, model.PRESETS['tiny'])
    b = data.collate([dataclasses.replace(s, pixels=None) for s in items], model.PRESETS['tiny'])
    assert a.packed.feats.dtype == b.packed.feats.dtype == torch.uint8
    assert torch.equal(a.packed.feats, b.packed.feats) and torch.equal(a.packed.coords, b.packed.coords)


def test_asset_captions_from_a_cap3d_style_file(tmp_path):
    """Captions by asset id from a CSV (Cap3D: `uid,caption` rows, commas quoted) or a JSON object; the folder name
    or, for nested files, the stem prepare_assets puts last; assets the file lacks keep meta.json's caption."""
    import render3d
    mesh, _, caption = render3d.procedural_mesh(7)
    pack = render3d.pack_asset(mesh, n_views=2, resolution=16, patch_size=PS, grid=8)
    for name in ('uid1', 'glbs__000-023__uid2', 'other'):
        render3d.write_prepared(str(tmp_path / 'assets' / name), pack, dict(caption=caption, patch=[8, 8],
                                                                           voxels=len(pack['coords'])))
    (tmp_path / 'caps.csv').write_text('uid1,"a wooden chair, painted red"\nuid2,a small boat\n')
    (tmp_path / 'caps.json').write_text(json.dumps({'uid1': 'a chair', 'glbs__000-023__uid2': 'a boat'}))
    for file, want in (('caps.csv', ['a wooden chair, painted red', 'a small boat', caption]),
                       ('caps.json', ['a chair', 'a boat', caption])):
        ds = data.AssetFolder(str(tmp_path / 'assets'), patch_size=PS, captions=str(tmp_path / file))
        got = {os.path.basename(ds.source(i)): ds[i].caption for i in range(len(ds))}
        assert [got['uid1'], got['glbs__000-023__uid2'], got['other']] == want
    (tmp_path / 'bad.csv').write_text('uid1,a,b\n')
    with pytest.raises(ValueError, match=r'bad\.csv: row 1 has 3 fields'):
        data.AssetFolder(str(tmp_path / 'assets'), patch_size=PS, captions=str(tmp_path / 'bad.csv'))


def test_asset_labels_for_zero_shot(tmp_path):
    """AssetFolder labels: 'folder' takes the top source folder of a nested asset (Toys4k's category, the
    first part of prepare_assets' name); a CSV maps ids to classes; classes are the sorted names, labels index them."""
    import render3d
    mesh, _, caption = render3d.procedural_mesh(3)
    pack = render3d.pack_asset(mesh, n_views=2, resolution=16, patch_size=PS, grid=8)
    for name in ('car__car_001__mesh', 'airplane__plane_7__mesh', 'car__car_002__mesh', 'loose'):
        render3d.write_prepared(str(tmp_path / 'assets' / name), pack, dict(caption=caption, patch=[8, 8],
                                                                           voxels=len(pack['coords'])))
    ds = data.AssetFolder(str(tmp_path / 'assets'), patch_size=PS, labels='folder')
    assert ds.classes == ['airplane', 'car']
    got = {os.path.basename(ds.source(i)): (ds[i].label, ds[i].class_name) for i in range(len(ds))}
    assert got == {'airplane__plane_7__mesh': (0, 'airplane'), 'car__car_001__mesh': (1, 'car'),
                   'car__car_002__mesh': (1, 'car'), 'loose': (-1, '')}
    (tmp_path / 'labels.csv').write_text('loose,teapot\nmesh,never used\ncar__car_001__mesh,sedan\n')
    ds = data.AssetFolder(str(tmp_path / 'assets'), patch_size=PS, labels=str(tmp_path / 'labels.csv'))
    assert ds.classes == ['never used', 'sedan', 'teapot']            # 'mesh': the stem of the nested ones
    got = {os.path.basename(ds.source(i)): ds[i].class_name for i in range(len(ds))}
    assert got == {'airplane__plane_7__mesh': 'never used', 'car__car_001__mesh': 'sedan',
                   'car__car_002__mesh': 'never used', 'loose': 'teapot'}
    assert data.AssetFolder(str(tmp_path / 'assets'), patch_size=PS)[0].label == -1
