"""
Token shards: turn a folder of images, videos or prepared 3D assets into sharded token files with a released
(or trained) AToken, for training a generator on them, and decode shards back to media.

    python shards.py encode --checkpoint=atoken-sod --input=photos/ --out=shards/photos          # FSQ indices
    torchrun --nproc_per_node=8 shards.py encode --checkpoint=atoken-soc --input=clips/ --kind=video \
        --out=shards/clips --dtype=bfloat16 --logvar                                            # continuous
    python shards.py decode --checkpoint=atoken-sod --out=shards/photos --decoded=recon/ --limit=16

What a shard holds (safetensors; LlamaGen's and TiTok's pre-tokenising scripts store the same per-sample
indices + positions, here for a packed 4D token set):
  tokens   [N, G] int16/int32 FSQ indices (latent 'fsq'), or
  mean     [N, L] float16/bfloat16/float32 posterior means (latent 'mean'), optional logvar [N, L]
  coords   [N, 4] int16 (t, row, column, z) per token, raster order (model.patchify)
  offsets  [B+1] int64: sample i is rows offsets[i]:offsets[i+1]
  metadata (JSON strings): samples [{source, kind, shape, grid, caption, label}], skipped [[file, reason]],
           model_config, checkpoint, latent, rank (that wrote it), fingerprint (the listing + settings used)
data.TokenShards reads them back (tokens + coords + metadata per sample).

Work split: the sorted file list is cut into shards of shard_size files; shard k belongs to rank k % world, so
ranks write disjoint shards that together cover every file once, for any number of ranks. A shard is written to
a temporary file and renamed, so a shard on disk is complete: a rerun skips it (resume, no duplicates), and
refuses it if it was made from a different listing or settings. Unreadable files are skipped, recorded in their
shard and listed at the end (out/skipped.txt). Inputs keep their native size unless --max_side is set (the
official preprocessing then centre-crops to patch multiples, model.prepare).
Throughput on CPU / GPU: python bench/bench_shards.py.
"""
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import convert
import data
import model
import render3d
from structure import build_structure
from configurator import apply_flags, pick_device     # the one --key=value parser and device picker


@dataclass
class ShardConfig:
    checkpoint: str = ''        # released name (atoken-sod, ...), official .pt + config, or ours (tokenizer.pt)
    config: str = ''            # the official YAML of an official checkpoint
    input: str = ''             # encode: folder or JSONL/CSV manifest (images/videos), folder of prepared 3D assets
    kind: str = 'image'         # image | video | 3d
    out: str = 'shards'         # the shard folder (encode writes it, decode reads it)
    latent: str = 'auto'        # fsq (indices) | mean (continuous) | auto: fsq when the model has a quantizer
    index_dtype: str = 'int16'  # int16 | int32 for FSQ indices (int16 holds codebooks up to 32768)
    dtype: str = 'float16'      # float16 | bfloat16 | float32 for mean / logvar
    logvar: bool = False        # also store the posterior log-variance (continuous)
    shard_size: int = 256       # files per shard
    batch_tokens: int = 16384   # tokens per forward pass (a longer sample goes alone)
    max_side: int = 0           # 0 = native size; else shrink so the longer side is at most this (aspect kept)
    max_frames: int = 64        # videos: the first max_frames frames (cut to a multiple of pt)
    device: str = 'auto'
    decoded: str = 'decoded'    # decode: output folder (PNG images, MP4 videos, 3D renders or voxel .npz)
    limit: int = 0              # decode: at most this many samples (0 = all)
    gs_checkpoint: str = ''     # decode 3D: Gaussian decoder ('3d_decode_gs' or a file + gs_config) for renders
    gs_config: str = ''
    fps: int = 8                # decode: frame rate of the written MP4s


INDEX_DTYPES = {'int16': torch.int16, 'int32': torch.int32}
FLOAT_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float32': torch.float32}
KINDS = ('image', 'video', '3d')

# -----------------------------------------------------------------------------
# listing and loading the inputs


def list_inputs(cfg):
    """-> [(source, caption, label name)] in a fixed (sorted) order: the work split depends on it."""
    if cfg.kind == '3d':
        if not os.path.isdir(cfg.input):
            raise FileNotFoundError(f"--input={cfg.input}: no such folder of prepared 3D assets")
        return [(os.path.join(cfg.input, n), '', '') for n in sorted(os.listdir(cfg.input))
                if os.path.isdir(os.path.join(cfg.input, n))]
    exts = data.IMAGE_EXTENSIONS if cfg.kind == 'image' else data.VIDEO_EXTENSIONS
    return data.list_files(cfg.input, exts)


def fit(hw, max_side, patch):
    """Native (H, W) -> the loading size: unchanged, or shrunk so the longer side is <= max_side (patch multiples
    kept at least one patch)."""
    H, W = hw
    s = min(1.0, max_side / max(H, W)) if max_side else 1.0
    if s == 1.0:
        return H, W
    return max(round(H * s) // patch[0], 1) * patch[0], max(round(W * s) // patch[1], 1) * patch[1]


def load_input(source, cfg, patch_size):
    """One input -> media for model.pack: image (H, W, 3) / video (T, H, W, 3) in [-1, 1]; for 3D (asset dict
    {feats, coords}, its caption). Raises one of data.READ_ERRORS (or KeyError) for a bad file."""
    pt, ph, pw = patch_size
    if not os.path.exists(source):
        raise FileNotFoundError('file not found')
    if cfg.kind == 'image':
        return data.load_image(source, fit(data.probe_image(source), cfg.max_side, (ph, pw)))
    if cfg.kind == 'video':
        n, _, hw = data.probe_video(source, pt)
        return data.load_clip(source, range(min(n, cfg.max_frames) // pt * pt), fit(hw, cfg.max_side, (ph, pw)), pt)
    a = render3d.load_prepared(source)
    if a['meta'].get('patch') != [ph, pw]:
        raise ValueError(f"prepared with patch {a['meta'].get('patch')}, the model uses {[ph, pw]}")
    return dict(feats=a['feats'] * 2 - 1, coords=a['coords']), a['meta'].get('caption', '')


def media_tokens(media, patch_size):
    """Tokens of one loaded input (model.pack of it alone)."""
    pt, ph, pw = patch_size
    if isinstance(media, dict):
        return len(media['coords'])
    T = 1 if media.dim() == 3 else media.shape[0] // pt
    return T * (media.shape[-3] // ph) * (media.shape[-2] // pw)


def batches(counts, budget):
    """Token counts in order -> consecutive groups of at most `budget` tokens (a longer sample goes alone)."""
    out, used = [[]], 0
    for i, n in enumerate(counts):
        if out[-1] and used + n > budget:
            out, used = out + [[]], 0
        out[-1].append(i)
        used += n
    return [b for b in out if b]

# -----------------------------------------------------------------------------
# encoding


def fingerprint(rows, cfg, tok):
    """What a shard's content depends on: the listing, the model and the encode settings."""
    keys = ('kind', 'latent', 'index_dtype', 'dtype', 'logvar', 'shard_size', 'max_side', 'max_frames', 'checkpoint')
    blob = json.dumps([[r[0] for r in rows], {k: getattr(cfg, k) for k in keys}, asdict(tok.config)], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def encode_samples(tok, media, cfg):
    """Media list -> per sample dict(tokens | mean (+ logvar), coords), batched by cfg.batch_tokens."""
    ps, out = tok.config.patch_size, []
    for group in batches([media_tokens(m, ps) for m in media], cfg.batch_tokens):
        x = tok.pack([media[i] for i in group])
        _, mean, logvar, idx = tok.bottleneck(tok.encode(x))
        for j, rows in enumerate(torch.arange(len(x.coords)).split(x.seqlens)):
            s = dict(coords=x.coords[rows].cpu().to(torch.int16))
            if cfg.latent == 'fsq':
                s['tokens'] = idx[rows].cpu().to(INDEX_DTYPES[cfg.index_dtype])
            else:
                s['mean'] = mean[rows].float().cpu().to(FLOAT_DTYPES[cfg.dtype])
                if cfg.logvar:
                    s['logvar'] = logvar[rows].float().cpu().to(FLOAT_DTYPES[cfg.dtype])
            out.append(s)
    return out


def output_shape(media, patch_size):
    """The shape reconstruct returns for this input (centre-cropped / truncated to patch multiples)."""
    pt, ph, pw = patch_size
    if isinstance(media, dict):
        return [len(media['coords']), ph * pw * 3]
    H, W = media.shape[-3] // ph * ph, media.shape[-2] // pw * pw
    return [H, W, 3] if media.dim() == 3 else [media.shape[0] // pt * pt, H, W, 3]


def grid_of(media, patch_size):
    if isinstance(media, dict):
        return None
    pt, ph, pw = patch_size
    return [1 if media.dim() == 3 else media.shape[0] // pt, media.shape[-3] // ph, media.shape[-2] // pw]


def write_shard(path, samples, metas, skipped, extra):
    """Concatenate per-sample tensors, add offsets and the JSON metadata, write atomically."""
    from safetensors.torch import save_file
    keys = [k for k in ('tokens', 'mean', 'logvar') if samples and k in samples[0]] or [extra['tensor']]
    width = {'tokens': extra['groups'], 'mean': extra['latent'], 'logvar': extra['latent']}
    t = {k: torch.cat([s[k] for s in samples]) if samples else torch.zeros(0, width[k], dtype=extra['dtypes'][k])
         for k in keys}
    t['coords'] = torch.cat([s['coords'] for s in samples]) if samples else torch.zeros(0, 4, dtype=torch.int16)
    t['offsets'] = torch.tensor([0] + [len(s['coords']) for s in samples], dtype=torch.int64).cumsum(0)
    meta = dict(samples=json.dumps(metas), skipped=json.dumps(skipped), model_config=extra['model_config'],
                rank=str(extra['rank']),
                checkpoint=extra['checkpoint'], latent=extra['latent_kind'], fingerprint=extra['fingerprint'])
    convert.write_atomic(path, lambda f: save_file(t, f, metadata=meta))


def shard_name(k, n):
    return f"shard-{k:05d}-of-{n:05d}.safetensors"


def read_meta(path):
    from safetensors import safe_open
    with safe_open(path, 'pt') as f:
        return f.metadata()


def encode_shard(tok, rows, cfg, bar):
    """Load one shard's files (skipping bad ones), encode them, -> (samples, metas, skipped)."""
    ps, media, metas, skipped = tok.config.patch_size, [], [], []
    for source, caption, label in rows:
        try:
            m = load_input(source, cfg, ps)
        except (*data.READ_ERRORS, KeyError) as e:
            skipped.append([source, str(e) or type(e).__name__])
            bar.update(1)
            continue
        if cfg.kind == '3d':
            m, caption = m
        media.append(m)
        metas.append(dict(source=source, kind=cfg.kind, shape=output_shape(m, ps), grid=grid_of(m, ps),
                          caption=caption, label=label))
    samples = encode_samples(tok, media, cfg) if media else []
    bar.update(len(media))
    return samples, metas, skipped


def encode(cfg, rank=0, world=1):
    """Encode cfg.input into cfg.out (this rank's shards). -> stats dict (samples, tokens, seconds, skipped)."""
    from tqdm import tqdm
    if cfg.kind not in KINDS:
        raise ValueError(f"--kind={cfg.kind}: expected one of {KINDS}")
    device = pick_device(cfg.device)
    if device.type == 'cuda' and world > 1:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    tok = model.AToken.from_pretrained(cfg.checkpoint, cfg.config or None).to(device)
    check_latent(cfg, tok)
    rows = list_inputs(cfg)
    if not rows:
        raise ValueError(f"--input={cfg.input}: no {cfg.kind} files found")
    n = math.ceil(len(rows) / cfg.shard_size)
    os.makedirs(cfg.out, exist_ok=True)
    fp = fingerprint(rows, cfg, tok)
    c = tok.config
    extra = dict(model_config=json.dumps(asdict(c)), checkpoint=cfg.checkpoint, latent_kind=cfg.latent, rank=rank,
                 fingerprint=fp, groups=c.fsq_groups, latent=c.latent_channels,
                 tensor='tokens' if cfg.latent == 'fsq' else 'mean',
                 dtypes=dict(tokens=INDEX_DTYPES[cfg.index_dtype], mean=FLOAT_DTYPES[cfg.dtype],
                             logvar=FLOAT_DTYPES[cfg.dtype]))
    mine = [k for k in range(rank, n, world)]
    todo = []
    for k in mine:
        path = os.path.join(cfg.out, shard_name(k, n))
        if not os.path.exists(path):
            todo.append(k)
        elif read_meta(path).get('fingerprint') != fp:
            raise ValueError(f"{path} was made from another listing or other settings (fingerprint differs): "
                             f"use a new --out folder or delete the old shards")
    total = sum(len(rows[k * cfg.shard_size:(k + 1) * cfg.shard_size]) for k in todo)
    stats, t0 = dict(samples=0, tokens=0, skipped=[], shards=len(todo), done_before=len(mine) - len(todo)), time.time()
    bar = tqdm(total=total, desc=f"encode rank {rank}", unit='sample', disable=rank != 0, dynamic_ncols=True)
    for k in todo:
        chunk = rows[k * cfg.shard_size:(k + 1) * cfg.shard_size]
        samples, metas, skipped = encode_shard(tok, chunk, cfg, bar)
        write_shard(os.path.join(cfg.out, shard_name(k, n)), samples, metas, skipped, extra)
        stats['samples'] += len(samples)
        stats['tokens'] += sum(len(s['coords']) for s in samples)
        stats['skipped'] += skipped
        dt = max(time.time() - t0, 1e-9)
        bar.set_postfix(smp_s=f"{stats['samples'] / dt:.1f}", tok_s=f"{stats['tokens'] / dt:.0f}")
    bar.close()
    stats['seconds'] = time.time() - t0
    print(f"rank {rank}: {stats['samples']} samples, {stats['tokens']} tokens in {len(todo)} new shards "
          f"({stats['done_before']} already done), {len(stats['skipped'])} skipped, "
          f"{stats['samples'] / max(stats['seconds'], 1e-9):.1f} samples/s", flush=True)
    return stats


def check_latent(cfg, tok):
    if cfg.latent == 'auto':
        cfg.latent = 'fsq' if tok.config.use_quantizer else 'mean'
    if cfg.latent not in ('fsq', 'mean'):
        raise ValueError(f"--latent={cfg.latent}: expected fsq | mean | auto")
    if cfg.latent == 'fsq' and not tok.config.use_quantizer:
        raise ValueError(f"--latent=fsq: {cfg.checkpoint} has no quantizer (a continuous So/C model): use --latent=mean")
    if cfg.index_dtype not in INDEX_DTYPES or cfg.dtype not in FLOAT_DTYPES:
        raise ValueError(f"--index_dtype={cfg.index_dtype} / --dtype={cfg.dtype}: expected one of "
                         f"{list(INDEX_DTYPES)} / {list(FLOAT_DTYPES)}")
    dims = tok.config.latent_channels // tok.config.fsq_groups
    if cfg.latent == 'fsq' and cfg.index_dtype == 'int16' and tok.config.fsq_levels ** dims > 2 ** 15:
        raise ValueError(f"--index_dtype=int16 cannot hold {tok.config.fsq_levels ** dims} codes: use int32")


def write_index(cfg):
    """After every rank finished: out/index.json (shards, sample counts) and out/skipped.txt (every bad input)."""
    names = sorted(f for f in os.listdir(cfg.out) if f.startswith('shard-') and f.endswith('.safetensors'))
    shards, skipped = [], []
    for name in names:
        meta = read_meta(os.path.join(cfg.out, name))
        shards.append(dict(file=name, samples=len(json.loads(meta['samples']))))
        skipped += json.loads(meta['skipped'])
    convert.save_json(dict(shards=shards, samples=sum(s['samples'] for s in shards), skipped=skipped),
                      os.path.join(cfg.out, 'index.json'))
    convert.save_text(''.join(f"{s}\t{r}\n" for s, r in skipped), os.path.join(cfg.out, 'skipped.txt'))
    if skipped:
        print(f"{len(skipped)} inputs skipped (listed in {os.path.join(cfg.out, 'skipped.txt')}):")
        for s, r in skipped[:20]:
            print(f"  {s}: {r}")
    return skipped

# -----------------------------------------------------------------------------
# decoding


@torch.no_grad()
def decode_samples(tok, items, batch_tokens):
    """data.TokenShards items -> reconstructed media, batched by tokens as encode batched them. The latents are
    the FSQ codes of the indices, or the stored means (as float32)."""
    c, out = tok.config, []
    p = next(tok.parameters())
    for group in batches([len(it['coords']) for it in items], batch_tokens):
        its = [items[i] for i in group]
        if 'tokens' in its[0]:
            z = model.fsq_codes_from_indices(torch.cat([it['tokens'] for it in its]).long(),
                                             c.latent_channels // c.fsq_groups, c.fsq_levels)
        else:
            z = torch.cat([it['mean'] for it in its]).float()
        coords = torch.cat([it['coords'] for it in its]).long()
        seqlens, kinds = [len(it['coords']) for it in its], [it['kind'] for it in its]
        grids = [tuple(it['grid']) if it['grid'] else None for it in its]
        x = model.Packed(z, coords, seqlens, kinds, grids, c.patch_size,
                         build_structure(coords, seqlens, kinds, c)).to(p.device)
        out += [m.float().cpu() for m in model.unpack(tok.decode(x.feats.to(p.dtype), x), x, c.patch_size)]
    return out


def save_media(media, item, folder, index, gs, fps):
    """One decoded sample -> a file in `folder`: PNG (image), MP4 (video), 3D: PNG strip of Gaussian renders from
    the asset's own cameras when a Gaussian decoder is given, else the voxel features (.npz)."""
    from PIL import Image
    name = os.path.join(folder, f"{index:07d}_{os.path.splitext(os.path.basename(item['source'].rstrip('/')))[0]}")
    if item['kind'] == 'image':
        Image.fromarray(model.to_uint8(media).numpy()).save(name + '.png')
        return name + '.png'
    if item['kind'] == 'video':
        data.save_video(model.to_uint8(media), name + '.mp4', fps)
        return name + '.mp4'
    if gs is None:
        np.savez(name + '.npz', feats=media.numpy(), coords=item['coords'][:, 1:].numpy())
        return name + '.npz'
    cams = render3d.load_prepared(item['source'])['cameras'] if os.path.isdir(item['source']) else \
        render3d.sphere_cameras(4, resolution=256)
    views = render3d.render_views(gs, media, item['coords'][:, 1:], cams)                # [V, H, W, 3] in [-1, 1]
    Image.fromarray(model.to_uint8(torch.cat(list(views), 1)).numpy()).save(name + '.png')
    return name + '.png'


def decode(cfg):
    """Decode the shards in cfg.out into cfg.decoded (at most cfg.limit samples). -> list of written files."""
    from tqdm import tqdm
    device = pick_device(cfg.device)
    tok = model.AToken.from_pretrained(cfg.checkpoint, cfg.config or None).to(device)
    gs = model.GaussianDecoder.from_pretrained(cfg.gs_checkpoint, cfg.gs_config or None).to(device) \
        if cfg.gs_checkpoint else None
    ds = data.TokenShards(cfg.out)
    n = min(len(ds), cfg.limit) if cfg.limit else len(ds)
    os.makedirs(cfg.decoded, exist_ok=True)
    written, chunk = [], 64
    for start in tqdm(range(0, n, chunk), desc='decode', unit='chunk'):
        items = [ds[i] for i in range(start, min(start + chunk, n))]
        for i, (m, it) in enumerate(zip(decode_samples(tok, items, cfg.batch_tokens), items)):
            written.append(save_media(m, it, cfg.decoded, start + i, gs, cfg.fps))
    print(f"decoded {len(written)} samples into {cfg.decoded}")
    return written

# -----------------------------------------------------------------------------
# command line (torchrun: every rank encodes its shards; rank 0 writes the index once all are done)


def main(argv):
    if not argv or argv[0] not in ('encode', 'decode'):
        raise SystemExit("usage: python shards.py encode|decode --key=value ...\n" + __doc__)
    cfg = apply_flags(ShardConfig(), argv[1:])
    if argv[0] == 'decode':
        return decode(cfg)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group('gloo')                 # only for the final barrier
    stats = encode(cfg, rank, world)
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_index(cfg)
    if world > 1:
        dist.destroy_process_group()
    return stats


if __name__ == '__main__':
    main(sys.argv[1:])
