"""`scgpt-hf export onnx MODEL OUTPUT_DIR ...`: the command-line face of `scgpt_hf.export.export_onnx`.

The main CLI calls :func:`add_parser` with its subparsers; the handler is stored as ``func`` on the parsed
namespace and returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `export` (subcommands `onnx` and `triton`) on the main CLI's subparsers; returns its parser."""
    from .onnx_export import DEFAULT_VALIDATION_SHAPES, PRECISIONS, TASKS

    export = subparsers.add_parser("export", help="export a model for serving (ONNX, Triton model repository)",
                                   description="Export scGPT models for serving.")
    targets = export.add_subparsers(dest="export_format", metavar="FORMAT")
    targets.required = True
    tasks = "; ".join(f"{name}: {spec.description}" for name, spec in TASKS.items())
    onnx = targets.add_parser(
        "onnx",
        help="export to a validated, optimised ONNX graph (dynamic batch and sequence)",
        description=(
            "Export an scGPT model to OUTPUT_DIR/model.onnx with dynamic batch and sequence axes, fuse attention "
            "and layer norms for ONNX Runtime, convert precision, validate against PyTorch on real cells and "
            "write export_report.json beside it. Exits 1 if validation fails. Tasks: " + tasks
        ),
    )
    onnx.add_argument("model", metavar="MODEL", help="local model folder or Hub id (from_pretrained)")
    onnx.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder for model.onnx and export_report.json")
    onnx.add_argument("--task", default="embedding", choices=sorted(TASKS), help="what to export (default: embedding)")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 18 (default: 18)")
    onnx.add_argument("--precision", default="fp32", choices=PRECISIONS,
                      help="fp32; fp16 for CUDA hosts; int8 (dynamic quantisation) for CPU hosts (default: fp32)")
    onnx.add_argument("--no-validate", dest="validate", action="store_false",
                      help="skip the PyTorch vs ONNX Runtime comparison (not recommended)")
    onnx.add_argument("--no-optimize", dest="optimize", action="store_false",
                      help="skip attention / layer-norm fusion (slow on CPU; for debugging)")
    onnx.add_argument("--validation-shape", dest="validation_shapes", action="append", metavar="BATCHxLEN",
                      help="validation case as BATCHxLEN (LEN 0 = the cells' own lengths); repeatable (default: "
                           + ", ".join(f"{b}x{n or 0}" for b, n in DEFAULT_VALIDATION_SHAPES) + ")")
    onnx.add_argument("--provider", dest="providers", action="append", metavar="NAME",
                      help="ONNX Runtime execution provider for validation, repeatable (default: CPUExecutionProvider)")
    onnx.add_argument("--seed", type=int, default=0, help="seed for picking and tokenising validation cells")
    onnx.add_argument("--quiet", action="store_true", help="print only the output path")
    onnx.set_defaults(func=run_export_onnx)
    from .triton import add_parser as add_triton_parser

    add_triton_parser(targets)
    return export


def _parse_shape(text: str) -> tuple[int, int | None]:
    try:
        batch, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"validation shape {text!r} must look like 4x128 (BATCHxLEN)") from None
    if batch < 1 or length < 0:
        raise argparse.ArgumentTypeError(f"validation shape {text!r}: batch >= 1 and LEN >= 0 required")
    return batch, (length or None)


def run_export_onnx(args: argparse.Namespace) -> int:
    """Handler of `scgpt-hf export onnx`: runs `export_onnx` and returns 0, or 1 when validation fails."""
    from .onnx_export import DEFAULT_VALIDATION_SHAPES, ExportValidationError, export_onnx

    try:
        shapes = [_parse_shape(s) for s in args.validation_shapes] if args.validation_shapes else DEFAULT_VALIDATION_SHAPES
    except argparse.ArgumentTypeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        report = export_onnx(
            args.model, args.output_dir, task=args.task, opset=args.opset, precision=args.precision,
            validate=args.validate, optimize=args.optimize, validation_shapes=shapes, providers=args.providers,
            seed=args.seed, verbose=not args.quiet,
        )
    except ExportValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, NotImplementedError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.quiet:
        print(report.model_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m scgpt_hf.export.cli onnx ...`) until the main CLI wires `add_parser` in."""
    parser = argparse.ArgumentParser(prog="scgpt-hf")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv if argv is None or argv[:1] == ["export"] else ["export", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
