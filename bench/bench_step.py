"""
What one training micro-batch costs, per task: wall time of forward + loss + backward, the matmul time inside it
(torch.profiler: aten::mm / addmm / bmm / linear's kernels), the number of ATen ops and of data-dependent host
reads (a TorchDispatchMode census, as tests/test_step.py), and the built-in data's cost for the same
micro-batch (render or cache + collate). On CUDA: tokens/s and MFU of whole training steps of a preset, with the
per-phase split (data wait, host->device copy, forward, loss, backward, optimizer).

    python bench/bench_step.py                               # CPU, tiny preset, configs/cpu_tiny.py stage 3
    python bench/bench_step.py --tree=/tmp/old               # the same measurement on another checkout
    python bench/bench_step.py --compare=/tmp/old            # this tree and /tmp/old in lock step (turn by turn), ratios
    python bench/bench_step.py --device=cuda --preset=so400m --tokens=16384 --compile=1   # GPU: MFU per phase

Make the other checkout with `git worktree add /tmp/old <commit>`. The script adapts to the older API (collate
with a patch size, float pixels), so the figures of both commits come from the same code. CPU figures use one
torch thread (as the CPU demo does): the ratios are what to quote; absolute times depend on the machine. On a
machine whose cores differ in load, pin the comparison to one core (`taskset -c 1 python bench/bench_step.py
--compare=...`): both processes then run on it, taking turns.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tree', default=os.path.dirname(HERE), help='checkout whose model/data/train/losses are measured')
    p.add_argument('--compare', default='', help='another checkout: run both, alternating, and print ratios')
    p.add_argument('--rounds', type=int, default=1, help='with --compare: runs of the pair (medians over them)')
    p.add_argument('--reps', type=int, default=5, help='timed repetitions per task (median)')
    p.add_argument('--tasks', default='image_rec,image_und,video_rec,video_und,3d_rec,3d_und')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--preset', default='tiny', help='GPU mode: base | so400m')
    p.add_argument('--tokens', type=int, default=16384, help='GPU mode: tokens per micro-batch')
    p.add_argument('--steps', type=int, default=12, help='GPU mode: steps (the first 2 are warm-up)')
    p.add_argument('--compile', type=int, default=1, help='GPU mode: torch.compile the blocks')
    p.add_argument('--cpu_compile', type=int, default=0, help='CPU mode: torch.compile (inductor, C++ codegen: '
                   'fuses the elementwise ops around the matmuls; the first micro-batches compile): 1 = each block '
                   "(train.py compile_scope='blocks'), 2 = the tokenizer's whole forward (compile_scope='tokenizer')")
    p.add_argument('--json', default='', help='write the results here')
    p.add_argument('--lockstep', action='store_true', help=argparse.SUPPRESS)   # internal: run only when told
    return p.parse_args()


# ---------------------------------------------------------------------------------------------------------------
# measurement inside one checkout (run in a subprocess whose sys.path starts with that checkout)


def census_mode():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    reads = {'_local_scalar_dense', 'nonzero', 'masked_select', 'unique_consecutive', '_unique', '_unique2',
             'unique_dim', 'is_nonzero', 'equal'}

    class Census(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.reads = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split('::')[-1]
            self.ops += 1
            if name in reads or (name == 'repeat_interleave' and len(args) > 1 and isinstance(args[1], torch.Tensor)):
                self.reads += 1
            return func(*args, **(kwargs or {}))
    return Census


def collate(data, model, items, mcfg):
    """Either API: collate(items, config) with uint8 pixels (new) or collate(items, patch_size) (old)."""
    try:
        batch = data.collate(items, mcfg)
    except (TypeError, AttributeError, ValueError):
        batch = data.collate(items, mcfg.patch_size)
    return batch


def api(*places):
    """The first of (module, name) places that exists: this tree's API first, then where older checkouts had it."""
    return next(getattr(m, n) for m, n in places if hasattr(m, n))


def to_device(batch, device):
    batch.packed = batch.packed.to(device)
    return batch


def gate(args):
    """With --compare both checkouts run at once, in lock step: each measured unit (a task's data timing, one
    timed + one profiled micro-batch, the census) starts only when the driver says so, and the driver lets the
    two processes take turns, one unit each. Every measurement of one checkout then sits between two of the
    other's, so a slow spell of the machine hits both alike."""
    if args.lockstep:
        print('READY', flush=True)
        sys.stdin.readline()


def measure_cpu(args):
    import torch
    import data
    import model
    import train
    torch.set_num_threads(args.threads)
    cfg = train.load_config([os.path.join(args.tree, 'configs/cpu_tiny.py'), '--n_images=2048', '--n_videos=512',
                             '--n_3d=8'])
    stage = cfg.stages[2]
    loss_cfg = train.replace(train.losses.LossConfig(), **cfg.loss)
    mcfg = train.stage_model_config(cfg, stage)
    frozen = train.losses.FrozenNets(loss_cfg, embed_dim=mcfg.encoder_width)
    torch.manual_seed(0)
    net = train.build_trainable(cfg, stage, None, frozen, loss_cfg)
    with torch.no_grad():                         # every path active, as after some training
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if args.cpu_compile == 2:                     # (an older checkout without compile_tokenizer: the same call)
        fn = next((m.compile_tokenizer for m in (train, model) if hasattr(m, 'compile_tokenizer')), None)
        fn(net.tok) if fn else net.tok.compile(dynamic=True)
        api((train, 'compile_blocks'), (model, 'compile_blocks'))(net.gs)
    elif args.cpu_compile:
        api((train, 'compile_blocks'), (model, 'compile_blocks'))(net)
    Census = census_mode()
    budget = stage.get('tokens', 4096)
    out = {}
    dsets = api((data, 'build_datasets'), (train, 'build_datasets'))(cfg, stage, mcfg)
    for task in args.tasks.split(','):
        gate(args)
        ds = dsets[task]
        sampler = data.TokenBudgetSampler(ds, budget, cfg.seed + 1000 * train.TASKS.index(task))
        keys = [(i, 0) for i in sampler.plan(0)[0]]
        t0 = time.perf_counter()
        items = [ds[k] for k in keys]
        batch = collate(data, model, items, mcfg)
        data_cold = time.perf_counter() - t0
        t0 = time.perf_counter()                  # the same samples in epoch 1 (sizes drawn anew)
        collate(data, model, [ds[(i, 1)] for i, _ in keys], mcfg)
        data_warm = time.perf_counter() - t0
        for epoch in range(2, 8):                 # a long run: every size of a sample has been drawn before
            collate(data, model, [ds[(i, epoch)] for i, _ in keys], mcfg)
        t0 = time.perf_counter()
        for epoch in range(2, 8):
            collate(data, model, [ds[(i, epoch)] for i, _ in keys], mcfg)
        data_steady = (time.perf_counter() - t0) / 6

        def step(b):                              # forward + loss + backward; clearing the gradients is the
            loss, _ = net(b, task)                # optimizer's (train.py: optimizer.zero_grad), outside the timing
            loss.backward()
        clear = lambda: net.zero_grad(set_to_none=True)
        moved = lambda: to_device(collate_copy(batch), 'cpu')
        for _ in range(4 if args.cpu_compile else 2):     # compiled: the first calls compile (fwd, bwd)
            step(moved())
            clear()
        # timed runs and profiled runs (for the matmul time) alternate, so that both see the same machine; on a
        # noisy box the ratio of the two medians is steadier than either time
        from torch.profiler import ProfilerActivity, profile
        times, mms = [], []
        for _ in range(args.reps):
            gate(args)
            b = moved()
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
            clear()
            b = moved()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(b)
            clear()
            mms.append(sum(e.self_cpu_time_total for e in prof.key_averages()
                           if e.key in ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm')) / 1e3)
        mm = statistics.median(mms)
        gate(args)
        census, b = Census(), moved()
        if args.cpu_compile:                      # a dispatch mode cannot run inside compiled graphs: eager only
            census.ops = census.reads = -1
        else:
            with census:
                step(b)
        p = batch.packed
        out[task] = dict(samples=len(p.seqlens), tokens=sum(p.seqlens), ms=1e3 * statistics.median(times),
                         matmul_ms=mm, ratio=statistics.median(times) * 1e3 / max(mm, 1e-9), ops=census.ops,
                         host_reads=census.reads,
                         data_cold_ms=1e3 * data_cold, data_warm_ms=1e3 * data_warm,
                         data_steady_ms=1e3 * data_steady)
    return out


def collate_copy(batch):
    """A fresh Batch around the same tensors (to_device replaces .packed)."""
    import copy
    b = copy.copy(batch)
    return b


def measure_gpu(args):
    """Whole training steps of a preset on CUDA: built-in images, `tokens` per micro-batch, bf16 autocast,
    optional compile; the per-phase split uses synchronising timers (only here, never in train.py)."""
    import torch
    import data
    import model
    import train
    dev = torch.device(args.device)
    cuda = dev.type == 'cuda'
    cfg = train.load_config([os.path.join(args.tree, 'configs/cpu_tiny.py'), f'--preset={args.preset}',
                             '--model={}', "--loss={'siglip_model': 'tiny', 'random_frozen': True, 'lpips': 0.0, "
                             "'gram': 0.0, 'clip': 0.0}", '--n_images=4096'])
    stage = dict(name='bench', steps=args.steps, mix={'image_rec': 1}, tokens=args.tokens, image_res=(64, 512),
                 latent_channels=32)
    loss_cfg = train.replace(train.losses.LossConfig(), **cfg.loss)
    mcfg = train.stage_model_config(cfg, stage)
    frozen = train.losses.FrozenNets(loss_cfg, embed_dim=mcfg.encoder_width).to(dev)
    net = train.build_trainable(cfg, stage, None, frozen, loss_cfg).to(dev)
    if args.compile:
        api((train, 'compile_blocks'), (model, 'compile_blocks'), (train, 'compile_token_parts'))(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda)
    ds = api((data, 'build_datasets'), (train, 'build_datasets'))(cfg, stage, mcfg)['image_rec']
    TaskStream = api((data, 'TaskStream'), (train, 'TaskStream'))
    for kwargs in (dict(pin=cuda), dict(grouped=not cuda, pin=cuda)):     # this tree, then older checkouts
        try:
            stream = TaskStream(ds, args.tokens, mcfg, 0, 0, 1, 8 if cuda else 1, **kwargs)
            break
        except TypeError:
            stream = None
    stream = stream or TaskStream(ds, args.tokens, mcfg.patch_size, 0, 0, 1, 8)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    phases = {k: [] for k in ('data', 'copy', 'forward', 'loss', 'backward', 'optimizer', 'step')}
    tokens, flops = [], []
    for it in range(args.steps):
        t = [time.perf_counter()]
        batch = stream.next()
        t.append(time.perf_counter())
        flops.append(net.tok.estimate_flops(batch.packed))
        batch.packed = batch.packed.to(dev)
        sync(); t.append(time.perf_counter())
        with autocast:
            out = net.tok(batch.packed, sample=True)
            sync(); t.append(time.perf_counter())
            loss, _ = train.losses.compute_losses(out, batch.packed, frozen, loss_cfg)
            sync(); t.append(time.perf_counter())
        loss.backward()
        sync(); t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(); t.append(time.perf_counter())
        if it >= 2:
            for k, a, b in zip(('data', 'copy', 'forward', 'loss', 'backward', 'optimizer'), t, t[1:]):
                phases[k].append(b - a)
            phases['step'].append(t[-1] - t[0])
            tokens.append(sum(batch.packed.seqlens))
    med = {k: 1e3 * statistics.median(v) for k, v in phases.items()}
    step_s = statistics.median(phases['step'])
    peak = train.peak_flops(dev) if cuda else float('nan')
    return {args.preset: dict(tokens_per_s=statistics.median(tokens) / step_s,
                              mfu=statistics.median(flops[2:]) / step_s / peak, phases_ms=med)}


def inner(args):
    sys.path.insert(0, args.tree)
    os.chdir(args.tree)
    res = measure_gpu(args) if args.device.startswith('cuda') or args.preset != 'tiny' else measure_cpu(args)
    print('RESULT ' + json.dumps(res))


# ---------------------------------------------------------------------------------------------------------------
# driver


def inner_command(tree, args, lockstep=False):
    cmd = [sys.executable, os.path.abspath(__file__), '--inner', f'--tree={tree}', f'--reps={args.reps}',
           f'--tasks={args.tasks}', f'--threads={args.threads}', f'--device={args.device}', f'--preset={args.preset}',
           f'--tokens={args.tokens}', f'--steps={args.steps}', f'--compile={args.compile}',
           f'--cpu_compile={args.cpu_compile}'] + (['--lockstep'] if lockstep else [])
    return cmd, {**os.environ, 'PYTHONPATH': tree, 'OMP_NUM_THREADS': str(args.threads)}


def run_tree(tree, args):
    cmd, env = inner_command(tree, args)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    line = [s for s in r.stdout.splitlines() if s.startswith('RESULT ')]
    if r.returncode or not line:
        raise RuntimeError(f"{tree}: benchmark failed\n{r.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def run_lockstep(trees, args):
    """Both checkouts at once, taking turns unit by unit (gate()): -> [result of each tree]."""
    import tempfile
    procs, results = [], [None] * len(trees)
    for t in trees:
        cmd, env = inner_command(t, args, lockstep=True)
        err = tempfile.TemporaryFile(mode='w+')
        procs.append((subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                       env=env, cwd=t), err))

    def wait(i):                                  # until process i blocks at its next gate (True) or ends (False)
        p, err = procs[i]
        for line in p.stdout:
            if line.startswith('READY'):
                return True
            if line.startswith('RESULT '):
                results[i] = json.loads(line[7:])
        if p.wait() or results[i] is None:
            err.seek(0)
            raise RuntimeError(f"{trees[i]}: benchmark failed\n{err.read()[-3000:]}")
        return False
    live = [i for i in range(len(trees)) if wait(i)]  # set-up (untimed) runs in parallel; then strict turns
    while live:
        for i in list(live):
            procs[i][0].stdin.write('go\n')
            procs[i][0].stdin.flush()
            if not wait(i):
                live.remove(i)
    return results


def show(name, res):
    print(f"\n{name}")
    for task, r in res.items():
        if 'ms' in r:
            print(f"  {task:10s} {r['samples']:3d} samples {r['tokens']:5d} tokens  {r['ms']:7.1f} ms  matmul "
                  f"{r['matmul_ms']:5.1f} ms ({r.get('ratio', r['ms'] / max(r['matmul_ms'], 1e-9)):4.2f}x)  ops {r['ops']:6d}  "
                  f"host reads {r['host_reads']:4d}  data: first epoch {r['data_cold_ms']:6.1f} ms, 2nd "
                  f"{r['data_warm_ms']:5.1f} ms, later {r.get('data_steady_ms', float('nan')):5.1f} ms "
                  f"({100 * r.get('data_steady_ms', float('nan')) / r['ms']:.0f}% of the step)")
        else:
            ph = ', '.join(f"{k} {v:.1f}" for k, v in r['phases_ms'].items())
            print(f"  {task}: {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%  (ms: {ph})")


def main():
    if '--inner' in sys.argv:
        sys.argv.remove('--inner')
        return inner(parse())
    args = parse()
    if not args.compare:
        res = run_tree(os.path.abspath(args.tree), args)
        show(args.tree, res)
    else:
        trees = [os.path.abspath(args.tree), os.path.abspath(args.compare)]
        runs = {t: [] for t in trees}
        for _ in range(args.rounds):
            if args.device == 'cpu' and args.preset == 'tiny':
                for t, r in zip(trees, run_lockstep(trees, args)):   # A B A B ... within the run
                    runs[t].append(r)
            else:                                     # GPU: whole runs alternate
                for t in trees:
                    runs[t].append(run_tree(t, args))
        res = {}
        for t in trees:
            res[t] = {task: {k: statistics.median(r[task][k] for r in runs[t]) for k in runs[t][0][task]}
                      for task in runs[t][0]}
            show(f"{t} (median of {args.rounds})", res[t])
        a, b = res[trees[0]], res[trees[1]]
        print(f"\nratios {trees[1]} / {trees[0]} (time, ops)")
        for task in a:
            if 'ms' in a[task]:
                print(f"  {task:10s} time {b[task]['ms'] / a[task]['ms']:5.2f}x  ops {b[task]['ops'] / a[task]['ops']:5.2f}x"
                      f"  data (later epochs) {b[task]['data_steady_ms'] / a[task]['data_steady_ms']:5.2f}x")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
