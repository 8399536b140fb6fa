"""bench/e2e.py's A/B switches reach the passes' private knobs (a renamed knob would otherwise surface
only on the GPU, after minutes of model building): each --without feature turns its pass off and the
next variant turns it back on."""

import importlib.util
import pathlib

import pytest

from ic_compile.passes import lower_decode_linears, realize_rotary_table

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def e2e(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module.switch_off(None)


def test_without_switches_each_feature_off_and_back_on(e2e):
    on_bytes = lower_decode_linears._LONE_MAX_BYTES
    assert on_bytes > 0 and realize_rotary_table._realize_op() is not None
    e2e.switch_off("lone_linears")
    assert lower_decode_linears._LONE_MAX_BYTES == 0 and realize_rotary_table._realize_op() is not None
    e2e.switch_off("rotary_table")
    assert lower_decode_linears._LONE_MAX_BYTES == on_bytes and realize_rotary_table._realize_op() is None
    e2e.switch_off(None)
    assert lower_decode_linears._LONE_MAX_BYTES == on_bytes and realize_rotary_table._realize_op() is not None
    assert set(e2e.FEATURES) == {"lone_linears", "rotary_table"}
