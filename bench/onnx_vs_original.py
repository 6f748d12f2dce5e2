"""Benchmark: the original scGPT vs our PyTorch model vs ONNX Runtime fp32 / int8, on CPU, on real cells.

Not a test: one run, minutes long. Whole-human size (d_model 512, 12 layers, 8 heads, d_hid 512, 60,697
tokens). Without --checkpoint the weights are random, drawn with the original code (tests/reference.py:
`build_original_model`) and converted with `scgpt_hf.convert.convert_original_checkpoint`, so every path
runs the same weights; the vocabulary is the original package's `default_census_vocab.json` (60,694
genes + <pad>, <cls>, <eoc>) so scirpy's wu2020 cells match real genes.

Paths, each timed end to end (tokenisation/binning + model) at each batch size, each in its own
subprocess so peak memory (max RSS) is per path and batch size:

* original: `scgpt.tasks.cell_emb.get_batch_cell_embeddings` (the body of `embed_data`) with a PyTorch
  `TransformerModel` (flash-attn is not available on CPU, so PyTorch layers with their default nested-tensor
  fast path), sequential batches padded to the batch's longest cell, as the original does;
* ours-pytorch: `scgpt_hf.embedding.embed` (SDPA attention, length-grouped batches);
* ort-fp32 / ort-int8: `export_onnx(task="embedding")` graphs in ONNX Runtime (fused MultiHeadAttention fed
  the 2-D key padding mask, SkipLayerNormalization; int8 = dynamic quantisation, 7-bit weights per output
  channel), length-grouped batches of our tokenizer's cells. Loading (`OnnxScGPT`, its self-check included)
  is timed apart: the seconds of the whole load and of the self-check are in the results.

The environment block names the CPU's int8-relevant features (/proc/cpuinfo: avx2, avx512f, avx512_vnni,
amx) and PyTorch's CPU capability: int8 figures depend on them (AVX2 without VNNI saturated the earlier
int8 scheme).

Agreement: on identical tokens (our tokenizer's cells, `<cls>` value = pad_value as the zero-shot path) the
original model's `<cls>` embedding is compared with ours (cosine per cell, L2-normalised embeddings). The
original's own end-to-end output differs further because its binning breaks ties with the global RNG; that
cosine is printed too.

Usage:
    .venv/bin/python bench/onnx_vs_original.py [--n-cells 64] [--batch-sizes 1 16 64] [--threads 2]
        [--checkpoint ORIGINAL_DIR] [--workdir DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PATHS = ("original", "ours-pytorch", "ort-fp32", "ort-int8")
WHOLE_HUMAN = dict(d_model=512, nhead=8, d_hid=512, nlayers=12, nlayers_cls=3, n_cls=1, dropout=0.2,
                   pad_token="<pad>", pad_value=-2, do_mvc=True, input_emb_style="continuous")


# ----------------------------------------------------------------------------------------------
# Setup (main process)


def environment(threads: int) -> dict:
    """What the numbers were measured on."""
    import onnx
    import onnxruntime
    import torch
    import transformers

    from scgpt_hf.export.selfcheck import cpu_features

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
        "usable_cpus": len(os.sched_getaffinity(0)), "threads": threads,
        "cpu_features": cpu_features(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg_at_start": os.getloadavg(), "torch": torch.__version__, "transformers": transformers.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
    }


def build_checkpoint(workdir: Path, seed: int) -> Path:
    """Random whole-human-size weights with the original code, saved as a released-style folder."""
    import reference

    census = Path(reference.import_original().__file__).parent / "tokenizer" / "default_census_vocab.json"
    census_vocab = json.loads(census.read_text())
    genes = sorted(census_vocab, key=census_vocab.__getitem__)
    vocab = reference.make_vocab(len(genes), genes)
    model = reference.build_original_model(flash=False, seed=seed, ntoken=len(vocab), vocab=vocab, **WHOLE_HUMAN)
    out = workdir / "original"
    reference.save_original_checkpoint(model, out, args={}, vocab=vocab, layout="released")
    return out


def load_cells(n_cells: int, seed: int):
    import anndata
    import reference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(reference.wu2020_path())
    rows = np.sort(np.random.default_rng(seed).permutation(adata.n_obs)[:n_cells])
    return adata[rows].copy()


# ----------------------------------------------------------------------------------------------
# Workers (one subprocess per path and batch size)


def _tokens(hf_dir: Path, adata, max_length: int):
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    tok = ScGPTTokenizer.from_pretrained(hf_dir)
    import logging

    logging.getLogger("scgpt_hf.tokenization_scgpt").setLevel(logging.ERROR)
    pad_value = json.loads((hf_dir / "config.json").read_text())["pad_value"]
    enc = tok(adata, padding=False, return_tensors=None, max_length=max_length, seed=0, cls_value=pad_value)
    return [(np.asarray(i, np.int64), np.asarray(v, np.float32)) for i, v in zip(enc["input_ids"], enc["values"])]


def _grouped(cells, batch_size: int):
    """Length-grouped batches: cells sorted by token count, each batch padded to its own longest cell."""
    order = np.argsort([len(c[0]) for c in cells], kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def worker(args: argparse.Namespace) -> None:
    """Time one path at one batch size on the cells, save its embeddings and print its figures as a RESULT line."""
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    adata = load_cells(args.n_cells, args.seed)
    bs = args.batch_size
    result: dict = {"path": args.path, "batch_size": bs, "n_cells": adata.n_obs}
    run = {"original": _run_original, "ours-pytorch": _run_ours}.get(args.path, _run_ort)
    emb, elapsed, rss0 = run(args, adata, workdir, result)
    result.update(seconds=elapsed, cells_per_s=adata.n_obs / elapsed, peak_rss_mib=_rss() / 1024,
                  rss_before_run_mib=rss0 / 1024)
    np.save(workdir / f"emb_{args.path}_{bs}.npy", emb)
    print("RESULT " + json.dumps(result), flush=True)


def _run_original(args: argparse.Namespace, adata, workdir: Path, result: dict) -> tuple[np.ndarray, float, int]:
    """`get_batch_cell_embeddings` of the original package; with --_same-tokens also its model on our tokens."""
    import reference
    import torch

    reference.import_original()  # registers the stand-ins (torchtext, IPython, ...) before scgpt loads
    from scgpt.tasks.cell_emb import get_batch_cell_embeddings

    orig_dir = Path(args.original_dir)
    configs = json.loads((orig_dir / "args.json").read_text())
    vocab = json.loads((orig_dir / "vocab.json").read_text())
    model = reference.build_original_model(flash=False, seed=0, ntoken=len(vocab), vocab=vocab, **WHOLE_HUMAN)
    state = torch.load(orig_dir / "best_model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(reference.convert_attention_keys(state, "pytorch"))
    model.eval()
    ids = np.array([vocab.get(g, -1) for g in adata.var_names.tolist()])
    sub = adata[:, ids >= 0].copy()
    gene_ids = ids[ids >= 0]
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    sub.X = sub.X.toarray() if hasattr(sub.X, "toarray") else sub.X
    # warm-up on a few cells (thread pools, allocator)
    with warnings.catch_warnings(), _silence():
        warnings.simplefilter("ignore")
        get_batch_cell_embeddings(sub[:2], model=model, vocab=vocab, max_length=args.max_length, batch_size=2,
                                  model_configs=configs, gene_ids=gene_ids)
        rss0 = _rss()
        t0 = time.perf_counter()
        emb = get_batch_cell_embeddings(sub, model=model, vocab=vocab, max_length=args.max_length,
                                        batch_size=args.batch_size, model_configs=configs, gene_ids=gene_ids)
        elapsed = time.perf_counter() - t0
    if args.same_tokens:
        same = _original_on_our_tokens(model, workdir / "hf", adata, vocab, configs, args.max_length)
        np.save(workdir / "emb_original_same_tokens.npy", same)
    return emb, elapsed, rss0


def _original_on_our_tokens(model, hf_dir: Path, adata, vocab: dict, configs: dict, max_length: int) -> np.ndarray:
    """The original model's normalised `<cls>` embeddings of our tokenizer's cells (agreement on identical tokens)."""
    import torch

    from scgpt_hf.export.onnx_export import graph_feed

    cells = _tokens(hf_dir, adata, max_length)
    out = np.zeros((len(cells), configs["embsize"]), np.float32)
    for idx in _grouped(cells, 16):
        feed = graph_feed([cells[k] for k in idx], vocab["<pad>"], configs["pad_value"])
        with torch.no_grad(), _silence():
            enc = model._encode(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["values"]),
                                src_key_padding_mask=torch.from_numpy(feed["attention_mask"] == 0))
        out[idx] = enc[:, 0, :].numpy()
    return _normalise(out)


def _run_ours(args: argparse.Namespace, adata, workdir: Path, result: dict) -> tuple[np.ndarray, float, int]:
    """`scgpt_hf.embedding.embed` with SDPA attention."""
    from scgpt_hf import ScGPTModel
    from scgpt_hf.embedding import embed

    hf_dir = workdir / "hf"
    model = ScGPTModel.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    small = adata[:2].copy()
    embed(small, model, str(hf_dir), batch_size=2, progress=False, device="cpu", num_threads=args.threads)
    rss0 = _rss()
    t0 = time.perf_counter()
    embed(adata, model, str(hf_dir), batch_size=args.batch_size, max_length=args.max_length, progress=False,
          device="cpu", num_threads=args.threads)
    elapsed = time.perf_counter() - t0
    return np.asarray(adata.obsm["X_scGPT"]), elapsed, rss0


def _run_ort(args: argparse.Namespace, adata, workdir: Path, result: dict) -> tuple[np.ndarray, float, int]:
    """An exported graph in ONNX Runtime (`OnnxScGPT`, whose load and self-check are timed into `result`)."""
    from scgpt_hf.export.onnx_export import OnnxScGPT, graph_feed

    hf_dir = workdir / "hf"
    t0 = time.perf_counter()
    session = OnnxScGPT(workdir / args.path, intra_op_num_threads=args.threads)
    result.update(load_s=time.perf_counter() - t0, self_check_s=session.self_check_result["seconds"],
                  self_check=session.self_check_result["outputs"]["cell_embedding"])
    pp = session.preprocessing
    warm = _tokens(hf_dir, adata[:2], args.max_length)
    session(graph_feed(warm, pp["pad_token_id"], pp["pad_value"]))
    rss0 = _rss()
    t0 = time.perf_counter()
    cells = _tokens(hf_dir, adata, args.max_length)  # tokenisation is part of the timed path
    emb = np.zeros((len(cells), session.config["hidden_size"]), np.float32)
    for idx in _grouped(cells, args.batch_size):
        out = session(graph_feed([cells[k] for k in idx], pp["pad_token_id"], pp["pad_value"]))
        emb[idx] = out["cell_embedding"]
    elapsed = time.perf_counter() - t0
    return _normalise(emb), elapsed, rss0


def _rss() -> int:
    """Peak resident memory (KiB) of this process: VmHWM, which (unlike ru_maxrss) restarts at exec, so the
    parent's footprint does not leak into the worker's figure. DataLoader workers of the original are not
    counted (they share the parent's pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _silence:
    def __enter__(self):
        import contextlib
        import io

        self._ctx = contextlib.ExitStack()
        self._ctx.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._ctx.enter_context(contextlib.redirect_stderr(io.StringIO()))
        return self

    def __exit__(self, *exc):
        self._ctx.close()
        return False


# ----------------------------------------------------------------------------------------------
# Main


def main() -> None:
    args = _parse_args()
    if args.path:
        worker(args)
        return
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="scgpt_bench_")
        workdir = Path(tmp.name)
    env = environment(args.threads)
    print("== environment")
    for k, v in env.items():
        print(f"  {k}: {v}")
    print("  note: the CPU is shared with other developers; figures are noisy.")
    original_dir = _prepare_weights(args, workdir)
    exports = _export(args, workdir)
    results = [res for path in args.paths for bs in args.batch_sizes
               if (res := _run_worker(args, workdir, original_dir, path, bs)) is not None]
    _agreement(results, workdir)
    _print_results(results)
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "exports": exports, "results": results,
                                               "n_cells": args.n_cells, "max_length": args.max_length}, indent=2,
                                              default=str))
    if tmp is not None:
        tmp.cleanup()


def _parse_args() -> argparse.Namespace:
    """The benchmark's options, and the hidden ones a worker subprocess is started with."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="original scGPT folder (best_model.pt, args.json, vocab.json); "
                                             "default: random whole-human-size weights")
    parser.add_argument("--n-cells", type=int, default=64, help="wu2020 cells to embed (<= 200)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-length", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--workdir", help="keep intermediate files here (default: a temporary folder)")
    parser.add_argument("--json", help="write all figures here")
    parser.add_argument("--seed", type=int, default=0)
    # worker mode (internal)
    parser.add_argument("--_worker", dest="path", help=argparse.SUPPRESS)
    parser.add_argument("--_batch-size", dest="batch_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_original-dir", dest="original_dir", help=argparse.SUPPRESS)
    parser.add_argument("--_same-tokens", dest="same_tokens", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def _prepare_weights(args: argparse.Namespace, workdir: Path) -> Path:
    """The original checkpoint (given, or random whole-human weights) converted to ``workdir/hf``; returns its folder."""
    t0 = time.perf_counter()
    from scgpt_hf.convert import convert_original_checkpoint

    original_dir = Path(args.checkpoint) if args.checkpoint else build_checkpoint(workdir, args.seed)
    convert_original_checkpoint(original_dir, workdir / "hf", overwrite=True, verbose=False)
    print(f"== weights: {'checkpoint ' + str(original_dir) if args.checkpoint else 'random (original code), seed ' + str(args.seed)}"
          f"; converted in {time.perf_counter() - t0:.0f}s")
    return original_dir


def _export(args: argparse.Namespace, workdir: Path) -> dict:
    """The fp32 and int8 graphs the ort paths run, exported into ``workdir``; returns what each export reported."""
    from scgpt_hf.export.onnx_export import export_onnx

    exports = {}
    for path, precision in (("ort-fp32", "fp32"), ("ort-int8", "int8")):
        if path in args.paths:
            print(f"== export_onnx(task='embedding', precision='{precision}')")
            t1 = time.perf_counter()
            report = export_onnx(workdir / "hf", workdir / path, task="embedding", precision=precision,
                                 seed=args.seed, overwrite=True, verbose=True)
            exports[path] = {"seconds": time.perf_counter() - t1, "validation": report.validation,
                             "fused_ops": report.fused_ops, "attention_inputs": report.attention_inputs,
                             "ort_session_ops": report.ort_session_ops,
                             "file_mib": report.file_size / 2**20}
    return exports


def _run_worker(args: argparse.Namespace, workdir: Path, original_dir: Path, path: str, bs: int) -> dict | None:
    """One path at one batch size in its own subprocess (so peak memory is its own); its figures, or None if it failed."""
    cmd = [sys.executable, __file__, "--_worker", path, "--_batch-size", str(bs), "--workdir", str(workdir),
           "--n-cells", str(args.n_cells), "--max-length", str(args.max_length), "--threads", str(args.threads),
           "--seed", str(args.seed), "--_original-dir", str(original_dir)]
    if path == "original" and bs == args.batch_sizes[0]:
        cmd.append("--_same-tokens")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(f"!! {path} batch {bs} failed:\n{proc.stderr[-3000:]}")
        return None
    res = json.loads(line[len("RESULT "):])
    print(f"  {path:13s} batch {bs:3d}: {res['cells_per_s']:6.2f} cells/s  peak RSS {res['peak_rss_mib']:7.0f} MiB"
          f"  ({res['seconds']:.1f}s, load avg {os.getloadavg()[0]:.1f})", flush=True)
    return res


def _agreement(results: list[dict], workdir: Path) -> None:
    """Add to each result its cosines against the original (same tokens, end to end) and int8's against fp32."""
    ref_same = workdir / "emb_original_same_tokens.npy"
    if ref_same.is_file():
        ref = np.load(ref_same)
        for res in results:
            emb = np.load(workdir / f"emb_{res['path']}_{res['batch_size']}.npy")
            cos = (emb * ref).sum(1)
            res["cosine_vs_original_same_tokens_min"] = float(cos.min())
            res["cosine_vs_original_same_tokens_mean"] = float(cos.mean())
        e2e = [r for r in results if r["path"] == "original"]
        if e2e:
            orig = np.load(workdir / f"emb_original_{e2e[0]['batch_size']}.npy")
            for res in results:
                emb = np.load(workdir / f"emb_{res['path']}_{res['batch_size']}.npy")
                res["cosine_vs_original_end_to_end_mean"] = float((emb * orig).sum(1).mean())
    fp32 = {r["batch_size"]: r for r in results if r["path"] == "ort-fp32"}
    for r in results:
        if r["path"] == "ort-int8" and r["batch_size"] in fp32:
            a = np.load(workdir / f"emb_ort-int8_{r['batch_size']}.npy")
            b = np.load(workdir / f"emb_ort-fp32_{r['batch_size']}.npy")
            r["cosine_vs_ort_fp32_min"] = float((a * b).sum(1).min())


def _print_results(results: list[dict]) -> None:
    """The results table (adding each result's speed ratio to the original), the targets, and the ORT loads."""
    base = {r["batch_size"]: r["cells_per_s"] for r in results if r["path"] == "original"}
    print("\n== results (cells/s end to end incl. tokenisation; ratio vs the original at the same batch size)")
    header = f"{'path':13s} {'batch':>5s} {'cells/s':>8s} {'x orig':>7s} {'peak MiB':>9s} {'cos min (same tokens)':>22s} {'cos mean (orig e2e)':>20s}"
    print(header)
    for r in results:
        ratio = r["cells_per_s"] / base[r["batch_size"]] if r["batch_size"] in base else float("nan")
        r["ratio_vs_original"] = ratio
        print(f"{r['path']:13s} {r['batch_size']:5d} {r['cells_per_s']:8.2f} {ratio:7.2f} {r['peak_rss_mib']:9.0f} "
              f"{r.get('cosine_vs_original_same_tokens_min', float('nan')):22.6f} "
              f"{r.get('cosine_vs_original_end_to_end_mean', float('nan')):20.6f}")
    print("\ntargets: ort-fp32 >= 3x original, ort-int8 >= 5x original with cosine >= 0.99")
    for r in results:
        if r["path"] in ("ort-fp32", "ort-int8") and r["batch_size"] in base:
            target = 3 if r["path"] == "ort-fp32" else 5
            ok = r["ratio_vs_original"] >= target and (
                r["path"] == "ort-fp32" or r.get("cosine_vs_original_same_tokens_min", 0) >= 0.99)
            print(f"  {r['path']} batch {r['batch_size']}: {r['ratio_vs_original']:.2f}x -> {'met' if ok else 'NOT met'}")
    print("\n== ONNX Runtime loads (OnnxScGPT, self-check included) and int8 agreement")
    for r in results:
        if "load_s" in r:
            agree_fp32 = (f"; min cosine vs ORT fp32 {r['cosine_vs_ort_fp32_min']:.5f}"
                          if "cosine_vs_ort_fp32_min" in r else "")
            print(f"  {r['path']} batch {r['batch_size']}: load {r['load_s']:.2f}s, self-check {r['self_check_s']:.2f}s "
                  f"(cell_embedding cosine {r['self_check']['min_cosine']:.5f}){agree_fp32}")


if __name__ == "__main__":
    main()
