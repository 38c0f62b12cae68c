"""
Data for AToken: built-in procedural media so that training, evaluation and tests need no download.

For now this holds the procedural generator used by the CPU demo and the tests: images of textured
shapes on gradient backgrounds at varied sizes and aspect ratios, and videos of such shapes moving.
Everything is deterministic from a seed; 'train' and 'val' draw from disjoint seed streams.
(Real image/video folders, 3D assets and token-budget packing come with the data issue.)

Pixels are float32 in [-1, 1], channels last: images (H, W, 3), videos (T, H, W, 3).
"""
import math

import torch

SPLIT_OFFSET = {'train': 0, 'val': 1_000_003}   # seeds of the two splits never meet


def _canvas(g, H, W):
    """A random linear colour gradient (H, W, 3) in [-1, 1]."""
    c0, c1 = torch.rand(3, generator=g) * 2 - 1, torch.rand(3, generator=g) * 2 - 1
    angle = torch.rand(1, generator=g).item() * 2 * math.pi
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing='ij')
    s = (xx * math.cos(angle) + yy * math.sin(angle)).clamp(0, 1)[..., None]  # (H, W, 1)
    return c0 * (1 - s) + c1 * s


def _shape_mask(g, H, W, cx, cy, r):
    """A disc, square or stripe-textured ellipse centred at (cx, cy) (fractions of W, H), radius r of min(H, W)."""
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing='ij')
    dx, dy = (xx - cx * W) / (r * min(H, W)), (yy - cy * H) / (r * min(H, W))
    kind = int(torch.randint(3, (1,), generator=g))
    if kind == 0:
        return (dx ** 2 + dy ** 2) <= 1
    if kind == 1:
        return (dx.abs() <= 1) & (dy.abs() <= 1)
    return (dx ** 2 / 1.5 + dy ** 2 * 1.5) <= 1


def _draw(g, img, n_shapes, offsets):
    """Paint n_shapes textured shapes; offsets (dx, dy) shift every shape (for video motion)."""
    H, W, _ = img.shape
    for _ in range(n_shapes):
        cx, cy, r = torch.rand(3, generator=g).tolist()
        colour = torch.rand(3, generator=g) * 2 - 1
        freq = 2 + 10 * torch.rand(1, generator=g).item()
        m = _shape_mask(g, H, W, cx + offsets[0], cy + offsets[1], 0.15 + 0.25 * r)
        stripes = torch.sin(torch.arange(W) * freq * 2 * math.pi / W)[None, :, None] * 0.3  # (1, W, 1)
        img = torch.where(m[..., None], (colour + stripes).clamp(-1, 1), img)
    return img


def synthetic_image(seed, split='train', sizes=(32, 64), patch=8):
    """One procedural image; height and width drawn in [sizes[0], sizes[1]], multiples of `patch`."""
    g = torch.Generator().manual_seed(seed + SPLIT_OFFSET[split])
    lo, hi = sizes[0] // patch, sizes[1] // patch
    H, W = (int(torch.randint(lo, hi + 1, (1,), generator=g)) * patch for _ in range(2))
    return _draw(g, _canvas(g, H, W), n_shapes=1 + int(torch.randint(3, (1,), generator=g)), offsets=(0, 0))


def synthetic_video(seed, split='train', frames=8, sizes=(32, 48), patch=8):
    """One procedural video: shapes translating on a fixed background."""
    g = torch.Generator().manual_seed(seed + SPLIT_OFFSET[split])
    lo, hi = sizes[0] // patch, sizes[1] // patch
    H, W = (int(torch.randint(lo, hi + 1, (1,), generator=g)) * patch for _ in range(2))
    bg = _canvas(g, H, W)
    shape_seed = int(torch.randint(2 ** 31, (1,), generator=g))
    vx, vy = ((torch.rand(2, generator=g) - 0.5) * 0.1).tolist()   # per-frame motion, fraction of size
    out = [_draw(torch.Generator().manual_seed(shape_seed), bg, 2, (vx * t, vy * t)) for t in range(frames)]
    return torch.stack(out)                                           # (T, H, W, 3)


def synthetic_media(n_images, n_videos, split='train', seed=0, patch=8):
    """A fixed list of images then videos from one split."""
    return ([synthetic_image(seed + i, split, patch=patch) for i in range(n_images)] +
            [synthetic_video(seed + 10_000 + i, split, patch=patch) for i in range(n_videos)])
