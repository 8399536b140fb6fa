"""`ic export`: the rewritten model as ONNX (ic_compile.export.onnx) or as a TensorRT engine
(ic_compile.export.tensorrt)."""

from __future__ import annotations

from ..export.onnx import ONNX_STAGES, export_onnx
from ..export.program import quiet_third_party
from ..outputs import output_file
from ..tools.models import load_model
from .arguments import add_model_arguments, example_ids, examples, forward_inputs, print_json
from .progress import Stages

FORMATS = ("onnx", "tensorrt")


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export the rewritten model (S indexers removed) to ONNX or TensorRT",
        description="Export the model rewritten for --plan: S-layer indexers are absent, custom ops are "
                    "decomposed into standard ONNX ops, the sequence axis is dynamic. Takes 20-100 s on CPU.",
        epilog=examples("ic export --model dsa:tiny --plan FSSF --seq 24 --out dsa_fssf.onnx",
                        "ic export --model hf-tiny:glm_moe_dsa --plan plan.json --out glm.onnx --json",
                        "ic export --model ckpt:runs/small --plan FSSSFS --format tensorrt --out small.ep"))
    add_model_arguments(parser)
    parser.add_argument("--plan", default=None, help="pattern (FSSF...), plan.json, or omit for all F")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="onnx, or a TensorRT engine")
    parser.add_argument("--out", required=True,
                        help="output file (model.onnx / model.ep); checked before the export starts")
    parser.add_argument("--static-seq", action="store_true", help="no dynamic sequence axis")
    parser.add_argument("--kernels", action="store_true",
                        help="ONNX: lower F indexers to ic::indexer_topk first (exported in standard ops)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    output_file(args.out)  # before the 20-100 s of work
    names = ["load model"] + (ONNX_STAGES if args.format == "onnx" else ["capture, rewrite, build engine"])
    with Stages(names, f"ic export ({args.format})") as stages:
        with stages.step("load model"):
            model = load_model(args.model, args.seed)
            inputs = forward_inputs(model, example_ids(model, args))
        if args.format == "onnx":
            result = export_onnx(model, inputs, args.out, plan=args.plan, dynamic_seq=not args.static_seq,
                                 kernels=args.kernels, progress=stages)
        else:
            from ..export.tensorrt import export_tensorrt
            with stages.step("capture, rewrite, build engine"), quiet_third_party():
                result = export_tensorrt(model, inputs, args.out, plan=args.plan, dynamic_seq=not args.static_seq)
    print_json(result.to_dict()) if args.json else print(result)
    return 0
