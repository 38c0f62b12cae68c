"""
The host-side plan of a packed batch: everything about a batch that depends on its integer coords and lengths
but not on its values, computed once on the host (numpy; in the DataLoader workers when data.collate builds it)
and moved to the device with the batch. Every layer of both trunks, the pooling head, the Gaussian decoder and the
KV-cache decode reuse it, so no layer derives structure from device tensors: a training step reads nothing back
from the device and runs the same ops whatever the number of samples.

  segments      each token's (sample, temporal tile) segment; tiles of 4 latent frames are encoded independently,
                their t re-based to 0 (official default)
  Layout        which queries attend to which keys (block-diagonal: cu_seqlens, flash-attn varlen convention);
                the attention kernel of the layout's device adds what it needs when the layout is moved
                (kernels.attention.layout_plan)
  position_lookup  the learned 2D position table resized per segment grid (SigLIP2-NaFlex), as weights
  gs_windows    the Gaussian decoder's shifted 8^3 windows
  cache_plan    the decoder's KV-cache decode, step by step (paper Fig. 6)

model.py builds the structure through build_structure(coords, seqlens, kinds, config); this file never imports
model.py (config is read by attribute).
"""
import functools
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from kernels import attention as kattn


def to_device(obj, device, pin=False):
    """A copy of a structure dataclass with its tensors on `device` (or pinned); fields ending in _host stay on the
    CPU. Layouts get their kernel's extras for the device (kernels.attention.layout_plan)."""
    vals = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor) and not f.name.endswith('_host'):
            v = v.pin_memory() if pin else v.to(device, non_blocking=torch.device(device).type == 'cuda')
        elif isinstance(v, (Layout, Windows, CacheStep)):
            v = to_device(v, device, pin)
        elif isinstance(v, dict):
            v = {k: to_device(x, device, pin) for k, x in v.items()}
        elif isinstance(v, list) and v and isinstance(v[0], CacheStep):
            v = [to_device(x, device, pin) for x in v]
        vals[f.name] = v
    out = type(obj)(**vals)
    if isinstance(out, Layout) and not pin:
        out.plan = kattn.layout_plan(out.cu_q_host, out.cu_k_host, out.max_q, out.max_k, device)
    return out


def run_lengths(key):
    """Lengths of the runs of equal values in a sorted key array."""
    if not len(key):
        return []
    return np.diff(np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1], [True]])))


@dataclass
class Layout:
    """Which queries attend to which keys: segment i is queries cu_q[i]:cu_q[i+1] against keys cu_k[i]:cu_k[i+1]
    (block-diagonal, non-causal). One layout serves every layer of a trunk."""
    cu_q: torch.Tensor          # [S+1] int32
    cu_k: torch.Tensor
    cu_q_host: torch.Tensor     # the same, kept on the CPU (the kernels plan from them without reading the device)
    cu_k_host: torch.Tensor
    max_q: int
    max_k: int
    plan: object = None         # what the device's attention kernel precomputes (kernels.attention.layout_plan)

    @staticmethod
    def build(lens_q, lens_k):
        lq, lk = np.asarray(lens_q, dtype=np.int64), np.asarray(lens_k, dtype=np.int64)
        cq, ck = (torch.from_numpy(np.concatenate([[0], np.cumsum(x)])).to(torch.int32) for x in (lq, lk))
        if torch.equal(cq, ck):             # self-attention: one cu for q and k (the kernel caches per cu)
            ck = cq
        return Layout(cq, ck, cq.clone(), ck if ck is cq else ck.clone(), int(lq.max(initial=0)),
                      int(lk.max(initial=0)))

    def to(self, device):
        return to_device(self, device)


@dataclass
class Windows:
    """The Gaussian decoder's windowed attention for one shift: tokens in window order, and back."""
    order: torch.Tensor         # [M] token of each window-ordered row
    inverse: torch.Tensor       # [M] row of each token
    layout: Layout

    def to(self, device):
        return to_device(self, device)


@dataclass
class CacheStep:
    """One step of the KV-cache decode (cache_plan): its new tokens, their positions, and which rows of
    [cached K/V | new K/V] each sample attends to and keeps."""
    idx: torch.Tensor           # [n] tokens decoded in this step (input order, sample-major)
    local: torch.Tensor         # [n, 4] their coords in the step (t starts at k after the first step)
    pos_index: torch.Tensor     # position-table lookup of the new tokens (position_lookup)
    pos_rows: torch.Tensor
    key_coords: torch.Tensor    # [m, 4] coords of the keys: per sample, its cached tokens then its new ones
    key_order: torch.Tensor     # [m] rows of cat([cache, new]) in that order
    keep: torch.Tensor          # [c] rows of cat([cache, new]) kept as the next step's cache (sample-major)
    layout: Layout              # the step's queries against their sample's keys


@dataclass
class Structure:
    """Everything about a packed batch that does not depend on its values (build_structure)."""
    seqlens: list               # tokens per sample
    single_frame: bool          # only images / 3D: feats and pixel outputs hold the pt = 0 slot only
    order: torch.Tensor         # [N] tokens in (sample, tile) segment order, or None when already so (pixels)
    inverse: torch.Tensor       # [N] back to input order, or None
    local: torch.Tensor         # [N, 4] int64 tile-local coords (t re-based per tile), segment order
    seg: Layout                 # (sample, temporal tile) segments: every encoder and decoder layer
    pos_index: torch.Tensor     # [N] row of pos_rows for each token (segment order)
    pos_rows: torch.Tensor      # [R, g*g] float32: per distinct (grid, row, col) the resize weights of the table
    pool: Layout                # one probe query per sample against all its tokens (input order)
    sample_id: torch.Tensor     # [N] sample of each token (input order)
    gs: dict = None             # {shift: Windows} over the 3D samples' voxels (all 3D samples, input order)
    gs_index: torch.Tensor = None  # [M] tokens of the 3D samples when the batch also holds pixels, else None
    cache: list = None          # [CacheStep]: the KV-cache decode (config.decoder_cache_frames > 0), else None

    def to(self, device):
        return to_device(self, device)

    def pin_memory(self):
        return to_device(self, None, pin=True)


# -----------------------------------------------------------------------------
# the pieces, then build_structure


@functools.lru_cache(maxsize=512)
def resize_weights(g, h, w):
    """[h*w, g*g]: row r*w + c holds the weights by which F.interpolate(bilinear, antialias, align_corners=False)
    mixes the g x g table entries into cell (r, c) of an h x w resize. Interpolation is linear, so resizing the
    g*g one-hot tables gives exactly these weights: table_resized[r, c] = weights[r*w + c] @ table."""
    eye = torch.eye(g * g, dtype=torch.float32).reshape(1, g * g, g, g)
    r = F.interpolate(eye, size=(h, w), mode='bilinear', align_corners=False, antialias=True)[0]
    return r.reshape(g * g, h * w).t().contiguous()


def position_lookup(local, seg_lens, g):
    """Per token (segment order) the row of the position table resize it reads (SigLIP2-NaFlex: each
    segment's grid is (max row + 1, max column + 1), the g x g table resized to it). -> (index [N], rows):
    rows stacks the resize weights of each distinct grid, in order of first use. No per-segment loop: the
    grids come from one segmented max, the index from repeats."""
    local, lens = np.asarray(local, dtype=np.int64).reshape(-1, 4), np.asarray(seg_lens, dtype=np.int64)
    lens = lens[lens > 0]
    if len(lens) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, g * g)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    h, w = (np.maximum.reduceat(local[:, a], starts) + 1 for a in (1, 2))     # each segment's grid
    grids = list(dict.fromkeys(zip(h.tolist(), w.tolist())))                  # distinct, in order of first use
    offset = dict(zip(grids, np.cumsum([0] + [a * b for a, b in grids]).tolist()))
    seg_offset = np.array([offset[hw] for hw in zip(h.tolist(), w.tolist())], dtype=np.int64)
    index = np.repeat(seg_offset, lens) + local[:, 1] * np.repeat(w, lens) + local[:, 2]
    return torch.from_numpy(index), torch.cat([resize_weights(g, *hw) for hw in grids])


def first_t(coords, sample, B):
    """[B] each sample's first t (its tiles start there)."""
    t0 = np.full(B, np.iinfo(np.int64).max)
    np.minimum.at(t0, sample, coords[:, 0])
    return t0


def segments(coords, seqlens, tile_latent):
    """Assign every token to a (sample, temporal tile) segment, tiles of `tile_latent` latent frames. -> (order [N]
    or None when already in segment order, tile-local coords [N, 4] in that order, segment lengths). Tiles start at
    each sample's first t (official: the batch-wide first t, identical for pixel data which always starts at t = 0,
    and harmless because RoPE is relative)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 4)
    B = len(seqlens)
    sample = np.repeat(np.arange(B), seqlens)
    t0 = first_t(coords, sample, B)
    tile = (coords[:, 0] - t0[sample]) // tile_latent if len(coords) else coords[:, 0]
    n_tiles = int(tile.max()) + 1 if len(tile) else 1
    key = sample * n_tiles + tile                                               # segment id, monotone
    order = None
    if len(key) > 1 and (key[1:] < key[:-1]).any():
        order = np.argsort(key, kind='stable')
        coords, key, tile, sample = coords[order], key[order], tile[order], sample[order]
    local = coords.copy()
    local[:, 0] = coords[:, 0] - t0[sample] - tile * tile_latent
    return order, local, [int(n) for n in run_lengths(key)]


def gs_windows(coords3, seqlens, window):
    """Shifted-window groups of the Gaussian decoder (8^3 windows, shift window/2 on odd blocks), per shift,
    over voxel coords [M, 3] of samples with `seqlens` voxels. -> {shift: Windows}."""
    coords3 = np.asarray(coords3, dtype=np.int64).reshape(-1, 3)
    sample = np.repeat(np.arange(len(seqlens)), seqlens)
    out = {}
    for shift in (0, window // 2):
        w = (coords3 + shift) // window                                         # [M, 3] window index
        n = int(w.max()) + 1 if len(w) else 1
        key = ((sample * n + w[:, 0]) * n + w[:, 1]) * n + w[:, 2]
        order = np.argsort(key, kind='stable')
        lens = run_lengths(key[order])
        out[shift] = Windows(torch.from_numpy(order), torch.from_numpy(np.argsort(order, kind='stable')),
                             Layout.build(lens, lens))
    return out


def cache_plan(coords, seqlens, k_lat, tile, pos_grid):
    """The KV-cache decode's steps (official recipe, paper Fig. 6), from host coords [N, 4]: with a cache of
    k_lat latent frames, each step decodes s = tile - k_lat new latent frames of every sample, whose local t starts
    at k_lat; the cache holds the previous k_lat latent frames re-based to t = 0..k_lat-1. Samples with no new
    tokens in a step sit it out (their cache stays). -> [CacheStep]"""
    B, s, T = len(seqlens), tile - k_lat, torch.from_numpy
    sample = np.repeat(np.arange(B), seqlens)
    t = coords[:, 0] - first_t(coords, sample, B)[sample]
    cached = [np.zeros((0, 4), np.int64) for _ in range(B)]      # per sample: coords of its cached rows
    steps = []
    for step in range(int(t.max(initial=0)) // s + 1):
        idx = np.flatnonzero((t >= step * s) & (t < step * s + s))                 # sample-major
        if len(idx) == 0:                   # a gap in t across the whole batch: nothing to decode
            continue
        lens = np.bincount(sample[idx], minlength=B)
        c = coords[idx].copy()
        c[:, 0] = t[idx] - step * s + (k_lat if step > 0 else 0)
        new = np.split(c, np.cumsum(lens)[:-1])
        # rows of cat([cache, new]): per sample, its cached rows then its new ones
        c_start = np.concatenate([[0], np.cumsum([len(x) for x in cached])])
        n_start = c_start[-1] + np.concatenate([[0], np.cumsum(lens)])
        rows = [np.concatenate([np.arange(c_start[i], c_start[i + 1]), np.arange(n_start[i], n_start[i + 1])])
                for i in range(B)]
        keys = [np.concatenate([cached[i], new[i]]) for i in range(B)]
        # keep each sample's last k_lat latent frames, re-based to 0..k_lat-1 (not clamped at 0: a short first
        # tile ends at t = k_lat - 1, official)
        last = [x[:, 0] >= x[:, 0].max() + 1 - k_lat if len(x) else np.zeros(0, bool) for x in keys]
        keep = [r[m] for r, m in zip(rows, last)]
        cached = [x[m] - np.array([x[:, 0].max() + 1 - k_lat, 0, 0, 0]) if len(x) else x for x, m in zip(keys, last)]
        live = [i for i in range(B) if lens[i] > 0]
        pos_index, pos_rows = position_lookup(c, [int(lens[i]) for i in live], pos_grid)
        steps.append(CacheStep(T(idx), T(c), pos_index, pos_rows, T(np.concatenate([keys[i] for i in live])),
                               T(np.concatenate([rows[i] for i in live])), T(np.concatenate(keep)),
                               Layout.build([lens[i] for i in live], [len(keys[i]) for i in live])))
    return steps


def build_structure(coords, seqlens, kinds, config):
    """The structure of a packed batch from its integer coords [N, 4] (a host tensor or array), lengths and kinds.
    config: the ModelConfig (patch size, temporal tile, position grid, Gaussian window, decoder cache)."""
    coords = np.asarray(coords.cpu() if isinstance(coords, torch.Tensor) else coords, dtype=np.int64)
    coords = coords.reshape(-1, 4)
    seqlens = [int(n) for n in seqlens]
    pt = config.patch_size[0]
    order, local, lens = segments(coords, seqlens, max(config.tile_frames // pt, 1))
    pos_index, pos_rows = position_lookup(local, lens, config.pos_grid)
    t = torch.from_numpy
    gs, gs_index, cache = None, None, None
    if '3d' in kinds:
        ids = [i for i, k in enumerate(kinds) if k == '3d']
        starts = np.concatenate([[0], np.cumsum(seqlens)])
        idx = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in ids])
        gs = gs_windows(coords[idx, 1:], [seqlens[i] for i in ids], config.gs_window)
        gs_index = None if len(ids) == len(kinds) else t(idx)
    if config.decoder_cache_frames > 0:
        k_lat, tile = config.decoder_cache_frames // pt, config.tile_frames // pt
        if not (config.decoder_cache_frames % pt == 0 and 0 < k_lat < tile):
            raise ValueError(f"decoder_cache_frames={config.decoder_cache_frames}: expected a multiple of {pt} "
                             f"below tile_frames={config.tile_frames}")
        cache = cache_plan(coords, seqlens, k_lat, tile, config.pos_grid)
    return Structure(seqlens, all(k != 'video' for k in kinds),
                     None if order is None else t(order), None if order is None else t(np.argsort(order)),
                     t(local), Layout.build(lens, lens), pos_index, pos_rows, Layout.build([1] * len(seqlens), seqlens),
                     t(np.repeat(np.arange(len(seqlens)), seqlens)), gs, gs_index, cache)
