"""
Train AToken. For now: the CPU demo that trains the tiny tokenizer on built-in procedural images and
videos (a fresh batch each step) and prints reconstruction PSNR before and after, on training media and
on held-out media. (The four-stage curriculum, configs, checkpoints and torchrun come with the training issue.)

    python train.py                 # ~2 minutes on 2 CPU cores
    python train.py --steps=50      # any TrainConfig field as --key=value
"""
import math
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

import data
import model


@dataclass
class TrainConfig:
    steps: int = 400
    lr: float = 5e-3
    n_images: int = 6               # per step (and in each evaluation set)
    n_videos: int = 2
    seed: int = 0
    preset: str = 'tiny'


def parse_args(argv):
    """--key=value overrides of TrainConfig; unknown keys and bad values are errors."""
    cfg, known = TrainConfig(), {f.name: f.type for f in fields(TrainConfig)}
    for arg in argv:
        key, sep, value = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not sep or key not in known:
            raise SystemExit(f"unknown argument {arg!r}; expected --key=value with key in {sorted(known)}")
        try:
            setattr(cfg, key, known[key](value))
        except ValueError:
            raise SystemExit(f"--{key}: cannot read {value!r} as {known[key].__name__}")
    return cfg


def psnr(x, y):
    """PSNR in dB of media in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / F.mse_loss(x.clamp(-1, 1), y).item())


def mean_psnr(tok, media):
    """Mean PSNR of tok.reconstruct over media (compared with the centre-cropped, frame-cut input)."""
    recs = tok.reconstruct(media)
    vals = []
    for x, r in zip(media, recs):
        target, _ = model.prepare(x, tok.config.patch_size)
        vals.append(psnr(r, target[0] if x.dim() == 3 else target))
    return sum(vals) / len(vals)


def main(cfg):
    torch.manual_seed(cfg.seed)
    mcfg = model.PRESETS[cfg.preset]
    patch = mcfg.patch_size[1]
    train_media = data.synthetic_media(cfg.n_images, cfg.n_videos, 'train', cfg.seed, patch)
    val_media = data.synthetic_media(cfg.n_images, cfg.n_videos, 'val', cfg.seed, patch)
    tok = model.AToken(mcfg).init_weights()
    print(f"model {cfg.preset}: {tok.num_params() / 1e6:.2f}M parameters; "
          f"{len(train_media)} train / {len(val_media)} held-out media; device cpu, fp32")
    before = (mean_psnr(tok.eval(), train_media), mean_psnr(tok, val_media))

    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    tok.train()
    t0 = time.time()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group['lr'] = lr
        batch = tok.pack(data.synthetic_media(cfg.n_images, cfg.n_videos, 'train', 100 * (step + 1), patch))
        out = tok(batch)
        loss = F.l1_loss(out['rec'], batch.feats)     # L1 averaged over patches (paper Eq. 4, pixels only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            print(f"step {step:4d}  L1 {loss.item():.4f}  lr {lr:.2e}  {time.time() - t0:.1f}s")
    after = (mean_psnr(tok.eval(), train_media), mean_psnr(tok, val_media))
    print("\nreconstruction PSNR (dB)  before  after")
    print(f"  training media          {before[0]:6.2f}  {after[0]:6.2f}")
    print(f"  held-out media          {before[1]:6.2f}  {after[1]:6.2f}")
    return after


if __name__ == '__main__':
    main(parse_args(sys.argv[1:]))
