"""
Evaluate an AToken checkpoint: the paper's metrics for images, videos and 3D, with reports to look at.

Metrics (each usable on its own, definitions in the docstrings):
  psnr, ssim (Wang et al. 2004; scikit-image conventions), LPIPS (Zhang et al. 2018), frechet_distance
  (rFID / rFVD from Inception / R3D features; Heusel et al. 2017), multiview 3D PSNR/SSIM/LPIPS of
  Gaussian-splat renders, zero-shot classification accuracy (CLIP-style prompt ensembles through the
  SigLIP2 text tower, Radford et al. 2021), text<->media recall@1/5/10, FSQ codebook usage and perplexity.

Command line (EvalConfig fields as --key=value; python eval.py --help lists them):
  python eval.py --checkpoint=out/ckpt.pt                              # ours, built-in held-out data
  python eval.py --checkpoint=atoken-sod --latent=fsq --images=photos/  # Apple's weights by name
  python eval.py --checkpoint=atoken-sod.pt --config=atoken-sod.yaml --latent=fsq  # or file + official YAML
  python eval.py --checkpoint=out/ckpt.pt --videos=clips/ --decoder_cache_frames=4
  python eval.py --checkpoint=atoken-soc --assets=prepared/ --gs_checkpoint=3d_decode_gs
  python eval.py --checkpoint=tiny.pt --random_nets --n_images=4 --res=32,64  # offline smoke test
Writes out_dir/report.json, report.md and side-by-side grids (original | reconstruction | error): PNG for
images and 3D views, MP4 for videos. Unreadable inputs are skipped and listed in the report.
train.py calls evaluate(model, EvalConfig(...)) for held-out evaluation of an in-memory model.
"""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F

import data
import losses
import render3d
from model import PRETRAINED, AToken, GaussianDecoder, ModelConfig, prepare, unpack

# -----------------------------------------------------------------------------
# pixel metrics. Inputs: (..., H, W, 3) tensors (or numpy arrays) in [-1, 1], the repo's convention, or in
# value_range; uint8 is read as [0, 255]. Both are clamped and mapped to [0, 1] (what a saved image holds),
# so the conventions are scikit-image's with data_range=1. Outputs: one value per image, shape (...).


def to_unit(x, value_range=(-1, 1)):
    """value_range -> [0, 1], clamped, float64 for the metric arithmetic; uint8 input is read as [0, 255]
    (a decoded image file)."""
    x = x if isinstance(x, torch.Tensor) else torch.tensor(x)                  # a copy: numpy may be read-only
    if x.dtype == torch.uint8:
        return x.double() / 255
    lo, hi = value_range
    return ((x.double() - lo) / (hi - lo)).clamp(0, 1)


def psnr(x, y, value_range=(-1, 1)):
    """PSNR in dB on the [0, 1] range: 10 log10(1 / MSE), the MSE over H, W and the 3 channels of each
    image (skimage.metrics.peak_signal_noise_ratio with data_range=1). Identical images give inf."""
    mse = (to_unit(x, value_range) - to_unit(y, value_range)).pow(2).mean((-3, -2, -1))
    return 10 * torch.log10(1.0 / mse)


def bicubic_baseline(x, floats_per_pixel):
    """The non-learned codec at the tokenizer's budget: bicubic down- then up-sampling that keeps
    `floats_per_pixel` floats per pixel (3 channels at (H/s) x (W/s): s = sqrt(3 / floats_per_pixel)).
    x (..., H, W, 3) in [-1, 1] -> the reconstruction, same shape, clamped to [-1, 1]. Downsampling is
    antialiased (PIL-style), upsampling plain bicubic (align_corners=False)."""
    s = math.sqrt(3.0 / floats_per_pixel)
    H, W = x.shape[-3:-1]
    small = (max(1, round(H / s)), max(1, round(W / s)))
    y = x.reshape(-1, H, W, 3).permute(0, 3, 1, 2).float()                       # [B, 3, H, W]
    y = F.interpolate(y, size=small, mode='bicubic', align_corners=False, antialias=True)
    y = F.interpolate(y, size=(H, W), mode='bicubic', align_corners=False)
    return y.permute(0, 2, 3, 1).reshape(x.shape).clamp(-1, 1)


def latent_floats_per_pixel(kind, config):
    """Latent floats per pixel of one image / one video frame: latent_channels per (pt x) ph x pw patch.
    An image fills one frame of a temporal patch (the others are padding), so it has pt times the budget
    of a video frame: 48 floats per 16x16 patch = a bicubic factor of 4 per side for images, 8 for video."""
    pt, ph, pw = config.patch_size
    return config.latent_channels / (ph * pw * (pt if kind == 'video' else 1))


def gaussian_window(size=11, sigma=1.5):
    """Normalised 2D Gaussian [size, size] (the SSIM window of Wang et al. 2004)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x, y, size=11, sigma=1.5, k1=0.01, k2=0.03, value_range=(-1, 1)):
    """SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) on the [0, 1] range (L = 1): Gaussian-weighted local
    means, variances and covariance (window 11, sigma 1.5, population statistics), C1 = (K1 L)^2,
    C2 = (K2 L)^2, the SSIM map over fully overlapping windows only ('valid', as the reference MATLAB
    code and scikit-image's cropped mean), averaged over the map and then over the 3 channels. Equal to
    skimage.metrics.structural_similarity(data_range=1, channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False) (its truncate=3.5 makes the same 11-tap window).
    Images must be at least `size` pixels on each side."""
    a, b = to_unit(x, value_range), to_unit(y, value_range)
    lead, (H, W) = a.shape[:-3], a.shape[-3:-1]
    if min(H, W) < size:
        raise ValueError(f"ssim needs images of at least {size}x{size}, got {H}x{W}")
    a = a.reshape(-1, H, W, 3).permute(0, 3, 1, 2).reshape(-1, 1, H, W)        # [B*3, 1, H, W]
    b = b.reshape(-1, H, W, 3).permute(0, 3, 1, 2).reshape(-1, 1, H, W)
    w = gaussian_window(size, sigma).to(a.device)[None, None]                  # [1, 1, s, s]
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a ** 2
    var_b = F.conv2d(b * b, w) - mu_b ** 2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean((1, 2, 3)).reshape(*lead, 3).mean(-1)                        # (...)


class LPIPSMetric:
    """LPIPS distance (Zhang et al. 2018; AlexNet backbone, the metric's standard) on (..., H, W, 3) in
    [-1, 1]; one value per image. Needs torchvision's ImageNet AlexNet weights (downloaded or cached, or
    a local file); random=True builds a random backbone for tests (values then not meaningful)."""
    def __init__(self, weights='', random=False, device='cpu'):
        import lpips
        self.net = lpips.LPIPS(net='alex', pnet_rand=True, verbose=False)
        if not random:
            self._load_alexnet(weights)
        self.net = self.net.eval().requires_grad_(False).to(device)

    def _load_alexnet(self, weights):
        import torchvision
        try:
            sd = (torch.load(weights, map_location='cpu', weights_only=True) if weights else
                  torchvision.models.alexnet(weights='IMAGENET1K_V1').state_dict())
        except Exception as e:
            raise RuntimeError(f"LPIPS needs ImageNet AlexNet weights ({type(e).__name__}: {e}): give "
                               f"--lpips_weights=<alexnet-owt-7be5be79.pth> or put it in $TORCH_HOME/hub/"
                               f"checkpoints, or use --random_nets for a smoke test") from e
        with torch.no_grad():
            for s in (self.net.net.slice1, self.net.net.slice2, self.net.net.slice3, self.net.net.slice4,
                      self.net.net.slice5):
                for i, layer in s.named_children():
                    if isinstance(layer, torch.nn.Conv2d):
                        layer.weight.copy_(sd[f'features.{i}.weight'])
                        layer.bias.copy_(sd[f'features.{i}.bias'])

    @torch.no_grad()
    def __call__(self, x, y):
        lead = x.shape[:-3]
        dev = next(self.net.parameters()).device
        a = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float().clamp(-1, 1).to(dev)
        b = y.reshape(-1, *y.shape[-3:]).permute(0, 3, 1, 2).float().clamp(-1, 1).to(dev)
        return self.net(a, b).reshape(lead).cpu().double()


# -----------------------------------------------------------------------------
# distribution metrics


def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (Heusel et al. 2017):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), sample covariances (N - 1), float64.

    tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues) of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD). With centred
    features A [Na, D], B [Nb, D] those eigenvalues are the squared singular values of
    A B^T / sqrt((Na-1)(Nb-1)), so with fewer samples than dimensions the trace is that matrix's nuclear norm
    (no D x D work: 2048-d Inception features of a few hundred images)."""
    a, b = feats_a.double(), feats_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs two [N >= 2, D] sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    A, B = a - mu_a, b - mu_b                                                   # centred [Na, D], [Nb, D]
    na, nb = len(a) - 1, len(b) - 1
    tr_a, tr_b = A.pow(2).sum() / na, B.pow(2).sum() / nb                       # tr(S_a), tr(S_b)
    if min(len(a), len(b)) <= a.shape[1]:
        tr_sqrt = torch.linalg.svdvals(A @ B.t()).sum() / math.sqrt(na * nb)
    else:
        s_a, s_b = A.t() @ A / na, B.t() @ B / nb                               # [D, D]
        ev, U = torch.linalg.eigh(s_a)
        root_a = U @ torch.diag(ev.clamp_min(0).sqrt()) @ U.t()                 # S_a^(1/2)
        m = root_a @ s_b @ root_a
        tr_sqrt = torch.linalg.eigvalsh((m + m.t()) / 2).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + tr_a + tr_b - 2 * tr_sqrt).item()


class FeatureExtractor:
    """Pool features for rFID / rFVD. 'inception': torchvision Inception-v3 (ImageNet) 2048-d pool
    features of 299x299 frames (note: the TF-FID Inception weights differ slightly, so absolute rFID is
    comparable between our runs, not to papers); 'r3d': torchvision R3D-18 (Kinetics-400) 512-d features
    of 16x112x112 clips, an I3D-style video network for rFVD. Or pass any callable as `fn`.
    random=True: random weights (smoke tests only)."""
    def __init__(self, kind='inception', weights='', random=False, device='cpu'):
        import torchvision
        self.kind, self.device = kind, device
        if kind == 'inception':
            net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        elif kind == 'r3d':
            net = torchvision.models.video.r3d_18(weights=None)
        else:
            raise ValueError(f"unknown feature extractor {kind!r} (inception | r3d)")
        if not random:
            try:
                sd = (torch.load(weights, map_location='cpu', weights_only=True) if weights else
                      (torchvision.models.Inception_V3_Weights.IMAGENET1K_V1 if kind == 'inception' else
                       torchvision.models.video.R3D_18_Weights.KINETICS400_V1).get_state_dict(progress=False))
                net.load_state_dict(sd)
            except Exception as e:
                raise RuntimeError(f"{kind} weights for rFID/rFVD unavailable ({type(e).__name__}: {e}): give "
                                   f"--fid_weights=<torchvision state dict> or run once online") from e
        net.fc = torch.nn.Identity()
        self.net = net.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def __call__(self, media):
        """media: images [B, H, W, 3] ('inception') or videos [B, T, H, W, 3] ('r3d') in [-1, 1] -> [B, D]."""
        x = media.float().clamp(-1, 1).to(self.device)
        if self.kind == 'inception':
            # 299x299 in [-1, 1]: the (TF-ported) ImageNet weights expect (x - 0.5) / 0.5, which is why
            # torchvision sets transform_input=True for them; our media are in that range already
            x = F.interpolate(x.permute(0, 3, 1, 2), size=(299, 299), mode='bilinear', align_corners=False)
            return self.net(x).cpu()
        B, T = x.shape[:2]                            # Kinetics normalisation at 112x112
        x = F.interpolate(x.flatten(0, 1).permute(0, 3, 1, 2), size=(112, 112), mode='bilinear',
                          align_corners=False).reshape(B, T, 3, 112, 112).permute(0, 2, 1, 3, 4)
        mean = torch.tensor([0.43216, 0.394666, 0.37645], device=x.device)[:, None, None, None]
        std = torch.tensor([0.22803, 0.22145, 0.216989], device=x.device)[:, None, None, None]
        return self.net(((x + 1) / 2 - mean) / std).cpu()


# -----------------------------------------------------------------------------
# understanding metrics


def class_embeddings(encode_text, class_names, templates):
    """Zero-shot classifier weights (CLIP prompt ensembling): for each class, the L2-normalised mean of the
    L2-normalised text embeddings of every template filled with the class name. -> [K, D]."""
    out = []
    for name in class_names:
        e = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out)


def zero_shot_accuracy(media_emb, labels, class_emb, k=1):
    """Top-k accuracy of classifying media embeddings [B, D] against class embeddings [K, D] by cosine
    similarity; labels [B] class indices."""
    sim = F.normalize(media_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).t()   # [B, K]
    topk = sim.topk(min(k, sim.shape[1]), dim=1).indices                      # [B, k]
    return (topk == torch.as_tensor(labels)[:, None]).any(1).double().mean().item()


def recall_at_k(sim, ks=(1, 5, 10)):
    """Retrieval recall@k for a square similarity matrix sim [Q, G] whose match for query i is item i
    (one caption per media item). Returns {k: fraction of queries whose match ranks in the top k}.
    Text-to-media: sim = text_emb @ media_emb.T; media-to-text: its transpose."""
    target = sim.diagonal()[:, None]
    rank = (sim > target).sum(1)                                                # 0 = ranked first
    return {k: (rank < k).double().mean().item() for k in ks}


def codebook_stats(indices, codebook_size=4096):
    """FSQ indices [N, G] -> per group: usage (fraction of the codebook used at least once) and perplexity
    exp(H), H the entropy of the empirical code distribution (perplexity = codebook_size for uniform use)."""
    idx = torch.as_tensor(indices).long()
    usage, perplexity = [], []
    for g in range(idx.shape[1]):
        counts = torch.bincount(idx[:, g], minlength=codebook_size).double()
        p = counts / counts.sum()
        nz = p[p > 0]
        usage.append((counts > 0).double().mean().item())
        perplexity.append(math.exp(-(nz * nz.log()).sum().item()))
    return {'usage': usage, 'perplexity': perplexity}


# -----------------------------------------------------------------------------
# reports: side-by-side grids (original | reconstruction | error), JSON and Markdown


def to_uint8(x):
    """[-1, 1] float -> uint8 as the official savers do: ((x + 1) / 2 * 255).clip(0, 255), truncated."""
    return ((x.detach().float().cpu() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)


def side_by_side(orig, rec):
    """(..., H, W, 3) pair -> (..., H, 3W + 8, 3) uint8: original | reconstruction | 4x absolute error,
    separated by 4-pixel white bars."""
    err = ((rec.float() - orig.float()).abs() * 4 - 1).clamp(-1, 1)            # 0 error = black
    bar = torch.full((*orig.shape[:-2], 4, 3), 255, dtype=torch.uint8)
    return torch.cat([to_uint8(orig), bar, to_uint8(rec), bar, to_uint8(err)], dim=-2)


def save_image_grid(pairs, path, max_width=1536):
    """pairs: list of (orig, rec) images (H, W, 3) in [-1, 1] -> one PNG with a row per pair."""
    from PIL import Image
    rows = [side_by_side(o, r) for o, r in pairs]
    W = max(r.shape[1] for r in rows)
    canvas = torch.full((sum(r.shape[0] + 4 for r in rows), W, 3), 255, dtype=torch.uint8)
    y = 0
    for r in rows:
        canvas[y:y + r.shape[0], :r.shape[1]] = r
        y += r.shape[0] + 4
    img = Image.fromarray(canvas.numpy())
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.BILINEAR)
    img.save(path)


def save_video_grid(orig, rec, path, fps=8):
    """A video pair (T, H, W, 3) in [-1, 1] -> MP4 (PyAV, H.264 or MPEG-4) of side-by-side frames."""
    import av
    frames = side_by_side(orig, rec)                                            # (T, H, 3W+8, 3)
    H, W = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2   # even sizes
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


def markdown_table(metrics):
    """{section: {metric: value}} -> a Markdown table (one row per section)."""
    cols = list(dict.fromkeys(k for m in metrics.values() for k in m))        # first-seen order
    lines = ['| | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
    for name, m in metrics.items():
        cells = [f"{m[c]:.4g}" if isinstance(m.get(c), (int, float)) else str(m.get(c, '')) for c in cols]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# config: an EvalConfig dataclass, overridden by --key=value flags


@dataclass
class EvalConfig:
    # what to load
    checkpoint: str = ''        # ours (training checkpoint or model.export()), an official state dict, or a
                                # released name (atoken-sod, atoken-soc, ...: downloaded into $ATOKEN_CACHE)
    config: str = ''            # the official YAML of an official checkpoint (model.model_cfg.arch_cfg)
    gs_checkpoint: str = ''     # 3d_decode_gs (name) or its .pt: renders 3D reconstructions (else the training
    gs_config: str = ''         # checkpoint's 'gs_decoder', else voxel-feature PSNR only) + its YAML
    # what to evaluate: folders / manifests of real files; when none is given, the built-in held-out sets
    images: str = ''
    videos: str = ''
    assets: str = ''            # 3D assets prepared with `python render3d.py prepare`
    n_images: int = 32          # built-in set sizes; 0 leaves a modality out (folders: every file)
    n_videos: int = 8
    n_3d: int = 8
    split: str = 'val'          # built-in split; 'val' shares no sample with training
    seed: int = 0
    res: tuple = (256, 256)     # longer side drawn in [min, max] (data.sample_resolution); equal = fixed
    frames: int = 32            # video clip length cap (built-in lengths are drawn in [pt, frames])
    views_3d: int = 8           # built-in 3D: views per object, view size, voxel grid (0 = the Gaussian
    view_res_3d: int = 128      # decoder's gs_resolution, 64 official)
    grid_3d: int = 0
    # how to reconstruct
    latent: str = 'mean'        # 'mean' (posterior mean) | 'fsq' (FSQ codes; needs a quantizer)
    decoder_cache_frames: int = -1   # video decoder KV cache in frames; -1 keeps the checkpoint's (0 = off)
    device: str = 'auto'        # auto = cuda -> mps -> cpu
    dtype: str = 'float32'      # tokenizer dtype: float32 | bfloat16 | float16 (metrics are float64)
    batch_tokens: int = 8192    # tokens per forward pass (a longer sample goes alone)
    # metric networks
    random_nets: bool = False   # random LPIPS / Inception / R3D / text tower: offline smoke tests only
    lpips_weights: str = ''     # local torchvision AlexNet state dict ('' = torchvision download/cache)
    fid_weights: str = ''       # local torchvision Inception-v3 state dict
    fvd_weights: str = ''       # local torchvision R3D-18 state dict
    siglip_weights: str = ''    # local open_clip SigLIP2 checkpoint for the text tower
    fid: bool = True            # rFID / rFVD (Inception / R3D features of every sample: slow on a CPU)
    understanding: bool = True  # zero-shot accuracy and text<->media recall through the text tower
    # outputs
    out_dir: str = 'out/eval'
    max_grids: int = 8          # samples per modality shown in side-by-side grids


def _convert(key, value, default):
    """A flag's text -> the type of the field's default."""
    try:
        if isinstance(default, bool):
            if value.lower() not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
                raise ValueError(value)
            return value.lower() in ('1', 'true', 'yes', 'on')
        if isinstance(default, tuple):
            parts = tuple(type(default[0])(v) for v in value.split(','))
            if len(parts) != len(default):
                raise ValueError(value)
            return parts
        return type(default)(value)
    except ValueError:
        raise ValueError(f"--{key}={value}: expected {type(default).__name__} like {default!r}") from None


def parse_overrides(cfg, argv):
    """Apply `--key=value` flags to a dataclass instance (returned). Values take the type of the field's
    default (bool: true/false/1/0, a bare --flag is true; tuple: comma-separated). Unknown keys and
    unreadable values raise a ValueError naming them."""
    known = {f.name for f in fields(cfg)}
    for arg in argv:
        key, sep, value = arg[2:].partition('=') if arg.startswith('--') else (arg, '', '')
        if key not in known:
            raise ValueError(f"unknown option {arg!r}: expected --key=value with key in {sorted(known)}")
        if not sep and not isinstance(getattr(cfg, key), bool):
            raise ValueError(f"option --{key} needs a value: --{key}=...")
        setattr(cfg, key, _convert(key, value, getattr(cfg, key)) if sep else True)
    return cfg


# -----------------------------------------------------------------------------
# loading: tokenizer (ours or official), Gaussian decoder, text tower


def pick_device(name):
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def _released(name):
    """True for the name of one of Apple's released checkpoints (model.PRETRAINED) that is not a local path:
    AToken / GaussianDecoder.from_pretrained download it (once, into $ATOKEN_CACHE)."""
    return bool(name) and name in PRETRAINED and not os.path.exists(name)


def load_tokenizer(cfg):
    """-> (AToken in eval mode on CPU, info dict). Official: a released name, or checkpoint + YAML
    (AToken.from_pretrained). Ours:
    a dict with 'model_config' and 'model' (model.export(), or a training checkpoint that may also hold
    'ema' (preferred), 'loss_config' and 'gs_decoder'). Missing files: FileNotFoundError; weights that do
    not fit the config: the ValueError of AToken.load_checkpoint_state, naming the keys."""
    named = _released(cfg.checkpoint)
    for path in (cfg.config,) if named else (cfg.checkpoint, cfg.config):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"not found: {path}")
    if not cfg.checkpoint:
        raise ValueError("give --checkpoint=<file> (ours, or an official one with --config=<yaml>) or a released "
                         f"name ({', '.join(n for n, e in PRETRAINED.items() if e['kind'] == 'tokenizer')})")
    if cfg.config or named:
        return (AToken.from_pretrained(cfg.checkpoint, cfg.config or None),
                dict(kind='official', weights='model', loss_config=None, gs_decoder=None))
    if cfg.checkpoint.endswith('.safetensors'):
        raise ValueError(f"{cfg.checkpoint}: an official checkpoint needs its YAML: --config=<yaml>")
    ck = torch.load(cfg.checkpoint, map_location='cpu', weights_only=True)
    if not isinstance(ck, dict) or 'model_config' not in ck or 'model' not in ck:
        raise ValueError(f"{cfg.checkpoint}: not one of ours (no 'model_config' and 'model'); an official "
                         f"checkpoint needs --config=<its yaml>")
    mc = dict(ck['model_config'], patch_size=tuple(ck['model_config']['patch_size']))
    try:
        config = ModelConfig(**mc)
    except TypeError as e:
        raise ValueError(f"{cfg.checkpoint}: model_config does not fit ModelConfig ({e})") from e
    weights = 'ema' if ck.get('ema') is not None else 'model'
    with torch.device('meta'):
        tok = AToken(config)
    tok.load_checkpoint_state(ck[weights], source=f"{cfg.checkpoint} ['{weights}']")
    info = dict(kind='training' if len(set(ck) - {'model', 'model_config'}) else 'export', weights=weights,
                loss_config=ck.get('loss_config'), gs_decoder=ck.get('gs_decoder'), text_tower=ck.get('text_tower'))
    return tok.eval(), info


def load_gs_decoder(cfg, model_config, state=None):
    """Official GaussianDecoder (gs_checkpoint + gs_config), or ours from a training checkpoint's 'gs_decoder'
    state dict (its gs_* sizes are model_config's), or None."""
    if cfg.gs_checkpoint or cfg.gs_config:
        if not (cfg.gs_checkpoint and (cfg.gs_config or _released(cfg.gs_checkpoint))):
            raise ValueError("the official Gaussian decoder needs both --gs_checkpoint and --gs_config "
                             "(or --gs_checkpoint=3d_decode_gs, the released name)")
        return GaussianDecoder.from_pretrained(cfg.gs_checkpoint, cfg.gs_config or None)
    if state is None:
        return None
    with torch.device('meta'):
        gs = GaussianDecoder(model_config)
    AToken.load_checkpoint_state(gs, state, source=f"{cfg.checkpoint} ['gs_decoder']")
    return gs.eval()


class TextTower:
    """The frozen SigLIP2 text tower (the tokenizer's embeddings live in its space): .encode_text(list of K
    strings) -> [K, D] L2-normalised, on the CPU. Built with losses.load_siglip, as FrozenNets does, but
    without FrozenNets' VGG16, which evaluation does not need."""
    def __init__(self, loss_config, embed_dim, device='cpu'):
        self.trained = False                    # True: a text tower trained with the tokenizer (train_text)
        self.siglip, self.tokenizer = losses.load_siglip(loss_config, embed_dim)
        self.siglip = self.siglip.eval().requires_grad_(False).to(device)
        self.device = device

    @torch.no_grad()
    def encode_text(self, texts):
        out = [self.siglip.encode_text(self.tokenizer(texts[i:i + 256]).to(self.device), normalize=True)
               for i in range(0, len(texts), 256)]
        return torch.cat(out).float().cpu()


def load_text_tower(cfg, loss_config, embed_dim, device, notes, text_state=None):
    """-> TextTower (warnings appended to notes). --random_nets: a tiny random SigLIP of width embed_dim;
    else the training checkpoint's LossConfig (siglip_model, siglip_weights), else the default SigLIP2.
    text_state: a text tower trained with the tokenizer (LossConfig.train_text; the export's 'text_tower'),
    loaded into the LossConfig's SigLIP model."""
    if text_state:
        lc = losses.LossConfig(**(loss_config or {}))
        tower = TextTower(lc, embed_dim, device)
        try:
            tower.siglip.text.load_state_dict(text_state)
        except RuntimeError as e:
            raise ValueError(f"{cfg.checkpoint}: 'text_tower' does not fit the text tower of SigLIP "
                             f"'{lc.siglip_model}' ({str(e).splitlines()[0]})") from e
        notes.append(f"text tower: trained with the tokenizer (train_text, from {lc.siglip_model!r})")
        tower.trained = True
        return tower
    if cfg.random_nets:
        lc = losses.LossConfig(siglip_model='tiny', random_frozen=True)
    else:
        try:
            lc = losses.LossConfig(**(loss_config or {}))
        except TypeError as e:
            raise ValueError(f"the checkpoint's loss_config does not fit LossConfig ({e})") from e
        lc.siglip_weights = cfg.siglip_weights or lc.siglip_weights
        if lc.random_frozen:
            notes.append("the checkpoint's LossConfig has random_frozen=True: the text tower is random, "
                         "understanding numbers are not meaningful")
    return TextTower(lc, embed_dim, device)


# -----------------------------------------------------------------------------
# evaluation: held-out data -> reconstructions, embeddings and FSQ indices -> metrics and grids

# Zero-shot prompts in the style of the built-in captions (data._caption: "a red circle on a striped
# background", "a photo of a solid red circle", "a video of a red circle spinning"; render3d's 3D captions:
# "a red striped cube"). '{}' receives the class name with its article ("an orange star"); each class is
# the mean of its prompts' text embeddings (CLIP prompt ensembling, class_embeddings).
TEMPLATES = {'image': ['{}', 'a photo of {}', '{} on a background', '{} with other shapes'],
             'video': ['a video of {}', '{} moving', '{}'],
             '3d': ['{}', 'a 3D model of {}', 'a render of {}']}
UNDERSTANDING = ('zs_', 't2m_', 'm2t_')     # key prefixes of the understanding metrics


def with_article(name):
    return ('an ' if name[:1].lower() in tuple('aeiou') else 'a ') + name


def check_options(model, cfg, gs=None):
    """Errors for options that do not fit the model, raised before any data or metric net is built."""
    if cfg.latent not in ('mean', 'fsq'):
        raise ValueError(f"--latent={cfg.latent}: expected 'mean' or 'fsq'")
    if cfg.latent == 'fsq' and not model.config.use_quantizer:
        raise ValueError("--latent=fsq needs a checkpoint with an FSQ quantizer (use_quantizer=True, the So/D "
                         "models); this one is continuous: use --latent=mean")
    pt, tile = model.config.patch_size[0], model.config.tile_frames
    k = cfg.decoder_cache_frames
    if k not in (-1, 0) and not (k % pt == 0 and 0 < k < tile):
        raise ValueError(f"--decoder_cache_frames={k}: -1 (keep), 0 (off) or a multiple of {pt} below {tile}")
    if gs is not None and tuple(gs.cfg.patch_size[1:]) != tuple(model.config.patch_size[1:]):
        raise ValueError(f"Gaussian decoder takes {gs.cfg.patch_size[1:]} patches, the tokenizer makes "
                         f"{model.config.patch_size[1:]}")


def build_datasets(cfg, patch_size, grid):
    """{kind: dataset}: the folders given, else the built-in held-out sets whose n_* > 0."""
    if cfg.images or cfg.videos or cfg.assets:
        out = {}
        if cfg.images:
            out['image'] = data.ImageFolder(cfg.images, cfg.res, patch_size, cfg.seed)
        if cfg.videos:
            out['video'] = data.VideoFolder(cfg.videos, 'recon', cfg.res, patch_size, cfg.frames, cfg.seed)
        if cfg.assets:
            out['3d'] = data.AssetFolder(cfg.assets, patch_size)
        return out
    out = {}
    if cfg.n_images:
        out['image'] = data.SyntheticImages(cfg.n_images, cfg.split, cfg.seed, cfg.res, patch_size)
    if cfg.n_videos:
        out['video'] = data.SyntheticVideos(cfg.n_videos, cfg.split, cfg.seed, cfg.res, patch_size, cfg.frames)
    if cfg.n_3d:
        out['3d'] = data.Synthetic3D(cfg.n_3d, cfg.split, cfg.seed, cfg.views_3d, cfg.view_res_3d, grid, patch_size)
    return out


def token_batches(ds, budget):
    """Indices in order, grouped into batches of at most `budget` tokens (a longer sample goes alone)."""
    batch, used = [], 0
    for i in range(len(ds)):
        n = ds.num_tokens(i)
        if batch and used + n > budget:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += n
    if batch:
        yield batch


@torch.no_grad()
def run_batch(model, media, latent):
    """One encoder pass serves reconstruction and understanding -> (reconstructions as model.reconstruct
    returns them, embeddings [B, D], per-sample FSQ indices [N_i, G] or None)."""
    x = model.pack(media)
    h = model.encode(x)
    z, mean, _, idx = model.bottleneck(h)                   # z = FSQ codes with a quantizer, else the mean
    rec = unpack(model.decode(z if latent == 'fsq' else mean, x), x, model.config.patch_size)
    emb = model.embed_features(h, x).float().cpu()
    idx = list(idx.cpu().split(x.seqlens)) if idx is not None else [None] * len(media)
    return [r.float().cpu() for r in rec], emb, idx


@torch.no_grad()
def render_views(gs, feats, coords, cameras):
    """Reconstructed voxel features [N, ph*pw*3] -> Gaussians -> a render per camera [V, H, W, 3] in [-1, 1]
    (on black, as the ground-truth views)."""
    coords = torch.as_tensor(coords).long()
    if len(coords) and int(coords.max()) >= gs.cfg.gs_resolution:
        raise ValueError(f"voxel coords reach {int(coords.max())}: the Gaussian decoder's grid is "
                         f"{gs.cfg.gs_resolution}^3 (set --grid_3d / prepare assets to match)")
    p = next(gs.parameters())
    g = gs(feats.to(p.device, p.dtype), coords.to(p.device))
    return render3d.render_samples(g, [len(g['xyz'])], [cameras])[0].float().cpu() * 2 - 1


def pixel_scores(target, rec, lpips_fn):
    """target, rec (..., H, W, 3) in [-1, 1], frames or views on the leading axes -> PSNR, SSIM, LPIPS
    averaged over them; nan where the image is too small (SSIM: 11 px, LPIPS' AlexNet: 32 px); no LPIPS
    without lpips_fn."""
    side = min(target.shape[-3:-1])
    out = dict(psnr=psnr(rec, target).mean().item(), ssim=ssim(rec, target).mean().item() if side >= 11 else math.nan)
    if lpips_fn is not None:
        out['lpips'] = lpips_fn(rec, target).mean().item() if side >= 32 else math.nan
    return out


def score_sample(s, rec, lpips_fn, gs, patch_size, budget=None):
    """One Sample and its reconstruction -> (scores, target, reconstruction to show; None, None for 3D
    without a Gaussian decoder). Images and videos are compared with the centre-cropped, frame-cut input
    (model.prepare), and with budget ({kind: latent floats per pixel}) also scored for the bicubic codec
    that keeps as many floats (bicubic_psnr); 3D: PSNR of the reconstructed voxel features, and the renders vs the true views."""
    if s.kind != '3d':
        target = prepare(torch.as_tensor(s.media), patch_size)[0]
        target = target[0] if s.kind == 'image' else target  # (H', W', 3) | (T', H', W', 3)
        scores = pixel_scores(target, rec, lpips_fn)
        if budget is not None:                                # the bicubic codec at the same float budget
            scores['bicubic_psnr'] = psnr(bicubic_baseline(target, budget[s.kind]), target).mean().item()
        return scores, target, rec
    pw = patch_size[2]
    feats = torch.as_tensor(s.media['feats']).float()
    scores = dict(feat_psnr=psnr(rec.reshape(-1, pw, 3), feats.reshape(-1, pw, 3)).item())  # (N*ph, pw, 3)
    if gs is None:
        return scores, None, None
    views = render_views(gs, rec, s.media['coords'], s.media['cameras'])
    scores.update(pixel_scores(s.media['views'], views, lpips_fn))
    return scores, s.media['views'], views


def understanding_metrics(emb, labels, captions, class_names, templates, text):
    """Zero-shot top-1/top-5 accuracy (with chance levels) over the labelled samples, and text-to-media /
    media-to-text recall@1/5/10 over the captioned ones. emb [B, D] -> (metrics, notes)."""
    width = text.encode_text(['a']).shape[1]
    if width != emb.shape[1]:
        return {}, [f"understanding metrics skipped: tokenizer embedding width {emb.shape[1]} != text tower "
                    f"width {width}"]
    out, notes = {}, []
    labels = torch.as_tensor(labels)
    keep = labels >= 0
    if len(class_names) >= 2 and keep.any():
        names = [with_article(c) for c in class_names]
        prompts = [t.format(n) for n in names for t in templates]
        table = dict(zip(prompts, text.encode_text(prompts)))                # one text-tower pass
        ce = class_embeddings(lambda ts: torch.stack([table[t] for t in ts]), names, templates)   # [K, D]
        K = len(class_names)
        out.update(zs_top1=zero_shot_accuracy(emb[keep], labels[keep], ce, 1),
                   zs_top5=zero_shot_accuracy(emb[keep], labels[keep], ce, 5),
                   zs_chance_top1=1 / K, zs_chance_top5=min(5, K) / K)
    else:
        notes.append('zero-shot skipped: no class labels (folders need a manifest with labels)')
    sel = [i for i, c in enumerate(captions) if c]
    if len(sel) >= 2:
        sim = text.encode_text([captions[i] for i in sel]) @ emb[sel].t()     # [Q, Q] text x media
        out.update({f't2m_R@{k}': v for k, v in recall_at_k(sim).items()})
        out.update({f'm2t_R@{k}': v for k, v in recall_at_k(sim.t()).items()})
    else:
        notes.append(f'retrieval skipped: {len(sel)} captioned samples (needs >= 2)')
    return out, notes


def collect(model, ds, cfg, lpips_fn, features, gs):
    """Run a dataset through the tokenizer -> dict of per-sample scores, labels, captions, embeddings,
    FSQ indices, rFID/rFVD features (real, reconstructed), grid pairs and skipped files."""
    c = dict(scores=[], labels=[], captions=[], emb=[], indices=[], real=[], fake=[], pairs=[], skipped=[])
    for batch in token_batches(ds, cfg.batch_tokens):
        items = [ds[i] for i in batch]
        c['skipped'] += [(it.source, it.reason) for it in items if isinstance(it, data.Skipped)]
        good = [it for it in items if isinstance(it, data.Sample)]
        if not good:
            continue
        recs, emb, idx = run_batch(model, [s.media for s in good], cfg.latent)
        for s, rec, e, ix in zip(good, recs, emb, idx):
            budget = {k: latent_floats_per_pixel(k, model.config) for k in ('image', 'video')}
            scores, target, shown = score_sample(s, rec, lpips_fn, gs, model.config.patch_size, budget)
            c['scores'].append(scores), c['labels'].append(s.label), c['captions'].append(s.caption)
            c['emb'].append(e)
            if ix is not None:
                c['indices'].append(ix)
            if features is not None:
                f = features(torch.stack([target, shown]))                   # one pass for the pair
                c['real'].append(f[:1]), c['fake'].append(f[1:])
            if shown is not None and len(c['pairs']) < cfg.max_grids:
                c['pairs'].append((target, shown))
    return c


def summarise(kind, c, model, ds, text):
    """Collected outputs -> (metrics, codebook stats or None, notes)."""
    metrics, notes = {}, []
    for key in c['scores'][0]:
        vals = torch.tensor([s[key] for s in c['scores']], dtype=torch.float64)
        metrics[key] = vals.nanmean().item()                   # inf (a perfect PSNR) stays inf
        if vals.isnan().any():
            notes.append(f"{kind} {key}: {int(vals.isnan().sum())} samples too small for it (left out)")
    if len(c['real']) >= 2:
        metrics['rfid' if kind == 'image' else 'rfvd'] = frechet_distance(torch.cat(c['real']), torch.cat(c['fake']))
    codebook = None
    if c['indices']:
        dims = model.config.latent_channels // model.config.fsq_groups
        codebook = codebook_stats(torch.cat(c['indices']), model.config.fsq_levels ** dims)
        metrics['code_usage'] = sum(codebook['usage']) / len(codebook['usage'])
        metrics['code_ppl'] = sum(codebook['perplexity']) / len(codebook['perplexity'])
    if text is not None:
        und, more = understanding_metrics(torch.stack(c['emb']), c['labels'], c['captions'],
                                          list(ds.classes), TEMPLATES[kind], text)
        metrics.update(und)
        notes += [f'{kind}: {n}' for n in more]
    return metrics, codebook, notes


def write_grids(kind, pairs, out_dir):
    """Side-by-side grids (original | reconstruction | 4x error): images 4 per PNG, one MP4 per video, one PNG
    per 3D asset with a row per view (up to 4). -> file names."""
    names = []
    if kind == 'image':
        for j in range(0, len(pairs), 4):
            names.append(f'images_{j // 4:03d}.png')
            save_image_grid(pairs[j:j + 4], os.path.join(out_dir, names[-1]))
    for j, (orig, rec) in enumerate(pairs if kind != 'image' else []):
        names.append(f'videos_{j:03d}.mp4' if kind == 'video' else f'3d_{j:03d}.png')
        if kind == 'video':
            save_video_grid(orig, rec, os.path.join(out_dir, names[-1]))
        else:
            save_image_grid(list(zip(orig[:4], rec[:4])), os.path.join(out_dir, names[-1]))
    return names


def optional(build, what, notes):
    """A pretrained metric network, or None and a note in the report when its weights cannot be had (offline
    and not cached, no local file): the other metrics still run."""
    try:
        return build()
    except RuntimeError as e:
        notes.append(f"{what} skipped: {e}")
        print(f"eval: {what} skipped: {e}")
        return None


def setup_warnings(cfg, datasets, gs, text):
    notes = []
    if cfg.random_nets:
        trained_text = getattr(text, 'trained', False)
        notes.append(f"random_nets: LPIPS, Inception (rFID), R3D (rFVD){'' if trained_text else ' and the text tower'} "
                     f"are RANDOM: a smoke test, {'those' if trained_text else 'the'} numbers are not meaningful")
    if text is None and cfg.understanding:
        notes.append('no text tower given: understanding metrics skipped')
    if '3d' in datasets and gs is None:
        notes.append('no Gaussian decoder: 3D is scored by the PSNR of the reconstructed voxel features vs '
                     'the input features (feat_psnr), no rendered views or 3D grids')
    return notes


def evaluate(model, cfg, gs_decoder=None, text=None):
    """Evaluate an in-memory tokenizer on the data cfg names (train.py calls this for held-out evaluation).

    Returns dict(metrics={kind: {name: value}}, codebook={kind: {'usage': [G], 'perplexity': [G]}},
    counts={kind: {'evaluated', 'skipped'}}, skipped=[{kind, source, reason}], grids=[file names in
    cfg.out_dir], warnings=[...]). text: an object with encode_text (TextTower); None skips understanding.
    The model's training mode and decoder cache setting are restored afterwards."""
    check_options(model, cfg, gs_decoder)
    os.makedirs(cfg.out_dir, exist_ok=True)
    device = next(model.parameters()).device
    grid = cfg.grid_3d or (gs_decoder.cfg if gs_decoder is not None else model.config).gs_resolution
    datasets = build_datasets(cfg, model.config.patch_size, grid)
    res = dict(metrics={}, codebook={}, counts={}, skipped=[], grids=[],
               warnings=setup_warnings(cfg, datasets, gs_decoder, text))
    text = text if cfg.understanding else None
    need_lpips = any(k != '3d' for k in datasets) or ('3d' in datasets and gs_decoder is not None)
    lpips_fn = optional(lambda: LPIPSMetric(cfg.lpips_weights, cfg.random_nets, device), 'LPIPS',
                        res['warnings']) if need_lpips else None
    was_training, cache = model.training, model.config.decoder_cache_frames
    if cfg.decoder_cache_frames >= 0:
        model.config.decoder_cache_frames = cfg.decoder_cache_frames
    model.eval()
    try:
        for kind, ds in datasets.items():
            features = None
            if cfg.fid and kind != '3d' and len(ds) >= 2:
                net, weights = ('inception', cfg.fid_weights) if kind == 'image' else ('r3d', cfg.fvd_weights)
                features = optional(lambda: FeatureExtractor(net, weights, cfg.random_nets, device),
                                    'rFID' if kind == 'image' else 'rFVD', res['warnings'])
            c = collect(model, ds, cfg, lpips_fn, features, gs_decoder)
            skipped = list(ds.skipped) + c['skipped']
            res['counts'][kind] = dict(evaluated=len(c['scores']), skipped=len(skipped))
            res['skipped'] += [dict(kind=kind, source=s, reason=r) for s, r in skipped]
            if not c['scores']:
                res['warnings'].append(f'{kind}: nothing could be evaluated')
                continue
            res['metrics'][kind], codebook, notes = summarise(kind, c, model, ds, text)
            if codebook is not None:
                res['codebook'][kind] = codebook
            res['warnings'] += notes
            res['grids'] += write_grids(kind, c['pairs'], cfg.out_dir)
    finally:
        model.train(was_training)
        model.config.decoder_cache_frames = cache
    return res


# -----------------------------------------------------------------------------
# the command line: load, evaluate, write report.json + report.md + grids

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def jsonable(x):
    """Report values -> strict JSON: tuples -> lists, tensors -> numbers/lists, inf/nan -> None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def markdown_report(r, metrics):
    """The report as Markdown; `metrics` are the raw values (inf shows as inf, not null)."""
    ck = r['checkpoint']
    lines = ['# AToken evaluation', '',
             f"- checkpoint: `{ck['path']}`" + (f" + `{ck['config']}`" if ck['config'] else '') +
             f" ({ck['kind']}, {ck['weights']} weights)" +
             (f"; Gaussian decoder: {ck['gs_decoder']}" if ck['gs_decoder'] else ''),
             f"- data: {r['data']}; latent: {r['config']['latent']}; decoder cache: "
             f"{r['model_config']['decoder_cache_frames']} frames",
             f"- device: {r['device']} ({r['dtype']}); torch {r['torch']}; commit {r['git_commit'][:12]}; "
             f"{r['started']}, {r['wall_s']:.1f} s", '']
    rec = {k: {n: v for n, v in m.items() if not n.startswith(UNDERSTANDING)} for k, m in metrics.items()}
    und = {k: {n: v for n, v in m.items() if n.startswith(UNDERSTANDING)} for k, m in metrics.items()}
    und = {k: m for k, m in und.items() if m}
    lines += ['## Reconstruction', '', markdown_table(rec) if rec else '(nothing evaluated)', '']
    if und:
        lines += ['## Understanding', '', markdown_table(und), '']
    for kind, cb in r['codebook'].items():
        lines += [f'## FSQ codebook ({kind}, per group)', '', markdown_table(
            {name: {f'g{g}': v for g, v in enumerate(cb[name])} for name in ('usage', 'perplexity')}), '']
    lines += ['## Counts', '', markdown_table(r['counts']), '']
    if r['skipped']:
        lines += ['## Skipped inputs', '']
        lines += [f"- `{s['source']}` ({s['kind']}): {s['reason']}" for s in r['skipped']] + ['']
    if r['warnings']:
        lines += ['## Warnings', ''] + [f'- {w}' for w in r['warnings']] + ['']
    if r['grids']:
        lines += ['## Grids (original | reconstruction | 4x error)', ''] + [f'- {g}' for g in r['grids']] + ['']
    return '\n'.join(lines)


def usage():
    rows = [f"  --{f.name}={getattr(EvalConfig(), f.name)!r}" for f in fields(EvalConfig)]
    return __doc__ + '\nOptions (defaults):\n' + '\n'.join(rows)


def main(argv):
    """Evaluate a checkpoint; writes out_dir/report.json, report.md and the grids; returns the report."""
    if '-h' in argv or '--help' in argv:
        print(usage())
        return None
    cfg = parse_overrides(EvalConfig(), argv)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype={cfg.dtype}: expected one of {list(DTYPES)}")
    t0, started = time.time(), time.strftime('%Y-%m-%d %H:%M:%S %z')
    torch.manual_seed(cfg.seed)                             # random_nets are then the same every run
    tok, info = load_tokenizer(cfg)
    check_options(tok, cfg)                                 # before building anything heavy
    gs = load_gs_decoder(cfg, tok.config, info['gs_decoder'])
    device = pick_device(cfg.device)
    print(f"eval: {cfg.checkpoint} ({info['kind']}, {info['weights']} weights, {tok.num_params() / 1e6:.1f}M "
          f"parameters) on {device}, {cfg.dtype}")
    tok = tok.to(device, DTYPES[cfg.dtype])
    gs = gs.to(device) if gs is not None else None
    text, notes = None, []
    if cfg.understanding:
        text = optional(lambda: load_text_tower(cfg, info['loss_config'], tok.config.encoder_width, device, notes,
                                                info.get('text_tower')),
                        'understanding (text tower)', notes)
    res = evaluate(tok, cfg if text is not None else replace(cfg, understanding=False), gs, text)

    folders = {k: getattr(cfg, k) for k in ('images', 'videos', 'assets') if getattr(cfg, k)}
    report = dict(
        metrics=res['metrics'], codebook=res['codebook'], counts=res['counts'], skipped=res['skipped'],
        grids=res['grids'], warnings=notes + res['warnings'],
        data=f"folders {folders}" if folders else f"built-in '{cfg.split}' split, seed {cfg.seed}",
        checkpoint=dict(path=cfg.checkpoint, config=cfg.config, kind=info['kind'], weights=info['weights'],
                        gs_decoder=(cfg.gs_checkpoint or ('training checkpoint' if info['gs_decoder'] else None))),
        config=asdict(cfg), model_config=asdict(tok.config), git_commit=git_commit(),
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type,
        dtype=cfg.dtype, torch=torch.__version__, started=started, wall_s=time.time() - t0)
    if cfg.decoder_cache_frames >= 0:
        report['model_config']['decoder_cache_frames'] = cfg.decoder_cache_frames
    md = markdown_report(report, res['metrics'])
    report = jsonable(report)
    with open(os.path.join(cfg.out_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=1, allow_nan=False)
    with open(os.path.join(cfg.out_dir, 'report.md'), 'w') as f:
        f.write(md + '\n')
    print(md)
    return report


if __name__ == '__main__':
    main(sys.argv[1:])
