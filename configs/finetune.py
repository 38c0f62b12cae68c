# Fine-tune Apple's released AToken-So/D (FSQ) on your own images, videos and 3D assets: one stage, paper losses.
# Hardware/command: 1-8 GPUs with >= 40 GB; `torchrun --nproc_per_node=8 train.py configs/finetune.py --image_dir=...`.
# Expected: not yet run at this scale (tests/test_finetune.py shows the loss falling on CPU); results go to out_dir/tokenizer.pt
# (ours, for eval.py) and out_dir/official_finetune/ (Apple's layout + YAML).
#
# What this does: starts from the released checkpoint (downloaded once into $ATOKEN_CACHE; or give a file with
# init_config = its YAML), keeps its architecture and its quantizer (So/D: FSQ 8 x 4096, so the fine-tuned
# tokens stay in the same codebook; use init_from = 'atoken-soc' for continuous latents), and trains with the
# paper's weights (0.2 rec with L1 + 10 LPIPS + 1e3 Gram + CLIP, 1.0 distillation from the frozen SigLIP2
# teacher for images, which keeps the embedding in the text space, 1e-8 KL). The learning rate is 10x below
# pre-training's and warms up over 500 steps so the released weights move slowly; EMA 0.999 suits a short run.
# Understanding needs captions: give a JSONL / CSV manifest (file, caption) as image_dir, or drop 'image_und'.
# Variants: --freeze_encoder=True keeps the released encoder and embeddings exactly (the decoder adapts to your
# domain; drop 'image_und', which then trains nothing); --freeze_decoder=True adapts only the encoder side. Add '3d_rec' with asset_dir and
# init_gs = '3d_decode_gs' to fine-tune the Gaussian decoder too. eval.py --checkpoint=out/finetune/tokenizer.pt
# --images=<held-out folder> --latent=fsq measures the result.
out_dir = 'out/finetune'
init_from = 'atoken-sod'
init_gs = '3d_decode_gs'
parallel = 'ddp'            # ~850M parameters fit on one GPU each; use fsdp below 40 GB
dtype = 'bfloat16'
compile = True
num_workers = 8
image_dir, video_dir, asset_dir = 'data/images.jsonl', 'data/videos', 'data/assets3d'
loss = dict(siglip_model='ViT-SO400M-16-SigLIP2-256')
lr, min_lr, warmup_steps = 3e-5, 3e-6, 500
encoder_lr_mult, ema_decay, weight_decay = 0.1, 0.999, 0.1
log_interval, ckpt_interval, eval_interval = 50, 1000, 0
export_official = True
# one stage; the mix is the paper's stage-4 shares restricted to what you have (drop tasks without data)
stages = [
    dict(name='finetune', steps=10_000,
         mix={'image_rec': 2, 'image_und': 1, 'video_rec': 4, 'video_und': 1, '3d_rec': 1, '3d_und': 1},
         grad_accum=10, tokens=16384, image_res=(64, 1024), video_res=(64, 512)),
]
