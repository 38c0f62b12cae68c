# AToken-So/C then So/D: the paper's four stages (Table 2) for the So400m tokenizer (845.7M parameters).
# Hardware/command: 256 H100s in the paper; `torchrun --nnodes=32 --nproc_per_node=8 train.py configs/so400m.py --parallel=fsdp`.
# Expected: ~550k steps in all; stage outputs ~ So/C (stage 3) and So/D (stage 4) of the paper's Table 3.
out_dir = 'out/so400m'
preset = 'so400m'
init_siglip2 = 'ViT-SO400M-16-SigLIP2-256'   # open_clip; the paper used the NaFlex variant of the same tower
parallel = 'fsdp'
dtype = 'bfloat16'
compile = True
num_workers = 8
# real data: folders of images, videos (mp4) and prepared 3D assets (python render3d.py prepare ...)
image_dir, video_dir, asset_dir = 'data/images', 'data/videos', 'data/assets3d'
loss = dict(siglip_model='ViT-SO400M-16-SigLIP2-256')   # paper weights: 0.2 rec, 1 sem, 1e-8 KL, ...
lr, min_lr, warmup_steps = 3e-4, 3e-5, 2000
encoder_lr_mult, ema_decay, weight_decay = 0.1, 0.9999, 0.1
log_interval, ckpt_interval, eval_interval = 50, 2000, 10000
# tokens: per rank per micro-batch (a 512 px image is 1024 tokens). grad_accum micro-batches per step cycle
# through the mix in proportion (train.task_schedule). Table 2 lists I^r, V^u, V^r, 3D^u, 3D^r; image
# understanding (distillation, batch 8192 'throughout all stages') is its own share of every cycle.
stages = [
    dict(name='stage1_image', steps=200_000, mix={'image_rec': 1, 'image_und': 1}, grad_accum=2,
         tokens=16384, image_res=(64, 512), latent_channels=32),
    dict(name='stage2_video', steps=200_000,
         mix={'image_rec': 2, 'image_und': 1, 'video_und': 1, 'video_rec': 6}, grad_accum=10,
         tokens=16384, image_res=(64, 1024), video_res=(64, 512), latent_channels=48),
    dict(name='stage3_3d', steps=50_000,
         mix={'image_rec': 2, 'image_und': 1, 'video_und': 1, 'video_rec': 4, '3d_und': 1, '3d_rec': 1},
         grad_accum=10, tokens=16384, image_res=(64, 2048), video_res=(64, 1024), latent_channels=48),
    dict(name='stage4_fsq', steps=100_000,
         mix={'image_rec': 2, 'image_und': 1, 'video_und': 1, 'video_rec': 4, '3d_und': 1, '3d_rec': 1},
         grad_accum=10, tokens=16384, image_res=(64, 2048), video_res=(64, 1024), latent_channels=48,
         use_quantizer=True),
]
