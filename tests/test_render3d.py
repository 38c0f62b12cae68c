"""Tests for render3d.py: splat rendering against hand-computed EWA footprints and compositing, gradients,
the triangle rasteriser, both mesh loaders (files written here), the official voxel packing rules, prepare_assets /
load_prepared, cameras. CPU; the gsplat comparison needs CUDA and is skipped without it."""
import base64
import io
import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import render3d as r3

# -----------------------------------------------------------------------------
# helpers written independently of render3d


def rodrigues(axis, angle):
    """Rotation matrix from axis-angle (independent of render3d's quaternion formula)."""
    k = torch.tensor(axis, dtype=torch.float64)
    k = k / k.norm()
    K = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def quat_from_axis_angle(axis, angle):
    k = torch.tensor(axis, dtype=torch.float64)
    k = k / k.norm()
    return torch.cat([torch.tensor([math.cos(angle / 2)], dtype=torch.float64), math.sin(angle / 2) * k])


def identity_camera(size=64, f=1.0):
    """Camera at the origin looking down +z (OpenCV), normalised focal f."""
    return r3.Camera(torch.eye(4), f, f, 0.5, 0.5, size, size)


def footprint(mean_world, R, scale, cam, k=0.1):
    """Hand EWA: pixel mean [2], cov2d + kI [2, 2], compensation sqrt(det(cov) / det(cov + kI))."""
    w2c = cam.w2c.double()
    p = w2c[:3, :3] @ mean_world + w2c[:3, 3]
    fx, fy = cam.fx * cam.width, cam.fy * cam.height
    mean = torch.stack([fx * p[0] / p[2] + cam.cx * cam.width, fy * p[1] / p[2] + cam.cy * cam.height])
    J = torch.tensor([[fx / p[2], 0, -fx * p[0] / p[2] ** 2], [0, fy / p[2], -fy * p[1] / p[2] ** 2]],
                     dtype=torch.float64)
    sigma = R @ torch.diag(torch.tensor(scale, dtype=torch.float64) ** 2) @ R.T
    cov = J @ w2c[:3, :3] @ sigma @ w2c[:3, :3].T @ J.T
    covk = cov + k * torch.eye(2, dtype=torch.float64)
    return mean, covk, math.sqrt(torch.linalg.det(cov) / torch.linalg.det(covk))


def splat_image(mean, covk, peak, size):
    """alpha over a size x size image for one splat: min(0.99, peak exp(-d^T cov^-1 d / 2)), < 1/255 -> 0."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64) + 0.5,
                            torch.arange(size, dtype=torch.float64) + 0.5, indexing='ij')
    d = torch.stack([xs - mean[0], ys - mean[1]], -1)                 # [H, W, 2]
    m = torch.einsum('hwi,ij,hwj->hw', d, torch.linalg.inv(covk), d)
    a = (peak * torch.exp(-0.5 * m)).clamp(max=0.99)
    return torch.where(a >= 1 / 255, a, 0.0)


def world_at_pixel(cam, u, v, z):
    """World point that projects to pixel coords (u, v) (pixel units) at camera depth z."""
    pc = torch.tensor([(u / cam.width - cam.cx) / cam.fx * z, (v / cam.height - cam.cy) / cam.fy * z, z],
                      dtype=torch.float64)
    c2w = torch.linalg.inv(cam.w2c.double())
    return c2w[:3, :3] @ pc + c2w[:3, 3]


def gaussians(xyz, scale, quat, opacity, rgb):
    t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return dict(xyz=t(xyz), scale=t(scale), rotation=t(quat), opacity=t(opacity), rgb=t(rgb))


# -----------------------------------------------------------------------------
# Gaussian splatting


def test_single_gaussian_matches_analytic_footprint():
    cam = r3.look_at((0.4, -2.5, 0.6), width=64, height=64)
    row, col = 24, 40                                                 # choose a pixel centre as the mean
    mean_w = world_at_pixel(cam, col + 0.5, row + 0.5, 2.6)
    axis, angle, scale = (0.3, -0.5, 0.8), 0.7, (0.05, 0.03, 0.02)
    op, rgb = 0.7, torch.tensor([0.2, 0.5, 0.9])
    mean, covk, comp = footprint(mean_w, rodrigues(axis, angle), scale, cam)
    assert torch.allclose(mean, torch.tensor([col + 0.5, row + 0.5], dtype=torch.float64), atol=1e-4)
    g = gaussians(mean_w[None], [scale], quat_from_axis_angle(axis, angle)[None], [op], rgb[None])
    out = r3.render_reference(g, cam)
    expect = splat_image(mean, covk, op * comp, 64).float()
    assert torch.allclose(out['alpha'], expect, atol=2e-5)
    assert torch.allclose(out['rgb'], expect[..., None] * rgb, atol=2e-5)
    flat = int(out['alpha'].argmax())
    assert (flat // 64, flat % 64) == (row, col)
    assert out['rgb'][row, col] == pytest.approx((op * comp * rgb).tolist(), abs=1e-5)
    assert out['depth'][row, col] == pytest.approx(2.6, abs=1e-4)


def test_projection_matches_hand_covariance():
    cam = r3.look_at((1.5, 1.2, 0.8), width=96, height=64)
    mean_w = torch.tensor([0.1, -0.2, 0.15], dtype=torch.float64)
    axis, angle, scale = (1.0, 0.2, -0.4), 1.9, (0.08, 0.02, 0.05)
    mean, covk, comp = footprint(mean_w, rodrigues(axis, angle), scale, cam)
    m2, cov2, comp2, _ = r3.project_gaussians(mean_w[None].float(), torch.tensor([scale]),
                                              quat_from_axis_angle(axis, angle)[None].float(), cam)
    assert torch.allclose(m2[0].double(), mean, atol=1e-3)
    assert torch.allclose(cov2[0].double(), covk, rtol=1e-4, atol=1e-3)
    assert comp2[0].item() == pytest.approx(comp, rel=1e-4)


def two_splats(front_rgb, back_rgb, op_front, op_back, z_front=2.0, z_back=3.0):
    cam = identity_camera()
    pos = [world_at_pixel(cam, 32.5, 32.5, z) for z in (z_front, z_back)]
    return cam, pos, gaussians(torch.stack(pos), [[0.3] * 3] * 2, [[1, 0, 0, 0]] * 2,
                               [op_front, op_back], [front_rgb, back_rgb])


def test_compositing_front_to_back():
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    cam, _, g = two_splats(red, blue, 1.0, 1.0)                      # front opacity clamps to 0.99
    c = r3.render_reference(g, cam)['rgb'][32, 32]
    assert c.tolist() == pytest.approx([0.99, 0.0, 0.01 * 0.99], abs=1e-4)
    cam, _, g = two_splats(red, blue, 1.0, 1.0, z_front=3.0, z_back=2.0)   # swap depths: blue in front
    c = r3.render_reference(g, cam)['rgb'][32, 32]
    assert c.tolist() == pytest.approx([0.01 * 0.99, 0.0, 0.99], abs=1e-4)
    cam, pos, g = two_splats(red, blue, 0.5, 0.5)                     # half opacity mixes
    R = torch.eye(3, dtype=torch.float64)
    a1 = 0.5 * footprint(pos[0], R, (0.3,) * 3, cam)[2]
    a2 = 0.5 * footprint(pos[1], R, (0.3,) * 3, cam)[2]
    out = r3.render_reference(g, cam, background=(0.0, 1.0, 0.0))
    expect = [a1, (1 - a1) * (1 - a2), (1 - a1) * a2]                 # green = background * transmittance
    assert out['rgb'][32, 32].tolist() == pytest.approx(expect, abs=1e-4)
    assert out['alpha'][32, 32].item() == pytest.approx(1 - (1 - a1) * (1 - a2), abs=1e-4)


def test_gradients_reach_all_parameters():
    gen = torch.Generator().manual_seed(0)
    G = 40
    g = dict(xyz=(torch.rand(G, 3, generator=gen) - 0.5) * 0.8, scale=0.02 + 0.05 * torch.rand(G, 3, generator=gen),
             rotation=torch.randn(G, 4, generator=gen), opacity=0.2 + 0.6 * torch.rand(G, 1, generator=gen),
             rgb=torch.rand(G, 3, generator=gen))
    for v in g.values():
        v.requires_grad_(True)
    cam = r3.sphere_cameras(2, offset=(0.3, 0.7), resolution=48)[1]
    out = r3.render(g, cam)
    w = torch.rand(48, 48, 3, generator=gen)
    ((out['rgb'] * w).sum() + out['alpha'].sum()).backward()
    for name, v in g.items():
        assert torch.isfinite(v.grad).all(), name
        assert v.grad.abs().sum() > 0, name


def test_render_dispatch_and_background():
    cam, _, g = two_splats([1.0, 0, 0], [0, 0, 1.0], 0.5, 0.5)
    a = r3.render(g, cam, backend='auto', background=(0.2, 0.3, 0.4))
    b = r3.render_reference(g, cam, background=(0.2, 0.3, 0.4))
    assert torch.equal(a['rgb'], b['rgb'])
    assert a['rgb'][0, 0].tolist() == pytest.approx([0.2, 0.3, 0.4], abs=1e-6)   # empty corner = background
    with pytest.raises(ValueError):
        r3.render(g, cam, backend='nope')


def test_render_samples_splits_packed_gaussians():
    """render_samples (the one renderer of decoded Gaussians: training, evaluation) on two samples' Gaussians
    concatenated equals rendering each sample on its own, with its own cameras."""
    one = dict(xyz=torch.zeros(1, 3), scale=torch.full((1, 3), 0.2), rotation=torch.tensor([[1.0, 0, 0, 0]]),
               opacity=torch.tensor([[0.8]]), rgb=torch.tensor([[0.9, 0.4, 0.1]]))
    two = dict(xyz=torch.tensor([[0.1, 0, 0], [-0.2, 0.1, 0]]), scale=torch.full((2, 3), 0.15),
               rotation=torch.tensor([[1.0, 0, 0, 0]] * 2), opacity=torch.tensor([[0.5], [0.9]]),
               rgb=torch.tensor([[0.1, 0.8, 0.2], [0.3, 0.3, 0.9]]))
    cams = [r3.sphere_cameras(2, resolution=24), r3.sphere_cameras(3, resolution=16, offset=(0.3, 0.6))]
    both = {k: torch.cat([one[k], two[k]]) for k in one}
    out = r3.render_samples(both, [1, 2], cams, backend='reference')
    for g, c, o in zip((one, two), cams, out):
        want = torch.stack([r3.render(g, cam, backend='reference')['rgb'] for cam in c])
        assert o.shape == want.shape and torch.equal(o, want)
    assert out[0].std() > 0 and out[1].std() > 0          # something was drawn


@pytest.mark.skipif(not torch.cuda.is_available(), reason='gsplat needs CUDA')
def test_gsplat_matches_reference():
    pytest.importorskip('gsplat')
    gen = torch.Generator().manual_seed(0)
    G = 3000
    # opacities <= 0.9 keep alpha below both clamps (ours 0.99, gsplat 0.999); what remains is gsplat's stop at
    # T < 1e-4 and float error, so we require PSNR >= 40 dB between the backends (expected well above).
    g = dict(xyz=torch.rand(G, 3, generator=gen) - 0.5, scale=0.005 + 0.02 * torch.rand(G, 3, generator=gen),
             rotation=torch.randn(G, 4, generator=gen), opacity=0.05 + 0.85 * torch.rand(G, generator=gen),
             rgb=torch.rand(G, 3, generator=gen))
    g = {k: v.cuda() for k, v in g.items()}
    for cam in r3.sphere_cameras(3, offset=(0.1, 0.2), resolution=128):
        ref = r3.render(g, cam, backend='reference')['rgb']
        fast = r3.render(g, cam, backend='gsplat')['rgb']
        psnr = -10 * torch.log10(((ref - fast) ** 2).mean()).item()
        assert psnr >= 40.0, psnr


# -----------------------------------------------------------------------------
# mesh rasteriser


def test_single_triangle_coverage_and_depth():
    cam = identity_camera()
    px = [(10.2, 8.7), (52.3, 15.1), (20.4, 55.9)]
    verts = torch.stack([world_at_pixel(cam, u, v, 2.0) for u, v in px]).float()
    mesh = r3.make_mesh(verts.numpy(), [[0, 1, 2]], np.zeros((1, 3, 2)), [0], [r3.Material(torch.ones(4))])
    rgb, alpha, depth = r3.render_mesh(mesh, cam)
    # independent inside test at pixel centres, with a margin for points on an edge
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing='ij')
    p = torch.tensor(px)

    def edge(a, b):
        return (p[b, 0] - p[a, 0]) * (ys - p[a, 1]) - (p[b, 1] - p[a, 1]) * (xs - p[a, 0])
    e = torch.stack([edge(0, 1), edge(1, 2), edge(2, 0)])
    e = e * torch.sign(e.sum(0, keepdim=True).mean())
    inside, near_edge = (e > 1e-2).all(0), (e > -1e-2).all(0)
    assert alpha[inside].all() and not alpha[~near_edge].any()
    area = 0.5 * abs(float((p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1]) - (p[2, 0] - p[0, 0]) * (p[1, 1] - p[0, 1])))
    perimeter = sum(float((p[i] - p[(i + 1) % 3]).norm()) for i in range(3))
    assert abs(alpha.sum().item() - area) < 0.5 * perimeter
    assert torch.allclose(depth[alpha > 0], torch.tensor(2.0), atol=1e-5)
    assert torch.isinf(depth[alpha == 0]).all()
    assert torch.equal(rgb[alpha > 0], torch.ones(int(alpha.sum()), 3))


# cube with a distinct colour per face (file axes, Y up), via a 6-colour texture atlas
FACE_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


def cube_geometry():
    """24 vertices [24, 3] (4 per face, order +x -x +y -y +z -z), 12 triangles, uvs (glTF convention)."""
    verts, uvs = [], []
    for axis in range(3):
        for sign in (1, -1):
            u_ax, v_ax = [a for a in range(3) if a != axis]
            for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                p = [0.0, 0.0, 0.0]
                p[axis], p[u_ax], p[v_ax] = 0.5 * sign, 0.5 * du, 0.5 * dv
                verts.append(p)
            f = len(uvs) // 4
            for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):      # inset so bilinear stays in the strip
                uvs.append([(f + 0.5 + 0.25 * du) / 6, 0.5 + 0.25 * dv])
    faces = [[4 * f, 4 * f + 1, 4 * f + 2] for f in range(6)] + [[4 * f, 4 * f + 2, 4 * f + 3] for f in range(6)]
    faces = [faces[i // 2 + 6 * (i % 2)] for i in range(12)]          # fan order per quad, as OBJ gives
    return np.array(verts, np.float32), np.array(faces, np.int64), np.array(uvs, np.float32)


def atlas_png():
    img = np.zeros((8, 48, 3), np.uint8)
    for f, c in enumerate(FACE_COLORS):
        img[:, 8 * f: 8 * f + 8] = c
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, 'PNG')
    return buf.getvalue()


def write_obj(folder, name, verts, faces, uvs, png, colors=None):
    """OBJ + MTL + PNG; quads written as polygons (fan-triangulated by the loader), vt with v up."""
    with open(os.path.join(folder, name + '.png'), 'wb') as f:
        f.write(png)
    with open(os.path.join(folder, name + '.mtl'), 'w') as f:
        f.write(f'newmtl skin\nKd 0.5 0.5 0.5\nmap_Kd {name}.png\n')
    lines = [f'mtllib {name}.mtl', 'o thing']
    for i, v in enumerate(verts):
        extra = '' if colors is None else ' ' + ' '.join(str(c) for c in colors[i])
        lines.append('v ' + ' '.join(f'{x:.6f}' for x in v) + extra)
    lines += [f'vt {u:.6f} {1 - v:.6f}' for u, v in uvs]
    lines.append('usemtl skin')
    for q in range(len(faces) // 2):
        a, b, c = faces[2 * q]
        d = faces[2 * q + 1][2]
        lines.append('f ' + ' '.join(f'{i + 1}/{i + 1}' for i in (a, b, c, d)))
    path = os.path.join(folder, name + '.obj')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


def write_glb(path, verts, faces, uvs, png, nodes=None):
    """Minimal GLB: positions, TEXCOORD_0, uint16 indices, embedded PNG, one textured material."""
    chunks = [verts.astype('<f4').tobytes(), uvs.astype('<f4').tobytes(), faces.astype('<u2').tobytes(), png]
    views, off, blob = [], 0, b''
    for c in chunks:
        views.append(dict(buffer=0, byteOffset=off, byteLength=len(c)))
        c += b'\0' * (-len(c) % 4)
        blob += c
        off += len(c)
    doc = dict(asset=dict(version='2.0'), scene=0, scenes=[dict(nodes=[0])],
               nodes=nodes or [dict(mesh=0)],
               meshes=[dict(primitives=[dict(attributes=dict(POSITION=0, TEXCOORD_0=1), indices=2, material=0)])],
               materials=[dict(pbrMetallicRoughness=dict(baseColorTexture=dict(index=0)))],
               textures=[dict(source=0)], images=[dict(bufferView=3, mimeType='image/png')],
               accessors=[dict(bufferView=0, componentType=5126, count=len(verts), type='VEC3',
                               min=verts.min(0).tolist(), max=verts.max(0).tolist()),
                          dict(bufferView=1, componentType=5126, count=len(uvs), type='VEC2'),
                          dict(bufferView=2, componentType=5123, count=faces.size, type='SCALAR')],
               bufferViews=views, buffers=[dict(byteLength=len(blob))])
    js = json.dumps(doc).encode()
    js += b' ' * (-len(js) % 4)
    with open(path, 'wb') as f:
        f.write(struct.pack('<4sII', b'glTF', 2, 12 + 8 + len(js) + 8 + len(blob)))
        f.write(struct.pack('<II', len(js), 0x4E4F534A) + js + struct.pack('<II', len(blob), 0x004E4942) + blob)
    return path


def test_textured_cube_both_loaders(tmp_path):
    verts, faces, uvs = cube_geometry()
    png = atlas_png()
    m_obj = r3.load_mesh(write_obj(str(tmp_path), 'cube', verts, faces, uvs, png))
    m_glb = r3.load_mesh(write_glb(str(tmp_path / 'cube.glb'), verts, faces, uvs, png))
    # same triangle soup (positions and uvs per corner), whatever the vertex sharing
    assert torch.allclose(m_obj.vertices[m_obj.faces], m_glb.vertices[m_glb.faces], atol=1e-6)
    assert torch.allclose(m_obj.uv, m_glb.uv, atol=1e-6)
    # file +y is world +z, file +z is world -y (Blender's Y-up import); file face order +x -x +y -y +z -z
    world_dirs = [(1, 0, 0), (-1, 0, 0), (0, 0, 1), (0, 0, -1), (0, -1, 0), (0, 1, 0)]
    for mesh in (m_obj, m_glb):
        for face, d in enumerate(world_dirs):
            cam = r3.look_at(2 * np.array(d, float), width=64, height=64)
            rgb, alpha, depth = r3.render_mesh(mesh, cam)
            assert (rgb[32, 32] * 255).round().tolist() == list(FACE_COLORS[face]), (face, d)
            assert depth[32, 32].item() == pytest.approx(1.5, abs=1e-3)
            # coverage: the front face spans |x| <= fx * 0.5 / 1.5 pixels around the centre; sides are edge-on
            half = cam.fx * 64 * 0.5 / 1.5
            n = sum(1 for j in range(64) if abs(j + 0.5 - 32) <= half)
            assert abs(alpha.sum().item() - n * n) <= 2 * n
    a = r3.render_mesh(m_obj, r3.sphere_cameras(3, resolution=48)[2])
    b = r3.render_mesh(m_glb, r3.sphere_cameras(3, resolution=48)[2])
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a[:2], b[:2]))


def test_gltf_scene_graph_and_obj_details(tmp_path):
    verts, faces, uvs = cube_geometry()
    # parent: column-major matrix translating by (5, 0, 0); child: TRS scale (2, 1, 1) holding the mesh
    mat = np.eye(4)
    mat[:3, 3] = (5, 0, 0)
    nodes = [dict(matrix=mat.T.reshape(-1).tolist(), children=[1]), dict(mesh=0, scale=[2, 1, 1])]
    m = r3.load_mesh(write_glb(str(tmp_path / 'tr.glb'), verts, faces, uvs, atlas_png(), nodes), normalize=False)
    lo, hi = m.vertices.amin(0), m.vertices.amax(0)
    assert lo.tolist() == pytest.approx([4.0, -0.5, -0.5]) and hi.tolist() == pytest.approx([6.0, 0.5, 0.5])
    m = r3.load_mesh(str(tmp_path / 'tr.glb'))                         # normalised: longest side 1, centred
    assert (m.vertices.amax(0) - m.vertices.amin(0)).tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert m.vertices.mean(0).abs().max() < 1e-6
    # OBJ: a vertex-coloured quad with negative indices, no material library
    obj = tmp_path / 'quad.obj'
    obj.write_text('v 0 0 0 1 0 0\nv 1 0 0 0 1 0\nv 1 1 0 0 0 1\nv 0 1 0 1 1 1\nf -4 -3 -2 -1\n')
    m = r3.load_mesh(str(obj))
    assert m.faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    assert m.vertex_colors[:3].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_gltf_text_interleaved_normalized_external(tmp_path):
    """.gltf with a base64 buffer holding interleaved position+uv (byteStride 20), normalized uint8 COLOR_0
    (stride 4) and uint32 indices; the base-colour texture is an external PNG next to the file."""
    verts, faces, uvs = cube_geometry()
    cols = np.tile(np.array([[255, 128, 0, 255]], np.uint8), (len(verts), 1))
    inter = np.concatenate([verts, uvs], 1).astype('<f4').tobytes()  # [24, 5] floats, 20 bytes per vertex
    blob = inter + cols.tobytes() + faces.astype('<u4').tobytes()
    (tmp_path / 'atlas.png').write_bytes(atlas_png())
    doc = dict(asset=dict(version='2.0'), nodes=[dict(mesh=0)],
               meshes=[dict(primitives=[dict(attributes=dict(POSITION=0, TEXCOORD_0=1, COLOR_0=2), indices=3,
                                             material=0)])],
               materials=[dict(pbrMetallicRoughness=dict(baseColorFactor=[1, 1, 0.5, 1],
                                                         baseColorTexture=dict(index=0)))],
               textures=[dict(source=0)], images=[dict(uri='atlas.png')],
               bufferViews=[dict(buffer=0, byteOffset=0, byteLength=len(inter), byteStride=20),
                            dict(buffer=0, byteOffset=len(inter), byteLength=cols.nbytes, byteStride=4),
                            dict(buffer=0, byteOffset=len(inter) + cols.nbytes, byteLength=faces.size * 4)],
               accessors=[dict(bufferView=0, componentType=5126, count=24, type='VEC3'),
                          dict(bufferView=0, byteOffset=12, componentType=5126, count=24, type='VEC2'),
                          dict(bufferView=1, componentType=5121, normalized=True, count=24, type='VEC4'),
                          dict(bufferView=2, componentType=5125, count=faces.size, type='SCALAR')],
               buffers=[dict(byteLength=len(blob),
                             uri='data:application/octet-stream;base64,' + base64.b64encode(blob).decode())])
    (tmp_path / 'cube.gltf').write_text(json.dumps(doc))
    m = r3.load_mesh(str(tmp_path / 'cube.gltf'))
    ref = r3.load_mesh(write_glb(str(tmp_path / 'ref.glb'), verts, faces, uvs, atlas_png()))
    assert torch.allclose(m.vertices[m.faces], ref.vertices[ref.faces], atol=1e-6)
    assert torch.allclose(m.uv, ref.uv, atol=1e-6)
    assert torch.allclose(m.vertex_colors, torch.tensor([1.0, 128 / 255, 0.0]).expand(24, 3))
    rgb, _, _ = r3.render_mesh(m, r3.look_at((2.0, 0, 0), width=32, height=32))
    # +x face texel red (1, 0, 0) * factor (1, 1, 0.5) * vertex colour (1, 0.5, 0)
    assert rgb[16, 16].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    # -y face (world -z) texel yellow (1, 1, 0) * (1, 1, 0.5) * (1, 0.5, 0)
    rgb, _, _ = r3.render_mesh(m, r3.look_at((0, 0, -2.0), width=32, height=32))
    assert rgb[16, 16].tolist() == pytest.approx([1.0, 128 / 255, 0.0], abs=1e-6)


def test_bad_files_raise_or_warn(tmp_path):
    bad = tmp_path / 'broken.glb'
    bad.write_bytes(b'this is not a glb file at all')
    with pytest.raises(r3.AssetError, match='broken.glb'):
        r3.load_mesh(str(bad))
    empty = tmp_path / 'empty.obj'
    empty.write_text('v 0 0 0\nv 1 0 0\n')
    with pytest.raises(r3.AssetError, match='empty.obj.*no faces'):
        r3.load_mesh(str(empty))
    with pytest.raises(r3.AssetError, match='unsupported'):
        r3.load_mesh(str(tmp_path / 'x.fbx'))
    verts, faces, uvs = cube_geometry()
    path = write_obj(str(tmp_path), 'notex', verts, faces, uvs, atlas_png())
    os.remove(tmp_path / 'notex.png')
    with pytest.warns(UserWarning, match='not found'):
        m = r3.load_mesh(path)
    assert m.materials[0].texture is None and m.materials[0].color[:3].tolist() == pytest.approx([0.5] * 3)


# -----------------------------------------------------------------------------
# voxel packing (official rules)


def test_voxelize_sphere_gives_a_shell():
    v, f, uv = r3.primitive('sphere', n=48)
    mesh = r3.normalize_mesh(r3.make_mesh(v, f, uv, np.zeros(len(f)), [r3.Material(torch.ones(4))]))
    cams = r3.sphere_cameras(24, offset=(0.5, 0.5), resolution=128)
    depth = torch.stack([r3.render_mesh(mesh, c)[2] for c in cams])
    coords = r3.voxelize(depth, cams)
    lin = (coords[:, 0] * 64 + coords[:, 1]) * 64 + coords[:, 2]
    assert torch.equal(lin, torch.unique(lin))                         # ascending raster order, no repeats
    radius = (-0.5 + (coords.float() + 0.5) / 64).norm(dim=1)
    assert ((radius - 0.5).abs() < 1.5 / 64).all()
    # a surface crosses about area / h^2 * mean(|n_x| + |n_y| + |n_z|) = 1.5 * 4 pi r^2 / h^2 cells
    expected = 1.5 * 4 * math.pi * 0.25 * 64 ** 2
    assert 0.75 * expected < len(coords) < 1.15 * expected, (len(coords), expected)


def test_nearest_view_and_cell_rule():
    cams = [r3.look_at((2.0, 0, 0), width=64, height=64), r3.look_at((-2.0, 0, 0), width=64, height=64)]
    red, blue = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    maps = r3.view_features(np.stack([red, blue]))
    assert maps.shape == (2, 768, 16, 16)
    coords = torch.tensor([[57, 32, 32], [6, 32, 32], [57, 10, 50]])   # x = +0.4, -0.4, +0.4
    feats = r3.voxel_features(coords, maps, cams)
    assert torch.equal(feats[0], torch.tensor([1.0, 0, 0]).repeat(256))
    assert torch.equal(feats[1], torch.tensor([0, 0, 1.0]).repeat(256))
    assert torch.equal(feats[2], feats[0])
    # cell rule: a 256 px view whose cell (row, col) holds (row * 16 + col) / 255 in every pixel of it
    cells = np.repeat(np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16), 16, 0), 16, 1)
    img = np.stack([cells, cells, cells], -1)
    cam = r3.look_at((2.0, 0, 0), width=256, height=256)
    coords = torch.tensor([[40, i, k] for i in range(8, 56, 5) for k in range(8, 56, 7)])
    feats = r3.voxel_features(coords, r3.view_features(img[None]), [cam])
    centres = -0.5 + (coords.double() + 0.5) / 64
    pc = centres @ cam.w2c.double()[:3, :3].T + cam.w2c.double()[:3, 3]
    u, v = cam.fx * pc[:, 0] / pc[:, 2] + 0.5, cam.fy * pc[:, 1] / pc[:, 2] + 0.5
    expect = torch.round(v * 15) * 16 + torch.round(u * 15)             # round(u * 15), not floor(u * 16)
    assert torch.equal((feats[:, 0] * 255).round(), expect.float())
    assert (torch.floor(u * 16) != torch.round(u * 15)).any()          # the quirk matters on this case
    # channel order inside a cell is (p_row, p_col, c): a random 256 px view (LANCZOS to 256 is a copy)
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    feats = r3.voxel_features(coords, r3.view_features(img[None]), [cam])
    for n, (row, col) in enumerate(zip(torch.round(v * 15).long().tolist(), torch.round(u * 15).long().tolist())):
        patch = img[16 * row: 16 * row + 16, 16 * col: 16 * col + 16].reshape(-1)   # [16, 16, 3] -> [768]
        assert torch.equal((feats[n] * 255).round().byte(), torch.from_numpy(patch))


def test_voxel_splats_match_the_mesh_silhouette():
    """One splat per occupied voxel (centre, voxel-sized, opaque, mean patch colour) seen from a new camera
    covers what the mesh covers: voxel coords (i, j, k) and splat xyz share one world frame."""
    mesh, _, _ = r3.procedural_mesh(5)
    pack = r3.pack_asset(mesh, 8, 96, offset=(0.1, 0.9))
    centres = -0.5 + (pack['coords'].float() + 0.5) / 64
    n = len(centres)
    g = dict(xyz=centres, scale=torch.full((n, 3), 0.6 / 64), rotation=torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4),
             opacity=torch.ones(n), rgb=pack['feats'].view(n, 256, 3).mean(1))
    cam = r3.look_at((1.2, -1.4, 0.9), width=64, height=64)
    splat = r3.render(g, cam)
    rgb, alpha, _ = r3.render_mesh(mesh, cam)
    covered = splat['alpha'] > 0.5
    iou = (covered & (alpha > 0)).sum() / (covered | (alpha > 0)).sum()
    assert iou > 0.75, iou                                            # edges: voxels overhang by <= half a voxel
    both = covered & (alpha > 0)
    assert (splat['rgb'][both] - rgb[both]).abs().mean() < 0.15


def test_model_input_layout():
    """Prepared voxels become model input exactly as the official inference_3d packs them."""
    import model
    feats, coords = torch.rand(5, 768), torch.randint(0, 64, (5, 3))
    p = model.pack([r3.model_input(feats, coords)], (4, 16, 16))
    # a one-frame batch carries the pt = 0 slot only; the official zero frames are the input layer's business
    assert p.feats.shape == (5, 768) and p.coords.shape == (5, 4) and p.kinds == ['3d']
    assert torch.allclose(p.feats, feats * 2 - 1)
    assert (p.coords[:, 0] == 0).all() and torch.equal(p.coords[:, 1:], coords)
    # next to a video the voxels are zero-padded to full space-time patches, the official layout
    q = model.pack([r3.model_input(feats, coords), torch.zeros(4, 16, 16, 3)], (4, 16, 16))
    assert q.feats.shape == (6, 3072) and torch.allclose(q.feats[:5, :768], feats * 2 - 1)
    assert (q.feats[:5, 768:] == 0).all()
    assert model.pack([r3.model_input(torch.rand(5, 192), coords)], (4, 8, 8)).feats.shape == (5, 192)


def test_prepare_and_load_prepared(tmp_path, capsys):
    assets, out = tmp_path / 'assets', tmp_path / 'out'
    assets.mkdir()
    verts, faces, uvs = cube_geometry()
    write_obj(str(assets), 'cube_a', verts, faces, uvs, atlas_png())
    write_glb(str(assets / 'cube_b.glb'), verts * np.array([1, 2, 1], np.float32), faces, uvs, atlas_png())
    (assets / 'corrupt.glb').write_bytes(b'glTF\x02\x00\x00\x00garbage')
    r3.main(['prepare', str(assets), str(out), '--views=4', '--resolution=64'])
    log = capsys.readouterr().out
    assert 'skipped 1' in log and 'corrupt.glb' in log
    assert sorted(os.listdir(out)) == ['cube_a', 'cube_b']
    d = r3.load_prepared(str(out / 'cube_b'))
    assert sorted(os.listdir(out / 'cube_b')) == ['000.png', '001.png', '002.png', '003.png', 'cameras.json',
                                                  'depth.npy', 'meta.json', 'voxels.npz']
    assert d['views'].shape == (4, 64, 64, 3) and d['views'].min() >= -1 and d['views'].max() <= 1
    assert (d['views'][d['alphas'] == 0] == -1).all()                # black background
    assert d['meta']['caption'] == 'a 3D model of cube b' and d['meta']['voxels'] == len(d['coords'])
    # the stored data equal a fresh in-memory pack of the same asset
    pack = r3.pack_asset(r3.load_mesh(str(assets / 'cube_b.glb')), 4, 64, offset=r3.asset_offset('cube_b'))
    assert torch.equal(d['coords'], pack['coords'])
    assert torch.allclose(d['feats'], pack['feats'], atol=1e-6)
    assert torch.allclose(d['cameras'][2].w2c, pack['cameras'][2].w2c)
    assert torch.equal(torch.isinf(d['depths']), torch.isinf(pack['depth']))
    assert torch.equal(d['alphas'], pack['rgba'][..., 3].float() / 255)
    only_bad = tmp_path / 'bad'
    only_bad.mkdir()
    (only_bad / 'x.obj').write_text('v 0 0 0\n')
    with pytest.raises(r3.AssetError, match='bad: no usable assets'):
        r3.prepare_assets(str(only_bad), str(tmp_path / 'out2'))


# -----------------------------------------------------------------------------
# cameras and procedural objects


def test_camera_from_nerf_hand_case():
    # Blender camera at (2, 0, 0) looking at the origin, image up = world +z: OpenGL c2w columns are
    # right (0, 1, 0), up (0, 0, 1), backward (1, 0, 0)
    c2w = [[0, 0, 1, 2], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    cam = r3.camera_from_nerf(c2w, math.radians(40), 64, 64)
    expect = torch.tensor([[0, 1, 0, 0], [0, 0, -1, 0], [-1, 0, 0, 2], [0, 0, 0, 1]], dtype=torch.float32)
    assert torch.allclose(cam.w2c, expect, atol=1e-6)
    assert torch.allclose(cam.w2c, r3.look_at((2, 0, 0)).w2c, atol=1e-6)
    assert cam.fx == pytest.approx(0.5 / math.tan(math.radians(20))) and (cam.cx, cam.cy) == (0.5, 0.5)
    assert torch.allclose(cam.K, torch.tensor([[cam.fx * 64, 0, 32], [0, cam.fy * 64, 32], [0, 0, 1]]))


def test_sphere_cameras_look_at_origin_z_up():
    cams = r3.sphere_cameras(16, offset=(0.25, 0.5), resolution=128)
    for cam in cams:
        c2w = cam.c2w
        assert c2w[:3, 3].norm().item() == pytest.approx(2.0, abs=1e-5)
        origin = cam.w2c[:3, 3]                                        # origin in camera space
        assert origin[:2].abs().max() < 1e-5 and origin[2].item() == pytest.approx(2.0, abs=1e-5)
        up = cam.w2c[:3, :3] @ torch.tensor([0, 0, 1.0])               # world +z in camera space
        if up[:2].norm() > 0.1:                                        # not looking straight along z
            assert up[1] < 0                                           # world up = image up (y down)
            assert up[0].abs() < 1e-5                                  # no roll
        assert cam.fx == pytest.approx(1.3737, abs=1e-4)
    yaw_pitch = [r3.sphere_hammersley(i, 16, (0.25, 0.5)) for i in range(16)]
    assert min(p for _, p in yaw_pitch) < -0.5 and max(p for _, p in yaw_pitch) > 0.5


def test_procedural_mesh_renders_and_is_deterministic():
    seen = set()
    for seed in range(12):
        mesh, name, caption = r3.procedural_mesh(seed)
        assert name in r3.PRIMITIVES and caption.endswith(name)
        lo, hi = mesh.vertices.amin(0), mesh.vertices.amax(0)
        assert (hi - lo).max().item() == pytest.approx(1.0, abs=1e-5) and (hi + lo).abs().max() < 1e-5
        seen.add(name)
    again = r3.procedural_mesh(3)
    first = r3.procedural_mesh(3)
    assert torch.equal(again[0].vertices, first[0].vertices) and again[2] == first[2]
    rgb, alpha, _ = r3.render_mesh(first[0], r3.sphere_cameras(1, offset=(0.3, 0.3), resolution=48)[0])
    assert alpha.sum() > 100 and rgb[alpha > 0].max() > 0.3
    assert len(seen) >= 4


def test_turntable_cameras():
    """Evenly spaced azimuths at one elevation and radius, each camera looking at the origin (which lands on
    the image centre), as a turntable video needs."""
    cams = r3.turntable_cameras(8, elevation_deg=30.0, radius=2.5, resolution=40)
    eyes = []
    for cam in cams:
        w2c = cam.w2c.double()
        eye = -w2c[:3, :3].T @ w2c[:3, 3]                              # camera centre in world coordinates
        eyes.append(eye)
        assert eye.norm().item() == pytest.approx(2.5, abs=1e-5)
        assert math.degrees(math.asin(eye[2].item() / 2.5)) == pytest.approx(30.0, abs=1e-4)
        origin = w2c[:3, 3]                                             # the origin in camera coordinates
        assert origin[0].item() == pytest.approx(0, abs=1e-5) and origin[1].item() == pytest.approx(0, abs=1e-5)
        assert origin[2].item() > 0                                     # in front of the camera
    yaw = [math.degrees(math.atan2(e[1].item(), e[0].item())) % 360 for e in eyes]
    assert yaw == pytest.approx([45.0 * i for i in range(8)], abs=1e-4)
