"""Host time per decode step that Dynamo's guards take, with and without torch's guard filters (CPU).

    python bench/host_guards.py --layers 47          # prints JSON rows; nothing saved

Each call of a compiled model first evaluates its guards (checks that the inputs, the modules and their
parameters are what the graph was compiled for) before the graph runs. A synchronous decode loop pays
this every token on top of the GPU's time (bench/e2e.py's `host_ms`: 1.8-2.1 ms per 47-layer step on
an H100 host, with the CUDA-graph tree's own checks). torch.compile takes a `guard_filter_fn` in
`options` (it reaches Dynamo, not the indexcache backend); torch ships filters that drop the guards
on nn.Module state - unsafe if the model's modules or parameters are replaced after compiling.

This times single-token StaticCache steps of HF GlmMoeDsa with N tiny layers (the guards' count grows
with the layers, not their width) on CPU, compiled with the indexcache backend (Inductor lowering, the
1/4 plan), per filter: ms per step (best of 5 x 40 steps) and the difference to skipping every guard,
which is what the guards cost.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

import ic_compile
from ic_compile.plan import LayerPlan

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decode import rewind  # noqa: E402  (bench/decode.py)
from regional_compile import TINY  # noqa: E402  (bench/regional_compile.py)

FILTERS = {"all_guards": None,
           "skip_guard_on_all_nn_modules_unsafe": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
           "keep_tensor_guards_unsafe": torch.compiler.keep_tensor_guards_unsafe,
           "skip_all_guards_unsafe": torch.compiler.skip_all_guards_unsafe}


def step_ms(model, cache, L: int, guard_filter, steps: int = 40) -> float:
    torch._dynamo.reset()
    options = {"plan": LayerPlan.from_freq(model.config.num_hidden_layers, 4, offset=1).pattern, "lowering": "inductor"}
    if guard_filter is not None:
        options["guard_filter_fn"] = guard_filter
    fn = torch.compile(model, backend="indexcache", options=options)
    token, position = torch.tensor([[1]]), torch.tensor([L])

    def step():
        rewind(cache, L)
        fn(token, past_key_values=cache, use_cache=True, cache_position=position)

    with torch.no_grad():
        for _ in range(3):
            step()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best = min(best, (time.perf_counter() - start) * 1e3 / steps)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=47)
    parser.add_argument("--length", type=int, default=256, help="cache length (default: %(default)s)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**TINY, num_hidden_layers=args.layers)).eval()
    cache = ic_compile.static_cache(model, 1, args.length + 8)
    times = {name: step_ms(model, cache, args.length, guard_filter) for name, guard_filter in FILTERS.items()}
    for name, ms in times.items():
        print(json.dumps({"layers": args.layers, "filter": name, "ms_per_step": round(ms, 3),
                          "guard_ms": round(ms - times["skip_all_guards_unsafe"], 3)}), flush=True)


if __name__ == "__main__":
    main()
