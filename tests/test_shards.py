"""shards.py (encode folders into token shards, decode them) and data.TokenShards, on the tiny official-format
checkpoint (tests/data/official_tiny.pt: FSQ 8 x 4096, 16 x 16 patches). CPU, no network."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import data
import convert
import model
import shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = torch.load(os.path.join(ROOT, 'tests', 'data', 'official_tiny.pt'), weights_only=False)


@pytest.fixture
def ckpt(tmp_path):
    """The tiny official model as files: (checkpoint, yaml, AToken)."""
    torch.save(REF['state_dict'], tmp_path / 'tiny.pt')
    (tmp_path / 'tiny.yaml').write_text(yaml.safe_dump({'model': {'model_cfg': {'arch_cfg': REF['arch_cfg']}}}))
    return str(tmp_path / 'tiny.pt'), str(tmp_path / 'tiny.yaml'), model.AToken.from_pretrained(
        str(tmp_path / 'tiny.pt'), str(tmp_path / 'tiny.yaml'))


@pytest.fixture
def images(tmp_path):
    """Seven random PNGs of mixed sizes (2-6 tokens; 40 px crops to 32) plus two corrupt files."""
    folder = tmp_path / 'images'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        hw = [(32, 48), (40, 32), (16, 16), (48, 32)][i % 4]
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(folder / f'img{i}.png')
    (folder / 'broken.png').write_bytes(b'\x89PNG not really')
    (folder / 'empty.jpg').write_bytes(b'')
    return str(folder)


def run(ckpt, *flags):
    return shards.main(['encode', f'--checkpoint={ckpt[0]}', f'--config={ckpt[1]}', *flags])


def by_shard(ds):
    """Dataset items grouped by shard, in order."""
    groups = {}
    for i in range(len(ds)):
        groups.setdefault(ds.index[i][0], []).append(ds[i])
    return list(groups.values())


def test_fsq_round_trip_is_exact(tmp_path, ckpt, images):
    """Shard tokens == model.tokenize, coords == model.pack's, and decoding the shards == model.reconstruct bit for
    bit (each shard is one forward batch here, so the same batch is compared). Corrupt files are listed, skipped."""
    out = str(tmp_path / 'out')
    stats = run(ckpt, f'--input={images}', f'--out={out}', '--shard_size=3')
    assert stats['samples'] == 7 and stats['shards'] == 3
    assert sorted(os.path.basename(s) for s, _ in stats['skipped']) == ['broken.png', 'empty.jpg']
    index = json.load(open(os.path.join(out, 'index.json')))
    assert index['samples'] == 7 and len(index['skipped']) == 2
    assert open(os.path.join(out, 'skipped.txt')).read().count('\n') == 2
    tok = ckpt[2]
    ds = data.TokenShards(out)
    assert len(ds) == 7 and ds.latent == 'fsq'
    for items in by_shard(ds):
        media = [shards.load_input(it['source'], shards.ShardConfig(), tok.config.patch_size) for it in items]
        x = tok.pack(media)
        for it, want, c in zip(items, tok.tokenize(media), x.coords.split(x.seqlens)):
            assert it['tokens'].dtype == torch.int64 and torch.equal(it['tokens'], want.long())
            assert torch.equal(it['coords'], c)
        for got, want, it in zip(shards.decode_samples(tok, items, 16384), tok.reconstruct(media), items):
            assert got.shape == want.shape == tuple(it['shape']) and torch.equal(got, want)
    # the README's generator feed: a DataLoader (a worker process opens its own file handles) + collate_tokens
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=data.collate_tokens)
    b = next(iter(loader))
    assert torch.equal(b['tokens'], torch.cat([ds[i]['tokens'] for i in range(4)]))
    assert b['seqlens'] == [len(ds[i]['coords']) for i in range(4)] and len(b['captions']) == 4
    raw = __import__('safetensors.torch').torch.load_file(os.path.join(out, 'shard-00000-of-00003.safetensors'))
    assert raw['tokens'].dtype == torch.int16 and raw['coords'].dtype == torch.int16
    assert raw['offsets'].tolist()[0] == 0 and raw['offsets'][-1] == len(raw['tokens'])
    files = shards.main(['decode', f'--checkpoint={ckpt[0]}', f'--config={ckpt[1]}', f'--out={out}',
                         f'--decoded={tmp_path / "dec"}', '--limit=2'])
    assert len(files) == 2 and np.asarray(Image.open(files[0])).shape == tuple(ds[0]['shape'])


def test_continuous_video_round_trip(tmp_path, ckpt):
    """Continuous latents (float32 mean + logvar) of videos: decode == reconstruct of the So/C model to 1e-6."""
    import av
    folder = tmp_path / 'videos'
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, n in enumerate((8, 6)):                        # 6 frames: cut to 4
        with av.open(str(folder / f'v{i}.mp4'), 'w') as f:
            s = f.add_stream('libx264', rate=8)
            s.height, s.width, s.pix_fmt = 32, 48, 'yuv420p'
            for _ in range(n):
                f.mux(s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
                                                          format='rgb24')))
            f.mux(s.encode())
    out = str(tmp_path / 'out')
    run(ckpt, f'--input={folder}', '--kind=video', f'--out={out}', '--latent=mean', '--dtype=float32', '--logvar')
    ds = data.TokenShards(out)
    assert len(ds) == 2 and set(ds[0]) >= {'mean', 'logvar', 'coords'} and 'tokens' not in ds[0]
    cont = model.AToken(model.ModelConfig.from_official({**REF['arch_cfg'], 'use_quantizer': False}))
    model.load_strict(cont, REF['state_dict'])
    cont.eval()
    items = [ds[0], ds[1]]
    media = [shards.load_input(it['source'], shards.ShardConfig(kind='video'), cont.config.patch_size) for it in items]
    with torch.no_grad():
        x = cont.pack(media)
        _, mean, logvar, _ = cont.bottleneck(cont.encode(x))
    torch.testing.assert_close(torch.cat([it['logvar'] for it in items]), logvar, atol=1e-6, rtol=0)
    for got, want in zip(shards.decode_samples(cont, items, 16384), cont.reconstruct(media)):
        assert got.shape == want.shape and got.shape[0] in (8, 4)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.save(cont.export(), tmp_path / 'cont.pt')                      # decode to MP4: one file per clip
    files = shards.main(['decode', f'--checkpoint={tmp_path / "cont.pt"}', f'--out={out}',
                         f'--decoded={tmp_path / "dec"}'])
    assert [os.path.splitext(f)[1] for f in files] == ['.mp4', '.mp4']
    for f, want in zip(files, cont.reconstruct(media)):
        with av.open(f) as v:
            frames = [fr.to_ndarray(format='rgb24') for fr in v.decode(video=0)]
        assert len(frames) == want.shape[0] and frames[0].shape == tuple(want.shape[1:])
    with pytest.raises(ValueError, match='no quantizer'):
        torch.save(cont.export(), tmp_path / 'cont.pt')
        shards.main(['encode', f'--checkpoint={tmp_path / "cont.pt"}', f'--input={folder}', '--kind=video',
                     f'--out={tmp_path / "x"}', '--latent=fsq'])


def test_interrupted_encode_resumes_without_duplicates(tmp_path, ckpt, images, monkeypatch):
    out = str(tmp_path / 'out')
    write, calls = shards.write_shard, []

    def dies_on_second(*a):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt          # killed while encoding shard 2
        write(*a)
    monkeypatch.setattr(shards, 'write_shard', dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, f'--input={images}', f'--out={out}', '--shard_size=3')
    monkeypatch.setattr(shards, 'write_shard', write)
    first = os.path.join(out, 'shard-00000-of-00003.safetensors')
    before = os.path.getmtime(first)
    stats = run(ckpt, f'--input={images}', f'--out={out}', '--shard_size=3')
    assert stats['done_before'] == 1 and stats['shards'] == 2 and os.path.getmtime(first) == before
    sources = [data.TokenShards(out)[i]['source'] for i in range(7)]
    assert len(set(sources)) == 7 == len(data.TokenShards(out))
    with pytest.raises(ValueError, match='fingerprint'):    # other settings into the same folder: refused
        run(ckpt, f'--input={images}', f'--out={out}', '--shard_size=3', '--max_side=16')


def test_two_ranks_write_disjoint_shards(tmp_path, ckpt, images):
    """torchrun --nproc_per_node=2 (gloo, CPU): shard k is written by rank k % 2; the union is every file once."""
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join(ROOT, 'shards.py'), 'encode', f'--checkpoint={ckpt[0]}', f'--config={ckpt[1]}',
                        f'--input={images}', f'--out={out}', '--shard_size=2', '--device=cpu'],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(f for f in os.listdir(out) if f.startswith('shard-'))
    assert len(names) == 5                                   # 9 files / 2 per shard
    ranks = [int(shards.read_meta(str(out / n))['rank']) for n in names]
    assert ranks == [0, 1, 0, 1, 0]
    ds = data.TokenShards(str(out))
    sources = [ds[i]['source'] for i in range(len(ds))]
    good = sorted(os.path.join(images, f) for f in os.listdir(images) if f.startswith('img'))
    assert sorted(sources) == good                           # each file once
    assert len(json.load(open(out / 'index.json'))['skipped']) == 2


def test_prepared_3d_round_trip(tmp_path, ckpt):
    """Prepared 3D assets: shard tokens == model.tokenize of the asset's voxel features, decoding the shards
    == model.reconstruct bit for bit, and without a Gaussian decoder each sample is written as an .npz of its
    reconstructed voxel features and their coords; an asset folder without its files is listed and skipped."""
    import render3d
    tok = ckpt[2]
    for i, name in enumerate(('chair', 'boat')):
        mesh, _, caption = render3d.procedural_mesh(11 + i)
        pack = render3d.pack_asset(mesh, n_views=2, resolution=32, patch_size=(4, 16, 16), grid=8)
        render3d.write_prepared(str(tmp_path / 'assets' / name), pack,
                                dict(caption=caption, patch=[16, 16], voxels=len(pack['coords'])))
    os.makedirs(tmp_path / 'assets' / 'empty')
    out = str(tmp_path / 'out')
    stats = run(ckpt, f'--input={tmp_path / "assets"}', '--kind=3d', f'--out={out}')
    assert [os.path.basename(s) for s, _ in stats['skipped']] == ['empty'] and stats['samples'] == 2
    ds = data.TokenShards(out)
    items = [ds[i] for i in range(len(ds))]
    assert [os.path.basename(it['source']) for it in items] == ['boat', 'chair'] and {it['kind'] for it in items} == {'3d'}
    media = [shards.load_input(it['source'], shards.ShardConfig(kind='3d'), tok.config.patch_size)[0] for it in items]
    for it, want in zip(items, tok.tokenize(media)):
        assert torch.equal(it['tokens'], want.long())
    recs = tok.reconstruct(media)
    for got, want in zip(shards.decode_samples(tok, items, 16384), recs):
        assert torch.equal(got, want)
    files = shards.main(['decode', f'--checkpoint={ckpt[0]}', f'--config={ckpt[1]}', f'--out={out}',
                         f'--decoded={tmp_path / "dec"}'])
    assert [os.path.splitext(f)[1] for f in files] == ['.npz', '.npz']
    for f, it, want in zip(files, items, recs):
        z = np.load(f)
        assert np.array_equal(z['feats'], want.numpy()) and np.array_equal(z['coords'], it['coords'][:, 1:].numpy())
