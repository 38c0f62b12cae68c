"""
Train AToken through the paper's four-stage curriculum (arXiv 2509.14476, Sec. 3.4-3.5, Table 2), from a
laptop CPU to many GPUs with the same script.

    python train.py configs/cpu_tiny.py                      # the CPU demo (README; its header gives the time)
    python train.py configs/cpu_tiny.py --lr=1e-3 --model.decoder_depth=3 --loss.lpips=0
    torchrun --nproc_per_node=8 train.py configs/so400m.py --parallel=fsdp

Config files are plain Python assignments (nanoGPT style) loaded into TrainConfig by configurator.py; --key=value
flags override them, and --model.<field> / --loss.<field> set ModelConfig / LossConfig fields. Unknown keys and
wrong types are errors. The curriculum is a list of stage dicts (see configs/); each stage round-robins
over its tasks (image/video/3D x reconstruction/understanding) with gradient accumulation, and starts
from the previous stage's weights (widening the latent 32 -> 48, switching FSQ on).

Borrowed: nanoGPT (get_lr, MFU, train loop layout), the FSDP2 recipe of torchtitan.
"""
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import torch

import configurator
import convert
import data
import eval as ev       # (eval is a builtin's name)
import losses
import model

TASKS = ('image_rec', 'image_und', 'video_rec', 'video_und', '3d_rec', '3d_und')


@dataclass
class TrainConfig:
    # run
    out_dir: str = 'out/run'
    seed: int = 0
    device: str = 'auto'            # auto: cuda -> mps -> cpu
    dtype: str = 'bfloat16'         # autocast dtype on CUDA (CPU always runs fp32)
    compile: bool = False           # torch.compile (dynamic shapes), of:
    compile_scope: str = 'blocks'   # blocks: each transformer block (fullgraph) | tokenizer: the tokenizer's whole
                                    # forward, one graph per kind of micro-batch (faster on CPU; not with fsdp)
    parallel: str = 'none'          # none | ddp | fsdp (under torchrun)
    # model
    preset: str = 'tiny'            # model.PRESETS key; `model` overrides its fields
    model: dict = field(default_factory=dict)
    init_siglip2: str = ''          # SigLIP2 tower for the encoder ('' = random init); see convert.load_siglip2_tower
    # fine-tuning (configs/finetune.py): start from a released tokenizer instead of SigLIP2 / random init. The
    # model config then comes from that checkpoint (`preset` is not used; `model` and the stage still override).
    init_from: str = ''             # official checkpoint (+ init_config), a released name (convert.PRETRAINED), or our tokenizer.pt
    init_config: str = ''           # the official YAML of init_from (model.model_cfg.arch_cfg)
    init_gs: str = ''               # official Gaussian decoder: '3d_decode_gs', or a file + init_gs_config
    init_gs_config: str = ''
    freeze_encoder: bool = False    # encoder + pooling head frozen (no grads, not in the optimizer): embeddings stay
    freeze_decoder: bool = False    # pixel decoder frozen: only the encoder side adapts to the released decoder
    export_official: bool = False   # at each stage's end also write out_dir/official_<stage>/ in Apple's layout + YAML
    loss: dict = field(default_factory=dict)    # LossConfig overrides
    # data: built-in procedural data, or folders (any of them; empty = built-in for that modality)
    image_dir: str = ''
    video_dir: str = ''
    asset_dir: str = ''             # 3D assets prepared by `python render3d.py prepare`
    captions_3d: str = ''           # Cap3D-style captions for asset_dir (CSV / JSON: asset id -> caption; data.read_captions)
    n_images: int = 4096            # built-in dataset sizes (train split)
    n_videos: int = 1024
    n_3d: int = 64
    video_frames: int = 16          # built-in video length (max), a multiple of pt
    views_3d: int = 8               # built-in 3D: rendered views per object and their size
    view_res_3d: int = 64
    num_workers: int = 0            # DataLoader worker processes per task stream (they render/decode the data)
    threads: int = 0                # torch intra-op threads in this process (0 = torch's default, one per core)
    # optimisation (paper 3.5)
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2000        # per stage: each stage is its own warmup + cosine run
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    encoder_lr_mult: float = 0.1    # the encoder starts from SigLIP2
    ema_decay: float = 0.9999
    max_bad_steps: int = 10         # consecutive non-finite losses before the run stops
    # curriculum: a list of stage dicts, see get_stage and configs/
    stages: list = field(default_factory=list)
    # logging, evaluation, checkpoints
    log_interval: int = 10
    eval_interval: int = 0          # 0 = only at the end
    eval_n: int = 16                # held-out samples per modality for evaluation
    ckpt_interval: int = 500
    resume: bool = True             # continue from out_dir/ckpt.pt when it exists
    max_steps: int = 0              # stop (with a checkpoint) after this many steps in this invocation, e.g.
                                    # to fit a cluster time limit; 0 = run to the end of the curriculum


STAGE_KEYS = dict(name=str, steps=int, mix=dict, grad_accum=int, tokens=int, image_res=tuple, video_res=tuple,
                  latent_channels=int, use_quantizer=bool, batch=dict, task_tokens=dict)
# Stage keys per task (see data.task_budget, data.task_samples):
#   task_tokens {task: tokens}: that task's token budget per rank per micro-batch (default: the stage's `tokens`)
#   batch {task: samples}: the task's global batch, the samples of one micro-batch of the task over all ranks (the
#     paper states batch sizes in samples); each rank's micro-batch closes at batch / world samples or at its token
#     budget, whichever comes first. Without it a task's micro-batches are packed by tokens alone.

# The paper's global batch per task (Sec. 3.5, 256 H100s): image understanding 8,192 "throughout all stages",
# image reconstruction 1,024-4,096, video reconstruction 512-1,024, 3D reconstruction 256-512. Video and 3D
# understanding: not stated.
PAPER_BATCH = {'image_und': (8192, 8192), 'image_rec': (1024, 4096), 'video_rec': (512, 1024), '3d_rec': (256, 512)}

# -----------------------------------------------------------------------------
# config loading: python files + --key=value (configurator.py), the checks that need the whole config, and the
# model config of each stage


def check_stages(stages):
    if not stages:
        raise ValueError("config has no stages: set stages = [dict(name=..., steps=..., mix=...), ...]")
    for i, s in enumerate(stages):
        for k, v in s.items():
            if k not in STAGE_KEYS:
                raise ValueError(f"stage {i}: unknown key {k!r}; known: {sorted(STAGE_KEYS)}")
            configurator.coerce(f"stage {i}.{k}", v, STAGE_KEYS[k]())
        for k in ('name', 'steps', 'mix'):
            if k not in s:
                raise ValueError(f"stage {i}: missing {k!r}")
        bad = set(s['mix']) - set(TASKS)
        if bad or not s['mix'] or any(type(w) is not int or w < 1 for w in s['mix'].values()):
            raise ValueError(f"stage {i} mix {s['mix']}: tasks must be in {TASKS} with positive integer ratios")
        for k in ('batch', 'task_tokens'):
            per = s.get(k, {})
            if set(per) - set(s['mix']) or any(type(v) is not int or v < 1 for v in per.values()):
                raise ValueError(f"stage {i} {k} {per}: tasks of the stage's mix {sorted(s['mix'])} with positive "
                                 f"integer values")


def check_init(cfg):
    """Fine-tuning fields: consistent, and their files exist (before anything is built)."""
    if cfg.init_from and cfg.init_siglip2:
        raise ValueError(f"init_from={cfg.init_from!r} and init_siglip2={cfg.init_siglip2!r}: choose one start")
    for key, needs in (('init_config', 'init_from'), ('init_gs_config', 'init_gs')):
        if getattr(cfg, key) and not getattr(cfg, needs):
            raise ValueError(f"{key}={getattr(cfg, key)!r} without {needs}")
    if cfg.freeze_encoder and cfg.loss.get('image_und', 'distill') == 'distill' and \
            any('image_und' in s['mix'] for s in cfg.stages):
        raise ValueError("freeze_encoder=True with the 'image_und' task: its distillation loss reaches only the frozen "
                         "encoder, so it trains nothing (and has no gradient); drop 'image_und' from the stage mix")
    for key in ('init_from', 'init_config', 'init_gs', 'init_gs_config'):
        path = getattr(cfg, key)
        if path and not os.path.exists(path) and not convert.is_released(path):
            raise FileNotFoundError(f"{key}={path!r}: no such file, and not a released name ({sorted(convert.PRETRAINED)})")


def load_config(argv):
    """[config.py ...] [--key=value ...] -> TrainConfig: configurator.load's typed checks (model.<field> /
    loss.<field> against ModelConfig / LossConfig), then the stages, the preset and the fine-tuning fields."""
    cfg = configurator.load(TrainConfig(), argv, subs={'model': model.ModelConfig, 'loss': losses.LossConfig})
    check_stages(cfg.stages)
    replace(losses.LossConfig(), **cfg.loss)        # LossConfig's own checks (__post_init__), before any work
    if cfg.preset not in model.PRESETS:
        raise ValueError(f"preset {cfg.preset!r} not in {sorted(model.PRESETS)}")
    for key in ('threads', 'num_workers'):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key}={getattr(cfg, key)}: expected 0 (default) or a positive count")
    if cfg.parallel not in ('none', 'ddp', 'fsdp'):
        raise ValueError(f"parallel={cfg.parallel!r}: expected none | ddp | fsdp")
    if cfg.compile_scope not in ('blocks', 'tokenizer'):
        raise ValueError(f"compile_scope={cfg.compile_scope!r}: expected blocks | tokenizer")
    if cfg.compile and cfg.compile_scope == 'tokenizer' and cfg.parallel == 'fsdp':
        raise ValueError("compile_scope='tokenizer' does not go with parallel=fsdp (FSDP2 shards each block): "
                         "use compile_scope='blocks'")
    check_init(cfg)
    return cfg


def base_model_config(cfg):
    """The run's model before overrides: the init_from checkpoint's config (with init_gs's Gaussian-decoder
    sizes), else the preset."""
    if not cfg.init_from:
        return model.PRESETS[cfg.preset]
    fields, _, source = convert.tokenizer_source(cfg.init_from, cfg.init_config or None, weights=False)
    c = model.ModelConfig.from_dict(fields, source)
    if cfg.init_gs:
        fields, _, source = convert.gaussian_source(cfg.init_gs, cfg.init_gs_config or None, weights=False)
        g = model.ModelConfig.from_dict(fields, source)
        if g.patch_size[1:] != c.patch_size[1:]:
            raise ValueError(f"init_gs reads {g.patch_size[1:]} patches, init_from makes {c.patch_size[1:]}")
        c = replace(c, **{f: getattr(g, f) for f in ('gs_width', 'gs_depth', 'gs_heads', 'gs_mlp', 'gs_window',
                                                      'gs_per_voxel', 'gs_resolution')})
    return c


def stage_model_config(cfg, stage):
    """A stage's ModelConfig: the base, the run's `model` fields, then the stage's latent width and FSQ switch
    (a stage's value wins over the same field in `model`)."""
    return replace(base_model_config(cfg), **{**cfg.model,
                   **{k: stage[k] for k in ('latent_channels', 'use_quantizer') if k in stage}})


# -----------------------------------------------------------------------------
# pure schedule helpers (unit-tested)


def get_stage(step, stages):
    """Global step -> (stage index, stage dict, step within the stage). Past the end: the last stage."""
    start = 0
    for i, s in enumerate(stages):
        if step < start + s['steps'] or i == len(stages) - 1:
            return i, s, step - start
        start += s['steps']


def get_lr(step, steps, cfg):
    """Linear warmup to cfg.lr over warmup_steps, then cosine to min_lr at `steps` (per stage)."""
    warmup = min(cfg.warmup_steps, max(steps // 10, 1))   # short demo stages keep a sane warmup
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def task_schedule(mix, n):
    """n micro-steps distributed over tasks in proportion to `mix`, interleaved (smooth weighted
    round-robin, as nginx balances servers): {'a': 2, 'b': 1}, 3 -> ['a', 'b', 'a']. With integer weights
    the sequence repeats every sum(mix) micro-steps, each task appearing mix[task] times per period."""
    total, current, out = sum(mix.values()), {t: 0.0 for t in mix}, []
    for _ in range(n):
        for t in mix:
            current[t] += mix[t]
        best = max(mix, key=lambda t: current[t])
        current[best] -= total
        out.append(best)
    return out


def step_tasks(mix, n, step):
    """The n micro-batch tasks of optimizer step `step` of a stage. The round-robin runs on across steps, so
    every task gets its share of a stage even when n (grad_accum) < sum(mix): {'a': 2, 'b': 1, 'c': 1}
    with n = 2 gives [a, b], [c, a], [a, b], ... Weights must be positive integers (the period is sum(mix))."""
    bad = {t: w for t, w in mix.items() if type(w) is not int or w < 1}
    if bad:
        raise ValueError(f"stage mix weights must be positive integers, got {bad}")
    cycle = task_schedule(mix, sum(mix.values()))
    return [cycle[(step * n + k) % len(cycle)] for k in range(n)]


def describe(cfg, world):
    """The derived per-stage figures (printed at startup): micro-batches per task per step, tokens per step, and per
    task the global batch (one micro-batch of the task over all ranks) on `world`, 8 and 256 ranks, next to the
    paper's (PAPER_BATCH), with the size up to which that many samples fit the task's token budget."""
    lines = []
    for s in cfg.stages:
        n, total = s.get('grad_accum', 1), sum(s['mix'].values())
        per_micro = sum(w * data.task_budget(s, t) for t, w in s['mix'].items()) / total    # mean over the mix
        per_step = round(per_micro * n * world)
        counts = ', '.join(f"{t} {w}/{total}" for t, w in s['mix'].items())
        lines.append(f"  {s['name']}: {s['steps']} steps x {n} micro-batches (shares {counts}) x {world} ranks "
                     f"x {per_micro:,.0f} tokens = {per_step:,} tokens/step, "
                     f"{per_step * s['steps'] / 1e9:.3g}B tokens in the stage")
        ps = stage_model_config(cfg, s).patch_size
        for t in s['mix']:
            paper = '-'.join(f"{v:,}" for v in sorted(set(PAPER_BATCH[t]))) if t in PAPER_BATCH else 'not stated'
            budget, k = data.task_budget(s, t), data.task_samples(s, t, world)
            if not k:
                lines.append(f"    {t}: packed by {budget:,} tokens/rank (no batch set; paper {paper})")
                continue
            per_rank = {g: data.task_samples(s, t, g) for g in (world, 8, 256)}
            at = '; '.join(f"{g} ranks: {b}/rank = {b * g:,}, fit up to {data.fits_up_to(s, t, b, ps)}"
                           for g, b in per_rank.items())
            lines.append(f"    {t}: global batch, paper {paper}; {budget:,} tokens/rank; {at}")
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# compute: torchrun, ranks, the device (configurator.pick_device)


def init_compute(cfg):
    """Detect torchrun, pick the device, init the process group. -> (rank, local_rank, world, device)."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('LOCAL_RANK', 0),
                                                                       ('WORLD_SIZE', 1)))
    device = configurator.pick_device(cfg.device).type if cfg.device == 'auto' else cfg.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device == 'cuda':
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s): start at most that many processes per node, or pass --device=cpu")
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    elif cfg.parallel != 'none':
        print(f"parallel={cfg.parallel} without torchrun: running as one process")
    return rank, local_rank, world, device


def print0(*a, **k):
    if int(os.environ.get('RANK', 0)) == 0:
        print(*a, **k, flush=True)


def all_reduce_mean(x, world):
    if world > 1:
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


# -----------------------------------------------------------------------------
# model surgery between stages, optimizer, EMA, checkpoints


@torch.no_grad()
def widen_latent(sd, old, new):
    """Stage 1 -> 2 (paper: latent 32 -> 48): proj gains new mean rows (small random) and new logvar rows
    (zero), the decoder's input linear gains zero columns, so the decoder output is unchanged at the switch
    and the new channels grow from there. The official s1 -> s2 checkpoints differ exactly in these two
    tensors (proj.weight [64 -> 96, C], decoder.input_layer.weight [C, 32 -> 48])."""
    p, w = sd['proj.weight'], sd['decoder.input_layer.weight']
    mean, logvar = p[:old], p[old:]
    new_mean = torch.randn(new - old, p.shape[1], dtype=p.dtype) * 0.02
    sd['proj.weight'] = torch.cat([mean, new_mean, logvar, torch.zeros_like(new_mean)])
    sd['decoder.input_layer.weight'] = torch.cat([w, torch.zeros(w.shape[0], new - old, dtype=w.dtype)], 1)
    return sd


def param_groups(modules, cfg):
    """AdamW groups: weight decay on matrices only (not norms, biases, position tables, the probe), and the
    encoder's learning rate scaled by encoder_lr_mult. Each group carries its lr multiplier."""
    groups = {}
    for prefix, m in modules.items():
        for n, p in m.named_parameters():
            if not p.requires_grad:
                continue
            decay = p.dim() >= 2 and 'pos_embedder' not in n and 'probe' not in n
            enc = prefix == 'tok' and n.startswith('encoder.')
            key = (decay, enc)
            g = groups.setdefault(key, dict(params=[], weight_decay=cfg.weight_decay if decay else 0.0,
                                            lr_mult=cfg.encoder_lr_mult if enc else 1.0))
            g['params'].append(p)
    return list(groups.values())


def full_state(module):
    """A module's full (unsharded) state dict on CPU, for DDP / FSDP2 / plain modules alike."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def rng_states():
    s = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        s['cuda'] = torch.cuda.get_rng_state_all()
    return s


def set_rng_states(s):
    torch.set_rng_state(s['torch'])
    if 'cuda' in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s['cuda'])

# -----------------------------------------------------------------------------
# one micro-step's loss, as a module so DDP / FSDP2 see every trainable part in one forward


class Trainable(torch.nn.Module):
    """The trained parts (tokenizer, Gaussian decoder, sigmoid-loss temperature) and the loss of one packed
    batch of one task. The frozen networks are held outside the module tree (never trained or saved)."""

    def __init__(self, tok, gs, temperature, frozen, loss_cfg, text=None):
        super().__init__()
        self.tok, self.gs, self.temperature = tok, gs, temperature
        self.text = text                                      # losses.TrainableText (train_text) or None
        self.frozen, self.loss_cfg = [frozen], loss_cfg       # a list hides them from .parameters()

    def forward(self, batch, task):
        p = batch.packed
        rec = task.endswith('rec')
        out = self.tok(p, sample=self.loss_cfg.sample_posterior and self.training, decode=rec, embed=not rec)
        views = self.render_3d(out['rec'], batch) if task == '3d_rec' else None
        # understanding under torchrun: the semantic loss over every rank's micro-batch (LossConfig.global_batch)
        gather = batch.rows if not rec and self.loss_cfg.global_batch and losses.dist_world()[1] > 1 else 0
        return losses.compute_losses(out, p, self.frozen[0], self.loss_cfg, ['rec' if rec else 'und'] * len(p.seqlens),
                                     batch.captions, views, self.temperature, self.text, gather)

    def render_3d(self, rec, batch):
        """Decoded voxels of every 3D sample -> one Gaussian decoder call (packed, windows from the batch's
        structure) -> renders vs the ground-truth views: {sample: (pred [V, H, W, 3], target)} in [-1, 1]."""
        import render3d
        p, (ph, pw) = batch.packed, self.tok.config.patch_size[1:]
        st = p.structure
        ids = [i for i, k in enumerate(p.kinds) if k == '3d']
        feats, coords = rec[:, :ph * pw * 3], p.coords[:, 1:]
        if st.gs_index is not None:
            feats, coords = feats.index_select(0, st.gs_index), coords.index_select(0, st.gs_index)
        lens = [p.seqlens[i] for i in ids]
        g = self.gs(feats, coords, lens, st.gs)
        K = self.gs.cfg.gs_per_voxel
        renders = render3d.render_samples(g, [n * K for n in lens], [batch.views[i][1] for i in ids])
        return {i: (r * 2 - 1, model.from_uint8(batch.views[i][0].to(r.device, non_blocking=True)))
                for i, r in zip(ids, renders)}


@torch.no_grad()
def load_init(cfg, tok, gs):
    """Fine-tuning start: the init_from tokenizer's weights into tok (widened when the stage's latent is wider, e.g.
    an s1 checkpoint into a 48-channel stage), and the Gaussian decoder from init_gs, or from init_from itself
    when that is one of our exports with a 'gs_decoder'. Loads are strict and name every mismatched key."""
    src = model.AToken.from_pretrained(cfg.init_from, cfg.init_config or None)
    sd = src.state_dict()
    old = sd['decoder.input_layer.weight'].shape[1]
    if old != tok.config.latent_channels:
        print0(f"init_from: widening the latent {old} -> {tok.config.latent_channels}")
        sd = widen_latent(dict(sd), old, tok.config.latent_channels)
    model.load_strict(tok, sd, f"init_from={cfg.init_from}")
    if cfg.init_gs:
        g = model.GaussianDecoder.from_pretrained(cfg.init_gs, cfg.init_gs_config or None)
        model.load_strict(gs, g.state_dict(), f"init_gs={cfg.init_gs}")
    elif os.path.isfile(cfg.init_from) and not cfg.init_config and not cfg.init_from.endswith('.safetensors'):
        ck = torch.load(cfg.init_from, map_location='cpu', weights_only=True, mmap=True)
        if ck.get('gs_decoder'):
            model.load_strict(gs, ck['gs_decoder'], f"{cfg.init_from} ['gs_decoder']")
    print0(f"fine-tuning from {cfg.init_from}" + (f" ({cfg.init_config})" if cfg.init_config else '') +
           (f", Gaussian decoder {cfg.init_gs}" if cfg.init_gs else ''))


def freeze(cfg, tok):
    """freeze_encoder / freeze_decoder: requires_grad False, so param_groups leaves them out of the optimizer,
    they get no gradients, and their EMA stays equal to them."""
    if cfg.freeze_encoder:
        tok.encoder.requires_grad_(False)
    if cfg.freeze_decoder:
        tok.decoder.requires_grad_(False)


def build_trainable(cfg, stage, state, frozen, loss_cfg):
    """Fresh (init_weights, SigLIP2 encoder) or from `state` ({'tok', 'gs', 'temperature'} state dicts,
    widened when the stage's latent is wider)."""
    mcfg = stage_model_config(cfg, stage)
    tok, gs = model.AToken(mcfg), model.GaussianDecoder(mcfg)
    temp = losses.SigmoidTemperature(loss_cfg.sigmoid_bias_init)
    # the trainable text tower starts as the frozen one
    text = losses.TrainableText(frozen, loss_cfg.train_text_embedding) if loss_cfg.train_text else None
    if state is None:
        tok.init_weights()
        gs.init_weights()
        if cfg.init_siglip2:
            tok.init_from_siglip2(cfg.init_siglip2)
        if cfg.init_from:
            load_init(cfg, tok, gs)
    else:
        sd = dict(state['tok'])
        old = sd['decoder.input_layer.weight'].shape[1]
        if old != mcfg.latent_channels:
            print0(f"stage {stage['name']}: widening the latent {old} -> {mcfg.latent_channels}")
            sd = widen_latent(sd, old, mcfg.latent_channels)
        model.load_strict(tok, sd, 'previous stage')
        gs.load_state_dict(state['gs'])
        temp.load_state_dict(state['temperature'])
        if text is not None and state.get('text'):
            text.load_state_dict(state['text'])
    freeze(cfg, tok)
    return Trainable(tok, gs, temp, frozen, loss_cfg, text)


def wrap(net, cfg, world, device):
    """DDP or FSDP2 (fully_shard each block, then each model, then the root) when under torchrun."""
    if world == 1 or cfg.parallel == 'none':
        return net
    if cfg.parallel == 'ddp':
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(net, device_ids=[int(device.split(':')[1])] if device.startswith('cuda') else None,
                   find_unused_parameters=True)       # tasks use different parts (3D head, temperature)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.split(':')[0], (world,))
    # on CUDA with bf16: blocks compute with bf16 parameters, gradients are reduced in fp32 (torchtitan's policy)
    low = device.startswith('cuda') and cfg.dtype != 'float32'
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.dtype) if low else None,
                              reduce_dtype=torch.float32 if low else None)
    for m in (net.tok.encoder, net.tok.decoder, net.gs):
        for block in m.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(net.tok, mesh=mesh, mp_policy=mp)
    fully_shard(net.gs, mesh=mesh, mp_policy=mp)
    return fully_shard(net, mesh=mesh, mp_policy=mp)


def unwrap(net):
    return net.module if hasattr(net, 'module') else net


def local(t):
    """A DTensor's full value (FSDP2), else the tensor itself."""
    return t.full_tensor() if hasattr(t, 'full_tensor') else t

# -----------------------------------------------------------------------------
# torch.compile: every transformer block, or the tokenizer's whole forward (compile_scope)


def dynamic_sizes_apart():
    """torch.compile's dynamic shapes give two sizes that are equal when a graph is traced one symbol ("duck
    sizing"): a first micro-batch of 256 tokens would tie the token count to the position table's 256 rows, or 4
    images to the 4 coords, and the next micro-batch would compile again. Off, every size keeps its own symbol
    (as torch's own recompile message advises). Process-wide: set by the two functions below."""
    torch.fx.experimental._config.use_duck_shape = False


def compile_blocks(module):
    """torch.compile every transformer block of module (tokenizer encoder and decoder, Gaussian decoder) in place,
    with fullgraph=True and dynamic shapes. Packed batches change size every micro-batch; the attention plan marks
    its sizes dynamic (kernels/grouped.py), so one graph per block serves every micro-batch without recompiling
    (tests/test_step.py). On CUDA the attention inside is the Triton kernel, registered as a custom op, so it stays
    inside the graph. Module.compile() keeps parameter names, so checkpoints and EMA are unaffected."""
    dynamic_sizes_apart()
    for m in module.modules():
        if isinstance(m, model.Block):
            m.compile(fullgraph=True, dynamic=True)


def compile_tokenizer(tok, **kwargs):
    """torch.compile the tokenizer's whole training forward (encoder, pooling head, bottleneck, decoder: one graph,
    no break) in place, with dynamic shapes. Against compile_blocks, the code between the blocks (input layer,
    position table, RoPE table, final norms, bottleneck) is fused too, and the backward is one autograd node rather
    than one per op: what a small model pays for most on a CPU (NOTES.md). The cost is one compilation per kind of
    micro-batch; micro-batches of other sizes reuse it (tests/test_step.py). Only forward() is compiled; parameter
    names are kept. Not with FSDP2, which shards per block. kwargs go to torch.compile (e.g. backend='aot_eager')."""
    dynamic_sizes_apart()
    # each kind of micro-batch is its own graph: the forward's flags, one-frame or not, and the attention path its
    # layout takes (unmasked / masked SDPA / GroupedAttention): a dozen or so over the six tasks, more than
    # torch.compile keeps by default (8, after which it would run the rest eagerly)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    tok.compile(dynamic=True, **kwargs)


# -----------------------------------------------------------------------------
# the run: a stage's set-up, one optimizer step, checkpoints and evaluation hooks; main() at the end


@dataclass
class Stage:
    """What one stage of the curriculum trains with (start_stage builds it; train_step uses it)."""
    index: int
    net: torch.nn.Module        # the Trainable, wrapped in DDP / FSDP2 under torchrun
    raw: Trainable              # the same, unwrapped
    opt: torch.optim.Optimizer
    ema: dict                   # EMA parameters by Trainable name
    params: list                # parameters and their EMA copies, in the same order (one foreach lerp)
    ema_params: list
    streams: dict               # task -> data.TaskStream
    fused_opt: bool
    grad_accum: int
    bar: object = None          # tqdm progress bar (rank 0)


def start_stage(cfg, i, stage, s_step, prev, ckpt, frozen, loss_cfg, rank, world, device):
    """Model (from the previous stage's weights `prev`), optimizer, EMA and data streams for stage i; with
    ckpt (a checkpoint taken inside this stage) restores optimizer, EMA, streams and RNG from it."""
    cuda = device.startswith('cuda')
    torch.manual_seed(cfg.seed + 7919 * i)     # the same initial weights on every rank
    raw = build_trainable(cfg, stage, prev, frozen, loss_cfg)
    torch.manual_seed(cfg.seed + 7919 * i + 1 + rank)
    if ckpt is not None and ckpt['trainable']['tok']['decoder.input_layer.weight'].shape[1] != \
            raw.tok.config.latent_channels:
        raise ValueError(f"checkpoint: latent width does not match stage {stage['name']}")
    raw = raw.to(device)
    net = wrap(raw, cfg, world, device)
    if cfg.compile and cfg.compile_scope == 'tokenizer':
        compile_tokenizer(raw.tok)
        compile_blocks(raw.gs)
    elif cfg.compile:
        compile_blocks(raw)
    fused_opt = not (cfg.parallel == 'fsdp' and world > 1)      # fused AdamW: CPU and CUDA, not DTensors
    opt = torch.optim.AdamW(param_groups({'tok': raw.tok, 'gs': raw.gs, 'temp': raw.temperature,
                                          **({'text': raw.text} if raw.text is not None else {})}, cfg),
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused_opt)
    # EMA of what trains: frozen parts (freeze_encoder / freeze_decoder, a fixed text-embedding table) keep their
    # values, and the export (tokenizer_export) takes them from the weights
    ema = {n: p.detach().clone() for n, p in raw.named_parameters() if p.requires_grad}
    dsets = data.build_datasets(cfg, stage, raw.tok.config)
    streams = {t: data.TaskStream(d, data.task_budget(stage, t), raw.tok.config, cfg.seed + 1000 * TASKS.index(t),
                                  rank, world, cfg.num_workers, pin=cuda,
                                  max_samples=data.task_samples(stage, t, world)) for t, d in dsets.items()}
    if ckpt is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(net, opt, ckpt['optimizer'],   # strict=False: parts with no
                                 options=StateDictOptions(full_state_dict=True, strict=False))  # grads yet
        for n, t in ema.items():
            t.copy_(ckpt['ema'][n] if not hasattr(t, 'full_tensor') else
                    torch.distributed.tensor.distribute_tensor(ckpt['ema'][n], t.device_mesh, t.placements))
        for t, s in ckpt['streams'].items():
            streams[t].load(s)
        set_rng_states(ckpt['rng'])
    grad_accum = stage.get('grad_accum', 1)
    n_params = sum(p.numel() for p in raw.tok.parameters())
    print0(f"stage {i + 1}/{len(cfg.stages)} '{stage['name']}': {stage['steps']} steps, first step's tasks "
           f"{step_tasks(stage['mix'], grad_accum, s_step)}, {stage.get('tokens', 4096)} tokens per micro-batch, "
           f"{n_params / 1e6:.2f}M tokenizer parameters, latent "
           f"{raw.tok.config.latent_channels}{' + FSQ' if raw.tok.config.use_quantizer else ''}")
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=stage['steps'], initial=s_step, desc=stage['name'], dynamic_ncols=True, mininterval=2.0)
    params = dict(raw.named_parameters())
    return Stage(i, net, raw, opt, ema, [params[n] for n in ema], list(ema.values()), streams,
                 fused_opt, grad_accum, bar)


class StepStats(NamedTuple):
    """One optimizer step of this rank, as train_step returns it (tensors stay on the device until log_step)."""
    ok: torch.Tensor            # bool: loss and gradient finite on every rank (else the step was skipped)
    gnorm: torch.Tensor         # gradient norm before clipping
    lr: float
    terms: dict                 # {task/term: loss value}, each task's terms averaged over its micro-batches
    tokens: int
    samples: int
    flops: float                # model FLOPs (AToken.estimate_flops)


def train_step(cfg, st, stage, s_step, world, device, autocast):
    """One optimizer step: this step's round-robin micro-batches with gradient accumulation, clipping, AdamW,
    EMA. Nothing here reads the device: loss terms, the finite flag and the gradient norm stay there until the
    log step; a non-finite step is skipped by the fused optimizer itself (found_inf), as AMP does. -> StepStats"""
    lr = get_lr(s_step, stage['steps'], cfg)
    for g in st.opt.param_groups:
        g['lr'] = lr * g['lr_mult']
    terms, tokens, samples, flops = {}, 0, 0, 0
    finite = torch.ones((), dtype=torch.bool, device=device)
    schedule = step_tasks(stage['mix'], st.grad_accum, s_step)    # this step's micro-batch tasks
    for j, task in enumerate(schedule):
        batch = st.streams[task].next()
        if batch.packed is None or not batch.packed.seqlens:
            raise RuntimeError(f"{task}: a whole batch failed to decode ({batch.skipped})")
        flops += st.raw.tok.estimate_flops(batch.packed)              # host-side lengths
        batch.packed = batch.packed.to(device)
        sync = (j == len(schedule) - 1)
        ctx = st.net.no_sync() if (cfg.parallel == 'ddp' and world > 1 and not sync) else nullcontext()
        if cfg.parallel == 'fsdp' and world > 1:
            st.raw.set_requires_gradient_sync(sync)
        with ctx:
            with autocast:
                loss, parts = st.net(batch, task)
            finite &= torch.isfinite(loss)
            (loss / len(schedule)).backward()
        for k, v in parts.items():
            terms[f"{task}/{k}"] = terms.get(f"{task}/{k}", 0.0) + v / schedule.count(task)
        tokens += sum(batch.packed.seqlens)
        samples += len(batch.packed.seqlens)
    gnorm = local(torch.nn.utils.clip_grad_norm_(st.raw.parameters(), cfg.grad_clip, foreach=True))
    ok = all_reduce_mean((finite & torch.isfinite(gnorm)).float(), world) == 1.0   # every rank finite
    if st.fused_opt:
        st.opt.found_inf = (~ok).float()
        st.opt.step()                       # a no-op where found_inf = 1 (step counts stay too)
    elif bool(ok):                          # FSDP2's DTensors: plain AdamW, one flag read per step
        st.opt.step()
    with torch.no_grad():                   # EMA, one foreach op (a skipped step left the params as they were)
        torch._foreach_lerp_(st.ema_params, [p.detach() for p in st.params], 1 - cfg.ema_decay)
    st.opt.zero_grad(set_to_none=True)
    return StepStats(ok, gnorm, lr, terms, tokens, samples, flops)


def tokenizer_export(raw, trainable, ema, step):
    """The file eval.py and AToken.from_pretrained read: the EMA tokenizer, Gaussian decoder and (train_text)
    text tower. trainable: full state dicts per part (they also hold buffers, e.g. the Gaussian offsets);
    ema: EMA parameters by Trainable name (the same names as trainable's with a 'part.' prefix)."""
    part = lambda k: {**trainable[k], **{n[len(k) + 1:]: v for n, v in ema.items() if n.startswith(k + '.')}}
    text = {n[len('text.'):]: v for n, v in part('text').items()} if trainable.get('text') else {}  # model.text
    return dict(model_config=asdict(raw.tok.config), model=part('tok'), gs_decoder=part('gs'),
                loss_config=asdict(raw.loss_cfg), step=step, commit=configurator.git_commit(),
                **({'text_tower': text} if text else {}))


def save_checkpoint(cfg, path, net, raw, opt, ema, streams, step, stage_i, bad_steps, master, end_of_stage=False):
    """Everything a resumed run needs, written atomically by rank 0 (all ranks gather FSDP shards), plus
    the EMA tokenizer alone as out_dir/tokenizer.pt (AToken.from_pretrained / eval.py read it), kept per
    stage as out_dir/tokenizer_<stage name>.pt at the end of each stage.
    Returns the trainable state (full tensors) for the next stage."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = full_state(net)
    trainable = {k: {n[len(k) + 1:]: v for n, v in full.items() if n.startswith(k + '.')}
                 for k in ('tok', 'gs', 'temperature', 'text')}
    optim = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema_full = {n: local(t).detach().cpu() for n, t in ema.items()}
    if master:
        convert.save_torch(dict(step=step, stage=stage_i, trainable=trainable, optimizer=optim, ema=ema_full,
                                streams={t: s.state() for t, s in streams.items()}, rng=rng_states(),
                                bad_steps=bad_steps, config=asdict(cfg), model_config=asdict(raw.tok.config),
                                loss_config=asdict(raw.loss_cfg), command=' '.join(sys.argv),
                                commit=configurator.git_commit()), path)
        export = tokenizer_export(raw, trainable, ema_full, step)
        convert.save_torch(export, os.path.join(cfg.out_dir, 'tokenizer.pt'))
        if end_of_stage:    # each stage's tokenizer stays (paper: So/C = stage 3, continuous; So/D = stage 4)
            convert.save_torch(export, os.path.join(cfg.out_dir, f"tokenizer_{cfg.stages[stage_i]['name']}.pt"))
        if end_of_stage and cfg.export_official:    # Apple's layout (loads in apple/ml-atoken)
            folder = os.path.join(cfg.out_dir, f"official_{cfg.stages[stage_i]['name']}")
            gs = bool(cfg.init_gs) or any('3d_rec' in s['mix'] for s in cfg.stages)  # a Gaussian decoder worth keeping
            convert.export_official(export, folder, with_gs=gs)
            print0(f"official layout: {folder}/atoken.pt + atoken.yaml")
    return trainable


def resume_point(ckpt, i, s_step, path):
    """A checkpoint met at stage i, step s_step of it -> (ckpt to restore inside stage i, or None; the weights stage i
    starts from). A checkpoint written at the end of stage i - 1 carries the weights stage i starts from (a straight
    run hands them over in memory); anything else means the curriculum changed under the run."""
    if ckpt['stage'] == i:
        return ckpt, None
    if ckpt['stage'] == i - 1 and s_step == 0:
        return None, ckpt['trainable']
    raise ValueError(f"{path}: written in stage {ckpt['stage'] + 1} at step {ckpt['step']}, but the config puts that "
                     f"step in stage {i + 1} (step {s_step} of it): the stages changed; use a new out_dir")


def save_untrained(cfg, frozen, loss_cfg, path):
    """The freshly initialised model of stage 1 (same seed as the run) as an export: the "untrained" baseline
    of the final summary. RNG states are forked, so the run itself is unaffected."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_trainable(cfg, cfg.stages[0], None, frozen, loss_cfg)
    sd = {k: {n[len(k) + 1:]: v.detach().cpu() for n, v in net.state_dict().items() if n.startswith(k + '.')}
          for k in ('tok', 'gs', 'temperature', 'text')}
    convert.save_torch(tokenizer_export(net, sd, {}, 0), path)


def curriculum(cfg):
    """[(stage name, FSQ on, modalities it trains)]: what eval.summarise_run / periodic_evaluation need to know of
    the stages."""
    return [(s['name'], stage_model_config(cfg, s).use_quantizer, {t.split('_')[0] for t in s['mix']})
            for s in cfg.stages]


PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12, 'RTX 4090': 165e12}


def peak_flops(device):
    """Dense bf16 peak of the GPU (by name) for MFU; nan when the GPU is not in the table."""
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), float('nan'))


def log_step(cfg, st, stage, step, dt, out, bad_run, skipped, world, device, log):
    """Every log_interval steps and at a stage's end, the one place the device is read: skipped (non-finite) steps
    are warned about (and `skipped` reset) or, max_bad_steps in a row, stop the run; rank 0 (log: its open
    log.jsonl) updates the progress bar and appends the step's record."""
    bad_steps, n_skipped = int(bad_run), int(skipped)
    if n_skipped:
        warnings.warn(f"step {step}: {n_skipped} step(s) with a non-finite loss or gradient skipped since "
                      f"the last log ({bad_steps} in a row now)")
        skipped.zero_()
    if bad_steps >= cfg.max_bad_steps:
        raise RuntimeError(f"{bad_steps} non-finite steps in a row at step {step}: stopping. Lower the "
                           f"lr, check the data ({[b for s in st.streams.values() for b in s.skipped]}), "
                           f"or resume from {os.path.join(cfg.out_dir, 'ckpt.pt')}")
    if log is None:
        return
    terms = {k: float(v) for k, v in out.terms.items()}
    mfu = out.flops * world / dt / peak_flops(device) if device.startswith('cuda') else None
    st.bar.set_postfix(loss=f"{sum(v for k, v in terms.items() if k.endswith('/total')):.4f}",
                       tok_s=f"{out.tokens * world / dt:.0f}", smp_s=f"{out.samples * world / dt:.1f}",
                       **({'mfu': f"{100 * mfu:.1f}%"} if mfu is not None else {}))
    rec = dict(step=step, stage=stage['name'], lr=out.lr, grad_norm=float(out.gnorm), dt=dt,
               tokens=out.tokens * world, skipped_step=not bool(out.ok), **terms)
    log.write(json.dumps(rec) + '\n')
    log.flush()


def main(cfg):
    # --- compute, checkpoint to resume, frozen networks (built once; never trained or saved) ---
    rank, local_rank, world, device = init_compute(cfg)
    master = rank == 0
    torch.manual_seed(cfg.seed + rank)
    cuda = device.startswith('cuda')
    ptdtype = configurator.DTYPES[cfg.dtype]
    autocast = torch.autocast('cuda', dtype=ptdtype) if cuda and ptdtype != torch.float32 else nullcontext()
    print0(f"device {device} x {world} ({cfg.parallel}), "
           f"{'autocast ' + cfg.dtype if cuda else 'fp32 (autocast is CUDA-only here)'}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt')
    loss_cfg = replace(losses.LossConfig(), **cfg.loss)
    total_steps = sum(s['steps'] for s in cfg.stages)
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False) if cfg.resume and \
        os.path.exists(ckpt_path) else None
    step = ckpt['step'] if ckpt else 0
    print0(f"curriculum ({total_steps} steps):\n{describe(cfg, world)}")
    if ckpt:
        print0(f"resuming {ckpt_path} at step {step}")
    stop = {'signal': None}
    signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))   # save, then exit at a step boundary
    last = min(total_steps, step + cfg.max_steps) if cfg.max_steps else total_steps
    frozen = losses.FrozenNets(loss_cfg, embed_dim=stage_model_config(cfg, cfg.stages[0]).encoder_width).to(device)
    log = open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a') if master else None
    if master and ckpt is None:     # the untrained baseline of the final summary
        save_untrained(cfg, frozen, loss_cfg, os.path.join(cfg.out_dir, 'tokenizer_init.pt'))

    st, state = None, None          # the current Stage; the previous stage's weights
    bad_run = skipped = torch.zeros((), dtype=torch.long, device=device)   # non-finite steps (in a row / since log)
    while step < last and stop['signal'] is None:
        i, stage, s_step = get_stage(step, cfg.stages)
        if st is None or i != st.index:
            resume = None
            if ckpt is not None:        # this invocation's first stage: resume inside it, or from the last one's end
                resume, state = resume_point(ckpt, i, s_step, ckpt_path)
                bad_run, ckpt = torch.full((), ckpt.get('bad_steps', 0), device=device), None   # consumed
            st = start_stage(cfg, i, stage, s_step, resume['trainable'] if resume else state, resume, frozen,
                             loss_cfg, rank, world, device)
        t0 = time.time()
        out = train_step(cfg, st, stage, s_step, world, device, autocast)
        bad_run = (bad_run + 1) * (~out.ok)     # consecutive skipped steps, on the device
        skipped = skipped + (~out.ok)
        step, s_step = step + 1, s_step + 1

        # --- logging: the device is read here only, every log_interval steps ---------------
        dt = time.time() - t0
        if st.bar is not None:
            st.bar.update(1)
        if step % cfg.log_interval == 0 or s_step == stage['steps']:
            log_step(cfg, st, stage, step, dt, out, bad_run, skipped, world, device, log)

        # --- checkpoints and periodic evaluation ---------------------------------------
        end_of_stage = s_step == stage['steps']
        if step % cfg.ckpt_interval == 0 or end_of_stage or step == last or stop['signal']:
            state = save_checkpoint(cfg, ckpt_path, st.net, st.raw, st.opt, st.ema, st.streams, step, st.index,
                                    int(bad_run), master, end_of_stage)
        if end_of_stage and st.bar is not None:
            st.bar.close()
        if cfg.eval_interval and step % cfg.eval_interval == 0 and master and step < last:
            ev.periodic_evaluation(ev.held_out(cfg), cfg.out_dir, curriculum(cfg)[:st.index + 1], step, cfg.eval_n)

    # --- final evaluation (EMA weights, held-out built-in data) and cleanup ----------------
    if master and step == total_steps and stop['signal'] is None:
        ev.summarise_run(ev.held_out(cfg), cfg.out_dir, curriculum(cfg), cfg.eval_n)
    if stop['signal'] is not None:
        print0(f"signal {stop['signal']}: checkpoint saved at step {step} in {ckpt_path}; exiting")
    elif step < total_steps:
        print0(f"max_steps={cfg.max_steps}: stopped at step {step}/{total_steps}; run again to resume")
    if log:
        log.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    return step


if __name__ == '__main__':
    main(load_config(sys.argv[1:]))
