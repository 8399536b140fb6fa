"""Every error ic-compile raises on purpose derives from `IndexCacheError`, so a caller can catch ours
apart from torch's. Each also derives from the builtin it replaces (ValueError, RuntimeError), so code
that caught those keeps working. Messages say what is wrong and how to fix it.

    IndexCacheError
    ├── PlanError               a plan that does not fit the model (ic_compile.plan)
    │   ├── NoIndexerFoundError     a graph with no lightning indexer (ic_compile.rewrite)
    │   └── TensorRTLimitError      a graph TensorRT cannot take (ic_compile.export.tensorrt)
    ├── OptionsError            a bad torch.compile(..., options=...) value (ic_compile.backend)
    ├── TrainingInputError      distillation-loss inputs of the wrong shape or kind (ic_compile.tools.training)
    ├── VerificationError       verify=True found the rewritten graph disagreeing (ic_compile.backend)
    ├── RecompileLimitError     Dynamo would fall back to the un-rewritten model (ic_compile.frames)
    ├── IndexStoreError         an S fragment ran before its F source (ic_compile.index_store)
    ├── NotAKeyRangeError       a mask that is not one key range per query (ic_compile.kernels.key_range)
    ├── ModelSpecError          a --model SPEC that cannot be built (ic_compile.tools.models)
    ├── OutputPathError         an output path that cannot be written (ic_compile.outputs)
    ├── ExportError             an export that cannot be done (ic_compile.export.decompose; also
    │                           importable from ic_compile.export and ic_compile.export.onnx)
    └── TensorRTUnavailableError  torch-tensorrt is not installed (ic_compile.export.tensorrt)

Each class lives in the module that raises it (listed above); this module holds only the base.
"""


class IndexCacheError(Exception):
    """Base of every error ic-compile raises on purpose."""
