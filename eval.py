"""
Evaluate an AToken checkpoint: the paper's metrics for images, videos and 3D, with reports to look at.

Metrics (each usable on its own, definitions in the docstrings):
  psnr, ssim (Wang et al. 2004), LPIPS (Zhang et al. 2018), frechet_distance (rFID / rFVD from feature
  sets; Heusel et al. 2017), multiview 3D PSNR/SSIM/LPIPS, zero-shot classification accuracy (CLIP-style
  prompt ensembles, Radford et al. 2021), text<->media recall@k, FSQ codebook usage and perplexity.

Command line (see main() and the README):
  python eval.py --checkpoint=out/tokenizer.pt                         # built-in held-out data
  python eval.py --checkpoint=atoken-sod.pt --config=atoken-sod.yaml --images=photos/
Writes report.json, report.md and side-by-side grids (original | reconstruction | error) as PNG / MP4.
"""
import math

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# pixel metrics. Inputs: (..., H, W, 3) tensors in [-1, 1]; both are clamped to [-1, 1] and mapped to
# [0, 1] first (what a saved image holds). Outputs: one value per image, shape (...).


def to_unit(x):
    """[-1, 1] -> [0, 1], clamped, float64 for the metric arithmetic."""
    return ((x.double().clamp(-1, 1) + 1) / 2)


def psnr(x, y):
    """PSNR in dB on the [0, 1] range: 10 log10(1 / MSE), the MSE over H, W and the 3 channels of each
    image. Identical images give inf."""
    mse = (to_unit(x) - to_unit(y)).pow(2).mean((-3, -2, -1))
    return 10 * torch.log10(1.0 / mse)


def gaussian_window(size=11, sigma=1.5):
    """Normalised 2D Gaussian [size, size] (the SSIM window of Wang et al. 2004)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x, y, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) on the [0, 1] range (L = 1): Gaussian-weighted local
    means, variances and covariance (window 11, sigma 1.5, population statistics), C1 = (K1 L)^2,
    C2 = (K2 L)^2, the SSIM map over fully overlapping windows only ('valid', as the reference MATLAB
    code and scikit-image's cropped mean), averaged over the map and then over the 3 channels.
    Images must be at least `size` pixels on each side."""
    a, b = to_unit(x), to_unit(y)
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
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), sample covariances (N - 1). tr((S_a S_b)^(1/2))
    is computed as the sum of sqrt(eigenvalues) of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD, float64)."""
    a, b = feats_a.double(), feats_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs two [N >= 2, D] sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.t()), torch.cov(b.t())
    ev, U = torch.linalg.eigh(s_a)
    root_a = U @ torch.diag(ev.clamp_min(0).sqrt()) @ U.t()                     # S_a^(1/2)
    m = root_a @ s_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.t()) / 2).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * tr_sqrt).item()


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
        if self.kind == 'inception':                  # ImageNet normalisation at 299x299
            x = F.interpolate(x.permute(0, 3, 1, 2), size=(299, 299), mode='bilinear', align_corners=False)
            mean = torch.tensor([0.485, 0.456, 0.406], device=x.device)[:, None, None]
            std = torch.tensor([0.229, 0.224, 0.225], device=x.device)[:, None, None]
            return self.net(((x + 1) / 2 - mean) / std).cpu()
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
    cols = sorted({k for m in metrics.values() for k in m})
    lines = ['| | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
    for name, m in metrics.items():
        cells = [f"{m[c]:.4g}" if isinstance(m.get(c), (int, float)) else str(m.get(c, '')) for c in cols]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
