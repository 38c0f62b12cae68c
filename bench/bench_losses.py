"""
What does each term of the training objective cost? Times forward and forward+backward of every term of
losses.py (L1, LPIPS, Gram, CLIP-perceptual, KL, distillation, sigmoid) and of the full compute_losses for
a batch of 8 images at 256x256 (patch 4x16x16, the So400m tokenizer's, 48 latent channels), on CPU, with
random frozen nets (random_frozen=True: the numbers are costs, not meaningful loss values).

Each term is timed as it runs in training: resize to its input size, the frozen network on the
reconstruction (with grad) and on the target (no grad), the loss; backward goes to the reconstruction
patches / latent mean and logvar / student embedding. LPIPS and Gram each pay for their own VGG16 pass
here; inside compute_losses they share one. "full" is compute_losses on all 8 images, once with task 'rec'
(L1 + LPIPS + Gram + CLIP + KL) and once with 'und' (distillation; the sigmoid loss is for videos / 3D), as
training runs them in separate micro-batches.

    python bench/bench_losses.py                    # tiny random SigLIP (64 px, width 64): ~1 min on 2 cores
    python bench/bench_losses.py --siglip so400m    # random ViT-SO400M-16-SigLIP2-256: builds in ~35 s, slow
    options: --batch 8 --size 256 --reps 3 --warmup 1 --threads N --perceptual_size 224
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import argparse
import dataclasses
import importlib.util
import statistics
import time
import warnings

import torch

import losses
import model

SO400M = 'ViT-SO400M-16-SigLIP2-256'
CAPTIONS = ['a red cube on a table', 'a dog running on grass', 'a city street at night', 'a bowl of fruit',
            'a mountain lake', 'a close-up of a cat', 'two people playing chess', 'a white sailboat']


def build_frozen(cfg, siglip):
    """FrozenNets with the tiny SigLIP, or with a random ViT-SO400M-16-SigLIP2-256. The real SigLIP2 Gemma
    tokenizer needs `transformers` and a Hugging Face download; without it the So400m towers are used with
    open_clip's bundled BPE tokenizer (64 tokens): the same text-tower compute, other token ids."""
    if siglip == 'tiny':
        return losses.FrozenNets(cfg, embed_dim=64), 'tiny (random, 64 px, width 64)'
    if importlib.util.find_spec('transformers') is not None:
        try:
            return losses.FrozenNets(dataclasses.replace(cfg, siglip_model=SO400M), embed_dim=1152), \
                f'{SO400M} (random, its own tokenizer)'
        except RuntimeError as e:
            print(f"could not build {SO400M} with its tokenizer ({str(e)[:120]}...): bundled BPE tokenizer")
    import open_clip
    frozen = losses.FrozenNets(cfg, embed_dim=64)
    frozen.siglip = open_clip.create_model(SO400M, pretrained=None)
    frozen.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=64)
    frozen.requires_grad_(False)
    frozen.eval()
    return frozen, f'{SO400M} (random, BPE tokenizer: no transformers / offline)'


def timed(fn, reps, warmup):
    """Median ms of the forward (loss = fn()) and of forward + loss.backward(), over reps after warmup."""
    fwd, both = [], []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        loss = fn()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append((t1 - t0) * 1e3)
            both.append((t2 - t0) * 1e3)
    return statistics.median(fwd), statistics.median(both)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--siglip', choices=['tiny', 'so400m'], default='tiny')
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--size', type=int, default=256)
    ap.add_argument('--perceptual_size', type=int, default=losses.LossConfig.perceptual_size)
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--warmup', type=int, default=1)
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings('ignore')
    torch.manual_seed(0)

    # ---- frozen nets and a synthetic batch (stand-in for the tokenizer's output)
    cfg = losses.LossConfig(siglip_model='tiny', random_frozen=True, perceptual_size=args.perceptual_size)
    t0 = time.perf_counter()
    frozen, siglip_name = build_frozen(cfg, args.siglip)
    build_s = time.perf_counter() - t0
    D = frozen.encode_text(['x']).shape[1]
    mcfg = model.PRESETS['so400m']
    B, S = args.batch, args.size
    packed = model.pack([torch.rand(S, S, 3) * 2 - 1 for _ in range(B)], mcfg.patch_size)
    N = packed.feats.shape[0]
    rec = (packed.feats + 0.1 * torch.randn_like(packed.feats)).requires_grad_()       # [N, C] patches
    mean = (0.1 * torch.randn(N, mcfg.latent_channels)).requires_grad_()               # [N, L]
    logvar = (-2 + 0.1 * torch.randn(N, mcfg.latent_channels)).requires_grad_()
    emb = torch.nn.functional.normalize(torch.randn(B, D), dim=-1).requires_grad_()  # [B, D] student
    temperature = losses.SigmoidTemperature()
    ids = list(range(B))
    captions = (CAPTIONS * (B // len(CAPTIONS) + 1))[:B]
    target = losses.image_frames(packed.feats, packed, ids)[1]                                 # B x (S, S, 3)
    dtype = next(frozen.parameters()).dtype

    def vgg_pair():
        fr = frozen.vgg_features(losses.resize(losses.image_frames(rec, packed, ids)[1], cfg.perceptual_size).to(dtype))
        with torch.no_grad():
            ft = frozen.vgg_features(losses.resize(target, cfg.perceptual_size).to(dtype))
        return fr, ft

    def clip_term():
        s = frozen.image_size()
        tr = frozen.vision(losses.resize(losses.image_frames(rec, packed, ids)[1], s).to(dtype))[0]
        with torch.no_grad():
            tt = frozen.vision(losses.resize(target, s).to(dtype))[0]
        return losses.clip_perceptual_loss(tr, tt).mean()

    out = dict(rec=rec, mean=mean, logvar=logvar, embedding=emb)
    terms = {
        'L1': lambda: losses.l1_loss(rec, packed.feats),
        'LPIPS (own VGG pass)': lambda: losses.lpips_from_features(*vgg_pair(), frozen.lpips.lins).mean(),
        'Gram (own VGG pass)': lambda: losses.gram_loss(*vgg_pair()).mean(),
        'CLIP-perceptual': clip_term,
        'KL': lambda: losses.kl_loss(mean, logvar),
        'distillation': lambda: losses.semantic_terms(emb, losses.siglip_targets(frozen, target)[1], captions,
                                                      emb[:0], [], frozen, cfg, None)['distill'],
        'sigmoid': lambda: losses.semantic_terms(emb[:0], [], [], emb, captions, frozen, cfg,
                                                 temperature)['sigmoid'],
        'full compute_losses rec': lambda: losses.compute_losses(out, packed, frozen, cfg, tasks=['rec'] * B)[0],
        'full compute_losses und': lambda: losses.compute_losses(out, packed, frozen, cfg, tasks=['und'] * B,
                                                                 captions=captions, temperature=temperature)[0],
    }

    # ---- time
    print(f"losses.py benchmark: {B} images {S}x{S} ({N} tokens of {packed.feats.shape[1]} values), "
          f"perceptual_size {cfg.perceptual_size}, SigLIP {siglip_name} (tower input {frozen.image_size()} px, "
          f"embed {D}), built in {build_s:.1f} s")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, fp32, "
          f"median of {args.reps} after {args.warmup} warm-up")
    print(f"{'term':<24} {'fwd ms':>10} {'fwd+bwd ms':>12}")
    for name, fn in terms.items():
        fwd, both = timed(fn, args.reps, args.warmup)
        for t in (rec, mean, logvar, emb, temperature.logit_scale, temperature.logit_bias):
            t.grad = None
        print(f"{name:<24} {fwd:>10.1f} {both:>12.1f}", flush=True)


if __name__ == '__main__':
    main()
