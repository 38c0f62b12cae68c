"""Structural properties of a training step (issue: one packed step, built once): no data-dependent host reads in
forward + loss + backward for any of the six tasks, an op count that does not grow with the number of samples,
and transformer blocks that compile once (fullgraph) for micro-batches of any shape."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import model
import render3d
import train
from kernels import grouped

# ops that read a device value back to the host (or whose output size depends on the data)
HOST_READS = {'_local_scalar_dense', 'nonzero', 'nonzero_static', 'masked_select', 'unique_consecutive',
              '_unique', '_unique2', 'unique_dim', 'item', 'is_nonzero', 'equal', 'allclose'}


class Census(TorchDispatchMode):
    """Counts every ATen op dispatched, and the host reads among them (repeat_interleave counts only with tensor
    repeats). Tensor.tolist / item / __bool__ / __int__ / __float__ are patched too (tolist does not dispatch)."""

    def __init__(self):
        super().__init__()
        self.ops, self.reads, self.paused = 0, [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split('::')[-1]
        if not self.paused:
            self.ops += 1
            if name in HOST_READS or (name == 'repeat_interleave' and isinstance(args[1] if len(args) > 1 else
                                                                                  kwargs.get('repeats'), torch.Tensor)):
                self.reads.append(name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def watching(self):
        patched = {}
        for attr in ('tolist', 'item', '__bool__', '__int__', '__float__', 'numpy'):
            real = getattr(torch.Tensor, attr)
            patched[attr] = real

            def wrap(t, *a, _real=real, _attr=attr, **k):
                if not self.paused:
                    self.reads.append(_attr)
                return _real(t, *a, **k)
            setattr(torch.Tensor, attr, wrap)
        try:
            with self:
                yield self
        finally:
            for attr, real in patched.items():
                setattr(torch.Tensor, attr, real)


CFG = ['configs/cpu_tiny.py', '--n_images=48', '--n_videos=12', '--n_3d=4', '--view_res_3d=16', '--views_3d=2']


@pytest.fixture(scope='module')
def setup():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = train.load_config(CFG)
    finally:
        os.chdir(cwd)
    stage = cfg.stages[2]                                   # all six tasks
    loss_cfg = train.replace(train.losses.LossConfig(), **cfg.loss)
    mcfg = train.stage_model_config(cfg, stage)
    frozen = train.losses.FrozenNets(loss_cfg, embed_dim=mcfg.encoder_width)
    torch.manual_seed(0)
    net = train.build_trainable(cfg, stage, None, frozen, loss_cfg)
    with torch.no_grad():                                   # every path active (init zeroes residual branches)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batches = {}
    for task, ds in data.build_datasets(cfg, stage, mcfg).items():
        keys = data.TokenBudgetSampler(ds, 512, 0).plan(0)
        batches[task] = data.collate([ds[(i, 0)] for i in keys[0]], mcfg)
    return net, batches, mcfg


@pytest.mark.parametrize('task', train.TASKS)
def test_no_host_reads_in_a_training_micro_batch(setup, task):
    """Forward + loss + backward of one micro-batch of each task reads nothing back from the device: the batch's
    structure was built on the host by data.collate. 3D reconstruction: the rasteriser (render3d.render_samples)
    sizes its per-pixel lists from the splats, by nature (gsplat does the same); it is counted apart, and
    everything around it (tokenizer, packed Gaussian decoder, loss, backward) must read nothing."""
    net, batches, _ = setup
    batch = batches[task]
    batch.packed = batch.packed.to('cpu')
    census = Census()
    real = render3d.render_samples

    def rasterise(*a, **k):                                 # the renderer's own reads are not counted
        census.paused = True
        try:
            return real(*a, **k)
        finally:
            census.paused = False
    render3d.render_samples = rasterise
    try:
        with census.watching():
            loss, _ = net(batch, task)
            loss.backward()
    finally:
        render3d.render_samples = real
    net.zero_grad(set_to_none=True)
    assert len(batch.packed.seqlens) >= 1 and census.ops > 100
    assert census.reads == [], f"{task}: host reads {census.reads}"


def test_reconstruction_micro_batch_skips_the_pooling_head(setup):
    """A reconstruction-only micro-batch does not run the pooling head (its embedding is in no reconstruction
    loss); an understanding micro-batch does, and skips the pixel decoder."""
    net, batches, _ = setup
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
             for name, m in (('head', net.tok.encoder.head), ('decoder', net.tok.decoder))]
    try:
        for task in ('image_rec', 'image_und'):
            calls.clear()
            batch = batches[task]
            batch.packed = batch.packed.to('cpu')
            loss, _ = net(batch, task)
            loss.backward()
            net.zero_grad(set_to_none=True)
            assert calls == (['decoder'] if task == 'image_rec' else ['head']), (task, calls)
    finally:
        for h in hooks:
            h.remove()

def micro_batch(n, side, cfg, sizes=None):
    """n images of side x side pixels, or of the (height, width) in sizes (random pixels), packed with their
    structure, as float on the CPU (its layouts carry the CPU attention plan)."""
    g = torch.Generator().manual_seed(n)
    media = [torch.rand(*hw, 3, generator=g) * 2 - 1 for hw in (sizes or [(side, side)] * n)]
    return model.pack(media, cfg.patch_size, cfg).to('cpu')


def count_step_ops(net, x):
    census = Census()
    with census.watching():
        out = net.tok(x, sample=False)
        loss, _ = train.losses.compute_losses(out, x, None, net.loss_cfg)
        loss.backward()
    net.zero_grad(set_to_none=True)
    return census


@pytest.mark.parametrize('small_scores', [0, 10 ** 9], ids=['sdpa', 'grouped-attention'])
@pytest.mark.parametrize('mixed', [False, True], ids=['equal-sizes', 'mixed-sizes'])
def test_op_count_independent_of_sample_count(setup, monkeypatch, small_scores, mixed):
    """A 1,024-token micro-batch of 4 images and one of 64 images run exactly the same ATen ops in forward + L1/KL
    loss + backward: no per-sample loop anywhere. Equal sizes (256 / 16 tokens each: one segment per group, no
    mask) and mixed sizes (384 + 128 + 2 x 256 / 32 x 8 + 32 x 24 tokens: masked groups). The CPU attention picks
    its path by the layout (SDPA, or GroupedAttention for short masked groups), not the number of samples: each
    path is checked."""
    net, _, cfg = setup
    monkeypatch.setattr(grouped, 'SMALL_SCORES', small_scores)
    if mixed:
        few = micro_batch(4, 0, cfg, [(192, 128), (64, 128), (128, 128), (128, 128)])
        many = micro_batch(64, 0, cfg, [(32, 16)] * 32 + [(32, 48)] * 32)
    else:
        few, many = micro_batch(4, 128, cfg), micro_batch(64, 32, cfg)
    assert sum(few.seqlens) == sum(many.seqlens) == 1024
    assert few.structure.seg.plan.small == many.structure.seg.plan.small == bool(small_scores)
    assert few.structure.seg.plan.full == many.structure.seg.plan.full == (not mixed)
    a, b = count_step_ops(net, few), count_step_ops(net, many)
    assert a.reads == b.reads == []
    assert a.ops == b.ops, (a.ops, b.ops)


def test_blocks_compile_once_for_any_micro_batch(setup):
    """One encoder block and one decoder block, compiled with fullgraph=True and dynamic shapes, run three
    micro-batches of different token and sample counts (and segment lengths) with one compilation each."""
    from torch._dynamo.testing import CompileCounterWithBackend
    net, _, cfg = setup
    torch._dynamo.reset()
    trunks = (net.tok.encoder, net.tok.decoder)
    counters = [CompileCounterWithBackend('aot_eager') for _ in trunks]
    compiled = [torch.compile(t.blocks[0], backend=c, fullgraph=True, dynamic=True) for t, c in zip(trunks, counters)]
    first = None
    for n, side in ((3, 64), (10, 32), (5, 48)):
        if first is None and n != 3:                        # what the first micro-batch compiled
            first = [c.frame_count for c in counters]
        x = micro_batch(n, side, cfg)
        st = x.structure
        for trunk, block in zip(trunks, compiled):
            h = torch.randn(sum(x.seqlens), trunk.input_layer.out_features, requires_grad=True)
            rope = trunk.rope(st.local)
            got = block(h, rope, st.seg)
            want = trunk.blocks[0](h, rope, st.seg)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            got.sum().backward()
    net.zero_grad(set_to_none=True)
    assert all(first) and [c.frame_count for c in counters] == first       # nothing compiled again


def test_tokenizer_compiles_once_for_any_micro_batch(setup):
    """train.compile_tokenizer (train.py compile_scope='tokenizer'): the tokenizer's whole training forward is one
    graph (no break), which three micro-batches of different token and sample counts (and segment lengths) reuse;
    its outputs and gradients are the eager ones."""
    import copy
    from torch._dynamo.testing import CompileCounterWithBackend
    net, _, cfg = setup
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    net.zero_grad(set_to_none=True)
    tok = copy.deepcopy(net.tok)
    train.compile_tokenizer(tok, backend=counter)
    counts = []
    for n, side in ((4, 64), (10, 32), (5, 48)):         # 256 tokens first: the position table's size
        x = micro_batch(n, side, cfg)
        outs = []
        for m in (tok, net.tok):                            # compiled, then eager: the same weights
            out = m(x, sample=False, decode=True, embed=False)
            (out['rec'].square().mean() + out['mean'].sum()).backward()
            outs.append((out['rec'].detach(), [p.grad for p in m.parameters()]))
            m.zero_grad(set_to_none=True)
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=0)
        for a, b in zip(outs[0][1], outs[1][1]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        counts.append(counter.frame_count)
    graphs = [g for g in counter.graphs if any(n.op == 'call_function' for n in g.graph.nodes)]
    assert len(graphs) == 1 and counts[0] == counts[1] == counts[2], counts     # compiled for the first one only
