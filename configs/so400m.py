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
captions_3d = 'data/Cap3D_automated_Objaverse_full.csv'   # Cap3D's captions (paper Sec. 3.5), by asset id
loss = dict(siglip_model='ViT-SO400M-16-SigLIP2-256')   # paper weights: 0.2 rec, 1 sem, 1e-8 KL, ...
lr, min_lr, warmup_steps = 3e-4, 3e-5, 2000
encoder_lr_mult, ema_decay, weight_decay = 0.1, 0.9999, 0.1
log_interval, ckpt_interval, eval_interval = 50, 2000, 10000
# tokens: per rank per micro-batch (a 512 px image is 1024 tokens). grad_accum micro-batches per step cycle
# through the mix in proportion (train.task_schedule). Table 2 lists I^r, V^u, V^r, 3D^u, 3D^r; image
# understanding (distillation, batch 8192 'throughout all stages') is its own share of every cycle.
# batch: each task's global batch (one micro-batch of the task over all ranks) as Sec. 3.5 gives it for 256 GPUs:
# image understanding 8,192; image reconstruction 1,024-4,096 (here 4,096 up to 512 px, 2,048 up to 1024, 1,024
# up to 2048: the batch shrinks as the sizes grow); video reconstruction 512-1,024 (1,024 in stage 2, 512 once
# clips reach 1024 px); 3D reconstruction 256-512 (512). Video and 3D understanding are not stated: 512 each (our
# choice). Each rank's micro-batch holds batch / world samples, or fewer when its token budget fills first
# (train.describe prints up to which size they fit). task_tokens: understanding runs the encoder alone (no decoder,
# no perceptual nets), about half the activations per token, so it gets twice the budget; 3D too: two assets of up
# to 16k surface voxels, or one of up to 32k (a cube's surface on the 64^3 grid is ~24.6k), fit a micro-batch; an
# asset over 32k is left out and named (data.TokenBudgetSampler).
_und = {'image_und': 32768, 'video_und': 32768, '3d_und': 32768, '3d_rec': 32768}
_s3 = dict(mix={'image_rec': 2, 'image_und': 1, 'video_und': 1, 'video_rec': 4, '3d_und': 1, '3d_rec': 1},
           grad_accum=10, tokens=16384, image_res=(64, 2048), video_res=(64, 1024), latent_channels=48,
           batch={'image_rec': 1024, 'image_und': 8192, 'video_und': 512, 'video_rec': 512, '3d_und': 512,
                  '3d_rec': 512}, task_tokens=_und)
stages = [
    dict(name='stage1_image', steps=200_000, mix={'image_rec': 1, 'image_und': 1}, grad_accum=2,
         tokens=16384, image_res=(64, 512), latent_channels=32,
         batch={'image_rec': 4096, 'image_und': 8192}, task_tokens={'image_und': 32768}),
    dict(name='stage2_video', steps=200_000,
         mix={'image_rec': 2, 'image_und': 1, 'video_und': 1, 'video_rec': 6}, grad_accum=10,
         tokens=16384, image_res=(64, 1024), video_res=(64, 512), latent_channels=48,
         batch={'image_rec': 2048, 'image_und': 8192, 'video_und': 512, 'video_rec': 1024},
         task_tokens={'image_und': 32768, 'video_und': 32768}),
    dict(name='stage3_3d', steps=50_000, **_s3),
    dict(name='stage4_fsq', steps=100_000, use_quantizer=True, **_s3),
]
