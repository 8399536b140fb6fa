"""TensorRT lowering through torch-tensorrt's dynamo path (needs TensorRT; not installable here)."""

from __future__ import annotations


class TensorRTUnavailableError(RuntimeError):
    pass


def require_tensorrt():
    try:
        import torch_tensorrt  # noqa: F401
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or the PyPI stub failing to fetch from NVIDIA's index
        raise TensorRTUnavailableError(
            "lowering='tensorrt' needs TensorRT and torch-tensorrt (pip install 'ic-compile[tensorrt]' "
            f"on a machine with NVIDIA's TensorRT runtime); import failed: {exc}") from exc
    return torch_tensorrt


def compile_tensorrt(gm, example_inputs):
    torch_tensorrt = require_tensorrt()
    return torch_tensorrt.dynamo.compile(torch_tensorrt.dynamo.trace(gm, tuple(example_inputs)),
                                         inputs=list(example_inputs))
