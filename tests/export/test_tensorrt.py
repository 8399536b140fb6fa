"""TensorRT: the limit checks run for real (they need no TensorRT); building an engine needs NVIDIA's
runtime, which cannot be installed on the CPU CI machine, so that test is skipped with the reason."""

import pytest
import torch

from ic_compile.export.program import capture_rewritten
from ic_compile import dsa_model
from ic_compile.rewrite import NoIndexerFoundError
from ic_compile.export.tensorrt import (MAX_VOLUME, TOPK_MAX_K, TensorRTLimitError, TensorRTUnavailableError,
                                 check_tensorrt_limits, export_tensorrt, require_tensorrt)
from tiny_models import random_ids

NO_TENSORRT = ("TensorRT runtime not installable here: the PyPI tensorrt/torch-tensorrt packages are stubs "
               "that need NVIDIA's runtime and a CUDA GPU")


def reference_model(**overrides):
    dsa = dsa_model
    return dsa.init_weights(dsa.Transformer(dsa.ModelArgs.tiny(**overrides)), 0).eval()


@pytest.fixture(scope="module")
def program():
    torch._dynamo.reset()
    return capture_rewritten(reference_model(), {"idx": random_ids(batch=1, seq=16, vocab=256)}, "FSSF")


def test_topk_k_above_3840_names_the_number_and_layer(program):
    with pytest.raises(TensorRTLimitError, match=r"layer 0 \(layers\.0\.attn\.indexer\): TopK k=4096 exceeds "
                                                 r"TensorRT's limit k <= 3840"):
        check_tensorrt_limits(program.result.gm, index_topk=4096, max_seq_len=8192)
    # the same model is fine when sequences never exceed 3840 keys (k = min(index_topk, L))
    report = check_tensorrt_limits(program.result.gm, index_topk=4096, max_seq_len=TOPK_MAX_K)
    assert [t.k for t in report.topk if t.indexer] == [TOPK_MAX_K, TOPK_MAX_K]


def test_checks_see_only_the_f_layers_after_the_rewrite(program):
    report = check_tensorrt_limits(program.result.gm, index_topk=8, max_seq_len=256)
    assert [(t.layer, t.k) for t in report.topk if t.indexer] == [(0, 8), (3, 8)]  # S layers 1, 2: no TopK
    assert sum(not t.indexer for t in report.topk) == 3  # MoE routers (layers 1-3), k = 2
    assert all(t.k == 2 for t in report.topk if not t.indexer)


def test_dense_score_volume_limit(program):
    with pytest.raises(TensorRTLimitError, match=r"layer 0 .* \[1, 65536, 65536\] has 4294967296 elements at "
                                                 r"sequence length 65536; TensorRT tensors hold at most 2\^31-1"):
        check_tensorrt_limits(program.result.gm, index_topk=8, max_seq_len=65536)
    assert 1 * 46340 ** 2 <= MAX_VOLUME  # ~46K tokens is the largest dense [1, L, L] score


def test_export_checks_limits_before_needing_tensorrt(tmp_path):
    model = reference_model(index_topk=4096)
    with pytest.raises(TensorRTLimitError, match="TopK k=4096 exceeds TensorRT's limit k <= 3840"):
        export_tensorrt(model, {"idx": random_ids(batch=1, seq=16, vocab=256)}, tmp_path / "m.ep", plan="FSFS",
                        max_seq_len=8192)


def test_backend_lowering_checks_limits():
    """lowering='tensorrt' on a graph whose indexer selects 4000 keys: refused before TensorRT is needed
    (Dynamo traces with fake tensors, so nothing of size 4000² is computed)."""
    model = reference_model(index_topk=4096)
    compiled = torch.compile(model, backend="indexcache", options={"plan": "FSFS", "lowering": "tensorrt"})
    with pytest.raises(Exception, match=r"layer 0 .*TopK k=4000 exceeds TensorRT's limit k <= 3840"):
        compiled(random_ids(batch=1, seq=4000, vocab=256))


def test_model_without_indexer_is_a_clear_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    with pytest.raises(NoIndexerFoundError, match="TensorRT export: cannot export with plan 'F'.*no lightning "
                                                  "indexer found"):
        export_tensorrt(model, torch.randint(0, 10, (1, 6)), tmp_path / "m.ep", plan="F")


def test_missing_tensorrt_is_a_clear_error():
    try:
        import tensorrt  # noqa: F401
        import torch_tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except Exception:
        pass
    with pytest.raises(TensorRTUnavailableError, match=r"lowering='tensorrt' needs TensorRT and torch-tensorrt"):
        require_tensorrt()


def test_build_engine_and_compare(tmp_path):
    """Only where TensorRT exists (never on the CPU CI): build, save, run, compare with PyTorch."""
    pytest.importorskip("tensorrt", reason=NO_TENSORRT)
    torch_tensorrt = pytest.importorskip("torch_tensorrt", reason=NO_TENSORRT)
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    model = reference_model().cuda()
    ids = random_ids(batch=1, seq=32, vocab=256).cuda()
    report = export_tensorrt(model, {"idx": ids}, tmp_path / "m.ep", plan="FSSF", max_seq_len=256)
    assert report.engine_built
    loaded = torch_tensorrt.load(str(tmp_path / "m.ep")).module()
    with torch.no_grad():
        want = reference_model(index_topk_pattern="FSSF").cuda()(ids)
        got = loaded(ids)[0]
    assert (got - want).abs().max().item() < 1e-3


def test_export_errors_derive_from_the_project_base_and_their_builtin():
    """`except IndexCacheError` catches every exporter error; the old builtin except clauses still work."""
    from ic_compile.errors import IndexCacheError
    from ic_compile.export import ExportError
    from ic_compile.tools.models import ModelSpecError
    for error, builtin in ((ExportError, ValueError), (ModelSpecError, ValueError),
                           (TensorRTUnavailableError, RuntimeError), (TensorRTLimitError, ValueError)):
        assert issubclass(error, IndexCacheError) and issubclass(error, builtin), error
