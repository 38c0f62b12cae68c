"""
Two experiments that locate the limits of the CPU demo (NOTES.md, "CPU demo at the paper's compression"):

    python bench/demo_limits.py pca                 # best linear per-patch code vs bicubic at the same floats
    python bench/demo_limits.py probe --steps=3000  # can the tiny encoder learn the shapes with labels?

pca: per-patch PCA (the MSE-optimal linear code of a patch) fitted on built-in training images, scored on
held-out ones next to eval.bicubic_baseline keeping as many floats per pixel; mean PSNR over the images.
probe: the tiny preset's encoder + pooling head, a linear head on the pooled embedding, cross-entropy on the
built-in labels' shape and colour (supervised: an upper bound for what the sigmoid loss on captions teaches
in the same number of steps); prints held-out accuracy every --every steps.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data                 # noqa: E402
import eval as ev           # noqa: E402
import model                # noqa: E402


def scenes(split, n, H, W):
    """n built-in images of a split at H x W, (n, H, W, 3) in [-1, 1]."""
    return torch.stack([data.render_scene(data.random_scene(data._content_rng(0, data.SPLITS[split], i), False), H, W,
                                          torch.zeros(1))[0] for i in range(n)])


def pca(args):
    for H, p, k in ((32, 8, 12), (64, 16, 48), (128, 16, 48)):      # 12 / (8*8) = 48 / (16*16) * 4: both 16x
        train, val = scenes('train', args.n_fit, H, H), scenes('val', args.n_val, H, H)
        patches = lambda x: x.reshape(-1, H // p, p, H // p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3)
        X = patches(train).double()
        mu = X.mean(0)
        basis = torch.linalg.svd(X - mu, full_matrices=False)[2][:k]                       # [k, p*p*3]
        rec = (patches(val).double() - mu) @ basis.T @ basis + mu
        rec = rec.reshape(-1, H // p, H // p, p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(val.shape).float()
        print(f"{H} px, {p}x{p} patches, {k} floats: PCA {ev.psnr(rec.clamp(-1, 1), val).mean():.2f} dB, "
              f"bicubic {ev.psnr(ev.bicubic_baseline(val, k / p ** 2), val).mean():.2f} dB")


def probe(args):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = model.AToken(model.PRESETS['tiny']).init_weights()
    ps = model.PRESETS['tiny'].patch_size
    train, val = (data.SyntheticImages(n, split, res=args.res, patch_size=ps) for n, split in ((2048, 'train'),
                                                                                                 (96, 'val')))
    head = nn.Linear(tok.config.encoder_width, len(data.SHAPES) + len(data.COLOURS))
    opt = torch.optim.AdamW([*tok.encoder.parameters(), *head.parameters()], lr=args.lr)

    def batch(ds, idx):
        s = [ds[i] for i in idx]
        x = tok.pack([a.media for a in s])
        shape = torch.tensor([data.SHAPES.index(a.class_name.split()[1]) for a in s])
        colour = torch.tensor([list(data.COLOURS).index(a.class_name.split()[0]) for a in s])
        return head(tok.embed_features(tok.encode(x), x)), shape, colour

    t0, S = time.time(), len(data.SHAPES)
    for step in range(args.steps + 1):
        logits, shape, colour = batch(train, torch.randint(0, len(train), (32,)).tolist())
        loss_shape = F.cross_entropy(logits[:, :S], shape)
        loss = loss_shape + F.cross_entropy(logits[:, S:], colour)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            with torch.no_grad():
                logits, shape, colour = batch(val, range(len(val)))
            print(f"step {step}: train shape loss {loss_shape.item():.3f} (chance {torch.log(torch.tensor(S)):.3f}), "
                  f"held-out shape acc {(logits[:, :S].argmax(1) == shape).float().mean():.3f} (chance {1 / S:.3f}), "
                  f"colour acc {(logits[:, S:].argmax(1) == colour).float().mean():.3f}  [{time.time() - t0:.0f} s]",
                  flush=True)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=['pca', 'probe'])
    p.add_argument('--n_fit', type=int, default=400, help='pca: training images the basis is fitted on')
    p.add_argument('--n_val', type=int, default=48)
    p.add_argument('--steps', type=int, default=600, help='probe: optimizer steps of 32 images')
    p.add_argument('--every', type=int, default=100)
    p.add_argument('--res', type=lambda s: tuple(int(v) for v in s.split(',')), default=(32, 64))
    p.add_argument('--lr', type=float, default=2e-3)
    args = p.parse_args()
    pca(args) if args.what == 'pca' else probe(args)
