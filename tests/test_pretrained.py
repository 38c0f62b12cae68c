"""Released checkpoints by name (convert.PRETRAINED): download, cache, integrity checks, presets. No network:
a local HTTP server on 127.0.0.1 serves a tiny official-format checkpoint (tests/data/official_tiny.pt)
under a test name registered with that checkpoint's arch_cfg."""
import hashlib
import http.server
import json
import os
import re
import socket
import threading

import pytest
import torch
import yaml

import convert
import model

DATA = os.path.join(os.path.dirname(__file__), 'data')
REF = torch.load(os.path.join(DATA, 'official_tiny.pt'), weights_only=False)
GS_REF = torch.load(os.path.join(DATA, 'official_gs_tiny.pt'), weights_only=False)


class Server:
    """Serves {url path: bytes}; counts requests; mode 'truncate' sends the full Content-Length, half the
    bytes, then closes the connection (an interrupted download)."""
    def __init__(self, files):
        self.files, self.requests, self.mode = files, 0, 'ok'
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if outer.mode == 'truncate' else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """-> (server, name, cache dir, checkpoint bytes): 'test-tiny' registered, served, cached in tmp_path."""
    ckpt = tmp_path / 'official_tiny_src.pt'
    torch.save(REF['state_dict'], ckpt)
    body = ckpt.read_bytes()
    server = Server({'/test-tiny.pt': body})
    cache = tmp_path / 'cache'
    monkeypatch.setenv('ATOKEN_CACHE', str(cache))
    monkeypatch.setitem(convert.PRETRAINED, 'test-tiny',
                        dict(kind='tokenizer', arch=dict(REF['arch_cfg']), url=server.url + '/test-tiny.pt'))
    yield server, 'test-tiny', cache, body
    server.close()


def test_download_matches_path_and_yaml(served, tmp_path):
    server, name, cache, body = served
    tok = model.AToken.from_pretrained(name)
    assert server.requests == 1
    path = cache / f'{name}.pt'
    assert path.read_bytes() == body
    rec = json.loads((cache / f'{name}.pt.json').read_text())
    assert rec['size'] == len(body) and rec['sha256'] == hashlib.sha256(body).hexdigest()
    assert not [p for p in os.listdir(cache) if p.endswith('.part')]
    # the same weights through a path + the official YAML layout
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(yaml.safe_dump({'model': {'model_cfg': {'arch_cfg': REF['arch_cfg']}}}))
    ref = model.AToken.from_pretrained(str(tmp_path / 'official_tiny_src.pt'), str(cfg))
    assert tok.config == ref.config
    x = [REF['inputs']['image'], REF['inputs']['video']]
    for a, b in zip(tok.reconstruct(x), ref.reconstruct(x)):
        assert torch.equal(a, b)
    assert torch.equal(tok.embed(x), ref.embed(x))
    # second call: from the cache, the server is not touched
    model.AToken.from_pretrained(name)
    assert server.requests == 1


def test_interrupted_download_leaves_nothing_trusted(served):
    server, name, cache, body = served
    server.mode = 'truncate'
    with pytest.raises(RuntimeError, match=re.escape(server.url + '/test-tiny.pt')) as e:
        model.AToken.from_pretrained(name)
    assert str(cache / f'{name}.pt') in str(e.value)
    assert os.listdir(cache) == []                   # no final file, no record, no temporary file
    server.mode = 'ok'
    model.AToken.from_pretrained(name)
    assert server.requests == 2 and (cache / f'{name}.pt').read_bytes() == body


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_altered_cache_is_refetched(served, damage):
    server, name, cache, body = served
    path = convert.download_pretrained(name, progress=False)
    assert server.requests == 1
    b = bytearray(body)
    if damage == 'flip':
        b[len(b) // 2] ^= 1                          # one byte altered, same size
    else:
        b = b[:-1]
    with open(path, 'wb') as f:
        f.write(b)
    with pytest.warns(UserWarning, match='truncated or altered'):
        tok = model.AToken.from_pretrained(name)
    assert server.requests == 2
    assert open(path, 'rb').read() == body
    assert isinstance(tok, model.AToken)


def test_file_placed_by_hand_is_used(served):
    server, name, cache, body = served
    cache.mkdir()
    (cache / f'{name}.pt').write_bytes(body)
    model.AToken.from_pretrained(name)
    assert server.requests == 0
    assert json.loads((cache / f'{name}.pt.json').read_text())['sha256'] == hashlib.sha256(body).hexdigest()


def test_unreachable_server_gives_clear_error(tmp_path, monkeypatch):
    with socket.socket() as s:                       # a port nothing listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/test-tiny.pt'
    monkeypatch.setenv('ATOKEN_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setitem(convert.PRETRAINED, 'test-tiny', dict(kind='tokenizer', arch=dict(REF['arch_cfg']), url=url))
    with pytest.raises(RuntimeError) as e:
        model.AToken.from_pretrained('test-tiny')
    msg = str(e.value)
    assert url in msg and str(tmp_path / 'cache' / 'test-tiny.pt') in msg
    assert not (tmp_path / 'cache' / 'test-tiny.pt').exists()


def test_base_url_env_and_default(monkeypatch):
    assert convert.pretrained_url('atoken-sod') == 'https://ml-site.cdn-apple.com/models/atoken/atoken-sod.pt'
    monkeypatch.setenv('ATOKEN_BASE_URL', 'http://127.0.0.1:1/mirror/')
    assert convert.pretrained_url('3d_decode_gs') == 'http://127.0.0.1:1/mirror/3d_decode_gs.pt'
    monkeypatch.delenv('ATOKEN_CACHE', raising=False)
    assert convert.pretrained_cache_dir() == os.path.expanduser(os.path.join('~', '.cache', 'atoken'))


def test_gaussian_decoder_by_name(tmp_path, monkeypatch):
    """3d_decode_gs-style download (lpips_loss.* keys dropped) equals the path + YAML load."""
    sd = dict(GS_REF['state_dict'], **{'lpips_loss.net.slice1.0.weight': torch.zeros(3)})
    torch.save(sd, tmp_path / 'gs.pt')
    server = Server({'/test-gs.pt': (tmp_path / 'gs.pt').read_bytes()})
    try:
        monkeypatch.setenv('ATOKEN_CACHE', str(tmp_path / 'cache'))
        monkeypatch.setitem(convert.PRETRAINED, 'test-gs', dict(kind='gaussian', arch=GS_REF['config'],
                                                              url=server.url + '/test-gs.pt'))
        g = model.GaussianDecoder.from_pretrained('test-gs')
        (tmp_path / 'gs.yaml').write_text(yaml.safe_dump({'model': GS_REF['config']}))
        ref = model.GaussianDecoder.from_pretrained(str(tmp_path / 'gs.pt'), str(tmp_path / 'gs.yaml'))
        with torch.no_grad():
            o, r = g(GS_REF['inputs']['feats'], GS_REF['inputs']['coords_xyz']), ref(GS_REF['inputs']['feats'],
                                                                                  GS_REF['inputs']['coords_xyz'])
        assert all(torch.equal(o[k], r[k]) for k in o)
        with pytest.raises(ValueError, match=r"GaussianDecoder\.from_pretrained\(.test-gs.\)"):
            model.AToken.from_pretrained('test-gs')   # a Gaussian decoder name given to the tokenizer
        # eval.py's --gs_checkpoint takes the name without --gs_config (from the cache now)
        import eval as ev
        gs = ev.load_gs_decoder(ev.EvalConfig(gs_checkpoint='test-gs'), None)
        assert all(torch.equal(a, b) for a, b in zip(gs.state_dict().values(), g.state_dict().values()))
        assert server.requests == 1
    finally:
        server.close()


def test_eval_checkpoint_by_name(served):
    import eval as ev
    server, name, cache, body = served
    tok, info = ev.load_tokenizer(ev.EvalConfig(checkpoint=name))
    assert info['kind'] == 'official' and tok.config.use_quantizer and server.requests == 1
    with pytest.raises(FileNotFoundError):
        ev.load_tokenizer(ev.EvalConfig(checkpoint='atoken-sod.pt'))     # a missing file is not a name


# Official parameter counts (dumped from the official modules):
# So400m tokenizer (So/C, So/D, stage 2) 845,738,048 parameters (encoder 430,542,272 + decoder 415,085,184 +
# proj 110,592; the README's 845.7M), 563 state-dict keys; stage 1 (latent 32) 845,682,752.
# 3d_decode_gs: 85,887,520 state-dict elements in 76 keys = 85,887,424 parameters (input 768^2 + 12 blocks x
# 7,079,424 + out layer 448 x 768 + 448) + the 32 x 3 offset_perturbation buffer.
TOKENIZER_PARAMS = {'atoken-soc': 845_738_048, 'atoken-sod': 845_738_048, 'atoken-soc-s2': 845_738_048,
                    'atoken-soc-s1': 845_682_752}


@pytest.mark.parametrize('name', sorted(TOKENIZER_PARAMS))
def test_tokenizer_presets_build_with_official_counts(name):
    with torch.device('meta'):
        m = model.AToken(model.ModelConfig.from_official(convert.PRETRAINED[name]['arch']))
    assert m.num_params() == TOKENIZER_PARAMS[name]
    assert m.num_params('encoder.') == 430_542_272
    assert len(m.state_dict()) == 563
    assert m.config.use_quantizer == (name == 'atoken-sod')
    assert m.config.latent_channels == (32 if name == 'atoken-soc-s1' else 48)
    assert convert.pretrained_url(name) == f'https://ml-site.cdn-apple.com/models/atoken/{name}.pt'


def test_gaussian_preset_builds_with_official_count():
    with torch.device('meta'):
        g = model.GaussianDecoder(model.ModelConfig.from_official(convert.PRETRAINED['3d_decode_gs']['arch'], gaussian=True))
    sd = g.state_dict()
    assert sum(p.numel() for p in g.parameters()) == 85_887_424
    assert len(sd) == 76 and sum(v.numel() for v in sd.values()) == 85_887_520
    assert convert.PRETRAINED['3d_decode_gs']['kind'] == 'gaussian'
