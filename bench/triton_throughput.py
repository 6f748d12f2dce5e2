"""Throughput and latency of an scGPT Triton repository: cells/s and p50/p99 request latency against
client concurrency and cells per request, on real cells (scirpy's wu2020, 200 T cells).

    .venv/bin/python bench/triton_throughput.py                          # triton_repo/ on a local CPU server
                                                                         # (after tests/test_triton.py regenerate)
    .venv/bin/python bench/triton_throughput.py --repository R           # another repository (started locally)
    .venv/bin/python bench/triton_throughput.py --url 127.0.0.1:8001     # a running server (e.g. a GPU container)

The local server is nvidia-pytriton's Triton (python backend; see scripts/setup_triton_server.sh). Each
(batch size, concurrency) cell runs `--requests` requests per client thread after a warm-up and
prints cells/s, request latency p50/p99, and the encoder's executions per inference from the server's
statistics (dynamic batching). Speed figures live here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from scgpt_hf.serving.contract import EMBED_MODEL, ENCODER_MODEL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _cells(url: str, protocol: str, max_genes: int | None):
    """wu2020 cells in the wire format (vocabulary ids in column order, counts), expressed cells only."""
    import anndata

    import reference
    from scgpt_hf.serving import TritonClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(reference.wu2020_path())
    ids = TritonClient(url, protocol).gene_ids([str(g) for g in adata.var_names])
    X = adata.X.tocsr()
    X.sort_indices()
    cells = []
    for r in range(X.shape[0]):
        cols = X.indices[X.indptr[r] : X.indptr[r + 1]]
        vals = X.data[X.indptr[r] : X.indptr[r + 1]]
        keep = ids[cols] >= 0
        if keep.any():
            g, c = ids[cols][keep], vals[keep].astype(np.float32)
            cells.append((g[:max_genes], c[:max_genes]) if max_genes else (g, c))
    return cells


def _request(cells, rows):
    """The cells `rows` as one request's gene_ids and counts, -1 / 0 padded."""
    from scgpt_hf.padding import pad_rows

    return (pad_rows([cells[r][0] for r in rows], -1, dtype=np.int64),
            pad_rows([cells[r][1] for r in rows], 0.0, dtype=np.float32))


def _encoder_counts(client, model: str = ENCODER_MODEL) -> tuple[int, int]:
    stats = client.statistics(model)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def run_case(url: str, protocol: str, model: str, make_inputs, batch: int, concurrency: int, requests: int,
             output: str = "cell_embedding", warmup: int = 2, batched_model: str | None = ENCODER_MODEL) -> dict:
    """`concurrency` client threads each send `requests` requests of `batch` cells (``make_inputs(rng)``: one
    request's inputs) to `model`, after `warmup` each; cells/s, latency percentiles and how `batched_model`
    (if given) batched them (dynamic batching)."""
    from scgpt_hf.serving import TritonClient

    stats = TritonClient(url, protocol)
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def worker(k: int, n: int, record: bool) -> None:
        rng = np.random.default_rng(k)
        client = TritonClient(url, protocol, retries=0, timeout=120)
        for _ in range(n):
            inputs = make_inputs(rng)
            t0 = time.perf_counter()
            try:
                client.infer(model, inputs, [output])
            except Exception as err:  # noqa: BLE001
                errors.append(str(err))
                continue
            if record:
                with lock:
                    latencies.append(time.perf_counter() - t0)
        client.close()

    warm = [threading.Thread(target=worker, args=(100 + k, warmup, False)) for k in range(concurrency)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    inf0, exe0 = _encoder_counts(stats, batched_model) if batched_model else (0, 0)
    threads = [threading.Thread(target=worker, args=(k, requests, True)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    inf1, exe1 = _encoder_counts(stats, batched_model) if batched_model else (0, 0)
    lat = np.array(latencies or [np.nan]) * 1000
    return {
        "batch": batch, "concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
        "first_error": errors[0][:500] if errors else None,
        "cells_per_s": len(latencies) * batch / elapsed, "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "encoder_cells_per_execution": (inf1 - inf0) / max(1, exe1 - exe0),
    }


def environment(url: str, protocol: str, repository: Path | None) -> dict:
    import onnxruntime

    from scgpt_hf.serving import TritonClient

    client = TritonClient(url, protocol)
    meta = client._call("get_server_metadata")
    version = meta.version if protocol == "grpc" else meta.get("version")
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "python": platform.python_version(), "numpy": np.__version__, "onnxruntime(client)": onnxruntime.__version__,
        "cpu": cpu, "cores": os.cpu_count(), "triton": version, "protocol": protocol,
    }
    if repository is not None:
        report = json.loads((repository / "triton_report.json").read_text())
        export = json.loads((repository / "export_report.json").read_text()) if (repository / "export_report.json").is_file() else {}
        cfg = export.get("outputs", [])
        env.update({"repository": str(repository), "device": report["device"], "precision": report["precision"],
                    "max_batch_size": report["max_batch_size"], "instances": report["instances"],
                    "max_length": report["tokenizer"]["max_length"], "encoder_outputs": report["encoder_outputs"],
                    "export_outputs": [o["name"] for o in cfg]})
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_repo")
    parser.add_argument("--url", default=None, help="host:port of a running server (skips starting one)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model", default=EMBED_MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=40, help="requests per client thread per case")
    parser.add_argument("--max-genes", type=int, default=None, help="cap genes sent per cell")
    args = parser.parse_args()

    from scgpt_hf.serving import TritonServer

    server = None
    url = args.url
    if url is None:
        if not (args.repository / ENCODER_MODEL / "1").is_dir():
            sys.exit(f"{args.repository} has no {ENCODER_MODEL}/1/ (triton_repo/ commits its configs only): run "
                     "`.venv/bin/python tests/test_triton.py regenerate` first, which writes the rest beside them.")
        server = TritonServer(args.repository).start()
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
    try:
        env = environment(url, args.protocol, args.repository if server else None)
        print("environment:", json.dumps(env, indent=1))
        cells = _cells(url, args.protocol, args.max_genes)
        lengths = np.array([len(g) for g, _ in cells])
        print(f"cells: {len(cells)} wu2020 cells, vocabulary genes per cell median {int(np.median(lengths))}, "
              f"max {lengths.max()}")
        print(f"\n{'batch':>5} {'conc':>5} {'requests':>8} {'cells/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'cells/exec':>10} {'errors':>6}")
        for batch in args.batch_sizes:
            for conc in args.concurrency:
                def make_inputs(rng, batch=batch):
                    g, c = _request(cells, rng.choice(len(cells), size=batch, replace=False))
                    return {"gene_ids": g, "counts": c}

                r = run_case(url, args.protocol, args.model, make_inputs, batch, conc, args.requests)
                print(f"{r['batch']:>5} {r['concurrency']:>5} {r['requests']:>8} {r['cells_per_s']:>9.1f} "
                      f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['encoder_cells_per_execution']:>10.1f} "
                      f"{r['errors']:>6}", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
