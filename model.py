"""
AToken: one transformer tokenizer for images, videos and 3D assets (arXiv 2509.14476), as the paper defines it.

Read top to bottom: the config and its presets; media <-> packed 4D token sets (patchify, pack); the building
blocks (4D RoPE, norms, the attention call, the transformer block, the resized position table, the attention-pool
head); the SigLIP-style encoder and the RMSNorm pixel decoder, with 16-frame temporal tiling and the KV-cache
decode; FSQ; the tokenizer `AToken` (forward first: encode -> KL bottleneck / FSQ -> decode, plus the pooled
text-aligned embedding); the 3D Gaussian decoder. Beside this file, and never importing it:
  structure.py   the packed batch's host-side plan (segments and tiles, attention layouts, position-table weights,
                 Gaussian windows, the KV-cache steps), built once where the batch is made
  kernels/       the attention implementations behind one call (Triton on CUDA, grouped pure torch elsewhere)
                 and the CPU RMSNorm op
  convert.py     Apple's checkpoint formats, SigLIP2 towers, released names and downloads (from_pretrained)

Module and parameter names follow the official checkpoints (apple/ml-atoken), so a released state dict loads with
a plain strict `load_state_dict`. The behaviour follows the official inference code exactly (tests/test_official.py
checks it to ~1e-6 in fp32 against tiny official models). Borrowed ideas: nanoGPT (layout, from_pretrained),
SigLIP2-NaFlex (resized 2D position table), FSQ (Mentzer et al. 2023), TRELLIS (sparse packed transformer).

Letter legend for shape comments:
  B samples in a packed batch   N tokens (all samples, concatenated)   C channels   L latent channels
  T frames   H W height width   P patch   S segments (sample x temporal tile)   h heads   d head dim
  G FSQ groups   K Gaussians per voxel
"""
import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import convert
from kernels.attention import attention
from kernels.rmsnorm import rms_norm
from structure import build_structure, gs_windows

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
        """Saved or converted fields (an export's asdict(config), convert.py's output) -> ModelConfig; unknown
        fields are an error naming `source`."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: fields {unknown} are not ModelConfig fields (saved by another version?)")
        return cls(**dict(d, patch_size=tuple(d.get('patch_size', cls.patch_size))))

    @classmethod
    def from_official(cls, arch, gaussian=False):
        """An official YAML's `arch_cfg` (gaussian: a 3d_decode_gs.yaml `model:` block) -> ModelConfig (convert.py)."""
        return cls.from_dict(convert.gs_fields_from_model(arch) if gaussian else convert.fields_from_arch(arch),
                             'official YAML')


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
    (structure.build_structure) by pack(..., config) or data.collate; the model needs it."""
    feats: torch.Tensor     # [N, C] flattened patches (pt, ph, pw, c), c fastest; or latents
    coords: torch.Tensor    # [N, 4] int64 (t, x, y, z): x = patch row, y = patch column, z = 0 for pixels
    seqlens: list           # tokens per sample, sum = N
    kinds: list             # 'image' | 'video' | '3d' per sample
    grids: list             # latent grid (t, h, w) per sample, for unpatchify (None for 3D)
    patch_size: tuple       # (pt, ph, pw) the feats were made with
    structure: object = None  # structure.Structure, or None for a batch no model runs on (data-only uses)

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



def structure_of(x):
    """x.structure, or a clear error for a batch packed without one."""
    if x.structure is None:
        raise ValueError("this Packed batch has no structure: pack it with model.pack(media, patch_size, config) "
                         "or data.collate(items, config)")
    return x.structure


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


@dataclass
class Rope:
    """4D RoPE at integer coords [N, 4] for one head_dim, made once per trunk and shared by its layers: the one
    pure-torch RoPE (the Triton kernel rotates in registers from coords and theta, the same formula)."""
    coords: torch.Tensor        # [N, 4] integer (t, x, y, z)
    rot: torch.Tensor           # [N, 1, d/2] complex64 exp(i angle)
    theta: float

    @staticmethod
    def make(coords, head_dim, theta):
        angles = rope_angles(coords, head_dim, theta)
        return Rope(coords, torch.polar(torch.ones_like(angles), angles)[:, None], theta)

    def rotate(self, x):
        """x [N, h, d] with pairs (2m, 2m+1) as complex numbers, times rot: one complex multiply in fp32 (a 2D
        rotation of each pair by its angle), cast back to x's dtype."""
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))     # [N, h, d/2]
        return torch.view_as_real(xc * self.rot).flatten(-2).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (official LayerNorm32)."""
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


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
    Inside torch.compile it is written x * sigmoid(2u), the same function (0.5 (1 + tanh u) = sigmoid(2u), equal
    to fp32 rounding), which inductor fuses into one loop around a vectorised exp (faster than its tanh on CPU,
    NOTES.md). Eager keeps the one-op F.gelu."""
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

    def qkv(self, x):
        q, k, v = self.to_qkv(x).view(len(x), 3, self.heads, self.head_dim).unbind(1)  # [N, h, d] each
        if self.qk_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k, v

    def forward(self, x, rope, layout):
        q, k, v = self.qkv(x)
        return self.to_out(attention(q, k, v, layout, rope, rope, self.softcap).flatten(1))  # [N, C]

    def forward_cached(self, x, step, rope_q, rope_k, cache):
        """One KV-cache decode step (step: a structure.CacheStep): the new queries attend to their sample's cached
        K/V (post qk-norm, pre-RoPE, as official) and to the new ones. cache: (k, v) of the previous step, or None.
        -> (output [N, C], the next step's cache: the rows step.keep of [cached | new])."""
        q, k, v = self.qkv(x)
        if cache is not None:
            k, v = torch.cat([cache[0], k]), torch.cat([cache[1], v])
        o = attention(q, k.index_select(0, step.key_order), v.index_select(0, step.key_order), step.layout,
                      rope_q, rope_k)
        return self.to_out(o.flatten(1)), (k.index_select(0, step.keep), v.index_select(0, step.keep))


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

    def forward(self, x, rope, layout):
        x = x + self.attn(self.norm1(x), rope, layout)
        return x + self.mlp(self.norm2(x))

    def forward_cached(self, x, step, rope_q, rope_k, cache):
        """The block in a KV-cache decode step -> (output, the next step's cache of its attention)."""
        a, cache = self.attn.forward_cached(self.norm1(x), step, rope_q, rope_k, cache)
        x = x + a
        return x + self.mlp(self.norm2(x)), cache


class PositionTable(nn.Module):
    """Learned 2D position table (pos_grid^2 x C), bilinearly resized to each segment's grid (SigLIP2-NaFlex).

    The resize (antialias, align_corners=False; a 16x16 grid is an exact identity) is linear, so the host
    writes it as weights (structure.position_lookup): one matmul makes every distinct resized row, one gather puts
    them on the tokens, whatever the number of segments and grid sizes.
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

    def rope(self, coords):
        return Rope.make(coords, self.head_dim, self.cfg.rope_theta)

    def embed_input(self, x):
        """input linear; one-frame tokens (images, 3D: ph*pw*3 columns) meet only the pt = 0 slot's columns of
        the space-time weight, which is what the zero-padded official frames compute."""
        w = self.input_layer.weight
        return F.linear(x, w[:, :x.shape[1]] if x.shape[1] < w.shape[1] else w, self.input_layer.bias)

    def run(self, x, st):
        """x [N, c_in] -> [N, width] with every (sample, tile) segment processed independently (st: the batch's
        structure: segment order, tile-local coords, their layout and position-table lookup)."""
        if st.order is not None:
            x = x.index_select(0, st.order)
        h = self.embed_input(x) + self.pos_embedder(st.pos_index, st.pos_rows)
        rope = self.rope(st.local)
        for block in self.blocks:
            h = block(h, rope, st.seg)
        return h if st.inverse is None else h.index_select(0, st.inverse)       # back to input order


class Encoder(Trunk):
    def __init__(self, cfg):
        super().__init__(cfg, cfg.in_channels, cfg.encoder_width, cfg.encoder_depth, cfg.encoder_heads,
                         cfg.encoder_mlp, decoder=False)
        self.post_layernorm = LayerNorm(cfg.encoder_width, eps=NORM_EPS)
        self.head = AttentionPool(cfg.encoder_width, cfg.encoder_heads, cfg.encoder_mlp)

    def forward(self, x, st):
        """x [N, C] (full or one-frame patches), st the batch's structure -> [N, C_enc]."""
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

    def forward(self, z, st):
        """z [N, L], st the batch's structure -> [N, pt*ph*pw*3] (or [N, ph*pw*3] for a one-frame batch). With
        decoder_cache_frames > 0 the structure carries the KV-cache steps: decode tile by tile with the cache."""
        if st.cache is not None:
            return self.forward_cached(z, st.cache, st.single_frame)
        return self.out(self.run(z, st), st.single_frame)

    def forward_cached(self, z, steps, single_frame):
        """The KV-cache decode (paper Fig. 6; official recipe): temporal tiles in sequence, all samples at once. Each
        step decodes the next tile - k latent frames; their queries also attend to the K/V of each sample's previous
        k latent frames (every layer keeps its own cache). The position table goes on the new tokens only. steps:
        structure.cache_plan's CacheSteps (which tokens, their coords, which cached rows to attend to and keep)."""
        out, caches = None, [None] * len(self.blocks)
        for step in steps:
            h = self.embed_input(z.index_select(0, step.idx)) + self.pos_embedder(step.pos_index, step.pos_rows)
            rope_q, rope_k = self.rope(step.local), self.rope(step.key_coords)
            for i, block in enumerate(self.blocks):
                h, caches[i] = block.forward_cached(h, step, rope_q, rope_k, caches[i])
            y = self.out(h, single_frame)
            out = (y.new_zeros(len(z), y.shape[1]) if out is None else out).index_copy(0, step.idx, y)
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

    def forward(self, x, sample=None, decode=True, embed=True):
        """Training pass on a Packed batch x (structure built): encode, pool the text-aligned embedding, bottleneck
        (a posterior sample when training, unless sample=False), decode. decode=False (understanding-only batches)
        skips the bottleneck and the pixel decoder; embed=False (reconstruction-only batches) skips the pooling
        head, whose embedding their loss does not use."""
        sample = self.training if sample is None else sample
        h = self.encode(x)
        out = dict(h=h, embedding=self.embed_features(h, x) if embed else None)
        if decode:
            lat = self.bottleneck(h, sample)
            out.update(rec=self.decode(lat.z, x), mean=lat.mean, logvar=lat.logvar, indices=lat.indices)
        return out

    def encode(self, x):
        """Packed pixels -> post-LayerNorm encoder features h [N, C_enc] (tiles encoded independently)."""
        if x.feats.dtype == torch.uint8:
            raise ValueError("Packed.feats is uint8 (a batch from data.collate): move it with batch.packed.to(device), "
                             "which turns the pixels into floats in [-1, 1]")
        return self.encoder(x.feats, structure_of(x))

    def embed_features(self, h, x):
        """h [N, C] of packed batch x -> L2-normalised text-aligned embeddings [B, C] (pools over all tiles)."""
        return F.normalize(self.encoder.head(h, structure_of(x).pool), dim=-1)

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

    def decode(self, z, x):
        """Latents z [N, L] of packed batch x (its structure is reused) -> pixel patches [N, pt*ph*pw*3] in [-1, 1]
        (not clamped); a one-frame batch gives [N, ph*pw*3]."""
        return self.decoder(z, structure_of(x))

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
            coords.append(grid_coords(*grid).clone())
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
        s2 = int((np.diff(structure_of(x).seg.cu_q_host.numpy().astype(np.int64)) ** 2).sum())   # host lengths
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
        # linear autoencoder through the norms, and attention / MLPs grow in from there (random token mixing at
        # init held the tiny CPU model ~3 dB lower for hundreds of steps, NOTES.md). Not the pooling head: no residual.
        for m in self.modules() if zero_residual else ():
            if isinstance(m, Block):
                nn.init.zeros_(m.attn.to_out.weight)
                nn.init.zeros_(m.mlp.mlp[2].weight)
        return self

    @torch.no_grad()
    def init_from_siglip2(self, source=convert.SIGLIP2_DEFAULT):
        """Copy a SigLIP2 vision tower (a module, a local file or a name: convert.load_siglip2_tower) into the
        encoder (blocks, patch embedding, position table, head). Every encoder tensor must come from the tower;
        the decoder and proj are left as they are."""
        enc = convert.siglip2_to_encoder(convert.load_siglip2_tower(source), self.config)
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
    def from_pretrained(cls, checkpoint, config_path=None):
        """Load Apple's released tokenizer by name ('atoken-sod', 'atoken-soc', 'atoken-soc-s1', 'atoken-soc-s2':
        downloaded once into $ATOKEN_CACHE), an official checkpoint file (flat state dict, .pt or .safetensors) with
        its official YAML, or a tokenizer exported by train.py ({'model_config', 'model'}) with no YAML. An existing
        path wins over a name. Strict: a mismatch names every missing, unexpected and mis-shaped key."""
        fields_, sd, source = convert.tokenizer_source(checkpoint, config_path)
        with torch.device('meta'):
            model = cls(ModelConfig.from_dict(fields_, source))
        load_strict(model, sd, source)
        return model.eval()

    def export(self):
        """Tokenizer weights alone, loadable by AToken.from_pretrained(path)."""
        return {'model_config': asdict(self.config),
                'model': {k: v.detach().cpu() for k, v in self.state_dict().items()}}


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
        without them (one call on its own) they are built here from a host copy of coords."""
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
    def from_pretrained(cls, checkpoint, config_path=None):
        """Load Apple's Gaussian decoder by name ('3d_decode_gs': downloaded once into $ATOKEN_CACHE), or
        3d_decode_gs.pt with its YAML (`model:` block). An existing path wins over a name."""
        fields_, sd, source = convert.gaussian_source(checkpoint, config_path)
        with torch.device('meta'):
            model = cls(ModelConfig.from_dict(fields_, source))
        load_strict(model, sd, source)
        return model.eval()
