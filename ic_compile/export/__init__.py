"""Exporters of a rewritten model: ONNX (`onnx.export_onnx`) and TensorRT (`tensorrt.export_tensorrt`, and
`tensorrt.compile_tensorrt` for the backend's lowering="tensorrt").

Imports point one way: `decompose` (custom ops in standard ops, ExportError) <- `program` (capture,
rewrite, wrap, torch.export) <- `onnx`, `tensorrt`. The exporters import the core, never the CLI.
"""

from .onnx import ExportError, export_onnx
from .tensorrt import compile_tensorrt  # registers lowering="tensorrt" with the backend

__all__ = ["ExportError", "compile_tensorrt", "export_onnx"]
