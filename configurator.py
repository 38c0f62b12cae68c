"""
The one config mechanism of every command line in the repo (train.py, eval.py, shards.py), after nanoGPT's
configurator.py, but typed.

    python train.py configs/cpu_tiny.py --lr=1e-3 --model.decoder_depth=3   # files, then flags: load()
    python eval.py --checkpoint=out/cpu_tiny/tokenizer.pt --res=32,64         # flags alone: apply_flags()

A config is a dataclass: its fields' defaults are the only defaults and fix each key's type. Config files are plain
Python assignments, run in a fresh namespace (not globals()); --key=value flags come after them. Every value is
checked against its field: an unknown key or a value of another type is an error naming the key (nanoGPT's
configurator let any name through, its issue #64). A flag's text becomes a value of the default's type: strings stay
as given (quotes removed); bools accept true/false/yes/no/on/off/1/0 (a bare --flag is true); anything else is read
as a Python literal (2.5, 64,512 or (64, 512), [..], {..}). A dict field may stand for another dataclass's fields
(train.py: model -> ModelConfig, loss -> LossConfig): `model = dict(...)` in a file and --model.<field>=value are
then checked against that dataclass. The values the three share mean one thing everywhere: device 'auto'
(pick_device), dtype names (DTYPES).
"""
import ast
import os
import subprocess
import types
from dataclasses import fields

import torch

BOOLS = {'1': True, 'true': True, 'yes': True, 'on': True, '0': False, 'false': False, 'no': False, 'off': False}


def coerce(where, value, default):
    """Check `value` against the type of `default` (int -> float and list <-> tuple allowed)."""
    t = type(default)
    if t is float and type(value) is int:
        return float(value)
    if t in (tuple, list) and isinstance(value, (tuple, list)):
        return t(value)
    if type(value) is not t:
        raise ValueError(f"{where}: expected {t.__name__} like {default!r}, got {type(value).__name__} {value!r}")
    return value


def parse_flag(where, text, default):
    """A flag's text (None for a bare --flag) -> a value of the type of `default`."""
    if text is None:
        if type(default) is not bool:
            raise ValueError(f"{where} needs a value: {where}=...")
        return True
    if type(default) is str:                    # as given; a quoted Python string is unquoted
        return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in '"\'' else text
    if type(default) is bool:
        if text.lower() not in BOOLS:
            raise ValueError(f"{where}={text}: expected true or false")
        return BOOLS[text.lower()]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{where}={text}: expected {type(default).__name__} like {default!r}") from None
    return coerce(f"{where}={text}", value, default)


def flags(argv):
    """--key=value / --flag arguments -> [(key, text or None)]; anything else is an error naming it."""
    out = []
    for arg in argv:
        if not arg.startswith('--') or len(arg) < 3:
            raise ValueError(f"argument {arg!r}: expected --key=value")
        key, sep, value = arg[2:].partition('=')
        out.append((key, value if sep else None))
    return out


def apply_flags(obj, argv):
    """Apply --key=value flags to a dataclass instance (returned); unknown keys raise, naming the known ones."""
    known = {f.name: getattr(obj, f.name) for f in fields(obj)}
    for key, text in flags(argv):
        if key not in known:
            raise ValueError(f"unknown option --{key}: expected one of {sorted(known)}")
        setattr(obj, key, parse_flag(f"--{key}", text, known[key]))
    return obj


def _set_sub(cfg, name, key, value, cls, where):
    """name.key (e.g. model.key): validate against the fields of cls (value: from a file, or a function of the
    field's default for a flag)."""
    known = {f.name: f.default for f in fields(cls)}
    if key not in known:
        raise ValueError(f"{where}: unknown {name} key {key!r}; {cls.__name__} has {sorted(known)}")
    getattr(cfg, name)[key] = value(known[key]) if callable(value) else coerce(where, value, known[key])


def load(cfg, argv, subs=None):
    """[config.py ...] [--key=value ...] applied in order to the dataclass instance cfg (returned). Files run in a
    fresh namespace; their public names and the flags are applied with type checks; unknown keys raise.
    subs: {dict field: dataclass} for the dict fields that hold another dataclass's fields."""
    subs, known = subs or {}, {f.name for f in fields(cfg)}
    updates = []        # (where, key, value): values from files, or a function of the default (a flag's text)
    for arg in argv:
        if arg.startswith('--'):
            [(key, text)] = flags([arg])
            updates.append((f"--{key}", key, lambda d, w=f"--{key}", t=text: parse_flag(w, t, d)))
        else:
            ns = {'__file__': os.path.abspath(arg)}
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), ns)
            updates += [(f"{arg}: {k}", k, v) for k, v in ns.items() if not k.startswith('_')
                        and not callable(v) and not isinstance(v, types.ModuleType)]
    for where, key, value in updates:
        head, _, sub = key.partition('.')
        if sub and head in subs:
            _set_sub(cfg, head, sub, value, subs[head], where)
        elif key in subs:
            value = value({}) if callable(value) else value
            if not isinstance(value, dict):
                raise ValueError(f"{where}: expected a dict of {key} fields, got {value!r}")
            for k, v in value.items():
                _set_sub(cfg, key, k, v, subs[key], where)
        elif key in known:
            default = getattr(type(cfg)(), key)
            setattr(cfg, key, value(default) if callable(value) else coerce(where, value, default))
        else:
            raise ValueError(f"{where}: unknown config key {key!r}")
    return cfg


# -----------------------------------------------------------------------------
# what the shared config values mean (device 'auto', dtype names), and the commit every run records with its config


DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def pick_device(name):
    """'auto' -> cuda, else mps, else cpu; any other name as given."""
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def git_commit():
    """The checkout's HEAD commit ('unknown' outside git): checkpoints and reports record it."""
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
