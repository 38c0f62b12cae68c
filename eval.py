"""
Evaluate an AToken checkpoint: the paper's metrics for images, videos and 3D, with reports to look at.

Metrics (each usable on its own, definitions in the docstrings):
  psnr, ssim (Wang et al. 2004; scikit-image conventions), LPIPS (Zhang et al. 2018), rFID (Heusel et al.
  2017) from torch-fidelity's TF-Inception port and rFVD (Unterthiner et al. 2018) from StyleGAN-V's I3D
  TorchScript, as papers compute them, multiview 3D PSNR/SSIM/LPIPS of Gaussian-splat renders, zero-shot
  accuracy (CLIP-style prompt ensembles through the SigLIP2 text tower, Radford et al. 2021; per class too),
  text<->media recall@1/5/10 (frame-averaged video embeddings for MSR-VTT / MSVD), FSQ codebook usage.

Command line (EvalConfig fields as --key=value; python eval.py --help lists them):
  python eval.py --protocol=imagenet256 --checkpoint=atoken-soc --images=imagenet/val   # a paper table (PROTOCOLS)
  python eval.py --checkpoint=out/ckpt.pt                              # ours, built-in held-out data
  python eval.py --checkpoint=atoken-sod --latent=fsq --images=photos/  # Apple's weights by name
  python eval.py --checkpoint=atoken-sod.pt --config=atoken-sod.yaml --latent=fsq  # or file + official YAML
  python eval.py --checkpoint=out/ckpt.pt --videos=clips/ --decoder_cache_frames=4
  python eval.py --checkpoint=atoken-soc --assets=prepared/ --gs_checkpoint=3d_decode_gs
  python eval.py --checkpoint=tiny.pt --random_nets --fid=false --n_images=4 --res=32,64  # offline smoke test
rFID / rFVD weights: --fid_weights=weights-inception-2015-12-05-6726825d.pth, --fvd_weights=i3d_torchscript.pt,
or their download into $TORCH_HOME/hub/checkpoints. Long runs save out_dir/partial_<kind>.pt and resume.
Writes out_dir/report.json, report.md and side-by-side grids (original | reconstruction | error): PNG for
images and 3D views, MP4 for videos. Unreadable inputs are skipped and listed in the report.
A training run evaluates its exports on held-out built-in data through periodic_evaluation and summarise_run (train.py
calls them with held_out(its config)); evaluate(tok, EvalConfig(...)) takes an in-memory tokenizer.
"""
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

import convert
import data
import losses
import render3d
import model
from configurator import DTYPES, apply_flags, git_commit, pick_device   # one config, device and dtype mechanism

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


def frechet_from_moments(mu_a, cov_a, mu_b, cov_b):
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b) (float64): ||mu_a - mu_b||^2 +
    tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The last trace is computed as the sum of sqrt(eigenvalues) of
    the symmetric PSD S_a^(1/2) S_b S_a^(1/2) (same eigenvalues as S_a S_b), which is stable where the
    libraries' sqrtm / eigvals of the non-symmetric S_a S_b pick up rounding noise. Costs two D x D
    eigendecompositions."""
    mu_a, cov_a, mu_b, cov_b = (torch.as_tensor(t, dtype=torch.float64) for t in (mu_a, cov_a, mu_b, cov_b))
    ev, U = torch.linalg.eigh(cov_a)
    root_a = U @ torch.diag(ev.clamp_min(0).sqrt()) @ U.t()                     # S_a^(1/2)
    m = root_a @ cov_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.t()) / 2).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt).item()


class FrechetStats:
    """Streaming statistics of one feature set for rFID / rFVD, with memory bounded in the number of samples.

    The first D rows are kept as they are (a few hundred images: the exact, fast nuclear-norm route of
    frechet_distance); past D rows they are folded into float64 running sums (count, sum [D], sum of outer
    products [D, D]: 32 MB for Inception's 2048-d), which is all a Gaussian fit needs. state() / load() make
    a resumable partial result."""
    def __init__(self):
        self.rows, self.n, self.sum, self.outer = [], 0, None, None

    def add(self, feats):
        """feats [B, D] -> accumulated."""
        f = torch.as_tensor(feats).double().cpu()
        if self.sum is None and sum(len(r) for r in self.rows) + len(f) <= f.shape[1]:
            self.rows.append(f)
            return
        if self.sum is None:                                                    # switch to running sums
            self.sum, self.outer = f.new_zeros(f.shape[1]), f.new_zeros(f.shape[1], f.shape[1])
            f, self.rows = torch.cat(self.rows + [f]), []
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.t() @ f                                                 # [D, D]

    def count(self):
        return self.n + sum(len(r) for r in self.rows)

    def moments(self):
        """-> (mean [D], sample covariance [D, D] with N - 1), float64."""
        if self.sum is None:
            f = torch.cat(self.rows)
            return f.mean(0), torch.cov(f.t(), correction=1).reshape(f.shape[1], f.shape[1])
        mu = self.sum / self.n
        return mu, (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    def state(self):
        return dict(rows=self.rows, n=self.n, sum=self.sum, outer=self.outer)

    def load(self, state):
        self.rows, self.n, self.sum, self.outer = state['rows'], state['n'], state['sum'], state['outer']
        return self


def frechet_of_stats(a, b):
    """Frechet distance of two FrechetStats: from the kept rows when both still hold them, else from moments."""
    if min(a.count(), b.count()) < 2:
        raise ValueError(f"a Frechet distance needs >= 2 samples per set, got {a.count()} and {b.count()}")
    if a.sum is None and b.sum is None:
        return frechet_distance(torch.cat(a.rows), torch.cat(b.rows))
    return frechet_from_moments(*a.moments(), *b.moments())


def metric_weights(path, url, file_name, flag, what):
    """Local weights of a metric network: `path` when given (an error naming `flag` if it is missing), else
    the file in torch's hub cache ($TORCH_HOME/hub/checkpoints), downloaded from `url` once. A failed download
    is a RuntimeError naming the flag (eval's `optional` turns it into a skip note outside the protocols)."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}={path}: no such file ({what} weights; download {url})")
        return path
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', file_name)
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(url, cached, progress=False)
        except Exception as e:      # noqa: BLE001 (urllib, SSL and OS errors all mean: no weights here)
            raise RuntimeError(f"{what} needs {file_name} ({type(e).__name__}: {e}): download {url} and give "
                               f"{flag}=<file>, or put it in {os.path.dirname(cached)}") from e
    return cached


class InceptionFID:
    """rFID features as papers compute them: the TF-Inception network of the original FID code (Heusel et al.
    2017; weights 'inception-2015-12-05'), ported bit-exactly by torch-fidelity (Obukhov et al.), 2048-d pool
    features. The input is what a saved file holds: [-1, 1] pixels quantised to uint8 (model.to_uint8, so
    real images loaded from uint8 files round-trip exactly); torch-fidelity resizes to 299x299 with
    TensorFlow 1.x's bilinear rule. layer: torch-fidelity's feature name ('2048' for FID; the tests use '64',
    the first pool, whose 64 x 64 covariances keep the library's own FID numerically exact and fast)."""
    FILE = 'weights-inception-2015-12-05-6726825d.pth'

    def __init__(self, weights='', device='cpu', layer='2048'):
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
        path = metric_weights(weights, URL_INCEPTION_V3, self.FILE, '--fid_weights', 'rFID (TF-Inception)')
        self.net = FeatureExtractorInceptionV3('inception-v3-compat', [layer], feature_extractor_weights_path=path)
        self.net = self.net.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images):
        """images [B, H, W, 3] in [-1, 1] -> features [B, D] float64."""
        u8 = model.to_uint8(images.float().cpu()).permute(0, 3, 1, 2).contiguous()     # [B, 3, H, W]
        return self.net(u8.to(self.device))[0].double().cpu()


class I3DFVD:
    """rFVD features as the common FVD code computes them (StyleGAN-V, Skorokhodov et al. 2022, and
    content-debiased FVD, Ge et al. 2024): the Kinetics-400 I3D network (Carreira & Zisserman 2017) of the
    original TF FVD (Unterthiner et al. 2018), as the TorchScript file i3d_torchscript.pt, called
    net(x, rescale=True, resize=True, return_features=True): x [B, 3, T, H, W] holds uint8 levels 0..255
    (as float), the network maps them to [-1, 1] and resizes every frame to 224x224 (bilinear) itself, and
    returns the 400-d logits before the softmax. Any TorchScript file with that signature loads.
    Clips: every non-overlapping run of 16 consecutive frames (StyleGAN-V's FVD_16), frames quantised to
    uint8 as saved video frames would be; a video shorter than 16 frames gives no clip."""
    URL = 'https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1'
    FILE, FRAMES = 'i3d_torchscript.pt', 16

    def __init__(self, weights='', device='cpu'):
        path = metric_weights(weights, self.URL, self.FILE, '--fvd_weights', 'rFVD (I3D)')
        try:
            self.net = torch.jit.load(path, map_location=device).eval()
        except RuntimeError as e:
            raise ValueError(f"--fvd_weights={path}: not a TorchScript file ({str(e).splitlines()[0]})") from e
        self.device = device

    def clips(self, video):
        """video (T, H, W, 3) in [-1, 1] -> [n, 3, 16, H, W] float uint8 levels, n = T // 16."""
        n = video.shape[0] // self.FRAMES
        u8 = model.to_uint8(video[:n * self.FRAMES].float().cpu())                        # (16n, H, W, 3)
        return u8.reshape(n, self.FRAMES, *u8.shape[1:]).permute(0, 4, 1, 2, 3).float()  # [n, 3, 16, H, W]

    @torch.no_grad()
    def __call__(self, video):
        """video (T, H, W, 3) in [-1, 1] -> features [T // 16, D] float64, one clip per network call (a
        1080p clip is 0.4 GB as float)."""
        x = self.clips(video)
        out = [self.net(c[None].to(self.device), rescale=True, resize=True, return_features=True) for c in x]
        return torch.cat(out).double().cpu() if out else torch.zeros(0, 0, dtype=torch.float64)


# -----------------------------------------------------------------------------
# understanding metrics


def class_embeddings(encode_text, class_names, templates):
    """Zero-shot classifier weights (CLIP prompt ensembling): for each class, the L2-normalised mean of the
    L2-normalised text embeddings of every template filled with the class name. -> [K, D]."""
    out = []
    for name in class_names:
        e = F.normalize(encode_text([fill(t, name) for t in templates]).float(), dim=-1)
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out)


def zero_shot_accuracy(media_emb, labels, class_emb, k=1):
    """Top-k accuracy of classifying media embeddings [B, D] against class embeddings [K, D] by cosine
    similarity; labels [B] class indices."""
    topk = zero_shot_predict(media_emb, class_emb, k)                          # [B, k]
    return (topk == torch.as_tensor(labels)[:, None]).any(1).double().mean().item()


def zero_shot_predict(media_emb, class_emb, k=5):
    """The k most similar classes (cosine) of each media embedding [B, D] -> class indices [B, k], best first.
    Streaming evaluation keeps only these, not the embeddings (50k x 1152 floats for ImageNet)."""
    sim = F.normalize(media_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).t()   # [B, K]
    return sim.topk(min(k, sim.shape[1]), dim=1).indices


def zero_shot_scores(topk, labels, class_names, attributes=None):
    """Predictions [B, k] (best first) and labels [B] -> top-1 / top-5 accuracy over samples (ImageNet's
    numbers, Table 5), top-1 per class {name: accuracy} for the classes that have samples, and its mean over
    those classes (balanced accuracy), with chance levels. attributes {name: word index}: class names made of
    words (the built-in 'red circle'), each attribute scored on its own: the top-1 prediction's word equals the
    label's (zs_<name>_top1), chance = 1 / its distinct values (zs_chance_<name>)."""
    topk, labels = torch.as_tensor(topk), torch.as_tensor(labels)
    hit1 = (topk[:, 0] == labels).double()
    per_class = {class_names[c]: hit1[labels == c].mean().item() for c in labels.unique().tolist()}
    K = len(class_names)
    out = dict(zs_top1=hit1.mean().item(), zs_top5=(topk[:, :5] == labels[:, None]).any(1).double().mean().item(),
               zs_mean_class_top1=sum(per_class.values()) / len(per_class),
               zs_chance_top1=1 / K, zs_chance_top5=min(5, K) / K)
    for name, w in (attributes or {}).items():
        word = [n.split()[w] for n in class_names]
        out[f'zs_{name}_top1'] = sum(word[p] == word[t] for p, t in zip(topk[:, 0].tolist(), labels.tolist())) / len(labels)
        out[f'zs_chance_{name}'] = 1 / len(set(word))
    return out, per_class


def recall_at_k(sim, ks=(1, 5, 10), match=None):
    """Retrieval recall@k. sim [Q, G] query x gallery similarities; match [Q, G] bool marks the right items of
    each query (default: item i for query i, one caption per media item). A query counts as found at k when
    its best-scoring right item is beaten by fewer than k items (ties count for it). -> {k: fraction}.
    Text-to-video: sim = text_emb @ video_emb.T and match[c, v] = caption c describes video v; video-to-text:
    the transposes (several captions per video, MSVD: any of them in the top k counts)."""
    match = torch.eye(*sim.shape, dtype=torch.bool) if match is None else torch.as_tensor(match, dtype=torch.bool)
    if not match.any(1).all():
        raise ValueError("recall_at_k: every query needs at least one matching item")
    target = sim.masked_fill(~match, -math.inf).max(1, keepdim=True).values      # [Q, 1]
    rank = (sim > target).sum(1)                                                # 0 = ranked first
    return {k: (rank < k).double().mean().item() for k in ks}


def frame_indices(n_frames, k):
    """k frame indices spread uniformly over a video (CLIP4Clip's np.linspace(0, n - 1, k) cast to int);
    all frames when it has fewer than k (the zero-padded, masked frames of that protocol add nothing)."""
    if n_frames <= k:
        return list(range(n_frames))
    return torch.linspace(0, n_frames - 1, k, dtype=torch.float64).long().tolist()


def average_frame_embeddings(frame_emb):
    """Frame embeddings [T, D] -> one video embedding [D]: the L2-normalised mean of the L2-normalised frame
    embeddings (frame averaging, the MSR-VTT / MSVD protocol of Sec. 4.3, after CLIP4Clip's mean pooling)."""
    return F.normalize(F.normalize(frame_emb.float(), dim=-1).mean(0), dim=-1)


def code_counts(indices, codebook_size=4096):
    """FSQ indices [N, G] -> how often each code was used, per group [G, codebook_size] (int64; what streaming
    evaluation keeps instead of the indices)."""
    idx = torch.as_tensor(indices).long().cpu()
    return torch.stack([torch.bincount(idx[:, g], minlength=codebook_size) for g in range(idx.shape[1])])


def codebook_stats_from_counts(counts):
    """Code counts [G, K] -> per group: usage (fraction of the codebook used at least once) and perplexity
    exp(H), H the entropy of the empirical code distribution (perplexity = K for uniform use)."""
    usage, perplexity = [], []
    for row in counts.double():
        p = row / row.sum()
        nz = p[p > 0]
        usage.append((row > 0).double().mean().item())
        perplexity.append(math.exp(-(nz * nz.log()).sum().item()))
    return {'usage': usage, 'perplexity': perplexity}


def codebook_stats(indices, codebook_size=4096):
    """FSQ indices [N, G] -> per group usage and perplexity (codebook_stats_from_counts)."""
    return codebook_stats_from_counts(code_counts(indices, codebook_size))


# -----------------------------------------------------------------------------
# reports: side-by-side grids (original | reconstruction | error), JSON and Markdown


def to_uint8_truncated(x):
    """[-1, 1] float -> uint8 as the official savers do: ((x + 1) / 2 * 255).clip(0, 255), truncated (not rounded
    as model.to_uint8, which the metrics use): the report's pictures are quantised as the official files are."""
    return ((x.detach().float().cpu() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)


def side_by_side(orig, rec, min_size=256):
    """(..., H, W, 3) pair -> (..., sH, 3sW + 8, 3) uint8: original | reconstruction | 4x absolute error,
    separated by 4-pixel white bars; small pictures are enlarged s times (nearest neighbour: every pixel stays
    visible) so that the longer side of a tile is at least min_size."""
    s = max(1, -(-min_size // max(orig.shape[-3:-1])))
    if s > 1:
        orig, rec = (x.repeat_interleave(s, dim=-3).repeat_interleave(s, dim=-2) for x in (orig, rec))
    err = ((rec.float() - orig.float()).abs() * 4 - 1).clamp(-1, 1)            # 0 error = black
    bar = torch.full((*orig.shape[:-2], 4, 3), 255, dtype=torch.uint8)
    return torch.cat([to_uint8_truncated(orig), bar, to_uint8_truncated(rec), bar, to_uint8_truncated(err)],
                     dim=-2)


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
    """A video pair (T, H, W, 3) in [-1, 1] -> MP4 of side-by-side frames (original | reconstruction | error)."""
    data.save_video(side_by_side(orig, rec), path, fps)


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
    random_nets: bool = False   # random LPIPS / text tower: offline smoke tests only (rFID / rFVD always need
                                # the real networks' files: --fid_weights / --fvd_weights or their download)
    lpips_weights: str = ''     # local torchvision AlexNet state dict ('' = torchvision download/cache)
    fid_weights: str = ''       # torch-fidelity's TF-Inception weights-inception-2015-12-05-6726825d.pth
    fvd_weights: str = ''       # StyleGAN-V's I3D i3d_torchscript.pt (any TorchScript of that signature)
    siglip_weights: str = ''    # local open_clip SigLIP2 checkpoint for the text tower
    fid: bool = True            # rFID / rFVD (Inception / I3D features of every sample: slow on a CPU)
    understanding: bool = True  # zero-shot accuracy and text<->media recall through the text tower
    # the paper's protocols (PROTOCOLS sets these; each can also be given alone)
    protocol: str = ''          # imagenet256 | coco256 | tokenbench720 | davis1080 | msrvtt | msvd | toys4k
    resize_crop: int = 0        # images and retrieval frames: shorter side to N (PIL bilinear, as torchvision
                                # Resize(N)), then the centre N x N crop; 0 = data.py's size draw from `res`
    native: bool = False        # videos at native size, frames from the first on (up to `frames`; 0 = all)
    retrieval_frames: int = 0   # > 0: a video is the average of this many frames' embeddings (no reconstruction)
    captions: str = ''          # retrieval captions: JSON {file: caption or [captions]} or CSV file,caption
    labels_3d: str = ''         # 3D classes for zero-shot: 'folder' (top source folder, Toys4k) or CSV/JSON id,class
    templates: str = 'builtin'  # zero-shot prompts: builtin (TEMPLATES) | imagenet (open_clip's 80 OpenAI ones)
    save_every: int = 1000      # samples between partial results (out_dir/partial_<kind>.pt), resumed if found
    resume: bool = True         # false: ignore (and overwrite) a partial result
    # outputs
    out_dir: str = 'out/eval'
    max_grids: int = 8          # samples per modality shown in side-by-side grids
    turntable: int = 0          # 3D: frames of a turntable MP4 of each shown reconstruction (0 = none)


# -----------------------------------------------------------------------------
# the paper's evaluation protocols as presets: `python eval.py --protocol=imagenet256 --checkpoint=...
# --images=...`. Each sets EvalConfig fields (any flag given as well wins), names the data it needs and
# the paper's numbers for Apple's So/C (continuous, Stage 3) and So/D (FSQ) checkpoints, which README.md
# lists. Resize: torchvision's Resize(256) + CenterCrop(256) on the decoded image (Table 4's "resized and
# center-cropped to 256 x 256"); the centre crop to patch multiples of model.prepare changes nothing there.

PROTOCOLS = {
    'imagenet256': dict(
        section='Sec. 4.2, Tables 3-5', needs='images',
        layout='ImageNet val (50k): one folder per synset (n01440764/...) or a CSV/JSONL manifest file,label',
        settings=dict(resize_crop=256, fid=True, understanding=True, templates='imagenet'),
        paper={'So/C': dict(psnr=29.72, ssim=0.848, lpips=0.085, rfid=0.209, zs_top1=0.822),
               'So/D': dict(psnr=27.14, ssim=0.801, lpips=0.119, rfid=0.379, zs_top1=0.822)}),
    'coco256': dict(
        section='Sec. 4.2, Table 4', needs='images', layout='COCO val2017 (5k images), a flat folder',
        settings=dict(resize_crop=256, fid=True, understanding=False),
        paper={'So/C': dict(psnr=29.67, ssim=0.861, lpips=0.081, rfid=2.026),
               'So/D': dict(psnr=27.00, ssim=0.815, lpips=0.115, rfid=3.270)}),
    'tokenbench720': dict(
        section='Sec. 4.3, Tables 3 and 6', needs='videos', layout='TokenBench (471 videos, 720p), a folder',
        settings=dict(native=True, frames=0, decoder_cache_frames=4, fid=True, understanding=False),
        paper={'So/C': dict(psnr=36.07, ssim=0.940, lpips=0.135, rfvd=3.01),
               'So/D': dict(psnr=33.12, ssim=0.913, lpips=0.193, rfvd=22.16)}),
    'davis1080': dict(
        section='Sec. 4.3, Table 6', needs='videos', layout='DAVIS 2017 (50 videos at 1080p), a folder of videos',
        settings=dict(native=True, frames=0, decoder_cache_frames=4, fid=True, understanding=False),
        paper={'So/C': dict(psnr=33.11, ssim=0.907, lpips=0.189, rfvd=10.76),
               'So/D': dict(psnr=29.75, ssim=0.846, lpips=0.288, rfvd=41.42)}),
    'msrvtt': dict(
        section='Sec. 4.3, Tables 3 and 7', needs='videos',
        layout='MSR-VTT 1K-A test videos + --captions (one caption per video)',
        settings=dict(retrieval_frames=12, resize_crop=224, fid=False, understanding=True),
        paper={'So/C': {'t2m_R@1': 0.402, 't2m_R@5': 0.649, 't2m_R@10': 0.752, 'm2t_R@1': 0.305, 'm2t_R@5': 0.531,
                        'm2t_R@10': 0.632},
               'So/D': {'t2m_R@1': 0.403, 't2m_R@5': 0.650, 't2m_R@10': 0.746, 'm2t_R@1': 0.303, 'm2t_R@5': 0.518,
                        'm2t_R@10': 0.617}}),
    'msvd': dict(
        section='Sec. 4.3, Table 7', needs='videos', layout='MSVD test videos + --captions (many per video)',
        settings=dict(retrieval_frames=12, resize_crop=224, fid=False, understanding=True),
        paper={'So/C': {'t2m_R@1': 0.535, 't2m_R@5': 0.795, 't2m_R@10': 0.871, 'm2t_R@1': 0.724, 'm2t_R@5': 0.916,
                        'm2t_R@10': 0.954},
               'So/D': {'t2m_R@1': 0.538, 't2m_R@5': 0.797, 't2m_R@10': 0.872, 'm2t_R@1': 0.715, 'm2t_R@5': 0.918,
                        'm2t_R@10': 0.952}}),
    'toys4k': dict(
        section='Sec. 4.4, Tables 3 and 8', needs='assets',
        layout='Toys4k assets prepared with `python render3d.py prepare` (+ --gs_checkpoint=3d_decode_gs)',
        settings=dict(fid=False, understanding=True, labels_3d='folder'),
        paper={'So/C': dict(psnr=28.28, ssim=0.951, lpips=0.062, zs_top1=0.909),
               'So/D': dict(psnr=28.17, ssim=0.951, lpips=0.063, zs_top1=0.913)}),
}


def config_from_argv(argv):
    """--key=value flags -> EvalConfig; with --protocol=NAME the preset's settings first, the flags on top.
    A protocol without its data flag is an error naming the flag and the layout it expects."""
    cfg = apply_flags(EvalConfig(), argv)
    if not cfg.protocol:
        return cfg
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol={cfg.protocol}: expected one of {sorted(PROTOCOLS)}")
    p = PROTOCOLS[cfg.protocol]
    cfg = apply_flags(replace(EvalConfig(), **p['settings']), argv)
    if not getattr(cfg, p['needs']):
        raise ValueError(f"--protocol={cfg.protocol} ({p['section']}) needs --{p['needs']}=<{p['layout']}>")
    if cfg.retrieval_frames and not cfg.captions:
        raise ValueError(f"--protocol={cfg.protocol} needs --captions=<JSON {{file: [captions]}} or CSV file,caption>")
    return cfg


# -----------------------------------------------------------------------------
# loading: tokenizer (ours or official), Gaussian decoder, text tower


def load_tokenizer(cfg):
    """-> (AToken in eval mode on CPU, info dict). Official: a released name, or checkpoint + YAML
    (model.AToken.from_pretrained). Ours:
    a dict with 'model_config' and 'model' (model.export(), or a training checkpoint that may also hold
    'ema' (preferred), 'loss_config' and 'gs_decoder'). Missing files: FileNotFoundError; weights that do
    not fit the config: the ValueError of model.load_strict, naming the keys."""
    named = convert.is_released(cfg.checkpoint)
    for path in (cfg.config,) if named else (cfg.checkpoint, cfg.config):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"not found: {path}")
    if not cfg.checkpoint:
        raise ValueError("give --checkpoint=<file> (ours, or an official one with --config=<yaml>) or a released "
                         f"name ({convert.released_names('tokenizer')})")
    if cfg.config or named:
        return (model.AToken.from_pretrained(cfg.checkpoint, cfg.config or None),
                dict(kind='official', weights='model', loss_config=None, gs_decoder=None))
    if cfg.checkpoint.endswith('.safetensors'):
        raise ValueError(f"{cfg.checkpoint}: an official checkpoint needs its YAML: --config=<yaml>")
    ck = torch.load(cfg.checkpoint, map_location='cpu', weights_only=True)
    if not isinstance(ck, dict) or 'model_config' not in ck or 'model' not in ck:
        raise ValueError(f"{cfg.checkpoint}: not one of ours (no 'model_config' and 'model'); an official "
                         f"checkpoint needs --config=<its yaml>")
    config = model.ModelConfig.from_dict(ck['model_config'], f"{cfg.checkpoint} ['model_config']")
    weights = 'ema' if ck.get('ema') is not None else 'model'
    with torch.device('meta'):
        tok = model.AToken(config)
    model.load_strict(tok, ck[weights], f"{cfg.checkpoint} ['{weights}']")
    info = dict(kind='training' if len(set(ck) - {'model', 'model_config'}) else 'export', weights=weights,
                loss_config=ck.get('loss_config'), gs_decoder=ck.get('gs_decoder'), text_tower=ck.get('text_tower'))
    return tok.eval(), info


def load_gs_decoder(cfg, model_config, state=None):
    """Official GaussianDecoder (gs_checkpoint + gs_config), or ours from a training checkpoint's 'gs_decoder'
    state dict (its gs_* sizes are model_config's), or None."""
    if cfg.gs_checkpoint or cfg.gs_config:
        if not (cfg.gs_checkpoint and (cfg.gs_config or convert.is_released(cfg.gs_checkpoint))):
            raise ValueError("the official Gaussian decoder needs both --gs_checkpoint and --gs_config "
                             "(or --gs_checkpoint=3d_decode_gs, the released name)")
        return model.GaussianDecoder.from_pretrained(cfg.gs_checkpoint, cfg.gs_config or None)
    if state is None:
        return None
    with torch.device('meta'):
        gs = model.GaussianDecoder(model_config)
    model.load_strict(gs, state, f"{cfg.checkpoint} ['gs_decoder']")
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

# Zero-shot prompts in the style of the built-in captions (data.scene_caption: "a red circle on a striped
# background", "a photo of a solid red circle", "a video of a red circle spinning"; render3d's 3D captions:
# "a red striped cube"). '{}' receives the class name with its article ("an orange star"); each class is
# the mean of its prompts' text embeddings (CLIP prompt ensembling, class_embeddings).
TEMPLATES = {'image': ['{}', 'a photo of {}', '{} on a background', '{} with other shapes'],
             'video': ['a video of {}', '{} moving', '{}'],
             '3d': ['{}', 'a 3D model of {}', 'a render of {}']}
UNDERSTANDING = ('zs_', 't2m_', 'm2t_')     # key prefixes of the understanding metrics


def with_article(name):
    return ('an ' if name[:1].lower() in tuple('aeiou') else 'a ') + name


def check_options(tok, cfg, gs=None):
    """Errors for options that do not fit the model, raised before any data or metric net is built."""
    if cfg.latent not in ('mean', 'fsq'):
        raise ValueError(f"--latent={cfg.latent}: expected 'mean' or 'fsq'")
    if cfg.latent == 'fsq' and not tok.config.use_quantizer:
        raise ValueError("--latent=fsq needs a checkpoint with an FSQ quantizer (use_quantizer=True, the So/D "
                         "models); this one is continuous: use --latent=mean")
    pt, tile = tok.config.patch_size[0], tok.config.tile_frames
    k = cfg.decoder_cache_frames
    if k not in (-1, 0) and not (k % pt == 0 and 0 < k < tile):
        raise ValueError(f"--decoder_cache_frames={k}: -1 (keep), 0 (off) or a multiple of {pt} below {tile}")
    if gs is not None and tuple(gs.cfg.patch_size[1:]) != tuple(tok.config.patch_size[1:]):
        raise ValueError(f"Gaussian decoder takes {gs.cfg.patch_size[1:]} patches, the tokenizer makes "
                         f"{tok.config.patch_size[1:]}")


# protocol data: deterministic preprocessing (no random size or clip draws), labels from class folders,
# captions from a file. Listing and header probing are data.py's (ImageFolder / VideoFolder).


def resize_center_crop(im, size):
    """PIL image -> PIL image: shorter side resized to `size` with PIL bilinear (longer side int(size * long /
    short)), then the centre size x size crop (offsets rounded): torchvision's Resize(size) + CenterCrop(size)
    on a PIL image, written out so that the protocol does not depend on torchvision's transforms."""
    from PIL import Image
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    im = im.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BILINEAR)
    left, top = int(round((im.width - size) / 2.0)), int(round((im.height - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def class_folders(entries, root):
    """Folder-per-class layout (ImageNet val's synset folders): every file one level below `root` -> the class
    name of each entry (its folder), else None. 1000 synset folders name open_clip's ImageNet classes, in
    sorted-synset order (the standard class indices); other folder names are used as they are, '_' -> ' '."""
    if not os.path.isdir(root):
        return None
    rel = [os.path.relpath(e[0], root).split(os.sep) for e in entries]
    if not rel or any(len(r) != 2 for r in rel):
        return None
    folders = sorted({r[0] for r in rel})
    if len(folders) == 1000 and all(f[:1] == 'n' and f[1:].isdigit() for f in folders):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        names = dict(zip(folders, IMAGENET_CLASSNAMES))
    else:
        names = {f: f.replace('_', ' ') for f in folders}
    return [names[r[0]] for r in rel]


def read_retrieval_captions(path):
    """Retrieval captions: a JSON object {file: caption or [captions]} or a CSV with header file,caption (a file
    may have several rows). Files are relative to the video folder. -> {file: [captions]}. (data.read_captions
    reads a 3D asset captions file: one caption per asset id.)"""
    import csv
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions={path}: no such file")
    out = {}
    with open(path, newline='') as f:
        if path.endswith('.csv'):
            for n, row in enumerate(csv.DictReader(f), 2):
                if not row.get('file') or not row.get('caption'):
                    raise ValueError(f"{path}: line {n} needs 'file' and 'caption'")
                out.setdefault(os.path.normpath(row['file']), []).append(row['caption'])
        else:
            for file, caps in json.load(f).items():
                out[os.path.normpath(file)] = [caps] if isinstance(caps, str) else list(caps)
    return out


class ProtocolImages:
    """Images at the protocol's size: resize_center_crop(size) of the decoded file (uint8 -> [-1, 1]), with
    labels from class folders or a manifest's label column."""
    def __init__(self, path, size, patch_size):
        listing = data.ImageFolder(path, (patch_size[1], patch_size[1]), patch_size)   # lists and probes
        self.entries, self.skipped, self.size, self.patch_size = listing.entries, listing.skipped, size, patch_size
        names = class_folders(self.entries, path) or [e[2] for e in self.entries]
        self.names = names
        self.classes = sorted({n for n in names if n}, key=lambda n: names.index(n))   # first-seen = sorted folders

    def __len__(self):
        return len(self.entries)

    def num_tokens(self, i):
        return (self.size // self.patch_size[1]) * (self.size // self.patch_size[2])

    def __getitem__(self, i):
        from PIL import Image, ImageOps
        file, caption, _, _ = self.entries[i]
        try:
            with Image.open(file) as im:
                im = resize_center_crop(ImageOps.exif_transpose(im).convert('RGB'), self.size)
                u8 = torch.from_numpy(np.asarray(im).copy())                              # (S, S, 3)
        except data.READ_ERRORS as e:
            return data.Skipped(file, str(e) or type(e).__name__)
        name = self.names[i]
        return data.Sample(model.from_uint8(u8), 'image', caption, self.classes.index(name) if name else -1, name, file)


class ProtocolVideos:
    """Videos for the protocols. native: every frame from the first (up to max_frames, 0 = all), cut to a
    multiple of pt, at the stored size (model.prepare centre-crops to patch multiples: 1080 -> 1072 rows).
    retrieval: `frames` frames spread over the video (frame_indices), each resize_center_crop(size), and
    the captions of the file from a captions file."""
    def __init__(self, path, patch_size, max_frames=0, retrieval_frames=0, size=0, captions=None):
        listing = data.VideoFolder(path, 'recon', (patch_size[1], patch_size[1]), patch_size)
        self.entries, self.skipped, self.classes = listing.entries, listing.skipped, []
        self.root, self.patch_size, self.max_frames = path, patch_size, max_frames
        self.retrieval_frames, self.size, self.captions = retrieval_frames, size, captions

    def __len__(self):
        return len(self.entries)

    def frames(self, i):
        n = self.entries[i][3][0]
        if self.retrieval_frames:
            return frame_indices(n, self.retrieval_frames)
        n = min(n, self.max_frames) if self.max_frames else n
        return range(n // self.patch_size[0] * self.patch_size[0])

    def num_tokens(self, i):
        pt, ph, pw = self.patch_size
        H, W = self.entries[i][3][2]
        if self.retrieval_frames:
            return len(self.frames(i)) * (self.size // ph) * (self.size // pw)
        return len(self.frames(i)) // pt * (H // ph) * (W // pw)

    def caption_list(self, i):
        if self.captions is None:
            return []
        return self.captions.get(os.path.normpath(os.path.relpath(self.entries[i][0], self.root)), [])

    def __getitem__(self, i):
        from PIL import Image
        file = self.entries[i][0]
        try:
            x = data.load_clip(file, self.frames(i), self.entries[i][3][2], 1)          # (T, H, W, 3) [-1, 1]
        except data.READ_ERRORS as e:
            return data.Skipped(file, str(e) or type(e).__name__)
        if self.retrieval_frames:
            crops = [np.asarray(resize_center_crop(Image.fromarray(model.to_uint8(f).numpy()), self.size)) for f in x]
            x = model.from_uint8(torch.from_numpy(np.stack(crops)))                            # (k, S, S, 3)
        else:
            x = x[: len(x) // self.patch_size[0] * self.patch_size[0]]
        caps = self.caption_list(i)
        return data.Sample(x, 'video', caps[0] if caps else '', -1, '', file)


def build_eval_datasets(cfg, patch_size, grid):
    """{kind: dataset} to evaluate: the folders given, else the built-in held-out sets whose n_* > 0
    (data.build_datasets builds a training stage's {task: dataset})."""
    if cfg.images or cfg.videos or cfg.assets:
        out = {}
        if cfg.images:
            out['image'] = (ProtocolImages(cfg.images, cfg.resize_crop, patch_size) if cfg.resize_crop else
                            data.ImageFolder(cfg.images, cfg.res, patch_size, cfg.seed))
        if cfg.videos and (cfg.native or cfg.retrieval_frames):
            out['video'] = ProtocolVideos(cfg.videos, patch_size, cfg.frames if cfg.native else 0,
                                          cfg.retrieval_frames, cfg.resize_crop,
                                          read_retrieval_captions(cfg.captions) if cfg.captions else None)
        elif cfg.videos:
            out['video'] = data.VideoFolder(cfg.videos, 'recon', cfg.res, patch_size, cfg.frames, cfg.seed)
        if cfg.assets:
            out['3d'] = data.AssetFolder(cfg.assets, patch_size, labels=cfg.labels_3d)
        return out
    out = {}
    if cfg.n_images:
        out['image'] = data.SyntheticImages(cfg.n_images, cfg.split, cfg.seed, cfg.res, patch_size)
    if cfg.n_videos:
        out['video'] = data.SyntheticVideos(cfg.n_videos, cfg.split, cfg.seed, cfg.res, patch_size, cfg.frames)
    if cfg.n_3d:
        out['3d'] = data.Synthetic3D(cfg.n_3d, cfg.split, cfg.seed, cfg.views_3d, cfg.view_res_3d, grid, patch_size)
    return out


def token_batches(ds, budget, start=0):
    """Indices from `start` on, grouped into batches of at most `budget` tokens (a longer sample goes alone)."""
    batch, used = [], 0
    for i in range(start, len(ds)):
        n = ds.num_tokens(i)
        if batch and used + n > budget:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += n
    if batch:
        yield batch


@torch.no_grad()
def run_batch(tok, media, latent):
    """One encoder pass serves reconstruction and understanding -> (reconstructions as model.reconstruct
    returns them, embeddings [B, D], per-sample FSQ indices [N_i, G] or None)."""
    x = tok.pack(media)
    h = tok.encode(x)
    z, mean, _, idx = tok.bottleneck(h)                   # z = FSQ codes with a quantizer, else the mean
    rec = model.unpack(tok.decode(z if latent == 'fsq' else mean, x), x, tok.config.patch_size)
    emb = tok.embed_features(h, x).float().cpu()
    idx = list(idx.cpu().split(x.seqlens)) if idx is not None else [None] * len(media)
    return [r.float().cpu() for r in rec], emb, idx


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
        target = model.prepare(torch.as_tensor(s.media), patch_size)[0]
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
    views = render3d.render_views(gs, rec, s.media['coords'], s.media['cameras'])
    scores.update(pixel_scores(s.media['views'], views, lpips_fn))
    return scores, s.media['views'], views


def fill(template, name):
    """A prompt template: a '{}' string (ours) or a function of the class name (open_clip's ImageNet ones)."""
    return template(name) if callable(template) else template.format(name)


def zero_shot_classifier(text, class_names, templates):
    """Class embeddings [K, D] for zero-shot classification (CLIP prompt ensembling, class_embeddings), one
    text-tower pass over every prompt."""
    prompts = list(dict.fromkeys(fill(t, n) for n in class_names for t in templates))
    table = dict(zip(prompts, text.encode_text(prompts)))
    return class_embeddings(lambda ts: torch.stack([table[t] for t in ts]), class_names, templates)


def retrieval_metrics(emb, captions, text):
    """Media embeddings [V, D] and each item's captions [[str], ...] (at least one each) -> text-to-media
    recall@1/5/10 (every caption a query) and media-to-text (every item a query; any of its captions
    counts), as MSR-VTT (one caption per video) and MSVD (about 40) are scored."""
    texts = [t for caps in captions for t in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    match = owner[:, None] == torch.arange(len(captions))[None]                 # [C, V] caption c describes v
    sim = text.encode_text(texts).float() @ emb.float().t()                     # [C, V]
    out = {f't2m_R@{k}': v for k, v in recall_at_k(sim, match=match).items()}
    out.update({f'm2t_R@{k}': v for k, v in recall_at_k(sim.t(), match=match.t()).items()})
    return out


def template_set(cfg, kind):
    """(templates, class-name formatter) for zero-shot prompts."""
    if cfg.templates == 'imagenet':
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
        return list(OPENAI_IMAGENET_TEMPLATES), lambda n: n
    if cfg.templates != 'builtin':
        raise ValueError(f"--templates={cfg.templates}: expected 'builtin' or 'imagenet'")
    return TEMPLATES[kind], with_article


def new_state():
    """What evaluation accumulates per modality: bounded by the sample count in small per-sample records
    (scores, labels, top-5 predictions; embeddings only of captioned samples, for retrieval), plus
    fixed-size FID statistics and FSQ code counts. No image is kept."""
    return dict(next=0, scores=[], labels=[], topk=[], emb=[], captions=[], counts=None, real=FrechetStats(),
                fake=FrechetStats(), skipped=[], grids=[], pending=[], shown=0, short=0)


def save_partial(c, fingerprint, path):
    """A resumable partial result (atomic: a crash mid-write leaves the previous one)."""
    convert.save_torch(dict(c, real=c['real'].state(), fake=c['fake'].state(), fingerprint=fingerprint), path)


def load_partial(path, fingerprint):
    """The partial result at `path` -> state, or None when there is none. One of another run (checkpoint,
    data or settings differ) is an error naming the file."""
    if not os.path.isfile(path):
        return None
    state = torch.load(path, weights_only=False)
    if state.pop('fingerprint') != fingerprint:
        raise ValueError(f"{path}: a partial result of another evaluation (checkpoint, data or settings differ); "
                         f"delete it or pass --resume=false")
    state['real'], state['fake'] = FrechetStats().load(state['real']), FrechetStats().load(state['fake'])
    print(f"eval: resuming from {path} at sample {state['next']}")
    return state


def embed_frames(tok, frames):
    """Retrieval: a video's frames (k, H, W, 3), each embedded as an image (padded to pt frames with zeros,
    the paper's "frame embedding averaging with zero-padding") -> one embedding [D]."""
    return average_frame_embeddings(tok.embed(list(frames)).float().cpu())


def add_sample(c, s, rec, emb, idx, kind, ctx):
    """One evaluated sample into the state c: scores, distribution features, FSQ counts, zero-shot
    prediction, retrieval embedding, grid."""
    tok, cfg, nets = ctx['tok'], ctx['cfg'], ctx['nets']
    if rec is not None:
        budget = {k: latent_floats_per_pixel(k, tok.config) for k in ('image', 'video')}
        scores, target, shown = score_sample(s, rec, nets['lpips'], nets['gs'], tok.config.patch_size, budget)
        c['scores'].append(scores)
        if nets['dist'] is not None and kind == 'image':
            f = nets['dist'](torch.stack([target, shown]))                     # one pass for the pair
            c['real'].add(f[:1]), c['fake'].add(f[1:])
        elif nets['dist'] is not None and kind == 'video':
            fr, ff = nets['dist'](target), nets['dist'](shown)
            if len(fr):
                c['real'].add(fr), c['fake'].add(ff)
            else:
                c['short'] += 1
        if shown is not None and c['shown'] < cfg.max_grids:
            c['shown'] += 1
            c['pending'].append((target, shown))
            if kind != 'image' or len(c['pending']) == 4 or c['shown'] == cfg.max_grids:
                c['grids'].append(write_grid(kind, c['pending'], len(c['grids']), cfg.out_dir))
                c['pending'] = []
            if kind == '3d' and cfg.turntable:   # the decoded Gaussians from every side, as an MP4
                c['grids'].append(write_turntable(nets['gs'], rec, s, cfg.turntable, c['shown'] - 1, cfg.out_dir))
    if idx is not None:
        size = tok.config.fsq_levels ** (tok.config.latent_channels // tok.config.fsq_groups)
        n = code_counts(idx, size)
        c['counts'] = n if c['counts'] is None else c['counts'] + n
    if ctx['classifier'] is not None and s.label >= 0:
        c['labels'].append(s.label), c['topk'].append(zero_shot_predict(emb[None], ctx['classifier'])[0])
    caps = ctx['ds'].caption_list(ctx['i']) if hasattr(ctx['ds'], 'caption_list') else [s.caption] * bool(s.caption)
    if caps and ctx['text'] is not None:
        c['emb'].append(emb), c['captions'].append(caps)


def collect(tok, ds, kind, cfg, nets, text, classifier):
    """Run a dataset through the tokenizer, batches of up to batch_tokens packed tokens (several samples per
    forward), with a progress bar, into new_state()'s record; every save_every samples the record goes to
    out_dir/partial_<kind>.pt, and a rerun resumes from it (removed when the modality is done)."""
    from tqdm import tqdm
    path = os.path.join(cfg.out_dir, f'partial_{kind}.pt')
    fingerprint = dict(checkpoint=os.path.abspath(cfg.checkpoint) if os.path.exists(cfg.checkpoint) else cfg.checkpoint,
                       latent=cfg.latent, n=len(ds), data=[getattr(cfg, k) for k in ('images', 'videos', 'assets')],
                       settings=[cfg.protocol, cfg.resize_crop, cfg.native, cfg.retrieval_frames, cfg.frames, cfg.res])
    c = (load_partial(path, fingerprint) if cfg.resume else None) or new_state()
    saved = c['next']
    bar = tqdm(total=len(ds), initial=c['next'], desc=f'eval {kind}', unit='sample', disable=None)
    for batch in token_batches(ds, cfg.batch_tokens, c['next']):
        items = [ds[i] for i in batch]
        c['skipped'] += [(it.source, it.reason) for it in items if isinstance(it, data.Skipped)]
        good = [(i, it) for i, it in zip(batch, items) if isinstance(it, data.Sample)]
        if good and kind == 'video' and cfg.retrieval_frames:
            outs = [(None, embed_frames(tok, s.media), None) for _, s in good]   # embeddings only
        elif good:
            outs = list(zip(*run_batch(tok, [s.media for _, s in good], cfg.latent)))
        for (i, s), (rec, emb, idx) in zip(good, outs if good else []):
            add_sample(c, s, rec, emb, idx, kind, dict(tok=tok, cfg=cfg, nets=nets, classifier=classifier,
                                                      text=text, ds=ds, i=i))
        c['next'] = batch[-1] + 1
        bar.update(len(batch))
        if c['next'] - saved >= cfg.save_every and c['next'] < len(ds):
            save_partial(c, fingerprint, path)
            saved = c['next']
    bar.close()
    if c['pending']:
        c['grids'].append(write_grid(kind, c['pending'], len(c['grids']), cfg.out_dir))
    if os.path.exists(path):
        os.remove(path)
    return c


def summarise(kind, c, tok, classes, text, attributes=None):
    """The collected record -> (metrics, codebook stats or None, per-class zero-shot accuracy or None, notes)."""
    metrics, notes, per_class, codebook = {}, [], None, None
    for key in (c['scores'][0] if c['scores'] else {}):
        vals = torch.tensor([s[key] for s in c['scores']], dtype=torch.float64)
        metrics[key] = vals.nanmean().item()                   # inf (a perfect PSNR) stays inf
        if vals.isnan().any():
            notes.append(f"{kind} {key}: {int(vals.isnan().sum())} samples too small for it (left out)")
    if c['real'].count() >= 2:
        metrics['rfid' if kind == 'image' else 'rfvd'] = frechet_of_stats(c['real'], c['fake'])
    if c['short']:
        notes.append(f"{kind}: {c['short']} videos shorter than {I3DFVD.FRAMES} frames give no rFVD clip")
    if c['counts'] is not None:
        codebook = codebook_stats_from_counts(c['counts'])
        metrics['code_usage'] = sum(codebook['usage']) / len(codebook['usage'])
        metrics['code_ppl'] = sum(codebook['perplexity']) / len(codebook['perplexity'])
    if text is not None:
        if c['topk']:
            zs, per_class = zero_shot_scores(torch.stack(c['topk']), c['labels'], classes, attributes)
            metrics.update(zs)
        else:
            notes.append(f'{kind}: zero-shot skipped: no class labels (class folders or a manifest with labels)')
        if len(c['emb']) >= 2:
            metrics.update(retrieval_metrics(torch.stack(c['emb']), c['captions'], text))
        else:
            notes.append(f"{kind}: retrieval skipped: {len(c['emb'])} captioned samples (needs >= 2)")
    return metrics, codebook, per_class, notes


def write_grid(kind, pairs, j, out_dir):
    """Side-by-side grid (original | reconstruction | 4x error) -> its file name: images up to 4 per PNG, one
    MP4 per video, one PNG per 3D asset with a row per view (up to 4)."""
    if kind == 'image':
        name = f'images_{j:03d}.png'
        save_image_grid(pairs, os.path.join(out_dir, name))
    elif kind == 'video':
        name = f'videos_{j:03d}.mp4'
        save_video_grid(*pairs[0], os.path.join(out_dir, name))
    else:
        name = f'3d_{j:03d}.png'
        save_image_grid(list(zip(pairs[0][0][:4], pairs[0][1][:4])), os.path.join(out_dir, name))
    return name


def write_turntable(gs, rec, s, frames, j, out_dir):
    """3D sample s's reconstructed voxel features -> Gaussians -> `frames` renders around it at the size of
    its views (render3d.turntable_cameras) -> out_dir/3d_<j>_turntable.mp4; returns the file name."""
    cams = render3d.turntable_cameras(frames, resolution=s.media['views'].shape[-2])
    name = f'3d_{j:03d}_turntable.mp4'
    views = render3d.render_views(gs, rec, s.media['coords'], cams)                     # [V, H, W, 3] in [-1, 1]
    data.save_video(to_uint8_truncated(views), os.path.join(out_dir, name), fps=12)
    return name


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
        notes.append(f"random_nets: LPIPS{'' if trained_text else ' and the text tower'} are RANDOM: a smoke "
                     f"test, {'those' if trained_text else 'the'} numbers are not meaningful")
    if text is None and cfg.understanding:
        notes.append('no text tower given: understanding metrics skipped')
    if '3d' in datasets and gs is None:
        notes.append('no Gaussian decoder: 3D is scored by the PSNR of the reconstructed voxel features vs '
                     'the input features (feat_psnr), no rendered views or 3D grids')
    return notes


def distribution_net(kind, cfg, device, notes):
    """InceptionFID for images, I3DFVD for videos, or None (3D, --fid=false, or retrieval-only videos).
    A protocol run needs it: missing weights are an error; elsewhere they are a skip note."""
    if not cfg.fid or kind == '3d' or (kind == 'video' and cfg.retrieval_frames):
        return None
    build = (lambda: InceptionFID(cfg.fid_weights, device)) if kind == 'image' else (lambda: I3DFVD(cfg.fvd_weights, device))
    return build() if cfg.protocol else optional(build, 'rFID' if kind == 'image' else 'rFVD', notes)


def evaluate(tok, cfg, gs_decoder=None, text=None):
    """Evaluate an in-memory tokenizer on the data cfg names (run() calls this after loading the checkpoint).

    Returns dict(metrics={kind: {name: value}}, codebook={kind: {'usage': [G], 'perplexity': [G]}},
    per_class={kind: {class: top-1}}, counts={kind: {'evaluated', 'skipped'}}, skipped=[{kind, source,
    reason}], grids=[file names in cfg.out_dir], warnings=[...]). text: an object with encode_text
    (TextTower); None skips understanding. The model's training mode and decoder cache setting are restored."""
    check_options(tok, cfg, gs_decoder)
    os.makedirs(cfg.out_dir, exist_ok=True)
    device = next(tok.parameters()).device
    grid = cfg.grid_3d or (gs_decoder.cfg if gs_decoder is not None else tok.config).gs_resolution
    datasets = build_eval_datasets(cfg, tok.config.patch_size, grid)
    res = dict(metrics={}, codebook={}, per_class={}, counts={}, skipped=[], grids=[],
               warnings=setup_warnings(cfg, datasets, gs_decoder, text))
    text = text if cfg.understanding else None
    if text is not None and text.encode_text(['a']).shape[1] != tok.config.encoder_width:
        res['warnings'].append(f"understanding metrics skipped: tokenizer embedding width "
                               f"{tok.config.encoder_width} != text tower width {text.encode_text(['a']).shape[1]}")
        text = None
    need_lpips = any(k != '3d' and not (k == 'video' and cfg.retrieval_frames) for k in datasets) or \
        ('3d' in datasets and gs_decoder is not None)
    lpips_fn = optional(lambda: LPIPSMetric(cfg.lpips_weights, cfg.random_nets, device), 'LPIPS',
                        res['warnings']) if need_lpips else None
    was_training, cache = tok.training, tok.config.decoder_cache_frames
    if cfg.decoder_cache_frames >= 0:
        tok.config.decoder_cache_frames = cfg.decoder_cache_frames
    tok.eval()
    try:
        for kind, ds in datasets.items():
            nets = dict(lpips=lpips_fn, gs=gs_decoder, dist=distribution_net(kind, cfg, device, res['warnings']))
            templates, name = template_set(cfg, kind)
            classifier = (zero_shot_classifier(text, [name(n) for n in ds.classes], templates)
                          if text is not None and len(ds.classes) >= 2 else None)
            c = collect(tok, ds, kind, cfg, nets, text, classifier)
            skipped = list(ds.skipped) + c['skipped']
            res['counts'][kind] = dict(evaluated=len(c['scores']) or len(c['emb']), skipped=len(skipped))
            res['skipped'] += [dict(kind=kind, source=s, reason=r) for s, r in skipped]
            res['grids'] += c['grids']
            if not (c['scores'] or c['emb'] or c['topk']):
                res['warnings'].append(f'{kind}: nothing could be evaluated')
                continue
            res['metrics'][kind], codebook, per_class, notes = summarise(kind, c, tok, list(ds.classes), text,
                                                                         getattr(ds, 'attributes', None))
            if codebook is not None:
                res['codebook'][kind] = codebook
            if per_class is not None:
                res['per_class'][kind] = per_class
            res['warnings'] += notes
    finally:
        tok.train(was_training)
        tok.config.decoder_cache_frames = cache
    return res


# -----------------------------------------------------------------------------
# the command line: load, evaluate, write report.json + report.md + grids

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
    if r.get('protocol'):
        p = r['protocol']
        lines += [f"Protocol `{p['name']}` ({p['section']}); the paper's numbers for Apple's checkpoints:", '',
                  markdown_table(p['paper']), '']
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


def run(cfg):
    """Evaluate cfg.checkpoint on what cfg names; writes out_dir/report.json, report.md and the grids; returns
    the report. The in-process entry point (train.py and the tests call it with an EvalConfig)."""
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
        metrics=res['metrics'], codebook=res['codebook'], per_class=res['per_class'], counts=res['counts'],
        skipped=res['skipped'],
        protocol=dict(name=cfg.protocol, section=PROTOCOLS[cfg.protocol]['section'],
                      paper=PROTOCOLS[cfg.protocol]['paper']) if cfg.protocol else None,
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


# -----------------------------------------------------------------------------
# a training run: held-out evaluation of its exports while it trains and when it ends, and the summary against
# non-learned baselines. train.py calls periodic_evaluation every eval_interval steps and summarise_run at the end of
# a curriculum; the CPU demo's targets (configs/cpu_tiny.py) are here.

# (metric, what it is compared with, margin): any run prints them; they are the bar for the CPU demo.
TARGETS = dict(image_vs_bicubic=2.0, video_vs_bicubic=1.0, fsq_gap=3.0, psnr_3d=18.0, psnr_3d_vs_untrained=6.0,
               zero_shot_top1=0.50, zero_shot_shape=0.50)


def held_out(run):
    """The EvalConfig of a training run's held-out evaluation (run: its train.TrainConfig): the built-in 'val' split
    at the last stage's sizes, random metric networks when the run's frozen networks are random, no rFID
    (CPU-friendly)."""
    return EvalConfig(seed=run.seed, res=tuple(run.stages[-1].get('image_res', (64, 256))), frames=run.video_frames,
                      views_3d=run.views_3d, view_res_3d=run.view_res_3d,
                      random_nets=bool(run.loss.get('random_frozen', False)), fid=False)


def evaluate_export(base, run_dir, out_dir, n, checkpoint='tokenizer.pt', latent='mean',
                    modalities=('image', 'video', '3d')):
    """Evaluate one export of a training run (run_dir/checkpoint, with its Gaussian decoder) on n held-out
    built-in images and n // 2 videos and 3D objects; base: the run's EvalConfig (sizes, frames, seed)."""
    cfg = replace(base, checkpoint=os.path.join(run_dir, checkpoint), out_dir=out_dir, latent=latent,
                  n_images=n if 'image' in modalities else 0, n_videos=n // 2 if 'video' in modalities else 0,
                  n_3d=n // 2 if '3d' in modalities else 0)
    report = run(cfg)
    print(f"evaluation report: {os.path.join(out_dir, 'report.json')}")
    return report


def periodic_evaluation(base, run_dir, stages, step, n):
    """Held-out evaluation of a run's current tokenizer.pt while it trains (run_dir/eval_<step>/, n // 4 samples, at
    least 2), on the modalities of `stages` (those trained so far, [(name, FSQ on, modalities)] as in summarise_run)
    with the last one's latent. A failure is a warning: the run goes on."""
    try:
        evaluate_export(base, run_dir, os.path.join(run_dir, f'eval_{step}'), max(2, n // 4),
                        latent='fsq' if stages[-1][1] else 'mean', modalities=set().union(*(m for _, _, m in stages)))
    except Exception as e:      # noqa: BLE001 (evaluation must not end a long run; the final one raises)
        warnings.warn(f"step {step}: periodic evaluation failed ({type(e).__name__}: {e}); training goes on")


def learning_curves(run_dir, baselines):
    """The periodic evaluations of a run (run_dir/eval_<step>/report.json) as one PNG, run_dir/curves.png:
    PSNR vs step per modality (left) and zero-shot accuracy vs step (right), each baseline a dashed line in its
    series' colour (baselines: {'psnr image' | 'zs image shape' | ...: value}), legends under the panels. Drawn
    with PIL (no plotting library). -> the path, or None when the run has fewer than two periodic evaluations."""
    from PIL import Image, ImageDraw
    steps = sorted(int(d[5:]) for d in os.listdir(run_dir) if d.startswith('eval_') and d[5:].isdigit())
    reports = {}
    for st in steps:
        try:
            with open(os.path.join(run_dir, f'eval_{st}', 'report.json')) as f:
                reports[st] = json.load(f)['metrics']
        except (OSError, ValueError, KeyError):
            continue
    if len(reports) < 2:
        return None
    panels = [('psnr', 'PSNR (dB)', {'image': ('image', 'psnr'), 'video': ('video', 'psnr'), '3D': ('3d', 'psnr')}),
              ('zs', 'zero-shot top-1', {'image': ('image', 'zs_top1'), 'image shape': ('image', 'zs_shape_top1'),
                                   'video': ('video', 'zs_top1'), '3D': ('3d', 'zs_top1')})]
    colours = {'image': (31, 119, 180), 'video': (255, 127, 14), '3D': (44, 160, 44), 'image shape': (148, 103, 189)}
    W, H, m = 520, 360, 48                  # each panel W x H (plot inside margins m); the legends go below them
    legend = 16 * max(len(s) for _, _, s in panels) + 8
    img = Image.new('RGB', (2 * W, H + legend), 'white')
    draw = ImageDraw.Draw(img)
    x0, x1 = min(reports), max(reports)
    for k, (panel, title, series) in enumerate(panels):
        base = {n: baselines[f'{panel} {n}'] for n in series if f'{panel} {n}' in baselines}
        pts = {name: [(st, (r.get(kind) or {}).get(key)) for st, r in sorted(reports.items())]
               for name, (kind, key) in series.items()}
        pts = {n: [(x, y) for x, y in p if isinstance(y, (int, float))] for n, p in pts.items()}
        pts = {n: p for n, p in pts.items() if p}
        ys = [y for p in pts.values() for _, y in p] + [base[n] for n in pts if n in base]
        if not ys:
            continue
        lo, hi = min(ys), max(ys)
        lo, hi = (lo - 1, hi + 1) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        L = k * W
        X = lambda x: L + m + (x - x0) / max(x1 - x0, 1) * (W - 2 * m)
        Y = lambda y: H - m - (y - lo) / (hi - lo) * (H - 2 * m)
        draw.rectangle([L + m, m, L + W - m, H - m], outline='black')
        draw.text((L + m, 12), title, fill='black')
        draw.text((L + m, H - m + 6), f'step {x0}', fill='black')
        draw.text((L + W - m - 60, H - m + 6), f'step {x1}', fill='black')
        draw.text((L + 4, m - 6), f'{hi:.2f}', fill='black')
        draw.text((L + 4, H - m - 6), f'{lo:.2f}', fill='black')
        for j, (name, p) in enumerate(pts.items()):
            c = colours[name]
            draw.line([(X(x), Y(y)) for x, y in p], fill=c, width=2) if len(p) > 1 else None
            for x, y in p:
                draw.ellipse([X(x) - 2, Y(y) - 2, X(x) + 2, Y(y) + 2], fill=c)
            if name in base:                                    # dashed: the baseline of this series
                yb = Y(base[name])
                for xa in range(int(L + m), int(L + W - m), 12):
                    draw.line([(xa, yb), (xa + 6, yb)], fill=c, width=1)
            draw.line([(L + m, H + 8 + 16 * j), (L + m + 20, H + 8 + 16 * j)], fill=c, width=2)    # the legend
            draw.text((L + m + 28, H + 2 + 16 * j), name + (' (dashed: baseline)' if name in base else ''), fill=c)
    path = os.path.join(run_dir, 'curves.png')
    img.save(path)
    return path


def summarise_run(base, run_dir, stages, n):
    """Held-out evaluation of a finished curriculum (run_dir/eval*/report.json), then its summary against
    baselines, printed and written to run_dir/summary.json. stages: [(name, FSQ on, modalities)] in order.
      image / video PSNR of the last continuous stage's tokenizer (posterior mean) vs bicubic down- and
        up-sampling that keeps as many floats per image / video frame as its latent (bicubic_baseline);
      image PSNR with FSQ codes (the final stage, when it quantizes) vs the continuous one;
      3D multiview PSNR of the final tokenizer vs the untrained model of the same seed (tokenizer_init.pt);
      zero-shot top-1 over the held-out classes vs chance."""
    names, quantized = [s[0] for s in stages], stages[-1][1]
    mods = set().union(*(s[2] for s in stages))
    path = lambda name: os.path.join(run_dir, name)
    final = evaluate_export(base, run_dir, path('eval'), n, latent='fsq' if quantized else 'mean',
                            modalities=mods)['metrics']
    cont_stages = [i for i, s in enumerate(stages) if not s[1]]
    cont, cont_name = final, names[-1]
    if quantized and cont_stages and mods & {'image', 'video'}:
        cont_name = names[cont_stages[-1]]
        cont = evaluate_export(base, run_dir, path('eval_continuous'), n, f'tokenizer_{cont_name}.pt', 'mean',
                               mods & {'image', 'video'})['metrics']
    untrained = None
    if '3d' in mods and os.path.exists(path('tokenizer_init.pt')):
        untrained = evaluate_export(base, run_dir, path('eval_untrained'), n, 'tokenizer_init.pt', 'mean',
                                    {'3d'})['metrics']
    rows = []      # (what, value, compared with, target, met)
    get = lambda m, kind, key: m.get(kind, {}).get(key, float('nan'))
    for kind, margin in (('image', TARGETS['image_vs_bicubic']), ('video', TARGETS['video_vs_bicubic'])):
        if kind in mods:
            v, b = get(cont, kind, 'psnr'), get(cont, kind, 'bicubic_psnr')
            rows.append((f"{kind} PSNR, continuous ({cont_name})", v, f"bicubic {b:.2f}", f">= {b + margin:.2f}",
                         v >= b + margin))
    if quantized and 'image' in mods:
        v, c = get(final, 'image', 'psnr'), get(cont, 'image', 'psnr')
        rows.append((f"image PSNR, FSQ ({names[-1]})", v, f"continuous {c:.2f}", f">= {c - TARGETS['fsq_gap']:.2f}",
                     v >= c - TARGETS['fsq_gap']))
    if '3d' in mods:
        v, u = get(final, '3d', 'psnr'), get(untrained or {}, '3d', 'psnr')
        need = max(TARGETS['psnr_3d'], u + TARGETS['psnr_3d_vs_untrained'])
        rows.append((f"3D multiview PSNR ({names[-1]})", v, f"untrained {u:.2f}", f">= {need:.2f}", v >= need))
    for kind in sorted(mods):
        if 'zs_top1' in final.get(kind, {}):
            v, c = final[kind]['zs_top1'], final[kind]['zs_chance_top1']
            target = TARGETS['zero_shot_top1'] if kind == 'image' else None
            rows.append((f"{kind} zero-shot top-1", v, f"chance {c:.3f}", f">= {target:.2f}" if target else '-',
                         v >= target if target else None))
            for attr in ('colour', 'shape'):          # the built-in classes' two attributes, each on its own
                if f'zs_{attr}_top1' in final[kind]:
                    v, c = final[kind][f'zs_{attr}_top1'], final[kind][f'zs_chance_{attr}']
                    target = TARGETS.get(f'zero_shot_{attr}') if kind == 'image' else None
                    rows.append((f"{kind} zero-shot {attr}", v, f"chance {c:.3f}", f">= {target:.2f}" if target else '-',
                                 v >= target if target else None))
    summary = [dict(what=w, value=v, baseline=b, target=t, met=m) for w, v, b, t, m in rows]
    base_lines = {'psnr image': get(cont, 'image', 'bicubic_psnr'), 'psnr video': get(cont, 'video', 'bicubic_psnr'),
                  'psnr 3D': get(untrained or {}, '3d', 'psnr'), 'zs image': get(final, 'image', 'zs_chance_top1'),
                  'zs image shape': get(final, 'image', 'zs_chance_shape')}
    curves = learning_curves(run_dir, {k: v for k, v in base_lines.items() if v == v})      # nan: none
    convert.save_json(summary, path('summary.json'))
    print(f"\nsummary vs baselines (held-out built-in data; {path('summary.json')}"
          f"{'; learning curves: ' + curves if curves else ''}):")
    print(f"  {'':44s} {'value':>8s}  {'baseline':20s} {'target':12s} met")
    for w, v, b, t, m in rows:
        print(f"  {w:44s} {v:8.3f}  {b:20s} {t:12s} {'-' if m is None else 'yes' if m else 'NO'}")
    return dict(final=final, continuous=cont, untrained=untrained, summary=summary)


def main(argv):
    """The command line: --key=value flags (EvalConfig fields, read by configurator.apply_flags) -> run(config)."""
    if '-h' in argv or '--help' in argv:
        print(usage())
        return None
    return run(config_from_argv(argv))


if __name__ == '__main__':
    main(sys.argv[1:])
