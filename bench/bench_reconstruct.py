"""
What reconstructing your own media costs on a CPU: wall time and peak memory of `AToken.reconstruct` for a
512 px photo and a 720p clip, with a random-weight model of a preset (So400m by default: the released
models' architecture, so the time is theirs; random weights change nothing about the cost).

    python bench/bench_reconstruct.py                        # both cases, So400m, every core
    python bench/bench_reconstruct.py --case=clip --frames=16 --threads=2

Each case runs in its own process, so its peak resident memory (ru_maxrss) is its own: the model's weights
(fp32: 3.4 GB for So400m) plus activations. The printed forward FLOPs (6 x params x tokens / 3, plus the
attention term of AToken.estimate_flops) let a long clip be estimated from a shorter measured one: the cost
is linear in the number of 16-frame temporal tiles, since tiles are encoded and decoded independently.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--case', default='photo,clip', help='photo, clip or both (comma-separated)')
    p.add_argument('--preset', default='so400m')
    p.add_argument('--size', type=int, default=512, help='photo: side in pixels')
    p.add_argument('--frames', type=int, default=48, help='clip: frames (48 = 2 s at 24 fps)')
    p.add_argument('--height', type=int, default=720)
    p.add_argument('--width', type=int, default=1280)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0 = torch default: every core)')
    p.add_argument('--inner', default='', help=argparse.SUPPRESS)
    return p.parse_args()


def media(args, case):
    """A smooth random image / clip in [-1, 1] (content does not change the cost)."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    if case == 'photo':
        x = torch.rand(1, 3, args.size // 8, args.size // 8, generator=g)
        return F.interpolate(x, size=(args.size, args.size), mode='bilinear')[0].permute(1, 2, 0) * 2 - 1
    x = torch.rand(1, 3, args.frames, args.height // 8, args.width // 8, generator=g)
    x = F.interpolate(x, size=(args.frames, args.height, args.width), mode='trilinear')
    return x[0].permute(1, 2, 3, 0) * 2 - 1


def inner(args):
    import torch
    import model
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = model.AToken(model.PRESETS[args.preset]).init_weights(zero_residual=False).eval()
    x = media(args, args.inner)
    packed = m.pack([x])
    flops = m.estimate_flops(packed) / 3                                        # forward only
    t0 = time.perf_counter()
    rec = m.reconstruct([x])[0]
    dt = time.perf_counter() - t0
    print('RESULT ' + json.dumps(dict(case=args.inner, shape=list(x.shape), tokens=sum(packed.seqlens),
                                      seconds=dt, forward_tflop=flops / 1e12, out_shape=list(rec.shape),
                                      threads=torch.get_num_threads())))


def main():
    args = parse()
    if args.inner:
        return inner(args)
    for case in args.case.split(','):
        cmd = [sys.executable, os.path.abspath(__file__), f'--inner={case}'] + \
              [a for a in sys.argv[1:] if not a.startswith('--case')]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [s for s in r.stdout.splitlines() if s.startswith('RESULT ')]
        if r.returncode or not line:
            sys.exit(f"{case}: failed\n{r.stderr[-3000:]}")
        res = json.loads(line[-1][7:])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss   # KiB, the largest child so far
        res['peak_rss_gib'] = peak / 2 ** 20 if peak > before else float('nan')
        print(f"{case:5s} {'x'.join(map(str, res['shape'][:-1]))}: {res['tokens']} tokens, "
              f"{res['forward_tflop']:.2f} TFLOP, {res['seconds']:.1f} s on {res['threads']} threads "
              f"({res['forward_tflop'] * 1e3 / res['seconds']:.0f} GFLOP/s), peak memory "
              f"{res['peak_rss_gib']:.1f} GiB")


if __name__ == '__main__':
    main()
