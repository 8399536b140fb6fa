"""bench/e2e.py's A/B switches reach the passes' private knobs (a renamed knob would otherwise surface
only on the GPU, after minutes of model building): each --without feature turns its pass off and the
next variant turns it back on."""

import importlib.util
import pathlib

import pytest

from ic_compile import backend
from ic_compile.kernels import _triton_utils
from ic_compile.passes import lower_decode_linears, realize_rotary_table

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def e2e(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module.switch()


def _state():
    return (lower_decode_linears._LONE_MAX_BYTES > 0, realize_rotary_table._realize_op() is not None,
            _triton_utils._PDL, backend._INDUCTOR_PDL, _triton_utils._PDL_PREFETCH)


def test_switches_each_feature_off_or_on_and_back(e2e):
    assert _state() == (True, True, False, False, True)
    e2e.switch(without="lone_linears")
    assert _state() == (False, True, False, False, True)
    e2e.switch(without="rotary_table")
    assert _state() == (True, False, False, False, True)
    e2e.switch(with_="pdl")
    assert _state() == (True, True, True, True, True)
    e2e.switch(with_="kernel_pdl")
    assert _state() == (True, True, True, False, True)
    e2e.switch(with_="kernel_pdl_no_prefetch")
    assert _state() == (True, True, True, False, False)
    e2e.switch()
    assert _state() == (True, True, False, False, True)
    assert set(e2e.FEATURES) == {"lone_linears", "rotary_table"} and set(e2e.OFF_FEATURES) == {"pdl", "kernel_pdl",
                                                                                           "kernel_pdl_no_prefetch"}
