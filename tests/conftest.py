"""Shared fixtures. The helper modules beside this file (tiny_models, dsa_styles, engine_rules, marks) are
imported by tests in every subfolder, so this folder goes on sys.path."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Scalar C++ for Inductor's CPU kernels: its vectorisation analysis (sympy simplification per index) was
# about half of a tiny model's CPU compile (the suite takes ~10 % less). The tests check our passes and
# ops, which Inductor's CPU vector code does not touch; IC_TEST_CPU_VECTORS=1 keeps it.
if os.environ.get("IC_TEST_CPU_VECTORS") != "1":
    torch._inductor.config.cpp.simdlen = 1


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no recompile limits or cached guards across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast, and far faster when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
