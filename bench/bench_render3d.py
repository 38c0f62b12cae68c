"""
Benchmark render3d.py: Gaussian splatting (render_reference on CPU and CUDA, gsplat on CUDA) for 1k / 5k / 20k
random splats at 128 / 256 / 512 px, forward and forward+backward; then mesh rasterisation (a 12-triangle
textured cube and a ~10k-triangle UV sphere at 256 px) and the whole multiview packing of one procedural object
(16 views at 256 px -> 64^3 voxels + features).

Splats: centres uniform in [-0.5, 0.5]^3, scales 0.005-0.02 (a few pixels at 256 px), opacity 0.05-0.9, seen
from a TRELLIS camera (radius 2, FoV 40). Times are the best of `--repeat` runs after one warm-up.

Run:  python bench/bench_render3d.py [--quick] [--threads=N] [--repeat=1]
      (--quick: 1k/5k at 128/256 only. On a busy 2-core machine --threads=1 is often faster.)
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import render3d as r3  # noqa: E402


def timed(fn, repeat, cuda):
    """Best wall time of fn() over `repeat` runs after one warm-up, in milliseconds."""
    fn()
    best = float('inf')
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def random_splats(n, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = dict(xyz=torch.rand(n, 3, generator=gen) - 0.5, scale=0.005 + 0.015 * torch.rand(n, 3, generator=gen),
             rotation=torch.randn(n, 4, generator=gen), opacity=0.05 + 0.85 * torch.rand(n, generator=gen),
             rgb=torch.rand(n, 3, generator=gen))
    return {k: v.to(device).requires_grad_(True) for k, v in g.items()}


def bench_splats(backend, device, sizes, resolutions, repeat):
    rows = []
    for n in sizes:
        g = random_splats(n, device)
        for res in resolutions:
            cam = r3.sphere_cameras(4, offset=(0.3, 0.6), resolution=res)[1]

            def fwd():
                with torch.no_grad():
                    r3.render(g, cam, backend)

            def fwd_bwd():
                r3.render(g, cam, backend)['rgb'].sum().backward()
            cuda = device == 'cuda'
            rows.append((f'{backend} ({device})', n, res, timed(fwd, repeat, cuda), timed(fwd_bwd, repeat, cuda)))
            print(f'{rows[-1][0]:22s} {n:>6d} {res:>5d} {rows[-1][3]:>10.1f} {rows[-1][4]:>12.1f}', flush=True)
    return rows


def bench_meshes(device, repeat):
    cube = r3.make_mesh(*r3.primitive('cube'), np.zeros(12), [r3.Material(torch.ones(4), r3._pattern_texture(
        'checkered', (1, 0, 0), (1, 1, 1), 4))])
    sphere_geo = r3.primitive('sphere', n=100)
    sphere = r3.make_mesh(*sphere_geo, np.zeros(len(sphere_geo[1])), [r3.Material(torch.ones(4), r3._pattern_texture(
        'striped', (0, 0, 1), (1, 1, 1), 8))])
    sphere = r3.normalize_mesh(sphere)
    cam = r3.sphere_cameras(4, offset=(0.3, 0.6), resolution=256)[1]
    for name, mesh in (('cube', cube), ('uv sphere', sphere)):
        mesh = r3.Mesh(mesh.vertices.to(device), mesh.faces.to(device), mesh.uv.to(device),
                       mesh.face_material.to(device), [r3.Material(m.color.to(device), m.texture.to(device))
                                                       for m in mesh.materials])
        ms = timed(lambda: r3.render_mesh(mesh, cam), repeat, device == 'cuda')
        print(f'render_mesh ({device}) {name}: {len(mesh.faces)} triangles at 256 px: {ms:.1f} ms', flush=True)
    mesh, _, caption = r3.procedural_mesh(1)
    t = time.perf_counter()
    pack = r3.pack_asset(mesh, 16, 256)
    print(f'pack_asset (cpu) {caption}, {len(mesh.faces)} triangles: 16 views at 256 px + voxels + features: '
          f'{(time.perf_counter() - t) * 1e3:.0f} ms, {len(pack["coords"])} voxels', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    parser.add_argument('--repeat', type=int, default=1, help='timed runs after the warm-up (best is kept)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes, res = ((1000, 5000), (128, 256)) if args.quick else ((1000, 5000, 20000), (128, 256, 512))
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, '
          f'CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}')
    print(f'{"backend":22s} {"splats":>6s} {"px":>5s} {"fwd ms":>10s} {"fwd+bwd ms":>12s}')
    t0 = time.perf_counter()
    bench_splats('reference', 'cpu', sizes, res, args.repeat)
    if torch.cuda.is_available():
        bench_splats('reference', 'cuda', sizes, res, args.repeat)
        if r3.gsplat_available():
            bench_splats('gsplat', 'cuda', sizes, res, args.repeat)
    bench_meshes('cpu', args.repeat)
    if torch.cuda.is_available():
        bench_meshes('cuda', args.repeat)
    print(f'total {time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
    main()
