"""Small Triton kernels, each with its pure-torch reference, tests and benchmark: see attention.py."""
