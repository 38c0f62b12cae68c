"""Runs every test of kernels/test_attention.py (Triton attention vs its reference; on CPU under the Triton
interpreter) as part of `python -m pytest -q tests`: the star import brings each test_* function, so a new
kernel test is collected here without a hand-kept list."""
from kernels.test_attention import *  # noqa: F401,F403
