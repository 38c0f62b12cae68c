"""
3D for AToken: meshes -> multiview renders + depth -> 64^3 voxels with per-voxel RGB patch features (the
tokenizer's 3D input), and Gaussian splats -> images (the 3D reconstruction target).

  meshes      load_mesh reads .glb/.gltf and .obj(+.mtl) by hand (json + struct + numpy + PIL), applies the
              scene graph, converts Y-up files to our Z-up world and normalises into [-0.5, 0.5]^3.
              procedural_mesh(seed) makes a textured primitive with a class name and caption (built-in data).
  cameras     Camera (OpenCV axes, normalised intrinsics), look_at, sphere_cameras (TRELLIS sampling),
              camera_from_nerf (official transforms.json frames).
  raster      render_mesh: a vectorised z-buffer triangle rasteriser in pure torch (CPU or GPU), unlit.
  packing     voxelize + view_features + voxel_features = apple/ml-atoken's pack_multiview_feat.py:
              depth unprojection -> occupied 64^3 voxels -> nearest view's 16x16 RGB patch per voxel;
              model_input turns them into the asset dict model.pack tokenizes (feats in [-1, 1], coords).
              pack_asset does all of it for one mesh; prepare_assets for a folder (`python render3d.py prepare`),
              load_prepared reads back.
  splats      render(gaussians, camera, backend): render_reference (pure torch, differentiable, EWA
              splatting with the mip-splatting 2D filter) or render_gsplat (CUDA, gsplat); render_samples;
              render_views (a Gaussian decoder's output for one asset, per camera).

Sources (ideas and conventions; no code copied):
  TRELLIS (Xiang et al. 2024, microsoft/TRELLIS): camera sampling (Hammersley yaw/pitch, radius 2, FoV 40,
    Z-up Blender world), scene normalisation (scale = 1 / longest bbox side, centred), Gaussian renderer settings.
  3D Gaussian splatting (Kerbl et al. 2023) and EWA splatting (Zwicker et al. 2001): covariance R S S^T R^T,
    projection J W Sigma W^T J^T, front-to-back alpha compositing, alpha <= 0.99, skip alpha < 1/255.
  Mip-Splatting (Yu et al. 2024): 2D filter cov2d + k I with opacity * sqrt(det(cov2d) / det(cov2d + k I)),
    kernel k = 0.1 px as the official (TRELLIS) renderer uses.
  apple/ml-atoken atoken_inference/scripts/pack_multiview_feat.py: the multiview voxel packing (section
    'multiview voxel packing' below).

Differences from the official data, worth knowing before mixing with official checkpoints:
  - views are unlit (colour = base colour x texture x vertex colour, one sample per pixel centre), where TRELLIS
    renders with Blender Cycles lighting; the voxel features therefore see albedo, not shading.
  - prepare_assets defaults to 16 views at 256 px (the official packing reads 16 views, rendered by TRELLIS at
    512 px).
  - readers skip: sparse accessors, Draco/meshopt compression (an error), KHR_texture_transform, sampler modes
    (always repeat), transparency; non-triangle glTF primitives are ignored.

Run:
  python render3d.py prepare <assets_dir> <out_dir> [--views=16 --resolution=256]
  python -m pytest -q tests/test_render3d.py        python bench/bench_render3d.py

Letters for shape comments (as model.py): G gaussians, V views, H W height width, N voxels, F faces,
E (primitive, pixel) pairs, C channels, P pixels.
"""
import argparse
import base64
import io
import json
import math
import os
import struct
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, replace
from urllib.parse import unquote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import model

GRID = 64                   # voxel grid resolution over [-0.5, 0.5]^3 (official)
FEAT_GRID = 16              # each view becomes a FEAT_GRID x FEAT_GRID grid of RGB patches (official)
PAIR_BUDGET = 1 << 21       # (primitive, pixel) pairs per band of rows: bounds rasteriser memory
ALPHA_MIN = 1.0 / 255.0     # 3DGS skips splat contributions below this alpha
ALPHA_MAX = 0.99            # 3DGS / mip-splatting clamp (gsplat uses 0.999)

# glTF files are +Y up, and so are OBJ files by convention. Blender (hence TRELLIS renders and the official
# depth maps) imports both as +Z up: (x, y, z) -> (x, -z, y). We do the same so our world is Blender's.
Y_UP_TO_Z_UP = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64)


class AssetError(ValueError):
    """A 3D file that cannot be used; the message names the file and the reason."""


# -----------------------------------------------------------------------------
# meshes


@dataclass
class Material:
    color: torch.Tensor                 # [4] RGBA base colour factor in [0, 1] (alpha is ignored: opaque)
    texture: torch.Tensor = None        # [h, w, 3] float32 in [0, 1], sampled bilinearly with repeat wrap


@dataclass
class Mesh:
    """A triangle soup with colour sources. Colour = material colour * texture(uv) * vertex colour."""
    vertices: torch.Tensor              # [V, 3] float32, world (Z up)
    faces: torch.Tensor                 # [F, 3] int64
    uv: torch.Tensor                    # [F, 3, 2] float32 per face corner, glTF convention (origin top-left)
    face_material: torch.Tensor         # [F] int64 index into materials
    materials: list                     # [Material]
    vertex_colors: torch.Tensor = None  # [V, 3] float32 in [0, 1], or None


def make_mesh(vertices, faces, uv, face_material, materials, vertex_colors=None):
    """numpy -> Mesh with the dtypes above."""
    return Mesh(torch.as_tensor(np.asarray(vertices, np.float32)),
                torch.as_tensor(np.asarray(faces, np.int64)),
                torch.as_tensor(np.asarray(uv, np.float32)),
                torch.as_tensor(np.asarray(face_material, np.int64)), materials,
                None if vertex_colors is None else torch.as_tensor(np.asarray(vertex_colors, np.float32)))


def normalize_mesh(mesh):
    """Centre the bounding box at the origin and scale its longest side to 1, into [-0.5, 0.5]^3.
    TRELLIS normalises scenes the same way (scale = 1 / max extent, offset = -bbox centre)."""
    lo, hi = mesh.vertices.amin(0), mesh.vertices.amax(0)
    extent = float((hi - lo).max())
    if not extent > 0:
        raise AssetError('mesh has zero extent')
    return replace(mesh, vertices=(mesh.vertices - (lo + hi) / 2) / extent)


def _texture_from_bytes(data, owner, what):
    """Encoded image bytes -> [h, w, 3] float32 tensor in [0, 1] (alpha dropped), or None with a warning
    when PIL cannot decode it (the material then falls back to its base colour)."""
    try:
        img = Image.open(io.BytesIO(data)).convert('RGB')
    except (OSError, ValueError) as e:      # PIL.UnidentifiedImageError is an OSError
        warnings.warn(f'{owner}: cannot decode texture {what} ({e}); using the base colour')
        return None
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def _read_texture_file(path, owner):
    """Texture file -> tensor, or None with a warning (the material falls back to its base colour)."""
    if not os.path.isfile(path):
        warnings.warn(f'{owner}: texture {path} not found; using the base colour')
        return None
    with open(path, 'rb') as f:
        return _texture_from_bytes(f.read(), owner, path)


def _check_triangles(mesh):
    if mesh.faces.shape[0] == 0:
        raise AssetError('no triangles')
    if not torch.isfinite(mesh.vertices).all():
        raise AssetError('non-finite vertex positions')
    if int(mesh.faces.max()) >= mesh.vertices.shape[0] or int(mesh.faces.min()) < 0:
        raise AssetError('face index out of range')
    if not (mesh.vertices.amax(0) - mesh.vertices.amin(0)).max() > 0:
        raise AssetError('all vertices coincide')


def load_mesh(path, normalize=True):
    """Read a .glb / .gltf / .obj file into a Mesh in our Z-up world, normalised into [-0.5, 0.5]^3.
    Raises AssetError (naming the file) for unsupported or broken input."""
    ext = os.path.splitext(path)[1].lower()
    readers = {'.glb': _load_gltf, '.gltf': _load_gltf, '.obj': _load_obj}
    if ext not in readers:
        raise AssetError(f'{path}: unsupported file type {ext!r} (use .glb, .gltf or .obj)')
    try:
        mesh = readers[ext](path)
        _check_triangles(mesh)
    except AssetError as e:
        raise AssetError(f'{path}: {e}') from e
    except (ValueError, KeyError, IndexError, TypeError, struct.error, OSError, UnicodeDecodeError) as e:
        raise AssetError(f'{path}: cannot parse ({type(e).__name__}: {e})') from e
    mesh.vertices = mesh.vertices @ torch.from_numpy(Y_UP_TO_Z_UP.T).float()   # [V, 3]
    return normalize_mesh(mesh) if normalize else mesh


# -----------------------------------------------------------------------------
# glTF 2.0 / GLB reader (spec: registry.khronos.org/glTF/specs/2.0/glTF-2.0.html)

_GLTF_DTYPES = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_GLTF_NCOMP = {'SCALAR': 1, 'VEC2': 2, 'VEC3': 3, 'VEC4': 4, 'MAT2': 4, 'MAT3': 9, 'MAT4': 16}
_UNSUPPORTED_EXT = ('KHR_draco_mesh_compression', 'EXT_meshopt_compression', 'KHR_meshopt_compression')


def _read_glb(data):
    """GLB container -> (json dict, binary chunk bytes or None)."""
    magic, version, length = struct.unpack_from('<4sII', data, 0)
    if magic != b'glTF' or version != 2:
        raise AssetError(f'not a glTF 2.0 binary (magic {magic!r}, version {version})')
    doc, binary, offset = None, None, 12
    while offset + 8 <= min(length, len(data)):
        chunk_len, chunk_type = struct.unpack_from('<II', data, offset)
        chunk = data[offset + 8: offset + 8 + chunk_len]
        if chunk_type == 0x4E4F534A:        # 'JSON'
            doc = json.loads(chunk.decode('utf-8'))
        elif chunk_type == 0x004E4942:      # 'BIN\0'
            binary = chunk
        offset += 8 + chunk_len
    if doc is None:
        raise AssetError('GLB has no JSON chunk')
    return doc, binary


def _gltf_uri_bytes(uri, base_dir):
    """A buffer/image uri: base64 data uri or a file relative to the .gltf."""
    if uri.startswith('data:'):
        return base64.b64decode(uri.split(',', 1)[1])
    with open(os.path.join(base_dir, unquote(uri)), 'rb') as f:
        return f.read()


def _gltf_accessor(doc, buffers, index):
    """Accessor -> float64 or int array [count, ncomp] (strided views, normalized ints mapped to [0,1]/[-1,1])."""
    acc = doc['accessors'][index]
    if 'sparse' in acc:
        raise AssetError('sparse accessors are not supported')
    dtype, ncomp, count = np.dtype(_GLTF_DTYPES[acc['componentType']]), _GLTF_NCOMP[acc['type']], acc['count']
    if 'bufferView' not in acc:             # spec: no bufferView means all zeros
        return np.zeros((count, ncomp))
    view = doc['bufferViews'][acc['bufferView']]
    buf = buffers[view['buffer']]
    start = view.get('byteOffset', 0) + acc.get('byteOffset', 0)
    stride = view.get('byteStride') or dtype.itemsize * ncomp
    if count and start + stride * (count - 1) + dtype.itemsize * ncomp > len(buf):
        raise AssetError(f'accessor {index} runs past the end of its buffer')
    arr = np.ndarray((count, ncomp), dtype.newbyteorder('<'), buf, start, (stride, dtype.itemsize)).copy()
    if acc.get('normalized', False) and dtype.kind in 'iu':
        info = np.iinfo(dtype)
        return np.maximum(arr / info.max, -1.0)
    return arr if dtype.kind in 'iu' else arr.astype(np.float64)


def _gltf_node_matrix(node):
    """Node local transform [4, 4]: 'matrix' (column-major) or T * R * S."""
    if 'matrix' in node:
        return np.array(node['matrix'], dtype=np.float64).reshape(4, 4).T    # column-major -> [4, 4]
    x, y, z, w = node.get('rotation', [0, 0, 0, 1])
    rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                    [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                    [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
    m = np.eye(4)
    m[:3, :3] = rot * np.array(node.get('scale', [1, 1, 1]))[None, :]
    m[:3, 3] = node.get('translation', [0, 0, 0])
    return m


def _gltf_mesh_instances(doc):
    """(mesh index, world matrix [4, 4]) for every mesh reached from the scene's root nodes."""
    nodes = doc.get('nodes', [])
    if 'scenes' in doc and doc['scenes']:
        roots = doc['scenes'][doc.get('scene', 0)].get('nodes', [])
    else:                                   # no scene: every node that is nobody's child is a root
        children = {c for n in nodes for c in n.get('children', [])}
        roots = [i for i in range(len(nodes)) if i not in children]
    out, stack = [], [(r, np.eye(4), 0) for r in roots]
    while stack:
        i, parent, depth = stack.pop()
        if depth > 64:
            raise AssetError('node hierarchy deeper than 64 (cycle?)')
        world = parent @ _gltf_node_matrix(nodes[i])
        if 'mesh' in nodes[i]:
            out.append((nodes[i]['mesh'], world))
        stack += [(c, world, depth + 1) for c in nodes[i].get('children', [])]
    if not roots and doc.get('meshes'):     # a bare mesh library: place each mesh once at the origin
        out = [(m, np.eye(4)) for m in range(len(doc['meshes']))]
    return out


def _gltf_material(doc, buffers, index, base_dir, path):
    """glTF material -> Material (pbrMetallicRoughness base colour factor and texture) and its uv set."""
    if index is None:
        return Material(torch.ones(4)), 0
    pbr = doc['materials'][index].get('pbrMetallicRoughness', {})
    color = torch.tensor(pbr.get('baseColorFactor', [1, 1, 1, 1]), dtype=torch.float32)
    tex_info = pbr.get('baseColorTexture')
    if tex_info is None:
        return Material(color), 0
    source = doc['textures'][tex_info['index']].get('source')
    if source is None:                      # e.g. only an extension image (webp / ktx2)
        warnings.warn(f'{path}: texture {tex_info["index"]} has no PNG/JPEG source; using the base colour')
        return Material(color), 0
    image = doc['images'][source]
    if 'bufferView' in image:
        view = doc['bufferViews'][image['bufferView']]
        off = view.get('byteOffset', 0)
        texture = _texture_from_bytes(bytes(buffers[view['buffer']][off: off + view['byteLength']]), path,
                                      f'image {source}')
    elif image['uri'].startswith('data:'):
        texture = _texture_from_bytes(_gltf_uri_bytes(image['uri'], base_dir), path, f'image {source}')
    else:
        texture = _read_texture_file(os.path.join(base_dir, unquote(image['uri'])), path)
    return Material(color, texture), tex_info.get('texCoord', 0)


def _load_gltf(path):
    """.gltf (external or base64 buffers) or .glb (binary chunk) -> Mesh, file axes (Y up), not normalised."""
    with open(path, 'rb') as f:
        data = f.read()
    base_dir = os.path.dirname(os.path.abspath(path))
    doc, binary = _read_glb(data) if data[:4] == b'glTF' else (json.loads(data.decode('utf-8')), None)
    bad = [e for e in doc.get('extensionsRequired', []) if e in _UNSUPPORTED_EXT]
    if bad:
        raise AssetError(f'compressed geometry ({", ".join(bad)}) is not supported')
    buffers = [binary if 'uri' not in b else _gltf_uri_bytes(b['uri'], base_dir) for b in doc.get('buffers', [])]
    if any(b is None for b in buffers):
        raise AssetError('buffer without uri but no GLB binary chunk')
    materials, mat_index, uv_sets = [], {}, {}
    verts, faces, uvs, face_mat, colors, n_vert, any_color = [], [], [], [], [], 0, False
    for mesh_index, world in _gltf_mesh_instances(doc):
        for prim in doc['meshes'][mesh_index]['primitives']:
            if prim.get('mode', 4) != 4 or 'POSITION' not in prim['attributes']:
                continue                    # points, lines, strips: not triangles, skipped
            m = prim.get('material')
            if m not in mat_index:
                mat_index[m] = len(materials)
                material, uv_sets[m] = _gltf_material(doc, buffers, m, base_dir, path)
                materials.append(material)
            attrs = prim['attributes']
            pos = _gltf_accessor(doc, buffers, attrs['POSITION'])[:, :3]
            pos = pos @ world[:3, :3].T + world[:3, 3]                       # [v, 3] world
            idx = (_gltf_accessor(doc, buffers, prim['indices'])[:, 0].astype(np.int64) if 'indices' in prim
                   else np.arange(len(pos)))
            tri = idx[: len(idx) // 3 * 3].reshape(-1, 3)                   # [f, 3]
            uv_key = f'TEXCOORD_{uv_sets[m]}'
            uv = _gltf_accessor(doc, buffers, attrs[uv_key])[:, :2] if uv_key in attrs else np.zeros((len(pos), 2))
            col = _gltf_accessor(doc, buffers, attrs['COLOR_0'])[:, :3] if 'COLOR_0' in attrs else None
            any_color |= col is not None
            verts.append(pos)
            faces.append(tri + n_vert)
            uvs.append(uv[tri])                                             # [f, 3, 2] per corner
            face_mat.append(np.full(len(tri), mat_index[m]))
            colors.append(col if col is not None else np.ones((len(pos), 3)))
            n_vert += len(pos)
    if not faces:
        raise AssetError('no triangle primitives')
    return make_mesh(np.concatenate(verts), np.concatenate(faces), np.concatenate(uvs),
                      np.concatenate(face_mat), materials, np.concatenate(colors) if any_color else None)


# -----------------------------------------------------------------------------
# OBJ + MTL reader (v, vt, f, usemtl, mtllib; Kd and map_Kd)


def _load_mtl(path, owner):
    """MTL file -> {name: Material}. map_Kd replaces Kd (as Blender's importer shows it); missing files warn."""
    out, name = {}, None
    base_dir = os.path.dirname(path)
    with open(path, 'r', encoding='utf-8', errors='replace') as f:
        for line in f:
            tok = line.split()
            if not tok or tok[0].startswith('#'):
                continue
            if tok[0] == 'newmtl':
                name = ' '.join(tok[1:])
                out[name] = Material(torch.tensor([0.8, 0.8, 0.8, 1.0]))    # Blender's default grey
            elif name is not None and tok[0] == 'Kd' and len(tok) >= 4:
                out[name].color = torch.tensor([float(v) for v in tok[1:4]] + [1.0])
            elif name is not None and tok[0] == 'map_Kd' and len(tok) >= 2:
                # options (-s 1 1 1, -o ..., -bm ...) come first: the file name is the last token
                tex_path = os.path.join(base_dir, tok[-1].replace('\\', '/'))
                out[name].texture = _read_texture_file(tex_path, owner)
    for mat in out.values():                # a texture stands alone; Kd stays the colour without one
        if mat.texture is not None:
            mat.color = torch.ones(4)
    return out


def _obj_index(token, count):
    """OBJ index (1-based, negative = relative to the end so far) -> 0-based, or -1 when empty."""
    if token == '':
        return -1
    i = int(token)
    return i - 1 if i > 0 else count + i


def _load_obj(path):
    """OBJ -> Mesh, file axes (Y up), not normalised. Polygons are fan-triangulated; 'v x y z r g b' colours
    are read (0-255 values are rescaled). OBJ uvs have v up: flipped to the glTF convention (v down)."""
    verts, vcols, texcoords, faces, uv_idx, face_mat = [], [], [], [], [], []
    materials, mat_index, library, current = [], {}, {}, None
    base_dir = os.path.dirname(path)
    with open(path, 'r', encoding='utf-8', errors='replace') as f:
        for line in f:
            tok = line.split()
            if not tok or tok[0].startswith('#'):
                continue
            if tok[0] == 'v':
                verts.append([float(v) for v in tok[1:4]])
                vcols.append([float(v) for v in tok[4:7]] if len(tok) >= 7 else [1.0, 1.0, 1.0])
            elif tok[0] == 'vt':
                texcoords.append([float(tok[1]), 1.0 - float(tok[2]) if len(tok) > 2 else 1.0])
            elif tok[0] == 'mtllib':
                mtl = os.path.join(base_dir, ' '.join(tok[1:]).replace('\\', '/'))
                if os.path.isfile(mtl):
                    library.update(_load_mtl(mtl, path))
                else:
                    warnings.warn(f'{path}: material library {mtl} not found; using grey')
            elif tok[0] == 'usemtl':
                current = ' '.join(tok[1:])
            elif tok[0] == 'f':
                corners = [(c.split('/') + ['', ''])[:2] for c in tok[1:]]
                vi = [_obj_index(c[0], len(verts)) for c in corners]
                ti = [_obj_index(c[1], len(texcoords)) for c in corners]
                if current not in mat_index:
                    mat_index[current] = len(materials)
                    materials.append(library.get(current, Material(torch.tensor([0.8, 0.8, 0.8, 1.0]))))
                for k in range(1, len(vi) - 1):                             # fan: (0, k, k+1)
                    faces.append([vi[0], vi[k], vi[k + 1]])
                    uv_idx.append([ti[0], ti[k], ti[k + 1]])
                    face_mat.append(mat_index[current])
    if not faces:
        raise AssetError('no faces')
    faces, uv_idx = np.array(faces, np.int64), np.array(uv_idx, np.int64)
    if (faces < 0).any() or (faces >= len(verts)).any() or (uv_idx >= len(texcoords)).any():
        raise AssetError('face index out of range')
    table = np.concatenate([np.array(texcoords, np.float64).reshape(-1, 2), np.zeros((1, 2))])  # row -1: none
    vcols = np.array(vcols, np.float64)
    has_color = bool((vcols != 1.0).any())
    if has_color and vcols.max() > 1.0:
        vcols = vcols / 255.0
    return make_mesh(np.array(verts), faces, table[uv_idx], face_mat, materials, vcols if has_color else None)


# -----------------------------------------------------------------------------
# procedural meshes (built-in 3D data: a textured primitive with a class name and a caption)

PRIMITIVES = ('cube', 'sphere', 'cylinder', 'cone', 'torus')
PATTERNS = ('striped', 'checkered', 'plain')
# The 3D primitives' palette. Not data.COLOURS (the 2D scenes'): the same eight words with other RGB values and
# another draw order, and the built-in 3D data depends on both.
PRIMITIVE_COLOURS = {'red': (0.86, 0.12, 0.12), 'green': (0.15, 0.7, 0.2), 'blue': (0.15, 0.3, 0.9),
                     'yellow': (0.95, 0.85, 0.15), 'orange': (0.95, 0.5, 0.1), 'purple': (0.55, 0.2, 0.75),
                     'cyan': (0.1, 0.8, 0.85), 'white': (0.95, 0.95, 0.95)}


def _grid_mesh(fn, nu, nv):
    """Parametric surface fn(u, v) -> xyz on an (nu+1) x (nv+1) grid over [0,1]^2; uv = (u, v) per corner.
    Zero-area triangles (poles, apexes) are dropped."""
    u, v = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing='xy')  # [nv+1, nu+1]
    verts = np.stack(fn(u.ravel(), v.ravel()), -1)                  # [(nv+1)(nu+1), 3]
    i = np.arange(nv)[:, None] * (nu + 1) + np.arange(nu)[None, :]   # [nv, nu] quad corner indices
    quads = np.stack([i, i + 1, i + nu + 2, i + nu + 1], -1).reshape(-1, 4)   # [nv*nu, 4]
    faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])        # [2*nv*nu, 3]
    tri = verts[faces]                                               # [F, 3, 3]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)
    faces = faces[area > 1e-9]
    uv = np.stack([u.ravel(), v.ravel()], -1)[faces]                 # [F, 3, 2]
    return verts, faces, uv


def _disc(z, radius, n, flip):
    """A fan-triangulated disc at height z with planar uvs (cap of a cylinder or cone)."""
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.stack([radius * np.cos(a), radius * np.sin(a), np.full(n, z)], -1)
    verts = np.concatenate([[[0, 0, z]], ring])                       # [n+1, 3]
    faces = np.stack([np.zeros(n, int), 1 + np.arange(n), 1 + (np.arange(n) + 1) % n], -1)
    faces = faces[:, [0, 2, 1]] if flip else faces
    uv = 0.5 + 0.5 * verts[:, :2] / radius
    return verts, faces, uv[faces]


def _merge(*parts):
    verts, faces, uvs, n = [], [], [], 0
    for v, f, uv in parts:
        verts.append(v)
        faces.append(f + n)
        uvs.append(uv)
        n += len(v)
    return np.concatenate(verts), np.concatenate(faces), np.concatenate(uvs)


def primitive(shape, n=32):
    """Geometry of a unit primitive centred at the origin -> (verts [V,3], faces [F,3], uv [F,3,2])."""
    tau = 2 * np.pi
    if shape == 'cube':
        corners = np.array([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)])
        quads = np.array([[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]])
        faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])           # [12, 3]
        quad_uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
        uv = np.concatenate([np.broadcast_to(quad_uv[[0, 1, 2]], (6, 3, 2)),
                             np.broadcast_to(quad_uv[[0, 2, 3]], (6, 3, 2))])      # [12, 3, 2]
        return corners, faces, uv
    if shape == 'sphere':
        return _grid_mesh(lambda u, v: (np.cos(tau * u) * np.sin(np.pi * v), np.sin(tau * u) * np.sin(np.pi * v),
                                        np.cos(np.pi * v)), n, n // 2)
    if shape == 'cylinder':
        side = _grid_mesh(lambda u, v: (np.cos(tau * u), np.sin(tau * u), v - 0.5), n, 1)
        return _merge(side, _disc(-0.5, 1.0, n, True), _disc(0.5, 1.0, n, False))
    if shape == 'cone':
        side = _grid_mesh(lambda u, v: ((1 - v) * np.cos(tau * u), (1 - v) * np.sin(tau * u), v - 0.5), n, 4)
        return _merge(side, _disc(-0.5, 1.0, n, True))
    if shape == 'torus':                                              # tube radius 0.4 around a unit ring
        def torus(u, v):
            ring = 1 + 0.4 * np.cos(tau * v)
            return ring * np.cos(tau * u), ring * np.sin(tau * u), 0.4 * np.sin(tau * v)
        return _grid_mesh(torus, n, n // 2)
    raise ValueError(f'unknown shape {shape!r}; choose from {PRIMITIVES}')


def _pattern_texture(pattern, c1, c2, k, size=64):
    """Stripes along u or a k x k checkerboard, two colours -> [size, size, 3] tensor."""
    t = (np.arange(size) + 0.5) / size
    cell_u = np.floor(t[None, :] * k).astype(int)                     # [1, size] (columns = u)
    cell_v = np.floor(t[:, None] * k).astype(int)                     # [size, 1] (rows = v)
    mask = (cell_u % 2 == 0) if pattern == 'striped' else ((cell_u + cell_v) % 2 == 0)
    mask = np.broadcast_to(mask, (size, size))
    img = np.where(mask[..., None], np.array(c1), np.array(c2))       # [size, size, 3]
    return torch.from_numpy(img.astype(np.float32))


def procedural_mesh(seed):
    """A random textured primitive (cube / sphere / cylinder / cone / torus), randomly stretched and rotated,
    normalised into [-0.5, 0.5]^3 (Z up). Returns (mesh, class name, caption), e.g. 'a red striped cube'.
    Striped / checkered objects use an image texture; plain ones use vertex colours."""
    rng = np.random.default_rng(seed)
    shape, pattern = PRIMITIVES[rng.integers(len(PRIMITIVES))], PATTERNS[rng.integers(len(PATTERNS))]
    name = list(PRIMITIVE_COLOURS)[rng.integers(len(PRIMITIVE_COLOURS))]
    c1 = PRIMITIVE_COLOURS[name]
    c2 = (0.08, 0.08, 0.08) if name == 'white' else (0.95, 0.95, 0.95)
    verts, faces, uv = primitive(shape)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))                      # random rotation (Haar via QR)
    q = q * np.sign(np.diag(r))[None, :]
    q = q if np.linalg.det(q) > 0 else -q
    verts = (verts * rng.uniform(0.6, 1.0, size=3)) @ q.T
    cells = int(rng.integers(2, 5)) * 2                               # even: seamless where u wraps
    texture = None if pattern == 'plain' else _pattern_texture(pattern, c1, c2, cells)
    vcol = np.broadcast_to(np.array(c1), verts.shape) if pattern == 'plain' else None
    material = Material(torch.ones(4), texture)
    mesh = make_mesh(verts, faces, uv, np.zeros(len(faces)), [material], vcol)
    article = 'an' if name[0] in 'aeiou' else 'a'
    caption = f'{article} {name} {shape}' if pattern == 'plain' else f'{article} {name} {pattern} {shape}'
    return normalize_mesh(mesh), shape, caption


# -----------------------------------------------------------------------------
# cameras
#
# Our API uses OpenCV camera axes: x right, y down, z forward (into the scene). w2c maps world points to
# camera space; a point is in front of the camera when its camera z > 0. Intrinsics are normalised as in the
# official code (utils3d): pixel coordinates in [0, 1], u = fx * x / z + cx, v = fy * y / z + cy, with
# fx = 0.5 / tan(fov_x / 2) and cx = cy = 0.5. In pixels (Camera.K): multiply by width (x) and height (y);
# pixel (row i, col j) has its centre at (j + 0.5, i + 0.5). The world is Z up (Blender, TRELLIS).


@dataclass
class Camera:
    w2c: torch.Tensor           # [4, 4] float32 world -> camera (OpenCV)
    fx: float                   # normalised focal lengths and principal point (pixel coords in [0, 1])
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    near: float = 0.1           # splats with camera z <= near are culled; triangles touching it are dropped
    far: float = 100.0          # splats beyond far are culled (the official 3DGS rasteriser ignores its far)

    @property
    def K(self):
        """[3, 3] float32 intrinsics in pixels."""
        return torch.tensor([[self.fx * self.width, 0, self.cx * self.width],
                             [0, self.fy * self.height, self.cy * self.height], [0, 0, 1]], dtype=torch.float32)

    @property
    def c2w(self):
        return torch.linalg.inv(self.w2c.double()).float()

    def to_dict(self):
        return dict(w2c=self.w2c.tolist(), fx=self.fx, fy=self.fy, cx=self.cx, cy=self.cy,
                    width=self.width, height=self.height, near=self.near, far=self.far)

    @staticmethod
    def from_dict(d):
        return Camera(torch.tensor(d['w2c'], dtype=torch.float32), d['fx'], d['fy'], d['cx'], d['cy'],
                      d['width'], d['height'], d.get('near', 0.1), d.get('far', 100.0))


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0), fov_deg=40.0, width=512, height=512):
    """Camera at `eye` looking at `target`; image up is as close to `up` as possible (image y points away
    from it). When looking along `up`, +y is used instead (the view would otherwise be undefined)."""
    eye, target, up = (np.asarray(a, np.float64) for a in (eye, target, up))
    z = (target - eye) / np.linalg.norm(target - eye)                 # forward
    x = np.cross(z, up)                                               # right = forward x up
    if np.linalg.norm(x) < 1e-6:
        x = np.cross(z, [0.0, 1.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)                                                # down
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([x, y, z])                                 # rows: camera axes in world
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    f = 0.5 / math.tan(math.radians(fov_deg) / 2)
    return Camera(torch.tensor(w2c, dtype=torch.float32), f, f * width / height, 0.5, 0.5, width, height)


def sphere_hammersley(i, n, offset=(0.0, 0.0)):
    """TRELLIS dataset_toolkits view sampling -> (yaw, pitch) in radians: Hammersley point (i/n, radinv_2(i))
    shifted by `offset`, remapped to favour the equator (u -> 2u below 1/4, else 2u/3 + 1/3), then
    pitch = acos(1 - 2u) - pi/2 and yaw = 2 pi v."""
    u = i / n + offset[0] / n
    v = model.radical_inverse(2, i) + offset[1]
    u = 2 * u if u < 0.25 else 2 / 3 * u + 1 / 3
    return 2 * math.pi * v, math.acos(max(-1.0, min(1.0, 1 - 2 * u))) - math.pi / 2


def sphere_cameras(n, radius=2.0, fov_deg=40.0, offset=(0.0, 0.0), resolution=512):
    """n cameras on a sphere looking at the origin, as TRELLIS renders its training views (Blender, Z up):
    position = radius * (cos yaw cos pitch, sin yaw cos pitch, sin pitch), up = +z, FoV 40 deg, radius 2.
    TRELLIS draws `offset` uniformly in [0,1)^2 per object; pass your own for reproducibility."""
    cams = []
    for i in range(n):
        yaw, pitch = sphere_hammersley(i, n, offset)
        eye = radius * np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
        cams.append(look_at(eye, fov_deg=fov_deg, width=resolution, height=resolution))
    return cams


def turntable_cameras(n, elevation_deg=20.0, radius=2.0, fov_deg=40.0, resolution=512):
    """n cameras on a circle around the z axis (Z up, as sphere_cameras), elevation_deg above the equator,
    azimuths 0, 360/n, ... degrees, looking at the origin: the frames of a turntable video."""
    pitch = math.radians(elevation_deg)
    return [look_at(radius * np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch),
                                       math.sin(pitch)]), fov_deg=fov_deg, width=resolution, height=resolution)
            for yaw in (2 * math.pi * i / n for i in range(n))]


def camera_from_nerf(transform_matrix, camera_angle_x, width, height):
    """A Blender/NeRF transforms.json frame (c2w with OpenGL axes: x right, y up, z backward) -> Camera, as the
    official packing does: negate c2w columns 1 and 2 (-> OpenCV), then w2c = inverse(c2w).
    fx = 0.5 / tan(camera_angle_x / 2); fy = fx * width / height (square pixels; equal for square views)."""
    c2w = np.array(transform_matrix, dtype=np.float64).reshape(4, 4).copy()
    c2w[:3, 1:3] *= -1
    w2c = np.linalg.inv(c2w)
    f = 0.5 / math.tan(camera_angle_x / 2)
    return Camera(torch.tensor(w2c, dtype=torch.float32), f, f * width / height, 0.5, 0.5, width, height)


# -----------------------------------------------------------------------------
# pixel pairs: the vectorised core shared by both rasterisers
#
# Every primitive (triangle or splat) gets the rows its pixel box covers; on each row an exact span [x0, x1]
# of the pixel centres (i + 0.5) inside it (a triangle's three half-planes, or a splat's ellipse). Expanding
# rows then spans gives (primitive, pixel) pairs that are evaluated all at once, with almost no wasted pairs
# for thin or slanted primitives. Rows are cut into bands of about PAIR_BUDGET pairs so memory stays
# bounded; bands share no pixel, so each band is an independent image.


def _pixel_box(lo_x, hi_x, lo_y, hi_y, width, height):
    """Continuous extents (pixel units) -> inclusive int boxes of the pixels whose centres (i + 0.5) lie inside."""
    x0 = torch.ceil(lo_x - 0.5).clamp(0, width).long()
    x1 = torch.floor(hi_x - 0.5).clamp(-1, width - 1).long()
    y0 = torch.ceil(lo_y - 0.5).clamp(0, height).long()
    y1 = torch.floor(hi_y - 0.5).clamp(-1, height - 1).long()
    return x0, x1, y0, y1


def _bands(x0, x1, y0, y1, width, height):
    """Row bands [(r0, r1)] holding about PAIR_BUDGET box pairs and at most 65536 pixels each."""
    total = int(((x1 - x0 + 1).clamp(min=0) * (y1 - y0 + 1).clamp(min=0)).sum())
    rows = max(1, min(math.ceil(height / max(1, math.ceil(total / PAIR_BUDGET))), 65536 // width))
    return [(r, min(r + rows, height)) for r in range(0, height, rows)]


def _expand(n):
    """Counts [M] -> (owner [sum n], offset within owner [sum n]): a vectorised nested loop."""
    owner = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)
    return owner, torch.arange(owner.numel(), device=n.device) - (n.cumsum(0) - n)[owner]


def _span_pairs(y0, y1, spans):
    """Scanline expansion: rows y0..y1 of each primitive, then the pixels of each (primitive, row) between the
    inclusive bounds spans(prim, py) -> (x0, x1). Returns prim [E], px [E], py [E] int64, primitive-major."""
    prim, dy = _expand((y1 - y0 + 1).clamp(min=0))                   # (primitive, row) pairs
    py = y0[prim] + dy
    x0, x1 = spans(prim, py)
    row, dx = _expand((x1 - x0 + 1).clamp(min=0))                    # (primitive, pixel) pairs
    return prim[row], x0[row] + dx, py[row]


# -----------------------------------------------------------------------------
# triangle rasteriser (unlit: colour = material colour * texture * vertex colour)


def _project_points(points, camera, width, height):
    """World points [P, 3] -> pixel coords [P, 2] (continuous, centres at i + 0.5) and camera z [P]."""
    w2c = camera.w2c.to(points)
    pc = points @ w2c[:3, :3].T + w2c[:3, 3]                          # [P, 3] camera space
    z = pc[:, 2]
    xy = pc[:, :2] / z.clamp(min=1e-9)[:, None]
    px = torch.stack([camera.fx * width * xy[:, 0] + camera.cx * width,
                      camera.fy * height * xy[:, 1] + camera.cy * height], -1)
    return px, z


def _triangle_setup(mesh, camera, width, height):
    """Per face: pixel boxes and the linear forms giving screen barycentrics b1, b2 at a pixel centre."""
    px, z = _project_points(mesh.vertices, camera, width, height)
    tri, tz = px[mesh.faces], z[mesh.faces]                          # [F, 3, 2], [F, 3]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]                  # twice the signed area
    ok = (tz > camera.near).all(1) & (area.abs() > 1e-10)             # no near clipping: drop such faces
    inv = torch.where(ok, 1.0 / torch.where(ok, area, 1.0), 0.0)
    g1 = torch.stack([e2[:, 1], -e2[:, 0]], -1) * inv[:, None]       # b1 = (p - v0) . g1
    g2 = torch.stack([-e1[:, 1], e1[:, 0]], -1) * inv[:, None]       # b2 = (p - v0) . g2
    lo, hi = tri.amin(1), tri.amax(1)
    x0, x1, y0, y1 = _pixel_box(lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1], width, height)
    x1 = torch.where(ok, x1, x0 - 1)                                  # empty box
    return dict(v0=tri[:, 0], g1=g1, g2=g2, inv_z=1.0 / tz.clamp(min=1e-9), box=(x0, x1, y0, y1))


def _triangle_spans(s, face, py):
    """x-range of pixel centres inside triangle `face` [R] on row py [R] -> inclusive x0, x1 [R].
    On a row each barycentric b_k = a_k x + c_k is linear in x, and b_k >= 0 bounds x from one side."""
    yc = py.to(s['v0']) + 0.5 - s['v0'][face, 1]
    g1, g2 = s['g1'][face], s['g2'][face]                             # [R, 2]
    a = torch.stack([-(g1[:, 0] + g2[:, 0]), g1[:, 0], g2[:, 0]], -1)  # [R, 3]
    c = torch.stack([1 - (g1[:, 1] + g2[:, 1]) * yc, g1[:, 1] * yc, g2[:, 1] * yc], -1)
    bound = -c / torch.where(a == 0, 1.0, a) + s['v0'][face, 0:1]
    lo = torch.where(a > 0, bound, -math.inf).amax(-1)
    hi = torch.where(a < 0, bound, math.inf).amin(-1)
    hi = torch.where(((a == 0) & (c < 0)).any(-1), -math.inf, hi)     # an edge parallel to the row, row outside
    x0, x1, _, _ = s['box']                                           # clamp: no inf -> int casts
    return (torch.maximum(torch.ceil(lo.clamp(-2, 1e9) - 0.5).long(), x0[face]),
            torch.minimum(torch.floor(hi.clamp(-2, 1e9) - 0.5).long(), x1[face]))


def _raster_band(s, r0, r1, width):
    """z-buffer one band of rows -> (pixel index in band, face, perspective-correct barycentrics [k, 3],
    depth) for the nearest triangle of every covered pixel (ties: highest face index)."""
    _, _, y0, y1 = s['box']
    face, px, py = _span_pairs(y0.clamp(min=r0), y1.clamp(max=r1 - 1), lambda f, y: _triangle_spans(s, f, y))
    d = torch.stack([px, py], -1).to(s['v0']) + 0.5 - s['v0'][face]   # [E, 2] pixel centre - v0
    b1, b2 = (d * s['g1'][face]).sum(-1), (d * s['g2'][face]).sum(-1)
    b = torch.stack([1 - b1 - b2, b1, b2], -1).clamp(min=0)           # [E, 3] screen-space barycentrics
    w = b * s['inv_z'][face]                                          # perspective correction
    depth = 1.0 / w.sum(-1)
    pix = (py - r0) * width + px
    n = (r1 - r0) * width
    zbuf = torch.full((n,), math.inf, device=depth.device).scatter_reduce(0, pix, depth, 'amin')
    near = depth == zbuf[pix]
    fbuf = torch.full((n,), -1, device=pix.device).scatter_reduce(0, pix[near], face[near], 'amax')
    win = near & (face == fbuf[pix])
    return pix[win], face[win], w[win] * depth[win, None], depth[win]


def sample_texture(tex, uv):
    """Bilinear lookup with repeat wrap. tex [h, w, C], uv [K, 2] (glTF: u right, v down; texel centres at
    (i + 0.5) / size) -> [K, C]."""
    h, w = tex.shape[:2]
    x, y = uv[:, 0] * w - 0.5, uv[:, 1] * h - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    flat = tex.reshape(h * w, -1)                                     # [h*w, C]

    def at(yy, xx):
        return flat[(yy % h) * w + (xx % w)]
    return ((at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx) * (1 - fy)
            + (at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx) * fy)


def _shade(mesh, face, bary):
    """Colour [K, 3] of surface points given by face [K] and perspective-correct barycentrics [K, 3]."""
    uv = (mesh.uv[face] * bary[..., None]).sum(1)                      # [K, 2]
    rgb = torch.ones(len(face), 3, device=bary.device)
    mat = mesh.face_material[face]
    for m, material in enumerate(mesh.materials):
        sel = mat == m
        if not sel.any():
            continue
        col = material.color[:3].to(rgb).expand(int(sel.sum()), 3)
        if material.texture is not None:
            col = col * sample_texture(material.texture.to(rgb), uv[sel])
        rgb[sel] = col
    if mesh.vertex_colors is not None:
        vc = mesh.vertex_colors[mesh.faces[face]]                     # [K, 3 corners, 3]
        rgb = rgb * (vc * bary[..., None]).sum(1)
    return rgb.clamp(0, 1)


def render_mesh(mesh, camera, resolution=None):
    """Rasterise a mesh (no lighting, no back-face culling, one sample per pixel centre) on the mesh's device.
    resolution overrides the camera's size (intrinsics are normalised). Returns rgb [H, W, 3] in [0, 1]
    (black background), alpha [H, W] in {0, 1}, depth [H, W] = camera-space z, +inf where empty."""
    if resolution is not None:
        camera = replace(camera, width=resolution, height=resolution)
    W, H = camera.width, camera.height
    dev = mesh.vertices.device
    s = _triangle_setup(mesh, camera, W, H)
    pix, face, bary, depth = [], [], [], []
    for r0, r1 in _bands(*s['box'], W, H):
        p, f, b, d = _raster_band(s, r0, r1, W)
        pix.append(p + r0 * W)
        face.append(f)
        bary.append(b)
        depth.append(d)
    pix, face, bary, depth = (torch.cat(t) for t in (pix, face, bary, depth))
    rgb = torch.zeros(H * W, 3, device=dev)
    rgb[pix] = _shade(mesh, face, bary)
    alpha = torch.zeros(H * W, device=dev)
    alpha[pix] = 1.0
    zmap = torch.full((H * W,), float('inf'), device=dev)
    zmap[pix] = depth
    return rgb.view(H, W, 3), alpha.view(H, W), zmap.view(H, W)      # [H*W, .] -> [H, W, .]


# -----------------------------------------------------------------------------
# multiview voxel packing (official atoken_inference/scripts/pack_multiview_feat.py)


def voxelize(depths, cameras, resolution=GRID, max_points=500_000, generator=None):
    """Depth maps [V, H, W] (camera z; inf, nan or <= 0 = empty) -> occupied voxels [N, 3] int64 (i, j, k),
    ascending raster order. As the official code: pixel (row i, col j) unprojects at its top-left corner
    (u, v) = (j / W, i / H) (not the centre), at most max_points random surface points are kept, and voxel
    (i, j, k) with centre -0.5 + (idx + 0.5) / res is occupied when a point lies within 1/(2 res) of it (L-inf)."""
    points = []
    for depth, cam in zip(depths, cameras):
        H, W = depth.shape
        valid = torch.isfinite(depth) & (depth > 0)
        i, j = valid.nonzero(as_tuple=True)
        d = depth[i, j].float()
        x = (j.float() / W - cam.cx) / cam.fx * d
        y = (i.float() / H - cam.cy) / cam.fy * d
        pc = torch.stack([x, y, d], -1)                              # [P, 3] camera space
        c2w = cam.c2w.to(pc)
        points.append(pc @ c2w[:3, :3].T + c2w[:3, 3])               # [P, 3] world
    pts = torch.cat(points)
    if len(pts) > max_points:
        pts = pts[torch.randperm(len(pts), generator=generator)[:max_points]]
    idx = torch.floor((pts + 0.5) * resolution).long()               # [P, 3]
    idx = idx[((idx >= 0) & (idx < resolution)).all(1)]
    lin = torch.unique((idx[:, 0] * resolution + idx[:, 1]) * resolution + idx[:, 2])   # sorted
    return torch.stack([lin // resolution ** 2, lin // resolution % resolution, lin % resolution], -1)


def view_features(images, patch=(16, 16)):
    """Views [V, H, W, 3] uint8 (composited on black) -> patch feature maps [V, ph*pw*3, 16, 16] in [0, 1].
    Official: each view is resized with PIL LANCZOS to 256 x 256 and cut into a 16 x 16 grid of 16 x 16
    patches, channels ordered (p_row, p_col, c) as an image token's pt = 0 slot. For a patch (ph, pw) the
    view is resized to (16 ph) x (16 pw) so the grid stays 16 x 16 cells; (16, 16) is exactly official."""
    ph, pw = patch
    g = FEAT_GRID
    imgs = [np.asarray(Image.fromarray(np.asarray(im)).resize((g * pw, g * ph), Image.LANCZOS)) for im in images]
    x = torch.from_numpy(np.stack(imgs)).float() / 255.0              # [V, g*ph, g*pw, 3]
    V = x.shape[0]
    x = x.view(V, g, ph, g, pw, 3).permute(0, 2, 4, 5, 1, 3)         # [V, ph, pw, 3, g(rows), g(cols)]
    return x.reshape(V, ph * pw * 3, g, g)                           # [V, C, 16, 16]


def voxel_features(coords, feat_maps, cameras, resolution=GRID):
    """Feature of every voxel [N, C]: its centre is projected into all views, the view with the smallest
    camera z wins (no visibility test, as official) and its map is sampled with grid_sample(nearest,
    align_corners=True, zeros) at uv * 2 - 1. Quirk kept: that picks cell round(u * 15), not floor(u * 16)."""
    centres = -0.5 + (coords.float() + 0.5) / resolution              # [N, 3]
    uv, z = [], []
    for cam in cameras:
        w2c = cam.w2c.to(centres)
        pc = centres @ w2c[:3, :3].T + w2c[:3, 3]                     # [N, 3]
        uv.append(torch.stack([cam.fx * pc[:, 0] / pc[:, 2] + cam.cx, cam.fy * pc[:, 1] / pc[:, 2] + cam.cy], -1))
        z.append(pc[:, 2])
    uv, best = torch.stack(uv), torch.stack(z).argmin(0)              # [V, N, 2], [N]
    feats = torch.zeros(len(coords), feat_maps.shape[1])
    for v in best.unique().tolist():
        sel = (best == v).nonzero(as_tuple=True)[0]
        grid = (uv[v, sel] * 2 - 1).view(1, 1, -1, 2)                # [1, 1, n, 2] (x = u, y = v)
        out = F.grid_sample(feat_maps[v:v + 1], grid, mode='nearest', padding_mode='zeros', align_corners=True)
        feats[sel] = out[0, :, 0].T                                   # [C, n] -> [n, C]
    return feats


def model_input(feats, coords):
    """Packed voxels (feats [N, ph*pw*3] in [0, 1], coords [N, 3]) -> the 3D asset that model.pack takes:
    {'feats': in [-1, 1], 'coords'} (model.voxel_tokens then pads it into the pt = 0 slot, coords (0, i, j, k))."""
    return {'feats': feats.float() * 2 - 1, 'coords': coords.long()}


def pack_asset(mesh, n_views=16, resolution=256, patch_size=(4, 16, 16), offset=(0.0, 0.0),
               max_points=500_000, seed=0, grid=GRID):
    """Mesh -> everything the 3D tasks need: rgba [V, H, W, 4] uint8 (what the PNGs hold), depth [V, H, W]
    float32 (float16-rounded as stored, inf = empty), cameras, coords [N, 3] int64, feats [N, ph*pw*3] in [0, 1].
    Views come from sphere_cameras(n_views, offset); voxels (grid^3, official 64) from the depth maps, as the
    official packing."""
    cams = sphere_cameras(n_views, offset=offset, resolution=resolution)
    rgba, depth = [], []
    for cam in cams:
        rgb, alpha, z = render_mesh(mesh, cam)
        rgba.append(torch.cat([rgb * alpha[..., None], alpha[..., None]], -1).mul(255).round().byte().cpu())
        depth.append(z.half().float().cpu())                          # as stored on disk (official: float16)
    rgba, depth = torch.stack(rgba), torch.stack(depth)
    coords = voxelize(depth, cams, resolution=grid, max_points=max_points,
                      generator=torch.Generator().manual_seed(seed))
    feats = voxel_features(coords, view_features(rgba[..., :3].numpy(), patch_size[1:]), cams, resolution=grid)
    return dict(rgba=rgba, depth=depth, cameras=cams, coords=coords, feats=feats)


# -----------------------------------------------------------------------------
# prepare_assets (the `prepare` sub-command): a folder of assets -> per-asset folders (load_prepared reads one)

ASSET_EXTS = ('.glb', '.gltf', '.obj')


def asset_offset(name):
    """A per-asset camera offset in [0,1)^2, fixed by the name (TRELLIS draws it at random per object)."""
    return tuple(np.random.default_rng(zlib.crc32(name.encode())).random(2).tolist())


def write_prepared(out, pack, meta):
    """Write one packed asset: NNN.png (RGBA), depth.npy [V, H, W] float16, cameras.json, voxels.npz
    (coords int16 [N, 3], feats uint8 [N, C]: exact, features are LANCZOS outputs k / 255), meta.json."""
    os.makedirs(out, exist_ok=True)
    for v, img in enumerate(pack['rgba']):
        Image.fromarray(img.numpy(), 'RGBA').save(os.path.join(out, f'{v:03d}.png'))
    np.save(os.path.join(out, 'depth.npy'), pack['depth'].numpy().astype(np.float16))
    with open(os.path.join(out, 'cameras.json'), 'w') as f:
        json.dump([c.to_dict() for c in pack['cameras']], f)
    np.savez(os.path.join(out, 'voxels.npz'), coords=pack['coords'].numpy().astype(np.int16),
             feats=(pack['feats'] * 255).round().numpy().astype(np.uint8))
    with open(os.path.join(out, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)


def prepare_assets(assets_dir, out_dir, views=16, resolution=256, patch_size=(4, 16, 16)):
    """Every .glb/.gltf/.obj under assets_dir -> out_dir/<name>/ (see write_prepared). Broken assets are
    skipped with their reason. 16 views by default (the official packing reads 16; TRELLIS renders 150)."""
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(assets_dir) for f in fs
                   if os.path.splitext(f)[1].lower() in ASSET_EXTS)
    done, skipped, names = [], [], set()
    for path in files:
        rel = os.path.splitext(os.path.relpath(path, assets_dir))[0]
        name = rel.replace(os.sep, '__')
        name = name if name not in names else name + '_' + os.path.splitext(path)[1][1:].lower()
        t0 = time.time()
        try:
            mesh = load_mesh(path)
        except AssetError as e:
            print(f'skip {path}: {e}')
            skipped.append((path, str(e)))
            continue
        names.add(name)
        pack = pack_asset(mesh, views, resolution, patch_size, offset=asset_offset(name))
        meta = dict(source=os.path.abspath(path), caption='a 3D model of ' + os.path.basename(rel).replace('_', ' '),
                    views=views, resolution=resolution, patch=list(patch_size[1:]), voxels=len(pack['coords']),
                    triangles=int(mesh.faces.shape[0]), offset=list(asset_offset(name)))
        write_prepared(os.path.join(out_dir, name), pack, meta)
        done.append(name)
        print(f'{name}: {len(mesh.faces)} triangles, {views} views, {len(pack["coords"])} voxels, '
              f'{time.time() - t0:.1f}s')
    if not done:
        raise AssetError(f'{assets_dir}: no usable assets ({len(files)} files of {"/".join(ASSET_EXTS)}, '
                         f'{len(skipped)} skipped)')
    print(f'prepared {len(done)} assets into {out_dir}, skipped {len(skipped)}')
    return dict(prepared=done, skipped=skipped)


def load_prepared(folder):
    """One prepared asset -> dict: views [V, H, W, 3] float32 in [-1, 1] (composited on black), alphas
    [V, H, W] in [0, 1], depths [V, H, W] float32 (inf = empty), cameras [Camera], coords [N, 3] int64,
    feats [N, C] float32 in [0, 1], meta dict."""
    with open(os.path.join(folder, 'cameras.json')) as f:
        cameras = [Camera.from_dict(d) for d in json.load(f)]
    rgba = torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(folder, f'{v:03d}.png')).convert('RGBA'))
                                      for v in range(len(cameras))])).float() / 255.0   # [V, H, W, 4]
    vox = np.load(os.path.join(folder, 'voxels.npz'))
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    return dict(views=rgba[..., :3] * rgba[..., 3:] * 2 - 1, alphas=rgba[..., 3], cameras=cameras,
                depths=torch.from_numpy(np.load(os.path.join(folder, 'depth.npy')).astype(np.float32)),
                coords=torch.from_numpy(vox['coords'].astype(np.int64)),
                feats=torch.from_numpy(vox['feats'].astype(np.float32) / 255.0), meta=meta)


# -----------------------------------------------------------------------------
# Gaussian splatting: reference rasteriser (pure torch, differentiable, any device)
#
# gaussians = dict(xyz [G, 3] world, scale [G, 3], rotation [G, 4] unit quaternion (w, x, y, z),
#                  opacity [G] or [G, 1] in [0, 1], rgb [G, 3] activated colour).
# Per camera: Sigma = R S S^T R^T; its screen footprint is the EWA projection J W Sigma W^T J^T (W = w2c
# rotation, J = Jacobian of the perspective map at the splat centre, evaluated with the centre clamped to
# 1.3x the half field of view as 3DGS/gsplat do). Mip-splatting's 2D filter adds kernel_size * I (pixels) and
# scales opacity by sqrt(det(cov2d) / det(cov2d + k I)); the official renderer uses k = 0.1. Splats are
# composited front to back by camera z: alpha = min(0.99, opacity * exp(-d^T cov^-1 d / 2)), dropped below
# 1/255, T_i = prod_{j<i} (1 - alpha_j); the background fills the remaining transmittance.
# Not emulated: 3DGS/gsplat stop a pixel once T < 1e-4 (a difference of at most 1e-4 per pixel).


def quat_to_rotmat(q):
    """Quaternions [G, 4] (w, x, y, z), normalised here -> rotation matrices [G, 3, 3]."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).view(-1, 3, 3)


def project_gaussians(xyz, scale, rotation, camera, kernel_size=0.1):
    """EWA projection -> mean2d [G, 2] (pixels, centres at i + 0.5), cov2d [G, 2, 2] (pixels^2, filter
    included), compensation [G] = sqrt(det(cov2d) / det(cov2d + k I)), camera z [G]."""
    W, H = camera.width, camera.height
    fx, fy, cx, cy = camera.fx * W, camera.fy * H, camera.cx * W, camera.cy * H
    w2c = camera.w2c.to(xyz)
    pc = xyz @ w2c[:3, :3].T + w2c[:3, 3]                             # [G, 3] camera space
    z = pc[:, 2].clamp(min=1e-6)                                      # culled later when <= near
    mean2d = torch.stack([fx * pc[:, 0] / z + cx, fy * pc[:, 1] / z + cy], -1)
    lim_x = ((W - cx) / fx + 0.15 * W / fx, cx / fx + 0.15 * W / fx)  # 1.3 x tan(fov/2) for a centred cx
    lim_y = ((H - cy) / fy + 0.15 * H / fy, cy / fy + 0.15 * H / fy)
    tx = (pc[:, 0] / z).clamp(-lim_x[1], lim_x[0]) * z
    ty = (pc[:, 1] / z).clamp(-lim_y[1], lim_y[0]) * z
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / z ** 2,
                     zero, fy / z, -fy * ty / z ** 2], -1).view(-1, 2, 3)   # [G, 2, 3]
    M = w2c[:3, :3] @ quat_to_rotmat(rotation) * scale[:, None, :]    # [G, 3, 3] = W R S
    T = J @ M                                                         # [G, 2, 3]
    cov = T @ T.transpose(1, 2)                                       # [G, 2, 2] = J W Sigma W^T J^T
    det0 = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] ** 2
    cov = cov + kernel_size * torch.eye(2, device=xyz.device, dtype=xyz.dtype)
    det1 = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] ** 2
    return mean2d, cov, torch.sqrt(det0.clamp(min=1e-12) / det1), pc[:, 2]


def _unpack(gaussians):
    g = gaussians
    return g['xyz'], g['scale'], g['rotation'], g['opacity'].reshape(-1), g['rgb']


def _ellipse_spans(mean2d, conic, m, width, prim, py):
    """x-range of pixel centres with d^T conic d <= m on row py -> inclusive x0, x1 clipped to the image.
    On a row the quadratic form is a quadratic in dx: a dx^2 + 2 b dy dx + c dy^2 <= m."""
    a, b, c = conic[prim, 0], conic[prim, 1], conic[prim, 2]
    dy = py.to(mean2d) + 0.5 - mean2d[prim, 1]
    disc = (b * b - a * c) * dy * dy + a * m[prim]                    # >= 0 where the row meets the ellipse
    half = torch.sqrt(disc.clamp(min=0)) / a
    mid = mean2d[prim, 0] - b * dy / a
    lo, hi = mid - half, torch.where(disc >= 0, mid + half, -math.inf)
    return (torch.ceil(lo.clamp(-2, width + 2) - 0.5).long().clamp(min=0),
            torch.floor(hi.clamp(-2, width + 2) - 0.5).long().clamp(max=width - 1))


def _sort_pixels(pix):
    """Stable argsort of pixel indices (< 65536 per band). On CPU, numpy's radix sort of uint16 keys: torch.sort
    dominated the reference renderer's time."""
    if pix.device.type == 'cpu':
        return torch.from_numpy(np.argsort(pix.numpy().astype(np.uint16), kind='stable'))
    return torch.sort(pix, stable=True)[1]


def _composite_band(p, r0, r1, width):
    """Front-to-back compositing of one band of rows -> accumulated [n, 5] = (rgb, alpha, depth) per pixel.
    Pairs are sorted by pixel then depth; T_i = exp(exclusive segmented cumsum of log(1 - alpha)), in float64."""
    y0, y1 = p['box']
    prim, px, py = _span_pairs(y0.clamp(min=r0), y1.clamp(max=r1 - 1), lambda i, y: _ellipse_spans(
        p['mean2d'].detach(), p['conic'].detach(), p['m'], width, i, y))
    pix = (py - r0) * width + px
    order = _sort_pixels(pix)                                         # primitives are depth-sorted already
    pix, prim = pix[order], prim[order]
    a = p['attrs'].index_select(0, prim)                              # [E, 10] one gather for all attributes
    dx = (pix % width).to(a) + 0.5 - a[:, 0]
    dy = (pix // width + r0).to(a) + 0.5 - a[:, 1]
    power = -0.5 * (a[:, 2] * dx * dx + a[:, 4] * dy * dy) - a[:, 3] * dx * dy
    alpha = (a[:, 5] * torch.exp(power)).clamp(max=ALPHA_MAX)
    alpha = torch.where(alpha >= ALPHA_MIN, alpha, 0.0)
    log_t = torch.log1p(-alpha.double())
    excl = log_t.cumsum(0) - log_t                                    # [E] exclusive running sum
    first = torch.ones_like(pix, dtype=torch.bool)
    first[1:] = pix[1:] != pix[:-1]
    seg = first.long().cumsum(0) - 1                                  # [E] segment (pixel) id
    T = torch.exp(excl - excl[first][seg]).to(alpha.dtype)
    src = torch.cat([a[:, 6:9], torch.ones_like(alpha)[:, None], a[:, 9:10]], -1)   # [E, 5] rgb, 1, z
    return torch.zeros((r1 - r0) * width, 5, dtype=alpha.dtype, device=alpha.device).index_add(
        0, pix, (alpha * T)[:, None] * src)                           # [n, 5]


def render_reference(gaussians, camera, background=(0.0, 0.0, 0.0), kernel_size=0.1):
    """Pure-torch differentiable splatting -> dict(rgb [H, W, 3], alpha [H, W], depth [H, W] = expected
    camera z of the splats, 0 where alpha = 0). Memory is bounded per band of rows (PAIR_BUDGET pairs);
    autograd keeps every band's pairs for backward."""
    xyz, scale, rotation, opacity, rgb = _unpack(gaussians)
    W, H = camera.width, camera.height
    w2c = camera.w2c.to(xyz)
    z = (xyz.detach() @ w2c[2, :3] + w2c[2, 3])                       # cull first: splats behind the camera
    idx = ((z > camera.near) & (z < camera.far)).nonzero(as_tuple=True)[0]   # would give inf/nan gradients
    mean2d, cov, comp, z = project_gaussians(xyz[idx], scale[idx], rotation[idx], camera, kernel_size)
    op = opacity[idx] * comp
    m = 2 * torch.log((op.detach() / ALPHA_MIN).clamp(min=1))         # alpha >= 1/255 inside d^T cov^-1 d <= m
    keep = (m > 0).nonzero(as_tuple=True)[0]
    keep = keep[torch.argsort(z[keep].detach(), stable=True)]         # front to back
    cov, det = cov[keep], cov[keep, 0, 0] * cov[keep, 1, 1] - cov[keep, 0, 1] ** 2
    conic = torch.stack([cov[:, 1, 1], -cov[:, 0, 1], cov[:, 0, 0]], -1) / det[:, None]   # [G', 3] (A, B, C)
    attrs = [mean2d[keep], conic, op[keep, None], rgb[idx[keep]], z[keep, None]]
    p = dict(mean2d=mean2d[keep], conic=conic, m=m[keep], attrs=torch.cat(attrs, -1))     # attrs [G', 10]
    rx, ry = (p['m'] * cov[:, 0, 0].detach()).sqrt(), (p['m'] * cov[:, 1, 1].detach()).sqrt()
    x0, x1, y0, y1 = _pixel_box(p['mean2d'][:, 0].detach() - rx, p['mean2d'][:, 0].detach() + rx,
                                p['mean2d'][:, 1].detach() - ry, p['mean2d'][:, 1].detach() + ry, W, H)
    p['box'] = (y0, torch.where(x1 >= x0, y1, y0 - 1))                # fully off-screen: no rows
    acc = torch.cat([_composite_band(p, r0, r1, W) for r0, r1 in _bands(x0, x1, y0, y1, W, H)])  # [H*W, 5]
    acc = acc.view(H, W, 5)
    alpha = acc[..., 3]
    bg = torch.as_tensor(background, dtype=acc.dtype, device=acc.device)
    depth = torch.where(alpha > 0, acc[..., 4] / alpha.clamp(min=1e-12), 0.0)
    return dict(rgb=acc[..., :3] + (1 - alpha)[..., None] * bg, alpha=alpha, depth=depth)


# -----------------------------------------------------------------------------
# Gaussian splatting: gsplat backend (CUDA), dispatch, multiview loss


def render_gsplat(gaussians, camera, background=(0.0, 0.0, 0.0), kernel_size=0.1):
    """gsplat (CUDA) with the same conventions as render_reference: rasterize_mode='antialiased' with
    eps2d = kernel_size is mip-splatting's filter + opacity compensation. gsplat clamps alpha at 0.999 (we and
    the official mip-splatting rasteriser: 0.99) and stops pixels at T < 1e-4; elsewhere they agree."""
    import gsplat                           # lazy: needs CUDA (JIT-compiles its kernels on first use)
    xyz, scale, rotation, opacity, rgb = _unpack(gaussians)
    colors, alphas, _ = gsplat.rasterization(
        means=xyz, quats=rotation, scales=scale, opacities=opacity, colors=rgb,
        viewmats=camera.w2c.to(xyz)[None], Ks=camera.K.to(xyz)[None], width=camera.width, height=camera.height,
        near_plane=camera.near, far_plane=camera.far, eps2d=kernel_size, rasterize_mode='antialiased',
        render_mode='RGB+D', packed=False)  # colors [1, H, W, 4] = (rgb, accumulated z), alphas [1, H, W, 1]
    alpha = alphas[0, ..., 0]
    bg = torch.as_tensor(background, dtype=colors.dtype, device=colors.device)
    depth = torch.where(alpha > 0, colors[0, ..., 3] / alpha.clamp(min=1e-12), 0.0)
    return dict(rgb=colors[0, ..., :3] + (1 - alpha)[..., None] * bg, alpha=alpha, depth=depth)


def gsplat_available():
    if not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def render(gaussians, camera, backend='auto', background=(0.0, 0.0, 0.0), kernel_size=0.1):
    """Render splats from one camera -> dict(rgb [H, W, 3], alpha [H, W], depth [H, W]).
    backend: 'reference' (pure torch, any device), 'gsplat' (CUDA), or 'auto' = gsplat when the splats are
    on CUDA and gsplat imports, else reference. kernel_size: mip-splatting 2D filter in pixels^2 (official 0.1)."""
    if backend == 'auto':
        backend = 'gsplat' if gaussians['xyz'].is_cuda and gsplat_available() else 'reference'
    if backend == 'gsplat':
        return render_gsplat(gaussians, camera, background, kernel_size)
    if backend == 'reference':
        return render_reference(gaussians, camera, background, kernel_size)
    raise ValueError(f"backend must be 'auto', 'reference' or 'gsplat', got {backend!r}")


def render_samples(gaussians, counts, cameras, backend='auto', background=(0.0, 0.0, 0.0)):
    """The one place decoded Gaussians become pictures (training's 3D loss, evaluation, tests): Gaussians of
    several samples concatenated (GaussianDecoder on a packed batch), `counts` Gaussians per sample (host
    ints), cameras[i] the cameras of sample i -> per sample its renders [V, H, W, 3] in [0, 1].
    The rasteriser sizes its per-pixel lists from the splats' screen footprints (here and in gsplat alike):
    the one data-dependent step of a 3D training step."""
    out, start = [], 0
    for n, cams in zip(counts, cameras):
        g = {k: v[start:start + n] for k, v in gaussians.items()}
        out.append(torch.stack([render(g, c, backend, background)['rgb'] for c in cams]))
        start += n
    return out


@torch.no_grad()
def render_views(gs, feats, coords, cameras):
    """One 3D sample's (reconstructed) voxel features [N, ph*pw*3] at voxel coords [N, 3] -> the Gaussians of gs
    (a model.GaussianDecoder) -> a render per camera [V, H, W, 3] in [-1, 1] (on black, as the ground-truth
    views). For evaluation and decoded shards; training renders through render_samples."""
    coords = torch.as_tensor(coords).long()
    if len(coords) and int(coords.max()) >= gs.cfg.gs_resolution:
        raise ValueError(f"voxel coords reach {int(coords.max())}: the Gaussian decoder's grid is "
                         f"{gs.cfg.gs_resolution}^3 (set --grid_3d / prepare assets to match)")
    p = next(gs.parameters())
    g = gs(feats.to(p.device, p.dtype), coords.to(p.device))
    return render_samples(g, [len(g['xyz'])], [cameras])[0].float().cpu() * 2 - 1


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description='AToken 3D data preparation (see the module docstring).')
    sub = parser.add_subparsers(dest='command', required=True)
    prep = sub.add_parser('prepare', help='render views, voxels and features for every asset in a folder')
    prep.add_argument('assets_dir')
    prep.add_argument('out_dir')
    prep.add_argument('--views', type=int, default=16, help='views per asset (official packing reads 16)')
    prep.add_argument('--resolution', type=int, default=256, help='rendered view size in pixels')
    prep.add_argument('--patch', type=int, default=16, help='feature patch size ph = pw (16 = official)')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.assets_dir):
        raise SystemExit(f'{args.assets_dir}: not a folder')
    try:
        prepare_assets(args.assets_dir, args.out_dir, args.views, args.resolution, (4, args.patch, args.patch))
    except AssetError as e:
        raise SystemExit(f'error: {e}') from e


if __name__ == '__main__':
    main(sys.argv[1:])
