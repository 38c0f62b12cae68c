"""
AToken: one transformer tokenizer for images, videos and 3D assets (arXiv 2509.14476).

Everything the tokenizer is lives in this file: the config and its presets, patchify/unpatchify into a
packed 4D token set, 4D RoPE, block-diagonal attention, the SigLIP-style encoder with its attention-pool
head, the KL bottleneck, FSQ, the RMSNorm decoder, 16-frame temporal tiling with an optional decoder KV
cache, loading Apple's released checkpoints (`AToken.from_pretrained`) and SigLIP2 initialisation of the
encoder (`AToken.init_from_siglip2`).

Module and parameter names follow the official checkpoints (apple/ml-atoken), so a released state dict
loads with a plain strict `load_state_dict`. The behaviour follows the official inference code exactly
(see shared/reference/official-atoken.md; tests/test_official.py checks it to ~1e-6 in fp32). Borrowed
ideas: nanoGPT (layout, from_pretrained), SigLIP2-NaFlex (resized 2D position table), FSQ (Mentzer et
al. 2023), TRELLIS (sparse packed transformer).

Letter legend for shape comments:
  B samples in a packed batch   N tokens (all samples, concatenated)   C channels   L latent channels
  T frames   H W height width   P patch   S segments (sample x temporal tile)   h heads   d head dim
  G FSQ groups
"""
import math
from dataclasses import asdict, dataclass, fields

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
    use_rope: bool = True               # off only to compare the encoder with a plain SigLIP tower
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


# presets, DiT style. so400m is the paper/official model (845.7M parameters).
PRESETS = {
    'so400m': ModelConfig(),
    'base': ModelConfig(encoder_width=768, encoder_depth=12, encoder_heads=12, encoder_mlp=3072,
                        decoder_width=768, decoder_depth=12, decoder_heads=12, decoder_mlp=3072),
    # laptop-sized: trains on a CPU in minutes
    'tiny': ModelConfig(patch_size=(4, 8, 8), encoder_width=64, encoder_depth=2, encoder_heads=2,
                        encoder_mlp=128, decoder_width=64, decoder_depth=2, decoder_heads=2,
                        decoder_mlp=128, latent_channels=48),
}

NORM_EPS = 1e-6  # every LayerNorm / RMSNorm in the official tokenizer

# -----------------------------------------------------------------------------
# media <-> packed token sets


@dataclass
class Packed:
    """A batch as one packed token set: samples concatenated along N, no padding between them."""
    feats: torch.Tensor     # [N, C] flattened patches (pt, ph, pw, c), c fastest; or latents
    coords: torch.Tensor    # [N, 4] int64 (t, x, y, z): x = patch row, y = patch column, z = 0 for pixels
    seqlens: list           # tokens per sample, sum = N
    kinds: list             # 'image' | 'video' | '3d' per sample
    grids: list             # latent grid (t, h, w) per sample, for unpatchify (None for 3D)
    patch_size: tuple = None  # (pt, ph, pw) the feats were made with

    def to(self, device=None, dtype=None):
        return Packed(self.feats.to(device=device, dtype=dtype), self.coords.to(device), self.seqlens,
                      self.kinds, self.grids, self.patch_size)


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
    grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing='ij')
    coords = torch.stack([*grid, torch.zeros_like(grid[0])], -1).reshape(-1, 4).to(v.device)  # [N, 4]
    return feats, coords


def unpatchify(feats, grid, patch_size):
    """feats [t*h*w, pt*ph*pw*3] in raster order -> (t*pt, h*ph, w*pw, 3)."""
    pt, ph, pw = patch_size
    t, h, w = grid
    v = feats.reshape(t, h, w, pt, ph, pw, 3).permute(0, 3, 1, 4, 2, 5, 6)  # (t, pt, h, ph, w, pw, 3)
    return v.reshape(t * pt, h * ph, w * pw, 3)


def voxel_tokens(asset, patch_size):
    """A 3D asset {'feats': [N, ph*pw*3] in [-1, 1], 'coords': [N, 3] voxel (i, j, k)} -> feats [N, C]
    zero-padded into the pt = 0 slot of the space-time patch, coords [N, 4] = (0, i, j, k).

    The features are each occupied voxel's RGB patch from its nearest view (render3d.py), as official.
    (Official coords carry t = 1; tiles re-base t and RoPE is relative, so t = 0 is identical.)"""
    pt, ph, pw = patch_size
    f, c = torch.as_tensor(asset['feats']), torch.as_tensor(asset['coords']).long()
    if f.dim() != 2 or f.shape[1] != ph * pw * 3 or c.shape != (len(f), 3):
        raise ValueError(f"3D asset: expected feats [N, {ph * pw * 3}] and coords [N, 3], got "
                         f"{tuple(f.shape)} and {tuple(c.shape)}")
    feats = F.pad(f, (0, (pt - 1) * ph * pw * 3))                               # [N, pt*ph*pw*3]
    return feats, torch.cat([torch.zeros_like(c[:, :1]), c], 1)                 # [N, 4]


def pack(media, patch_size):
    """List of images (H, W, 3) / videos (T, H, W, 3) in [-1, 1] and 3D assets (dicts, see voxel_tokens)
    -> one Packed batch."""
    feats, coords, seqlens, kinds, grids = [], [], [], [], []
    pt, ph, pw = patch_size
    if not media:   # an empty batch (e.g. every file of a step failed to decode)
        return Packed(torch.zeros(0, pt * ph * pw * 3), torch.zeros(0, 4, dtype=torch.long), [], [], [],
                      tuple(patch_size))
    for x in media:
        if isinstance(x, dict):
            f, c = voxel_tokens(x, patch_size)
            feats.append(f), coords.append(c), seqlens.append(len(f)), kinds.append('3d'), grids.append(None)
            continue
        v, kind = prepare(torch.as_tensor(x), patch_size)
        f, c = patchify(v, patch_size)
        feats.append(f)
        coords.append(c)
        seqlens.append(f.shape[0])
        kinds.append(kind)
        grids.append((v.shape[0] // pt, v.shape[1] // ph, v.shape[2] // pw))
    return Packed(torch.cat(feats), torch.cat(coords), seqlens, kinds, grids, tuple(patch_size))


def unpack(feats, packed, patch_size):
    """Decoder output [N, C] (tokens in packed order) -> list of media; images keep frame 0 only;
    3D assets give their voxels' first-slot features [N_i, ph*pw*3] (the Gaussian decoder's input)."""
    out = []
    for f, kind, grid in zip(feats.split(packed.seqlens), packed.kinds, packed.grids):
        if kind == '3d':
            out.append(f[:, :patch_size[1] * patch_size[2] * 3])
            continue
        v = unpatchify(f, grid, patch_size)
        out.append(v[0] if kind == 'image' else v)
    return out


def cu_seqlens(lengths, device=None):
    """[l0, l1, ...] -> [0, l0, l0+l1, ...] (int32, flash-attention convention)."""
    return F.pad(torch.as_tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)


# -----------------------------------------------------------------------------
# temporal tiles: attention, position tables and RoPE all work per (sample, tile) segment


@dataclass
class Segments:
    order: torch.Tensor      # [N] permutation putting tokens in segment order (None if already sorted)
    coords: torch.Tensor     # [N, 4] coords in segment order, t re-based to 0 in each tile
    lengths: list            # tokens per segment
    cu: torch.Tensor         # [S+1] int32
    sample_of: list          # sample index of each segment


def split_tiles(coords, seqlens, tile_latent):
    """Assign every token to a (sample, temporal tile) segment, tiles of `tile_latent` latent frames.

    Tiles start at each sample's first t (official: the batch-wide first t, identical for pixel data
    which always starts at t = 0, and harmless because RoPE is relative).
    """
    sample = torch.repeat_interleave(torch.arange(len(seqlens), device=coords.device),
                                     torch.as_tensor(seqlens, device=coords.device))   # [N]
    t = coords[:, 0]
    t0 = torch.zeros(len(seqlens), dtype=t.dtype, device=t.device).scatter_reduce(
        0, sample, t, 'amin', include_self=False)[sample]                          # [N]
    tile = (t - t0) // tile_latent
    key = sample * (int(tile.max()) + 1 if len(tile) else 1) + tile               # segment id, monotone
    order = None
    if len(key) > 1 and bool((key[1:] < key[:-1]).any()):
        order = torch.argsort(key, stable=True)
        coords, key, tile, t0 = coords[order], key[order], tile[order], t0[order]
    local = coords.clone()
    local[:, 0] = coords[:, 0] - t0 - tile * tile_latent
    seg_keys, lengths = torch.unique_consecutive(key, return_counts=True)
    n_tiles = int(tile.max()) + 1 if len(tile) else 1
    lengths = lengths.tolist()
    return Segments(order, local, lengths, cu_seqlens(lengths, coords.device),
                    (seg_keys // n_tiles).tolist())


# -----------------------------------------------------------------------------
# building blocks, small to large


def attention(q, k, v, cu_q, cu_k, softcap=None):
    """Block-diagonal attention over packed segments; the reference path (flash-attn varlen semantics).

    q [N, h, d], k/v [M, h, d]; segment i is q[cu_q[i]:cu_q[i+1]] against k[cu_k[i]:cu_k[i+1]].
    Non-causal, scale 1/sqrt(d). softcap c: scores become c * tanh(s / c) (the Gaussian decoder's).
    On CUDA the fused Triton kernel (kernels/attention.py, same semantics) replaces this loop; it is
    imported only there, so CPU users never need Triton.
    """
    if q.is_cuda:
        from kernels.attention import attention as fused_attention
        return fused_attention(q, k, v, cu_q, cu_k, softcap=softcap)
    out = []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        qi = q[bq[i]:bq[i + 1]].transpose(0, 1)                                # [h, n, d]
        ki, vi = (x[bk[i]:bk[i + 1]].transpose(0, 1) for x in (k, v))         # [h, m, d]
        if softcap is None:
            o = F.scaled_dot_product_attention(qi, ki, vi)
        else:
            s = qi @ ki.transpose(1, 2) / math.sqrt(q.shape[-1])                # [h, n, m]
            o = torch.softmax(softcap * torch.tanh(s / softcap), dim=-1) @ vi
        out.append(o.transpose(0, 1))                                           # [n, h, d]
    return torch.cat(out) if out else q.new_zeros(q.shape)


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
    xf = x.float().reshape(*x.shape[:-1], -1, 2)                                # [N, h, d/2, 2]
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]                     # [N, 1, d/2]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1)             # [N, h, d/2, 2]
    return out.flatten(-2).to(x.dtype)


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
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (y * self.weight).to(x.dtype)


class HeadRMSNorm(nn.Module):
    """Per-head qk-norm of the decoder: x / ||x||_2 * gamma * sqrt(d), in fp32."""
    def __init__(self, heads, head_dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x):                                                       # x [N, h, d]
        y = F.normalize(x.float(), dim=-1) * self.gamma * math.sqrt(x.shape[-1])
        return y.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.GELU(approximate='tanh'),
                                 nn.Linear(hidden, dim, bias=bias))

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

    def forward(self, x, angles, cu, cache=None):
        q, k, v = self.to_qkv(x).view(len(x), 3, self.heads, self.head_dim).unbind(1)  # [N, h, d] each
        if self.qk_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if cache is not None:                   # decoder KV cache: keys are cached + new tokens
            return self.to_out(cache.attend(q, k, v).flatten(1))
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        return self.to_out(attention(q, k, v, cu, cu, self.softcap).flatten(1))  # [N, C]


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

    def forward(self, x, angles, cu, cache=None):
        x = x + self.attn(self.norm1(x), angles, cu, cache)
        return x + self.mlp(self.norm2(x))


class PositionTable(nn.Module):
    """Learned 2D position table (pos_grid^2 x C), bilinearly resized to each segment's grid (SigLIP2-NaFlex).

    Per segment: grid = (max row + 1, max col + 1); the table is resized with antialias
    (align_corners=False) and gathered at (row, col). A 16x16 grid is an exact identity.
    """
    def __init__(self, grid, dim):
        super().__init__()
        self.grid = grid
        self.position_embedding = nn.Embedding(grid * grid, dim)

    def forward(self, coords, lengths):                                         # coords [N, 4], segment order
        w = self.position_embedding.weight
        table = w.reshape(self.grid, self.grid, -1).permute(2, 0, 1)[None]      # [1, C, 16, 16]
        if w.device.type == 'cpu':
            table = table.float()               # CPU interpolation in fp32 (official; GPU stays in param dtype)
        resized, out = {}, []
        for c in coords.split(lengths):
            hw = (int(c[:, 1].max()) + 1, int(c[:, 2].max()) + 1)
            if hw not in resized:
                r = F.interpolate(table, size=hw, mode='bilinear', align_corners=False, antialias=True)
                resized[hw] = r[0].permute(1, 2, 0).to(w.dtype)                 # [h, w, C]
            out.append(resized[hw][c[:, 1], c[:, 2]])                           # [n, C]
        return torch.cat(out)


class AttentionPool(nn.Module):
    """SigLIP MAP head: one learned probe cross-attends to all tokens of a sample; residual on the
    attention output; no RoPE. The result is the text-aligned embedding (L2-normalised by the caller)."""
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

    def forward(self, h, seqlens):                                              # h [N, C] -> [B, C]
        B, (N, C), d = len(seqlens), h.shape, h.shape[1] // self.heads
        q = self.attention.to_q(self.probe).view(1, self.heads, d).expand(B, -1, -1)  # [B, h, d]
        k, v = self.attention.to_kv(h).view(N, 2, self.heads, d).unbind(1)           # [N, h, d]
        o = attention(q, k, v, cu_seqlens([1] * B, h.device), cu_seqlens(seqlens, h.device))
        y = self.attention.to_out(o.flatten(1))                                        # [B, C]
        return y + self.mlp(self.layernorm(y))


class KVCache:
    """One decoder layer's cache: K/V (post qk-norm, pre-RoPE) of each sample's last `frames` latent frames."""
    def __init__(self, frames):
        self.frames, self.k, self.v, self.coords = frames, None, None, None   # per-sample lists

    def start_step(self, coords, lens, angles_fn):
        """New tokens of this step: coords [n, 4] (local t), lens per sample (sample-major order)."""
        self.new_coords, self.new_lens, self.angles_fn = coords, lens, angles_fn

    def attend(self, q, k, v):
        """New queries attend to [cached | new] keys of their own sample; then the cache is updated."""
        lens = self.new_lens
        ks, vs, cs = list(k.split(lens)), list(v.split(lens)), list(self.new_coords.split(lens))
        if self.k is not None:                  # per sample: cached tokens first (t = 0..k-1), then new
            ks = [torch.cat(p) for p in zip(self.k, ks)]
            vs = [torch.cat(p) for p in zip(self.v, vs)]
            cs = [torch.cat(p) for p in zip(self.coords, cs)]
        live = [i for i, n in enumerate(lens) if n > 0]         # samples with queries in this step
        kk, vv, cc = (torch.cat([x[i] for i in live]) for x in (ks, vs, cs))
        qa, ka = self.angles_fn(self.new_coords), self.angles_fn(cc)
        if qa is not None:
            q, kk = apply_rope(q, qa), apply_rope(kk, ka)
        o = attention(q, kk, vv, cu_seqlens([lens[i] for i in live], q.device),
                      cu_seqlens([len(ks[i]) for i in live], q.device))
        # keep each sample's last `frames` latent frames, re-based to t = 0..frames-1
        for i, c in enumerate(cs):
            if len(c):   # not clamped at 0: a short first tile's cache still ends at t = frames - 1 (official)
                t0 = int(c[:, 0].max()) + 1 - self.frames
                m = c[:, 0] >= t0
                ks[i], vs[i], cs[i] = ks[i][m], vs[i][m], c[m] - c.new_tensor([t0, 0, 0, 0])
        self.k, self.v, self.coords = ks, vs, cs
        return o


class Trunk(nn.Module):
    """input linear + 2D position table + blocks, run per (sample, temporal tile) segment."""
    def __init__(self, cfg, c_in, width, depth, heads, mlp, decoder):
        super().__init__()
        self.cfg, self.head_dim = cfg, width // heads
        self.pos_embedder = PositionTable(cfg.pos_grid, width)
        self.input_layer = nn.Linear(c_in, width, bias=not decoder)
        self.blocks = nn.ModuleList([Block(width, heads, mlp, decoder) for _ in range(depth)])

    def angles(self, coords):
        return rope_angles(coords, self.head_dim, self.cfg.rope_theta) if self.cfg.use_rope else None

    def run(self, x, coords, seqlens):
        """x [N, c_in] -> [N, width] with every (sample, tile) segment processed independently."""
        seg = split_tiles(coords, seqlens, self.cfg.tile_frames // self.cfg.patch_size[0])
        if seg.order is not None:
            x = x[seg.order]
        h = self.input_layer(x) + self.pos_embedder(seg.coords, seg.lengths)
        angles = self.angles(seg.coords)
        for block in self.blocks:
            h = block(h, angles, seg.cu)
        if seg.order is not None:
            h = torch.empty_like(h).index_copy_(0, seg.order, h)                # back to input order
        return h


class Encoder(Trunk):
    def __init__(self, cfg):
        super().__init__(cfg, cfg.in_channels, cfg.encoder_width, cfg.encoder_depth, cfg.encoder_heads,
                         cfg.encoder_mlp, decoder=False)
        self.post_layernorm = LayerNorm(cfg.encoder_width, eps=NORM_EPS)
        self.head = AttentionPool(cfg.encoder_width, cfg.encoder_heads, cfg.encoder_mlp)

    def forward(self, x, coords, seqlens):
        return self.post_layernorm(self.run(x, coords, seqlens))               # [N, C]


class Decoder(Trunk):
    def __init__(self, cfg):
        super().__init__(cfg, cfg.latent_channels, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads,
                         cfg.decoder_mlp, decoder=True)
        self.out_norm = RMSNorm(cfg.decoder_width)
        self.out_layer = nn.Linear(cfg.decoder_width, cfg.in_channels, bias=False)

    def forward(self, z, coords, seqlens):
        if self.cfg.decoder_cache_frames > 0:
            return self.forward_cached(z, coords, seqlens)
        return self.out_layer(self.out_norm(self.run(z, coords, seqlens)))    # [N, pt*ph*pw*3]

    def forward_cached(self, z, coords, seqlens):
        """Decode tile by tile; each tile also attends to the K/V of the previous `k` latent frames.

        Official recipe (paper Fig. 6, ml-atoken `_decode`): with a cache of k latent frames, each step
        decodes s = tile - k new latent frames, whose local t starts at k; the cached keys/values are taken
        after qk-norm and before RoPE and re-based to t = 0..k-1; the position table is added to the new
        tokens only. Steps run in sequence, all samples of the batch at once.
        """
        pt = self.cfg.patch_size[0]
        k_lat, tile = self.cfg.decoder_cache_frames // pt, self.cfg.tile_frames // pt
        assert 0 < k_lat < tile, f"decoder_cache_frames must be a multiple of {pt} below tile_frames"
        s = tile - k_lat
        sample = torch.repeat_interleave(torch.arange(len(seqlens), device=z.device),
                                         torch.as_tensor(seqlens, device=z.device))
        t = coords[:, 0] - torch.stack([c[:, 0].min() for c in coords.split(seqlens)])[sample]
        caches = [KVCache(k_lat) for _ in self.blocks]
        out = torch.empty(len(z), self.out_layer.out_features, dtype=z.dtype, device=z.device)
        for step in range(int(t.max()) // s + 1):
            idx = torch.nonzero((t >= step * s) & (t < step * s + s)).squeeze(1)   # sample-major
            if len(idx) == 0:                   # a gap in t across the whole batch: nothing to decode
                continue
            lens = torch.bincount(sample[idx], minlength=len(seqlens)).tolist()
            c = coords[idx].clone()
            c[:, 0] = t[idx] - step * s + (k_lat if step > 0 else 0)
            h = self.input_layer(z[idx]) + self.pos_embedder(c, [n for n in lens if n > 0])
            for cache in caches:
                cache.start_step(c, lens, self.angles)
            for block, cache in zip(self.blocks, caches):
                h = block(h, None, None, cache)
            out[idx] = self.out_layer(self.out_norm(h))
        return out


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
# SigLIP2 -> encoder (paper 3.4: the encoder starts from SigLIP2-So400m/16; the decoder from scratch)

SIGLIP2_DEFAULT = 'ViT-SO400M-16-SigLIP2-256'   # open_clip name (timm tower, 16x16 position table at 256 px)


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
# the tokenizer


def _official_config(arch):
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
        # SigLIP2 logit scale/bias of the official model: hard-coded there, not in the checkpoint
        self.logit_scale, self.logit_bias = 4.8438, -15.5625

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

    def estimate_flops(self, x):
        """Training FLOPs (forward + backward = 3 x forward) of one packed batch x: 6 x parameters x tokens for
        the matmuls, plus attention: 12 x width x sum over (sample, tile) segments of length^2, per layer
        (the PaLM appendix-B count nanoGPT uses, with packed segments instead of one sequence length)."""
        c = self.config
        seg = split_tiles(x.coords, x.seqlens, c.tile_frames // c.patch_size[0])
        s2 = sum(n * n for n in seg.lengths)
        attn = 12 * s2 * (c.encoder_width * c.encoder_depth + c.decoder_width * c.decoder_depth)
        return 6 * self.num_params() * sum(x.seqlens) + attn

    def num_params(self, prefix=''):
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith(prefix))

    @classmethod
    def from_pretrained(cls, checkpoint_path, config_path=None):
        """Load an official checkpoint (flat state dict, .pt or .safetensors) with its official YAML, or a
        tokenizer exported by train.py ({'model_config': dict, 'model': state dict}) with no YAML."""
        import os
        if not os.path.exists(checkpoint_path):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
        if str(checkpoint_path).endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(checkpoint_path)
        else:
            sd = torch.load(checkpoint_path, map_location='cpu', weights_only=True)
        if config_path is not None:
            import yaml
            with open(config_path) as f:
                y = yaml.safe_load(f)
            try:
                arch = y['model']['model_cfg']['arch_cfg']
            except (KeyError, TypeError):
                raise ValueError(f"{config_path}: no model.model_cfg.arch_cfg block (not an official AToken YAML)")
            config = _official_config(arch)
        elif isinstance(sd, dict) and 'model_config' in sd:
            cfg = dict(sd['model_config'])
            cfg['patch_size'] = tuple(cfg['patch_size'])
            config, sd = ModelConfig(**cfg), sd['model']
        else:
            raise ValueError(f"{checkpoint_path}: a flat official state dict needs its YAML (config_path)")
        with torch.device('meta'):
            model = cls(config)
        model.load_checkpoint_state(sd, source=str(checkpoint_path))
        return model.eval()

    def load_checkpoint_state(self, sd, source='state dict'):
        """Strict load that names every missing, unexpected and mis-shaped key."""
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"{source} does not match the model config:\n  missing: {missing}\n"
                             f"  unexpected: {unexpected}\n  shape mismatch: {shapes}")
        self.load_state_dict(sd, strict=True, assign=True)

    def export(self):
        """Tokenizer weights alone, loadable by AToken.from_pretrained(path)."""
        cfg = asdict(self.config)
        return {'model_config': cfg, 'model': {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    # --- the model -----------------------------------------------------------

    def encode(self, x):
        """Packed pixels -> post-LayerNorm encoder features h [N, C_enc] (tiles encoded independently)."""
        return self.encoder(x.feats, x.coords, x.seqlens)

    def embed_features(self, h, seqlens):
        """h [N, C] -> L2-normalised text-aligned embeddings [B, C] (pools over all tiles of a sample)."""
        return F.normalize(self.encoder.head(h, seqlens), dim=-1)

    def bottleneck(self, h, sample=False):
        """h -> (z, mean, logvar, fsq indices or None). z ~ N(mean, exp(logvar)) if sample, else the mean;
        with the quantizer, z is the FSQ code of the mean (straight-through)."""
        mean, logvar = self.proj(h).chunk(2, dim=-1)                            # [N, L] each
        if self.config.use_quantizer:
            z, idx = fsq_quantize(mean, self.config.fsq_groups, self.config.fsq_levels)
            return z, mean, logvar, idx
        if sample:   # diagonal Gaussian posterior in fp32; logvar is not clamped (official)
            std = torch.exp(0.5 * logvar.float())
            z = (mean.float() + std * torch.randn_like(std)).to(mean.dtype)
            return z, mean, logvar, None
        return mean, mean, logvar, None

    def decode(self, z, coords, seqlens):
        """Latents z [N, L] at coords -> pixel patches [N, pt*ph*pw*3] in [-1, 1] (not clamped)."""
        return self.decoder(z, coords, seqlens)

    def forward(self, x, sample=None):
        """Training pass on a Packed batch. Samples the posterior when training (unless sample=False)."""
        sample = self.training if sample is None else sample
        h = self.encode(x)
        z, mean, logvar, idx = self.bottleneck(h, sample)
        rec = self.decode(z, x.coords, x.seqlens)
        return dict(rec=rec, mean=mean, logvar=logvar, indices=idx, h=h,
                    embedding=self.embed_features(h, x.seqlens))

    # --- media in, media out -------------------------------------------------

    def pack(self, media):
        p = next(self.parameters())
        return pack(media, self.config.patch_size).to(p.device, p.dtype)

    @torch.no_grad()
    def reconstruct(self, media):
        """Images (H, W, 3) / videos (T, H, W, 3) in [-1, 1] -> reconstructions (H', W', 3) / (T', H', W', 3):
        H', W' centre-cropped to patch multiples, T' a multiple of pt. 3D assets ({'feats', 'coords'}) ->
        reconstructed voxel features [N, ph*pw*3] (feed them to GaussianDecoder). Deterministic:
        posterior mean, or the FSQ codes when the config has a quantizer."""
        x = self.pack(media)
        z = self.bottleneck(self.encode(x))[0]
        return unpack(self.decode(z, x.coords, x.seqlens), x, self.config.patch_size)

    @torch.no_grad()
    def embed(self, media):
        """Media list -> [B, C] L2-normalised embeddings (the SigLIP2 text space for trained weights)."""
        x = self.pack(media)
        return self.embed_features(self.encode(x), x.seqlens)

    @torch.no_grad()
    def tokenize(self, media):
        """Media list -> per-sample FSQ indices [N_i, G] (int32, raster order t, row, column)."""
        if not self.config.use_quantizer:
            raise ValueError("tokenize needs a quantizer: use a config with use_quantizer=True (So/D)")
        x = self.pack(media)
        return list(self.bottleneck(self.encode(x))[3].split(x.seqlens))

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
        x = Packed(z, torch.cat(coords).to(p.device), [len(i) for i in indices], kinds, grids,
                   self.config.patch_size)
        return unpack(self.decode(z, x.coords, x.seqlens), x, self.config.patch_size)


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


def window_segments(coords, seqlens, window, shift):
    """Group voxels by (sample, shifted window): order [N] and segment lengths, for windowed attention."""
    sample = torch.repeat_interleave(torch.arange(len(seqlens), device=coords.device),
                                     torch.as_tensor(seqlens, device=coords.device))
    w = (coords + shift) // window                                              # [N, 3] window index
    n = int(w.max()) + 1 if len(w) else 1
    key = ((sample * n + w[:, 0]) * n + w[:, 1]) * n + w[:, 2]
    order = torch.argsort(key, stable=True)
    return order, torch.unique_consecutive(key[order], return_counts=True)[1].tolist()


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

    def forward(self, feats, coords, seqlens=None):
        """feats [N, ph*pw*3] (first channels of the reconstruction, in [-1, 1]), coords [N, 3] voxel
        indices (i, j, k), seqlens voxels per sample -> activated Gaussians, 32 per voxel, Gaussian k of
        voxel i at row 32 i + k: xyz [G, 3] world in [-0.5, 0.5]^3, scale [G, 3], rotation [G, 4] (unit
        quaternion, real first), opacity [G, 1], rgb [G, 3] (>= 0), features_dc [G, 1, 3] (raw SH)."""
        seqlens = [len(feats)] if seqlens is None else seqlens
        coords = coords.long()
        h = self.input_layer(feats) + sincos_embedding(coords, self.cfg.gs_width).to(feats.dtype)
        segs = {}
        for i, block in enumerate(self.blocks):
            shift = self.cfg.gs_window // 2 * (i % 2)
            if shift not in segs:
                segs[shift] = window_segments(coords, seqlens, self.cfg.gs_window, shift)
            order, lengths = segs[shift]
            y = block(h[order], None, cu_seqlens(lengths, h.device))
            h = torch.empty_like(y).index_copy_(0, order, y)
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
    def from_pretrained(cls, checkpoint_path, config_path):
        """Load Apple's 3d_decode_gs.pt with its YAML (`model:` block); `lpips_loss.*` keys are dropped."""
        import os
        import yaml
        for p in (checkpoint_path, config_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"not found: {p}")
        with open(config_path) as f:
            y = yaml.safe_load(f)
        m = y.get('model', y) if isinstance(y, dict) else None
        if not isinstance(m, dict) or 'model_channels' not in m:
            raise ValueError(f"{config_path}: no `model:` block with model_channels (not a 3d_decode_gs YAML)")
        cfg = _official_gs_config(m)
        sd = torch.load(checkpoint_path, map_location='cpu', weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith('lpips_loss.')}
        with torch.device('meta'):
            model = cls(cfg)
        AToken.load_checkpoint_state(model, sd, source=str(checkpoint_path))
        return model.eval()


def _official_gs_config(m):
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
