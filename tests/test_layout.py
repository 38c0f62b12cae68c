"""The repository's shape, as properties (read with `ast`, nothing imported): model.py stays a file one reads in a
sitting, imports point one way (model.py -> structure, kernels, convert; none of those imports model.py), no library
function grows past 80 lines, and no module reaches for another module's private names."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ['model.py', 'structure.py', 'convert.py', 'losses.py', 'data.py', 'render3d.py', 'train.py', 'eval.py',
           'shards.py', 'configurator.py', 'kernels/attention.py', 'kernels/grouped.py', 'kernels/rmsnorm.py']
MODULES = {os.path.splitext(os.path.basename(f))[0] for f in LIBRARY} | {'kernels'}


def tree(path):
    with open(os.path.join(ROOT, path)) as f:
        return ast.parse(f.read(), path)


def imported(path):
    """Every repo module `path` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            out |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split('.')[0])
    return out & MODULES


def test_library_files_are_listed():
    """A new library file must be added to LIBRARY above, so that the checks below see it."""
    found = {f for f in glob.glob('*.py', root_dir=ROOT) + glob.glob('kernels/*.py', root_dir=ROOT)
             if not os.path.basename(f).startswith(('bench_', '__'))}
    assert found == set(LIBRARY)


def test_model_py_reads_in_one_sitting():
    with open(os.path.join(ROOT, 'model.py')) as f:
        assert len(f.read().splitlines()) <= 1000


@pytest.mark.parametrize('path', ['structure.py', 'convert.py'] + sorted(glob.glob('kernels/*.py', root_dir=ROOT)))
def test_what_model_py_builds_on_never_imports_it(path):
    assert 'model' not in imported(path), f"{path} imports model.py (the layout would close an import circle)"


def test_imports_point_one_way():
    """model.py builds on structure, kernels and convert only; those three on nothing above them."""
    assert imported('model.py') <= {'structure', 'kernels', 'convert'}
    assert imported('structure.py') <= {'kernels'}
    assert imported('convert.py') == set()
    for path in glob.glob('kernels/*.py', root_dir=ROOT):
        assert imported(path) <= {'kernels'}, path


@pytest.mark.parametrize('path', LIBRARY)
def test_no_library_function_over_80_lines(path):
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree(path))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert long == [], f"{path}: {long}"


@pytest.mark.parametrize('path', LIBRARY)
def test_no_private_names_of_other_modules(path):
    """`other._name` for a repo module `other`: a helper another file needs is public where it lives."""
    used = [(n.value.id, n.attr, n.lineno) for n in ast.walk(tree(path)) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in MODULES | {'ev', 'kattn'}
            and n.attr.startswith('_') and not n.attr.startswith('__')]
    assert used == [], f"{path}: {used}"


def test_one_name_one_meaning():
    """No top-level name is defined in two library files (a reader meets `to_uint8` or `load` once); `main` is every
    entry point's, `attention` each attention implementation's in kernels/."""
    where = {}
    for path in LIBRARY:
        for node in tree(path).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, 'targets', []) if isinstance(t, ast.Name)]
            for name in names:
                where.setdefault(name, set()).add(path)
    twice = {n: sorted(p) for n, p in where.items() if len(p) > 1 and n not in ('main', '_')
             and not (n == 'attention' and all(f.startswith('kernels/') for f in p))}
    assert twice == {}
