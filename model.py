"""
AToken: one transformer tokenizer for images, videos and 3D assets (arXiv 2509.14476).

Everything the tokenizer is lives in this file: the config and its presets, patchify/unpatchify into a
packed 4D token set and that set's structure (segments, attention layouts, position-table weights: built
once on the host, reused by every layer), 4D RoPE, block-diagonal attention, the SigLIP-style encoder with
its attention-pool
head, the KL bottleneck, FSQ, the RMSNorm decoder, 16-frame temporal tiling with an optional decoder KV
cache, loading Apple's released checkpoints (`AToken.from_pretrained`) and SigLIP2 initialisation of the
encoder (`AToken.init_from_siglip2`).

Module and parameter names follow the official checkpoints (apple/ml-atoken), so a released state dict
loads with a plain strict `load_state_dict`. The behaviour follows the official inference code exactly
(apple/ml-atoken; tests/test_official.py checks it to ~1e-6 in fp32 against tiny official models). Borrowed
ideas: nanoGPT (layout, from_pretrained), SigLIP2-NaFlex (resized 2D position table), FSQ (Mentzer et
al. 2023), TRELLIS (sparse packed transformer).

Letter legend for shape comments:
  B samples in a packed batch   N tokens (all samples, concatenated)   C channels   L latent channels
  T frames   H W height width   P patch   S segments (sample x temporal tile)   h heads   d head dim
  G FSQ groups (in attention: groups of segments)   Lq Lk query / key slots of such a group
"""
import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    patch_size: tuple = (4, 16, 16)     # (pt, ph, pw): frames, rows, columns per token
    encoder_width: int = 1152
    encoder_depth: int = 27
    encoder_heads: int = 16             # head_dim = width / heads (72 for So400m)
    encoder_mlp: int = 4304
    decoder_width: int = 1152
    decoder_depth: int = 27
    decoder_heads: int = 16
    decoder_mlp: int = 4304
    latent_channels: int = 48           # 32 in stage 1, widened to 48 from stage 2 on
    use_quantizer: bool = False         # FSQ on the latent mean (stage 4, "So/D")
    fsq_groups: int = 8                 # codebooks; each has latent_channels / fsq_groups dims
    fsq_levels: int = 4                 # levels per dim: 4^6 = 4096 codes per group
    pos_grid: int = 16                  # learned 2D position table is pos_grid x pos_grid, resized per sample
    rope_theta: float = 10000.0
    tile_frames: int = 16               # video frames per temporal tile (4 latent frames)
    decoder_cache_frames: int = 0       # >0: decode with a KV cache of this many previous frames (Fig. 6)
    # 3D Gaussian decoder (a separate network: official 3d_decode_gs.yaml). Input: the first ph*pw*3
    # channels of the tokenizer's reconstruction of each occupied voxel of the gs_resolution^3 grid.
    gs_width: int = 768
    gs_depth: int = 12
    gs_heads: int = 12
    gs_mlp: int = 3072
    gs_window: int = 8                  # 8^3 windowed attention, shifted by 4 on odd blocks
    gs_per_voxel: int = 32              # Gaussians per voxel
    gs_resolution: int = 64

    @property
    def in_channels(self):              # one flattened (pt, ph, pw, c) patch
        pt, ph, pw = self.patch_size
        return pt * ph * pw * 3

    @classmethod
    def from_dict(cls, d, source='model_config'):
        """A saved asdict(config) (export, training checkpoint) -> ModelConfig; unknown fields name `source`."""
        d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: fields {unknown} are not ModelConfig fields (saved by another version?)")
        return cls(**dict(d, patch_size=tuple(d.get('patch_size', cls.patch_size))))


RETIRED_FIELDS = ('use_rope',)          # in files saved by earlier versions; ignored when loading them


# presets, DiT style. so400m is the paper/official model (845.7M parameters).
PRESETS = {
    'so400m': ModelConfig(),
    'base': ModelConfig(encoder_width=768, encoder_depth=12, encoder_heads=12, encoder_mlp=3072,
                        decoder_width=768, decoder_depth=12, decoder_heads=12, decoder_mlp=3072),
    # laptop-sized: trains on a CPU in minutes. At the paper's compression: So400m keeps 48 floats per 4x16x16x3
    # patch (16x fewer floats than an image's pixels, 64x for video); 12 floats per 4x8x8x3 patch are the same
    # ratios, and 2 FSQ groups of 6 dims keep the paper's 4^6 = 4096 codes per group (stage 1's latent: 8 of 12,
    # as 32 of 48).
    'tiny': ModelConfig(patch_size=(4, 8, 8), encoder_width=64, encoder_depth=2, encoder_heads=2,
                        encoder_mlp=128, decoder_width=64, decoder_depth=2, decoder_heads=2,
                        decoder_mlp=128, latent_channels=12, fsq_groups=2),
}

NORM_EPS = 1e-6  # every LayerNorm / RMSNorm in the official tokenizer
SIGLIP2_DEFAULT = 'ViT-SO400M-16-SigLIP2-256'   # open_clip name (timm tower, 16x16 position table at 256 px)

# -----------------------------------------------------------------------------
# media <-> packed token sets


@dataclass
class Packed:
    """A batch as one packed token set: samples concatenated along N, no padding between them.

    feats are float in [-1, 1], or uint8 (0..255, value = u / 127.5 - 1) as they cross process boundaries:
    `.to(device)` turns them into floats on the device. A batch of one-frame samples only (images, 3D voxels)
    carries only the pt = 0 slot of each patch (ph*pw*3 columns: the official zero frames are a property of
    the input layer, not of the data); a batch with a video carries full pt*ph*pw*3 patches, its one-frame
    samples zero-padded. `structure` is what attention, position tables and pooling need, built on the host
    (build_structure); model.pack and data.collate fill it in."""
    feats: torch.Tensor     # [N, C] flattened patches (pt, ph, pw, c), c fastest; or latents
    coords: torch.Tensor    # [N, 4] int64 (t, x, y, z): x = patch row, y = patch column, z = 0 for pixels
    seqlens: list           # tokens per sample, sum = N
    kinds: list             # 'image' | 'video' | '3d' per sample
    grids: list             # latent grid (t, h, w) per sample, for unpatchify (None for 3D)
    patch_size: tuple = None  # (pt, ph, pw) the feats were made with
    structure: object = None  # Structure (host-built), or None: built from coords on first use

    def to(self, device=None, dtype=None):
        """Move to `device` once per batch: pixels (uint8 -> float there), coords and the structure's tensors;
        asynchronous from pinned memory on CUDA."""
        nb = torch.device(device).type == 'cuda' if device is not None else False
        feats = self.feats.to(device, non_blocking=nb)
        if feats.dtype == torch.uint8:
            feats = from_uint8(feats)
        st = self.structure.to(device) if self.structure is not None else None
        return Packed(feats.to(dtype) if dtype is not None else feats, self.coords.to(device, non_blocking=nb),
                      self.seqlens, self.kinds, self.grids, self.patch_size, st)

    def pin_memory(self):               # DataLoader(pin_memory=True) calls this in its pinning thread
        return Packed(self.feats.pin_memory(), self.coords.pin_memory(), self.seqlens, self.kinds, self.grids,
                      self.patch_size, self.structure.pin_memory() if self.structure is not None else None)


def to_uint8(x):
    """Pixels in [-1, 1] -> uint8 levels u = round((x + 1) * 127.5), clamped to [0, 255]."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(u):
    """uint8 levels -> float32 pixels u / 127.5 - 1: the exact inverse of to_uint8 on its grid."""
    return u.float() / 127.5 - 1


def prepare(x, patch_size):
    """Official preprocessing of one image (H, W, 3) or video (T, H, W, 3) in [-1, 1].

    Pads fewer than pt frames with zeros (mid-grey), truncates T to a multiple of pt, centre-crops H, W
    to patch multiples (no resize). Returns the (T', H', W', 3) tensor and its kind.
    """
    if x.dim() not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"expected an image (H, W, 3) or a video (T, H, W, 3), got shape {tuple(x.shape)}")
    kind = 'image' if x.dim() == 3 else 'video'
    pt, ph, pw = patch_size
    v = x[None] if kind == 'image' else x                                   # (T, H, W, 3)
    T, H, W, _ = v.shape
    if H < ph or W < pw:
        raise ValueError(f"{kind} of size {H}x{W} is smaller than one {ph}x{pw} patch")
    if T < pt:
        v = torch.cat([v, v.new_zeros(pt - T, H, W, 3)])                    # zero = mid-grey
    v = v[: v.shape[0] // pt * pt]
    H2, W2 = H // ph * ph, W // pw * pw
    top, left = (H - H2) // 2, (W - W2) // 2
    return v[:, top:top + H2, left:left + W2], kind


def patchify(v, patch_size):
    """(T, H, W, 3) with T, H, W patch multiples -> feats [N, pt*ph*pw*3] and coords [N, 4], raster order."""
    pt, ph, pw = patch_size
    T, H, W, _ = v.shape
    t, h, w = T // pt, H // ph, W // pw
    feats = v.reshape(t, pt, h, ph, w, pw, 3).permute(0, 2, 4, 1, 3, 5, 6)  # (t, h, w, pt, ph, pw, 3)
    feats = feats.reshape(t * h * w, pt * ph * pw * 3)                     # [N, C]
    return feats, grid_coords(t, h, w).clone().to(v.device)


@functools.lru_cache(maxsize=1024)
def grid_coords(t, h, w):
    """Coords [t*h*w, 4] = (t, row, column, 0) of a latent grid in raster order (cached: the same for every
    sample of that grid; callers get a copy)."""
    grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing='ij')
    return torch.stack([*grid, torch.zeros_like(grid[0])], -1).reshape(-1, 4)


def unpatchify(feats, grid, patch_size):
    """feats [t*h*w, pt*ph*pw*3] in raster order -> (t*pt, h*ph, w*pw, 3)."""
    pt, ph, pw = patch_size
    t, h, w = grid
    v = feats.reshape(t, h, w, pt, ph, pw, 3).permute(0, 3, 1, 4, 2, 5, 6)  # (t, pt, h, ph, w, pw, 3)
    return v.reshape(t * pt, h * ph, w * pw, 3)


def voxel_tokens(asset, patch_size):
    """A 3D asset {'feats': [N, ph*pw*3] in [-1, 1], 'coords': [N, 3] voxel (i, j, k)} -> its one-frame
    feats [N, ph*pw*3] (the pt = 0 slot of the space-time patch) and coords [N, 4] = (0, i, j, k).

    The features are each occupied voxel's RGB patch from its nearest view (render3d.py), as official.
    (Official coords carry t = 1; tiles re-base t and RoPE is relative, so t = 0 is identical.)"""
    pt, ph, pw = patch_size
    f, c = torch.as_tensor(asset['feats']), torch.as_tensor(asset['coords']).long()
    if f.dim() != 2 or f.shape[1] != ph * pw * 3 or c.shape != (len(f), 3):
        raise ValueError(f"3D asset: expected feats [N, {ph * pw * 3}] and coords [N, 3], got "
                         f"{tuple(f.shape)} and {tuple(c.shape)}")
    return f, torch.cat([torch.zeros_like(c[:, :1]), c], 1)                    # [N, C1], [N, 4]


def pack(media, patch_size, config=None):
    """List of images (H, W, 3) / videos (T, H, W, 3) in [-1, 1] and 3D assets (dicts, see voxel_tokens)
    -> one Packed batch. One-frame samples (images, 3D) carry only the pt = 0 slot unless a video shares the
    batch (then they are zero-padded to full patches, the official layout). With a ModelConfig `config`, the
    batch's structure is built here too (on the host, where the coords are)."""
    pt, ph, pw = patch_size
    video = any(not isinstance(x, dict) and torch.as_tensor(x).dim() == 4 for x in media)
    c1, c_full = ph * pw * 3, pt * ph * pw * 3
    feats, coords, seqlens, kinds, grids = [], [], [], [], []
    for x in media:
        if isinstance(x, dict):
            f, c = voxel_tokens(x, patch_size)
            kind, grid = '3d', None
        else:
            x = torch.as_tensor(x)
            kind = 'image' if x.dim() == 3 else 'video'
            v = prepare(x, (1 if kind == 'image' else pt, ph, pw))[0]          # images: one frame, no padding
            f, c = patchify(v, (v.shape[0] if kind == 'image' else pt, ph, pw))
            grid = (1 if kind == 'image' else v.shape[0] // pt, v.shape[1] // ph, v.shape[2] // pw)
        if video and f.shape[1] == c1:
            f = F.pad(f, (0, c_full - c1))                                      # zero frames 1..pt-1
        feats.append(f), coords.append(c), seqlens.append(len(f)), kinds.append(kind), grids.append(grid)
    C = c_full if video else c1
    x = Packed(torch.cat(feats) if feats else torch.zeros(0, C), torch.cat(coords) if coords else
               torch.zeros(0, 4, dtype=torch.long), seqlens, kinds, grids, tuple(patch_size))
    if config is not None:
        x.structure = build_structure(x.coords, seqlens, kinds, config)
    return x


def unpack(feats, packed, patch_size):
    """Decoder output [N, C] (tokens in packed order) -> list of media; images keep frame 0 only;
    3D assets give their voxels' first-slot features [N_i, ph*pw*3] (the Gaussian decoder's input)."""
    out, (pt, ph, pw) = [], patch_size
    frames = feats.shape[1] // (ph * pw * 3)                                    # 1 (one-frame batch) or pt
    for f, kind, grid in zip(feats.split(packed.seqlens), packed.kinds, packed.grids):
        if kind == '3d':
            out.append(f[:, :ph * pw * 3])
            continue
        v = unpatchify(f, grid, (frames, ph, pw))
        out.append(v[0] if kind == 'image' else v)
    return out


def cu_seqlens(lengths, device=None):
    """[l0, l1, ...] -> [0, l0, l0+l1, ...] (int32, flash-attention convention)."""
    return F.pad(torch.as_tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)


# -----------------------------------------------------------------------------
# the packed batch's structure: computed once on the host (numpy), reused by every layer of both trunks,
# the pooling head, the Gaussian decoder and the KV-cache decode. Nothing here reads a device tensor.


def _move(obj, device, pin=False):
    """A copy of a structure dataclass with its tensors moved (fields ending in _host stay on the CPU)."""
    vals = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor) and not f.name.endswith('_host'):
            v = v.pin_memory() if pin else v.to(device, non_blocking=torch.device(device).type == 'cuda')
        elif isinstance(v, Layout):
            v = _move(v, device, pin).mark_dynamic()
        elif isinstance(v, Windows):
            v = _move(v, device, pin)
        elif isinstance(v, dict):
            v = {k: _move(x, device, pin) for k, x in v.items()}
        vals[f.name] = v
    return type(obj)(**vals)


# Masked groups up to this many scores run GroupedAttention on CPU, larger ones and unmasked ones SDPA. Forward +
# backward of ~1,000 tokens, 2 heads of 32, one thread: segments of 8-56 tokens packed, 3.4 ms (GroupedAttention)
# vs 4.2 (SDPA with the mask); 30-128 tokens, 5.8 vs 7.5; 60-200, 11.9 vs 12.1. Groups of one segment each (no
# mask) tie from 26 to 64 tokens and are faster in SDPA above (96 x 10: 2.8 vs 3.6 ms; 637 x 1: 11.8 vs 16.3);
# only 16-token segments were faster grouped (2.1 vs 2.4 ms), so unmasked groups all take SDPA.
SMALL_SCORES = 128 * 128


@dataclass
class Layout:
    """Which queries attend to which keys: segment i is queries cu_q[i]:cu_q[i+1] against keys
    cu_k[i]:cu_k[i+1] (block-diagonal, non-causal). One layout serves every layer of a trunk.

    The Triton kernel (CUDA) reads cu_* and block lists made from the host copies. The portable path (CPU)
    packs the segments into G groups of Lq query and Lk key slots (Lq, Lk = the longest segment) and runs one
    masked SDPA over [G, h, Lq, Lk]: no per-segment loop, ~N x longest segment scores instead of N^2 for one
    dense block-diagonal mask. Slots a group leaves empty gather row 0 and are masked out as keys; as queries
    they see every key of their group (finite, never read back, so they get zero gradient)."""
    cu_q: torch.Tensor          # [S+1] int32
    cu_k: torch.Tensor
    cu_q_host: torch.Tensor     # the same, kept on the CPU
    cu_k_host: torch.Tensor
    max_q: int
    max_k: int
    q_gather: torch.Tensor = None   # [G*Lq] token of each query slot
    k_gather: torch.Tensor = None   # [G*Lk]
    q_scatter: torch.Tensor = None  # [Nq] slot of each query token
    k_scatter: torch.Tensor = None  # [Nk] slot of each key token
    q_real: torch.Tensor = None     # [G, Lq, 1] 1.0 where a query slot holds a token, 0.0 where it is empty
    mask: torch.Tensor = None       # [G, 1, Lq, Lk] bool, True = attend
    bias: torch.Tensor = None       # the same as an additive float mask (0 / -inf), for the explicit-softmax path
    full: bool = False              # every group is one whole segment: no mask needed (SDPA is faster without)
    identity: bool = False          # ... and in token order: no gather / scatter either (e.g. one sample)
    small: bool = False             # short groups (Lq * Lk <= SMALL_SCORES): masked, GroupedAttention beats SDPA

    @staticmethod
    def build(lens_q, lens_k, grouped=True):
        lq, lk = np.asarray(lens_q, dtype=np.int64), np.asarray(lens_k, dtype=np.int64)
        cq, ck = (np.concatenate([[0], np.cumsum(x)]) for x in (lq, lk))
        t = lambda a, dt=torch.long: torch.from_numpy(np.ascontiguousarray(a)).to(dt)
        same = np.array_equal(cq, ck)             # self-attention: one cu for q and k (the kernel caches per cu)
        cu_q, cu_q_host = t(cq, torch.int32), t(cq, torch.int32)
        cu_k, cu_k_host = (cu_q, cu_q_host) if same else (t(ck, torch.int32), t(ck, torch.int32))
        lay = Layout(cu_q, cu_k, cu_q_host, cu_k_host, int(lq.max(initial=0)), int(lk.max(initial=0)))
        if grouped:
            lay.grouped()
        return lay

    def grouped(self):
        """Build the portable path's gather/scatter indices and mask (numpy, on the host) if not yet built."""
        if self.mask is not None:
            return self
        cq, ck = self.cu_q_host.numpy().astype(np.int64), self.cu_k_host.numpy().astype(np.int64)
        lq, lk = np.diff(cq), np.diff(ck)
        Lq, Lk, S = max(self.max_q, 1), max(self.max_k, 1), len(lq)
        group, oq, ok = np.zeros(S, np.int64), np.zeros(S, np.int64), np.zeros(S, np.int64)
        used_q, used_k = [], []                 # first fit, longest segments first: few, well-filled groups
        for i in np.argsort(-lk, kind='stable'):
            g = next((g for g in range(len(used_q)) if used_q[g] + lq[i] <= Lq and used_k[g] + lk[i] <= Lk),
                     len(used_q))
            if g == len(used_q):
                used_q.append(0), used_k.append(0)
            group[i], oq[i], ok[i] = g, used_q[g], used_k[g]
            used_q[g] += lq[i]
            used_k[g] += lk[i]
        G = len(used_q)

        def slots(lens, cu, off, L):
            seg = np.repeat(np.arange(S), lens)                                # [n] segment of each token
            slot = group[seg] * L + off[seg] + np.arange(len(seg)) - cu[seg]
            gather, seg_of_slot = np.zeros(G * L, np.int64), np.full(G * L, -1, np.int64)
            gather[slot], seg_of_slot[slot] = np.arange(len(seg)), seg
            return slot, gather, seg_of_slot.reshape(G, L)
        q_slot, q_gather, sq = slots(lq, cq, oq, Lq)
        k_slot, k_gather, sk = slots(lk, ck, ok, Lk)
        mask = (sq[:, :, None] == sk[:, None, :]) | (sq[:, :, None] < 0)      # empty query slots: see all
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
        self.q_gather, self.k_gather, self.q_scatter, self.k_scatter = t(q_gather), t(k_gather), t(q_slot), t(k_slot)
        self.q_real = t((sq >= 0)[:, :, None].astype(np.float32))
        self.mask = t(mask[:, None])
        self.bias = torch.zeros(self.mask.shape).masked_fill_(~self.mask, float('-inf'))
        self.small = Lq * Lk <= SMALL_SCORES
        self.full = bool(G == S and (lq == Lq).all() and (lk == Lk).all())
        self.identity = self.full and bool((q_gather == np.arange(len(q_gather))).all()
                                           and (k_gather == np.arange(len(k_gather))).all())
        return self.mark_dynamic()

    def mark_dynamic(self):
        """Tell torch.compile that these sizes change from batch to batch: a compiled block then serves every
        micro-batch with one graph (without this the mask's sizes are specialised and each new size recompiles)."""
        for x in (self.q_gather, self.k_gather, self.q_scatter, self.k_scatter):
            if x is not None:
                torch._dynamo.maybe_mark_dynamic(x, 0)
        if self.q_real is not None:
            torch._dynamo.maybe_mark_dynamic(self.q_real, 0)
            torch._dynamo.maybe_mark_dynamic(self.q_real, 1)
        for x in (self.mask, self.bias):
            if x is not None:
                for dim in (0, 2, 3):
                    torch._dynamo.maybe_mark_dynamic(x, dim)
        return self

    def to(self, device):
        return _move(self, device).mark_dynamic()


@dataclass
class Windows:
    """The Gaussian decoder's windowed attention for one shift: tokens in window order, and back."""
    order: torch.Tensor         # [M] token of each window-ordered row
    inverse: torch.Tensor       # [M] row of each token
    layout: Layout

    def to(self, device):
        return _move(self, device)


@dataclass
class Structure:
    """Everything about a packed batch that does not depend on its values, built once on the host
    (build_structure) and moved to the device with the batch."""
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
    coords_host: np.ndarray = None  # [N, 4] int64 input coords (the KV-cache decode plans its steps from them)

    def to(self, device):
        return _move(self, device)

    def pin_memory(self):
        return _move(self, None, pin=True)


@functools.lru_cache(maxsize=512)
def _resize_weights(g, h, w):
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
    return torch.from_numpy(index), torch.cat([_resize_weights(g, *hw) for hw in grids])


def segments(coords, seqlens, tile_latent):
    """Assign every token to a (sample, temporal tile) segment, tiles of `tile_latent` latent frames, on
    the host. -> (order [N] or None when already in segment order, tile-local coords [N, 4] in that order,
    segment lengths). Tiles start at each sample's first t (official: the batch-wide first t, identical for
    pixel data which always starts at t = 0, and harmless because RoPE is relative)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 4)
    B = len(seqlens)
    sample = np.repeat(np.arange(B), seqlens)
    t = coords[:, 0]
    t0 = np.full(B, np.iinfo(np.int64).max)
    np.minimum.at(t0, sample, t)
    tile = (t - t0[sample]) // tile_latent if len(t) else t
    n_tiles = int(tile.max()) + 1 if len(tile) else 1
    key = sample * n_tiles + tile                                               # segment id, monotone
    order = None
    if len(key) > 1 and (key[1:] < key[:-1]).any():
        order = np.argsort(key, kind='stable')
        coords, key, tile, sample = coords[order], key[order], tile[order], sample[order]
    local = coords.copy()
    local[:, 0] = coords[:, 0] - t0[sample] - tile * tile_latent
    lens = np.diff(np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1], [True]]))) if len(key) else []
    return order, local, [int(n) for n in lens]


def gs_windows(coords3, seqlens, window, grouped=True):
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
        k = key[order]
        lens = np.diff(np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1], [True]]))) if len(k) else []
        out[shift] = Windows(torch.from_numpy(order), torch.from_numpy(np.argsort(order, kind='stable')),
                             Layout.build(lens, lens, grouped))
    return out


def build_structure(coords, seqlens, kinds, config, grouped=True):
    """The structure of a packed batch from its integer coords [N, 4] (host tensor or array) and lengths.

    config: the ModelConfig (patch size, temporal tile, position grid, Gaussian window). grouped: also build
    the portable attention path's indices (CPU training; the Triton kernel on CUDA does not need them)."""
    coords = np.asarray(coords.cpu() if isinstance(coords, torch.Tensor) else coords, dtype=np.int64)
    coords = coords.reshape(-1, 4)
    seqlens = [int(n) for n in seqlens]
    order, local, lens = segments(coords, seqlens, max(config.tile_frames // config.patch_size[0], 1))
    pos_index, pos_rows = position_lookup(local, lens, config.pos_grid)
    t = torch.from_numpy
    gs, gs_index = None, None
    if '3d' in kinds:
        ids = [i for i, k in enumerate(kinds) if k == '3d']
        starts = np.concatenate([[0], np.cumsum(seqlens)])
        idx = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in ids])
        gs = gs_windows(coords[idx, 1:], [seqlens[i] for i in ids], config.gs_window, grouped)
        gs_index = None if len(ids) == len(kinds) else t(idx)
    return Structure(seqlens, all(k != 'video' for k in kinds),
                     None if order is None else t(order), None if order is None else t(np.argsort(order)),
                     t(local), Layout.build(lens, lens, grouped), pos_index, pos_rows,
                     Layout.build([1] * len(seqlens), seqlens, grouped),
                     t(np.repeat(np.arange(len(seqlens)), seqlens)), gs, gs_index, coords)


def structure_of(x, config):
    """x.structure, built now from x.coords if the batch came without one (a host copy of the coords)."""
    if x.structure is None:
        x.structure = build_structure(x.coords, x.seqlens, x.kinds, config).to(x.coords.device)
    return x.structure


# -----------------------------------------------------------------------------
# building blocks, small to large


def rope_angles(coords, head_dim, theta):
    """4D RoPE angles [N, d/2] for coords (t, x, y, z), official layout.

    head_dim splits into four equal blocks t|x|y|z; block a uses frequencies theta^(-j/head_dim),
    j = 0..head_dim/8-1. Note: divided by the full head_dim, not the block width (official quirk).
    """
    assert head_dim % 8 == 0, f"4D RoPE needs head_dim divisible by 8, got {head_dim}"
    j = torch.arange(head_dim // 8, device=coords.device, dtype=torch.float32)
    freqs = theta ** (-j / head_dim)                                            # [d/8]
    return (coords.float()[:, :, None] * freqs).reshape(len(coords), head_dim // 2)  # [N, 4*d/8]


def apply_rope(x, angles):
    """Rotate interleaved pairs (2m, 2m+1) of x [N, h, d] by angles [N, d/2], in fp32."""
    return rotate_pairs(x, torch.polar(torch.ones_like(angles), angles)[:, None])


def rotate_pairs(x, rot):
    """x [N, h, d] with pairs (2m, 2m+1) as complex numbers, times unit complex rot [N, 1, d/2]: one complex
    multiply in fp32 (a 2D rotation by the angle of rot), cast back to x's dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))         # [N, h, d/2]
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


@dataclass
class Rope:
    """4D RoPE at integer coords [N, 4] for one head_dim, made once per trunk and shared by its layers. On
    CUDA the Triton kernel rotates q and k itself from the coords (fused); elsewhere rotate() multiplies by the
    unit complex numbers made here once."""
    coords: torch.Tensor
    rot: torch.Tensor           # [N, 1, d/2] complex64 exp(i angle), or None when the fused kernel rotates
    theta: float

    @staticmethod
    def make(coords, head_dim, theta, fused):
        if fused:
            return Rope(coords, None, theta)
        angles = rope_angles(coords, head_dim, theta)
        return Rope(coords, torch.polar(torch.ones_like(angles), angles)[:, None], theta)

    def rotate(self, x):
        return rotate_pairs(x, self.rot)


def fused_kernel(x, head_dim):
    """Whether attention on tensors like x runs the Triton kernel (kernels/attention.py): CUDA, head_dim >= 16,
    not switched off (ATOKEN_ATTENTION=reference). Imported only then, so CPU users never need Triton."""
    if not x.is_cuda or head_dim < 16:
        return False
    from kernels import attention as kattn
    return kattn.HAS_TRITON and kattn.BACKEND != 'reference'


class GroupedAttention(torch.autograd.Function):
    """The CPU path for short masked groups (Layout.small; e.g. a batch of small images): gather q, k, v into the
    layout's groups (head-major [h*G, L, d]), scores + mask, softmax, times v, back to token order; and its
    backward written out. Against autograd through the same ops, the backward needs no scatter-add: every token
    sits in exactly one slot, so the gradient of a gather is a gather by the inverse index (q_scatter,
    k_scatter), once the empty query slots' output gradients are zeroed (q_real); empty key slots get
    probability 0 and so no gradient. ~20% faster per call than autograd through the same ops (NOTES.md)."""
    @staticmethod
    def forward(ctx, q, k, v, q_gather, k_gather, q_scatter, k_scatter, q_real, bias, G, Lq, Lk):
        h, d = q.shape[1:]
        gather = lambda x, i, L: x.transpose(0, 1).index_select(1, i).view(h * G, L, d)
        qg, kg, vg = gather(q, q_gather, Lq), gather(k, k_gather, Lk), gather(v, k_gather, Lk)
        s = torch.bmm(qg, kg.transpose(1, 2))                                   # [h*G, Lq, Lk]
        s.view(h, G, Lq, Lk).mul_(d ** -0.5).add_(bias)     # bias [G, Lq, Lk]: 0, or -inf (another segment)
        p = torch.softmax(s, dim=-1)
        ctx.save_for_backward(qg, kg, vg, p, q_gather, q_scatter, k_scatter, q_real)
        ctx.dims = h, d, G, Lq
        return torch.bmm(p, vg).view(h, G * Lq, d).index_select(1, q_scatter).transpose(0, 1)   # [N, h, d]

    @staticmethod
    def backward(ctx, grad):
        qg, kg, vg, p, q_gather, q_scatter, k_scatter, q_real = ctx.saved_tensors
        h, d, G, Lq = ctx.dims
        go = grad.transpose(0, 1).index_select(1, q_gather).view(h, G, Lq, d) * q_real.to(grad.dtype)
        go = go.view(h * G, Lq, d)                                              # empty slots: 0
        dv = torch.bmm(p.transpose(1, 2), go)
        ds = torch._softmax_backward_data(torch.bmm(go, vg.transpose(1, 2)), p, -1, p.dtype)
        dq = torch.bmm(ds, kg).mul_(d ** -0.5)
        dk = torch.bmm(ds.transpose(1, 2), qg).mul_(d ** -0.5)
        back = lambda x, i: x.view(h, -1, d).index_select(1, i).transpose(0, 1)     # slots -> tokens
        return (back(dq, q_scatter), back(dk, k_scatter), back(dv, k_scatter)) + (None,) * 9


def attention(q, k, v, layout, rope_q=None, rope_k=None, softcap=None):
    """Block-diagonal attention over packed segments (flash-attn varlen semantics): the one attention path.

    q [N, h, d], k/v [M, h, d]; layout (Layout): which query rows see which key rows. rope_q / rope_k: 4D RoPE
    of q / k (Rope), or None. Non-causal, scale 1/sqrt(d). softcap c: scores become c * tanh(s / c) (the
    Gaussian decoder's). CUDA: the fused Triton kernel (RoPE inside it). Elsewhere: RoPE, then the layout's
    groups (Layout.grouped) in one call: GroupedAttention for short masked groups, SDPA for the others, an
    explicit softmax for the soft-cap. The per-segment loop lives only in kernels/attention.py as the
    reference the tests compare with.
    """
    if fused_kernel(q, q.shape[-1]):
        from kernels.attention import attention as fused_attention
        return fused_attention(q, k, v, layout.cu_q, layout.cu_k,
                               rope_q.coords if rope_q is not None else None,
                               rope_k.coords if rope_k is not None else None,
                               rope_q.theta if rope_q is not None else 10000.0, softcap=softcap,
                               cu_host=(layout.cu_q_host, layout.cu_k_host))
    if rope_q is not None:
        q, k = rope_q.rotate(q), rope_k.rotate(k)
    if layout.mask is None:                     # a layout made for the kernel, used on another device
        layout.grouped()
        for name in ('q_gather', 'k_gather', 'q_scatter', 'k_scatter', 'q_real', 'mask', 'bias'):
            setattr(layout, name, getattr(layout, name).to(q.device))
    G, _, Lq, Lk = layout.mask.shape
    h, d = q.shape[1:]
    if softcap is None and layout.small and not layout.full:    # short, masked groups: explicit softmax
        return GroupedAttention.apply(q, k, v, layout.q_gather, layout.k_gather, layout.q_scatter, layout.k_scatter,
                                      layout.q_real, layout.bias[:, 0], G, Lq, Lk)
    # head-major [h, G, L, d]: gathering along the token axis of [h, N, d] views gives contiguous groups, so
    # the batched matmuls need no copies
    gather = (lambda x, i: x.transpose(0, 1).reshape(h, -1, d)) if layout.identity else \
        (lambda x, i: x.transpose(0, 1).index_select(1, i))
    qg = gather(q, layout.q_gather).view(h, G, Lq, d)
    kg = gather(k, layout.k_gather).view(h, G, Lk, d)
    vg = gather(v, layout.k_gather).view(h, G, Lk, d)
    if softcap is None:
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=None if layout.full else layout.mask.transpose(0, 1))
    else:                                       # the soft-cap: explicit softmax
        s = torch.matmul(qg, kg.transpose(-1, -2)).mul_(1 / math.sqrt(d))       # [h, G, Lq, Lk]
        s = softcap * torch.tanh(s / softcap)
        o = torch.matmul(torch.softmax(s if layout.full else s + layout.bias.transpose(0, 1), dim=-1), vg)
    o = o.reshape(h, G * Lq, d)
    return (o if layout.identity else o.index_select(1, layout.q_scatter)).transpose(0, 1)   # [N, h, d]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (official LayerNorm32)."""
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """y = x * r * w with r = rsqrt(mean(x^2) + eps) over the last dim, and its backward written out:
    dx = r * (g*w - xh * mean(g*w * xh)), dw = sum(g * xh), where xh = x * r. On the CPU, F.rms_norm is a
    decomposition that autograd turns into ~30 ops per call (fwd + bwd); this is 12, and each decoder block runs
    four norms (two RMSNorms, the q and k norms). CUDA has a fused rms_norm kernel: rms_norm() below uses it there."""
    @staticmethod
    def forward(ctx, x, w, eps):
        r = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))          # [..., 1]
        xh = x * r
        ctx.save_for_backward(xh, r, w)
        return xh * w

    @staticmethod
    def backward(ctx, g):
        xh, r, w = ctx.saved_tensors
        gw = g * w
        dx = (gw - xh * (gw * xh).mean(-1, keepdim=True)) * r
        dw = (g * xh).reshape(-1, *w.shape).sum(0).to(w.dtype)               # w: the trailing dims of x
        return dx, dw, None


def rms_norm(x, w, eps):
    """x * rsqrt(mean(x^2) + eps) * w over the last dim, computed in fp32, cast back to x's dtype."""
    if x.is_cuda:
        return (F.rms_norm(x.float(), x.shape[-1:], eps=eps) * w).to(x.dtype)
    return RMSNormFunction.apply(x.float(), w, eps).to(x.dtype)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times a learned weight (no bias)."""
    def __init__(self, dim, eps=NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class HeadRMSNorm(nn.Module):
    """Per-head qk-norm of the decoder: x / ||x||_2 * gamma * sqrt(d), in fp32."""
    def __init__(self, heads, head_dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x):                                                       # x [N, h, d]
        # x / ||x|| * sqrt(d) = x * rsqrt(mean(x^2)): an rms_norm (eps ~ F.normalize's 1e-12 clamp)
        return rms_norm(x, self.gamma, 1e-24)


class GELU(nn.Module):
    """GELU, tanh approximation (SigLIP's gelu_pytorch_tanh): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
    Inside torch.compile it is written x * sigmoid(2u), the same function (0.5 (1 + tanh u) = sigmoid(2u); they
    differ by fp32 rounding, <= 5e-7 here): inductor fuses it into one loop around a vectorised exp, ~2x faster
    than its tanh on the CPU we measured, backward included. Eager keeps the one-op F.gelu."""
    C = 2 * math.sqrt(2 / math.pi)

    def forward(self, x):
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(x * (self.C + self.C * 0.044715 * x * x))
        return F.gelu(x, approximate='tanh')


class MLP(nn.Module):
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=bias), GELU(), nn.Linear(hidden, dim, bias=bias))

    def forward(self, x):
        return self.mlp(x)


class SelfAttention(nn.Module):
    """Fused-qkv multi-head self-attention with optional qk-norm and 4D RoPE on q and k."""
    def __init__(self, dim, heads, bias, qk_norm, softcap=None):
        super().__init__()
        self.heads, self.head_dim, self.softcap = heads, dim // heads, softcap
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)        # rows: q | k | v, each head-major
        if qk_norm:
            self.q_rms_norm = HeadRMSNorm(heads, self.head_dim)
            self.k_rms_norm = HeadRMSNorm(heads, self.head_dim)
        self.qk_norm = qk_norm
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, rope, layout, cache=None):
        q, k, v = self.to_qkv(x).view(len(x), 3, self.heads, self.head_dim).unbind(1)  # [N, h, d] each
        if self.qk_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if cache is not None:                   # decoder KV cache: layout is the step's CacheStep, rope (q, k)'s
            return self.to_out(cache.attend(q, k, v, layout, *rope).flatten(1))
        return self.to_out(attention(q, k, v, layout, rope, rope, self.softcap).flatten(1))  # [N, C]


class Block(nn.Module):
    """Pre-norm transformer block. Encoder: LayerNorm + biases (SigLIP). Decoder: RMSNorm, no biases, qk-norm.
    Gaussian decoder: RMSNorm, no biases, no qk-norm, score soft-cap."""
    def __init__(self, dim, heads, mlp, decoder, qk_norm=None, softcap=None):
        super().__init__()
        Norm = RMSNorm if decoder else (lambda d: LayerNorm(d, eps=NORM_EPS))
        self.norm1 = Norm(dim)
        self.attn = SelfAttention(dim, heads, bias=not decoder, qk_norm=decoder if qk_norm is None else qk_norm,
                                  softcap=softcap)
        self.norm2 = Norm(dim)
        self.mlp = MLP(dim, mlp, bias=not decoder)

    def forward(self, x, rope, layout, cache=None):
        x = x + self.attn(self.norm1(x), rope, layout, cache)
        return x + self.mlp(self.norm2(x))


def compile_blocks(module):
    """torch.compile every transformer block of module (tokenizer encoder and decoder, Gaussian decoder) in place, with
    fullgraph=True and dynamic shapes. Packed batches change size every micro-batch; the structure's layouts mark
    their sizes dynamic (Layout.mark_dynamic), so one graph per block serves every micro-batch without
    recompiling (tests/test_step.py). On CUDA the attention inside is the Triton kernel, registered as a custom op
    (kernels/attention.py), so it stays inside the graph. Module.compile() keeps parameter names, so checkpoints
    and EMA are unaffected."""
    dynamic_sizes_apart()
    for m in module.modules():
        if isinstance(m, Block):
            m.compile(fullgraph=True, dynamic=True)


def dynamic_sizes_apart():
    """torch.compile's dynamic shapes give two sizes that are equal when a graph is traced one symbol ("duck
    sizing"): a first micro-batch of 256 tokens would tie the token count to the position table's 256 rows, or 4
    images to the 4 coords, and the next micro-batch would compile again. Off, every size keeps its own symbol
    (as torch's own recompile message advises). Process-wide: set by the compile functions below."""
    torch.fx.experimental._config.use_duck_shape = False


def compile_tokenizer(tok, **kwargs):
    """torch.compile the tokenizer's whole training forward (encoder, pooling head, bottleneck, decoder: one graph, no
    break) in place, with dynamic shapes. Against compile_blocks, the code between the blocks (input layer,
    position table, RoPE table, final norms, bottleneck) is fused too, and the backward is one autograd node
    rather than one per op: what a small model pays for most on a CPU. Measured on the 2-core CPU (tiny preset,
    the image micro-batch, NOTES.md): ~0.8x the eager step, against ~0.9x for compiled blocks. The cost is one
    compilation per kind of micro-batch (below), ~30-60 s each on that CPU; micro-batches of other sizes reuse
    it (tests/test_step.py). Only forward() is compiled (reconstruct / embed / tokenize stay eager); parameter names
    are kept. train.py uses it for compile_scope='tokenizer' (one process or DDP; FSDP2 shards per block, so it
    compiles the blocks). kwargs go to torch.compile (e.g. backend='aot_eager' in the tests)."""
    dynamic_sizes_apart()
    # each kind of micro-batch is its own graph: the forward's flags, one-frame or not, and the attention path its
    # layout takes (unmasked / masked SDPA / GroupedAttention): a dozen or so over the six tasks, more than
    # torch.compile keeps by default (8, after which it would run the rest eagerly)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    tok.compile(dynamic=True, **kwargs)


class PositionTable(nn.Module):
    """Learned 2D position table (pos_grid^2 x C), bilinearly resized to each segment's grid (SigLIP2-NaFlex).

    The resize (antialias, align_corners=False; a 16x16 grid is an exact identity) is linear, so the host
    writes it as weights (position_lookup): one matmul makes every distinct resized row, one gather puts them
    on the tokens, whatever the number of segments and grid sizes.
    """
    def __init__(self, grid, dim):
        super().__init__()
        self.grid = grid
        self.position_embedding = nn.Embedding(grid * grid, dim)

    def forward(self, index, rows):                                             # index [N], rows [R, g*g]
        w = self.position_embedding.weight
        return (rows.to(w.dtype) @ w).index_select(0, index)                    # [N, C]


class AttentionPool(nn.Module):
    """SigLIP MAP head: one learned probe cross-attends to all tokens of a sample; residual on the
    attention output; no RoPE. The result is the text-aligned embedding (L2-normalised by the caller).
    (`attention.*` is a container only so that parameter names match the official checkpoints.)"""
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(dim))
        self.attention = nn.Module()
        self.attention.to_q = nn.Linear(dim, dim)
        self.attention.to_kv = nn.Linear(dim, 2 * dim)         # rows: k | v
        self.attention.to_out = nn.Linear(dim, dim)
        self.layernorm = LayerNorm(dim, eps=NORM_EPS)
        self.mlp = MLP(dim, mlp, bias=True)

    def forward(self, h, layout):                                               # h [N, C] -> [B, C]
        B, (N, C), d = len(layout.cu_q_host) - 1, h.shape, h.shape[1] // self.heads
        q = self.attention.to_q(self.probe).view(1, self.heads, d).expand(B, -1, -1)  # [B, h, d]
        k, v = self.attention.to_kv(h).view(N, 2, self.heads, d).unbind(1)           # [N, h, d]
        o = attention(q.contiguous(), k, v, layout)
        y = self.attention.to_out(o.flatten(1))                                        # [B, C]
        return y + self.mlp(self.layernorm(y))


@dataclass
class CacheStep:
    """One step of the KV-cache decode, planned on the host (Decoder.cache_plan)."""
    idx: torch.Tensor           # [n] tokens decoded in this step (input order, sample-major)
    local: torch.Tensor         # [n, 4] their coords in the step (t starts at k after the first step)
    pos_index: torch.Tensor
    pos_rows: torch.Tensor
    key_coords: torch.Tensor    # [m, 4] coords of the keys: per sample, its cached tokens then its new ones
    key_order: torch.Tensor     # [m] rows of cat([cache, new]) in that order
    keep: torch.Tensor          # [c] rows of cat([cache, new]) kept as the next step's cache (sample-major)
    layout: Layout


class KVCache:
    """One decoder layer's cache: K/V (post qk-norm, pre-RoPE) of each sample's last `frames` latent frames,
    kept flat (sample-major). Empty at first; each step brings its host plan (CacheStep: which rows attend,
    which stay) and the RoPE of its queries and keys."""
    def __init__(self):
        self.k = self.v = None

    def attend(self, q, k, v, step, rope_q, rope_k):
        """New queries attend to [cached | new] keys of their own sample; then the cache moves on."""
        allk = k if self.k is None else torch.cat([self.k, k])
        allv = v if self.v is None else torch.cat([self.v, v])
        o = attention(q, allk.index_select(0, step.key_order), allv.index_select(0, step.key_order),
                      step.layout, rope_q, rope_k)
        self.k, self.v = allk.index_select(0, step.keep), allv.index_select(0, step.keep)
        return o


# -----------------------------------------------------------------------------
# the two trunks: encoder (SigLIP2-So400m, with its pooling head) and pixel decoder


class Trunk(nn.Module):
    """input linear + 2D position table + blocks, run per (sample, temporal tile) segment."""
    def __init__(self, cfg, c_in, width, depth, heads, mlp, decoder):
        super().__init__()
        self.cfg, self.head_dim = cfg, width // heads
        self.pos_embedder = PositionTable(cfg.pos_grid, width)
        self.input_layer = nn.Linear(c_in, width, bias=not decoder)
        self.blocks = nn.ModuleList([Block(width, heads, mlp, decoder) for _ in range(depth)])

    def rope(self, coords, x):
        return Rope.make(coords, self.head_dim, self.cfg.rope_theta, fused_kernel(x, self.head_dim))

    def embed_input(self, x):
        """input linear; one-frame tokens (images, 3D: ph*pw*3 columns) meet only the pt = 0 slot's columns of
        the space-time weight, which is what the zero-padded official frames compute."""
        w = self.input_layer.weight
        return F.linear(x, w[:, :x.shape[1]] if x.shape[1] < w.shape[1] else w, self.input_layer.bias)

    def run(self, x, st):
        """x [N, c_in] -> [N, width] with every (sample, tile) segment processed independently."""
        if st.order is not None:
            x = x.index_select(0, st.order)
        h = self.embed_input(x) + self.pos_embedder(st.pos_index, st.pos_rows)
        rope = self.rope(st.local, h)
        for block in self.blocks:
            h = block(h, rope, st.seg)
        return h if st.inverse is None else h.index_select(0, st.inverse)       # back to input order


class Encoder(Trunk):
    def __init__(self, cfg):
        super().__init__(cfg, cfg.in_channels, cfg.encoder_width, cfg.encoder_depth, cfg.encoder_heads,
                         cfg.encoder_mlp, decoder=False)
        self.post_layernorm = LayerNorm(cfg.encoder_width, eps=NORM_EPS)
        self.head = AttentionPool(cfg.encoder_width, cfg.encoder_heads, cfg.encoder_mlp)

    def forward(self, x, coords=None, seqlens=None, structure=None):
        """x [N, C] (full or one-frame patches) -> [N, C_enc]. structure: the batch's Structure, else built
        from coords and seqlens."""
        st = structure or build_structure(coords, seqlens, ['video'] * len(seqlens), self.cfg).to(x.device)
        return self.post_layernorm(self.run(x, st))                            # [N, C]


class Decoder(Trunk):
    def __init__(self, cfg):
        super().__init__(cfg, cfg.latent_channels, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads,
                         cfg.decoder_mlp, decoder=True)
        self.out_norm = RMSNorm(cfg.decoder_width)
        self.out_layer = nn.Linear(cfg.decoder_width, cfg.in_channels, bias=False)

    def out(self, h, single_frame):
        """-> pixel patches; for a one-frame batch only the pt = 0 slot's rows of the output layer run."""
        w = self.out_layer.weight
        return F.linear(self.out_norm(h), w[:w.shape[0] // self.cfg.patch_size[0]] if single_frame else w)

    def forward(self, z, coords=None, seqlens=None, structure=None, single_frame=False):
        """z [N, L] -> [N, pt*ph*pw*3] (or [N, ph*pw*3] with single_frame / a one-frame structure)."""
        st = structure or build_structure(coords, seqlens, ['video'] * len(seqlens), self.cfg).to(z.device)
        single = single_frame or (structure is not None and structure.single_frame)
        if self.cfg.decoder_cache_frames > 0:
            return self.forward_cached(z, st, single)
        return self.out(self.run(z, st), single)

    def cache_plan(self, st):
        """The KV-cache decode's steps, from the host coords (official recipe, paper Fig. 6, ml-atoken
        `_decode`): with a cache of k latent frames each step decodes s = tile - k new latent frames, whose local
        t starts at k; the cache holds the previous k latent frames re-based to t = 0..k-1; samples with no new
        tokens in a step sit it out (their cache stays)."""
        pt = self.cfg.patch_size[0]
        k_lat, tile = self.cfg.decoder_cache_frames // pt, self.cfg.tile_frames // pt
        assert 0 < k_lat < tile, f"decoder_cache_frames must be a multiple of {pt} below tile_frames"
        s, coords, seqlens = tile - k_lat, st.coords_host, st.seqlens
        B = len(seqlens)
        sample = np.repeat(np.arange(B), seqlens)
        t0 = np.full(B, np.iinfo(np.int64).max)
        np.minimum.at(t0, sample, coords[:, 0])
        t = coords[:, 0] - t0[sample]
        cached = [np.zeros((0, 4), np.int64) for _ in range(B)]      # per sample: coords of its cached rows
        steps, T = [], torch.from_numpy
        for step in range(int(t.max(initial=0)) // s + 1):
            idx = np.flatnonzero((t >= step * s) & (t < step * s + s))             # sample-major
            if len(idx) == 0:                   # a gap in t across the whole batch: nothing to decode
                continue
            lens = np.bincount(sample[idx], minlength=B)
            c = coords[idx].copy()
            c[:, 0] = t[idx] - step * s + (k_lat if step > 0 else 0)
            live = [i for i in range(B) if lens[i] > 0]
            new = np.split(c, np.cumsum(lens)[:-1])
            n_cached = [len(x) for x in cached]
            c_start = np.concatenate([[0], np.cumsum(n_cached)])
            n_start = c_start[-1] + np.concatenate([[0], np.cumsum(lens)])
            rows = [np.concatenate([np.arange(c_start[i], c_start[i + 1]), np.arange(n_start[i], n_start[i + 1])])
                    for i in range(B)]                                          # per sample: cached, then new
            both = [np.concatenate([cached[i], new[i]]) for i in range(B)]
            keep, kept = [], []
            for i in range(B):                  # keep each sample's last k latent frames, re-based to 0..k-1
                if len(both[i]):                # (not clamped at 0: a short first tile ends at t = k-1, official)
                    m = both[i][:, 0] >= both[i][:, 0].max() + 1 - k_lat
                    keep.append(rows[i][m])
                    kept.append(both[i][m] - np.array([both[i][:, 0].max() + 1 - k_lat, 0, 0, 0]))
                else:
                    keep.append(rows[i][:0]), kept.append(both[i])
            pos_index, pos_rows = position_lookup(c, [int(lens[i]) for i in live], self.cfg.pos_grid)
            steps.append(CacheStep(T(idx), T(c), pos_index, pos_rows, T(np.concatenate([both[i] for i in live])),
                                   T(np.concatenate([rows[i] for i in live])), T(np.concatenate(keep)),
                                   Layout.build([lens[i] for i in live], [len(both[i]) for i in live])))
            cached = kept
        return steps

    def forward_cached(self, z, st, single):
        """Decode tile by tile; each tile also attends to the K/V of the previous `k` latent frames; the position
        table is added to the new tokens only. Steps run in sequence, all samples of the batch at once."""
        out = None
        caches = [KVCache() for _ in self.blocks]
        for plan in self.cache_plan(st):
            plan = _move(plan, z.device)
            h = self.embed_input(z.index_select(0, plan.idx)) + self.pos_embedder(plan.pos_index, plan.pos_rows)
            ropes = self.rope(plan.local, h), self.rope(plan.key_coords, h)      # of the queries, of the keys
            for block, cache in zip(self.blocks, caches):
                h = block(h, ropes, plan, cache)
            y = self.out(h, single)
            out = (y.new_zeros(len(z), y.shape[1]) if out is None else out).index_copy(0, plan.idx, y)
        return out if out is not None else z.new_zeros(len(z), self.out_layer.out_features)


# -----------------------------------------------------------------------------
# FSQ: finite scalar quantisation of the latent mean (Mentzer et al. 2023; official "So/D" models)


def fsq_bound(z, levels):
    """Squash z into (-(L-1)/2 - offset, ...) so that rounding yields exactly L values (official, eps 1e-3)."""
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = 0.5 if levels % 2 == 0 else 0.0
    shift = math.atanh(offset / half_l)
    return torch.tanh(z + shift) * half_l - offset


def fsq_quantize(z, groups, levels):
    """z [N, G*D] -> codes [N, G*D] in {-1, -0.5, 0, 0.5} (for L = 4) and indices [N, G] in [0, L^D).

    Rounding uses a straight-through estimator. Computed in fp32; codes come back in z's dtype.
    The index of a group is sum_j digit_j * L^j with digit = code * (L//2) + L//2, dim 0 least significant.
    """
    zf = z.float()
    b = fsq_bound(zf, levels)
    q = b + (torch.round(b) - b).detach()                                       # straight-through round
    codes = q / (levels // 2)
    digits = torch.round(codes * (levels // 2) + levels // 2).long()           # [N, G*D] in [0, L)
    digits = digits.view(len(z), groups, -1)                                    # [N, G, D]
    basis = levels ** torch.arange(digits.shape[-1], device=z.device)         # [D]: 1, L, L^2, ...
    indices = (digits * basis).sum(-1).to(torch.int32)                          # [N, G]
    return codes.to(z.dtype), indices


def fsq_codes_from_indices(indices, dims, levels):
    """indices [N, G] -> codes [N, G*dims] (the inverse of fsq_quantize's index)."""
    basis = levels ** torch.arange(dims, device=indices.device)                # [D]
    digits = (indices.long()[..., None] // basis) % levels                      # [N, G, D]
    return ((digits - levels // 2).float() / (levels // 2)).flatten(1)         # [N, G*D]


# -----------------------------------------------------------------------------
# the tokenizer


class Latents(NamedTuple):
    """What AToken.bottleneck returns."""
    z: torch.Tensor             # [N, L] the decoder's input: a posterior sample, the mean, or the FSQ codes
    mean: torch.Tensor          # [N, L]
    logvar: torch.Tensor        # [N, L]
    indices: torch.Tensor       # [N, G] int32 FSQ codes, or None without a quantizer


class AToken(nn.Module):
    """The unified tokenizer. Sub-module names equal the official checkpoint keys (encoder., proj., decoder.)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        if config.latent_channels % config.fsq_groups and config.use_quantizer:
            raise ValueError(f"latent_channels {config.latent_channels} not divisible by fsq_groups")
        self.encoder = Encoder(config)
        self.proj = nn.Linear(config.encoder_width, 2 * config.latent_channels, bias=False)  # mean | logvar
        self.decoder = Decoder(config)

    # --- the model -----------------------------------------------------------

    def encode(self, x):
        """Packed pixels -> post-LayerNorm encoder features h [N, C_enc] (tiles encoded independently)."""
        if x.feats.dtype == torch.uint8:
            raise ValueError("Packed.feats is uint8 (a batch from data.collate): move it with batch.packed.to(device), "
                             "which turns the pixels into floats in [-1, 1]")
        return self.encoder(x.feats, structure=structure_of(x, self.config))

    def embed_features(self, h, x):
        """h [N, C] of packed batch x -> L2-normalised text-aligned embeddings [B, C] (pools over all tiles)."""
        return F.normalize(self.encoder.head(h, structure_of(x, self.config).pool), dim=-1)

    def bottleneck(self, h, sample=False):
        """h -> Latents(z, mean, logvar, indices). z ~ N(mean, exp(logvar)) if sample, else the mean; with the
        quantizer, z is the FSQ code of the mean (straight-through) and indices its codes, else None."""
        mean, logvar = self.proj(h).chunk(2, dim=-1)                            # [N, L] each
        if self.config.use_quantizer:
            z, idx = fsq_quantize(mean, self.config.fsq_groups, self.config.fsq_levels)
            return Latents(z, mean, logvar, idx)
        if sample:   # diagonal Gaussian posterior in fp32; logvar is not clamped (official)
            std = torch.exp(0.5 * logvar.float())
            z = (mean.float() + std * torch.randn_like(std)).to(mean.dtype)
            return Latents(z, mean, logvar, None)
        return Latents(mean, mean, logvar, None)

    def decode(self, z, coords, seqlens=None):
        """Latents z [N, L] at coords -> pixel patches [N, pt*ph*pw*3] in [-1, 1] (not clamped). coords: the
        Packed batch z belongs to (its structure is reused; one-frame batches give [N, ph*pw*3]), or integer
        coords [N, 4] with seqlens."""
        if isinstance(coords, Packed):
            return self.decoder(z, structure=structure_of(coords, self.config))
        return self.decoder(z, coords, seqlens)

    def forward(self, x, sample=None, decode=True, embed=True):
        """Training pass on a Packed batch. Samples the posterior when training (unless sample=False).
        decode=False (understanding-only batches) skips the bottleneck and the pixel decoder; embed=False
        (reconstruction-only batches) skips the pooling head, whose embedding their loss does not use."""
        sample = self.training if sample is None else sample
        h = self.encode(x)
        out = dict(h=h, embedding=self.embed_features(h, x) if embed else None)
        if decode:
            lat = self.bottleneck(h, sample)
            out.update(rec=self.decode(lat.z, x), mean=lat.mean, logvar=lat.logvar, indices=lat.indices)
        return out

    # --- media in, media out -------------------------------------------------

    def pack(self, media):
        p = next(self.parameters())
        return pack(media, self.config.patch_size, self.config).to(p.device, p.dtype)

    @torch.no_grad()
    def reconstruct(self, media):
        """Images (H, W, 3) / videos (T, H, W, 3) in [-1, 1] -> reconstructions (H', W', 3) / (T', H', W', 3):
        H', W' centre-cropped to patch multiples, T' a multiple of pt. 3D assets ({'feats', 'coords'}) ->
        reconstructed voxel features [N, ph*pw*3] (feed them to GaussianDecoder). Deterministic:
        posterior mean, or the FSQ codes when the config has a quantizer."""
        x = self.pack(media)
        z = self.bottleneck(self.encode(x)).z
        return unpack(self.decode(z, x), x, self.config.patch_size)

    @torch.no_grad()
    def embed(self, media):
        """Media list -> [B, C] L2-normalised embeddings (the SigLIP2 text space for trained weights)."""
        x = self.pack(media)
        return self.embed_features(self.encode(x), x)

    @torch.no_grad()
    def tokenize(self, media):
        """Media list -> per-sample FSQ indices [N_i, G] (int32, raster order t, row, column)."""
        if not self.config.use_quantizer:
            raise ValueError("tokenize needs a quantizer: use a config with use_quantizer=True (So/D)")
        x = self.pack(media)
        return list(self.bottleneck(self.encode(x)).indices.split(x.seqlens))

    @torch.no_grad()
    def detokenize(self, indices, shapes):
        """Inverse of tokenize: indices [N_i, G] and each output's shape, as reconstruct returns it
        ((H, W, 3) image, (T, H, W, 3) video; the channel axis may be left out) -> media list."""
        pt, ph, pw = self.config.patch_size
        dims = self.config.latent_channels // self.config.fsq_groups
        grids, kinds, coords = [], [], []
        for idx, s in zip(indices, shapes):
            s = tuple(s)
            if len(s) == 4 or (len(s) == 3 and s[-1] == 3):    # drop the channel axis (W = 3 < any patch)
                s = s[:-1]
            kind = 'image' if len(s) == 2 else 'video'
            T, H, W = (pt, *s) if kind == 'image' else s
            grid = (T // pt, H // ph, W // pw)
            if grid[0] * grid[1] * grid[2] != len(idx):
                raise ValueError(f"{len(idx)} tokens do not fill a {kind} of shape {tuple(s)} (grid {grid})")
            coords.append(patchify(torch.zeros(T, H, W, 3), self.config.patch_size)[1])
            grids.append(grid), kinds.append(kind)
        p = next(self.parameters())
        z = fsq_codes_from_indices(torch.cat(indices).to(p.device), dims, self.config.fsq_levels).to(p.dtype)
        coords, seqlens = torch.cat(coords), [len(i) for i in indices]
        x = Packed(z, coords, seqlens, kinds, grids, self.config.patch_size,
                   build_structure(coords, seqlens, kinds, self.config)).to(p.device)
        return unpack(self.decode(z, x), x, self.config.patch_size)

    # --- counting ------------------------------------------------------------

    def estimate_flops(self, x):
        """Training FLOPs (forward + backward = 3 x forward) of one packed batch x: 6 x parameters x tokens for
        the matmuls, plus attention: 12 x width x sum over (sample, tile) segments of length^2, per layer
        (the PaLM appendix-B count nanoGPT uses, with packed segments instead of one sequence length)."""
        c = self.config
        s2 = int((np.diff(structure_of(x, c).seg.cu_q_host.numpy().astype(np.int64)) ** 2).sum())  # host lengths
        attn = 12 * s2 * (c.encoder_width * c.encoder_depth + c.decoder_width * c.decoder_depth)
        return 6 * self.num_params() * sum(x.seqlens) + attn

    def num_params(self, prefix=''):
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith(prefix))

    # --- weights -------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, zero_residual=True):
        """Fresh initialisation (decoder from scratch; encoder too unless init_from_siglip2 follows).
        zero_residual=False keeps xavier weights in the residual branches too (every path active at init:
        the model tests use it, so that token mixing shows in their comparisons)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, 'bias', None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, HeadRMSNorm):
                nn.init.ones_(m.gamma)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.encoder.head.probe, std=0.02)
        nn.init.normal_(self.proj.weight, std=0.02)
        # Residual branches start at zero (as ReZero / DiT's adaLN-zero): a fresh tokenizer is then a per-token
        # linear autoencoder through the norms, and attention / MLPs grow in from there. With xavier-initialised
        # branches the tiny CPU model sat at ~22 dB for hundreds of steps (random token mixing at init);
        # zeroed it reached 25.5 dB in the same 400 image steps. (Not the pooling head: it is no residual.)
        for m in self.modules() if zero_residual else ():
            if isinstance(m, Block):
                nn.init.zeros_(m.attn.to_out.weight)
                nn.init.zeros_(m.mlp.mlp[2].weight)
        return self

    @torch.no_grad()
    def init_from_siglip2(self, source=SIGLIP2_DEFAULT):
        """Copy a SigLIP2 vision tower into the encoder (blocks, patch embedding, position table, head).
        Every encoder tensor must come from the tower; the decoder and proj are left as they are."""
        enc = siglip2_to_encoder(load_siglip2_tower(source), self.config)
        own = {k: v for k, v in self.state_dict().items() if k.startswith('encoder.')}
        if set(enc) != set(own):
            raise ValueError(f"SigLIP tower does not fit the encoder: missing {sorted(set(own) - set(enc))}, "
                             f"unexpected {sorted(set(enc) - set(own))}")
        for k, v in enc.items():
            if v.shape != own[k].shape:
                raise ValueError(f"SigLIP tower {k}: shape {tuple(v.shape)} vs encoder {tuple(own[k].shape)}")
            own[k].copy_(v)
        return self

    @classmethod
    def from_pretrained(cls, checkpoint_path, config_path=None):
        """Load Apple's released tokenizer by name ('atoken-sod', 'atoken-soc', 'atoken-soc-s1', 'atoken-soc-s2':
        downloaded once into $ATOKEN_CACHE, architecture from PRETRAINED), an official checkpoint file (flat
        state dict, .pt or .safetensors) with its official YAML, or a tokenizer exported by train.py
        ({'model_config': dict, 'model': state dict}) with no YAML. An existing path wins over a name."""
        import os
        arch = None
        if isinstance(checkpoint_path, str) and checkpoint_path in PRETRAINED and not os.path.exists(checkpoint_path):
            checkpoint_path, arch = _pretrained(checkpoint_path, 'tokenizer')
        if not os.path.exists(checkpoint_path):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint_path} (released names: {_names('tokenizer')})")
        if str(checkpoint_path).endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(checkpoint_path)
        else:
            sd = torch.load(checkpoint_path, map_location='cpu', weights_only=True)
        if config_path is not None:
            arch = read_official_yaml(config_path)
        if arch is not None:                    # the YAML's, else the released name's embedded preset
            config = official_config(arch)
        elif isinstance(sd, dict) and 'model_config' in sd:
            config, sd = ModelConfig.from_dict(sd['model_config'], f"{checkpoint_path} ['model_config']"), sd['model']
        else:
            raise ValueError(f"{checkpoint_path}: a flat official state dict needs its YAML (config_path)")
        with torch.device('meta'):
            model = cls(config)
        model.load_checkpoint_state(sd, source=str(checkpoint_path))
        return model.eval()

    def load_checkpoint_state(self, sd, source='state dict'):
        load_strict(self, sd, source)

    def export(self):
        """Tokenizer weights alone, loadable by AToken.from_pretrained(path)."""
        cfg = asdict(self.config)
        return {'model_config': cfg, 'model': {k: v.detach().cpu() for k, v in self.state_dict().items()}}


# -----------------------------------------------------------------------------
# 3D: Gaussian decoder (official SLatGaussianDecoder, TRELLIS-derived; paper 3.1)

SH_C0 = 0.28209479177387814     # degree-0 spherical harmonic: rgb = SH_C0 * dc + 0.5
GS_VOXEL_SIZE = 1.5             # a Gaussian may move +-0.75 voxel from its voxel centre
GS_SCALE_BIAS, GS_OPACITY_BIAS, GS_MIN_SCALE = 0.004, 0.1, 9e-4   # official representation_config
GS_LR = dict(xyz=1.0, dc=1.0, scale=1.0, rotation=0.1, opacity=1.0)  # multipliers on the raw outputs


def radical_inverse(base, n):
    """Van der Corput radical inverse of integer n in `base`."""
    inv, f = 0.0, 1.0 / base
    while n > 0:
        inv, n, f = inv + f * (n % base), n // base, f / base
    return inv


def offset_perturbation(n):
    """Fixed per-Gaussian offsets [n, 3] = atanh((2 h_k - 1) / 1.5), h_k = Hammersley point (k/n, r2(k), r3(k)),
    so the n Gaussians of a voxel start spread over it instead of on its centre."""
    h = torch.tensor([[k / n, radical_inverse(2, k), radical_inverse(3, k)] for k in range(n)])
    return torch.atanh((2 * h - 1) / GS_VOXEL_SIZE)


def sincos_embedding(coords, dim):
    """TRELLIS absolute position embedding of integer coords [N, 3] -> [N, dim]: per axis
    [sin(x f), cos(x f)] with f_i = 10000^(-i/F), F = dim // 6, zero-padded to dim."""
    F_ = dim // coords.shape[1] // 2
    freqs = 1.0 / 10000 ** (torch.arange(F_, device=coords.device, dtype=torch.float32) / F_)    # [F]
    a = coords.float()[:, :, None] * freqs                                      # [N, 3, F]
    emb = torch.cat([a.sin(), a.cos()], -1).reshape(len(coords), -1)            # [N, 3*2F]
    return F.pad(emb, (0, dim - emb.shape[1]))


class GaussianDecoder(nn.Module):
    """Voxel features -> 32 Gaussians per voxel (official `SLatGaussianDecoder`; keys match 3d_decode_gs.pt).

    input linear (no bias) + sinusoidal 3D position embedding, blocks with 8^3 windowed attention (shifted
    by 4 on odd blocks, scores soft-capped at 30 as on the official flash-attn path), RMSNorm, no biases;
    then a LayerNorm without affine (eps 1e-5) and a biased linear to 32 x (xyz 3, dc 3, scale 3, rot 4,
    opacity 1) raw values, activated as in TRELLIS' Gaussian model.
    """
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        pt, ph, pw = cfg.patch_size
        self.input_layer = nn.Linear(ph * pw * 3, cfg.gs_width, bias=False)
        self.blocks = nn.ModuleList([Block(cfg.gs_width, cfg.gs_heads, cfg.gs_mlp, decoder=True, qk_norm=False,
                                           softcap=30.0) for _ in range(cfg.gs_depth)])
        self.out_layer = nn.Linear(cfg.gs_width, cfg.gs_per_voxel * 14)
        self.register_buffer('offset_perturbation', offset_perturbation(cfg.gs_per_voxel))

    @torch.no_grad()
    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.out_layer.weight)   # official: zero head, so training starts from the prior
        nn.init.zeros_(self.out_layer.bias)
        self.offset_perturbation.copy_(offset_perturbation(self.cfg.gs_per_voxel))
        return self

    def forward(self, feats, coords, seqlens=None, windows=None):
        """feats [N, ph*pw*3] (first channels of the reconstruction, in [-1, 1]), coords [N, 3] voxel
        indices (i, j, k), seqlens voxels per sample -> activated Gaussians, 32 per voxel, Gaussian k of
        voxel i at row 32 i + k: xyz [G, 3] world in [-0.5, 0.5]^3, scale [G, 3], rotation [G, 4] (unit
        quaternion, real first), opacity [G, 1], rgb [G, 3] (>= 0), features_dc [G, 1, 3] (raw SH).
        windows: the batch's shifted windows (Structure.gs, built on the host by data.collate / model.pack);
        without them they are built here from a host copy of coords."""
        seqlens = [len(feats)] if seqlens is None else seqlens
        coords = coords.long()
        if windows is None:
            windows = {k: w.to(feats.device) for k, w in gs_windows(coords.cpu(), seqlens, self.cfg.gs_window).items()}
        h = self.input_layer(feats) + sincos_embedding(coords, self.cfg.gs_width).to(feats.dtype)
        for i, block in enumerate(self.blocks):
            w = windows[self.cfg.gs_window // 2 * (i % 2)]
            h = block(h.index_select(0, w.order), None, w.layout).index_select(0, w.inverse)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-5)
        return self.activate(self.out_layer(h), coords)

    def activate(self, raw, coords):
        """raw [N, 32*14] -> Gaussian parameters (official to_representation + TRELLIS activations, fp32)."""
        n, K, R = len(raw), self.cfg.gs_per_voxel, self.cfg.gs_resolution
        raw = raw.float()
        xyz, dc, s, rot, op = raw.split([3 * K, 3 * K, 3 * K, 4 * K, K], dim=1)
        centre = (coords.float() + 0.5) / R                                     # [N, 3] in [0, 1]
        off = torch.tanh(xyz.view(n, K, 3) * GS_LR['xyz'] + self.offset_perturbation.float())
        xyz = centre[:, None] + off * (GS_VOXEL_SIZE * 0.5 / R) - 0.5           # [N, K, 3] world
        scale_bias = GS_SCALE_BIAS + math.log(-math.expm1(-GS_SCALE_BIAS))     # softplus^-1(0.004)
        scale = F.softplus(s.view(n, K, 3) * GS_LR['scale'] + scale_bias)
        scale = torch.sqrt(scale.square() + GS_MIN_SCALE ** 2)
        q = rot.view(n, K, 4) * GS_LR['rotation'] + torch.tensor([1.0, 0, 0, 0], device=raw.device)
        opacity = torch.sigmoid(op.view(n, K, 1) * GS_LR['opacity'] + math.log(GS_OPACITY_BIAS / (1 - GS_OPACITY_BIAS)))
        dc = dc.view(n, K, 1, 3) * GS_LR['dc']
        G = n * K
        return dict(xyz=xyz.reshape(G, 3), scale=scale.reshape(G, 3), rotation=F.normalize(q, dim=-1).reshape(G, 4),
                    opacity=opacity.reshape(G, 1), features_dc=dc.reshape(G, 1, 3),
                    rgb=(SH_C0 * dc.reshape(G, 3) + 0.5).clamp_min(0))

    @classmethod
    def from_pretrained(cls, checkpoint_path, config_path=None):
        """Load Apple's Gaussian decoder by name ('3d_decode_gs': downloaded once into $ATOKEN_CACHE,
        architecture from PRETRAINED), or 3d_decode_gs.pt with its YAML (`model:` block). `lpips_loss.*` keys
        are dropped. An existing path wins over a name."""
        import os
        m = None
        if isinstance(checkpoint_path, str) and checkpoint_path in PRETRAINED and not os.path.exists(checkpoint_path):
            checkpoint_path, m = _pretrained(checkpoint_path, 'gaussian')
        for p in (checkpoint_path, config_path):
            if p is not None and not os.path.exists(p):
                raise FileNotFoundError(f"not found: {p}" + (f" (released names: {_names('gaussian')})"
                                                             if p is checkpoint_path else ''))
        if config_path is not None:
            m = read_official_gs_yaml(config_path)
        elif m is None:
            raise ValueError(f"{checkpoint_path}: an official Gaussian decoder checkpoint needs its YAML "
                             f"(config_path), or give a released name: {_names('gaussian')}")
        cfg = official_gs_config(m)
        sd = torch.load(checkpoint_path, map_location='cpu', weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith('lpips_loss.')}
        with torch.device('meta'):
            model = cls(cfg)
        model.load_checkpoint_state(sd, source=str(checkpoint_path))
        return model.eval()

    def load_checkpoint_state(self, sd, source='state dict'):
        load_strict(self, sd, source)


# -----------------------------------------------------------------------------
# loading weights: official checkpoints and YAMLs, SigLIP2 towers, released checkpoints by name


def load_strict(module, sd, source='state dict'):
    """Load state dict sd into module (AToken or GaussianDecoder, possibly on the meta device: tensors are
    assigned, not copied), naming every missing, unexpected and mis-shaped key in one error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match the model config:\n  missing: {missing}\n"
                         f"  unexpected: {unexpected}\n  shape mismatch: {shapes}")
    module.load_state_dict(sd, strict=True, assign=True)


def official_config(arch):
    """Official YAML `arch_cfg` dict -> ModelConfig, refusing settings this implementation does not have."""
    fixed = dict(encoder_attn_mode='full', decoder_attn_mode='full', encoder_pe_mode='joint',
                 decoder_pe_mode='joint', encoder_qk_rms_norm=False, decoder_qk_rms_norm=True,
                 encoder_use_bias=True, decoder_use_bias=False, encoder_use_rms_norm=False,
                 decoder_use_rms_norm=True, use_decoder=True, quantizer_type='fsq', quantizer_chunk_size=1)
    bad = {k: arch[k] for k, v in fixed.items() if k in arch and arch[k] != v}
    if bad:
        raise ValueError(f"arch_cfg settings not supported (expected {dict((k, fixed[k]) for k in bad)}): {bad}")
    pt, ph, pw = arch.get('patch_size', [4, 16, 16])
    c = ModelConfig(patch_size=(pt, ph, pw))
    names = dict(encoder_model_channels='encoder_width', encoder_num_blocks='encoder_depth',
                 encoder_num_heads='encoder_heads', encoder_mlp_channels='encoder_mlp',
                 decoder_model_channels='decoder_width', decoder_num_blocks='decoder_depth',
                 decoder_num_heads='decoder_heads', decoder_mlp_channels='decoder_mlp',
                 latent_channels='latent_channels', use_quantizer='use_quantizer',
                 quantizer_num_codebooks='fsq_groups')
    for k, ours in names.items():
        if k in arch:
            setattr(c, ours, type(getattr(c, ours))(arch[k]))
    for k in ('in_channels', 'out_channels'):
        if k in arch and arch[k] != c.in_channels:
            raise ValueError(f"arch_cfg {k}={arch[k]} does not match patch_size {c.patch_size} ({c.in_channels})")
    if c.use_quantizer:
        dims = c.latent_channels // c.fsq_groups
        size, feat = arch.get('quantizer_codebook_size', 4096), arch.get('quantizer_feature_dim', 48)
        if feat != c.latent_channels or c.fsq_levels ** dims != size:
            raise ValueError(f"FSQ with codebook size {size} and feature dim {feat} is not supported: "
                             f"expected {c.fsq_levels}^{dims} codes over all {c.latent_channels} latents")
    return c


def official_arch(config):
    """ModelConfig -> the official YAML's `arch_cfg` dict: the inverse of official_config (tested as a round
    trip). Settings the official architecture cannot express (they have no arch_cfg field and the official code
    hard-codes them) must keep their official values; anything else is a ValueError naming the field.
    decoder_cache_frames is an inference option (the official decoder sets it as attributes), so it is not
    part of the architecture; the gs_* fields belong to the Gaussian decoder's own YAML (official_gs_model)."""
    fixed = dict(fsq_levels=4, pos_grid=16, rope_theta=10000.0, tile_frames=16)
    bad = {k: getattr(config, k) for k, v in fixed.items() if getattr(config, k) != v}
    if bad:
        raise ValueError(f"not expressible in the official arch_cfg (it hard-codes {fixed}): {bad}")
    c = config
    arch = dict(patch_size=list(c.patch_size), in_channels=c.in_channels, out_channels=c.in_channels,
                latent_channels=c.latent_channels,
                encoder_model_channels=c.encoder_width, encoder_num_blocks=c.encoder_depth,
                encoder_num_heads=c.encoder_heads, encoder_mlp_channels=c.encoder_mlp, encoder_attn_mode='full',
                encoder_pe_mode='joint', encoder_qk_rms_norm=False, encoder_use_bias=True, encoder_use_rms_norm=False,
                decoder_model_channels=c.decoder_width, decoder_num_blocks=c.decoder_depth,
                decoder_num_heads=c.decoder_heads, decoder_mlp_channels=c.decoder_mlp, decoder_attn_mode='full',
                decoder_pe_mode='joint', decoder_qk_rms_norm=True, decoder_use_bias=False, decoder_use_rms_norm=True,
                use_decoder=True, use_quantizer=c.use_quantizer)
    if c.use_quantizer:     # FSQ with 4 levels per dim: codebook 4^(L/G) per group, over all L latents
        arch.update(quantizer_type='fsq', quantizer_codebook_size=c.fsq_levels ** (c.latent_channels // c.fsq_groups),
                    quantizer_feature_dim=c.latent_channels, quantizer_num_codebooks=c.fsq_groups,
                    quantizer_chunk_size=1)
    return arch


def read_official_yaml(config_path):
    """Official tokenizer YAML -> its model.model_cfg.arch_cfg dict (a clear error for any other file)."""
    import yaml
    with open(config_path) as f:
        y = yaml.safe_load(f)
    try:
        return y['model']['model_cfg']['arch_cfg']
    except (KeyError, TypeError):
        raise ValueError(f"{config_path}: no model.model_cfg.arch_cfg block (not an official AToken YAML)") from None


def pretrained_config(checkpoint_path, config_path=None):
    """The ModelConfig AToken.from_pretrained(checkpoint_path, config_path) would build, without loading the
    weights where it can: from the YAML, from a released name's embedded arch, or from the 'model_config' of one
    of our exports (memory-mapped). train.py uses it to size the run before the weights are loaded."""
    import os
    if config_path is not None:
        return official_config(read_official_yaml(config_path))
    if isinstance(checkpoint_path, str) and checkpoint_path in PRETRAINED and not os.path.exists(checkpoint_path):
        if PRETRAINED[checkpoint_path]['kind'] != 'tokenizer':
            raise ValueError(f"'{checkpoint_path}' is not a tokenizer (released tokenizers: {_names('tokenizer')})")
        return official_config(PRETRAINED[checkpoint_path]['arch'])
    if not os.path.exists(checkpoint_path):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path} (released names: {_names('tokenizer')})")
    sd = {} if str(checkpoint_path).endswith('.safetensors') else \
        torch.load(checkpoint_path, map_location='cpu', weights_only=True, mmap=True)
    if not isinstance(sd, dict) or 'model_config' not in sd:
        raise ValueError(f"{checkpoint_path}: a flat official state dict needs its YAML (config_path)")
    return ModelConfig.from_dict(sd['model_config'], f"{checkpoint_path} ['model_config']")


def official_gs_model(config):
    """ModelConfig (gs_* fields) -> the official 3d_decode_gs.yaml `model:` dict: the inverse of
    official_gs_config (the representation settings are the official constants this file implements)."""
    import copy
    ph, pw = config.patch_size[1:]
    if ph != pw:
        raise ValueError(f"the official Gaussian decoder reads square patches, got {ph}x{pw}")
    m = copy.deepcopy(_GS_ARCH)
    m.update(resolution=config.gs_resolution, model_channels=config.gs_width, latent_channels=ph * pw * 3,
             num_blocks=config.gs_depth, num_heads=config.gs_heads, mlp_channels=config.gs_mlp,
             window_size=config.gs_window)
    m['representation_config']['num_gaussians'] = config.gs_per_voxel
    return m


def save_official(module, checkpoint_path, config_path):
    """Write an AToken or a GaussianDecoder in Apple's layout: a flat state dict (.pt, or .safetensors by the
    file name) with the official key names (ours are the same names) and its official YAML, so the pair loads
    in apple/ml-atoken (ATokenWrapper) as well as in from_pretrained here. Both files are written to a
    temporary name and renamed, so an interrupted export leaves no half file."""
    import yaml
    if isinstance(module, AToken):
        y = {'model': {'class_name': 'models.pretrained.autoencoder_kl.AutoencoderKLTrain',
                       'model_cfg': {'eval_imagenet_zeroshot': False, 'disentangle_itc_rec': False,
                                     'eval_fid': False, 'arch_cfg': official_arch(module.config)}}}
    elif isinstance(module, GaussianDecoder):
        y = {'model': official_gs_model(module.cfg)}      # the official loader ignores class_name: none needed
    else:
        raise TypeError(f"save_official: expected an AToken or a GaussianDecoder, got {type(module).__name__}")
    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    _replace_atomic(checkpoint_path, lambda f: _save_flat(sd, f, str(checkpoint_path).endswith('.safetensors')))
    _replace_atomic(config_path, lambda f: _write_text(f, yaml.safe_dump(y, sort_keys=False)))


def export_official(export, folder, with_gs=True):
    """One of our tokenizer exports ({'model_config', 'model', 'gs_decoder'}: train.py's tokenizer.pt, EMA weights)
    -> folder/atoken.pt + atoken.yaml in Apple's layout (save_official: loads in apple/ml-atoken and in
    AToken.from_pretrained(path, yaml)), and with_gs its Gaussian decoder as 3d_decode_gs.pt + .yaml."""
    import os
    with torch.device('meta'):
        tok = AToken(ModelConfig.from_dict(export['model_config'], 'tokenizer export'))
    tok.load_checkpoint_state(export['model'], 'tokenizer export')
    save_official(tok, os.path.join(folder, 'atoken.pt'), os.path.join(folder, 'atoken.yaml'))
    if with_gs:
        with torch.device('meta'):
            gs = GaussianDecoder(tok.config)
        gs.load_checkpoint_state(export['gs_decoder'], 'Gaussian decoder export')
        save_official(gs, os.path.join(folder, '3d_decode_gs.pt'), os.path.join(folder, '3d_decode_gs.yaml'))


def _replace_atomic(path, write):
    """write(tmp) into a temporary file next to `path`, then rename it to `path`."""
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _save_flat(sd, path, safetensors):
    if safetensors:
        from safetensors.torch import save_file
        save_file(sd, path)
    else:
        torch.save(sd, path)


def _write_text(path, text):
    with open(path, 'w') as f:
        f.write(text)


def official_gs_config(m):
    """Official 3d_decode_gs.yaml `model:` dict -> ModelConfig (gs_* fields), refusing unsupported settings."""
    rep = m.get('representation_config', {})
    expect = {'voxel_size': GS_VOXEL_SIZE, 'scaling_bias': GS_SCALE_BIAS, 'opacity_bias': GS_OPACITY_BIAS,
              '3d_filter_kernel_size': GS_MIN_SCALE, 'scaling_activation': 'softplus', 'perturb_offset': True}
    bad = {k: rep[k] for k, v in expect.items() if k in rep and rep[k] != v}
    lr = rep.get('lr', {})
    official_lr = {'_xyz': 1.0, '_features_dc': 1.0, '_opacity': 1.0, '_scaling': 1.0, '_rotation': 0.1}
    bad.update({f'lr.{k}': v for k, v in lr.items() if official_lr.get(k) != v})
    if m.get('attn_mode', 'swin') != 'swin':
        bad['attn_mode'] = m['attn_mode']
    if bad:
        raise ValueError(f"Gaussian decoder settings not supported (official values expected): {bad}")
    side = math.isqrt(m.get('latent_channels', 768) // 3)
    if side * side * 3 != m.get('latent_channels', 768):
        raise ValueError(f"latent_channels {m['latent_channels']} is not a square RGB patch")
    return ModelConfig(patch_size=(4, side, side), gs_width=m['model_channels'], gs_depth=m['num_blocks'],
                       gs_heads=m['num_heads'], gs_mlp=m['mlp_channels'], gs_window=m.get('window_size', 8),
                       gs_per_voxel=rep.get('num_gaussians', 32), gs_resolution=m.get('resolution', 64))


def read_official_gs_yaml(config_path):
    """Official 3d_decode_gs.yaml -> its `model:` dict (a clear error for any other file)."""
    import yaml
    with open(config_path) as f:
        y = yaml.safe_load(f)
    m = y.get('model', y) if isinstance(y, dict) else None
    if not isinstance(m, dict) or 'model_channels' not in m:
        raise ValueError(f"{config_path}: no `model:` block with model_channels (not a 3d_decode_gs YAML)")
    return m


def pretrained_gs_config(checkpoint_path, config_path=None):
    """The ModelConfig (gs_* fields, patch size) GaussianDecoder.from_pretrained would build, from the YAML or a
    released name, without loading weights (train.py sizes a fine-tuning run with it)."""
    import os
    if config_path is not None:
        return official_gs_config(read_official_gs_yaml(config_path))
    if checkpoint_path in PRETRAINED and not os.path.exists(checkpoint_path):
        if PRETRAINED[checkpoint_path]['kind'] != 'gaussian':
            raise ValueError(f"'{checkpoint_path}' is not a Gaussian decoder (released: {_names('gaussian')})")
        return official_gs_config(PRETRAINED[checkpoint_path]['arch'])
    raise ValueError(f"{checkpoint_path}: an official Gaussian decoder checkpoint needs its YAML "
                     f"(or give a released name: {_names('gaussian')})")


# -----------------------------------------------------------------------------
# SigLIP2 -> encoder (paper 3.4: the encoder starts from SigLIP2-So400m/16; the decoder from scratch)


def load_siglip2_tower(source):
    """A SigLIP2 vision tower's state dict with timm VisionTransformer key names.

    source: an nn.Module (timm tower, or open_clip model whose .visual.trunk is one), a local file
    (.safetensors / .pt / .bin; timm or open_clip key names), an open_clip model name (weights 'webli',
    downloaded) or 'timm/<name>' (downloaded from the HF hub).
    """
    import os
    if isinstance(source, nn.Module):
        m = getattr(source, 'visual', source)
        return getattr(m, 'trunk', m).state_dict()
    if os.path.exists(source):
        if source.endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(source)
        else:
            sd = torch.load(source, map_location='cpu', weights_only=True)
        for prefix in ('visual.trunk.', 'trunk.'):   # an open_clip checkpoint: keep the vision trunk
            if any(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                break
        return sd
    try:
        if source.startswith('timm/'):
            import timm
            return timm.create_model(source[5:], pretrained=True, num_classes=0).state_dict()
        import open_clip
        return open_clip.create_model(source, pretrained='webli').visual.trunk.state_dict()
    except Exception as e:   # no network, unknown name, ...: say what was asked and how to give it locally
        raise RuntimeError(f"could not load SigLIP2 weights '{source}' ({type(e).__name__}: {e}). Give a local "
                           f"file instead: a timm/open_clip state dict of the vision tower") from e


def siglip2_to_encoder(sd, cfg):
    """timm SigLIP tower state dict -> our `encoder.*` state dict.

    The 2D patch embedding [C, 3, p, p] goes into the pt = 0 slot of the 3D input linear in (ph, pw, c)
    order and the other temporal slots are zero, so an image (zero-padded frames) sees exactly SigLIP's
    patch embedding. A position table of another grid size is resized like at run time.
    """
    pt, ph, pw = cfg.patch_size
    conv = sd['patch_embed.proj.weight']                                        # [C, 3, p, p]
    C = conv.shape[0]
    if conv.shape[2:] != (ph, pw) or C != cfg.encoder_width:
        raise ValueError(f"SigLIP tower patch embedding {tuple(conv.shape)} does not fit patch_size "
                         f"{cfg.patch_size} and encoder_width {cfg.encoder_width}")
    w_in = conv.new_zeros(C, pt, ph, pw, 3)
    w_in[:, 0] = conv.permute(0, 2, 3, 1)                                       # (ph, pw, c), c fastest
    pos = sd['pos_embed'][0]                                                    # [g*g, C]
    g = math.isqrt(pos.shape[0])
    if g != cfg.pos_grid:
        table = pos.reshape(g, g, C).permute(2, 0, 1)[None].float()             # [1, C, g, g]
        table = F.interpolate(table, size=(cfg.pos_grid,) * 2, mode='bilinear', align_corners=False,
                              antialias=True)
        pos = table[0].permute(1, 2, 0).reshape(-1, C).to(pos.dtype)
    out = {'encoder.input_layer.weight': w_in.reshape(C, -1), 'encoder.input_layer.bias': sd['patch_embed.proj.bias'],
           'encoder.pos_embedder.position_embedding.weight': pos,
           'encoder.head.probe': sd['attn_pool.latent'].reshape(C)}
    rename = {'norm.': 'post_layernorm.', 'attn_pool.q.': 'head.attention.to_q.',
              'attn_pool.kv.': 'head.attention.to_kv.', 'attn_pool.proj.': 'head.attention.to_out.',
              'attn_pool.norm.': 'head.layernorm.', 'attn_pool.mlp.fc1.': 'head.mlp.mlp.0.',
              'attn_pool.mlp.fc2.': 'head.mlp.mlp.2.', '.attn.qkv.': '.attn.to_qkv.',
              '.attn.proj.': '.attn.to_out.', '.mlp.fc1.': '.mlp.mlp.0.', '.mlp.fc2.': '.mlp.mlp.2.'}
    done = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'pos_embed', 'attn_pool.latent'}
    for k, v in sd.items():
        if k in done:
            continue
        new = k
        for a, b in rename.items():
            if new.startswith(a) or (a.startswith('.') and a in new):
                new = new.replace(a, b, 1) if a.startswith('.') else b + new[len(a):]
        if new == k and not k.startswith('blocks.'):
            raise ValueError(f"unexpected key in SigLIP tower state dict: {k}")
        out['encoder.' + new] = v
    return out


# -----------------------------------------------------------------------------
# Apple's released checkpoints by name. The architecture of each is embedded here (the `arch_cfg` of its
# official YAML; for 3d_decode_gs the YAML's `model:` block), so no YAML is needed; the weights are
# downloaded once into $ATOKEN_CACHE (default ~/.cache/atoken) and checked against their recorded SHA-256.

_SO400M_ARCH = dict(
    patch_size=[4, 16, 16], in_channels=3072, out_channels=3072, latent_channels=48,
    encoder_model_channels=1152, encoder_num_blocks=27, encoder_num_heads=16, encoder_mlp_channels=4304,
    encoder_attn_mode='full', encoder_pe_mode='joint', encoder_qk_rms_norm=False, encoder_use_bias=True,
    encoder_use_rms_norm=False,
    decoder_model_channels=1152, decoder_num_blocks=27, decoder_num_heads=16, decoder_mlp_channels=4304,
    decoder_attn_mode='full', decoder_pe_mode='joint', decoder_qk_rms_norm=True, decoder_use_bias=False,
    decoder_use_rms_norm=True, use_decoder=True, use_quantizer=False)
_FSQ_ARCH = dict(use_quantizer=True, quantizer_type='fsq', quantizer_codebook_size=4096, quantizer_feature_dim=48,
                 quantizer_num_codebooks=8, quantizer_chunk_size=1)
_GS_ARCH = {'resolution': 64, 'model_channels': 768, 'latent_channels': 768, 'num_blocks': 12, 'num_heads': 12,
            'mlp_channels': 3072, 'attn_mode': 'swin', 'window_size': 8,
            'representation_config': {
                'lr': {'_xyz': 1.0, '_features_dc': 1.0, '_opacity': 1.0, '_scaling': 1.0, '_rotation': 0.1},
                'perturb_offset': True, 'voxel_size': 1.5, 'num_gaussians': 32, '2d_filter_kernel_size': 0.1,
                '3d_filter_kernel_size': 9e-4, 'scaling_bias': 4e-3, 'opacity_bias': 0.1,
                'scaling_activation': 'softplus'}}

PRETRAINED_BASE_URL = 'https://ml-site.cdn-apple.com/models/atoken'   # $ATOKEN_BASE_URL overrides it
PRETRAINED = {
    # name: kind ('tokenizer': AToken, 'gaussian': GaussianDecoder) and arch (the official YAML's values).
    # The weights are at <base URL>/<name>.pt; an entry's optional 'url' replaces that (tests use it).
    'atoken-soc': dict(kind='tokenizer', arch=dict(_SO400M_ARCH)),                  # So/C: continuous, 48
    'atoken-sod': dict(kind='tokenizer', arch=dict(_SO400M_ARCH, **_FSQ_ARCH)),     # So/D: FSQ 8 x 4096
    'atoken-soc-s1': dict(kind='tokenizer', arch=dict(_SO400M_ARCH, latent_channels=32)),   # after stage 1
    'atoken-soc-s2': dict(kind='tokenizer', arch=dict(_SO400M_ARCH)),               # after stage 2
    '3d_decode_gs': dict(kind='gaussian', arch=_GS_ARCH),                           # 3D Gaussian decoder
}


def pretrained_url(name):
    """The entry's 'url', else $ATOKEN_BASE_URL (default PRETRAINED_BASE_URL) + /<name>.pt."""
    import os
    base = os.environ.get('ATOKEN_BASE_URL') or PRETRAINED_BASE_URL
    return PRETRAINED[name].get('url') or f"{base.rstrip('/')}/{name}.pt"


def pretrained_cache_dir():
    """$ATOKEN_CACHE, default ~/.cache/atoken."""
    import os
    return os.path.abspath(os.path.expanduser(os.environ.get('ATOKEN_CACHE') or os.path.join('~', '.cache', 'atoken')))


def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 23), b''):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path, obj):
    import json
    import os
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def download_pretrained(name, progress=True):
    """-> local path of the released checkpoint `name`: $ATOKEN_CACHE/<name>.pt, downloaded (urllib, tqdm
    progress bar) into a temporary file in the same folder that is renamed only once complete. Its size and
    SHA-256 are recorded in <name>.pt.json; a later call checks them without touching the network and, if the
    file was truncated or altered, deletes it and downloads it again. A file put there by hand (no record)
    is trusted and recorded. A failed download raises one RuntimeError naming the URL and that path."""
    import hashlib
    import http.client
    import json
    import os
    import tempfile
    import urllib.request
    import warnings
    from tqdm import tqdm
    url, folder = pretrained_url(name), pretrained_cache_dir()
    path = os.path.join(folder, f'{name}.pt')
    record = path + '.json'
    if os.path.exists(path):
        size = os.path.getsize(path)
        try:
            with open(record) as f:
                known = json.load(f)
        except (OSError, ValueError):
            known = None
        if not isinstance(known, dict):                 # placed by hand (or the record was lost): trust it
            _write_json_atomic(record, dict(size=size, sha256=_sha256(path), url=None))
            return path
        if known.get('size') == size and known.get('sha256') == _sha256(path):
            return path
        warnings.warn(f"{path} does not match the size and SHA-256 recorded when it was downloaded "
                      f"({record}): truncated or altered; deleting it and downloading it again")
        os.remove(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{name}.pt.', suffix='.part')
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=60) as r:
            total = r.headers.get('Content-Length')
            total = int(total) if total else None
            with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=f'{name}.pt',
                      disable=not progress) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
            if total is not None and n != total:
                raise OSError(f"connection closed after {n} of {total} bytes")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                            # mkstemp makes it owner-only
        os.replace(tmp, path)
        tmp = None
        _write_json_atomic(record, dict(size=n, sha256=h.hexdigest(), url=url))
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise RuntimeError(f"could not download the pretrained checkpoint '{name}' from {url} ({e}).\n"
                           f"Download it by hand and put it at {path} (e.g. curl -L -o {path} {url}); "
                           f"it is then used from there without the network (set $ATOKEN_CACHE to use "
                           f"another folder).") from None     # one error: the cause is in the message
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def _pretrained(name, kind):
    """Released `name` of the given kind -> (local checkpoint path, a copy of its embedded arch)."""
    import copy
    entry = PRETRAINED[name]
    if entry['kind'] != kind:
        cls = {'tokenizer': 'AToken', 'gaussian': 'GaussianDecoder'}[entry['kind']]
        raise ValueError(f"'{name}' is a {entry['kind']} checkpoint: load it with {cls}.from_pretrained('{name}')")
    return download_pretrained(name), copy.deepcopy(entry['arch'])


def _names(kind):
    return ', '.join(n for n, e in PRETRAINED.items() if e['kind'] == kind)
