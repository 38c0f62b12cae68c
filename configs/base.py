# AToken-Base: the same four-stage curriculum with the Base (ViT-B/16 SigLIP2) tokenizer (~182M parameters).
# Hardware/command: 8-64 H100s; `torchrun --nproc_per_node=8 train.py configs/base.py --parallel=ddp`.
# Expected: the paper's Base scaling study (Fig. 7): good stage-1 images, weaker once video is added.
exec(open(__file__.replace('base.py', 'so400m.py')).read())   # everything as So400m, then:
out_dir = 'out/base'
preset = 'base'
init_siglip2 = 'ViT-B-16-SigLIP2-256'
loss = dict(siglip_model='ViT-B-16-SigLIP2-256')    # 768-d text space = the Base encoder width
parallel = 'ddp'
