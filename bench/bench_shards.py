"""
Encode throughput of shards.py: samples/s and tokens/s for turning a folder of images into FSQ token shards,
end to end (PNG decoding, packing, encoder + FSQ, writing safetensors), with a randomly initialised tokenizer of
the chosen preset (FSQ on; the weights do not change the cost). Images are written to a temp dir first.

    python bench/bench_shards.py                                     # tiny preset on CPU, ~30 s on 2 cores
    python bench/bench_shards.py --preset=so400m --device=cuda --n=512 --res=256 --batch_tokens=65536
"""
import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import numpy as np
import torch
from PIL import Image

import model
import shards


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--preset', default='tiny', choices=sorted(model.PRESETS))
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--n', type=int, default=256, help='images')
    ap.add_argument('--res', type=int, default=64, help='image side (px)')
    ap.add_argument('--batch_tokens', type=int, default=16384)
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0 = default)')
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix='bench_shards_')
    try:
        rng = np.random.default_rng(0)
        os.makedirs(os.path.join(tmp, 'images'))
        for i in range(a.n):        # smooth random images (PNG decode cost like a photo's, not like noise)
            small = rng.integers(0, 256, (a.res // 8, a.res // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((a.res, a.res), Image.BICUBIC).save(os.path.join(tmp, 'images', f'{i:05d}.png'))
        torch.manual_seed(0)
        cfg = model.ModelConfig(**{**model.asdict(model.PRESETS[a.preset]), 'use_quantizer': True})
        tok = model.AToken(cfg).init_weights(zero_residual=False)
        torch.save(tok.export(), os.path.join(tmp, 'tok.pt'))
        common = [f'--checkpoint={tmp}/tok.pt', f'--input={tmp}/images', f'--device={a.device}',
                  f'--batch_tokens={a.batch_tokens}', '--shard_size=64']
        shards.main(['encode', *common, f'--out={tmp}/warmup'])      # first pass: allocator, caches, kernels
        s = shards.main(['encode', *common, f'--out={tmp}/shards'])
        dev = torch.cuda.get_device_name() if a.device.startswith('cuda') else f'CPU ({torch.get_num_threads()} threads)'
        tokens_per = s['tokens'] / max(s['samples'], 1)
        print(f"\n{a.preset} ({tok.num_params() / 1e6:.1f}M params), {a.n} images {a.res}x{a.res} "
              f"({tokens_per:.0f} tokens each), {dev}: {s['samples'] / s['seconds']:.1f} samples/s, "
              f"{s['tokens'] / s['seconds']:.0f} tokens/s")
    finally:
        shutil.rmtree(tmp)


if __name__ == '__main__':
    main()
