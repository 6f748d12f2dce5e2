"""`scgpt-hf export onnx MODEL OUTPUT_DIR ...`: the command-line face of `scgpt_hf.export.export_onnx`.

The main CLI (`scgpt_hf.cli`) calls :func:`add_parser` with its subparsers; the handler is stored as ``func``
on the parsed namespace. Handlers raise on failure and the main CLI prints the one-line message (exit code 2);
refusals that are not ValueError / OSError are raised as its `CommandError`.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `export` (subcommands `onnx` and `triton`) on the main CLI's subparsers; returns its parser."""
    from scgpt_hf.constants import DEFAULT_VALIDATION_SHAPES, EXPORT_PRECISIONS, EXPORT_TASKS

    export = subparsers.add_parser("export", help="export a model for serving (ONNX, Triton model repository)",
                                   description="Export scGPT models for serving.")
    targets = export.add_subparsers(dest="export_format", metavar="FORMAT")
    targets.required = True
    tasks = "; ".join(f"{name}: {description}" for name, description in EXPORT_TASKS.items())
    onnx = targets.add_parser(
        "onnx",
        help="export to a validated, optimised ONNX graph (dynamic batch and sequence)",
        description=(
            "Export an scGPT model to OUTPUT_DIR/model.onnx with dynamic batch and sequence axes, fuse attention "
            "and layer norms for ONNX Runtime, convert precision, validate against PyTorch on real cells and "
            "write export_report.json and selfcheck.npz (cells every load checks the graph on) beside it. "
            "OUTPUT_DIR is written whole or not at all; an existing one is replaced only with --overwrite. Exits "
            "2 with one line naming the problem if anything fails, validation included. Tasks: " + tasks
        ),
    )
    onnx.add_argument("model", metavar="MODEL", help="local model folder or Hub id (from_pretrained)")
    onnx.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder for model.onnx and export_report.json")
    onnx.add_argument("--task", default="embedding", choices=sorted(EXPORT_TASKS),
                      help="what to export (default: embedding)")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 18 (default: 18)")
    onnx.add_argument("--precision", default="fp32", choices=EXPORT_PRECISIONS,
                      help="fp32; fp16 for CUDA hosts; int8 (dynamic quantisation) for CPU hosts (default: fp32)")
    onnx.add_argument("--no-validate", dest="validate", action="store_false",
                      help="skip the PyTorch vs ONNX Runtime comparison (not recommended)")
    onnx.add_argument("--no-optimize", dest="optimize", action="store_false",
                      help="skip attention / layer-norm fusion (slow on CPU; for debugging)")
    onnx.add_argument("--validation-shape", dest="validation_shapes", action="append", metavar="BATCHxLEN",
                      type=_parse_shape,
                      help="validation case as BATCHxLEN (LEN 0 = the cells' own lengths); repeatable (default: "
                           + ", ".join(f"{b}x{n or 0}" for b, n in DEFAULT_VALIDATION_SHAPES) + ")")
    onnx.add_argument("--provider", dest="providers", action="append", metavar="NAME",
                      help="ONNX Runtime execution provider for validation, repeatable (default: CPUExecutionProvider)")
    onnx.add_argument("--seed", type=int, default=0, help="seed for picking and tokenising validation cells")
    onnx.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (default: refuse)")
    onnx.add_argument("--quiet", action="store_true", help="print only the output path")
    onnx.set_defaults(func=run_export_onnx)
    from .triton import add_parser as add_triton_parser

    add_triton_parser(targets)
    return export


def _parse_shape(text: str) -> tuple[int, int | None]:
    """argparse ``type`` of --validation-shape: BATCHxLEN -> (batch, length or None)."""
    try:
        batch, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"validation shape {text!r} must look like 4x128 (BATCHxLEN)") from None
    if batch < 1 or length < 0:
        raise argparse.ArgumentTypeError(f"validation shape {text!r}: batch >= 1 and LEN >= 0 required")
    return batch, (length or None)


def run_export_onnx(args: argparse.Namespace) -> int:
    """Handler of `scgpt-hf export onnx`: runs `export_onnx`; a failed validation or an unexportable model is a
    `CommandError` (one line, exit code 2)."""
    from scgpt_hf.cli import CommandError, model_argument

    from .onnx_export import DEFAULT_VALIDATION_SHAPES, ExportValidationError, export_onnx

    with model_argument(args.model):
        try:
            report = export_onnx(
                args.model, args.output_dir, task=args.task, opset=args.opset, precision=args.precision,
                validate=args.validate, optimize=args.optimize,
                validation_shapes=args.validation_shapes or DEFAULT_VALIDATION_SHAPES, providers=args.providers,
                seed=args.seed, overwrite=args.overwrite, verbose=not args.quiet,
            )
        except (ExportValidationError, NotImplementedError) as err:
            raise CommandError(str(err)) from None
    if args.quiet:
        print(report.model_path)
    return 0
