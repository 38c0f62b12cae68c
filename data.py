"""
Data for AToken: a built-in procedural dataset (no download), loaders for real image and video files,
resolution sampling, and packing samples of mixed sizes and modalities into a token budget per step.

  built-in     SyntheticImages, SyntheticVideos: textured shapes on textured backgrounds, each sample with
               a caption and a class label ("red circle"), deterministic from (seed, split, index). The
               'train' and 'val' splits draw from different random streams, so they share no sample.
               Each sample is rendered once, at its native size, and cached in memory as uint8 (per
               process, see cache_bytes()); each epoch resizes that render to its drawn size, so pixels
               always lie on the uint8 grid k / 127.5 - 1; each drawn size is kept too, so later epochs
               cost a look-up.
  real files   ImageFolder (any format PIL reads) and VideoFolder (mp4/webm/mkv/mov via PyAV), from a folder
               or from a JSONL/CSV manifest with captions and labels. Clips are sampled as in the paper
               (Sec. 3.5, stage 2): stride 1-3 for reconstruction, ~1 fps up to 64 frames for understanding.
               save_video writes frames back to MP4 (evaluation grids, decoded shards).
  resolution   sample_resolution: the longer side drawn in a stage's [min, max] (Table 2), aspect kept.
  packing      TokenBudgetSampler groups samples so that one step holds at most `budget` tokens on each
               rank (a sample over it is drawn smaller, or left out and reported); collate turns them into
               one model.Packed token set (NaViT's "patch n' pack", Dehghani et al. 2023) plus
               captions and labels. make_loader wires up a DataLoader; for training, TaskStream is one
               resumable stream per task of a curriculum stage (build_datasets, task_budget, task_samples).
  bad input    unreadable, truncated or empty files, videos without frames and manifest rows pointing to
               missing files are skipped with one warning "skipped <file>: <reason>" and counted
               (dataset.skipped when found by scanning, Batch.skipped when found by decoding; see
               skip_report). strict=True raises instead.
  3D           Synthetic3D (procedural textured primitives, labelled by shape) and AssetFolder (assets
               prepared by `python render3d.py prepare`): voxel tokens + ground-truth views, through
               the same item interface (render3d.py does the rendering and voxel packing).

Every dataset is a map-style torch Dataset addressed by keys (index, epoch): what an item holds depends on
its key alone, never on worker or process state, so DataLoader workers, DDP ranks and reruns all see the
same data. The item interface: len(ds); ds[key] -> Sample (or Skipped); ds.num_tokens(key), known
without decoding anything (packing needs it); ds.source(i); ds.skipped; ds.classes (label names; a
Concat has none, Sample.class_name says what a label means).
The resolution range is the attribute `res`: a curriculum changes it between epochs (not within one,
the sampler plans an epoch's token counts up front).

    ds = Concat([SyntheticImages(1000, res=(32, 64), patch_size=(4, 8, 8)),
                 SyntheticVideos(200, res=(32, 48), patch_size=(4, 8, 8))])
    loader = make_loader(ds, budget=2048, config=model.PRESETS['tiny'], num_workers=2)
    for epoch in range(3):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader: ...        # batch.packed (model.Packed), batch.captions, batch.labels

Pixels are float32 in [-1, 1], channels last: images (H, W, 3), videos (T, H, W, 3).
Letters as in model.py: T frames, H W height width, N tokens.
Tests: python -m pytest tests/test_data.py. Loader speed vs the model: python bench/bench_data.py.
"""
import bisect
import csv
import functools
import json
import math
import os
import random
import warnings
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

import model
from structure import build_structure

# -----------------------------------------------------------------------------
# items, keys and random streams


@dataclass
class Sample:
    _media: object          # .media, or None when pixels holds it (below)
    kind: str               # 'image' | 'video' | '3d'
    caption: str            # '' when the source has none
    label: int              # index into the dataset's `classes`, -1 when unknown
    class_name: str         # '' when unknown
    source: str             # file path, or 'synthetic:<split>:<kind>:<index>'
    pixels: object = None   # the same media as uint8 levels u (media = u / 127.5 - 1) when the source has them
                            # (the built-in datasets): collate ships these without converting twice

    @property
    def media(self):
        """Image (H, W, 3) or video (T, H, W, 3), float32 in [-1, 1], patch multiples; 3D: dict(feats [N, ph*pw*3]
        in [-1, 1], coords [N, 3], views [V, H, W, 3] in [-1, 1], cameras [render3d.Camera]) (model.pack reads
        feats and coords). A sample given as uint8 pixels only makes its float copy on first read: a training
        batch of them (data.collate) never reads it."""
        if self._media is None and self.pixels is not None:
            self._media = model.from_uint8(self.pixels)
        return self._media


@dataclass
class Skipped:
    """What __getitem__ returns for a file that fails to decode (non-strict); collate drops and records it."""
    source: str
    reason: str


# Independent random streams: every draw comes from np.random.default_rng([seed, stream, split, index, epoch]).
# The key always has 5 entries: numpy's SeedSequence treats [1, 2] and [1, 2, 0] as the same seed.
CONTENT, SIZE, CLIP, SHUFFLE, MESH = range(5)
SPLITS = {'train': 0, 'val': 1}


def _rng(seed, stream, split, index, epoch):
    return np.random.default_rng([seed, stream, split, index, epoch])


def _key(key, n):
    """Dataset key -> (index, epoch): keys are (index, epoch) or (index, epoch, budget) from TokenBudgetSampler,
    or an index (epoch 0)."""
    i, epoch = key[:2] if isinstance(key, tuple) else (key, 0)
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a dataset of {n}")
    return int(i), int(epoch)


def _budget(key):
    """The token budget a key asks its sample to fit (TokenBudgetSampler adds it to the key of a sample that was
    over it at its drawn size); 0 = none."""
    return key[2] if isinstance(key, tuple) and len(key) > 2 else 0


def num_tokens(kind, thw, patch_size):
    """Tokens of a prepared sample: (T/pt) * (H/ph) * (W/pw); an image is one latent frame (model.pack)."""
    pt, ph, pw = patch_size
    T, H, W = thw
    return (1 if kind == 'image' else T // pt) * (H // ph) * (W // pw)


# -----------------------------------------------------------------------------
# resolution and clip sampling (the curriculum's knobs, Table 2 and Sec. 3.5)


def sample_resolution(rng, hw, res, patch):
    """Native (H, W) -> training (H', W'), multiples of patch = (ph, pw).

    Table 2's "[64 -> 512]" is read as a range of the longer side: it is drawn uniformly in [min, max],
    capped at the native longer side (no upsampling beyond native, except up to `min` for tiny inputs).
    The shorter side follows from the aspect ratio, so it may fall below `min` for elongated media (at
    least one patch). Rounding to the nearest multiple keeps both sides within [patch, max] because
    res[0] and res[1] are patch multiples (the datasets check this).
    """
    H, W = hw
    long = max(H, W)
    target = rng.uniform(res[0], max(res[0], min(res[1], long)))
    return tuple(max(p, round(x * target / long / p) * p) for x, p in zip((H, W), patch))


def sample_clip(rng, n_frames, fps, mode, max_frames, multiple):
    """Frame indices of one clip, as range(start, stop, stride), its length a multiple of `multiple` (pt).

    mode 'recon': the paper's "stride 1-3 for temporal consistency or 4-12 for diversity", one branch or the
    other with equal odds (the paper gives no ratio), the stride uniform within it; 'understand': one frame per
    second ("1 FPS up to 64 frames"). Up to max_frames frames from a random start. When the video is too
    short for `multiple` frames at that stride, the stride shrinks.
    """
    if mode == 'recon':
        stride = int(rng.integers(1, 4)) if rng.random() < 0.5 else int(rng.integers(4, 13))
    else:
        stride = max(1, round(fps))
    while stride > 1 and (n_frames - 1) // stride + 1 < multiple:
        stride -= 1
    length = min(max_frames, (n_frames - 1) // stride + 1) // multiple * multiple
    if length == 0:
        raise ValueError(f"{n_frames} frames, a clip needs at least {multiple}")
    start = int(rng.integers(0, n_frames - (length - 1) * stride))
    return range(start, start + (length - 1) * stride + 1, stride)


def fit_resolution(rng, hw, res, patch, fits):
    """A smaller training size for a sample over its token budget, as the stage's data could have drawn it: the
    longer side drawn again, uniformly in [res[0], the largest longer side at which fits(size) holds], the aspect
    of the native hw kept and sides rounded as in sample_resolution. None when even res[0] does not fit."""
    H, W = hw
    long = max(H, W)
    size = lambda target: tuple(max(p, round(x * target / long / p) * p) for x, p in zip((H, W), patch))
    top = max(res[0], min(res[1], long))                 # sample_resolution's largest target
    step = min(patch)                                    # sizes only change at patch multiples
    best = next((t for t in range(top, res[0] - 1, -step) if fits(size(t))), None)
    if best is None:
        return None
    return size(rng.uniform(res[0], best))               # sizes grow with the target: <= size(best), so it fits


def fit_clip(rng, clip, hw, native, res, patch_size, budget, min_frames=16):
    """A clip (range of frame indices) at size hw over `budget` tokens -> (clip, hw) that fits: the same start and
    stride, fewer frames (down to one 16-frame temporal tile, 4 latent frames; shorter clips stay as they are),
    then, if 16 frames are still too many, a smaller size from fit_resolution. None when nothing fits."""
    pt, ph, pw = patch_size
    per_latent = lambda s: (s[0] // ph) * (s[1] // pw)   # tokens of one latent frame (pt video frames)
    keep = min(len(clip), max(pt, min_frames // pt * pt))
    n = budget // per_latent(hw) * pt                    # frames that fit at this size, a multiple of pt
    if n >= keep:
        return clip[:min(len(clip), n)], hw
    hw = fit_resolution(rng, native, res, patch_size[1:], lambda s: keep // pt * per_latent(s) <= budget)
    return None if hw is None else (clip[:keep], hw)


def _check_res(res, patch_size):
    if not (0 < res[0] <= res[1] and all(r % p == 0 for r in res for p in patch_size[1:])):
        raise ValueError(f"res {res} must be increasing multiples of the patch size {patch_size[1:]}")


# -----------------------------------------------------------------------------
# procedural scenes: parameters drawn once per sample, rendered at any size and any time

SHAPES = ['circle', 'square', 'triangle', 'star', 'ring', 'cross']
# the 2D scenes' palette; render3d.PRIMITIVE_COLOURS (the 3D primitives') has other values and order on purpose
COLOURS = {'red': (0.9, 0.1, 0.1), 'orange': (1.0, 0.55, 0.05), 'yellow': (0.95, 0.9, 0.1),
           'green': (0.1, 0.75, 0.2), 'cyan': (0.1, 0.85, 0.9), 'blue': (0.15, 0.25, 0.95),
           'purple': (0.6, 0.15, 0.8), 'white': (0.97, 0.97, 0.97)}
# The label names the big foreground object, so a prompt such as "a photo of a red circle" can name it.
CLASSES = [f'{c} {s}' for s in SHAPES for c in COLOURS]
ATTRIBUTES = {'colour': 0, 'shape': 1}   # word of a class name that names each attribute (zero-shot per attribute)
TEXTURES = ['plain', 'striped', 'checkered', 'speckled']
OBJECT_WORDS = {'plain': 'solid', 'striped': 'striped', 'checkered': 'checkered', 'speckled': 'speckled'}
BACKGROUND_WORDS = {'plain': 'gradient', 'striped': 'striped', 'checkered': 'checkered', 'speckled': 'mottled'}
MOTIONS = ['slides', 'spins', 'pulses']
OTHERS = ['no other shapes', 'one other shape', 'two other shapes', 'three other shapes']
IMAGE_TEMPLATES = ['{an_obj} on a {bg} background', 'a photo of {an_textured_obj}',
                   '{an_obj} with {others}', '{an_textured_obj} and {others} on a {bg} background']
VIDEO_TEMPLATES = ['a video of {an_obj} {motion}', '{an_textured_obj} {motion} on a {bg} background',
                   '{an_obj} {motion}, with {others}']


def _sdf(shape, u, v):
    """Signed distance (negative inside) to a shape of unit size at the origin; u right, v down."""
    r = torch.sqrt(u * u + v * v)
    if shape == 'circle':
        return r - 1
    if shape == 'square':
        return torch.maximum(u.abs(), v.abs()) - 0.8
    if shape == 'triangle':                                     # apex up; inscribed radius 0.5
        return torch.maximum(u.abs() * 0.866 - v * 0.5, v) - 0.5
    if shape == 'star':                                         # 5 points; radial, not an exact distance
        k = (2 * (5 * torch.atan2(v, u) / (2 * math.pi)).remainder(1) - 1).abs()
        return r - (0.42 + 0.58 * k)
    if shape == 'ring':
        return (r - 0.72).abs() - 0.28
    return torch.minimum(torch.maximum(u.abs() - 0.3, v.abs() - 0.95),   # cross: union of two bars
                         torch.maximum(u.abs() - 0.95, v.abs() - 0.3))


def _texture(kind, u, v, freq, noise):
    """Pattern in [0, 1] over coordinates u, v (broadcastable to (T, H, W)); 0 for 'plain'."""
    if kind == 'striped':
        return 0.5 + 0.5 * torch.sin(math.pi * freq * u)
    if kind == 'checkered':                                     # hard edges on purpose: high frequencies
        return (torch.sin(math.pi * freq * u) * torch.sin(math.pi * freq * v) > 0).float()
    if kind == 'speckled':                                      # smooth value noise from an 8x8 grid
        grid = torch.stack(torch.broadcast_tensors(u, v), -1) * (freq / 8)           # (T, H, W, 2)
        src = noise.expand(grid.shape[0], 1, 8, 8)                                   # (T, 1, 8, 8)
        return F.grid_sample(src, grid, padding_mode='reflection', align_corners=False)[:, 0]
    return torch.zeros(())


def _bounce(p, margin):
    """Positions (fractions of the frame) reflected back into [margin, 1 - margin]: objects bounce off the
    borders and stay inside the frame."""
    x = ((p - margin) / (1 - 2 * margin)).remainder(2)
    return margin + (1 - 2 * margin) * (1 - (x - 1).abs())


def _span(coords, lo, hi):
    """Index range [a, b) of the sorted 1-D coords that lie within [lo, hi]."""
    a, b = torch.searchsorted(coords, torch.stack([lo, hi])).tolist()
    return a, b


def _new_object(rng, shape, rgb, size):
    """One object at rest; random_scene sets the motion fields of video objects."""
    return dict(shape=shape, rgb=torch.tensor(np.clip(rgb, 0, 1), dtype=torch.float32), size=size,
                x=rng.uniform(0.2, 0.8), y=rng.uniform(0.2, 0.8), angle=rng.uniform(0, 2 * math.pi),
                texture=TEXTURES[rng.integers(4)], freq=rng.uniform(2, 6),
                noise=torch.from_numpy(rng.random((1, 1, 8, 8), dtype=np.float32)),
                vx=0.0, vy=0.0, spin=0.0, rate=0.0, hue=0.0, pulse=0.0)


def random_scene(rng, video):
    """A random scene (a dict of parameters, independent of size and time; `render_scene` draws it): background,
    0-3 small distractors, one big labelled object on top; for videos its motion and a phrase naming it."""
    bg = dict(rgb0=torch.tensor(0.2 + 0.6 * rng.random(3), dtype=torch.float32),
              rgb1=torch.tensor(0.2 + 0.6 * rng.random(3), dtype=torch.float32),
              angle=rng.uniform(0, 2 * math.pi), tex_angle=rng.uniform(0, math.pi),
              texture=TEXTURES[rng.integers(4)], freq=rng.uniform(2, 8), contrast=rng.uniform(0.15, 0.4),
              noise=torch.from_numpy(rng.random((1, 1, 8, 8), dtype=np.float32)))
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    motion = MOTIONS[rng.integers(len(MOTIONS))] if video else None
    small = [_new_object(rng, SHAPES[rng.integers(len(SHAPES))], rng.random(3), rng.uniform(0.12, 0.3))
             for _ in range(rng.integers(1 if motion == 'pulses' else 0, 4))]
    main = _new_object(rng, shape, np.array(COLOURS[colour]) + rng.uniform(-0.08, 0.08, 3), rng.uniform(0.35, 0.6))
    motion_words = ''
    if video:
        for ob in small:                                        # distractors drift; change hue when 'pulses'
            ob['vx'], ob['vy'] = rng.normal(0, 0.006, 2).tolist()
            ob['rate'], ob['hue'] = rng.uniform(0.15, 0.4), float(motion == 'pulses')
        if motion == 'slides':                                  # near one of 4 directions, so a word names it
            direction = int(rng.integers(4))                    # right, down, left, up (y grows downwards)
            a = direction * math.pi / 2 + rng.uniform(-0.3, 0.3)
            speed = rng.uniform(0.015, 0.035)                   # fraction of the frame per frame
            main['vx'], main['vy'] = speed * math.cos(a), speed * math.sin(a)
            motion_words = f"sliding {['right', 'down', 'left', 'up'][direction]}"
        elif motion == 'spins':
            main['spin'] = float(rng.choice([-1, 1])) * rng.uniform(0.12, 0.3)   # radians per frame
            motion_words = 'spinning'
        else:
            main['rate'], main['pulse'] = rng.uniform(0.15, 0.4), 0.4
            motion_words = 'pulsing while the other shapes change colour'
    return dict(bg=bg, objects=small + [main], colour=colour, shape=shape, motion=motion_words)


def scene_caption(rng, scene):
    """One caption from the templates; it names the class, the textures and (videos) the motion."""
    main, obj = scene['objects'][-1], f"{scene['colour']} {scene['shape']}"
    an = lambda s: ('an ' if s[0] in 'aeiou' else 'a ') + s
    templates = VIDEO_TEMPLATES if scene['motion'] else IMAGE_TEMPLATES
    return templates[rng.integers(len(templates))].format(
        an_obj=an(obj), an_textured_obj=an(f"{OBJECT_WORDS[main['texture']]} {obj}"),
        bg=BACKGROUND_WORDS[scene['bg']['texture']], others=OTHERS[len(scene['objects']) - 1],
        motion=scene['motion'])


def _grid(H, W):
    """Pixel centres in units of half the shorter side: X (1, 1, W) in [-W/s, W/s], Y (1, H, 1); pixel size."""
    s = min(H, W)
    X = (torch.arange(W, dtype=torch.float32) * 2 + 1 - W) / s
    Y = (torch.arange(H, dtype=torch.float32) * 2 + 1 - H) / s
    return X.view(1, 1, W), Y.view(1, H, 1), 2 / s


def _background(bg, X, Y):
    """Linear colour gradient times a low-contrast texture -> (1, H, W, 3) in [0, 1]."""
    ca, sa = math.cos(bg['angle']), math.sin(bg['angle'])
    d = (X * ca + Y * sa) / (X.max() * abs(ca) + Y.max() * abs(sa))                 # (1, H, W) in [-1, 1]
    base = bg['rgb0'] + (bg['rgb1'] - bg['rgb0']) * (0.5 + 0.5 * d)[..., None]        # (1, H, W, 3)
    ct, st = math.cos(bg['tex_angle']), math.sin(bg['tex_angle'])
    tex = _texture(bg['texture'], X * ct + Y * st, Y * ct - X * st, bg['freq'], bg['noise'])
    return base * (1 - bg['contrast'] * tex)[..., None]


def _draw(img, ob, X, Y, t, px):
    """Composite one object in place over img (T, H, W, 3) in [0, 1] at frame times t (T, 1, 1)."""
    r, ex, ey = ob['size'], X.max() + px / 2, Y.max() + px / 2                      # half-extents of the frame
    cx = (_bounce(ob['x'] + ob['vx'] * t, r / (2 * ex)) - 0.5) * 2 * ex              # (T, 1, 1)
    cy = (_bounce(ob['y'] + ob['vy'] * t, r / (2 * ey)) - 0.5) * 2 * ey
    # work only on the box the object covers over all frames (shapes reach 1.13 r): same pixels, faster
    j0, j1 = _span(X[0, 0], cx.min() - 1.2 * r - px, cx.max() + 1.2 * r + px)
    i0, i1 = _span(Y[0, :, 0], cy.min() - 1.2 * r - px, cy.max() + 1.2 * r + px)
    X, Y, box = X[..., j0:j1], Y[:, i0:i1], img[:, i0:i1, j0:j1]                     # box: a view of img
    a = ob['angle'] + ob['spin'] * t
    dx, dy = X - cx, Y - cy
    u = (dx * torch.cos(a) + dy * torch.sin(a)) / r                                  # (T, h, w) object frame
    v = (dy * torch.cos(a) - dx * torch.sin(a)) / r
    alpha = (0.5 - _sdf(ob['shape'], u, v) * r / px).clamp(0, 1)[..., None]          # 1-pixel soft edge
    w = (0.5 - 0.5 * torch.cos(ob['rate'] * t))[..., None]                           # (T, 1, 1, 1), 0 at t=0
    rgb = ob['rgb'] * (1 - ob['hue'] * w) + ob['rgb'][[1, 2, 0]] * (ob['hue'] * w)   # hue drifts r->g->b
    shade = 1 - 0.45 * _texture(ob['texture'], u, v, ob['freq'], ob['noise'])        # (T, h, w)
    colour = rgb * (1 - ob['pulse'] * w) * shade[..., None]                          # (T, h, w, 3)
    box += alpha * (colour - box)


def render_scene(scene, H, W, t):
    """A scene at size H x W and frame times t (1-D float tensor) -> (T, H, W, 3) float32 in [-1, 1]."""
    X, Y, px = _grid(H, W)
    img = _background(scene['bg'], X, Y).repeat(len(t), 1, 1, 1)                    # (T, H, W, 3)
    for ob in scene['objects']:                                                      # back to front
        _draw(img, ob, X, Y, t.view(-1, 1, 1), px)
    return img * 2 - 1


# -----------------------------------------------------------------------------
# built-in datasets


def _synthetic_plan(ds, key):
    """key -> (index, (H, W), native (H, W), a function making the content rng positioned after the aspect
    draw); renders nothing.
    Each sample has a native aspect ratio H/W in [1/2, 2] and a native size whose longer side is res[1]
    (rounded to whole pixels); its training size is drawn anew each epoch by sample_resolution."""
    i, epoch = _key(key, ds.n)
    aspect = _aspect(ds.seed, SPLITS[ds.split], i)                                    # H / W
    native = (ds.res[1], ds.res[1] / aspect) if aspect > 1 else (ds.res[1] * aspect, ds.res[1])
    # the size draw: random.Random, far cheaper to seed than a numpy generator (every sample of every epoch
    # draws one); tuples of ints hash alike in every process, so workers and reruns agree
    size_rng = random.Random(hash((ds.seed, SIZE, SPLITS[ds.split], i, epoch)))
    hw = sample_resolution(size_rng, native, ds.res, ds.patch_size[1:])
    return i, hw, tuple(max(1, round(x)) for x in native), lambda: _content_rng(ds.seed, SPLITS[ds.split], i)


def _content_rng(seed, split, i):
    """The content stream of sample i, positioned after its aspect draw (the scene and caption come next)."""
    rng = _rng(seed, CONTENT, split, i, 0)
    rng.uniform(-math.log(2), math.log(2))
    return rng


@functools.lru_cache(maxsize=1 << 16)
def _video_length(seed, split, i, frames, pt):
    """Frames of built-in video i: a multiple of pt in [pt, frames] (memoised like _aspect)."""
    return pt * int(_rng(seed, CLIP, split, i, 0).integers(1, frames // pt + 1))


@functools.lru_cache(maxsize=1 << 16)
def _aspect(seed, split, i):
    """Native aspect ratio H / W of sample i, in [1/2, 2] (the content stream's first draw; memoised: making a
    numpy generator costs ~65 us, and the plan is asked for every sample of every epoch)."""
    return math.exp(_rng(seed, CONTENT, split, i, 0).uniform(-math.log(2), math.log(2)))


def _synthetic_item(ds, key, kind):
    """Sample of a built-in dataset. The scene is rendered once per index at its native size and kept in
    ds._cache as uint8 (T, H, W, 3) with its caption and class name; each drawn size is an antialiased bilinear
    resize of that render, re-quantised to the uint8 grid (so every pixel is k / 127.5 - 1) and kept too: a
    sample costs a render once, a resize once per size it is drawn at, and a dict look-up after that."""
    i, hw, native, content = _synthetic_plan(ds, key)
    entry = ds._cache.get(i)
    if entry is None or tuple(entry[0].shape[1:3]) != native:      # new, or `res` changed since it was cached
        rng = content()
        scene = random_scene(rng, video=kind == 'video')
        t = torch.arange(ds._length(i), dtype=torch.float32) if kind == 'video' else torch.zeros(1)
        entry = ds._cache[i] = (model.to_uint8(render_scene(scene, *native, t)), scene_caption(rng, scene),
                                f"{scene['colour']} {scene['shape']}", {})
    u8, caption, name, sizes = entry
    if hw != native and hw not in sizes:    # permute: channels_last memory, so the result permutes back
        resized = F.interpolate(model.from_uint8(u8).permute(0, 3, 1, 2), size=hw, mode='bilinear',
                                align_corners=False, antialias=True).permute(0, 2, 3, 1)
        sizes[hw] = model.to_uint8(resized).contiguous()
    u8 = u8 if hw == native else sizes[hw]
    # the float media (a copy) is made from the uint8 pixels only if read (Sample.media)
    return Sample(None, kind, caption, CLASSES.index(name), name, ds.source(i), u8[0] if kind == 'image' else u8)


def _cache_bytes(ds):
    return sum(u8.nbytes + sum(x.nbytes for x in sizes.values()) for u8, _, _, sizes in ds._cache.values())


class SyntheticImages(Dataset):
    """n procedural images of one split (longer side drawn in `res` each epoch).

    Each image is rendered once, on first access, at its native size (longer side res[1]) and cached in
    memory as uint8; every epoch then resizes the cached render (antialiased bilinear) to its drawn size,
    so pixels always lie on the uint8 grid k / 127.5 - 1. The cache lives on the dataset object, filled
    lazily by __getitem__, so each DataLoader worker keeps its own (persistent workers keep it across
    epochs); cache_bytes() reports its size. Each size a sample is drawn at is kept too (uint8), so a later
    epoch costs a look-up. Native renders take at most n * res[1]^2 * 3 bytes per process that reads every
    image: each DataLoader worker of each task stream (image_rec, image_und) holds its own (the demo's sizes:
    NOTES.md). The held-out ('val') datasets that eval builds cache the same way."""

    def __init__(self, n, split='train', seed=0, res=(64, 512), patch_size=(4, 16, 16)):
        _check_res(res, patch_size)
        self.n, self.split, self.seed, self.res, self.patch_size = n, split, seed, res, patch_size
        self.classes, self.attributes, self.skipped = CLASSES, ATTRIBUTES, []
        self._cache = {}                # index -> (uint8 (1, H, W, 3) native render, caption, class name, {size: uint8})

    def __len__(self):
        return self.n

    def source(self, i):
        return f"synthetic:{self.split}:image:{i}"

    def num_tokens(self, key):
        return num_tokens('image', (1, *_synthetic_plan(self, key)[1]), self.patch_size)

    def cache_bytes(self):
        """Bytes held by this process's cache (native renders and the sizes drawn so far)."""
        return _cache_bytes(self)

    def __getitem__(self, key):
        return _synthetic_item(self, key, 'image')


class SyntheticVideos(Dataset):
    """n procedural videos: the same kind of scenes, the big object sliding, spinning or pulsing while the
    small ones drift (and change colour when it pulses). Length: a multiple of pt in [pt, frames].

    Cached like SyntheticImages: all frames rendered once at the native size (longer side res[1]) as
    uint8, each drawn size kept once made. Native renders: at most n * frames * res[1]^2 * 3 bytes per process
    that reads every video (each worker of video_rec and video_und holds its own; the demo's sizes: NOTES.md).
    Eval's held-out ('val') videos cache the same way."""

    def __init__(self, n, split='train', seed=0, res=(64, 256), patch_size=(4, 16, 16), frames=16):
        _check_res(res, patch_size)
        if frames % patch_size[0]:
            raise ValueError(f"frames={frames} must be a multiple of pt={patch_size[0]}")
        self.n, self.split, self.seed, self.res, self.patch_size = n, split, seed, res, patch_size
        self.frames, self.classes, self.attributes, self.skipped = frames, CLASSES, ATTRIBUTES, []
        self._cache = {}                # index -> (uint8 (T, H, W, 3) native render, caption, class name, {size: uint8})

    def __len__(self):
        return self.n

    def source(self, i):
        return f"synthetic:{self.split}:video:{i}"

    def _length(self, i):
        return _video_length(self.seed, SPLITS[self.split], i, self.frames, self.patch_size[0])

    def num_tokens(self, key):
        i, hw, _, _ = _synthetic_plan(self, key)
        return num_tokens('video', (self._length(i), *hw), self.patch_size)

    def cache_bytes(self):
        """Bytes held by this process's cache of native renders."""
        return _cache_bytes(self)

    def __getitem__(self, key):
        return _synthetic_item(self, key, 'video')


class Synthetic3D(Dataset):
    """n procedural 3D objects (render3d.procedural_mesh: textured cube / sphere / cylinder / cone / torus,
    labelled by shape), each rendered into `views` views of view_res px on the TRELLIS camera sphere and
    packed as the official 3D tokens: occupied voxels of a grid^3 (official 64) with their nearest view's
    ph x pw RGB patch. Built once at construction: an asset's token count is its voxel count, known only
    after voxelising, and the sampler needs it up front. Resolution sampling does not apply to 3D."""

    def __init__(self, n, split='train', seed=0, views=8, view_res=64, grid=64, patch_size=(4, 16, 16)):
        import render3d
        self.n, self.split, self.seed, self.patch_size = n, split, seed, patch_size
        self.classes, self.skipped = list(render3d.PRIMITIVES), []
        self.items = []
        for i in range(n):
            rng = _rng(seed, MESH, SPLITS[split], i, 0)
            mesh, shape, caption = render3d.procedural_mesh(int(rng.integers(2 ** 31)))
            p = render3d.pack_asset(mesh, views, view_res, patch_size, offset=tuple(rng.random(2)), grid=grid)
            views_ = p['rgba'][..., :3].float() / 255 * 2 - 1                        # on black, [-1, 1]
            media = dict(feats=p['feats'] * 2 - 1, coords=p['coords'], views=views_, cameras=p['cameras'])
            self.items.append(Sample(media, '3d', caption, self.classes.index(shape), shape, self.source(i)))

    def __len__(self):
        return self.n

    def source(self, i):
        return f"synthetic:{self.split}:3d:{i}"

    def num_tokens(self, key):
        return len(self.items[_key(key, self.n)[0]].media['coords'])

    def __getitem__(self, key):
        return self.items[_key(key, self.n)[0]]


# -----------------------------------------------------------------------------
# real files: listing, manifests, headers, decoding, bad input

VIDEO_EXTENSIONS = {'.mp4', '.webm', '.mkv', '.mov'}
# every format PIL can open (not only save); MPEG is a video container that PIL merely identifies
IMAGE_EXTENSIONS = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN} - {'.mpg', '.mpeg'}
# what a broken file raises: PIL (OSError, SyntaxError, DecompressionBombError), PyAV (FFmpegError), ours
READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, av.error.FFmpegError, Image.DecompressionBombError)
# paper Sec. 3.5: 16-32 frames (4-8 latent frames) per reconstruction clip; 1 fps up to 64 for understanding
MAX_FRAMES = {'recon': 32, 'understand': 64}


def read_manifest(path):
    """JSONL (one {"file": ..., "caption": ..., "label": ...} per line) or CSV (header file,caption,label)
    -> [(file, caption, class name)]. Files are relative to the manifest's folder (or absolute); caption
    and label are optional; a label is a class name (numbers are read as names too)."""
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f)) if path.endswith('.csv') else [json.loads(s) for s in f if s.strip()]
    out = []
    for n, row in enumerate(rows, 1):
        if not row.get('file'):
            raise ValueError(f"{path}: row {n} has no 'file'")
        label = row.get('label')
        name = '' if label in (None, '') else str(label)
        out.append((os.path.join(root, row['file']), row.get('caption') or '', name))
    return out


def list_files(path, extensions):
    """A folder (walked recursively, sorted) or a .jsonl/.csv manifest -> [(file, caption, class name)]."""
    if os.path.isfile(path) and path.endswith(('.jsonl', '.csv')):
        return read_manifest(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: neither a folder nor a .jsonl/.csv manifest")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                   if os.path.splitext(f)[1].lower() in extensions)
    return [(f, '', '') for f in files]


def _skip(source, error, strict):
    """A bad input: an error naming it (strict), else one warning line. Returns the (source, reason) record."""
    reason = str(error) or type(error).__name__
    if strict:
        raise ValueError(f"cannot read {source}: {reason} (strict=True; strict=False skips such files)")
    warnings.warn(f"skipped {source}: {reason}", stacklevel=3)
    return source, reason


def _probe_all(path, rows, probe, strict, what):
    """Read every file's header (no decoding) -> entries [(file, caption, class name, probe(file))] and the
    skipped [(file, reason)]. A folder or manifest with no usable file is an error naming it.
    Known limit: every rank probes every file at start-up; cache the headers in a file for millions of files."""
    entries, skipped = [], []
    for file, caption, name in rows:
        try:
            if not os.path.isfile(file):
                raise FileNotFoundError('file not found')
            if os.path.getsize(file) == 0:
                raise ValueError('empty file')
            entries.append((file, caption, name, probe(file)))
        except READ_ERRORS as e:
            skipped.append(_skip(file, e, strict))
    if not entries:
        raise ValueError(f"{path}: no usable {what} files ({len(rows)} listed, {len(skipped)} unreadable)")
    return entries, skipped


def probe_image(file):
    """Header only -> (H, W) as loaded (EXIF orientations 5-8 are 90-degree turns: sides swap)."""
    with Image.open(file) as im:
        w, h = im.size
        return (w, h) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)


def load_image(file, hw):
    """Decode an image -> (H, W, 3) float32 in [-1, 1] at size hw: EXIF rotation applied, alpha dropped,
    frame 0 of an animation, PIL bicubic resize (which antialiases when shrinking)."""
    H, W = hw
    with Image.open(file) as im:
        im.draft('RGB', (max(hw), max(hw)))     # JPEG: decode at the smallest DCT scale >= target (fast)
        im = ImageOps.exif_transpose(im).convert('RGB').resize((W, H), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1)        # numpy: no OpenMP threads


def probe_video(file, multiple):
    """Header -> (frames, fps, (H, W)). mp4/mov store the frame count; webm/mkv often don't, so their
    packets are counted (demuxing reads the file but decodes nothing)."""
    with av.open(file) as container:
        if not container.streams.video:
            raise ValueError('no video stream')
        s = container.streams.video[0]
        n = s.frames or sum(1 for p in container.demux(s) if p.size)
        fps = float(s.average_rate or s.guessed_rate or 25)      # 25 when the container states no rate
        hw = (s.height, s.width)
    if n == 0:
        raise ValueError('no decodable frames')
    if n < multiple:
        raise ValueError(f"{n} frames, a clip needs at least {multiple}")
    return n, fps, hw


def load_clip(file, clip, hw, multiple):
    """Decode frames `clip` (a range of frame indices) -> (T, H, W, 3) float32 in [-1, 1] at size hw.

    Decodes from the start without seeking (exact indices; fine for clips of seconds). If the file holds
    fewer frames than its header promised, T is cut to a multiple of `multiple`.
    Known limit: rotation metadata of phone videos is ignored.
    """
    H, W = hw
    frames = []
    scale = VideoReformatter()      # one scaler for the clip: a new one per frame costs far more than the scaling
    with av.open(file) as container:
        # FFmpeg's default threading: DataLoader workers already keep the cores busy
        for k, frame in enumerate(container.decode(container.streams.video[0])):
            if k > clip[-1]:
                break
            if k in clip:                                             # O(1) for a range
                frame = scale.reformat(frame, width=W, height=H, format='rgb24', interpolation='AREA')
                frames.append(frame.to_ndarray())                     # (H, W, 3) uint8
    T = len(frames) // multiple * multiple
    if T == 0:
        raise ValueError(f"no decodable frames ({len(frames)} of the {len(clip)} planned)")
    return torch.from_numpy(np.stack(frames[:T]).astype(np.float32) / 127.5 - 1)   # (T, H, W, 3)


def save_video(frames, path, fps=8):
    """Frames (T, H, W, 3) uint8 -> MP4 (PyAV, H.264 or MPEG-4), padded to even sizes."""
    H, W = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    frames = F.pad(frames.permute(0, 3, 1, 2), (0, W - frames.shape[2], 0, H - frames.shape[1])).permute(0, 2, 3, 1)
    codec = 'libx264' if 'libx264' in av.codecs_available else 'mpeg4'
    with av.open(str(path), mode='w') as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, 'yuv420p'
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f.contiguous().numpy(), format='rgb24')):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# -----------------------------------------------------------------------------
# real datasets


class ImageFolder(Dataset):
    """Images from a folder (every PIL-readable file, recursively) or a JSONL/CSV manifest, each resized to
    a size from sample_resolution (longer side in `res`), new each epoch. Labels index `classes`, the
    sorted class names of the manifest (-1 without one)."""

    def __init__(self, path, res=(64, 512), patch_size=(4, 16, 16), seed=0, strict=False):
        _check_res(res, patch_size)
        self.path, self.res, self.patch_size, self.seed, self.strict = path, res, patch_size, seed, strict
        rows = list_files(path, IMAGE_EXTENSIONS)
        self.entries, self.skipped = _probe_all(path, rows, probe_image, strict, 'image')
        self.classes = sorted({e[2] for e in self.entries if e[2]})

    def __len__(self):
        return len(self.entries)

    def source(self, i):
        return self.entries[i][0]

    def _plan(self, key):
        """key -> (index, (H, W)); a key with a budget (TokenBudgetSampler) gets a size that fits it if one does."""
        i, epoch = _key(key, len(self))
        rng, native, budget = _rng(self.seed, SIZE, 0, i, epoch), self.entries[i][3], _budget(key)
        hw = sample_resolution(rng, native, self.res, self.patch_size[1:])
        if budget and num_tokens('image', (1, *hw), self.patch_size) > budget:
            fits = lambda s: num_tokens('image', (1, *s), self.patch_size) <= budget
            hw = fit_resolution(rng, native, self.res, self.patch_size[1:], fits) or hw   # else: skipped by the sampler
        return i, hw

    def num_tokens(self, key):
        return num_tokens('image', (1, *self._plan(key)[1]), self.patch_size)

    def __getitem__(self, key):
        i, hw = self._plan(key)
        file, caption, name, _ = self.entries[i]
        try:
            media = load_image(file, hw)
        except READ_ERRORS as e:                                       # e.g. a truncated JPEG
            return Skipped(*_skip(file, e, self.strict))
        return Sample(media, 'image', caption, self.classes.index(name) if name else -1, name, file)


class VideoFolder(Dataset):
    """Videos (mp4/webm/mkv/mov) from a folder or a JSONL/CSV manifest. Each epoch draws a clip per video
    with sample_clip (mode 'recon' or 'understand', up to max_frames, default MAX_FRAMES[mode]) and a
    frame size with sample_resolution (longer side in `res`); frames are resized by FFmpeg (area)."""

    def __init__(self, path, mode='recon', res=(64, 512), patch_size=(4, 16, 16), max_frames=None, seed=0,
                 strict=False):
        _check_res(res, patch_size)
        if mode not in MAX_FRAMES:
            raise ValueError(f"mode {mode!r}: expected one of {list(MAX_FRAMES)}")
        self.max_frames = max_frames or MAX_FRAMES[mode]
        if self.max_frames % patch_size[0]:
            raise ValueError(f"max_frames={self.max_frames} must be a multiple of pt={patch_size[0]}")
        self.path, self.mode, self.res, self.patch_size = path, mode, res, patch_size
        self.seed, self.strict = seed, strict
        probe = functools.partial(probe_video, multiple=patch_size[0])
        self.entries, self.skipped = _probe_all(path, list_files(path, VIDEO_EXTENSIONS), probe, strict, 'video')
        self.classes = sorted({e[2] for e in self.entries if e[2]})

    def __len__(self):
        return len(self.entries)

    def source(self, i):
        return self.entries[i][0]

    def _plan(self, key):
        """key -> (index, (H, W), clip range); from the header alone. A key with a budget (TokenBudgetSampler)
        gets a shorter clip, then a smaller size, that fits it if one does (fit_clip)."""
        i, epoch = _key(key, len(self))
        n_frames, fps, native = self.entries[i][3]
        rng = _rng(self.seed, CLIP, 0, i, epoch)
        hw = sample_resolution(rng, native, self.res, self.patch_size[1:])
        clip, budget = sample_clip(rng, n_frames, fps, self.mode, self.max_frames, self.patch_size[0]), _budget(key)
        if budget and num_tokens('video', (len(clip), *hw), self.patch_size) > budget:
            clip, hw = fit_clip(rng, clip, hw, native, self.res, self.patch_size, budget) or (clip, hw)
        return i, hw, clip

    def num_tokens(self, key):
        _, hw, clip = self._plan(key)
        return num_tokens('video', (len(clip), *hw), self.patch_size)

    def __getitem__(self, key):
        i, hw, clip = self._plan(key)
        file, caption, name, _ = self.entries[i]
        try:
            media = load_clip(file, clip, hw, self.patch_size[0])
        except READ_ERRORS as e:                                       # corrupt packets, no frames
            return Skipped(*_skip(file, e, self.strict))
        return Sample(media, 'video', caption, self.classes.index(name) if name else -1, name, file)


def read_captions(path):
    """A captions file, asset id -> caption: Cap3D-style CSV (rows `id,caption`, no header or a header row
    `uid,caption` / `id,caption`) or JSON ({"id": "caption", ...})."""
    with open(path, newline='') as f:
        if path.endswith('.json'):
            table = json.load(f)
            if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
                raise ValueError(f"{path}: expected a JSON object {{asset id: caption}}")
            return table
        rows = [r for r in csv.reader(f) if r]
    if rows and [c.strip().lower() for c in rows[0]] in (['uid', 'caption'], ['id', 'caption']):
        rows = rows[1:]
    for n, r in enumerate(rows, 1):
        if len(r) != 2:
            raise ValueError(f"{path}: row {n} has {len(r)} fields, expected `id,caption` (quote captions with commas)")
    return dict(rows)


class AssetFolder(Dataset):
    """3D assets prepared by `python render3d.py prepare <assets> <root>`: one sub-folder per asset (views,
    cameras.json, voxels.npz, meta.json). Token counts come from meta.json; a folder missing its files is
    skipped (or an error with strict=True). Caption from `captions` (read_captions: the paper's Objaverse
    captions come from Cap3D, keyed by asset id = the sub-folder's name, or the asset file's stem) when it
    has the asset, else from meta.json. Class labels (zero-shot, e.g. Toys4k's categories): labels='folder'
    takes the top folder of each asset's source path (the first part of the name prepare_assets gives a nested
    file: <category>__<object>__<stem>), or a CSV / JSON file maps asset ids to class names (read_captions'
    format); classes are the sorted names. Without labels an asset's label is -1."""

    def __init__(self, root, patch_size=(4, 16, 16), strict=False, captions='', labels=''):
        self.root, self.patch_size, self.strict, self.classes, self.skipped = root, patch_size, strict, [], []
        self.captions = read_captions(captions) if captions else {}
        self.label_of = {} if labels in ('', 'folder') else read_captions(labels)
        self.labels = labels
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such folder of prepared 3D assets")
        self.folders, self.voxels = [], []
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                continue
            try:
                with open(os.path.join(folder, 'meta.json')) as f:
                    meta = json.load(f)
                if meta['patch'] != list(patch_size[1:]):
                    raise ValueError(f"prepared with patch {meta['patch']}, the model uses {list(patch_size[1:])}")
                self.folders.append(folder), self.voxels.append(int(meta['voxels']))
            except (OSError, ValueError, KeyError) as e:
                self.skipped.append(_skip(folder, e, strict))
        if not self.folders:
            raise ValueError(f"{root}: no usable prepared 3D assets")
        if labels:
            self.classes = sorted({c for c in map(self.class_name, range(len(self))) if c})

    def __len__(self):
        return len(self.folders)

    def class_name(self, i):
        """The class of asset i ('' when labels has none for it)."""
        name = os.path.basename(self.folders[i])
        if self.labels == 'folder':
            return name.split('__')[0] if '__' in name else ''
        return self.label_of.get(name) or self.label_of.get(name.rsplit('__', 1)[-1], '')

    def source(self, i):
        return self.folders[i]

    def num_tokens(self, key):
        return self.voxels[_key(key, len(self))[0]]

    def __getitem__(self, key):
        import render3d
        folder = self.folders[_key(key, len(self))[0]]
        try:
            a = render3d.load_prepared(folder)
        except (OSError, ValueError, KeyError) as e:
            return Skipped(*_skip(folder, e, self.strict))
        media = dict(feats=a['feats'] * 2 - 1, coords=a['coords'], views=a['views'], cameras=a['cameras'])
        # render3d.prepare_assets names a nested file dir__sub__<stem>: Objaverse's uid is the stem
        name = os.path.basename(folder)
        caption = self.captions.get(name) or self.captions.get(name.rsplit('__', 1)[-1]) or a['meta'].get('caption', '')
        cls = self.class_name(_key(key, len(self))[0]) if self.labels else ''
        return Sample(media, '3d', caption, self.classes.index(cls) if cls else -1, cls, folder)


class Concat(Dataset):
    """Several datasets as one, so that a batch mixes modalities and sources. Global index = the offset of
    its dataset + its local index. Labels stay per dataset (Sample.class_name says what they mean)."""

    def __init__(self, datasets):
        self.datasets, self.offsets = list(datasets), [0]
        for d in self.datasets:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self):
        return self.offsets[-1]

    def _locate(self, key):
        i, epoch = _key(key, len(self))
        j = bisect.bisect_right(self.offsets, i) - 1                     # skips empty datasets
        return self.datasets[j], (i - self.offsets[j], epoch, _budget(key))

    def source(self, i):
        d, (k, *_) = self._locate(i)
        return d.source(k)

    def num_tokens(self, key):
        d, k = self._locate(key)
        return d.num_tokens(k)

    def __getitem__(self, key):
        d, k = self._locate(key)
        return d[k]

    @property
    def skipped(self):
        return [s for d in self.datasets for s in d.skipped]


# -----------------------------------------------------------------------------
# packing: a token budget per step instead of a batch size (model.Packed: samples concatenated, no padding)


def even_out(batches, world_size):
    """Split the batch with the most samples in two until the count is a multiple of world_size, so that
    every rank runs the same number of steps (DDP would hang otherwise). That fails only if every batch
    is a single sample; then the first batches are repeated, the one case where a sample comes twice."""
    while len(batches) % world_size:
        j = max(range(len(batches)), key=lambda b: len(batches[b]))
        if len(batches[j]) < 2:
            return batches + batches[:world_size - len(batches) % world_size]
        b = batches[j]
        batches[j:j + 1] = [b[:len(b) // 2], b[len(b) // 2:]]
    return batches


class TokenBudgetSampler(Sampler):
    """Batches of dataset keys [(index, epoch), ...] holding at most `budget` tokens (and, with max_samples, at
    most that many samples): one micro-batch of one rank.

    Per epoch: shuffle all indices (seeded by seed and epoch), pack them greedily in that order (a batch
    closes when the next sample would overflow it or it holds max_samples), even the batch count out to a
    multiple of world_size (even_out), and give batch b to rank b % world_size. Ranks see disjoint samples, run
    the same number of steps, and together see every sample exactly once. Token counts come from
    dataset.num_tokens, which decodes nothing. Call set_epoch(e) before each epoch (as with DistributedSampler).

    No sample stops an epoch. One over the budget at its drawn size gets the key (index, epoch, budget): the
    folder datasets answer it as the stage's data could have been drawn, with a smaller size inside the stage's
    range (images, videos) or a shorter clip (videos), see fit_resolution / fit_clip. A sample that still does
    not fit (a 3D asset has one size: raise that task's budget, stage key task_tokens; splitting its voxels would
    leave renders and caption describing the whole object) is left out of the epoch. Both are counted and named in
    report(epoch). An epoch in which no sample fits is an error (the budget or the stage's sizes are wrong).
    """

    def __init__(self, dataset, budget, seed=0, rank=0, world_size=1, max_samples=0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if len(dataset) < world_size:
            raise ValueError(f"{len(dataset)} samples cannot feed {world_size} ranks")
        self.dataset, self.budget, self.seed, self.rank, self.world_size = dataset, budget, seed, rank, world_size
        self.max_samples = max_samples          # 0 = only the token budget closes a batch
        self.epoch, self._cache = 0, (None, None, None, None)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _epoch(self, epoch):
        """-> (batches of keys, fitted [(source, tokens, tokens after)], left out [(source, reason)]), cached."""
        if self._cache[0] != epoch:
            keys, fitted, dropped = self._pack(epoch)
            keys = even_out(keys, self.world_size)
            self._cache = (epoch, keys, [[k[0] for k in b] for b in keys], (fitted, dropped))
        return self._cache

    def plan(self, epoch):
        """Every rank's batches of one epoch as lists of indices; batch b belongs to rank b % world_size."""
        return self._epoch(epoch)[2]

    def keys(self, epoch):
        """The same batches as dataset keys: (index, epoch), or (index, epoch, budget) for a sample made to fit."""
        return self._epoch(epoch)[1]

    def _fit(self, i, epoch):
        """-> (tokens, key) of sample i in this epoch, the key asking for a smaller sample when the drawn one is over
        the budget; (tokens, None) when it cannot be made to fit."""
        n = self.dataset.num_tokens((i, epoch))
        if n <= self.budget:
            return n, (i, epoch)
        key = (i, epoch, self.budget)
        m = self.dataset.num_tokens(key)
        return (m, key) if m <= self.budget else (n, None)

    def _pack(self, epoch):
        order = _rng(self.seed, SHUFFLE, 0, 0, epoch).permutation(len(self.dataset)).tolist()
        batches, used, fitted, dropped = [[]], 0, [], []
        for i in order:
            n, key = self._fit(i, epoch)
            if key is None:
                dropped.append((self.dataset.source(i), f"{n} tokens at its smallest size, over the budget of "
                                                        f"{self.budget}"))
                continue
            if len(key) > 2:
                fitted.append((self.dataset.source(i), self.dataset.num_tokens((i, epoch)), n))
            if used + n > self.budget or (self.max_samples and len(batches[-1]) == self.max_samples):
                batches, used = batches + [[]], 0
            batches[-1].append(key)
            used += n
        if not batches[-1]:
            raise ValueError(f"no sample of {type(self.dataset).__name__} ({len(order)}, e.g. {dropped[0][0]}) fits "
                             f"the budget of {self.budget} tokens per micro-batch: raise the budget or lower the "
                             f"resolution range / max_frames")
        return batches, fitted, dropped

    def report(self, epoch):
        """What the budget did to one epoch: samples made smaller and samples left out, named. '' when none."""
        fitted, dropped = self._epoch(epoch)[3]
        if not fitted and not dropped:
            return ''
        lines = [f"epoch {epoch}: {len(fitted) + len(dropped)} samples over the budget of {self.budget} tokens: "
                 f"{len(fitted)} made smaller (lower resolution / shorter clip), {len(dropped)} left out"]
        lines += [f"  {src}: {a} -> {b} tokens" for src, a, b in fitted]
        lines += [f"  {src}: left out, {reason}" for src, reason in dropped]
        return '\n'.join(lines)

    def __iter__(self):
        yield from self.keys(self.epoch)[self.rank::self.world_size]

    def __len__(self):
        return len(self.plan(self.epoch)) // self.world_size


@dataclass
class Batch:
    """One step: the packed token set and, in the same sample order, its metadata."""
    packed: model.Packed    # feats [N, pt*ph*pw*3], coords [N, 4], seqlens, kinds, grids; None if all failed
    captions: list
    labels: torch.Tensor    # [B] int64, -1 where unknown
    class_names: list
    sources: list
    skipped: list           # [(source, reason)] of this batch's items that failed to decode
    views: list = None      # per sample: (views [V, H, W, 3] uint8, cameras) for 3D, else None
    rows: int = 0           # the most samples any rank's batch holds at this step (TaskStream sets it from
                            # the sampler's plan): the global-batch semantic losses pad every rank to it

    def pin_memory(self):   # DataLoader(pin_memory=True): pixels and the structure to page-locked memory
        return Batch(self.packed.pin_memory() if self.packed is not None else None, self.captions, self.labels,
                     self.class_names, self.sources, self.skipped,
                     [(v[0].pin_memory(), v[1]) if v is not None else None for v in self.views])


def collate(items, config):
    """Samples (and Skipped) -> one Batch; as a collate_fn: functools.partial(collate, config=...). It runs in
    the DataLoader workers, so the batch's structure (structure.build_structure: segments, attention layouts,
    position-table weights, Gaussian windows) is made here, on the host, once. Pixels leave as uint8.
    config: the ModelConfig, or a bare patch size (pt, ph, pw) for batches no model runs on (no structure)."""
    cfg = config if isinstance(config, model.ModelConfig) else None
    good = [s for s in items if isinstance(s, Sample)]
    packed = None
    if good:
        ps = cfg.patch_size if cfg else tuple(config)
        # uint8 pixels pack as they are, unless zero (mid-grey) frames must be added: a video shorter than pt,
        # or one-frame samples next to a video (128 is not mid-grey)
        kinds = {s.kind for s in good}
        raw = all(s.pixels is not None for s in good) and len(kinds) == 1 and \
            all(s.kind != 'video' or len(s.pixels) >= ps[0] for s in good)
        packed = model.pack([s.pixels if raw else s.media for s in good], ps)
        if cfg is not None:
            packed.structure = build_structure(packed.coords, packed.seqlens, packed.kinds, cfg)
        if not raw:
            packed.feats = model.to_uint8(packed.feats)
    return Batch(packed, [s.caption for s in good], torch.tensor([s.label for s in good], dtype=torch.int64),
                 [s.class_name for s in good], [s.source for s in good],
                 [(s.source, s.reason) for s in items if isinstance(s, Skipped)],
                 [(model.to_uint8(torch.as_tensor(s.media['views'])), s.media['cameras']) if s.kind == '3d' else None
                  for s in good])


def make_loader(dataset, budget, config, seed=0, rank=0, world_size=1, num_workers=0):
    """DataLoader of Batches of at most `budget` tokens on this rank (config: a ModelConfig, or a bare patch size for
    batches no model runs on, as collate). The sampler runs in the main process and items depend only on their
    keys, so any num_workers gives the same batches. Call loader.batch_sampler.set_epoch(e) before each epoch."""
    return DataLoader(dataset, batch_sampler=TokenBudgetSampler(dataset, budget, seed, rank, world_size),
                      collate_fn=functools.partial(collate, config=config), num_workers=num_workers)


def skip_report(dataset, skipped):
    """End-of-epoch summary of bad inputs: dataset.skipped (found when scanning) plus `skipped`, this
    epoch's Batch.skipped lists joined (found when decoding). '' when nothing was skipped."""
    found = list(dataset.skipped) + list(skipped)
    if not found:
        return ''
    head = f"{len(found)} files skipped ({len(dataset.skipped)} when scanning, {len(skipped)} when decoding):"
    return '\n'.join([head] + [f"  {source}: {reason}" for source, reason in found])


# -----------------------------------------------------------------------------
# training streams (train.py): a curriculum stage's datasets, each task's micro-batch size, and one resumable stream
# of packed batches per task


def task_budget(stage, task):
    """Tokens per rank per micro-batch of `task`: the stage's task_tokens[task], else its `tokens`."""
    return stage.get('task_tokens', {}).get(task, stage.get('tokens', 4096))


def task_samples(stage, task, world):
    """Samples per rank per micro-batch of `task` on `world` ranks: the stage's global batch[task] / world, rounded,
    at least 1 (so the global batch is within world / 2 samples of it); 0 = no cap (packed by tokens alone)."""
    b = stage.get('batch', {}).get(task)
    return max(1, round(b / world)) if b else 0


def fits_up_to(stage, task, k, patch_size):
    """What k samples per micro-batch of `task` leave each within its token budget: the largest square side in
    px (images; videos of their longest clip, MAX_FRAMES) or the voxel count (3D)."""
    per = task_budget(stage, task) // k
    if task.startswith('3d'):
        return f"{per:,} voxels"
    pt, ph, _ = patch_size
    frames = 1 if task.startswith('image') else MAX_FRAMES['recon' if task == 'video_rec' else 'understand'] // pt
    return f"{ph * math.isqrt(per // frames)} px"


def build_datasets(cfg, stage, mcfg):
    """Task -> training dataset for a stage (resolutions from the stage; folders when configured). cfg: the run's
    train.TrainConfig (its data fields), mcfg: the stage's ModelConfig."""
    ps = mcfg.patch_size
    need = set(stage['mix'])
    out = {}
    if need & {'image_rec', 'image_und'}:
        res = tuple(stage.get('image_res', (64, 256)))
        ds = (ImageFolder(cfg.image_dir, res=res, patch_size=ps) if cfg.image_dir else
              SyntheticImages(max(cfg.n_images, 2), 'train', cfg.seed, res=res, patch_size=ps))
        out.update({t: ds for t in ('image_rec', 'image_und') if t in need})
    if need & {'video_rec', 'video_und'}:
        res = tuple(stage.get('video_res', (64, 128)))
        for t in need & {'video_rec', 'video_und'}:
            mode = 'recon' if t == 'video_rec' else 'understand'
            out[t] = (VideoFolder(cfg.video_dir, res=res, patch_size=ps, mode=mode) if cfg.video_dir else
                      SyntheticVideos(max(cfg.n_videos, 2), 'train', cfg.seed, res=res, patch_size=ps,
                                      frames=cfg.video_frames))
    if need & {'3d_rec', '3d_und'}:
        ds = (AssetFolder(cfg.asset_dir, patch_size=ps, captions=cfg.captions_3d) if cfg.asset_dir else
              Synthetic3D(max(cfg.n_3d, 2), 'train', cfg.seed, views=cfg.views_3d, view_res=cfg.view_res_3d,
                          grid=mcfg.gs_resolution, patch_size=ps))
        out.update({t: ds for t in ('3d_rec', '3d_und') if t in need})
    return out


class TaskStream:
    """Batches for one task from a dataset, resumable: its position is (epoch, batch) on this rank.
    Batches come from TokenBudgetSampler's deterministic plan, so a resumed run sees the same data. One
    DataLoader serves every epoch (its key lists run on from epoch to epoch), so its workers, and the
    built-in datasets' render caches inside them, live for the whole stage. At each epoch's end rank 0 prints what
    was skipped or made smaller (skip_report, TokenBudgetSampler.report)."""

    def __init__(self, dataset, budget, config, seed, rank, world, workers, pin=False, max_samples=0):
        self.sampler = TokenBudgetSampler(dataset, budget, seed, rank, world, max_samples)
        self.dataset, self.config, self.workers, self.pin = dataset, config, workers, pin
        self.epoch, self.pos, self._it, self.skipped = 0, 0, None, []

    def state(self):
        return dict(epoch=self.epoch, pos=self.pos)

    def load(self, state):
        self.epoch, self.pos, self._it = state['epoch'], state['pos'], None

    def mine(self, epoch):
        """This rank's batches (lists of indices) of one epoch."""
        return self.sampler.plan(epoch)[self.sampler.rank::self.sampler.world_size]

    def _keys(self, epoch, pos):
        while True:                             # endless: the loader's workers persist across epochs
            yield from self.sampler.keys(epoch)[self.sampler.rank::self.sampler.world_size][pos:]
            epoch, pos = epoch + 1, 0

    def _open(self):
        fn = functools.partial(collate, config=self.config)
        # own generator: opening a DataLoader iterator draws a seed, which must not move the global RNG
        # (a resumed run opens one more iterator than an uninterrupted one)
        self._it = iter(DataLoader(self.dataset, batch_sampler=self._keys(self.epoch, self.pos), collate_fn=fn,
                                   num_workers=self.workers, pin_memory=self.pin, generator=torch.Generator()))

    def next(self):
        if self._it is None:
            self._open()
        batch = next(self._it)
        w = self.sampler.world_size         # every rank's batch at this position, from the plan: no communication
        batch.rows = max(len(b) for b in self.sampler.plan(self.epoch)[self.pos * w:(self.pos + 1) * w])
        self.pos += 1
        self.skipped += batch.skipped
        if self.pos == len(self.mine(self.epoch)):      # the epoch's last batch: report, move on
            for report in (skip_report(self.dataset, self.skipped), self.sampler.report(self.epoch)):
                if report and self.sampler.rank == 0:
                    print(report, flush=True)
            self.epoch, self.pos, self.skipped = self.epoch + 1, 0, []
        return batch


# -----------------------------------------------------------------------------
# token shards (written by shards.py): pre-tokenised data for a downstream generator


class TokenShards(Dataset):
    """The samples of a folder of token shards (`python shards.py encode ...`), in shard order. ds[i] -> dict:
    tokens [N_i, G] int64 FSQ indices (or mean [N_i, L] float32, and logvar when stored), coords [N_i, 4] int64
    (t, row, column, z), and the metadata source, kind, shape (of the reconstruction), grid, caption, label.
    Rows are read lazily from the memory-mapped files (one handle per process, so DataLoader workers work).
    Shards made with different models or latents in one folder are an error naming them."""

    def __init__(self, path):
        from safetensors import safe_open
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such folder of token shards")
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path)
                            if f.startswith('shard-') and f.endswith('.safetensors'))
        if not self.files:
            raise ValueError(f"{path}: no shard-*.safetensors files (write them with shards.py encode)")
        self.index, self.offsets, self.samples, self._handles = [], [], [], {}
        first = None
        for k, file in enumerate(self.files):
            with safe_open(file, 'pt') as f:
                meta, offsets, keys = f.metadata(), f.get_tensor('offsets'), set(f.keys())
            made = (meta['model_config'], meta['latent'])
            first = first or (made, file)
            if made != first[0]:
                raise ValueError(f"{file}: made with another model or latent than {first[1]}")
            self.keys = [n for n in ('tokens', 'mean', 'logvar') if n in keys]
            self.offsets.append(offsets.tolist())
            self.samples.append(json.loads(meta['samples']))
            self.index += [(k, j) for j in range(len(offsets) - 1)]
        self.latent = first[0][1]
        self.model_config = json.loads(first[0][0])

    def __len__(self):
        return len(self.index)

    def _handle(self, k):
        from safetensors import safe_open
        if (os.getpid(), k) not in self._handles:
            self._handles[(os.getpid(), k)] = safe_open(self.files[k], 'pt')
        return self._handles[(os.getpid(), k)]

    def __getstate__(self):     # handles stay in their process; a worker opens its own
        return {**self.__dict__, '_handles': {}}

    def __getitem__(self, i):
        k, j = self.index[i]
        a, b = self.offsets[k][j], self.offsets[k][j + 1]
        f = self._handle(k)
        item = {n: f.get_slice(n)[a:b] for n in self.keys + ['coords']}
        item = {n: v.long() if n in ('tokens', 'coords') else v.float() for n, v in item.items()}
        return {**item, **self.samples[k][j]}


def collate_tokens(items):
    """TokenShards items -> one packed batch (no padding, as model.Packed): tokens or mean [sum N_i, ...], coords
    [sum N_i, 4], seqlens, kinds, grids, captions, labels, sources."""
    key = 'tokens' if 'tokens' in items[0] else 'mean'
    return dict(**{key: torch.cat([it[key] for it in items])}, coords=torch.cat([it['coords'] for it in items]),
                seqlens=[len(it['coords']) for it in items], kinds=[it['kind'] for it in items],
                grids=[it['grid'] for it in items], captions=[it['caption'] for it in items],
                labels=[it['label'] for it in items], sources=[it['source'] for it in items])
