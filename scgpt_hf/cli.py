"""`scgpt-hf` command line: convert original checkpoints, embed AnnData files, pretrain, export, push, serve.

Each subcommand is a `Command`: a name, a help line, a function adding its arguments and a function running
it. Later subcommands (export onnx, export triton, push, serve, pretrain) plug in either by appending to
`COMMANDS`, or by naming a module in `PLUGIN_MODULES` that offers `add_parser(subparsers)` (registering its
subparser with `set_defaults(func=handler)`; `scgpt_hf.serving.server` does this for `serve`).

Every run builds every parser, so declaring arguments imports nothing heavy (torch, transformers, anndata):
a command's module and a plugin module import those inside the function that runs it, and names the parser
shows come from light modules (`scgpt_hf.constants`). That keeps ``scgpt-hf --help`` fast.

Failures, one mechanism for every command (plugins included): a handler raises, and `main` prints one line
on stderr, ``scgpt-hf COMMAND: error: MESSAGE``, and exits with code 2, never with a traceback. The message
of a user error (`ValueError`, `OSError`, `CommandError`: bad input, missing or unwritable files, a refusal)
names the problem and the fix, so it is printed as it is. Anything else is a bug: the line gives its type
and message and says to rerun with ``scgpt-hf --debug COMMAND ...``, which lets the exception through with
its traceback. Usage errors (arguments argparse rejects) are one line too, pointing at ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .constants import SOMA_OPTIONS

if TYPE_CHECKING:
    from .atlas import SourceOptions

EXIT_FAILURE = 2
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


class CommandError(Exception):
    """A command's failure, explained: the message names the problem and the fix (`main` prints it as is)."""


# Errors whose message is meant for the user. OSError also covers missing files and what transformers raises
# for an unknown model folder or Hub id.
USER_ERRORS: tuple[type[BaseException], ...] = (CommandError, ValueError, OSError)


def error_line(err: BaseException) -> str:
    """`err` as one line: a user error's message as it is; for anything else (a bug) its type, its message and
    how to see the traceback."""
    message = " ".join(str(err).split())
    if isinstance(err, USER_ERRORS):
        return message or type(err).__name__
    return (f"unexpected {type(err).__name__}: {message} (a bug: rerun with `scgpt-hf --debug ...` for the "
            "traceback and report it)")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line, and which records the parser of the command that ran."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_FAILURE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        namespace, extras = super().parse_known_args(args, namespace)
        if not hasattr(namespace, "_prog"):  # a subcommand's parser returns first: keep its name
            namespace._prog = self.prog
        return namespace, extras


@dataclass(frozen=True)
class Command:
    """One subcommand: `add_arguments(parser)` declares it, `run(args)` executes it and returns an exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------------------------
# Arguments shared by commands


def device_argument(text: str) -> str:
    """argparse ``type`` of ``--device``: a device name torch knows, checked before anything is read."""
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    return text


@contextlib.contextmanager
def model_argument(model: str) -> Iterator[None]:
    """Wrap the code that loads a ``--model`` argument (a model folder or a Hub id ORG/NAME).

    A local path that is not a folder is refused at once, before any compute (transformers would call it a
    malformed Hub id); weights that hold pickled objects instead of plain tensors are named, with the fix.
    """
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or path.exists():
        if path.is_file():
            raise CommandError(f"--model {model} is a file: give the folder that holds config.json and the weights.")
        if not path.is_dir():
            raise CommandError(
                f"model folder {model} does not exist: give a folder written by scgpt-hf convert or pretrain "
                "(or save_pretrained), or a Hugging Face Hub id ORG/NAME."
            )
    try:
        yield
    except pickle.UnpicklingError:
        pickled = ", ".join(sorted(p.name for p in path.glob("*.bin"))) if path.is_dir() else "a weights file"
        raise CommandError(
            f"{model}: {pickled} holds pickled Python objects, not plain tensors, and is not loaded (unpickling "
            "can run code): save the model with model.save_pretrained(folder) (safetensors), or its weights "
            "with torch.save(model.state_dict(), path)."
        ) from None


# ----------------------------------------------------------------------------------------------
# convert


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    from .constants import CONVERT_TASKS

    p.add_argument("original_dir", help="original scGPT folder: best_model.pt, args.json, vocab.json")
    p.add_argument("output_dir", help="where to write the from_pretrained-ready folder")
    p.add_argument("--nheads", type=int, help="attention heads, when args.json lacks 'nheads'")
    p.add_argument("--pre-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="the checkpoint uses pre-norm layers (default: args.json, else post-norm)")
    p.add_argument("--cell-emb-style", choices=["cls", "avg-pool", "w-pool"], help="default: args.json, else cls")
    p.add_argument("--pad-value", type=float, help="default: args.json, else -2")
    p.add_argument("--mask-value", type=float, help="default: args.json, else -1")
    p.add_argument("--n-bins", type=int, help="default: args.json, else 51")
    p.add_argument("--max-seq-len", type=int, help="default: args.json, else 1200")
    p.add_argument("--task", choices=sorted(CONVERT_TASKS),
                   help="model to build: pretraining (foundation checkpoints), annotation (fine-tuned classifier), "
                        "integration, perturbation or multiomic (fine-tuned heads); default: read from the weights "
                        "(the report says which)")
    p.add_argument("--labels", help="annotation: text file with the class names, one per line, in output order")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="do not print the conversion report")


def _convert_run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .convert import convert_original_checkpoint

    hf_logging.disable_progress_bar()  # the report says what was written

    if not Path(args.original_dir).is_dir():
        raise FileNotFoundError(f"{args.original_dir} is not a folder (expected best_model.pt, args.json, vocab.json).")
    if args.labels and not Path(args.labels).is_file():
        raise FileNotFoundError(f"--labels file {args.labels} does not exist: give a text file with one class name "
                                "per line, in the classifier's output order.")
    convert_original_checkpoint(
        args.original_dir,
        args.output_dir,
        nheads=args.nheads,
        pre_norm=args.pre_norm,
        cell_emb_style=args.cell_emb_style,
        pad_value=args.pad_value,
        mask_value=args.mask_value,
        n_bins=args.n_bins,
        max_seq_len=args.max_seq_len,
        task=args.task,
        labels=Path(args.labels).read_text().splitlines() if args.labels else None,
        overwrite=args.overwrite,
        verbose=not args.quiet,
    )
    return 0


# ----------------------------------------------------------------------------------------------
# embed


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    from .anndata_output import DEFAULT_KEY
    from .constants import INFERENCE_PRECISIONS

    p.description = (
        "Zero-shot cell embeddings. INPUT.h5ad OUTPUT.h5ad writes the input plus obsm[KEY], obs[KEY_n_genes] and "
        "uns[KEY_params]. INPUT [INPUT ...] OUTPUT.zarr reads .h5ad files, AnnData .zarr stores and TileDB-SOMA "
        "experiments (folders or URIs) backed and writes an embedding store (anndata.read_zarr: cell ids, source, "
        "obsm[KEY], obs[KEY_n_genes], uns[KEY_params]) chunk by chunk: rerun the same command to continue a killed "
        "run; under `torchrun --nproc_per_node N -m scgpt_hf.cli embed ...` the processes share the chunks."
    )
    p.add_argument("input", nargs="+", help="input .h5ad (cells x genes; raw counts or normalised/log1p values); for "
                                            "an OUTPUT.zarr store also .zarr stores and TileDB-SOMA experiments")
    p.add_argument("output", help="output .h5ad, or .zarr for an embedding store")
    p.add_argument("--model", required=True, help="converted model folder or Hugging Face Hub id")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=1200, help="tokens per cell, <cls> included")
    p.add_argument("--key-added", default=DEFAULT_KEY)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", help="read adata.layers[LAYER] instead of X")
    p.add_argument("--use-raw", action="store_true", help="read adata.raw.X instead of X")
    p.add_argument("--gene-column", help="var column with gene symbols (default: var_names)")
    p.add_argument("--batch-key", help="obs column of each cell's batch (names of the model's batch2id), for models "
                                       "trained with batch labels")
    p.add_argument("--batch-as-ids", action="store_true",
                   help="obs[--batch-key] holds the integer batch ids used in training, although the model has names")
    p.add_argument("--device", type=device_argument, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto",
                   help="autocast precision (auto: bf16 on GPUs that support it, fp16 on older ones, fp32 on CPU)")
    p.add_argument("--backed", action="store_true",
                   help="stream the input matrix from disk instead of loading it (large files; a float16 sparse X, "
                        "which scipy cannot hold, is always streamed and written out as float32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    store = _soma_arguments(p, "embedding stores (OUTPUT.zarr)")
    store.add_argument("--chunk-size", type=int, default=4096,
                       help="cells per chunk: the unit of work per process, of resumption and of the store's chunks")


def _soma_arguments(p: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """--measurement, --x-layer, --var-column and --obs-filter: what to read from TileDB-SOMA inputs."""
    group = p.add_argument_group(title)
    group.add_argument("--measurement", help="SOMA inputs: the measurement to read (default RNA)")
    group.add_argument("--x-layer", help="SOMA inputs: the X layer to read (default raw)")
    group.add_argument("--var-column", help="SOMA inputs: the var column of gene symbols (default feature_name)")
    group.add_argument("--obs-filter", help="SOMA inputs: the cells to read, as SOMA's value filter, e.g. "
                                            "\"tissue_general == 'blood'\"")
    return group


def _source_options(args: argparse.Namespace) -> SourceOptions:
    from .atlas import SourceOptions

    chosen = {name: getattr(args, name) for name in SOMA_OPTIONS if getattr(args, name) is not None}
    return SourceOptions(layer=args.layer, use_raw=args.use_raw, gene_column=args.gene_column, **chosen)


def _embed_run(args: argparse.Namespace) -> int:
    if Path(args.output).suffix == ".zarr":
        return _embed_store_run(args)
    given = [f"--{name.replace('_', '-')}" for name in SOMA_OPTIONS if getattr(args, name) is not None]
    if len(args.input) != 1 or given:
        raise ValueError(f"{' and '.join(given) or 'several inputs'}: only for an embedding store; give OUTPUT.zarr "
                         "(or one INPUT.h5ad for an OUTPUT.h5ad).")
    return _embed_h5ad_run(args)


def _embed_store_run(args: argparse.Namespace) -> int:
    import os

    from transformers.utils import logging as hf_logging

    from .atlas import embed_to_store

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.backed or args.batch_key is not None or args.batch_as_ids:
        raise ValueError("--backed, --batch-key and --batch-as-ids are for an OUTPUT.h5ad: an embedding store reads "
                         "every input backed and takes models without batch labels.")
    with model_argument(args.model):
        params = embed_to_store(
            args.input, args.output, args.model, options=_source_options(args), key_added=args.key_added,
            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, chunk_size=args.chunk_size,
            device=args.device, precision=args.precision, progress=not args.no_progress, overwrite=args.overwrite,
        )
    if int(os.environ.get("RANK", 0)) == 0:
        n_empty = params["n_cells_empty"]
        print(f"Embedded {params['n_cells']} cells of {len(args.input)} input(s) into obsm[{args.key_added!r}] of "
              f"{args.output}" + (f" ({n_empty} without vocabulary genes: NaN rows)" if n_empty else ""))
    return 0


def _embed_h5ad_run(args: argparse.Namespace) -> int:
    import anndata
    from transformers.utils import logging as hf_logging

    # Loading the backbone from a pretraining folder lists the decoder weights it skips: expected, not news.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from .atomic import atomic_output, check_writable
    from .embedding import embed

    source, target = Path(args.input[0]), Path(args.output)
    if not source.is_file():
        raise FileNotFoundError(f"input file {source} does not exist.")
    if source.resolve() == target.resolve():
        raise ValueError("output must differ from input (the input is read while the output is written).")
    if target.suffix != ".h5ad":
        raise ValueError(f"output must be an .h5ad file or a .zarr embedding store, got {target}.")
    check_writable(target, overwrite=args.overwrite, what="output file")  # before any compute
    half_sparse = _float16_sparse_x(source)  # scipy holds no float16: such an X is only ever read backed
    with model_argument(args.model):
        try:
            adata = anndata.read_h5ad(source, backed="r" if args.backed or half_sparse else None)
        except OSError as err:
            raise ValueError(f"cannot read {source} as h5ad: {err}") from None
        try:
            embed(
                adata,
                args.model,
                batch_size=args.batch_size,
                max_length=args.max_length,
                key_added=args.key_added,
                seed=args.seed,
                layer=args.layer,
                use_raw=args.use_raw,
                gene_column=args.gene_column,
                batch_key=args.batch_key,
                batch_as_ids=args.batch_as_ids,
                device=args.device,
                precision=args.precision,
                progress=not args.no_progress,
            )
            with atomic_output(target, overwrite=args.overwrite, what="output file") as staging:
                if half_sparse:
                    _write_float16_sparse_output(adata, source, staging)
                else:
                    adata.write_h5ad(staging)  # a backed matrix is copied from disk in pieces
                _check_embedded_file(staging, args.key_added, adata.n_obs)
        finally:
            if adata.isbacked:
                adata.file.close()
    n_empty = adata.uns[f"{args.key_added}_params"]["n_cells_empty"]
    print(f"Embedded {adata.n_obs} cells into obsm[{args.key_added!r}] of {target}"
          + (f" ({n_empty} without vocabulary genes: NaN rows)" if n_empty else ""))
    return 0


def _float16_sparse_x(path: Path) -> bool:
    """Whether the .h5ad at `path` stores X as a sparse matrix of float16 values (other writers leave these)."""
    import h5py
    import numpy as np

    try:
        with h5py.File(path, "r") as f:
            x = f.get("X")
            data = x.get("data") if isinstance(x, h5py.Group) else None
            return isinstance(data, h5py.Dataset) and data.dtype == np.float16
    except OSError:
        return False  # not HDF5: read_h5ad says so


def _write_float16_sparse_output(adata, source: Path, staging: Path, block: int = 1 << 24) -> None:
    """Write `source` with `adata`'s obs, obsm and uns to `staging`, its float16 sparse X as float32 (exact),
    streamed in blocks of values: anndata's writer would build a float16 scipy matrix, which scipy refuses."""
    import shutil

    import h5py
    import numpy as np
    from anndata.io import write_elem

    shutil.copyfile(source, staging)
    with h5py.File(staging, "r+") as f:
        half = f["X/data"]
        full = f["X"].create_dataset("data_float32", shape=half.shape, dtype=np.float32,
                                     chunks=True if half.chunks else None, compression=half.compression,
                                     compression_opts=half.compression_opts)
        for start in range(0, half.shape[0], block):
            full[start : start + block] = half[start : start + block].astype(np.float32)
        del f["X/data"]
        f["X"].move("data_float32", "data")
        for name, value in (("obs", adata.obs), ("obsm", dict(adata.obsm)), ("uns", dict(adata.uns))):
            write_elem(f, name, value)  # replaces the input's element


def _check_embedded_file(path: Path, key: str, n_obs: int) -> None:
    """The written file must read back with the embedding in it, or it does not replace anything."""
    import anndata

    try:
        written = anndata.read_h5ad(path, backed="r")
    except Exception as err:  # noqa: BLE001 - h5py and anndata raise many kinds
        raise CommandError(f"the written .h5ad does not read back ({type(err).__name__}: {err}); nothing was "
                           "replaced: check the disk, or report it if the disk is fine.") from None
    try:
        if key not in written.obsm or written.obsm[key].shape[0] != n_obs:
            raise CommandError(f"the written .h5ad lacks obsm[{key!r}]; nothing was replaced.")
    finally:
        written.file.close()


# ----------------------------------------------------------------------------------------------
# pretrain


def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Pretrain a small scGPT from scratch (masked expression or generative, + MVC) on .h5ad files streamed from "
        "disk, with transformers.Trainer. Multi-GPU runs unchanged under a launcher: "
        "`torchrun --nproc_per_node N -m scgpt_hf.cli pretrain ...` or `accelerate launch -m scgpt_hf.cli pretrain ...` "
        "(--batch-size is per device; each process streams its own share of the files; without CUDA the processes "
        "train together over gloo). The original's generative pretraining is `--generative --mask-ratio 0.25 0.5 0.75`."
    )
    p.add_argument("output_dir", help="folder for model + tokenizer (from_pretrained-ready) and training_metrics.json, "
                                      "written when training ends")
    p.add_argument("files", nargs="+", metavar="FILE.h5ad",
                   help="training data (raw counts or log1p values): .h5ad files, AnnData .zarr stores, TileDB-SOMA "
                        "experiments")
    p.add_argument("--vocab", help="vocab.json or tokenizer folder / Hub id (default: the genes of the files)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="transformer layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--max-length", type=int, default=1200, help="tokens per cell, <cls> included")
    p.add_argument("--mask-ratio", type=float, nargs="+", default=[0.4], metavar="RATIO",
                   help="fraction of each cell's genes masked; several values: one drawn per batch (default 0.4)")
    p.add_argument("--generative", action="store_true",
                   help="masked genes become genes to generate from the known ones (generative pretraining)")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--epochs", type=float, help="passes over the cells (instead of --max-steps)")
    p.add_argument("--batch-size", type=int, default=32, help="cells per device per step")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="rows read from a file at a time: bounds memory, and the unit of shuffling and sharding")
    p.add_argument("--layer", help="read adata.layers[LAYER] instead of X")
    p.add_argument("--use-raw", action="store_true", help="read adata.raw.X instead of X")
    p.add_argument("--gene-column", help="var column with gene symbols (default: var_names)")
    p.add_argument("--save-steps", type=int, metavar="N",
                   help="save a checkpoint every N steps in OUTPUT_DIR.checkpoints/, to resume after an interruption")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUTPUT_DIR.checkpoints/")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (default: refuse)")
    _soma_arguments(p, "TileDB-SOMA inputs")


def _pretrain_run(args: argparse.Namespace) -> int:
    import json

    import torch

    from .pretraining import METRICS_FILE, pretrain

    if args.max_steps is None and args.epochs is None:
        raise ValueError("give --max-steps or --epochs.")
    out = pretrain(
        args.files,
        args.output_dir,
        tokenizer=args.vocab,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_length=args.max_length,
        mask_ratio=args.mask_ratio[0] if len(args.mask_ratio) == 1 else args.mask_ratio,
        generative=args.generative,
        max_steps=args.max_steps,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        num_workers=args.num_workers,
        chunk_size=args.chunk_size,
        layer=args.layer,
        use_raw=args.use_raw,
        gene_column=args.gene_column,
        training_args={"save_strategy": "steps", "save_steps": args.save_steps} if args.save_steps else None,
        resume_from_checkpoint=args.resume or None,
        overwrite=args.overwrite,
        source_options=_source_options(args),
    )
    rank = 0
    if torch.distributed.is_initialized():
        # Leave the process group cleanly: a rank exiting with it open can abort at interpreter exit
        # ("terminate called without an active exception"), and torchrun then fails the whole job.
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return 0  # the main process writes the metrics and reports
    metrics = json.loads((Path(out) / METRICS_FILE).read_text())
    processes = f", {metrics['world_size']} processes" if metrics["world_size"] > 1 else ""
    print(f"Pretrained {metrics['global_step']} steps ({metrics['epochs_seen']:.2f} epochs of "
          f"{metrics['cells_in_files']} cells{processes}), final loss {metrics['final_loss']:.4g}; saved to {out}")
    return 0


COMMANDS: list[Command] = [
    Command("convert", "convert an original scGPT checkpoint folder", _convert_arguments, _convert_run),
    Command("embed", "zero-shot cell embeddings of an .h5ad file, or of many inputs into a .zarr store",
            _embed_arguments, _embed_run),
    Command("pretrain", "pretrain scGPT from scratch on .h5ad files, streamed", _pretrain_arguments, _pretrain_run),
]


# Modules with `add_parser(subparsers)`; one whose optional dependencies are missing is left out.
PLUGIN_MODULES: list[str] = ["scgpt_hf.export.cli", "scgpt_hf.hub", "scgpt_hf.serving.server"]


# ----------------------------------------------------------------------------------------------
# Entry point


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The `scgpt-hf` parser with one subparser per command (default: `COMMANDS` and the plugins)."""
    from . import __version__

    parser = _Parser(prog="scgpt-hf", description="scGPT as a Hugging Face model family.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="let errors through with their full traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS if commands is None else commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    for module_name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `scgpt-hf`; returns 0 on success. Any failure prints one line and exits with code 2 (see the module
    docstring; `--debug` shows the traceback instead), Ctrl-C exits with 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run = getattr(args, "_run", None) or args.func
        return int(run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{args._prog}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as err:  # noqa: BLE001 - every failure becomes one line (module docstring)
        if args.debug:
            raise
        print(f"{args._prog}: error: {error_line(err)}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


if __name__ == "__main__":
    # `python -m scgpt_hf.cli` runs this file as __main__, a second copy of the module: run the package's own, so
    # that CommandError raised by modules importing `scgpt_hf.cli` is the class `main` catches.
    from scgpt_hf.cli import main as package_main

    sys.exit(package_main())
