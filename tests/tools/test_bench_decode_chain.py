"""bench/decode_chain.py's chain runs at smoke shapes on CPU (the ops' reference paths), with the absorbed
sparse-MLA decode and its prefetch list (--attention) and without: a renamed op argument or a shape slip
would otherwise surface only on the GPU."""

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
    assert '"smoke": true' in capsys.readouterr().out
    x = module.torch.randn(1, module.SMOKE["H"]).bfloat16()
    layers = [module.layer_weights(module.SMOKE, x.device) for _ in range(2)]
    for weights in layers:
        weights["attention"] = module.attention_inputs(module.SMOKE, x.device)
    plain, warm = (module.run_chain(x, layers, module.SMOKE, prefetch) for prefetch in (False, True))
    assert module.torch.equal(plain, warm)  # the prefetch list changes no value
