"""
The adversarial-free training objective of AToken (arXiv 2509.14476, Section 3.3, Eq. 4-7).

    L     = lambda_rec * L_rec + lambda_sem * L_sem + lambda_KL * L_KL                        (Eq. 4)
    L_rec = l1 * L1 + lpips * LPIPS + gram * Gram + clip * CLIP     for images                 (Eq. 6)
          = L1                                                      for videos and 3D views
    L_sem = KL(softmax(s_teacher / tau) || softmax(s_student / tau))  for images               (Eq. 7)
          = SigLIP sigmoid loss over all pairs of the batch           for videos and 3D

Small pure functions first (each takes tensors and returns a scalar), then the frozen networks
(LPIPS/VGG16, a SigLIP2 model for the teacher, text tower and CLIP-perceptual features), then the gather of
the global batch for the semantic losses, then `compute_losses` (Eq. 4), which assembles the weighted total for
a packed batch that mixes modalities and tasks from `reconstruction_loss` (Eq. 6), `kl_loss` and
`understanding_loss` (Eq. 7 / SigLIP).

Borrowed: LPIPS (Zhang et al. 2018, the `lpips` package), Gram loss (Gatys et al. 2016), SigLIP
(Zhai et al. 2023) for the sigmoid loss and its initialisation, open_clip for the SigLIP2 towers.
Benchmark: `python bench/bench_losses.py`.
"""
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import model


@dataclass
class LossConfig:
    rec: float = 0.2            # lambda_rec (Eq. 4)
    sem: float = 1.0            # lambda_sem
    kl: float = 1e-8            # lambda_KL
    l1: float = 1.0             # Eq. 6 weights, images
    lpips: float = 10.0
    gram: float = 1e3
    clip: float = 1.0
    tau: float = 2.0            # distillation temperature (Eq. 7)
    perceptual_size: int = 224  # LPIPS and Gram see 224x224 resized copies (paper 3.5)
    # CLIP-perceptual runs at the SigLIP2 tower's own input size (FrozenNets.image_size: 256 for the open_clip
    # ViT-SO400M-16-SigLIP2-256), not the paper's 224: the paper's NaFlex tower takes any size as it is, while this
    # fixed-size tower would need its 16x16 position table resampled to 14x14, which changes the very features the
    # loss compares (and the Eq. 7 teacher's embeddings, computed in the same pass).
    siglip_model: str = 'ViT-SO400M-16-SigLIP2-256'  # open_clip name, or 'tiny' (random, tests/CPU demo)
    siglip_weights: str = ''    # local open_clip checkpoint file; '' downloads the 'webli' weights
    vgg_weights: str = ''       # local torchvision vgg16 state dict; '' uses torchvision's download/cache
    random_frozen: bool = False  # random-initialised frozen nets: runs offline, numbers not meaningful
    # Understanding without a pretrained SigLIP2 (the offline CPU demo). The paper distils images from the
    # frozen SigLIP2 image tower (Eq. 7) and keeps its text tower frozen; a RANDOM teacher and text tower
    # carry no meaning, so such runs can instead train a copy of the text tower with the sigmoid loss
    # (SigLIP pre-training from scratch, Zhai et al. 2023) and use that loss for images too.
    image_und: str = 'distill'  # 'distill' (Eq. 7, paper) | 'sigmoid' (SigLIP loss on the captions)
    # initial bias b of the sigmoid loss (SigLIP: -10, with t = log 10). It suits SigLIP's 32k batches and
    # long runs; b moves by about lr per step, so a short run with small batches (the CPU demo: ~25 captions)
    # stays near -10, where even a perfect match (cosine 1) scores logit 0 and embeddings collapse.
    # -5 puts the decision threshold at cosine 0.5.
    sigmoid_bias_init: float = -10.0
    # decode z ~ N(mean, exp(logvar)) in training (the KL-regularised VAE of the paper); False decodes the
    # posterior mean (an autoencoder with the KL penalty on the mean). The posterior std starts near 1 and the
    # 1e-8 KL weight lets it shrink only slowly, so very short runs (the CPU demo) lose ~3 dB to the noise.
    sample_posterior: bool = True
    train_text: bool = False    # train the text tower with the tokenizer; exported with it for eval.py
    # False: with train_text, the text tower's token-embedding table stays at its initial values and only the
    # tower's transformer trains. The tiny demo tower's table (open_clip's 49,408-word BPE vocabulary x 64) holds
    # 3.2M of its 3.3M parameters, ten times the tokenizer, while the built-in captions use about 60 words; a
    # fixed random table still gives each word its own vector, and AdamW, clipping and EMA skip those 3.2M.
    train_text_embedding: bool = True
    # Under torchrun, the semantic losses (Eq. 7 softmax over texts, SigLIP's sigmoid over all pairs) run over
    # the global batch: every rank's micro-batch of the task, gathered with gradients (semantic_terms with pad).
    # False: each rank's own micro-batch only (no collective in the loss; weaker negatives).
    global_batch: bool = True

    def __post_init__(self):
        if self.image_und not in ('distill', 'sigmoid'):
            raise ValueError(f"LossConfig.image_und must be 'distill' or 'sigmoid', got {self.image_und!r}")
        if not self.train_text_embedding and not self.train_text:
            raise ValueError("LossConfig.train_text_embedding=False fixes the word table of a trained text tower: "
                             "it needs train_text=True (the frozen tower never trains)")


# -----------------------------------------------------------------------------
# pure loss functions


def l1_loss(pred, target):
    """Mean absolute error over all elements: for patches [N, C] this is L1 averaged over patches."""
    return (pred - target).abs().mean()


def kl_loss(mean, logvar, weight=None):
    """L_KL (Eq. 4): KL(N(mean, exp(logvar)) || N(0, 1)), summed over channels. mean/logvar [N, L].
    Averaged over the N tokens, or, with weight [N], sum_n weight_n KL_n (compute_losses: 1 / the reconstruction
    samples' token count on their tokens, 0 elsewhere)."""
    # a float() per use, not one shared cast: with bf16 latents that would sum logvar's two gradient paths in
    # float32 before rounding, which changes its gradient's last bits (and the trained weights)
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum(-1)    # [N]
    return kl.mean() if weight is None else (kl * weight).sum()


def gram_matrix(f):
    """f [B, C, H, W] -> [B, C, C] = F F^T / (C H W), F the features as [C, HW]. Dividing by HW makes it an
    average over positions, so it does not grow with resolution; the extra 1/C keeps entries of wide layers
    comparable (C = 64 .. 512 for VGG16)."""
    B, C, H, W = f.shape
    f = f.float().reshape(B, C, H * W)                                          # [B, C, HW]
    return f @ f.transpose(1, 2) / (C * H * W)                                  # [B, C, C]


def gram_loss(feats_x, feats_y):
    """Eq. 5 with our normalisation: sum over layers l of mean_ij (G_ij(x) - G_ij(y))^2, G = gram_matrix
    (F F^T / (C_l M_l), M_l = H_l W_l positions); the mean over the C_l^2 entries is a further 1/C_l^2. Per layer
    this is 1 / (C_l^4 M_l^2) * sum_ij ((F F^T)(x) - (F F^T)(y))_ij^2.
    Gatys et al. (2016) weigh a layer by 1 / (4 C_l^2 M_l^2) instead (their E_l), so one layer here is
    (4 / C_l^2) E_l: lambda_Gram = 1e3 (Eq. 6) means 0.98 E_l on relu1_2 (C = 64), 0.24 on relu2_2, 0.061 on
    relu3_3 and 0.015 on relu4_3 / relu5_3 (C = 512). The paper writes the unnormalised ||G - G'||_F^2 and does
    not state its normalisation. Returns per-sample values [B]."""
    return sum((gram_matrix(a) - gram_matrix(b)).pow(2).mean((1, 2)) for a, b in zip(feats_x, feats_y))


def lpips_from_features(feats_x, feats_y, lins):
    """LPIPS (Zhang et al. 2018) from precomputed backbone features: per layer, unit-normalise channels,
    squared difference, learned 1x1 weights (`lins`), spatial mean; summed over layers. Returns [B]."""
    total = 0.0
    for a, b, lin in zip(feats_x, feats_y, lins):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + lin((a - b).pow(2)).mean((2, 3))                        # [B, 1]
    return total[:, 0]


def clip_perceptual_loss(tokens_x, tokens_y):
    """1 - cosine similarity of frozen vision-tower token features [B, C, h, w], averaged over tokens. [B]"""
    return (1 - F.cosine_similarity(tokens_x.float(), tokens_y.float(), dim=1)).mean((1, 2))


def distillation_loss(s_teacher, s_student, tau, valid=None, cols=None):
    """Eq. 7: KL(softmax(s_t / tau) || softmax(s_s / tau)), over texts (dim 1), averaged over images.
    s_* [B, K]: image-text similarity logits of teacher and student against the same K texts.
    Global batch (semantic_terms with pad): valid [B] 1 for real images, 0 for padding (the mean runs over the real
    ones); cols [K] bool, the texts that count (the others leave the softmax). valid all 1 and cols all True give
    the plain form."""
    s_teacher, s_student = s_teacher.float(), s_student.float()
    if cols is not None:
        drop = ~cols[None]                                           # [1, K]; a finite fill keeps 0 * log 0 = 0
        s_teacher, s_student = s_teacher.masked_fill(drop, -1e4), s_student.masked_fill(drop, -1e4)
    log_p = F.log_softmax(s_teacher / tau, dim=1)
    log_q = F.log_softmax(s_student / tau, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)                      # [B]
    return kl.mean() if valid is None else (kl * valid).sum() / valid.sum()


def sigmoid_loss(img, txt, logit_scale, logit_bias, valid=None):
    """SigLIP loss (Zhai et al. 2023): -1/B sum_ij log sigmoid(z_ij (exp(t) x_i.y_j + b)), z_ij = +1 on the
    diagonal (matching pairs) and -1 elsewhere. img, txt [B, D], L2-normalised.
    Global batch (semantic_terms with pad): valid [B] 1 for real rows, 0 for padding; pairs with a padding row are
    left out and B counts the real rows. valid all 1 gives the plain form."""
    logits = logit_scale.exp() * img.float() @ txt.float().t() + logit_bias    # [B, B]
    z = 2 * torch.eye(len(img), device=img.device) - 1
    if valid is None:
        return -F.logsigmoid(z * logits).sum() / len(img)
    pairs = valid[:, None] * valid[None, :]                                     # [B, B]
    return -(F.logsigmoid(z * logits) * pairs).sum() / valid.sum()


class SigmoidTemperature(nn.Module):
    """Learnable temperature t and bias b of the sigmoid loss, SigLIP init: t = log 10, b = -10.
    Trained with the tokenizer (put it in the optimizer and the training checkpoint)."""
    def __init__(self, bias_init=-10.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0)]))   # [1], not scalars: FSDP2 shards
        self.logit_bias = nn.Parameter(torch.tensor([float(bias_init)]))  # 1D tensors only


def resize(images, size):
    """Images in [-1, 1] -> [B, 3, size, size] (bilinear, antialiased). images: a list whose entries are single
    images (H, W, 3) or same-size groups [n, H, W, 3] (image_frames), resized one interpolate per entry."""
    out = [F.interpolate((x[None] if x.dim() == 3 else x).permute(0, 3, 1, 2).float(), size=(size, size),
                         mode='bilinear', align_corners=False, antialias=True) for x in images]
    return torch.cat(out)


# -----------------------------------------------------------------------------
# frozen networks


def load_vgg16(lp, cfg):
    """Put ImageNet VGG16 weights into the LPIPS backbone (whose slices keep torchvision's layer indices)."""
    import torchvision
    try:
        if cfg.vgg_weights:
            sd = torch.load(cfg.vgg_weights, map_location='cpu', weights_only=True)
        else:
            sd = torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict()
    except Exception as e:
        raise RuntimeError(
            f"LPIPS and the Gram loss need ImageNet VGG16 weights ({type(e).__name__}: {e}). Give a local "
            f"torchvision file with vgg_weights=<path to vgg16-397923af.pth>, or put it in "
            f"$TORCH_HOME/hub/checkpoints, or set random_frozen=True for tests") from e
    for slice_ in (lp.net.slice1, lp.net.slice2, lp.net.slice3, lp.net.slice4, lp.net.slice5):
        for i, layer in slice_.named_children():
            if isinstance(layer, nn.Conv2d):
                layer.weight.copy_(sd[f'features.{i}.weight'])
                layer.bias.copy_(sd[f'features.{i}.bias'])


def tiny_siglip(embed_dim):
    """A small random SigLIP-shaped open_clip model (ViT image tower, non-causal text tower with open_clip's
    bundled BPE tokenizer): builds offline, for tests and the CPU demo."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=64)
    text = CLIPTextCfg(context_length=32, vocab_size=49408, width=64, heads=2, layers=2,
                       no_causal_mask=True, pool_type='argmax')
    m = open_clip.CustomTextCLIP(embed_dim, vision, text, init_logit_scale=math.log(10), init_logit_bias=-10)
    return m, open_clip.tokenizer.SimpleTokenizer(context_length=32)


def load_siglip(cfg, embed_dim):
    """The frozen SigLIP2 model (teacher image tower + text tower) and its tokenizer."""
    import open_clip
    if cfg.siglip_model == 'tiny':
        if not cfg.random_frozen:
            raise ValueError("siglip_model='tiny' is a random test model: it needs random_frozen=True")
        return tiny_siglip(embed_dim)
    pretrained = None if cfg.random_frozen else (cfg.siglip_weights or 'webli')
    try:
        if 'SigLIP2' in cfg.siglip_model:
            import transformers  # noqa: F401  (open_clip's SigLIP2 tokenizer is the Gemma one from HF)
        m = open_clip.create_model(cfg.siglip_model, pretrained=pretrained)
        tok = open_clip.get_tokenizer(cfg.siglip_model)
    except Exception as e:
        raise RuntimeError(
            f"could not build SigLIP2 '{cfg.siglip_model}' with weights '{pretrained}' and its tokenizer "
            f"({type(e).__name__}: {e}). The teacher, text tower and CLIP loss need it: `pip install "
            f"transformers` (its Gemma tokenizer), download the weights once online (open_clip caches them "
            f"under $HF_HOME) or give siglip_weights=<local open_clip checkpoint>; tests and the CPU demo "
            f"use siglip_model='tiny' with random_frozen=True") from e
    return m, tok


class FrozenNets(nn.Module):
    """Every frozen network of the objective, built once: LPIPS with its VGG16 (shared with the Gram loss)
    and a SigLIP2 model (teacher image tower, CLIP-perceptual features, text tower).

    Always in eval mode with requires_grad False. Keep it outside the tokenizer: it never enters the
    optimizer or the tokenizer checkpoint. Move it with .to(device, dtype) like the model.
    """
    def __init__(self, cfg, embed_dim):
        super().__init__()
        import lpips
        self.cfg = cfg
        self.lpips = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False)  # heads ship
        if cfg.random_frozen:
            print("losses: random_frozen=True: LPIPS/Gram VGG16 and SigLIP2 are RANDOM, not pretrained")
        else:
            with torch.no_grad():
                load_vgg16(self.lpips, cfg)
        self.siglip, self.tokenizer = load_siglip(cfg, embed_dim)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):       # frozen: stays in eval mode whatever the caller does
        return super().train(False)

    def vgg_features(self, x):
        """x [B, 3, S, S] in [-1, 1] -> the 5 VGG16 relu outputs (relu1_2, 2_2, 3_3, 4_3, 5_3)."""
        return list(self.lpips.net(self.lpips.scaling_layer(x)))

    def vision(self, x):
        """x [B, 3, S, S] in [-1, 1] (SigLIP's normalisation) -> (last-layer tokens [B, C, h, w],
        L2-normalised pooled embedding [B, D])."""
        o = self.siglip.forward_intermediates(image=x, image_indices=1, normalize=True)
        return o['image_intermediates'][-1], o['image_features']

    def image_size(self):
        s = self.siglip.visual.image_size
        return s[0] if isinstance(s, (tuple, list)) else s

    @torch.no_grad()
    def encode_text(self, texts):
        """List of K strings -> [K, D] L2-normalised text embeddings of the frozen text tower."""
        p = next(self.siglip.parameters())
        tokens = self.tokenizer(texts).to(p.device)
        return self.siglip.encode_text(tokens, normalize=True).to(p.dtype)

    def teacher_scale(self):
        """exp(t) of the frozen SigLIP2: turns cosine similarities into the logits whose softmax Eq. 7 uses."""
        return self.siglip.logit_scale.exp().item()


class TrainableText(nn.Module):
    """A trainable copy of the SigLIP text tower (LossConfig.train_text): list of K strings -> [K, D]
    L2-normalised embeddings, with gradients. It lives in train.Trainable (optimizer, checkpoint, EMA) and is
    exported next to the tokenizer as 'text_tower' (the state dict of open_clip's model.text)."""
    def __init__(self, frozen, embedding=True):
        super().__init__()
        if not hasattr(frozen.siglip, 'text'):
            raise ValueError(f"train_text needs an open_clip model with a separate text tower (model.text), "
                             f"{type(frozen.siglip).__name__} has none")
        self.text = copy.deepcopy(frozen.siglip.text).requires_grad_(True)
        if not embedding:                   # LossConfig.train_text_embedding=False: the word table stays as it is
            self.text.token_embedding.requires_grad_(False)
        self.tokenizer = frozen.tokenizer

    def forward(self, texts):
        p = next(self.text.parameters())
        return F.normalize(self.text(self.tokenizer(texts).to(p.device)), dim=-1)


# -----------------------------------------------------------------------------
# the semantic losses over the global batch (every rank's micro-batch of one task)
#
# SigLIP and CLIP compare each image with the texts of the whole global batch; one GPU's micro-batch holds only
# 3-56 captions here. Each rank pads its rows to the same count M (known on every host from the sampler's plan,
# so nothing is read back from the device), all-gathers them in rank order with a validity mask, and computes
# the same global loss. Gradients reach each rank's own rows (open_clip's gather-with-grad): the backward sums
# every rank's gradient for them, W times the single-process gradient of the global loss, which the W-way
# average of DDP / FSDP turns back into it (tests/test_losses.py checks this on 2 gloo ranks).


def dist_world():
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """x [M, ...] on each of W ranks -> [W*M, ...], rank r's rows at r*M. Backward: all_reduce (sum) of the
    incoming gradient, then this rank's slice (a reduce-scatter written with all_reduce, which gloo has)."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        rank, world = dist_world()
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g[ctx.rows[0]:ctx.rows[1]]


def gather_rows(x, pad):
    """x [n, ...] with n <= pad -> [W*pad, ...] (zero rows after each rank's n); with gradients if x has them.
    With one process (no process group, or W = 1) there is nothing to gather: the padded rows themselves."""
    if x.shape[0] > pad:
        raise ValueError(f"{x.shape[0]} samples but the gather pads to {pad}: pass the largest micro-batch of any rank")
    x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad - x.shape[0]))
    if dist_world()[1] == 1:
        return x
    if x.requires_grad:
        return GatherWithGrad.apply(x)
    with torch.no_grad():
        return GatherWithGrad.apply(x)


def caption_ids(captions, pad, device):
    """Captions -> [pad] int64 ids (a stable 63-bit hash of the text; -1 for padding): equal texts, equal ids on
    every rank (Python's hash() is salted per process), so duplicates are found on the device after the gather."""
    import hashlib
    ids = np.full(pad, -1, dtype=np.int64)
    ids[:len(captions)] = [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), 'little') >> 1
                           for c in captions]
    return torch.from_numpy(ids).to(device, non_blocking=True)


def valid_rows(n, pad, device):
    """[W*pad] float mask of the gathered rows: 1 for every rank's real rows (n on this rank), 0 for padding."""
    mine = torch.from_numpy((np.arange(pad) < n).astype(np.float32)).to(device, non_blocking=True)   # [pad]
    return gather_rows(mine[:, None], pad)[:, 0]


def first_captions(captions, valid, pad):
    """[W*pad] bool: the gathered rows that hold the first copy of a distinct real caption (the columns Eq. 7's
    softmax keeps, as a single rank keeps each distinct caption once). valid: valid_rows of the same rows."""
    ids = gather_rows(caption_ids(captions, pad, valid.device)[:, None], pad)[:, 0]           # [G]
    G = len(ids)
    same = (ids[:, None] == ids[None, :]) & (valid[None, :] > 0)     # [G, G]: j holds i's text
    earlier = torch.ones(G, G, dtype=torch.bool, device=valid.device).tril(-1)
    return (valid > 0) & ~(same & earlier).any(1)                    # [G]


# -----------------------------------------------------------------------------
# the weighted total for a packed batch


def host_to(a, device, dtype=torch.float32):
    """A host-made array (weights, masks, indices) -> a tensor on the device, copied without waiting for it."""
    return torch.as_tensor(np.asarray(a), dtype=dtype).to(device, non_blocking=True)


def image_frames(feats, packed, ids):
    """Frame 0 of the image samples `ids` from token features [N, C] in packed order (the pt = 0 slot), grouped by
    size -> (the ids in output order, [[n_g, H_g, W_g, 3] per size]): one gather and one reshape per distinct
    size, whatever the number of images."""
    ph, pw = packed.patch_size[1:]
    starts = np.concatenate([[0], np.cumsum(packed.seqlens)])
    groups = {}
    for i in ids:
        groups.setdefault(tuple(packed.grids[i][1:]), []).append(i)
    order, out = [], []
    for (h, w), g in groups.items():
        rows = torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in g])).to(feats.device)
        f = feats.index_select(0, rows)[:, :ph * pw * 3].reshape(len(g), h, w, ph, pw, 3)
        out.append(f.permute(0, 1, 3, 2, 4, 5).reshape(len(g), h * ph, w * pw, 3))
        order += g
    return order, out


@torch.no_grad()
def siglip_targets(frozen, images):
    """One frozen SigLIP2 pass over target images (list of (H, W, 3) or [n, H, W, 3]) at the tower's own input size (no
    position-table resampling) -> (tokens [n, C, h, w] for CLIP-perceptual, embeddings [n, D] for Eq. 7).
    Images are squashed to the square input, as for LPIPS and Gram."""
    return frozen.vision(resize(images, frozen.image_size()).to(next(frozen.parameters()).dtype))


def siglip_rows(frozen, packed, ids):
    """One siglip_targets pass over frame 0 of the image samples `ids`, shared by CLIP-perceptual and the Eq. 7
    teacher -> rows(which, samples): 'tokens' [n, C, h, w] or 'embedding' [n, D] of `samples` (any of ids), in
    that order."""
    order, frames = image_frames(packed.feats, packed, ids)
    feats = dict(zip(('tokens', 'embedding'), siglip_targets(frozen, frames)))
    at = {i: j for j, i in enumerate(order)}

    def rows(which, samples):
        return feats[which].index_select(0, host_to([at[i] for i in samples], feats[which].device, torch.long))
    return rows


def image_rec_terms(rec, target, frozen, cfg, target_tokens=None):
    """Perceptual terms of Eq. 6 for images (lists of (H, W, 3) or same-size groups [n, H, W, 3], in [-1, 1])
    -> dict of per-image [n].
    LPIPS and Gram on perceptual_size^2 copies (one VGG pass serves both); CLIP-perceptual against
    target_tokens (siglip_targets; computed here when not given)."""
    dtype = next(frozen.parameters()).dtype
    out = {}
    if cfg.lpips or cfg.gram:
        fr = frozen.vgg_features(resize(rec, cfg.perceptual_size).to(dtype))
        with torch.no_grad():
            ft = frozen.vgg_features(resize(target, cfg.perceptual_size).to(dtype))
        out['lpips'] = lpips_from_features(fr, ft, frozen.lpips.lins).float()
        out['gram'] = gram_loss(fr, ft)
    if cfg.clip:
        tr = frozen.vision(resize(rec, frozen.image_size()).to(dtype))[0]
        tt = siglip_targets(frozen, target)[0] if target_tokens is None else target_tokens
        out['clip'] = clip_perceptual_loss(tr, tt)
    return out


def patch_l1(rec, packed, ids):
    """Eq. 6 L1 of the image and video samples `ids`: per sample, the mean of |rec - packed.feats| over its
    patches (paper 3.5: normalised over patches), rec [N, C] the decoded patches -> [B], 0 for the other samples.
    A one-frame sample (an image) holds its pixels in the pt = 0 slot of each patch and temporal padding in the
    others (paper 3.2, model.prepare): its L1 covers slot 0 only."""
    B, dev = len(packed.seqlens), rec.device
    d = (rec.float() - packed.feats.float()).abs()                              # [N, C]
    c1 = packed.patch_size[1] * packed.patch_size[2] * 3                        # one frame's columns
    cols = np.array([c1 if k != 'video' else d.shape[1] for k in packed.kinds])   # real columns per sample
    if (cols < d.shape[1]).any():                                            # one-frame samples: slot 0 only
        keep = np.repeat(cols, packed.seqlens)[:, None] > np.arange(d.shape[1])[None]   # [N, C]
        d = d * host_to(keep, dev)
    st = packed.structure
    sample_id = st.sample_id if st is not None else host_to(np.repeat(np.arange(B), packed.seqlens), dev, torch.long)
    sums = d.new_zeros(B).index_add(0, sample_id, d.sum(1))                     # [B]
    w = np.zeros(B)
    w[ids] = 1.0 / (np.asarray(packed.seqlens)[ids] * cols[ids])
    return sums * host_to(w, dev)


def reconstruction_loss(out, packed, frozen, cfg, ids, views=None, siglip=None):
    """L_rec (Eq. 6) of the reconstruction samples `ids`: the mean over them of each sample's
    l1 * L1 + lpips * LPIPS + gram * Gram + clip * CLIP (the last three for images) -> (scalar, dict of the
    detached means of the parts). L1: patch_l1 for images and videos (out['rec'] [N, C] vs packed.feats); for 3D
    sample i, over its rendered views, views[i] = (pred, target) [V, H, W, 3]. The perceptual terms compare frame 0
    of each image (image_rec_terms); siglip: the batch's siglip_rows (CLIP-perceptual's target tokens)."""
    B, kinds, dev = len(packed.seqlens), packed.kinds, packed.feats.device
    pix = [i for i in ids if kinds[i] != '3d']
    if pix and 'rec' not in out:
        raise ValueError("reconstruction tasks need the decoder output: call the model with decode=True")
    l1 = patch_l1(out['rec'], packed, pix) if pix else packed.feats.new_zeros(B, dtype=torch.float32)   # [B]
    for i in (i for i in ids if kinds[i] == '3d'):
        if not views or i not in views:
            raise ValueError(f"3D sample {i} has a reconstruction task but no rendered views")
        pred, target = views[i]
        l1 = l1.index_put((torch.tensor([i], device=dev),), l1_loss(pred.float(), target.float()).reshape(1))
    w = np.zeros(B)
    w[ids] = 1.0 / len(ids)
    w = host_to(w, dev)                                                       # [B]
    logs = {'l1': (l1 * w).sum().detach()}
    per = cfg.l1 * l1                                                           # per-sample L_rec, [B]
    img = [i for i in ids if kinds[i] == 'image']
    if img and (cfg.lpips or cfg.gram or cfg.clip):
        order, rec_frames = image_frames(out['rec'], packed, img)
        _, tgt_frames = image_frames(packed.feats, packed, img)
        tt = siglip('tokens', order) if cfg.clip else None
        at = host_to(order, dev, torch.long)
        for name, vals in image_rec_terms(rec_frames, tgt_frames, frozen, cfg, tt).items():
            logs[name] = vals.detach().mean()
            per = per + getattr(cfg, name) * l1.new_zeros(B).index_copy(0, at, vals.float())
    return (per * w).sum(), logs


def semantic_terms(emb, teacher, img_captions, other_emb, other_captions, frozen, cfg, temperature,
                   text=None, pad=0):
    """L_sem parts: Eq. 7 distillation for images (student emb vs the frozen teacher's embeddings of the
    same images, both [n, D]), the sigmoid loss for videos / 3D (other_emb [m, D]; images too with
    image_und='sigmoid'). text: the trainable text tower (train_text), else the frozen one. Returns a dict.
    pad: 0 for this process's rows alone; else the row count M every rank pads to (the same on all ranks), and
    both losses run over every rank's rows gathered [W*M, D] (the global batch; every rank must call it for the
    same task). With one process and pad = n it gives the pad = 0 values."""
    out = {}
    encode_text = text if text is not None else frozen.encode_text
    if img_captions:
        # the softmax runs over the batch's distinct captions: kept once on the host for one rank's rows; for the
        # gathered rows, every image's caption is a column and the repeats are masked (first_captions)
        txt = encode_text(img_captions if pad else list(dict.fromkeys(img_captions)))           # [K, D]
        if txt.shape[1] != emb.shape[1]:
            raise ValueError(f"student embedding width {emb.shape[1]} != text tower width {txt.shape[1]}")
        valid = first = None
        if pad:
            dev = emb.device
            emb, teacher, txt = gather_rows(emb, pad), gather_rows(teacher.float(), pad), gather_rows(txt, pad)
            valid = valid_rows(len(img_captions), pad, dev)                                        # [G]
            first = first_captions(img_captions, valid, pad)                                       # [G]
        scale = frozen.teacher_scale()                              # similarities as SigLIP2 logits
        out['distill'] = distillation_loss(scale * teacher.float() @ txt.float().t(),
                                           scale * emb.float() @ txt.float().t(), cfg.tau, valid, first)
    if other_captions:
        if temperature is None:
            raise ValueError("video/3D understanding needs the learnable SigmoidTemperature")
        txt = encode_text(other_captions)                                                          # [m, D]
        valid = None
        if pad:
            valid = valid_rows(len(other_captions), pad, other_emb.device)                         # [G]
            other_emb, txt = gather_rows(other_emb, pad), gather_rows(txt, pad)                    # [G, D]
        out['sigmoid'] = sigmoid_loss(other_emb, txt, temperature.logit_scale, temperature.logit_bias, valid)
    return out


def sample_rows(x, ids):
    """Rows `ids` of x [B, ...], one per sample: x itself when ids is every sample."""
    if len(ids) == len(x):
        return x
    return x.index_select(0, host_to(ids, x.device, torch.long)) if ids else x[:0]


def understanding_loss(out, packed, frozen, cfg, ids, captions, siglip=None, temperature=None, text=None, gather=0):
    """L_sem of the understanding samples `ids` (semantic_terms): Eq. 7 distillation for the images when
    image_und='distill' (teacher: the frozen SigLIP2 embeddings [n, D] of their frame 0, from the batch's
    siglip_rows), the sigmoid loss for the others. out['embedding'] [B, D] the student embeddings, captions[i]
    sample i's text; temperature, text, gather: semantic_terms' temperature, text, pad
    -> (scalar, dict of the detached terms)."""
    img = [i for i in ids if packed.kinds[i] == 'image' and cfg.image_und == 'distill']
    oth = [i for i in ids if i not in img]                          # videos, 3D (and images: 'sigmoid')
    teacher = siglip('embedding', img) if img else None             # [n, D]
    emb = out['embedding']
    terms = semantic_terms(sample_rows(emb, img), teacher, [captions[i] for i in img], sample_rows(emb, oth),
                           [captions[i] for i in oth], frozen, cfg, temperature, text, pad=gather)
    return sum(terms.values()), {k: v.detach() for k, v in terms.items()}


def token_weights(packed, ids, device):
    """[N] weights that make a sum over tokens the mean over the tokens of samples `ids` (1 / their token count
    on them, 0 elsewhere); None when ids is every sample (a plain mean)."""
    B = len(packed.seqlens)
    if len(ids) == B:
        return None
    w = np.zeros(B)
    w[ids] = 1.0 / sum(packed.seqlens[i] for i in ids)
    return host_to(np.repeat(w, packed.seqlens), device)


def compute_losses(out, packed, frozen, cfg, tasks=None, captions=None, views=None, temperature=None,
                   text=None, gather=0):
    """The total loss (Eq. 4) of one packed batch mixing images, videos and 3D, each sample a reconstruction
    ('rec') or an understanding ('und') task: cfg.rec * L_rec + cfg.sem * L_sem + cfg.kl * L_KL, with L_rec
    (reconstruction_loss, Eq. 6) and L_KL (kl_loss, over their tokens) from the reconstruction samples and L_sem
    (understanding_loss, Eq. 7 / SigLIP) from the understanding samples.

    out: AToken.forward(packed) dict (rec [N, C] patches, mean/logvar [N, L], embedding [B, D]; the embedding may
    be None (embed=False) when no sample has an understanding task).
    packed: the input batch (targets = packed.feats; kinds 'image' | 'video' | '3d'), with its structure.
    tasks: per sample 'rec' | 'und' (default 'rec'); understanding needs captions[i].
    views: {i: (pred [V, H, W, 3], target [V, H, W, 3])} renders for 3D sample i (its L1 is on views).
    temperature: the SigmoidTemperature; text: a TrainableText (cfg.train_text) that replaces the frozen text tower.
    gather: 0, or the number of rows M every rank pads its understanding samples to: the semantic terms then
    run over all ranks' micro-batches together (semantic_terms with pad; under torch.distributed, cfg.global_batch).
    Every per-sample term is one masked computation over the whole batch (weights made on the host from the task
    list), so the ops do not grow with the number of samples and nothing is read back from the device.
    Returns (total, dict of detached terms, still on the device).
    """
    B, kinds = len(packed.seqlens), packed.kinds
    tasks = tasks or ['rec'] * B
    if set(tasks) - {'rec', 'und'}:
        raise ValueError(f"tasks are 'rec' or 'und', got {sorted(set(tasks) - {'rec', 'und'})}")
    rec_ids = [i for i in range(B) if tasks[i] == 'rec']
    und_ids = [i for i in range(B) if tasks[i] == 'und']
    for i in und_ids:
        if not captions or not captions[i]:
            raise ValueError(f"sample {i} ({kinds[i]}) has an understanding task but no caption")
    if und_ids and out.get('embedding') is None:
        raise ValueError("understanding tasks need the pooled embedding: call the model with embed=True")
    like = out['embedding'] if out.get('embedding') is not None else out['rec']   # a tensor on the device
    zero = like.new_zeros((), dtype=torch.float32)
    # one frozen SigLIP2 pass over the target images serves both CLIP-perceptual and the distillation teacher
    distill = cfg.image_und == 'distill'
    need = [i for i in range(B) if kinds[i] == 'image' and ((i in und_ids and distill) or (i in rec_ids and cfg.clip))]
    siglip = siglip_rows(frozen, packed, need) if need else None

    rec, kl, sem, logs = zero, zero, zero, {}
    if rec_ids:
        rec, logs = reconstruction_loss(out, packed, frozen, cfg, rec_ids, views, siglip)
        kl = kl_loss(out['mean'], out['logvar'], token_weights(packed, rec_ids, zero.device))
        logs['kl'] = kl.detach()
    if und_ids:
        sem, terms = understanding_loss(out, packed, frozen, cfg, und_ids, captions, siglip, temperature, text, gather)
        logs.update(terms)
    total = cfg.rec * rec + cfg.sem * sem + cfg.kl * kl                        # Eq. 4
    logs.update(rec=rec.detach(), sem=sem.detach(), kl=kl.detach(), total=total.detach())
    return total, logs
