"""Benchmark: atlas-scale embedding (`scgpt_hf.atlas.embed_to_store`) into a zarr store, CPU.

Real cells: scirpy's Wu et al. 2020 T cells (200, raw counts) tiled to the sizes asked for (each copy of a
cell gets its own id); a random model over their genes. Reported:

1. throughput, same cells (`--cells`, default 2,000) and a small model (hidden 128, 4 layers, 4 heads,
   `--max-length` 1,200 tokens): cells/s and peak RSS per process for each source kind (.h5ad, zarr,
   TileDB-SOMA) in one process, .h5ad in two processes (torchrun, gloo), and the same cells through
   `TritonClient.embed` against a local `scgpt-hf serve`-style server (`TritonServer.for_model`, CPU,
   PyTorch encoder), with the client's and the server's peak RSS;
2. bounded memory: peak RSS of one process embedding 20,000 and 200,000 tiled cells from each source kind
   (.h5ad, zarr, TileDB-SOMA; `--memory-kinds`) with a tiny model (hidden 32, 2 layers, 64 tokens, so that
   200,000 cells take minutes, not days); the issue's bound is at most 10% growth.

Each run is a child process (`--worker`), which resets its peak-RSS counter (/proc/self/clear_refs)
after its imports and reads VmHWM at the end, so "peak RSS" covers model loading and the run. Wall time
is the embed_to_store call (model loading included), CPU time is the process's user + system time.

    python bench/atlas_embed.py [--cells 2000] [--memory-cells 20000,200000] [--memory-kinds h5ad,zarr,soma]
                                [--skip-triton] [--skip-memory] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from embed_vs_original import _reset_peak, _rss_kib  # noqa: E402 - the peak-RSS counter, as that bench reads it

SMALL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
#: Chunks of the tiled .h5ad and zarr inputs, the same at every size as in an atlas: per-cell arrays (obs index,
#: indptr) in rows, data and indices in entries. anndata's defaults make a zarr's obs index and indptr one chunk
#: up to about 250,000 cells, which each read of a few rows decodes whole: +10% peak RSS from 20,000 to 200,000.
ROW_CHUNK, ENTRY_CHUNK = 16_384, 1 << 20


# ----------------------------------------------------------------------------------------------
# Children


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(args: argparse.Namespace) -> None:
    """One measured run: embed_to_store (kind 'store') or TritonClient.embed (kind 'triton')."""
    warnings.simplefilter("ignore")
    import scgpt_hf.atlas  # noqa: F401 - imports before the peak is reset
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    reset = _reset_peak()
    before, cpu0, started = _rss_kib("VmRSS"), _cpu_s(), time.perf_counter()
    extra = {}
    if args.worker == "store":
        from scgpt_hf.atlas import embed_to_store

        embed_to_store(args.inputs, args.output, args.model, max_length=args.max_length, chunk_size=args.chunk_size,
                       progress=False, overwrite=True)
    else:
        extra = _triton_embed(args)
    wall = time.perf_counter() - started
    rank = os.environ.get("RANK", "0")
    result = {"wall_s": wall, "cpu_s": _cpu_s() - cpu0, "rss_before_kib": before, "peak_kib": _rss_kib("VmHWM"),
              "peak_reset": reset, "threads": torch.get_num_threads(), **extra}
    Path(f"{args.report}.{rank}.json").write_text(json.dumps(result))


def _triton_embed(args: argparse.Namespace) -> dict:
    """The cells through a local server's PyTorch encoder: the client's time, and the server's peak RSS."""
    import anndata

    from scgpt_hf.serving import TritonClient, TritonServer

    with TritonServer.for_model(args.model, device="cpu", max_tokens=4096) as server:
        adata = anndata.read_h5ad(args.inputs[0], backed="r")
        started = time.perf_counter()
        TritonClient(server.grpc_url, "grpc", timeout=600).embed(adata, concurrency=2)
        client_s = time.perf_counter() - started
        server_peak = 0
        for pid in server.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    server_peak += next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
            except OSError:
                pass
    return {"embed_s": client_s, "server_peak_kib": server_peak}


# ----------------------------------------------------------------------------------------------
# Data and models


def _model(folder: Path, genes: list[str], size: dict, max_length: int) -> Path:
    """A random model over `genes`; its tokenizer cuts cells at `max_length` (what a server built from it uses)."""
    import reference
    import torch

    from scgpt_hf import ScGPTConfig, ScGPTModel
    from scgpt_hf.pretraining import make_tokenizer

    tokenizer = make_tokenizer(reference.make_vocab(len(genes), genes), max_length=max_length)
    torch.manual_seed(0)
    config = ScGPTConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         cls_token_id=tokenizer.cls_token_id, eoc_token_id=tokenizer.convert_tokens_to_ids("<eoc>"), **size)
    ScGPTModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiled_ids(base, n_cells: int) -> np.ndarray:
    reps = -(-n_cells // base.n_obs)
    return np.asarray([f"{name}-{k}" for k in range(reps) for name in base.obs_names][:n_cells], dtype=object)


def write_tiled(base, n_cells: int, path: Path) -> Path:
    """`base`'s cells repeated to `n_cells` rows, written as CSR to an .h5ad file or a zarr store (by the
    suffix) one copy at a time, never holding the tiled matrix; chunked by `ROW_CHUNK` and `ENTRY_CHUNK`."""
    import pandas as pd
    from anndata.io import write_elem

    matrix = base.X.tocsr()
    if path.suffix == ".zarr":
        import zarr

        root = zarr.open_group(str(path), mode="w", zarr_format=2)
        make = lambda group, name, shape, dtype, chunk: group.create_array(  # noqa: E731
            name, shape=shape, dtype=dtype, chunks=(min(shape[0], chunk),))
    else:
        import h5py

        root = h5py.File(path, "w")
        make = lambda group, name, shape, dtype, chunk: group.create_dataset(  # noqa: E731
            name, shape=shape, dtype=dtype, chunks=(min(shape[0], chunk),))
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    write_elem(root, "obs", pd.DataFrame(index=pd.Index(_tiled_ids(base, n_cells))),
               dataset_kwargs={"chunks": (min(n_cells, ROW_CHUNK),)})
    write_elem(root, "var", pd.DataFrame(index=base.var_names))
    lengths = np.tile(np.diff(matrix.indptr), -(-n_cells // base.n_obs))[:n_cells]
    indptr = np.concatenate(([0], np.cumsum(lengths)))
    group = root.create_group("X")
    group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": [n_cells, base.n_vars]})
    make(group, "indptr", indptr.shape, np.int64, ROW_CHUNK)[:] = indptr
    data = make(group, "data", (int(indptr[-1]),), np.float32, ENTRY_CHUNK)
    indices = make(group, "indices", (int(indptr[-1]),), np.int32, ENTRY_CHUNK)
    for first in range(0, n_cells, base.n_obs):
        rows = min(base.n_obs, n_cells - first)
        lo, hi = int(indptr[first]), int(indptr[first + rows])
        data[lo:hi] = matrix.data[: matrix.indptr[rows]]
        indices[lo:hi] = matrix.indices[: matrix.indptr[rows]]
    if hasattr(root, "close"):
        root.close()
    return path


def write_soma(base, n_cells: int, uri: Path, copies: int = 50) -> Path:
    """`base`'s cells repeated to `n_cells` rows as a TileDB-SOMA experiment (measurement RNA, X layer raw,
    var column feature_name): `tiledbsoma.io` writes obs, var and an empty X, whose rows are then written
    `copies` copies of `base` at a time (one fragment each), never holding the tiled matrix (200,000 cells
    would be about 4 GB as SOMA's coordinates)."""
    import anndata
    import pyarrow as pa
    import scipy.sparse as sp
    import tiledbsoma
    import tiledbsoma.io

    shutil.rmtree(uri, ignore_errors=True)  # a --workdir of an earlier run
    shell = anndata.AnnData(sp.csr_matrix((n_cells, base.n_vars), dtype=base.X.dtype), var=base.var[[]].copy())
    shell.obs_names = _tiled_ids(base, n_cells)
    shell.var["feature_name"] = shell.var_names
    tiledbsoma.io.from_anndata(str(uri), shell, measurement_name="RNA", X_layer_name="raw")
    coo = base.X.tocoo()
    with tiledbsoma.Experiment.open(str(uri), "w") as exp:
        x = exp.ms["RNA"].X["raw"]
        for first in range(0, n_cells, base.n_obs * copies):
            offsets = np.arange(first, min(n_cells, first + base.n_obs * copies), base.n_obs)
            rows = (offsets[:, None] + coo.row).ravel()
            keep = rows < n_cells  # the last copy may be cut
            cols, values = np.tile(coo.col.astype(np.int64), len(offsets)), np.tile(coo.data, len(offsets))
            x.write(pa.table({"soma_dim_0": rows[keep], "soma_dim_1": cols[keep], "soma_data": values[keep]}))
    return uri


def write_input(base, kind: str, n_cells: int, work: Path) -> Path:
    """The tiled cells as an input of `kind` ('h5ad', 'zarr' or 'soma') in `work`."""
    path = work / f"cells_{n_cells}.{kind}"
    return write_soma(base, n_cells, path) if kind == "soma" else write_tiled(base, n_cells, path)


# ----------------------------------------------------------------------------------------------
# Parent


def _run(kind: str, inputs: list[Path], output: Path, model: Path, max_length: int, chunk_size: int, processes: int,
         work: Path) -> dict:
    report = work / f"report_{output.stem}"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 \
        else []
    command = [sys.executable, *launcher, __file__, "--worker", kind, "--model", str(model), "--output", str(output),
               "--max-length", str(max_length), "--chunk-size", str(chunk_size), "--report", str(report),
               *map(str, inputs)]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(
        max(1, len(os.sched_getaffinity(0)) // processes))})
    ranks = [json.loads(Path(f"{report}.{r}.json").read_text()) for r in range(processes)]
    return {"ranks": ranks, "command_s": time.perf_counter() - started}


def _line(label: str, n_cells: int, result: dict) -> str:
    ranks = result["ranks"]
    wall = max(r.get("embed_s", r["wall_s"]) for r in ranks)
    peaks = ", ".join(f"{r['peak_kib'] / 1024:.0f}" for r in ranks)
    server = f"; server peak RSS {ranks[0]['server_peak_kib'] / 1024:.0f} MiB" if "server_peak_kib" in ranks[0] else ""
    whose = " of the client" if server else ""
    return (f"{label:<34} {n_cells / wall:8.1f} cells/s ({wall:6.1f} s; {n_cells / sum(r['cpu_s'] for r in ranks):.1f} "
            f"cells per CPU-second{whose}); peak RSS per process {peaks} MiB{server}")


def _environment() -> str:
    import torch

    from scgpt_hf.export.selfcheck import cpu_features

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"environment: {cpu}; CPU features {', '.join(cpu_features()) or 'none'} (torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}); {len(os.sched_getaffinity(0))} usable cores; torch "
            f"{torch.__version__}; python {platform.python_version()}; load average {os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=2000, help="cells for the throughput runs")
    parser.add_argument("--max-length", type=int, default=1200, help="tokens per cell for the throughput runs")
    parser.add_argument("--memory-cells", default="20000,200000", help="cell counts for the bounded-memory runs")
    parser.add_argument("--memory-kinds", default="h5ad,zarr,soma", help="source kinds for the bounded-memory runs")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--workdir", help="keep data, models and stores here (default: a temporary folder)")
    parser.add_argument("--worker", choices=["store", "triton"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=128,
                        help="cells per chunk in the throughput runs (the memory runs use the default, 4096)")
    parser.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="scgpt_atlas_bench_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        bench(args, work)


def bench(args: argparse.Namespace, work: Path) -> None:
    import anndata

    import reference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = anndata.read_h5ad(reference.wu2020_path())
    genes = base.var_names.tolist()
    print(_environment())
    print(f"cells: wu2020 T cells (200, raw counts, median {int(np.median(np.diff(base.X.tocsr().indptr)))} expressed "
          "genes) tiled; random weights over their genes")
    if not args.skip_throughput:
        model = _model(work / "model_small", genes, SMALL, args.max_length)
        n = args.cells
        inputs = {kind: write_input(base, kind, n, work) for kind in ("h5ad", "zarr", "soma")}
        print(f"throughput: {n} cells, hidden 128 x 4 layers, max_length {args.max_length}, chunks of "
              f"{args.chunk_size} cells")
        for kind, path in inputs.items():
            result = _run("store", [path], work / f"out_{kind}_1.zarr", model, args.max_length, args.chunk_size, 1,
                          work)
            print(_line(f"{kind}, 1 process", n, result), flush=True)
        result = _run("store", [inputs["h5ad"]], work / "out_h5ad_2.zarr", model, args.max_length, args.chunk_size, 2,
                      work)
        print(_line("h5ad, 2 processes (torchrun, gloo)", n, result), flush=True)
        if not args.skip_triton:
            result = _run("triton", [inputs["h5ad"]], work / "out_triton.zarr", model, args.max_length,
                          args.chunk_size, 1, work)
            print(_line("TritonClient -> local server (CPU)", n, result), flush=True)
    if not args.skip_memory:
        tiny = _model(work / "model_tiny", genes, TINY, 64)
        counts = sorted(int(c) for c in args.memory_cells.split(","))
        growths = {}
        for kind in args.memory_kinds.split(","):
            peaks = {}
            for n in counts:
                path = write_input(base, kind, n, work)
                result = _run("store", [path], work / f"out_memory_{kind}_{n}.zarr", tiny, 64, 4096, 1, work)
                peaks[n] = result["ranks"][0]["peak_kib"]
                print(_line(f"memory: {kind} {n} cells, tiny model", n, result), flush=True)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            growths[kind] = peaks[counts[-1]] / peaks[counts[0]] - 1
            print(f"{kind}: peak RSS {peaks[counts[0]] / 1024:.0f} MiB at {counts[0]:,} cells, "
                  f"{peaks[counts[-1]] / 1024:.0f} MiB at {counts[-1]:,} cells: {growths[kind]:+.1%}", flush=True)
        worst = max(growths, key=growths.get)
        print(f"largest growth {growths[worst]:+.1%} ({worst}): {'within' if growths[worst] <= 0.10 else 'OVER'} "
              "the 10% bound")


if __name__ == "__main__":
    main()
