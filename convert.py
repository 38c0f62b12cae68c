"""
Checkpoint formats in and out, kept apart from the model (as gpt-fast keeps convert_hf_checkpoint.py apart from
its model.py): Apple's released AToken checkpoints and their YAMLs, SigLIP2 vision towers, our own exports, the
released names (download once, cache, checksum), one resolver of "released name or local path", and one atomic
file writer that every other file uses.

Everything here works on plain dicts: a model config is a dict of ModelConfig field values, weights are a state
dict. model.py builds the modules from what these functions return (AToken.from_pretrained,
GaussianDecoder.from_pretrained, AToken.init_from_siglip2); this file never imports model.py.

    python -c "import convert; print(convert.download_pretrained('atoken-sod'))"    # fetch a released checkpoint

Facts about the official format (arch_cfg field names, the fixed settings, the Gaussian decoder's YAML) follow
Apple's apple/ml-atoken release; the official model's code is not copied here.
"""
import copy
import hashlib
import http.client
import json
import math
import os
import tempfile
import urllib.request
import warnings

import torch
import torch.nn.functional as F
import yaml

# -----------------------------------------------------------------------------
# one atomic writer: a file is either whole or absent (a crash or a full disk never leaves half of one)


def write_atomic(path, write):
    """write(tmp) writes a temporary file beside `path`, which is then renamed to `path` (os.replace is atomic
    within one file system). A failed write removes the temporary file and leaves any old `path` as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def save_text(text, path):
    def write(f):
        with open(f, 'w') as fh:
            fh.write(text)
    write_atomic(path, write)


def save_json(obj, path):
    save_text(json.dumps(obj, indent=1, default=float), path)


def read_state_dict(path):
    """A flat state dict from .safetensors, or from a torch file (weights_only: no code runs from the pickle)."""
    if str(path).endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location='cpu', weights_only=True)


# -----------------------------------------------------------------------------
# the official tokenizer YAML's `arch_cfg` <-> ModelConfig fields

# official arch_cfg name -> (our ModelConfig field, type)
ARCH_FIELDS = dict(encoder_model_channels=('encoder_width', int), encoder_num_blocks=('encoder_depth', int),
                   encoder_num_heads=('encoder_heads', int), encoder_mlp_channels=('encoder_mlp', int),
                   decoder_model_channels=('decoder_width', int), decoder_num_blocks=('decoder_depth', int),
                   decoder_num_heads=('decoder_heads', int), decoder_mlp_channels=('decoder_mlp', int),
                   latent_channels=('latent_channels', int), use_quantizer=('use_quantizer', bool),
                   quantizer_num_codebooks=('fsq_groups', int))
# arch_cfg settings with one value in this implementation (and in every released checkpoint)
ARCH_FIXED = dict(encoder_attn_mode='full', decoder_attn_mode='full', encoder_pe_mode='joint', decoder_pe_mode='joint',
                  encoder_qk_rms_norm=False, decoder_qk_rms_norm=True, encoder_use_bias=True, decoder_use_bias=False,
                  encoder_use_rms_norm=False, decoder_use_rms_norm=True, use_decoder=True, quantizer_type='fsq',
                  quantizer_chunk_size=1)
# ModelConfig fields the official arch_cfg cannot express: the official code hard-codes these values
ARCH_HARD_CODED = dict(fsq_levels=4, pos_grid=16, rope_theta=10000.0, tile_frames=16)

_SO400M_ARCH = dict(
    patch_size=[4, 16, 16], in_channels=3072, out_channels=3072, latent_channels=48,
    encoder_model_channels=1152, encoder_num_blocks=27, encoder_num_heads=16, encoder_mlp_channels=4304,
    decoder_model_channels=1152, decoder_num_blocks=27, decoder_num_heads=16, decoder_mlp_channels=4304,
    use_quantizer=False, **{k: v for k, v in ARCH_FIXED.items() if not k.startswith('quantizer')})
_FSQ_ARCH = dict(use_quantizer=True, quantizer_type='fsq', quantizer_codebook_size=4096, quantizer_feature_dim=48,
                 quantizer_num_codebooks=8, quantizer_chunk_size=1)


def fields_from_arch(arch):
    """Official `arch_cfg` dict -> ModelConfig fields (the ones it sets; ModelConfig's defaults, the So400m
    values, fill the rest), refusing settings this implementation does not have."""
    bad = {k: arch[k] for k, v in ARCH_FIXED.items() if k in arch and arch[k] != v}
    if bad:
        raise ValueError(f"arch_cfg settings not supported (expected {dict((k, ARCH_FIXED[k]) for k in bad)}): {bad}")
    pt, ph, pw = arch.get('patch_size', _SO400M_ARCH['patch_size'])
    out = dict(patch_size=(pt, ph, pw))
    out.update({ours: kind(arch[k]) for k, (ours, kind) in ARCH_FIELDS.items() if k in arch})
    for k in ('in_channels', 'out_channels'):
        if k in arch and arch[k] != pt * ph * pw * 3:
            raise ValueError(f"arch_cfg {k}={arch[k]} does not match patch_size {(pt, ph, pw)} ({pt * ph * pw * 3})")
    if out.get('use_quantizer'):
        latent = out.get('latent_channels', _SO400M_ARCH['latent_channels'])
        dims = latent // out.get('fsq_groups', _FSQ_ARCH['quantizer_num_codebooks'])
        size, feat = arch.get('quantizer_codebook_size', 4096), arch.get('quantizer_feature_dim', 48)
        levels = ARCH_HARD_CODED['fsq_levels']
        if feat != latent or levels ** dims != size:
            raise ValueError(f"FSQ with codebook size {size} and feature dim {feat} is not supported: "
                             f"expected {levels}^{dims} codes over all {latent} latents")
    return out


def arch_from_fields(c):
    """ModelConfig fields (a dict: dataclasses.asdict(config)) -> the official `arch_cfg`: the inverse of
    fields_from_arch (tested as a round trip). Fields the official architecture cannot express must keep their
    hard-coded official values; anything else is a ValueError naming the field. decoder_cache_frames is an
    inference option and the gs_* fields belong to the Gaussian decoder's own YAML (gs_model_from_fields)."""
    bad = {k: c[k] for k, v in ARCH_HARD_CODED.items() if c[k] != v}
    if bad:
        raise ValueError(f"not expressible in the official arch_cfg (it hard-codes {ARCH_HARD_CODED}): {bad}")
    pt, ph, pw = c['patch_size']
    arch = dict(patch_size=[pt, ph, pw], in_channels=pt * ph * pw * 3, out_channels=pt * ph * pw * 3)
    arch.update({k: c[ours] for k, (ours, _) in ARCH_FIELDS.items() if k != 'quantizer_num_codebooks'})
    arch.update(ARCH_FIXED)
    if c['use_quantizer']:  # FSQ with 4 levels per dim: codebook 4^(L/G) per group, over all L latents
        arch.update(quantizer_codebook_size=c['fsq_levels'] ** (c['latent_channels'] // c['fsq_groups']),
                    quantizer_feature_dim=c['latent_channels'], quantizer_num_codebooks=c['fsq_groups'])
    else:
        for k in ('quantizer_type', 'quantizer_chunk_size'):
            arch.pop(k)
    return arch


def read_official_yaml(config_path):
    """Official tokenizer YAML -> its model.model_cfg.arch_cfg dict (a clear error for any other file)."""
    with open(config_path) as f:
        y = yaml.safe_load(f)
    try:
        return y['model']['model_cfg']['arch_cfg']
    except (KeyError, TypeError):
        raise ValueError(f"{config_path}: no model.model_cfg.arch_cfg block (not an official AToken YAML)") from None


# -----------------------------------------------------------------------------
# the official Gaussian decoder YAML (3d_decode_gs.yaml `model:` block) <-> ModelConfig's gs_* fields

_GS_ARCH = {'resolution': 64, 'model_channels': 768, 'latent_channels': 768, 'num_blocks': 12, 'num_heads': 12,
            'mlp_channels': 3072, 'attn_mode': 'swin', 'window_size': 8,
            'representation_config': {
                'lr': {'_xyz': 1.0, '_features_dc': 1.0, '_opacity': 1.0, '_scaling': 1.0, '_rotation': 0.1},
                'perturb_offset': True, 'voxel_size': 1.5, 'num_gaussians': 32, '2d_filter_kernel_size': 0.1,
                '3d_filter_kernel_size': 9e-4, 'scaling_bias': 4e-3, 'opacity_bias': 0.1,
                'scaling_activation': 'softplus'}}
# representation settings model.GaussianDecoder implements (its GS_* constants hold the same values)
GS_FIXED = ('voxel_size', 'scaling_bias', 'opacity_bias', '3d_filter_kernel_size', 'scaling_activation',
            'perturb_offset')


def gs_fields_from_model(m):
    """Official 3d_decode_gs.yaml `model:` dict -> ModelConfig fields (gs_* and the patch size it reads),
    refusing unsupported settings."""
    rep, official = m.get('representation_config', {}), _GS_ARCH['representation_config']
    bad = {k: rep[k] for k in GS_FIXED if k in rep and rep[k] != official[k]}
    bad.update({f'lr.{k}': v for k, v in rep.get('lr', {}).items() if official['lr'].get(k) != v})
    if m.get('attn_mode', 'swin') != 'swin':
        bad['attn_mode'] = m['attn_mode']
    if bad:
        raise ValueError(f"Gaussian decoder settings not supported (official values expected): {bad}")
    side = math.isqrt(m.get('latent_channels', 768) // 3)
    if side * side * 3 != m.get('latent_channels', 768):
        raise ValueError(f"latent_channels {m['latent_channels']} is not a square RGB patch")
    return dict(patch_size=(4, side, side), gs_width=m['model_channels'], gs_depth=m['num_blocks'],
                gs_heads=m['num_heads'], gs_mlp=m['mlp_channels'], gs_window=m.get('window_size', 8),
                gs_per_voxel=rep.get('num_gaussians', 32), gs_resolution=m.get('resolution', 64))


def gs_model_from_fields(c):
    """ModelConfig fields (dict) -> the official 3d_decode_gs.yaml `model:` dict: the inverse of
    gs_fields_from_model (the representation settings are the official constants)."""
    ph, pw = c['patch_size'][1:]
    if ph != pw:
        raise ValueError(f"the official Gaussian decoder reads square patches, got {ph}x{pw}")
    m = copy.deepcopy(_GS_ARCH)
    m.update(resolution=c['gs_resolution'], model_channels=c['gs_width'], latent_channels=ph * pw * 3,
             num_blocks=c['gs_depth'], num_heads=c['gs_heads'], mlp_channels=c['gs_mlp'], window_size=c['gs_window'])
    m['representation_config']['num_gaussians'] = c['gs_per_voxel']
    return m


def read_official_gs_yaml(config_path):
    """Official 3d_decode_gs.yaml -> its `model:` dict (a clear error for any other file)."""
    with open(config_path) as f:
        y = yaml.safe_load(f)
    m = y.get('model', y) if isinstance(y, dict) else None
    if not isinstance(m, dict) or 'model_channels' not in m:
        raise ValueError(f"{config_path}: no `model:` block with model_channels (not a 3d_decode_gs YAML)")
    return m


# -----------------------------------------------------------------------------
# Apple's layout out: a flat state dict (.pt or .safetensors) + its official YAML, loadable in apple/ml-atoken


def save_official(sd, y, checkpoint_path, config_path):
    """State dict `sd` (official key names: ours are the same) and YAML dict `y`, each written atomically."""
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if str(checkpoint_path).endswith('.safetensors'):
        from safetensors.torch import save_file
        write_atomic(checkpoint_path, lambda f: save_file(sd, f))
    else:
        save_torch(sd, checkpoint_path)
    save_text(yaml.safe_dump(y, sort_keys=False), config_path)


def tokenizer_yaml(fields):
    """The official tokenizer YAML of a model config (dict)."""
    return {'model': {'class_name': 'models.pretrained.autoencoder_kl.AutoencoderKLTrain',
                      'model_cfg': {'eval_imagenet_zeroshot': False, 'disentangle_itc_rec': False,
                                    'eval_fid': False, 'arch_cfg': arch_from_fields(fields)}}}


def gs_yaml(fields):
    """The official Gaussian decoder YAML of a model config (dict); the official loader ignores class_name."""
    return {'model': gs_model_from_fields(fields)}


def export_official(export, folder, with_gs=True):
    """One of our tokenizer exports ({'model_config', 'model', 'gs_decoder'}: train.py's tokenizer.pt, EMA weights)
    -> folder/atoken.pt + atoken.yaml in Apple's layout and, with_gs, its Gaussian decoder as 3d_decode_gs.pt +
    .yaml. Both load in apple/ml-atoken and in model.AToken / GaussianDecoder.from_pretrained(path, yaml)."""
    c = export['model_config']
    save_official(export['model'], tokenizer_yaml(c), os.path.join(folder, 'atoken.pt'),
                  os.path.join(folder, 'atoken.yaml'))
    if with_gs:
        save_official(export['gs_decoder'], gs_yaml(c), os.path.join(folder, '3d_decode_gs.pt'),
                      os.path.join(folder, '3d_decode_gs.yaml'))


# -----------------------------------------------------------------------------
# SigLIP2 -> encoder (paper 3.4: the encoder starts from SigLIP2-So400m/16; the decoder from scratch)

SIGLIP2_DEFAULT = 'ViT-SO400M-16-SigLIP2-256'   # open_clip name (timm tower, 16x16 position table at 256 px)


def load_siglip2_tower(source):
    """A SigLIP2 vision tower's state dict with timm VisionTransformer key names.

    source: an nn.Module (timm tower, or open_clip model whose .visual.trunk is one), a local file
    (.safetensors / .pt / .bin; timm or open_clip key names), an open_clip model name (weights 'webli',
    downloaded) or 'timm/<name>' (downloaded from the HF hub).
    """
    if isinstance(source, torch.nn.Module):
        m = getattr(source, 'visual', source)
        return getattr(m, 'trunk', m).state_dict()
    if os.path.exists(source):
        sd = read_state_dict(source)
        for prefix in ('visual.trunk.', 'trunk.'):   # an open_clip checkpoint: keep the vision trunk
            if any(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                break
        return sd
    try:
        if source.startswith('timm/'):
            import timm
            return timm.create_model(source[5:], pretrained=True, num_classes=0).state_dict()
        import open_clip
        return open_clip.create_model(source, pretrained='webli').visual.trunk.state_dict()
    except Exception as e:   # no network, unknown name, ...: say what was asked and how to give it locally
        raise RuntimeError(f"could not load SigLIP2 weights '{source}' ({type(e).__name__}: {e}). Give a local "
                           f"file instead: a timm/open_clip state dict of the vision tower") from e


def siglip2_to_encoder(sd, cfg):
    """timm SigLIP tower state dict -> our `encoder.*` state dict, for a config with cfg.patch_size,
    cfg.encoder_width and cfg.pos_grid.

    The 2D patch embedding [C, 3, p, p] goes into the pt = 0 slot of the 3D input linear in (ph, pw, c)
    order and the other temporal slots are zero, so an image (zero-padded frames) sees exactly SigLIP's
    patch embedding. A position table of another grid size is resized like at run time.
    """
    pt, ph, pw = cfg.patch_size
    conv = sd['patch_embed.proj.weight']                                        # [C, 3, p, p]
    C = conv.shape[0]
    if conv.shape[2:] != (ph, pw) or C != cfg.encoder_width:
        raise ValueError(f"SigLIP tower patch embedding {tuple(conv.shape)} does not fit patch_size "
                         f"{cfg.patch_size} and encoder_width {cfg.encoder_width}")
    w_in = conv.new_zeros(C, pt, ph, pw, 3)
    w_in[:, 0] = conv.permute(0, 2, 3, 1)                                       # (ph, pw, c), c fastest
    pos = sd['pos_embed'][0]                                                    # [g*g, C]
    g = math.isqrt(pos.shape[0])
    if g != cfg.pos_grid:
        table = pos.reshape(g, g, C).permute(2, 0, 1)[None].float()             # [1, C, g, g]
        table = F.interpolate(table, size=(cfg.pos_grid,) * 2, mode='bilinear', align_corners=False,
                              antialias=True)
        pos = table[0].permute(1, 2, 0).reshape(-1, C).to(pos.dtype)
    out = {'encoder.input_layer.weight': w_in.reshape(C, -1), 'encoder.input_layer.bias': sd['patch_embed.proj.bias'],
           'encoder.pos_embedder.position_embedding.weight': pos,
           'encoder.head.probe': sd['attn_pool.latent'].reshape(C)}
    rename = {'norm.': 'post_layernorm.', 'attn_pool.q.': 'head.attention.to_q.',
              'attn_pool.kv.': 'head.attention.to_kv.', 'attn_pool.proj.': 'head.attention.to_out.',
              'attn_pool.norm.': 'head.layernorm.', 'attn_pool.mlp.fc1.': 'head.mlp.mlp.0.',
              'attn_pool.mlp.fc2.': 'head.mlp.mlp.2.', '.attn.qkv.': '.attn.to_qkv.',
              '.attn.proj.': '.attn.to_out.', '.mlp.fc1.': '.mlp.mlp.0.', '.mlp.fc2.': '.mlp.mlp.2.'}
    done = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'pos_embed', 'attn_pool.latent'}
    for k, v in sd.items():
        if k in done:
            continue
        new = k
        for a, b in rename.items():
            if new.startswith(a) or (a.startswith('.') and a in new):
                new = new.replace(a, b, 1) if a.startswith('.') else b + new[len(a):]
        if new == k and not k.startswith('blocks.'):
            raise ValueError(f"unexpected key in SigLIP tower state dict: {k}")
        out['encoder.' + new] = v
    return out


# -----------------------------------------------------------------------------
# Apple's released checkpoints by name. The architecture of each is embedded here (the `arch_cfg` of its official
# YAML; for 3d_decode_gs the YAML's `model:` block), so no YAML is needed; the weights are downloaded once into
# $ATOKEN_CACHE (default ~/.cache/atoken) and checked against their recorded SHA-256.

PRETRAINED_BASE_URL = 'https://ml-site.cdn-apple.com/models/atoken'   # $ATOKEN_BASE_URL overrides it
PRETRAINED = {
    # name: kind ('tokenizer': AToken, 'gaussian': GaussianDecoder) and arch (the official YAML's values).
    # The weights are at <base URL>/<name>.pt; an entry's optional 'url' replaces that (tests use it).
    'atoken-soc': dict(kind='tokenizer', arch=dict(_SO400M_ARCH)),                  # So/C: continuous, 48
    'atoken-sod': dict(kind='tokenizer', arch=dict(_SO400M_ARCH, **_FSQ_ARCH)),     # So/D: FSQ 8 x 4096
    'atoken-soc-s1': dict(kind='tokenizer', arch=dict(_SO400M_ARCH, latent_channels=32)),   # after stage 1
    'atoken-soc-s2': dict(kind='tokenizer', arch=dict(_SO400M_ARCH)),               # after stage 2
    '3d_decode_gs': dict(kind='gaussian', arch=_GS_ARCH),                           # 3D Gaussian decoder
}
LOADERS = {'tokenizer': 'AToken', 'gaussian': 'GaussianDecoder'}


def released_names(kind):
    return ', '.join(n for n, e in PRETRAINED.items() if e['kind'] == kind)


def is_released(name):
    """True for one of Apple's released names that is not also a local path (an existing path wins)."""
    return isinstance(name, str) and name in PRETRAINED and not os.path.exists(name)


def pretrained_url(name):
    """The entry's 'url', else $ATOKEN_BASE_URL (default PRETRAINED_BASE_URL) + /<name>.pt."""
    base = os.environ.get('ATOKEN_BASE_URL') or PRETRAINED_BASE_URL
    return PRETRAINED[name].get('url') or f"{base.rstrip('/')}/{name}.pt"


def pretrained_cache_dir():
    """$ATOKEN_CACHE, default ~/.cache/atoken."""
    return os.path.abspath(os.path.expanduser(os.environ.get('ATOKEN_CACHE') or os.path.join('~', '.cache', 'atoken')))


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 23), b''):
            h.update(chunk)
    return h.hexdigest()


def cached_pretrained(path, record):
    """True when the cached file at `path` can be used: it matches the size and SHA-256 in `record`, or it was put
    there by hand (no record: it is trusted and recorded). A file that no longer matches is deleted."""
    size = os.path.getsize(path)
    try:
        with open(record) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = None
    if not isinstance(known, dict):                 # placed by hand (or the record was lost): trust it
        save_json(dict(size=size, sha256=sha256(path), url=None), record)
        return True
    if known.get('size') == size and known.get('sha256') == sha256(path):
        return True
    warnings.warn(f"{path} does not match the size and SHA-256 recorded when it was downloaded "
                  f"({record}): truncated or altered; deleting it and downloading it again")
    os.remove(path)
    return False


def download_pretrained(name, progress=True):
    """-> local path of the released checkpoint `name`: $ATOKEN_CACHE/<name>.pt, downloaded (urllib, tqdm
    progress bar) into a temporary file in the same folder that is renamed only once complete. Its size and
    SHA-256 are recorded in <name>.pt.json, and a later call checks them without the network (cached_pretrained).
    A failed download raises one RuntimeError naming the URL and that path."""
    from tqdm import tqdm
    url, folder = pretrained_url(name), pretrained_cache_dir()
    path = os.path.join(folder, f'{name}.pt')
    record = path + '.json'
    if os.path.exists(path) and cached_pretrained(path, record):
        return path
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{name}.pt.', suffix='.part')
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=60) as r:
            total = r.headers.get('Content-Length')
            total = int(total) if total else None
            with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=f'{name}.pt',
                      disable=not progress) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
            if total is not None and n != total:
                raise OSError(f"connection closed after {n} of {total} bytes")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                            # mkstemp makes it owner-only
        os.replace(tmp, path)
        tmp = None
        save_json(dict(size=n, sha256=h.hexdigest(), url=url), record)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise RuntimeError(f"could not download the pretrained checkpoint '{name}' from {url} ({e}).\n"
                           f"Download it by hand and put it at {path} (e.g. curl -L -o {path} {url}); "
                           f"it is then used from there without the network (set $ATOKEN_CACHE to use "
                           f"another folder).") from None     # one error: the cause is in the message
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


# -----------------------------------------------------------------------------
# the one resolver of "released name or local path", and what model.py's from_pretrained reads through it


def resolve(name_or_path, kind, download=True):
    """A released name of `kind` ('tokenizer' | 'gaussian') or a local path -> (path, the name's embedded arch or
    None). An existing path wins over a name. download=False: a name's path is where it would be cached (for
    reading its config without the weights)."""
    if is_released(name_or_path):
        entry = PRETRAINED[name_or_path]
        if entry['kind'] != kind:
            raise ValueError(f"'{name_or_path}' is a {entry['kind']} checkpoint: load it with "
                             f"{LOADERS[entry['kind']]}.from_pretrained('{name_or_path}')")
        path = download_pretrained(name_or_path) if download else None
        return path, copy.deepcopy(entry['arch'])
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"checkpoint not found: {name_or_path} (released names: {released_names(kind)})")
    return name_or_path, None


def tokenizer_source(name_or_path, config_path=None, weights=True):
    """What model.AToken.from_pretrained loads -> (ModelConfig fields dict, state dict or None, source name):
    a released name (its embedded arch), an official checkpoint file (flat state dict, .pt or .safetensors) with
    its official YAML, or one of our exports ({'model_config': dict, 'model': state dict}) with no YAML.
    weights=False reads only the config (our exports memory-mapped)."""
    if config_path is not None and not os.path.exists(config_path):
        raise FileNotFoundError(f"not found: {config_path}")
    path, arch = resolve(name_or_path, 'tokenizer', download=weights)
    if config_path is not None:
        arch = read_official_yaml(config_path)
    if arch is not None:                    # the YAML's, else the released name's embedded arch
        return fields_from_arch(arch), read_state_dict(path) if weights else None, str(path or name_or_path)
    sd = {} if str(path).endswith('.safetensors') else \
        torch.load(path, map_location='cpu', weights_only=True, mmap=not weights)
    if not isinstance(sd, dict) or 'model_config' not in sd:
        raise ValueError(f"{path}: a flat official state dict needs its YAML (config_path)")
    return dict(sd['model_config']), sd['model'] if weights else None, f"{path} ['model_config']"


def gaussian_source(name_or_path, config_path=None, weights=True):
    """What model.GaussianDecoder.from_pretrained loads -> (ModelConfig fields dict, state dict or None, source):
    a released name ('3d_decode_gs'), or 3d_decode_gs.pt with its YAML (`model:` block). `lpips_loss.*` keys
    (the official training loss's) are dropped."""
    if config_path is not None and not os.path.exists(config_path):
        raise FileNotFoundError(f"not found: {config_path}")
    path, m = resolve(name_or_path, 'gaussian', download=weights)
    if config_path is not None:
        m = read_official_gs_yaml(config_path)
    elif m is None:
        raise ValueError(f"{name_or_path}: an official Gaussian decoder checkpoint needs its YAML "
                         f"(config_path), or give a released name: {released_names('gaussian')}")
    sd = None
    if weights:
        sd = {k: v for k, v in read_state_dict(path).items() if not k.startswith('lpips_loss.')}
    return gs_fields_from_model(m), sd, str(path or name_or_path)
