"""
Long video: encode and decode a long clip three ways and compare time, peak memory, quality and seams.

  tiles    the default: independent 16-frame tiles (4 latent frames), all tiles of the clip in one packed
           batch (block-diagonal attention: a tile attends only to itself)
  kvcache  the decoder with a KV cache of the previous latent frame (decoder_cache_frames = 4, paper Fig. 6):
           decodes 3 new latent frames per step, steps in sequence; the encoder is unchanged
  overlap  overlapping 16-frame windows with stride 8, each encoded and decoded independently (one packed
           batch), blended with triangular weights: twice the work of `tiles`

Seam error: mean |(rec[f+1] - rec[f]) - (x[f+1] - x[f])| over frame pairs f|f+1 that straddle a 16-frame
tile boundary (15|16, 31|32, ...), next to the same quantity over latent-frame boundaries inside a tile
(3|4, 7|8, 11|12): a seam shows as a ratio well above 1. Cost should grow linearly with the length.

On CPU the default fits the tiny preset for a few hundred steps on 16-frame procedural clips first (random
weights make reconstructions, and so seams, meaningless). Peak memory: torch.cuda.max_memory_allocated on
CUDA; on CPU (which has no allocator statistics) the peak bytes of live tensor storages, tracked op by op
with a TorchDispatchMode in a second, untimed pass (scratch space inside fused ops is not seen).

    python bench/bench_long_video.py                          # CPU: tiny, 64 px, 32-256 frames, ~1.5 min
    python bench/bench_long_video.py --preset so400m --size 256 --frames 64,128,256 --fit_steps 0 \\
        --checkpoint /path/to/atoken_so.pt                      # GPU
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import argparse
import dataclasses
import time

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
import model
from structure import build_structure

MODES = ('tiles', 'kvcache', 'overlap')
TILE = 16


def clip(frames, size, seed):
    """A procedural video (frames, size, size, 3) in [-1, 1] (data.py's moving shapes)."""
    scene = data.random_scene(np.random.default_rng(seed), video=True)
    return data.render_scene(scene, size, size, torch.arange(frames, dtype=torch.float32))


def fit(net, video, steps, seed=0):
    """L1 steps on random 16-frame windows of the clip (a CPU stand-in for a trained tokenizer)."""
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        starts = torch.randint(0, len(video) - TILE + 1, (4,), generator=g).tolist()
        x = net.pack([video[s:s + TILE] for s in starts])
        loss = (net(x, sample=False)['rec'] - x.feats).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  fit step {step:4d}  L1 {loss.item():.4f}")
    net.eval()


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the block (a CPU stand-in for max_memory_allocated)."""

    def __enter__(self):
        self.live, self.now, self.peak = {}, 0, 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, n) in list(self.live.items()):          # drop storages freed since the last op
            if ref.expired():
                del self.live[key]
                self.now -= n
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == 'cpu':
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:                  # views and in-place results share a storage
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.now += t.untyped_storage().nbytes()
        self.peak = max(self.peak, self.now)
        return out


# -----------------------------------------------------------------------------
# the three ways


def windows_of(video, mode):
    """The media the tokenizer sees: the whole clip, or overlapping 16-frame windows with stride 8."""
    if mode != 'overlap':
        return [video]
    if (len(video) - TILE) % (TILE // 2):
        raise ValueError(f"overlap needs a length of 16 + a multiple of 8 frames, got {len(video)}")
    return [video[s:s + TILE] for s in range(0, len(video) - TILE + 1, TILE // 2)]


@torch.no_grad()
def encode(net, video, mode):
    x = net.pack(windows_of(video, mode))
    return x, net.bottleneck(net.encode(x))[0]                                  # packed input, latents [N, L]


@torch.no_grad()
def decode(net, x, z, mode, frames):
    """-> the reconstruction (T, H, W, 3); overlapping windows blended with triangular weights."""
    net.config.decoder_cache_frames = 4 if mode == 'kvcache' else 0
    x = dataclasses.replace(x, structure=build_structure(x.coords.cpu(), x.seqlens, x.kinds, net.config))  # + cache
    recs = model.unpack(net.decode(z, x.to(z.device)), x, net.config.patch_size)
    net.config.decoder_cache_frames = 0
    if mode != 'overlap':
        return recs[0]
    w = torch.minimum(torch.arange(TILE) + 1, TILE - torch.arange(TILE)).float().to(z.device)  # 1..8, 8..1
    out, norm = recs[0].new_zeros(frames, *recs[0].shape[1:]), z.new_zeros(frames)
    for i, r in enumerate(recs):
        s = i * TILE // 2
        out[s:s + TILE] += w[:, None, None, None] * r
        norm[s:s + TILE] += w
    return out / norm[:, None, None, None]


def measure(fn, device):
    """fn() -> (result, seconds, peak bytes above the start); memory from a second, untimed call on CPU."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        m0 = torch.cuda.memory_allocated()
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    seconds = time.perf_counter() - t0
    if device.type == 'cuda':
        return out, seconds, torch.cuda.max_memory_allocated() - m0
    with PeakMemory() as tracker:
        fn()
    return out, seconds, tracker.peak


def seam_error(rec, video):
    """(error of the temporal difference at tile boundaries, same inside tiles at latent-frame boundaries)."""
    e = ((rec[1:] - rec[:-1]) - (video[1:] - video[:-1])).abs().mean((1, 2, 3))   # [T-1], pair f|f+1
    f = torch.arange(len(e))
    at_tile = e[f % TILE == TILE - 1]
    inside = e[(f % 4 == 3) & (f % TILE != TILE - 1)]
    return at_tile.mean().item(), inside.mean().item()


def run_one(net, video, mode):
    (x, z), t_enc, m_enc = measure(lambda: encode(net, video, mode), video.device)
    rec, t_dec, m_dec = measure(lambda: decode(net, x, z, mode, len(video)), video.device)
    seam, inside = seam_error(rec.float(), video.float())
    psnr = 10 * torch.log10(4 / ((rec.float() - video.float()) ** 2).mean()).item()
    return dict(mode=mode, frames=len(video), enc=t_enc, dec=t_dec, m_enc=m_enc, m_dec=m_dec, psnr=psnr,
                seam=seam, inside=inside)


# -----------------------------------------------------------------------------
# main


def build(args, device):
    if args.checkpoint:
        net = model.AToken.from_pretrained(args.checkpoint)
    else:
        torch.manual_seed(args.seed)
        net = model.AToken(model.PRESETS[args.preset])
        net.init_weights()
    return net.to(device).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    p.add_argument('--preset', default='tiny')
    p.add_argument('--checkpoint', default=None, help='official checkpoint (AToken.from_pretrained)')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--frames', default='32,64,128,256')
    p.add_argument('--fit_steps', type=int, default=300, help='L1 steps on 16-frame windows first (0: none)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, preset {args.preset}, "
          f"{args.size} px, frames {args.frames}")
    net = build(args, device)
    lengths = [int(f) for f in args.frames.split(',')]
    video = clip(max(lengths), args.size, args.seed).to(device)                # (T, H, W, 3) in [-1, 1]
    if args.fit_steps:
        print(f"fitting {args.fit_steps} L1 steps on random {TILE}-frame windows of the clip (CPU demo)")
        fit(net, video, args.fit_steps, args.seed)
    net.eval()
    for mode in MODES:                                                          # warm-up
        run_one(net, video[:2 * TILE], mode)
    rows = [run_one(net, video[:frames], mode) for frames in lengths for mode in MODES]
    print("peak memory: above the start of each phase; ms/frame: encode + decode")
    print(f"{'mode':8s} {'frames':>6s} {'encode s':>9s} {'decode s':>9s} {'ms/frame':>9s} {'enc MiB':>8s} "
          f"{'dec MiB':>8s} {'PSNR':>6s} {'seam err':>9s} {'in-tile':>8s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['frames']:6d} {r['enc']:9.3f} {r['dec']:9.3f} "
              f"{(r['enc'] + r['dec']) / r['frames'] * 1e3:9.2f} {r['m_enc'] / 2**20:8.1f} {r['m_dec'] / 2**20:8.1f} "
              f"{r['psnr']:6.2f} {r['seam']:9.4f} {r['inside']:8.4f} {r['seam'] / r['inside']:6.2f}")


if __name__ == '__main__':
    main()
