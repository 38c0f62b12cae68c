"""Fine-tuning from Apple's checkpoints (train.py init_from / init_gs / freeze_* / export_official) and the
official-layout export (convert.arch_from_fields, convert.save_official). CPU, no network: the tiny official-format
checkpoint of tests/data/official_tiny.pt (width 72, FSQ 8 x 4096, 16 x 16 patches) stands in for atoken-sod."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import convert
import losses
import model
import train

DATA = os.path.join(os.path.dirname(__file__), 'data')
REF = torch.load(os.path.join(DATA, 'official_tiny.pt'), weights_only=False)
GS_REF = torch.load(os.path.join(DATA, 'official_gs_tiny.pt'), weights_only=False)
CAPTIONS = ['red stripes', 'blue waves', 'green bars']


@pytest.fixture
def official(tmp_path):
    """-> (checkpoint, yaml, image manifest): the tiny official model as Apple ships one, and a folder of six
    48 x 48 PNGs (9 tokens each) with captions."""
    ckpt, cfg = tmp_path / 'atoken-tiny.pt', tmp_path / 'atoken-tiny.yaml'
    torch.save(REF['state_dict'], ckpt)
    cfg.write_text(yaml.safe_dump({'model': {'class_name': 'x', 'model_cfg': {'arch_cfg': REF['arch_cfg']}}}))
    folder = tmp_path / 'images'
    folder.mkdir()
    y, x = np.mgrid[:48, :48]
    rows = []
    for i in range(6):
        img = np.stack([np.sin(x / (3 + i)) * 127 + 128, np.cos(y / (2 + i)) * 127 + 128, np.full_like(x, 40 * i)], -1)
        Image.fromarray(img.astype(np.uint8)).save(folder / f'{i}.png')
        rows.append(json.dumps(dict(file=f'{i}.png', caption=CAPTIONS[i % 3])))
    (folder / 'manifest.jsonl').write_text('\n'.join(rows) + '\n')
    return str(ckpt), str(cfg), str(folder / 'manifest.jsonl')


def run_cfg(tmp_path, official, steps, *flags, name='run', mix="{'image_rec': 1, 'image_und': 1}"):
    ckpt, cfg, manifest = official
    path = tmp_path / f'{name}.py'
    path.write_text(f"""
init_from, init_config, image_dir = {ckpt!r}, {cfg!r}, {manifest!r}
loss = dict(siglip_model='tiny', random_frozen=True, perceptual_size=32, lpips=0.0, gram=0.0, clip=0.0)
lr, min_lr, warmup_steps, ema_decay = 1e-3, 1e-4, 2, 0.9
log_interval, ckpt_interval, eval_n = 1, 1000, 2
out_dir = {str(tmp_path / name)!r}
stages = [dict(name='ft', steps={steps}, mix={mix}, grad_accum=2, tokens=64,
               image_res=(48, 48))]
""")
    return train.load_config([str(path), *flags])


def outputs(tok, media):
    with torch.no_grad():
        o = tok(tok.pack(media), sample=False)
    return {k: v for k, v in o.items() if v is not None}


# --- official layout: config inverse and weights round trip ---------------------------------------------


def arch_of(config):
    return convert.arch_from_fields(dataclasses.asdict(config))


def test_official_arch_round_trip():
    for arch in (REF['arch_cfg'], {**REF['arch_cfg'], 'use_quantizer': False}):
        back = arch_of(model.ModelConfig.from_official(arch))
        if not arch['use_quantizer']:      # a continuous model writes no quantizer fields
            arch = {k: v for k, v in arch.items() if not k.startswith('quantizer_')}
        assert back == arch
    so400m = model.ModelConfig.from_official(convert.PRETRAINED['atoken-sod']['arch'])
    assert arch_of(so400m) == convert.PRETRAINED['atoken-sod']['arch']
    gs = model.ModelConfig.from_official(GS_REF['config'], gaussian=True)
    assert convert.gs_model_from_fields(dataclasses.asdict(gs)) == GS_REF['config']
    with pytest.raises(ValueError, match='pos_grid'):
        arch_of(model.ModelConfig(pos_grid=8))
    # the Gaussian decoder's representation constants are the official YAML's
    rep = convert.PRETRAINED['3d_decode_gs']['arch']['representation_config']
    assert (rep['voxel_size'], rep['scaling_bias'], rep['opacity_bias'], rep['3d_filter_kernel_size']) == \
        (model.GS_VOXEL_SIZE, model.GS_SCALE_BIAS, model.GS_OPACITY_BIAS, model.GS_MIN_SCALE)


@pytest.mark.parametrize('ext', ['pt', 'safetensors'])
def test_save_official_reloads_identically(tmp_path, official, ext):
    tok = model.AToken.from_pretrained(official[0], official[1])
    convert.save_official(tok.state_dict(), convert.tokenizer_yaml(dataclasses.asdict(tok.config)),
                          str(tmp_path / f'out.{ext}'), str(tmp_path / 'out.yaml'))
    again = model.AToken.from_pretrained(str(tmp_path / f'out.{ext}'), str(tmp_path / 'out.yaml'))
    assert again.config == tok.config
    media = [REF['inputs']['image'], REF['inputs']['video']]
    for k, v in outputs(tok, media).items():
        assert torch.equal(v, outputs(again, media)[k]), k
    # the files are what Apple's loader reads: a flat state dict with the official keys, the arch_cfg block
    sd = torch.load(tmp_path / 'out.pt', weights_only=True) if ext == 'pt' else \
        __import__('safetensors.torch').torch.load_file(str(tmp_path / 'out.safetensors'))
    assert sorted(sd) == sorted(REF['state_dict']) and all(torch.equal(sd[k], REF['state_dict'][k]) for k in sd)
    assert yaml.safe_load((tmp_path / 'out.yaml').read_text())['model']['model_cfg']['arch_cfg'] == REF['arch_cfg']


def test_save_official_gaussian_decoder(tmp_path):
    torch.save(GS_REF['state_dict'], tmp_path / 'gs.pt')
    (tmp_path / 'gs.yaml').write_text(yaml.safe_dump({'model': GS_REF['config']}))
    gs = model.GaussianDecoder.from_pretrained(str(tmp_path / 'gs.pt'), str(tmp_path / 'gs.yaml'))
    convert.save_official(gs.state_dict(), convert.gs_yaml(dataclasses.asdict(gs.cfg)), str(tmp_path / 'out.pt'),
                          str(tmp_path / 'out.yaml'))
    again = model.GaussianDecoder.from_pretrained(str(tmp_path / 'out.pt'), str(tmp_path / 'out.yaml'))
    with torch.no_grad():
        a = gs(GS_REF['inputs']['feats'], GS_REF['inputs']['coords_xyz'])
        b = again(GS_REF['inputs']['feats'], GS_REF['inputs']['coords_xyz'])
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- fine-tuning runs ------------------------------------------------------------------------------------


def test_finetune_starts_from_official(tmp_path, official):
    """The first forward of a fine-tuning run is the released model's: build_trainable with init_from gives
    exactly AToken.from_pretrained's outputs on the same inputs (and its config, FSQ included)."""
    cfg = run_cfg(tmp_path, official, 1)
    loss_cfg = losses.LossConfig(**cfg.loss)
    frozen = losses.FrozenNets(loss_cfg, embed_dim=72)
    net = train.build_trainable(cfg, cfg.stages[0], None, frozen, loss_cfg)
    ref = model.AToken.from_pretrained(official[0], official[1])
    assert net.tok.config == ref.config and net.tok.config.use_quantizer
    media = [REF['inputs']['image'], REF['inputs']['image_big']]
    got, want = outputs(net.tok.eval(), media), outputs(ref, media)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_finetune_run_loss_falls_and_exports_load(tmp_path, official):
    """24 steps on a folder of six captioned images: the image reconstruction loss falls; the untrained baseline
    (tokenizer_init.pt) is the official model; tokenizer.pt loads with from_pretrained and in eval.py; the
    official-layout export reloads with identical outputs."""
    import eval as ev
    cfg = run_cfg(tmp_path, official, 24, '--export_official=True')
    train.main(cfg)
    rows = [json.loads(s) for s in open(os.path.join(cfg.out_dir, 'log.jsonl'))]
    rec = [r['image_rec/total'] for r in rows]
    assert len(rec) == 24 and np.mean(rec[-4:]) < 0.8 * np.mean(rec[:4]), rec
    init = torch.load(os.path.join(cfg.out_dir, 'tokenizer_init.pt'), weights_only=True)['model']
    assert all(torch.equal(init[k], REF['state_dict'][k]) for k in REF['state_dict'])
    ours = model.AToken.from_pretrained(os.path.join(cfg.out_dir, 'tokenizer.pt'))
    off = os.path.join(cfg.out_dir, 'official_ft')
    theirs = model.AToken.from_pretrained(os.path.join(off, 'atoken.pt'), os.path.join(off, 'atoken.yaml'))
    assert ours.config == theirs.config
    assert not torch.equal(ours.decoder.out_layer.weight, REF['state_dict']['decoder.out_layer.weight'])  # trained
    media = [REF['inputs']['image'], REF['inputs']['video']]
    a, b = outputs(ours, media), outputs(theirs, media)
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = ev.main([f'--checkpoint={cfg.out_dir}/tokenizer.pt', f'--images={os.path.dirname(official[2])}',
                      '--random_nets', '--fid=false', '--understanding=false', '--latent=fsq', '--res=48,48',
                      f'--out_dir={tmp_path / "eval"}'])
    assert report['counts']['image']['evaluated'] == 6 and report['metrics']['image']['psnr'] > 0


def test_finetune_resume_is_exact_and_freezing_freezes(tmp_path, official):
    """freeze_encoder: the encoder keeps the official weights and has no optimizer state; 4 steps in one go ==
    2 steps, resume, 2 steps (weights, EMA), starting from init_from both times."""
    rec = "{'image_rec': 1}"              # image_und would train nothing with the encoder frozen (refused below)
    a = run_cfg(tmp_path, official, 4, '--freeze_encoder=True', name='a', mix=rec)
    train.main(a)
    b = run_cfg(tmp_path, official, 4, '--freeze_encoder=True', '--max_steps=2', name='b', mix=rec)
    assert train.main(b) == 2
    b.max_steps = 0
    assert train.main(b) == 4
    ca = torch.load(os.path.join(a.out_dir, 'ckpt.pt'), weights_only=False)
    cb = torch.load(os.path.join(b.out_dir, 'ckpt.pt'), weights_only=False)
    for part in ca['trainable']:
        for k, v in ca['trainable'][part].items():
            assert torch.equal(v, cb['trainable'][part][k]), (part, k)
    assert all(torch.equal(v, cb['ema'][k]) for k, v in ca['ema'].items())
    tok = ca['trainable']['tok']
    assert all(torch.equal(tok[k], v) for k, v in REF['state_dict'].items() if k.startswith('encoder.'))
    assert not torch.equal(tok['proj.weight'], REF['state_dict']['proj.weight'])       # the rest trains
    state = ca['optimizer']['state']
    assert state and not any(k.startswith('tok.encoder.') for k in state)
    assert any(k.startswith('tok.decoder.') for k in state)
    with pytest.raises(ValueError, match='image_und'):
        run_cfg(tmp_path, official, 4, '--freeze_encoder=True')


def test_init_config_errors(tmp_path, official):
    with pytest.raises(ValueError, match='init_siglip2'):
        run_cfg(tmp_path, official, 1, '--init_siglip2=ViT-B-16-SigLIP2-256')
    with pytest.raises(FileNotFoundError, match='init_from'):
        run_cfg(tmp_path, official, 1, f'--init_from={tmp_path}/missing.pt')
    with pytest.raises(ValueError, match='init_gs_config'):
        run_cfg(tmp_path, official, 1, f'--init_gs_config={official[1]}')
