"""Benchmark: zero-shot cell embedding with the original scGPT (`scgpt.tasks.embed_data`) vs `scgpt_hf.embed`.

Same weights (whole-human size: d_model 512, 12 layers, 8 heads, d_hid 512, 60,697 tokens with the original
package's census gene vocabulary; random weights built with the original code unless --checkpoint names
an original checkpoint folder), same real cells (scirpy's Wu et al. 2020 T cells, raw counts), CPU.

One command. Each path runs in a child process of this script (`--worker ...`), one after the other, so
that its peak memory can be measured cleanly: the child resets its peak-RSS counter
(/proc/self/clear_refs) just before the call and reads VmHWM right after, so "peak RSS" is the process's
high-water mark during the embedding call (model loading included), and "growth" is that minus the RSS
just before the call. The wall time covers the whole call, model loading included, for both; CPU time
(user + system, the child and its reaped children such as the original's DataLoader workers) is printed
too, as it is far less disturbed by other jobs on a shared machine.

The original runs with its defaults except device="cpu" and use_fast_transformer=False: flash-attn does not
exist on CPU, and without it the original falls back to exactly these PyTorch layers.

    python bench/embed_vs_original.py [--n-cells 200] [--batch-size 64] [--checkpoint ORIGINAL_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WHOLE_HUMAN = dict(d_model=512, nhead=8, d_hid=512, nlayers=12)


# ----------------------------------------------------------------------------------------------
# Children


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    warnings.simplefilter("ignore")
    import anndata
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    adata = anndata.read_h5ad(args.data)
    if args.worker == "original":
        import reference

        scgpt = reference.import_original()
        from scgpt.tasks import embed_data  # noqa: F401  (import cost outside the timing)

        call = lambda: scgpt.tasks.embed_data(  # noqa: E731
            adata, args.original_dir, gene_col="index", max_length=1200, batch_size=args.batch_size,
            device="cpu", use_fast_transformer=False, return_new_adata=True,
        ).X
    else:
        from scgpt_hf.embedding import embed

        call = lambda: embed(  # noqa: E731
            adata, args.converted_dir, batch_size=args.batch_size, max_length=1200, device="cpu", progress=False
        ).obsm["X_scGPT"]
    import resource

    def cpu_s() -> float:  # this process plus reaped children (the original's DataLoader workers)
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    before = _rss_kib("VmRSS")
    reset = _reset_peak()
    start, cpu0 = time.perf_counter(), cpu_s()
    emb = np.asarray(call(), dtype=np.float32)
    wall, cpu = time.perf_counter() - start, cpu_s() - cpu0
    peak = _rss_kib("VmHWM")
    np.save(args.out + ".npy", emb)
    with open(args.out + ".json", "w") as f:
        json.dump({"wall_s": wall, "cpu_s": cpu, "rss_before_kib": before, "peak_kib": peak, "peak_reset": reset,
                   "threads": torch.get_num_threads()}, f)


# ----------------------------------------------------------------------------------------------
# Parent


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _census_vocab() -> dict[str, int]:
    import reference

    path = Path(reference.import_original().__file__).parent / "tokenizer" / "default_census_vocab.json"
    genes = json.loads(path.read_text())
    ordered = [g for g, _ in sorted(genes.items(), key=lambda kv: kv[1])]
    return reference.make_vocab(len(ordered), ordered)


def prepare(work: Path, checkpoint: str | None, n_cells: int) -> tuple[Path, Path, Path, str]:
    """Original folder, converted folder and the cells file; returns them and a description of the weights."""
    import anndata

    import reference
    from scgpt_hf.convert import convert_original_checkpoint

    if checkpoint:
        original, what = Path(checkpoint), f"checkpoint {checkpoint}"
    else:
        vocab = _census_vocab()
        model = reference.build_original_model(
            flash=False, seed=0, ntoken=len(vocab), vocab=vocab, do_mvc=True, pad_value=-2, **WHOLE_HUMAN
        )
        original = reference.save_original_checkpoint(model, work / "original", args={}, vocab=vocab, layout="released")
        n_params = sum(p.numel() for p in model.parameters())
        what = f"random weights, whole-human size ({n_params / 1e6:.2f}M params incl. decoders), census vocabulary"
        del model
    converted = work / "converted"
    convert_original_checkpoint(original, converted, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(reference.wu2020_path())
    adata = adata[: min(n_cells, adata.n_obs)].copy()
    data = work / "cells.h5ad"
    adata.write_h5ad(data)
    return original, converted, data, what


def run_child(kind: str, original: Path, converted: Path, data: Path, batch_size: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--original-dir", str(original), "--converted-dir",
           str(converted), "--data", str(data), "--batch-size", str(batch_size), "--out", str(out)]
    subprocess.run(cmd, check=True)
    stats = json.loads(Path(str(out) + ".json").read_text())
    stats["emb"] = np.load(str(out) + ".npy")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, default=200, help="cells of wu2020 to embed (max 200)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--checkpoint", help="an original scGPT folder (best_model.pt, args.json, vocab.json)")
    parser.add_argument("--order", default="original,ours", help="which paths to run, in order")
    parser.add_argument("--worker", choices=["original", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--original-dir", help=argparse.SUPPRESS)
    parser.add_argument("--converted-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    import torch

    with tempfile.TemporaryDirectory(prefix="scgpt_bench_") as tmp:
        work = Path(tmp)
        original, converted, data, what = prepare(work, args.checkpoint, args.n_cells)
        import anndata

        n_genes = np.diff(anndata.read_h5ad(data).X.tocsr().indptr)
        print(f"weights: {what}")
        print(f"cells: {len(n_genes)} wu2020 T cells; expressed genes per cell median {int(np.median(n_genes))}, "
              f"max {int(n_genes.max())} (before vocabulary matching)")
        print(f"environment: {_cpu_model()}; {len(os.sched_getaffinity(0))} usable cores; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; python {platform.python_version()}; "
              f"load average before {os.getloadavg()[0]:.2f}")
        results = {}
        for kind in args.order.split(","):
            results[kind] = run_child(kind, original, converted, data, args.batch_size, work / kind)
            r = results[kind]
            print(f"{kind:>8}: {len(n_genes) / r['wall_s']:7.3f} cells/s ({r['wall_s']:.1f} s, model loading included); "
                  f"{len(n_genes) / r['cpu_s']:.3f} cells per CPU-second ({r['cpu_s']:.0f} CPU-s); "
                  f"peak RSS {r['peak_kib'] / 1024:7.0f} MiB (+{(r['peak_kib'] - r['rss_before_kib']) / 1024:.0f} MiB "
                  f"over the {r['rss_before_kib'] / 1024:.0f} MiB before the call){'' if r['peak_reset'] else ' [peak not reset]'}")
        print(f"load average after {os.getloadavg()[0]:.2f} (2-core machine shared with others: compare the ratio)")
        if {"original", "ours"} <= results.keys():
            a, b = results["original"]["emb"], results["ours"]["emb"]
            cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            print(f"speed-up ours / original: {results['original']['wall_s'] / results['ours']['wall_s']:.2f}x wall time, "
                  f"{results['original']['cpu_s'] / results['ours']['cpu_s']:.2f}x CPU time (less sensitive to other load)")
            print(f"embedding agreement: max |diff| {np.abs(a - b).max():.2e}; cosine mean {cos.mean():.6f}, "
                  f"min {cos.min():.6f} (each side breaks binning ties and samples long cells with its own RNG)")


if __name__ == "__main__":
    main()
