"""train.py: schedule and stage functions by hand, the config loader's checks, exact resume, NaN steps,
and DDP / FSDP2 on two CPU processes (gloo)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import data
import model
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a run small enough for tests: tiny model, 32 px images, L1 + KL only (random perceptual nets are slow)
TINY_RUN = """
preset = 'tiny'
model = dict(encoder_depth=1, decoder_depth=1, gs_width=32, gs_depth=1, gs_heads=1, gs_mlp=64, gs_per_voxel=2,
             gs_resolution=16)
loss = dict(siglip_model='tiny', random_frozen=True, perceptual_size=32, lpips=0.0, gram=0.0, clip=0.0)
n_images, n_videos, n_3d, video_frames, views_3d, view_res_3d = 32, 8, 4, 8, 2, 16
lr, min_lr, warmup_steps, ema_decay = 1e-3, 1e-4, 2, 0.9
log_interval, ckpt_interval = 1, 1000
"""


def make_cfg(tmp_path, stages, *flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.py"
    path.write_text(TINY_RUN + f"stages = {stages!r}\nout_dir = {str(tmp_path / 'out')!r}\n")
    return train.load_config([str(path), *flags])


# --- pure functions -----------------------------------------------------------------------------


def test_get_lr_by_hand():
    cfg = train.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert train.get_lr(0, 1000, cfg) == pytest.approx(1e-4)           # (0 + 1) / 10 * lr
    assert train.get_lr(9, 1000, cfg) == pytest.approx(1e-3)
    # cosine: half way through the decay -> the middle of [min_lr, lr]
    assert train.get_lr(10 + 495, 1000, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert train.get_lr(1000, 1000, cfg) == pytest.approx(1e-4)
    assert train.get_lr(5000, 1000, cfg) == pytest.approx(1e-4)       # past the end: min_lr
    # a stage shorter than 10 x warmup warms up over a tenth of it
    assert train.get_lr(0, 20, cfg) == pytest.approx(5e-4)


def test_get_stage_by_hand():
    stages = [dict(name='a', steps=3), dict(name='b', steps=2), dict(name='c', steps=4)]
    got = [(i, s) for i, _, s in (train.get_stage(k, stages) for k in range(11))]
    assert got == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (2, 5)]


def test_task_schedule():
    assert train.task_schedule({'a': 2, 'b': 1}, 3) == ['a', 'b', 'a']
    s = train.task_schedule({'image_rec': 22.2, 'video_und': 11.1, 'video_rec': 66.6}, 9)
    assert (s.count('image_rec'), s.count('video_und'), s.count('video_rec')) == (2, 1, 6)
    assert s[0] == 'video_rec' and s.count('video_rec') == 6 and 'video_und' in s[:5]   # interleaved


def test_step_tasks_run_on_across_steps():
    """grad_accum < sum(mix): the round-robin continues from step to step, so no task is starved. By hand,
    smooth WRR on (a 2, b 1, c 1): current (2,1,1) -> a; (0,2,2) -> b; (2,-1,3) -> c; (4,0,0) -> a; period 4."""
    mix = {'a': 2, 'b': 1, 'c': 1}
    assert [train.step_tasks(mix, 2, k) for k in range(3)] == [['a', 'b'], ['c', 'a'], ['a', 'b']]
    assert train.step_tasks(mix, 4, 7) == ['a', 'b', 'c', 'a']
    tasks = [t for k in range(50) for t in train.step_tasks({'x': 6, 'y': 1, 'z': 3}, 3, k)]   # 150 = 15 periods
    assert (tasks.count('x'), tasks.count('y'), tasks.count('z')) == (90, 15, 45)
    with pytest.raises(ValueError, match='positive integers'):
        train.step_tasks({'a': 1.5}, 2, 0)


# --- config loading ---------------------------------------------------------------------------------


def test_config_loader(tmp_path):
    stages = [dict(name='s', steps=2, mix={'image_rec': 1}, tokens=256, image_res=(32, 32))]
    cfg = make_cfg(tmp_path, stages, '--lr=0.01', '--model.decoder_depth=3', '--loss.l1=2', '--compile=True')
    assert cfg.lr == 0.01 and cfg.model['decoder_depth'] == 3 and cfg.loss['l1'] == 2.0 and cfg.compile is True
    with pytest.raises(ValueError, match='learning_rate'):
        make_cfg(tmp_path, stages, '--learning_rate=0.1')
    with pytest.raises(ValueError, match='lr'):
        make_cfg(tmp_path, stages, '--lr=fast')
    with pytest.raises(ValueError, match='steps'):
        make_cfg(tmp_path, [dict(name='s', steps='10', mix={'image_rec': 1})])
    with pytest.raises(ValueError, match='depth'):
        make_cfg(tmp_path, stages, '--model.depth=3')
    with pytest.raises(ValueError, match='loss.random_frozen'):
        make_cfg(tmp_path, stages, '--loss.random_frozen=maybe')
    with pytest.raises(ValueError, match='resolution'):
        make_cfg(tmp_path, [dict(name='s', steps=1, mix={'image_rec': 1}, resolution=64)])
    with pytest.raises(ValueError, match='mix'):
        make_cfg(tmp_path, [dict(name='s', steps=1, mix={'audio_rec': 1})])
    with pytest.raises(ValueError, match='integer'):
        make_cfg(tmp_path, [dict(name='s', steps=1, mix={'image_rec': 0.5})])
    with pytest.raises(ValueError, match='threads=-1'):
        make_cfg(tmp_path, stages, '--threads=-1')
    assert make_cfg(tmp_path, stages, '--compile=True', '--compile_scope=tokenizer').compile_scope == 'tokenizer'
    with pytest.raises(ValueError, match="compile_scope='layers'"):
        make_cfg(tmp_path, stages, '--compile_scope=layers')
    with pytest.raises(ValueError, match="compile_scope='tokenizer' .*fsdp"):
        make_cfg(tmp_path, stages, '--compile=True', '--compile_scope=tokenizer', '--parallel=fsdp')
    bad = tmp_path / 'bad.py'
    bad.write_text("batch_size = 8\n")
    with pytest.raises(ValueError, match='bad.py.*batch_size'):
        train.load_config([str(bad)])


def test_shipped_configs_load():
    for name in sorted(os.listdir(os.path.join(ROOT, 'configs'))):
        if name.endswith('.py'):
            cfg = train.load_config([os.path.join(ROOT, 'configs', name)])
            assert cfg.stages and cfg.preset in model.PRESETS


# --- runs --------------------------------------------------------------------------------------------


def params(out):
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    return {f'{k}.{n}': v for k, sd in ck['trainable'].items() for n, v in sd.items()}, ck


STAGES = [dict(name='s1', steps=3, mix={'image_rec': 1, 'image_und': 1}, grad_accum=2, tokens=256,
               image_res=(32, 32), latent_channels=32),
          dict(name='s2', steps=3, mix={'image_rec': 1, 'video_rec': 1, '3d_rec': 1}, grad_accum=3, tokens=256,
               image_res=(32, 32), video_res=(32, 32), latent_channels=48)]


def assert_same_weights(out_a, out_b, latent):
    """Two runs' final checkpoints hold bit-identical weights and EMA (of a model with `latent` channels)."""
    pa, ca = params(out_a)
    pb, cb = params(out_b)
    assert pa.keys() == pb.keys() and pa['tok.proj.weight'].shape[0] == 2 * latent
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    for k in ca['ema']:
        assert torch.equal(ca['ema'][k], cb['ema'][k]), k


def test_resume_is_exact(tmp_path):
    """6 steps in one go == 2 steps, resume, 4 steps (crossing the 32 -> 48 widening): identical weights,
    EMA and optimizer state. The second run loads its data in a DataLoader worker (as the CPU demo does):
    items depend on their keys alone, so that changes nothing."""
    a = make_cfg(tmp_path / 'a', STAGES)
    train.main(a)
    b = make_cfg(tmp_path / 'b', STAGES, '--max_steps=2', '--num_workers=1')
    assert train.main(b) == 2
    b.max_steps = 0
    assert train.main(b) == 6
    assert_same_weights(a.out_dir, b.out_dir, latent=48)
    # the exported tokenizer loads for evaluation
    tok = model.AToken.from_pretrained(os.path.join(b.out_dir, 'tokenizer.pt'))
    assert tok.config.latent_channels == 48


def test_resume_is_exact_at_every_step(tmp_path):
    """A run stopped after every single step (stage ends, the 32 -> 48 widening and the FSQ switch included) and
    resumed each time ends bit-identical to a straight run. A stop right after a stage's last step once restarted
    the next stage from fresh weights."""
    stages = [dict(STAGES[0], steps=2, latent_channels=8), dict(STAGES[1], steps=2, latent_channels=12),
              dict(STAGES[1], name='s3', steps=1, latent_channels=12, use_quantizer=True)]
    a = make_cfg(tmp_path / 'a', stages)
    assert train.main(a) == 5
    b = make_cfg(tmp_path / 'b', stages, '--max_steps=1')
    for step in range(1, 6):
        assert train.main(b) == step
    assert_same_weights(a.out_dir, b.out_dir, latent=12)


def test_resume_refuses_a_changed_curriculum(tmp_path):
    """A checkpoint whose stage does not fit the config's stages is an error naming the file, not a fresh start."""
    b = make_cfg(tmp_path / 'b', STAGES, '--max_steps=2')
    train.main(b)
    c = make_cfg(tmp_path / 'b', [dict(STAGES[0], steps=1), STAGES[1], dict(STAGES[1], name='s3')])
    with pytest.raises(ValueError, match='ckpt.pt.*the stages changed'):
        train.main(c)


def test_threads_flag(tmp_path):
    """threads=N sets torch's intra-op threads for the run; 0 leaves torch's default alone."""
    before = torch.get_num_threads()
    try:
        train.init_compute(make_cfg(tmp_path, STAGES, '--threads=1', '--device=cpu'))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(3)
        train.init_compute(make_cfg(tmp_path, STAGES, '--device=cpu'))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_rank_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    """torchrun with more processes than GPUs: the rank names the problem instead of CUDA's 'invalid device
    ordinal' (seen with --nproc_per_node=2 on a 1-GPU machine)."""
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(RuntimeError, match='LOCAL_RANK=1 but this machine has 1 CUDA device'):
        train.init_compute(make_cfg(tmp_path, STAGES, '--device=cuda'))


def test_nan_batch_is_skipped(tmp_path, monkeypatch):
    """Pixels travel as uint8 (no NaN on the wire), so the loss is poisoned instead, from the 2nd micro-batch on."""
    real, calls = train.losses.compute_losses, [0]

    def poisoned(*a, **k):
        total, logs = real(*a, **k)
        calls[0] += 1
        return (total * float('nan'), logs) if calls[0] >= 2 else (total, logs)

    monkeypatch.setattr(train.losses, 'compute_losses', poisoned)
    cfg = make_cfg(tmp_path, [dict(name='s', steps=3, mix={'image_rec': 1}, tokens=128, image_res=(32, 32))],
                   '--max_bad_steps=100')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        train.main(cfg)
    assert any('non-finite' in str(x.message) for x in w)
    p, ck = params(cfg.out_dir)
    assert all(torch.isfinite(v).all() for v in p.values())
    assert ck['bad_steps'] >= 1
    cfg = make_cfg(tmp_path / 'stop', [dict(name='s', steps=3, mix={'image_rec': 1}, tokens=1024,
                                           image_res=(32, 32))], '--max_bad_steps=1')
    with pytest.raises(RuntimeError, match='non-finite steps in a row'):
        train.main(cfg)


def torchrun(cfg_path, out, *flags):
    """Two ranks on the CPU (gloo), also on a machine with fewer than two GPUs."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'train.py'), str(cfg_path), f'--out_dir={out}', '--device=cpu', *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]


# FSQ stage: no posterior sampling, so one process and two ranks draw no different noise
DIST = [dict(name='s', steps=2, mix={'image_rec': 1}, grad_accum=1, tokens=96, image_res=(32, 32),
             use_quantizer=True)]


def test_ddp_matches_single_process(tmp_path):
    """2 ranks x 1 micro-batch == 1 process x 2 micro-batches of the same batches (DDP averages the
    gradients, accumulation averages the losses): parameters equal to fp32 reduction-order rounding."""
    cfg = make_cfg(tmp_path, DIST)
    plan = data.TokenBudgetSampler(data.SyntheticImages(32, res=(32, 32), patch_size=(4, 8, 8)), 96).plan(0)
    assert len(plan) % 2 == 0          # otherwise the 2-rank plan would split a batch and differ
    torchrun(tmp_path / 'run.py', tmp_path / 'ddp', '--parallel=ddp')
    single = [dict(DIST[0], grad_accum=2)]
    cfg = make_cfg(tmp_path / 'one', single, '--device=cpu')
    train.main(cfg)
    pd, _ = params(tmp_path / 'ddp')
    ps, _ = params(cfg.out_dir)
    for k in ps:
        torch.testing.assert_close(pd[k], ps[k], atol=1e-5, rtol=1e-4)   # measured ~1e-7


def test_fsdp_trains_and_exports(tmp_path):
    make_cfg(tmp_path, DIST)
    torchrun(tmp_path / 'run.py', tmp_path / 'fsdp', '--parallel=fsdp')
    p, ck = params(tmp_path / 'fsdp')
    assert ck['step'] == 2 and all(torch.isfinite(v).all() for v in p.values())
    tok = model.AToken.from_pretrained(str(tmp_path / 'fsdp' / 'tokenizer.pt'))
    x = torch.rand(32, 32, 3) * 2 - 1
    assert tok.reconstruct([x])[0].shape == (32, 32, 3)


def test_ddp_global_semantic_losses_train(tmp_path):
    """Understanding tasks under 2 DDP ranks run the global-batch semantic losses (every rank's micro-batch gathered
    with gradients, losses.semantic_terms with pad) inside the training step (collectives in forward and backward
    next to DDP's own) and finish with finite weights and positive semantic losses."""
    stages = [dict(name='s', steps=2, mix={'image_und': 1, 'video_und': 1}, grad_accum=2, tokens=96,
                   image_res=(32, 32), video_res=(32, 32))]
    make_cfg(tmp_path, stages)
    torchrun(tmp_path / 'run.py', tmp_path / 'ddp', '--parallel=ddp')
    p, ck = params(tmp_path / 'ddp')
    assert ck['step'] == 2 and all(torch.isfinite(v).all() for v in p.values())
    log = [json.loads(s) for s in open(tmp_path / 'ddp' / 'log.jsonl')]
    assert all(r['image_und/distill'] > 0 and r['video_und/sigmoid'] > 0 for r in log)


def test_train_text_is_trained_exported_and_loaded_by_eval(tmp_path):
    """train_text + image_und='sigmoid' (the offline demo): the text tower is optimised with the tokenizer,
    exported as 'text_tower', and eval.py's text tower is exactly that model (ema_decay 0: EMA = weights)."""
    import eval as ev
    import losses
    stages = [dict(name='s', steps=1, mix={'image_und': 1, 'video_und': 1}, grad_accum=2, tokens=256,
                   image_res=(32, 32), video_res=(32, 32)),
              dict(name='fsq', steps=1, mix={'image_und': 1, 'image_rec': 1}, grad_accum=2, tokens=256,
                   image_res=(32, 32), use_quantizer=True)]
    cfg = make_cfg(tmp_path, stages, '--loss.train_text=True', "--loss.image_und='sigmoid'", '--ema_decay=0.0',
                   '--eval_interval=1', '--eval_n=2')
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)     # a failing periodic evaluation would only warn
        warnings.filterwarnings('ignore', message='.*(pretrained|weights).*')   # torchvision chatter
        train.main(cfg)
    # the periodic evaluation after step 1 used the continuous stage's latent, on what stage 1 trains
    r = json.load(open(os.path.join(cfg.out_dir, 'eval_1', 'report.json')))
    assert r['config']['latent'] == 'mean' and set(r['metrics']) == {'image', 'video'}
    ck = torch.load(os.path.join(cfg.out_dir, 'ckpt.pt'), weights_only=False)
    export = torch.load(os.path.join(cfg.out_dir, 'tokenizer.pt'), weights_only=True)
    torch.manual_seed(cfg.seed)                 # the frozen nets as train.main builds them: the tower it copies
    fresh = losses.FrozenNets(dataclasses.replace(losses.LossConfig(), **cfg.loss), embed_dim=64).siglip.text
    trained = {n[len('text.'):]: v for n, v in ck['trainable']['text'].items()}
    assert trained.keys() == fresh.state_dict().keys() == export['text_tower'].keys()
    # it trained: every tensor moved (the word table too, by default)
    assert all(not torch.equal(trained[n], v) for n, v in fresh.state_dict().items() if v.is_floating_point())
    notes = []
    tower = ev.load_text_tower(ev.EvalConfig(random_nets=True), export['loss_config'], 64, 'cpu', notes,
                               export['text_tower'])
    fresh.load_state_dict(trained)
    texts = ['a red circle', 'a video of a blue star spinning']
    want = torch.nn.functional.normalize(fresh(tower.tokenizer(texts)), dim=-1)
    torch.testing.assert_close(tower.encode_text(texts), want, rtol=0, atol=1e-6)
    assert tower.trained and any('trained with the tokenizer' in n for n in notes)


def test_text_embedding_frozen(tmp_path):
    """loss.train_text_embedding=False: the trainable text tower's word table stays exactly as initialised (in the
    checkpoint and the export) while the rest of the tower trains; it is neither in the optimizer nor in the EMA."""
    import losses
    stages = [dict(name='s', steps=2, mix={'image_und': 1}, grad_accum=1, tokens=256, image_res=(32, 32))]
    cfg = make_cfg(tmp_path, stages, '--loss.train_text=True', "--loss.image_und='sigmoid'",
                   '--loss.train_text_embedding=False', '--ema_decay=0.5')
    train.main(cfg)
    ck = torch.load(os.path.join(cfg.out_dir, 'ckpt.pt'), weights_only=False)
    export = torch.load(os.path.join(cfg.out_dir, 'tokenizer.pt'), weights_only=True)
    torch.manual_seed(cfg.seed)                 # the frozen nets as train.main builds them: the tower it copies
    frozen = losses.FrozenNets(dataclasses.replace(losses.LossConfig(), **cfg.loss), embed_dim=64)
    fresh = frozen.siglip.text.state_dict()
    trained = {n[len('text.'):]: v for n, v in ck['trainable']['text'].items()}
    assert torch.equal(trained['token_embedding.weight'], fresh['token_embedding.weight'])
    assert torch.equal(export['text_tower']['token_embedding.weight'], fresh['token_embedding.weight'])
    changed = [n for n, v in fresh.items() if not torch.equal(trained[n], v)]
    assert changed and 'token_embedding.weight' not in changed                  # the transformer trained
    assert 'text.text.token_embedding.weight' not in ck['ema']
    with pytest.raises(ValueError, match='train_text'):                         # without a trained tower: an error
        make_cfg(tmp_path / 'b', stages, '--loss.train_text_embedding=False')
    assert 'text.text.positional_embedding' in ck['ema']
    n_state = sum(len(g['params']) for g in ck['optimizer']['param_groups'])
    n_trainable = sum(1 for k in ck['ema'])                                     # EMA = exactly what trains
    assert n_state == n_trainable


def test_sample_posterior_switch():
    """LossConfig.sample_posterior: True draws z ~ N(mean, exp(logvar)) in training (two passes differ),
    False decodes the mean (deterministic, and equal to the eval-mode reconstruction)."""
    import types
    import losses
    torch.manual_seed(0)
    tok = model.AToken(model.PRESETS['tiny']).init_weights()
    gs, temp = model.GaussianDecoder(model.PRESETS['tiny']), losses.SigmoidTemperature()
    x = tok.pack([torch.rand(32, 40, 3) * 2 - 1])
    batch = types.SimpleNamespace(packed=x, captions=None, views=None)
    for flag in (True, False):
        cfg = losses.LossConfig(siglip_model='tiny', random_frozen=True, lpips=0.0, gram=0.0, clip=0.0,
                                sample_posterior=flag)
        net = train.Trainable(tok, gs, temp, None, cfg)
        l1 = [net(batch, 'image_rec')[1]['l1'].item() for _ in range(2)]
        assert (l1[0] != l1[1]) == flag
    with torch.no_grad():
        want = (tok(x, sample=False)['rec'][:, :192] - x.feats[:, :192]).abs().mean().item()
    assert l1[0] == pytest.approx(want, rel=1e-6)


def test_sigmoid_bias_init_reaches_the_temperature(tmp_path):
    """loss.sigmoid_bias_init sets the sigmoid loss's starting bias b (SigLIP default -10); t stays log 10."""
    import losses
    stages = [dict(name='s', steps=1, mix={'image_rec': 1})]
    for flags, b in (((), -10.0), (('--loss.sigmoid_bias_init=-5.0',), -5.0)):
        cfg = make_cfg(tmp_path, stages, *flags)
        lc = losses.LossConfig(**cfg.loss)
        net = train.build_trainable(cfg, cfg.stages[0], None, None, lc)
        assert net.temperature.logit_bias.tolist() == [b]
        assert net.temperature.logit_scale.item() == pytest.approx(math.log(10.0))


def test_final_summary_against_baselines(tmp_path, monkeypatch):
    """eval.summarise_run on train.py's curriculum: which tokenizer each comparison uses and the pass/fail
    arithmetic, on fixed metrics."""
    import eval as ev
    stages = [dict(name='s1', steps=1, mix={'image_rec': 1}), dict(name='s3', steps=1, mix={'video_rec': 1,
              '3d_rec': 1, 'image_und': 1}), dict(name='s4', steps=1, mix={'image_rec': 1}, use_quantizer=True)]
    cfg = make_cfg(tmp_path, stages)
    os.makedirs(cfg.out_dir)
    open(os.path.join(cfg.out_dir, 'tokenizer_init.pt'), 'w').close()
    metrics = {     # checkpoint -> metrics eval.py would report
        'tokenizer.pt': {'image': dict(psnr=27.0, bicubic_psnr=26.0, zs_top1=0.75, zs_chance_top1=1 / 48,
                                       zs_colour_top1=0.9, zs_chance_colour=1 / 8, zs_shape_top1=0.4,
                                       zs_chance_shape=1 / 6),
                         'video': dict(psnr=20.0), '3d': dict(psnr=19.0)},
        'tokenizer_s3.pt': {'image': dict(psnr=29.5, bicubic_psnr=27.0), 'video': dict(psnr=26.0, bicubic_psnr=25.5)},
        'tokenizer_init.pt': {'3d': dict(psnr=12.5)}}
    calls = []

    def fake(base, run_dir, out_dir, n, checkpoint='tokenizer.pt', latent='mean', modalities=()):
        assert base.seed == cfg.seed and not base.fid and run_dir == cfg.out_dir and n == cfg.eval_n
        calls.append((checkpoint, latent, sorted(modalities)))
        return dict(metrics=metrics[checkpoint])
    monkeypatch.setattr(ev, 'evaluate_export', fake)
    assert train.curriculum(cfg) == [('s1', False, {'image'}), ('s3', False, {'video', '3d', 'image'}),
                                     ('s4', True, {'image'})]
    res = ev.summarise_run(ev.held_out(cfg), cfg.out_dir, train.curriculum(cfg), cfg.eval_n)
    assert calls == [('tokenizer.pt', 'fsq', ['3d', 'image', 'video']), ('tokenizer_s3.pt', 'mean', ['image', 'video']),
                     ('tokenizer_init.pt', 'mean', ['3d'])]
    # image 29.5 >= 27 + 2; video 26.0 < 25.5 + 1; FSQ 27.0 >= 29.5 - 3; 3D 19 >= max(18, 12.5 + 6);
    # zero-shot 0.75 >= 0.5; colour 0.9 (no target); shape 0.4 < 0.5
    assert [r['what'].split(' (')[0] for r in res['summary']] == [
        'image PSNR, continuous', 'video PSNR, continuous', 'image PSNR, FSQ', '3D multiview PSNR',
        'image zero-shot top-1', 'image zero-shot colour', 'image zero-shot shape']
    assert [r['met'] for r in res['summary']] == [True, False, True, True, True, None, False]
    assert res['summary'][6]['baseline'] == 'chance 0.167'
    assert res['summary'][3]['target'] == '>= 18.50' and res['summary'][1]['target'] == '>= 26.50'
    with open(os.path.join(cfg.out_dir, 'summary.json')) as f:
        assert json.load(f) == res['summary']


def test_paper_configs_on_meta():
    """The paper configs build So400m / Base with the official parameter counts, and their derived
    per-step figures read sensibly on 8 and 256 GPUs."""
    so = train.load_config([os.path.join(ROOT, 'configs', 'so400m.py')])
    counts = []
    for st in so.stages:
        with torch.device('meta'):
            tok = model.AToken(train.stage_model_config(so, st))
        counts.append(tok.num_params())
    assert counts == [845_682_752, 845_738_048, 845_738_048, 845_738_048]      # s1 latent 32, then 48
    assert train.stage_model_config(so, so.stages[3]).use_quantizer
    for world in (8, 256):
        text = train.describe(so, world)
        stage_lines = [ln for ln in text.splitlines() if not ln.startswith('    ')]
        assert f'x {world} ranks' in text and 'video_rec 6/10' in text and len(stage_lines) == 4
    # stage 2 on 256 GPUs: 10 micro-batches x 256 ranks x (8 x 16384 + 2 x 32768 understanding tokens) / 10
    assert '50,331,648 tokens/step' in train.describe(so, 256).splitlines()[3]
    base = train.load_config([os.path.join(ROOT, 'configs', 'base.py')])
    with torch.device('meta'):
        assert model.AToken(train.stage_model_config(base, base.stages[1])).num_params() == 182_338_560


def test_describe_prints_the_papers_batch_per_task_on_256_ranks():
    """configs/so400m.py on 256 ranks: the global batch describe prints for each task lies within the paper's
    figures (Sec. 3.5: I^u 8,192; I^r 1,024-4,096; V^r 512-1,024; 3D^r 256-512) up to one rank's micro-batch,
    and equals per-rank samples x ranks; the image understanding batch is 8,192 in every stage."""
    import re
    so = train.load_config([os.path.join(ROOT, 'configs', 'so400m.py')])
    text = train.describe(so, 256)
    found = 0
    for line in text.splitlines():
        m = re.match(r'    (\w+): global batch, paper .*256 ranks: (\d+)/rank = ([\d,]+), fit', line)
        if not m:
            continue
        task, k, total = m[1], int(m[2]), int(m[3].replace(',', ''))
        assert total == 256 * k
        if task in train.PAPER_BATCH:
            lo, hi = train.PAPER_BATCH[task]
            assert lo - k <= total <= hi + k, line
            found += 1
    assert found == 2 + 3 + 4 + 4                   # every paper-stated task of every stage was printed
    assert text.count('image_und: global batch, paper 8,192') == 4
    assert train.PAPER_BATCH == {'image_und': (8192, 8192), 'image_rec': (1024, 4096), 'video_rec': (512, 1024),
                                 '3d_rec': (256, 512)}
    # the same stages on 8 ranks keep the global batch (more samples per rank, so smaller sizes fit)
    assert '8 ranks: 1024/rank = 8,192, fit up to 80 px' in train.describe(so, 8)
    bad = [dict(so.stages[0], batch={'video_rec': 8})]
    with pytest.raises(ValueError, match="stage 0 batch .*tasks of the stage's mix"):
        train.check_stages(bad)


def test_trains_from_folders(tmp_path):
    """image_dir / video_dir / asset_dir feed the same curriculum as the built-in data."""
    import av
    import numpy as np
    from PIL import Image
    import render3d
    imgs, vids, assets = tmp_path / 'imgs', tmp_path / 'vids', tmp_path / 'assets'
    imgs.mkdir(), vids.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(imgs / f'{i}.png')
    for i in range(2):
        with av.open(str(vids / f'{i}.mp4'), 'w') as out:
            s = out.add_stream('mpeg4', rate=8)
            s.width, s.height, s.pix_fmt = 32, 32, 'yuv420p'
            for _ in range(8):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format='rgb24')
                for p in s.encode(frame):
                    out.mux(p)
            for p in s.encode():
                out.mux(p)
    mesh, _, caption = render3d.procedural_mesh(3)
    pack = render3d.pack_asset(mesh, n_views=2, resolution=16, patch_size=(4, 8, 8), grid=16)
    render3d.write_prepared(str(assets / 'a'), pack, dict(caption=caption, patch=[8, 8], voxels=len(pack['coords'])))
    stages = [dict(name='s', steps=2, mix={'image_rec': 1, 'video_rec': 1, '3d_rec': 1}, grad_accum=3,
                   tokens=1024, image_res=(32, 32), video_res=(32, 32))]
    cfg = make_cfg(tmp_path / 'run', stages, f'--image_dir={imgs}', f'--video_dir={vids}', f'--asset_dir={assets}')
    assert train.main(cfg) == 2
    p, ck = params(cfg.out_dir)
    assert all(torch.isfinite(v).all() for v in p.values())
    assert all(ck['streams'][t] != dict(epoch=0, pos=0) for t in ('image_rec', '3d_rec'))   # both advanced
