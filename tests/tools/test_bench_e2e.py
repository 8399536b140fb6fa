"""bench/e2e.py's A/B switches reach the passes' private knobs (a renamed knob would otherwise surface
only on the GPU, after minutes of model building): each --without feature turns its pass off and the
next variant turns it back on."""

import importlib.util
import pathlib

import pytest

from ic_compile import backend
from ic_compile.kernels import _triton_utils
from ic_compile.passes import fold_moe_route, fold_rms_norm, lower_decode_linears, realize_rotary_table

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def e2e(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module.switch()


def _state() -> dict:
    return {"lone_linears": lower_decode_linears._LONE_MAX_BYTES > 0,
            "rotary_table": realize_rotary_table._realize_op() is not None, "rms_norm_prologue": fold_rms_norm._FOLDS,
            "norm_side_outputs": fold_rms_norm._SIDE_OUTPUTS, "route_in_experts": fold_moe_route._FOLDS,
            "kernel_pdl": _triton_utils._PDL, "inductor_pdl": backend._INDUCTOR_PDL,
            "pdl_prefetch": _triton_utils._PDL_PREFETCH, "combo_kernels": backend._INDUCTOR_COMBO}


DEFAULTS = {"lone_linears": True, "rotary_table": True, "rms_norm_prologue": True, "norm_side_outputs": True,
            "route_in_experts": True, "kernel_pdl": False, "inductor_pdl": False, "pdl_prefetch": True,
            "combo_kernels": False}


@pytest.mark.parametrize("without,with_,changed", [
    ("lone_linears", None, {"lone_linears": False}),
    ("rotary_table", None, {"rotary_table": False}),
    ("rms_norm_prologue", None, {"rms_norm_prologue": False}),
    ("norm_side_outputs", None, {"norm_side_outputs": False}),
    ("route_in_experts", None, {"route_in_experts": False}),
    (None, "pdl", {"kernel_pdl": True, "inductor_pdl": True}),
    (None, "kernel_pdl", {"kernel_pdl": True}),
    (None, "kernel_pdl_no_prefetch", {"kernel_pdl": True, "pdl_prefetch": False}),
    (None, "combo_kernels", {"combo_kernels": True}),
])
def test_switches_each_feature_off_or_on_and_back(e2e, without, with_, changed):
    assert _state() == DEFAULTS
    e2e.switch(without=without, with_=with_)
    assert _state() == {**DEFAULTS, **changed}
    e2e.switch()
    assert _state() == DEFAULTS
    assert set(e2e.FEATURES) == {"lone_linears", "rotary_table", "rms_norm_prologue", "norm_side_outputs",
                                 "route_in_experts"}
    assert set(e2e.OFF_FEATURES) == {"pdl", "kernel_pdl", "kernel_pdl_no_prefetch", "combo_kernels"}
