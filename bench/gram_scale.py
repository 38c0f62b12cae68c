"""
How big is the Gram term next to L1 and LPIPS on real photos? Eq. 6 weighs them 1 : 10 : 1e3; what that balance
means depends on the Gram normalisation (losses.gram_loss: per layer (4 / C^2) of Gatys et al.'s E_l). This prints,
for pairs of real photos, the raw and weighted L1 (native size), LPIPS and Gram (224 px copies, as in training),
and Gram per VGG16 layer next to Gatys' E_l.

Pairs: a photo against a 4x bicubic down-and-up copy of itself (a blurry "reconstruction"), against a JPEG
(quality 10) copy, and against a different photo.

    python bench/gram_scale.py a.png b.png ...      # any photos (the first is the reference)
    python bench/gram_scale.py                       # scikit-image's sample photos, when skimage is importable
    options: --vgg_weights <torchvision vgg16 .pth> (without it VGG16 is RANDOM: the figures then describe
             random features, not the pretrained ones the paper's lambdas were set for)

Measured (2-core CPU, seed 0, scikit-image 0.26's astronaut.png vs coffee.png and chelsea.png;
no pretrained VGG16 can be downloaded here, so VGG16 was RANDOM):
  astronaut vs 4x bicubic: L1 0.054, 10*LPIPS 0.027, 1e3*Gram 8.6e-7; vs JPEG q10: 0.061, 0.029, 4.0e-7;
  vs coffee: 0.60, 2.05, 7.2e-4. Random VGG features are small and Gram is fourth order in them, so the term
  is negligible with random weights; with ImageNet weights (--vgg_weights) it is the number that matters.
  Per layer, gram = (4 / C^2) E_l holds to the printed digits (relu1_2: 4.42e-10 = 4/4096 * 4.53e-7).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import argparse
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import losses

LAYERS = ['relu1_2', 'relu2_2', 'relu3_3', 'relu4_3', 'relu5_3']


def load(path, side=512):
    """A photo -> (H, W, 3) float in [-1, 1], the longer side resized to `side` (multiples of 16)."""
    im = Image.open(path).convert('RGB')
    s = side / max(im.size)
    im = im.resize((round(im.width * s / 16) * 16, round(im.height * s / 16) * 16), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1)


def degraded(x):
    """The two degraded copies of x: 4x bicubic down and up; JPEG quality 10."""
    c = x.permute(2, 0, 1)[None]                                                  # [1, 3, H, W]
    blur = F.interpolate(F.interpolate(c, scale_factor=0.25, mode='bicubic', antialias=True), size=c.shape[2:],
                         mode='bicubic').clamp(-1, 1)[0].permute(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(((x + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(buf, 'JPEG', quality=10)
    jpeg = torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 127.5 - 1)
    return {'4x bicubic': blur, 'JPEG q10': jpeg}


def terms(frozen, cfg, x, y):
    """L1 at native size; LPIPS, Gram (ours, per layer) and Gatys' E_l per layer on perceptual_size copies."""
    with torch.no_grad():
        fx = frozen.vgg_features(losses.resize([x], cfg.perceptual_size))
        fy = frozen.vgg_features(losses.resize([y], cfg.perceptual_size))
        out = dict(l1=losses.l1_loss(x, y).item(), lpips=losses.lpips_from_features(fx, fy, frozen.lpips.lins).item(),
                   gram=losses.gram_loss(fx, fy).item())
        for name, a, b in zip(LAYERS, fx, fy):
            C, M = a.shape[1], a.shape[2] * a.shape[3]
            A, B = a[0].double().reshape(C, M), b[0].double().reshape(C, M)
            out[f'gram {name}'] = losses.gram_loss([a], [b]).item()
            out[f'E {name}'] = ((A @ A.T - B @ B.T) ** 2).sum().item() / (4 * C ** 2 * M ** 2)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('photos', nargs='*')
    ap.add_argument('--vgg_weights', default='')
    args = ap.parse_args()
    photos = args.photos
    if not photos:
        try:
            import skimage
        except ImportError:
            sys.exit("no photos given and scikit-image is not importable: pass two or more photo files")
        root = os.path.join(os.path.dirname(skimage.__file__), 'data')
        photos = [os.path.join(root, f) for f in ('astronaut.png', 'coffee.png', 'chelsea.png')]
    torch.manual_seed(0)
    cfg = losses.LossConfig(siglip_model='tiny', random_frozen=not args.vgg_weights, vgg_weights=args.vgg_weights)
    frozen = losses.FrozenNets(cfg, embed_dim=64)
    ref = load(photos[0])
    pairs = dict(degraded(ref))
    for p in photos[1:]:
        other = load(p)
        h, w = min(ref.shape[0], other.shape[0]), min(ref.shape[1], other.shape[1])
        pairs[f'vs {os.path.basename(p)}'] = other[:h, :w]
    print(f"reference {os.path.basename(photos[0])} {tuple(ref.shape[:2])}; VGG16 "
          f"{'from ' + args.vgg_weights if args.vgg_weights else 'RANDOM (no --vgg_weights)'}; perceptual copies "
          f"{cfg.perceptual_size} px")
    print(f"{'pair':18s} {'L1':>8s} {'LPIPS':>8s} {'Gram':>10s} | weighted: {'1*L1':>7s} {'10*LPIPS':>9s} "
          f"{'1e3*Gram':>9s}")
    for name, y in pairs.items():
        x = ref[:y.shape[0], :y.shape[1]]
        t = terms(frozen, cfg, x, y)
        print(f"{name:18s} {t['l1']:8.4f} {t['lpips']:8.4f} {t['gram']:10.3e} |           {t['l1']:7.4f} "
              f"{10 * t['lpips']:9.4f} {1e3 * t['gram']:9.4f}")
        print('    per layer: ' + ', '.join(f"{n} {t['gram ' + n]:.2e} (E_l {t['E ' + n]:.2e})" for n in LAYERS))


if __name__ == '__main__':
    main()
