import os
import sys

import torch

# tests import the flat top-level files (model.py, ...) from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# without a GPU the Triton kernels run under the interpreter; triton.jit reads this when kernels/attention.py
# is imported, which may happen through model.py before tests/test_kernels.py runs
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
