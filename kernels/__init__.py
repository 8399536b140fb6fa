"""ic-compile kernels: Triton kernels with pure-torch references, registered as torch.library ops.

    from ic_compile.kernels.indexer_topk import indexer_topk                 # python API
    from ic_compile.kernels.sparse_attention import sparse_attention, sparse_mla
    from ic_compile.kernels.reference import indexer_topk_ref, ...           # pure torch
    import ic_compile.kernels.ops                                            # torch.ops.ic.*

Each public function takes ``use_triton: bool | None`` (None: Triton on CUDA, reference
elsewhere; True on CPU tensors runs the Triton interpreter). Importing never requires triton.
(Functions are not re-exported here: they share their modules' names.)
"""
