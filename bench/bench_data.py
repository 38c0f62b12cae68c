"""
Is data loading the bottleneck? Measures data.py's loaders on CPU, samples/s and tokens/s, for the built-in
images and videos and for real image (JPEG) and video (H.264 mp4) files written to a temp dir, with 0 and 2
DataLoader workers; then the tiny model's training step (forward + backward + AdamW, L1 on the
reconstruction) on packed batches of the same token budget. The loader keeps up when its tokens/s is
above the model's. Timings include worker start-up and (for files) decoding and resizing.

    python bench/bench_data.py              # about 1 minute on 2 CPU cores
    python bench/bench_data.py --threads=1  # torch threads of the main process (workers use 1 each);
                                            # 1 gives steadier figures on a machine shared with other jobs
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import model

CONFIG = model.PRESETS['tiny']
PS = CONFIG.patch_size              # (4, 8, 8)
BUDGET = 4096                       # tokens per step
IMAGE_RES, VIDEO_RES = (64, 256), (64, 128)


def write_files(root, n_images=128, n_videos=64, distinct=16):
    """Real files with real-looking content: built-in scenes saved as 320x240 JPEGs and 32-frame 192x144
    H.264 mp4s at 24 fps. Only `distinct` of each are rendered, the rest are copies (the loader reads
    every file anew, so copies cost it the same)."""
    os.makedirs(f'{root}/images')
    os.makedirs(f'{root}/videos')
    to_uint8 = lambda x: ((x + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    for i in range(distinct):
        scene = data.random_scene(np.random.default_rng(i), video=False)
        Image.fromarray(to_uint8(data.render_scene(scene, 240, 320, torch.zeros(1))[0])).save(
            f'{root}/images/{i:03d}.jpg', quality=90)
        scene = data.random_scene(np.random.default_rng(1000 + i), video=True)
        frames = to_uint8(data.render_scene(scene, 144, 192, torch.arange(32.0)))          # (32, 144, 192, 3)
        with av.open(f'{root}/videos/{i:03d}.mp4', 'w') as c:
            s = c.add_stream('libx264', rate=24)
            s.width, s.height, s.pix_fmt = 192, 144, 'yuv420p'
            for f in frames:
                for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    for folder, n, ext in [('images', n_images, 'jpg'), ('videos', n_videos, 'mp4')]:
        for i in range(distinct, n):
            shutil.copy(f'{root}/{folder}/{i % distinct:03d}.{ext}', f'{root}/{folder}/{i:03d}.{ext}')


def time_loader(ds, workers):
    """One epoch through make_loader -> (samples/s, tokens/s, steps, mean budget fill)."""
    loader = data.make_loader(ds, BUDGET, PS, num_workers=workers)
    t0, samples, tokens, steps = time.perf_counter(), 0, 0, 0
    for batch in loader:
        samples, tokens, steps = samples + len(batch.sources), tokens + sum(batch.packed.seqlens), steps + 1
    dt = time.perf_counter() - t0
    return samples / dt, tokens / dt, steps, tokens / (steps * BUDGET)


def time_model(ds, steps=6):
    """Tiny model training steps on packed batches of this budget -> (s/step, tokens/s)."""
    torch.manual_seed(0)
    tok = model.AToken(CONFIG).init_weights().train()
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batches = [b.packed for b, _ in zip(data.make_loader(ds, BUDGET, PS), range(steps + 1))]
    times = []
    for packed in batches:
        t0 = time.perf_counter()
        loss = F.l1_loss(tok(packed)['rec'], packed.feats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    dt = sum(times[1:]) / len(times[1:])                              # first step is warm-up
    return dt, sum(sum(p.seqlens) for p in batches[1:]) / sum(times[1:])


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} (other processes slow this down); tiny model, patch {PS}, "
          f"budget {BUDGET} tokens/step")
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        write_files(root)
        print(f"wrote test files in {time.perf_counter() - t0:.1f}s")
        sources = {
            'synthetic images, 64-256 px': data.SyntheticImages(256, res=IMAGE_RES, patch_size=PS),
            'synthetic videos, 64-128 px, 4-16 frames': data.SyntheticVideos(64, res=VIDEO_RES, patch_size=PS),
            'jpeg files, 320x240 -> 64-256 px': data.ImageFolder(f'{root}/images', res=IMAGE_RES, patch_size=PS),
            'mp4 files, 192x144 -> 64-128 px, recon <=16': data.VideoFolder(
                f'{root}/videos', 'recon', res=VIDEO_RES, patch_size=PS, max_frames=16),
        }
        print(f"\n{'loader':44s} {'workers':>7s} {'samples/s':>10s} {'tokens/s':>10s} {'steps':>6s} {'fill':>5s}")
        best = {}
        for name, ds in sources.items():
            for workers in (0, 2):
                sps, tps, steps, fill = time_loader(ds, workers)
                best[name] = max(best.get(name, 0), tps)
                print(f"{name:44s} {workers:7d} {sps:10.1f} {tps:10.0f} {steps:6d} {fill:5.0%}")
        dt, model_tps = time_model(data.Concat([sources[k] for k in list(sources)[:2]]))
        print(f"\ntiny model step (fwd+bwd+AdamW) on mixed batches of {BUDGET} tokens: {dt * 1000:.0f} ms/step, "
              f"{model_tps:.0f} tokens/s")
        print("loader tokens/s (best of 0/2 workers) / model tokens/s:  " +
              ", ".join(f"{name.split(',')[0]} {tps / model_tps:.1f}x" for name, tps in best.items()))


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    torch.set_num_threads(parser.parse_args().threads)
    warnings.simplefilter('ignore', UserWarning)   # no bad files here; keep the table clean
    main()
