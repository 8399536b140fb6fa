"""Skip marks shared by the kernel tests."""

import importlib.util

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not importable: Triton path untestable")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
