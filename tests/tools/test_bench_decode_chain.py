"""bench/decode_chain.py's chain runs at smoke shapes on CPU (the ops' reference paths), with the absorbed
sparse-MLA decode in each layer (--attention) and without: a renamed op argument or a shape slip would
otherwise surface only on the GPU."""

import importlib.util
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("argv", [["--smoke"], ["--smoke", "--attention"]], ids=["plain", "attention"])
def test_chain_runs_at_smoke_shapes(monkeypatch, capsys, argv):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_decode_chain", BENCH / "decode_chain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(argv) == {}
    out = capsys.readouterr().out
    assert '"smoke": true' in out and f'"attention": {str("--attention" in argv).lower()}' in out
