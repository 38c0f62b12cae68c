"""Runs kernels/test_attention.py (Triton attention vs its reference; on CPU under the Triton interpreter)
as part of `python -m pytest -q tests`."""
from kernels.test_attention import (test_auto_backend_is_reference_on_cpu, test_kernel_fp16,  # noqa: F401
                                    test_kernel_low_precision_gpu,
                                    test_kernel_matches_reference_fp32, test_reference_matches_dense_masked_sdpa,
                                    test_reference_matches_model, test_rope_is_relative,
                                    test_segment_cache_follows_cu,
                                    test_wrapper_rejects_bad_inputs)
