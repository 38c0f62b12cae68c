# CPU demo: the whole curriculum (images -> +video -> +3D -> FSQ) on built-in procedural data, tiny model.
# Hardware/command: any laptop or the 2-core CI machine; `python train.py configs/cpu_tiny.py`.
# Expected: ~10.5 minutes on 2 cores, then out_dir/summary.json (each metric vs its baseline) and curves.png.
out_dir = 'out/cpu_tiny'
# Compression as in the paper: the tiny preset keeps 12 floats per 4x8x8x3 patch (16x fewer floats than an image's
# pixels, 64x for video; So400m: 48 per 4x16x16x3), 8 of them in stage 1 (as 32 of 48), FSQ 2 x 4096 codes.
preset = 'tiny'
model = dict(gs_width=64, gs_depth=2, gs_heads=2, gs_mlp=128, gs_per_voxel=8, gs_resolution=16)
# Nothing can be downloaded here, so the frozen nets are random (random_frozen). Random VGG / SigLIP features
# carry no perceptual meaning and cost most of the CPU time, so LPIPS, Gram and CLIP are off in this demo.
# A real run keeps the paper's weights.
# Understanding: a random SigLIP text tower and teacher mean nothing, so the demo trains the tiny text tower
# with the sigmoid loss on the built-in captions (SigLIP from scratch) and uses that loss for images too;
# zero-shot accuracy then measures real image-text alignment. A real run keeps the paper's frozen SigLIP2.
# The tower's word table (49,408 x 64: 3.2M parameters, ten times the tokenizer) stays fixed and random
# (train_text_embedding=False): the captions use ~60 words, each keeps its own vector, and AdamW, clipping and
# EMA skip the table. No tiny teacher: a teacher trained here would know only what the student can learn from the
# same captions.
# With LPIPS (x10), Gram (x1e3) and CLIP off, L_rec = L1 alone is ~20x smaller than in the paper's balance
# against L_sem; l1=20 restores that balance (otherwise the semantic loss dominates the shared encoder).
loss = dict(siglip_model='tiny', random_frozen=True, lpips=0.0, gram=0.0, clip=0.0, l1=20.0, image_und='sigmoid',
            train_text=True, train_text_embedding=False, sigmoid_bias_init=-5.0, sample_posterior=False)
# sample_posterior=False: a 10-minute run cannot wait for the posterior std to shrink from 1; the paper's runs sample.
n_images, n_videos, n_3d = 2048, 512, 48
video_frames = 8
views_3d, view_res_3d = 4, 32
lr, min_lr, warmup_steps = 2e-3, 2e-4, 50
encoder_lr_mult = 1.0               # no pretrained encoder on CPU: train it at the full rate
ema_decay = 0.99
# The tiny model gains little from a 2nd torch thread, while rendering the built-in data costs about as much as
# the step: one torch thread plus one DataLoader worker per task stream overlap them.
threads, num_workers = 1, 1
# Each worker renders a built-in sample once (at its native size) and keeps it, and each size it is drawn at, as
# uint8, so later epochs cost a look-up.
# eval every 200 steps (learning curves, on eval_n // 4 samples); the final summary uses 48 held-out images, 24 videos
# and 24 objects (fewer images gave zero-shot figures that moved between identical-config runs)
log_interval, ckpt_interval, eval_interval, eval_n = 10, 100, 200, 48
# grad_accum micro-batches per step cycle through the mix across steps (train.step_tasks): a task with
# weight w of a total W gets w/W of the stage's micro-batches even when grad_accum < W. Video gets most of
# stages 2-3 (its PSNR still rises at the end); 3D keeps 4 of 13, enough for its target; images stay below bicubic
# whatever their share (NOTES.md).
stages = [
    dict(name='stage1_image', steps=200, mix={'image_rec': 2, 'image_und': 1}, grad_accum=3, tokens=1024,
         image_res=(32, 64), latent_channels=8),
    dict(name='stage2_video', steps=180, mix={'image_rec': 1, 'image_und': 1, 'video_und': 1, 'video_rec': 7},
         grad_accum=5, tokens=1024, image_res=(32, 64), video_res=(32, 48), latent_channels=12),
    dict(name='stage3_3d', steps=460, mix={'image_rec': 1, 'image_und': 1, 'video_und': 1, 'video_rec': 5,
                                           '3d_und': 1, '3d_rec': 4},
         grad_accum=5, tokens=1024, image_res=(32, 64), video_res=(32, 48), latent_channels=12),
    dict(name='stage4_fsq', steps=100, mix={'image_rec': 2, 'image_und': 1, 'video_und': 1, 'video_rec': 3,
                                            '3d_und': 1, '3d_rec': 4},
         grad_accum=5, tokens=1024, image_res=(32, 64), video_res=(32, 48), latent_channels=12,
         use_quantizer=True),
]
