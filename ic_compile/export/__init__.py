"""Exporters of a rewritten model: ONNX (`export_onnx`) and TensorRT (`compile_tensorrt`, `export_tensorrt`)."""

from .onnx import ExportError, export_onnx

__all__ = ["ExportError", "export_onnx"]
