"""The GPU suite: correctness, `scgpt_hf.embed` against the original scGPT, and Triton, in one short run.

Run by ``bash bench/gpu/run.sh OUT_DIR`` (which installs the pack first); writes OUT_DIR/gpu_report.json and
OUT_DIR/gpu_report.md and prints the table.  A whole-human-size model (512 wide, 8 heads, 12 layers, d_hid 512,
the 60,697-token census vocabulary of the original package) gets random weights, built with the ORIGINAL code
(PyTorch layers) and converted, so both sides run the same weights.  Sections are independent: one that fails
records its error and the others still run.

* correctness: `embed` on the GPU (bf16 and fp16 autocast) vs fp32 on the CPU, on real wu2020 cells (cosine);
  generative attention (sdpa vs eager) on the GPU; the model's forward under CUDA's sync debug mode "error".
* embed: the tokenizer's cells/s; `scgpt_hf.embed` cells/s at 1,200 tokens per cell and at real lengths over
  a batch-size sweep; the forward alone (pre-tokenized cells) with achieved TFLOP/s against the GPU's
  measured bf16 matmul rate.
* packed: padding-free inference (`run_cells(packed=True)`: cells concatenated, attention within each cell
  through SDPA on nested jagged tensors) against padded batches on the device: agreement, no host-device
  synchronisation, and the forward's cells/s on real lengths for served dynamic batches of 8-64 random cells and
  for embed's length-grouped batches, to confirm or change `scgpt_hf.inference.DEFAULT_PACKED` for CUDA.
* original: the original's own `scgpt.tasks.embed_data` (PyTorch layers, fp16 autocast) on the same weights
  and cells, model loading subtracted; cosine to ours.
* triton: ``scgpt-hf serve MODEL --device cuda`` started as a user would; gRPC cells/s and p50/p99 latency at
  concurrency 1, 8, 32, 64 with the tokenizer in the server (scgpt_embed) and without it (scgpt_encoder fed
  tokenized cells); TritonClient.embed vs scgpt_hf.embed; a second server on the same ports is refused; a
  dynamic batch too large for the GPU's memory gets an error answer and the server keeps serving.

Quick mode (SCGPT_GPU_SUITE_QUICK=1): a tiny model, a few cells, the CPU; every section runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # reference.py: random weights and checkpoints the original's way
sys.path.insert(0, str(REPO / "bench"))  # triton_throughput.py: the load generator

QUICK = os.environ.get("SCGPT_GPU_SUITE_QUICK") == "1"
WHOLE_HUMAN = dict(d_model=512, nhead=8, d_hid=512, nlayers=12)
TINY = dict(d_model=32, nhead=4, d_hid=64, nlayers=2)
MAX_LENGTH = 1200
BATCH_SIZES = [4, 8] if QUICK else [16, 32, 64, 128, 256]
CONCURRENCY = [1, 8, 32, 64]
CELLS_PER_REQUEST = 1 if QUICK else 8
N_CELLS = 8 if QUICK else 4096  # cells per embed measurement
N_CORRECTNESS = 8 if QUICK else 64  # real cells compared against fp32 on the CPU
N_SERVED = 32 if QUICK else 200  # real cells embedded through Triton and compared with scgpt_hf.embed (200: all)
SECONDS_PER_CASE = 3.0  # Triton: requests per thread are sized to last about this long (quick mode: one each)
BUDGET_S = 420  # the sweeps stop adding points beyond this (the lent machine's run is capped at 8 minutes)
START = time.monotonic()


def log(message: str) -> None:
    print(f"[suite {time.monotonic() - START:6.1f}s] {message}", flush=True)


def over_budget() -> bool:
    return time.monotonic() - START > BUDGET_S


# ----------------------------------------------------------------------------------------------
# The original scGPT, imported module by module


def load_original() -> types.SimpleNamespace:
    """The original's model class and embed_data without `import scgpt`, whose __init__ pulls scanpy, plotting
    and training code that the lent image lacks.  Stand-ins only where the real package is absent: torchtext and
    IPython (tests/reference.py's), scanpy (embed_data reads only read_h5ad and AnnData; preprocess imports two
    helpers it never calls here), matplotlib (imported by scgpt.utils for plots)."""
    import anndata

    import reference

    spec = importlib.util.find_spec("scgpt")
    if spec is None:
        raise ModuleNotFoundError("the original scgpt 0.2.4 is not installed (the pack's wheels hold it)")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, make in (("torchtext", reference._make_torchtext), ("IPython", reference._make_ipython)):
        if not reference._real_import_works(name):
            sys.modules.update(make())
    if importlib.util.find_spec("scanpy") is None:
        scanpy = types.ModuleType("scanpy")
        scanpy.read_h5ad, scanpy.AnnData = anndata.read_h5ad, anndata.AnnData
        get = types.ModuleType("scanpy.get")
        get._get_obs_rep = get._set_obs_rep = None
        scanpy.get = get
        sys.modules.update({"scanpy": scanpy, "scanpy.get": get})
    if importlib.util.find_spec("matplotlib") is None:  # names used in annotations become placeholder classes
        mpl = types.ModuleType("matplotlib")
        mpl.pyplot, mpl.axes = types.ModuleType("matplotlib.pyplot"), types.ModuleType("matplotlib.axes")
        for module in (mpl.pyplot, mpl.axes):
            module.__getattr__ = _placeholder_class
        sys.modules.update({"matplotlib": mpl, "matplotlib.pyplot": mpl.pyplot, "matplotlib.axes": mpl.axes})
    for name, path in (("scgpt", root), ("scgpt.tasks", root / "tasks")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    sys.modules["scgpt"].logger = logging.getLogger("scGPT")
    sys.modules["scgpt"].__version__ = "0.2.4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = importlib.import_module("scgpt.model")
        cell_emb = importlib.import_module("scgpt.tasks.cell_emb")
    return types.SimpleNamespace(TransformerModel=model.TransformerModel, embed_data=cell_emb.embed_data, root=root)


def _placeholder_class(name: str) -> type:
    """A stand-in module's attribute: a class for any name (annotations), but no dunders, which `inspect` reads
    (a class as `__file__` broke torch's custom-op registration when transformers imported it afterwards)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})


# ----------------------------------------------------------------------------------------------
# Setup: model, cells


def census_vocab(original: types.SimpleNamespace) -> dict[str, int]:
    import reference

    genes = json.loads((original.root / "tokenizer" / "default_census_vocab.json").read_text())
    ordered = [g for g, _ in sorted(genes.items(), key=lambda kv: kv[1])]
    return reference.make_vocab(len(ordered), ordered)


def build_models(work: Path, original: types.SimpleNamespace) -> dict:
    """Random weights the original's way (PyTorch layers), saved as a released checkpoint and converted."""
    import torch

    import reference
    from scgpt_hf.convert import convert_original_checkpoint

    vocab = census_vocab(original)
    size = TINY if QUICK else WHOLE_HUMAN
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = original.TransformerModel(
            ntoken=len(vocab), vocab=vocab, dropout=0.2, pad_token="<pad>", pad_value=-2, do_mvc=True,
            use_fast_transformer=False, **size)
    reference.randomize_parameters(model, seed=0)
    source = reference.save_original_checkpoint(model.eval(), work / "original", args={}, vocab=vocab,
                                                layout="released")
    converted = work / "converted"
    convert_original_checkpoint(source, converted, verbose=False)
    return {"original_dir": source, "model_dir": converted, "vocab": vocab,
            "parameters": sum(p.numel() for p in model.parameters()), "size": size}


def real_cells(pack: Path):
    """wu2020's 200 T cells (raw counts) from the pack."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    z = np.load(pack / "wu2020.npz")
    X = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    return anndata.AnnData(X=X, var=pd.DataFrame(index=pd.Index(z["genes"].astype(str))))


def tiled(adata, n: int):
    """`n` cells: the real cells repeated (each keeps its own content, so its own tokens)."""
    import anndata
    import scipy.sparse as sp

    reps = -(-n // adata.n_obs)
    X = sp.vstack([adata.X] * reps).tocsr()[:n]
    out = anndata.AnnData(X=X, var=adata.var.copy())
    out.obs_names = [f"c{i}" for i in range(n)]
    return out


def long_cells(vocab: dict[str, int], n: int, seed: int = 0):
    """`n` cells expressing 2,000 random vocabulary genes each: 1,200 tokens per cell after truncation."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    genes = [g for g in vocab if not g.startswith("<")][:6000]
    rows = np.repeat(np.arange(n), 2000)
    cols = np.concatenate([rng.choice(len(genes), 2000, replace=False) for _ in range(n)])
    counts = rng.integers(1, 50, size=rows.size).astype(np.float32)
    X = sp.csr_matrix((counts, (rows, cols)), shape=(n, len(genes)))
    return anndata.AnnData(X=X, var=pd.DataFrame(index=pd.Index(genes)))


# ----------------------------------------------------------------------------------------------
# Measuring


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(lengths: np.ndarray, size: dict, batch_size: int, max_tokens: int | None,
                  packed: bool = False) -> float:
    """Multiply-add FLOPs of the encoder over the batches `run_cells` forms (what the device computes): each cell
    at its batch's padded length, or at its own length when `packed`."""
    from scgpt_hf.inference import length_groups

    d, h, n_layers = size["d_model"], size["d_hid"], size["nlayers"]
    total = 0.0
    for members in length_groups(lengths, batch_size, max_tokens):
        for L in lengths[members] if packed else [int(lengths[members].max())] * len(members):
            per_layer = 2 * L * d * 3 * d + 4 * L * L * d + 2 * L * d * d + 4 * L * d * h
            total += n_layers * per_layer + 2 * L * d * d  # + the value encoder's second linear
    return float(total)


def matmul_tflops(device) -> float | None:
    """The GPU's bf16 matrix rate on random data (8192^3, median of 10 after warm-up), the ceiling to compare."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1000)
    return 2 * 8192**3 / float(np.median(times)) / 1e12


def sync_free(name: str, model, inputs: dict, dtype) -> dict:
    """{name}_sync_free: whether `model(**inputs)` on the GPU, autocast to `dtype`, ran without making the host wait
    for the device (CUDA's sync debug mode "error" raises on any synchronisation); {name}_sync_error when not."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
            model(**inputs)
        return {f"{name}_sync_free": True}
    except RuntimeError as err:
        return {f"{name}_sync_free": False, f"{name}_sync_error": str(err)[:500]}
    finally:
        torch.cuda.set_sync_debug_mode(0)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    a, b = a[ok], b[ok]
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ----------------------------------------------------------------------------------------------
# Sections


def section_environment(device, out: Path) -> dict:
    import torch
    import transformers

    import scgpt_hf

    flags = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "transformers": transformers.__version__, "numpy": np.__version__, "scgpt_hf": scgpt_hf.__version__}
    for name in ("anndata", "pandas", "scipy", "tritonclient"):
        with contextlib.suppress(Exception):
            versions[name] = importlib.import_module(name).__version__
    env = {
        "quick": QUICK, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        if device.type == "cuda" else None,
        "versions": versions,
        "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16"}),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_cores": os.cpu_count(),
    }
    text = out / "environment.txt"
    if text.is_file():
        env["machine_record"] = text.read_text()[-4000:]
    env["bf16_matmul_tflops"] = matmul_tflops(device)
    return env


def section_correctness(ctx: dict) -> dict:
    import torch

    from scgpt_hf import embed
    from scgpt_hf.modeling_scgpt import ScGPTModel
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    device, model_dir = ctx["device"], ctx["model_dir"]
    cells = ctx["real"][:N_CORRECTNESS].copy()
    res: dict = {"cells": int(cells.n_obs)}
    fp32 = embed(cells.copy(), str(model_dir), device="cpu", precision="fp32", progress=False).obsm["X_scGPT"]
    for precision in ("bf16", "fp16"):
        try:
            got = embed(cells.copy(), str(model_dir), device=device, precision=precision, progress=False).obsm["X_scGPT"]
        except ValueError as err:  # e.g. no native bf16 on this GPU
            res[f"{precision}_error"] = str(err)
            continue
        cos = cosine_rows(got, fp32)
        res[f"cosine_{precision}_vs_cpu_fp32_mean"] = float(cos.mean())
        res[f"cosine_{precision}_vs_cpu_fp32_min"] = float(cos.min())

    # Generative attention: sdpa and eager agree on the device (fp32).
    tok = ScGPTTokenizer.from_pretrained(str(model_dir))
    enc = tok(cells[:8], max_length=MAX_LENGTH, padding=True, return_tensors="pt", seed=0)
    base = ScGPTModel.from_pretrained(str(model_dir))
    config = copy.deepcopy(base.config)
    config.use_generative_flag = True
    sdpa = ScGPTModel(config)
    sdpa.load_state_dict(base.state_dict(), strict=False)
    sdpa = sdpa.to(device).eval()
    sdpa.config._attn_implementation = "sdpa"
    eager = copy.deepcopy(sdpa)
    eager.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    real = enc["attention_mask"].bool()
    gen = (torch.rand(real.shape, generator=g) < 0.3) & real
    gen[:, 0] = False
    inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "values", "attention_mask")}
    with torch.inference_mode():
        a = sdpa(**inputs, generative_mask=gen.to(device))
        b = eager(**inputs, generative_mask=gen.to(device))
    keep = real.to(device)
    diff = (a.last_hidden_state - b.last_hidden_state).abs()[keep].max().item()
    res["generative_sdpa_vs_eager_max_abs"] = float(diff)
    res["cosine_generative_sdpa_vs_eager_min"] = float(cosine_rows(a.cell_embedding.cpu().numpy(),
                                                                   b.cell_embedding.cpu().numpy()).min())
    res["generative_sdpa_equals_eager"] = bool(diff < 1e-3)

    # The forward never makes the host wait for the GPU (CUDA's sync debug mode raises on any synchronisation).
    if device.type == "cuda":
        model = base.to(device).eval()
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "values", "attention_mask")}
        res.update(sync_free("forward", model, inputs, ctx["dtype"]))
    else:
        res["forward_sync_free"] = "not checked on cpu"
    return res


def section_embed(ctx: dict) -> dict:
    from scgpt_hf import embed
    from scgpt_hf.inference import DEFAULT_MAX_TOKENS, DEFAULT_PACKED, precision_name, run_cells
    from scgpt_hf.modeling_scgpt import ScGPTModel
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    device, model_dir, size = ctx["device"], ctx["model_dir"], ctx["size"]
    model = ScGPTModel.from_pretrained(str(model_dir)).to(device).eval()
    tok = ScGPTTokenizer.from_pretrained(str(model_dir))
    res: dict = {"precision": precision_name(ctx["dtype"]), "max_tokens": DEFAULT_MAX_TOKENS[device.type],
                 "packed": DEFAULT_PACKED[device.type], "cells": N_CELLS, "batch_sizes": BATCH_SIZES, "runs": []}
    embed(ctx["real"][:8].copy(), model, tok, device=device, progress=False)  # warm-up
    config = model.config
    for label, adata in (("1200_tokens", ctx["long"]), ("real_lengths", ctx["tiled"])):
        # The tokenizer alone (single process), and the lengths the forward will see.
        t0 = time.perf_counter()
        enc = tok.encode_with_ids(adata.X, tok.match_genes(list(adata.var_names)).ids, max_length=MAX_LENGTH,
                                  truncation="random", padding=False, return_tensors=None, seed=0,
                                  cls_value=float(config.pad_value))
        res[f"tokenizer_{label}_cells_per_s"] = adata.n_obs / (time.perf_counter() - t0)
        ids, vals = enc["input_ids"], enc["values"]
        if label == "real_lengths":
            ctx["real_tokens"] = (ids, vals)  # for the packed section
        lengths = np.array([len(x) for x in ids])
        res[f"{label}_tokens_per_cell_median"] = float(np.median(lengths))
        for batch_size in BATCH_SIZES:
            if over_budget():
                res["runs"].append({"lengths": label, "batch_size": batch_size, "skipped": "time budget"})
                continue
            run: dict = {"lengths": label, "batch_size": batch_size}
            for max_tokens, key in ((DEFAULT_MAX_TOKENS[device.type], "auto"), (None, "no_cap")):
                synchronize(device)
                t0 = time.perf_counter()
                run_cells(model, ids, vals, predict=lambda o: o.cell_embedding, batch_size=batch_size,
                          max_tokens=max_tokens, pad_id=config.pad_token_id, pad_value=float(config.pad_value),
                          device=device, dtype=ctx["dtype"])
                seconds = time.perf_counter() - t0
                flops = forward_flops(lengths, size, batch_size, max_tokens, res["packed"])
                run[f"forward_{key}_cells_per_s"] = len(ids) / seconds
                run[f"forward_{key}_tflops"] = flops / seconds / 1e12
                if ctx["matmul_tflops"]:
                    run[f"forward_{key}_fraction_of_bf16_matmul"] = flops / seconds / 1e12 / ctx["matmul_tflops"]
            synchronize(device)
            t0 = time.perf_counter()
            embed(adata.copy(), model, tok, batch_size=batch_size, max_length=MAX_LENGTH, device=device,
                  progress=False)
            run["embed_cells_per_s"] = adata.n_obs / (time.perf_counter() - t0)
            res["runs"].append(run)
            log(f"embed {label} batch {batch_size}: {run['embed_cells_per_s']:.0f} cells/s end to end, forward "
                f"{run['forward_auto_cells_per_s']:.0f} cells/s ({run['forward_auto_tflops']:.1f} TFLOP/s)")
    ctx["ours_for_original"] = embed(ctx["tiled"][: ctx["n_original"]].copy(), model, tok, device=device,
                                     progress=False).obsm["X_scGPT"]
    return res


def section_packed(ctx: dict) -> dict:
    """Padded vs packed (padding-free) inference on the device, on real wu2020 lengths."""
    import torch

    from scgpt_hf.inference import DEFAULT_MAX_TOKENS, DEFAULT_PACKED, length_groups, run_cells
    from scgpt_hf.modeling_scgpt import ScGPTModel, _nested_attention, _per_cell_attention

    device, size = ctx["device"], ctx["size"]
    model = ScGPTModel.from_pretrained(str(ctx["model_dir"])).to(device).eval()
    ids, vals = ctx["real_tokens"]
    lengths = np.array([len(x) for x in ids])
    budget = DEFAULT_MAX_TOKENS[device.type]
    res: dict = {"default_packed": DEFAULT_PACKED[device.type], "max_tokens": budget,
                 "attention": "per-cell SDPA" if device.type == "cpu" else "SDPA on nested jagged tensors"}

    speed_dtype = ctx["dtype"] if device.type == "cuda" else None  # as embed's "auto"

    def run(cells: np.ndarray, batch_size: int, packed: bool, dtype=speed_dtype) -> np.ndarray:
        return run_cells(model, [ids[c] for c in cells], [vals[c] for c in cells], predict=lambda o: o.cell_embedding,
                         batch_size=batch_size, max_tokens=budget, pad_id=model.config.pad_token_id,
                         pad_value=float(model.config.pad_value), device=device, dtype=dtype, packed=packed)

    # Agreement: the nested kernel against one SDPA per cell, and whole forwards, fp32 and autocast.
    g = torch.Generator().manual_seed(0)
    cut = torch.tensor([0, 5, 22, 23, 60])
    with torch.inference_mode():
        q, k, v = (torch.randn(1, 4, 60, 16, generator=g).to(device) for _ in range(3))
        nested = _nested_attention(q, k, v, cut.to(device), 37, 0.25)
        res["nested_vs_per_cell_max_abs"] = float((nested.cpu() - _per_cell_attention(
            q.cpu(), k.cpu(), v.cpu(), cut, 37, 0.25)).abs().max())
    some = np.arange(min(N_CORRECTNESS, len(ids)))
    for name, dtype in (("fp32", None), ("autocast", ctx["dtype"])):
        cos = cosine_rows(run(some, 16, True, dtype), run(some, 16, False, dtype))
        res[f"cosine_packed_vs_padded_{name}_min"] = float(cos.min())
    if device.type == "cuda":  # the packed forward never makes the host wait for the GPU
        eight = [np.asarray(ids[c], dtype=np.int64) for c in some[:8]]
        inputs = {"input_ids": torch.from_numpy(np.concatenate(eight))[None].to(device),
                  "values": torch.from_numpy(np.concatenate([vals[c] for c in some[:8]]).astype(np.float32))[None]
                  .to(device),
                  "cu_seq_lens_q": torch.tensor(np.cumsum([0] + [len(x) for x in eight])).to(device),
                  "max_length_q": max(len(x) for x in eight)}
        res.update(sync_free("packed_forward", model, inputs, ctx["dtype"]))

    # Speed: served dynamic batches of random cells (one model call each), and embed's length-grouped batches.
    rng = np.random.default_rng(0)
    per_case = N_CELLS if QUICK else 256
    cases = [(f"serving_{n}", [rng.choice(len(ids), n, replace=False) for _ in range(max(1, per_case // n))], n)
             for n in ((4, 8) if QUICK else (8, 32, 64))] + [("embed_64", [np.arange(len(ids))], 64)]
    run(some[:8], 8, True)  # warm-up
    for label, batches, batch_size in cases:
        if over_budget():
            res[label] = {"skipped": "time budget"}
            continue
        cells = np.concatenate(batches)
        padded_tokens = sum(len(g) * lengths[b][g].max() for b in batches
                            for g in length_groups(lengths[b], batch_size, budget))
        entry = {"cells": len(cells), "batch_size": batch_size,
                 "padding_share": float(1 - lengths[cells].sum() / padded_tokens)}
        for packed in (False, True):
            layout = "packed" if packed else "padded"
            synchronize(device)
            t0 = time.perf_counter()
            for b in batches:
                run(b, batch_size, packed)
            synchronize(device)
            seconds = time.perf_counter() - t0
            flops = sum(forward_flops(lengths[b], size, batch_size, budget, packed) for b in batches)
            entry[f"{layout}_cells_per_s"] = len(cells) / seconds
            entry[f"{layout}_tflops"] = flops / seconds / 1e12
        entry["packed_speedup"] = entry["packed_cells_per_s"] / entry["padded_cells_per_s"]
        res[label] = entry
        log(f"packed {label}: padding {entry['padding_share']:.1%}, padded {entry['padded_cells_per_s']:.0f} "
            f"cells/s, packed {entry['packed_cells_per_s']:.0f} cells/s (x{entry['packed_speedup']:.2f})")
    return res


def section_original(ctx: dict) -> dict:
    import torch

    original, device = ctx["original"], ctx["device"]
    res: dict = {"precision": "fp16-autocast" if device.type == "cuda" else "fp32",
                 "layers": "PyTorch TransformerEncoder (use_fast_transformer=False)", "runs": []}

    def run(adata, batch_size: int) -> tuple[float, np.ndarray]:
        torch.manual_seed(0)
        np.random.seed(0)
        synchronize(device)
        t0 = time.perf_counter()
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
            warnings.simplefilter("ignore")
            out = original.embed_data(adata, ctx["original_dir"], gene_col="index", max_length=MAX_LENGTH,
                                      batch_size=batch_size, device=device.type, use_fast_transformer=False,
                                      return_new_adata=False)
        synchronize(device)
        return time.perf_counter() - t0, np.asarray(out.obsm["X_scGPT"], dtype=np.float32)

    fixed, _ = run(ctx["real"][:4].copy(), 64)  # model loading and start-up, subtracted below
    res["load_seconds"] = fixed
    n = ctx["n_original"]
    for label, adata in (("1200_tokens", ctx["long"][:n]), ("real_lengths", ctx["tiled"][:n])):
        for batch_size in (64,) if not QUICK else (8,):
            if over_budget():
                res["runs"].append({"lengths": label, "batch_size": batch_size, "skipped": "time budget"})
                continue
            seconds, emb = run(adata.copy(), batch_size)
            entry = {"lengths": label, "batch_size": batch_size, "cells": n, "wall_s": seconds,
                     "cells_per_s": n / max(seconds - fixed, 1e-9), "with_loading_cells_per_s": n / seconds}
            if label == "real_lengths" and "ours_for_original" in ctx:
                cos = cosine_rows(emb, ctx["ours_for_original"][: len(emb)])
                entry["cosine_ours_vs_original_mean"] = float(cos.mean())
                entry["cosine_ours_vs_original_min"] = float(cos.min())
            res["runs"].append(entry)
            log(f"original {label} batch {batch_size}: {entry['cells_per_s']:.0f} cells/s")
    return res


def _serve(model_dir: Path, device, ports: list[int], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scgpt_hf.cli", "serve", str(model_dir), "--device", device.type,
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_ready(proc: subprocess.Popen, timeout: float) -> str:
    """The server's output until it says it is ready; raises with that output if it exits or times out."""
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "Triton ready" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready.is_set() and proc.poll() is None:
        time.sleep(0.2)
    if ready.is_set():
        return "".join(lines)
    time.sleep(0.5)  # the last lines of a server that exited
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:.0f} s"
    raise RuntimeError(f"scgpt-hf serve {state}:\n{''.join(lines)[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def section_triton(ctx: dict) -> dict:
    import triton_throughput

    from scgpt_hf import embed
    from scgpt_hf.serving import TritonClient, free_port
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    device, model_dir = ctx["device"], ctx["model_dir"]
    ports = [free_port() for _ in range(3)]
    tokenizer_instances = 1 if QUICK else max(1, min(8, (os.cpu_count() or 2) // 2))
    settings = ["--max-batch-size", "64", "--instances", "1" if QUICK else "2",
                "--tokenizer-instances", str(tokenizer_instances)]
    res: dict = {"server": "scgpt-hf serve MODEL --device " + device.type + " " + " ".join(settings),
                 "cells_per_request": CELLS_PER_REQUEST, "cases": []}
    t0 = time.monotonic()
    proc = _serve(model_dir, device, ports, *settings)
    try:
        _wait_ready(proc, 600)
        res["start_seconds"] = time.monotonic() - t0
        log(f"triton ready in {res['start_seconds']:.0f} s")
        # A second server on the same ports is refused before it starts (it used to report the first's readiness).
        second = _serve(model_dir, device, ports)
        try:
            out, _ = second.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
            out, _ = second.communicate()
        res["second_server_refused"] = second.returncode == 2 and "already in use" in out
        res["second_server_message"] = out.strip().splitlines()[-1][:300] if out.strip() else ""

        url = f"127.0.0.1:{ports[1]}"
        client = TritonClient(url, "grpc", timeout=600)
        served = client.embed(ctx["real"][:N_SERVED].copy(), batch_size=16, concurrency=4).obsm["X_scGPT"]
        local = embed(ctx["real"][:N_SERVED].copy(), str(model_dir), device=device, progress=False).obsm["X_scGPT"]
        cos = cosine_rows(served, local)
        res["cosine_triton_vs_embed_mean"], res["cosine_triton_vs_embed_min"] = float(cos.mean()), float(cos.min())

        tok = ScGPTTokenizer.from_pretrained(str(model_dir))
        pad_value = float(json.loads((Path(model_dir) / "config.json").read_text())["pad_value"])
        regimes = [("real_lengths", ctx["tiled"][:1000])] + ([] if QUICK else [("1200_tokens", ctx["long"])])
        for label, adata in regimes:
            ids = client.gene_ids(list(adata.var_names))
            matched = tok.match_genes(list(adata.var_names)).ids
            X = adata.X.tocsr()
            wire = []
            for r in range(min(X.shape[0], 512)):
                cols, vals = X.indices[X.indptr[r]:X.indptr[r + 1]], X.data[X.indptr[r]:X.indptr[r + 1]]
                keep = ids[cols] >= 0
                wire.append((ids[cols][keep], vals[keep].astype(np.float32)))
            rows_of = lambda rng: rng.choice(len(wire), size=CELLS_PER_REQUEST, replace=False)  # noqa: E731

            def counts_request(rng):
                g, c = triton_throughput._request(wire, rows_of(rng))
                return {"gene_ids": g, "counts": c}

            def tokens_request(rng):
                rows = rows_of(rng)
                enc = tok.encode_with_ids(X[rows], matched, max_length=MAX_LENGTH, truncation="random", padding=True,
                                          return_tensors="np", seed=0, cls_value=pad_value)
                return {"input_ids": enc["input_ids"].astype(np.int64), "values": enc["values"].astype(np.float32),
                        "attention_mask": enc["attention_mask"].astype(np.int64)}

            for mode, model, make in (("tokenizer_in_server", "scgpt_embed", counts_request),
                                      ("tokenized_by_client", "scgpt_encoder", tokens_request)):
                per_thread = None
                for concurrency in CONCURRENCY:
                    if over_budget():
                        res["cases"].append({"lengths": label, "mode": mode, "concurrency": concurrency,
                                             "skipped": "time budget"})
                        continue
                    if per_thread is None:  # size the cases from one timed probe (quick mode: one request each)
                        per_thread = 1 if QUICK else max(3, int(SECONDS_PER_CASE * triton_throughput.run_case(
                            url, "grpc", model, make, CELLS_PER_REQUEST, 1, 3)["cells_per_s"] / CELLS_PER_REQUEST))
                    requests = max(1 if QUICK else 2, per_thread * min(concurrency, 8) // concurrency)
                    case = triton_throughput.run_case(url, "grpc", model, make, CELLS_PER_REQUEST, concurrency,
                                                      requests, warmup=0 if QUICK else 2)
                    case.update(lengths=label, mode=mode)
                    res["cases"].append(case)
                    log(f"triton {label} {mode} concurrency {concurrency}: {case['cells_per_s']:.0f} cells/s, "
                        f"p50 {case['p50_ms']:.0f} ms, p99 {case['p99_ms']:.0f} ms, errors {case['errors']}")
    finally:
        _stop(proc)
    res["oom"] = _oom_check(ctx, model_dir)
    return res


def _oom_check(ctx: dict, model_dir: Path) -> dict:
    """A dynamic batch too large for the GPU's memory: an error answer, and the server keeps serving."""
    import torch

    from scgpt_hf.serving import TritonClient, TritonServerError, free_port

    device = ctx["device"]
    if device.type != "cuda":
        return {"skipped": "no GPU: out-of-memory answers need CUDA"}
    total = torch.cuda.get_device_properties(device).total_memory
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    fraction = (weights + 384 * 2**20) / total  # the weights and a little room: 64 cells of 1,200 tokens do not fit
    ports = [free_port() for _ in range(3)]
    proc = _serve(model_dir, device, ports, "--gpu-memory-fraction", f"{fraction:.5f}")
    res: dict = {"gpu_memory_fraction": fraction}
    try:
        _wait_ready(proc, 600)
        client = TritonClient(f"127.0.0.1:{ports[1]}", "grpc", timeout=600, retries=0)
        vocab_ids = np.array(sorted(ctx["vocab"].values()))[:-3]
        rng = np.random.default_rng(0)
        big = rng.choice(vocab_ids, size=(64, MAX_LENGTH))
        inputs = {"input_ids": big.astype(np.int64), "values": rng.integers(1, 51, big.shape).astype(np.float32),
                  "attention_mask": np.ones(big.shape, dtype=np.int64)}
        try:
            client.infer("scgpt_encoder", inputs, ["cell_embedding"])
            res["big_request"] = "answered (fit in memory)"
        except TritonServerError as err:
            res["big_request"] = str(err)[:300]
        small = {k: v[:1, :100] for k, v in inputs.items()}
        res["small_request_after"] = list(client.infer("scgpt_encoder", small, ["cell_embedding"])["cell_embedding"].shape)
        res["oom_answered_and_kept_serving"] = "out of GPU memory" in res["big_request"]
    finally:
        _stop(proc)
    return res


# ----------------------------------------------------------------------------------------------
# Report


def _fmt(x, digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [f"GPU suite ({'quick mode, CPU' if env.get('quick') else env.get('gpu')}): torch "
             f"{env.get('versions', {}).get('torch')}, bf16 matmul {_fmt(env.get('bf16_matmul_tflops'))} TFLOP/s "
             "measured", "", "| measurement | cells/s | notes |", "|---|---|---|"]
    for run in report.get("embed", {}).get("runs", []):
        if "skipped" in run:
            continue
        lines.append(f"| `scgpt_hf.embed`, {run['lengths'].replace('_', ' ')}, batch {run['batch_size']} | "
                     f"{_fmt(run['embed_cells_per_s'])} | forward alone {_fmt(run['forward_auto_cells_per_s'])} "
                     f"cells/s, {_fmt(run['forward_auto_tflops'], 1)} TFLOP/s"
                     + (f" ({run['forward_auto_fraction_of_bf16_matmul']:.0%} of bf16 matmul)"
                        if run.get("forward_auto_fraction_of_bf16_matmul") else "") + " |")
    for label, entry in report.get("packed", {}).items():
        if isinstance(entry, dict) and "packed_cells_per_s" in entry:
            lines.append(f"| forward, padded -> packed, {label.replace('_', ' ')} cells per batch, real lengths | "
                         f"{_fmt(entry['padded_cells_per_s'])} -> {_fmt(entry['packed_cells_per_s'])} | padding "
                         f"{entry['padding_share']:.0%} of tokens; packed x{entry['packed_speedup']:.2f} |")
    emb = report.get("embed", {})
    for label in ("1200_tokens", "real_lengths"):
        if f"tokenizer_{label}_cells_per_s" in emb:
            lines.append(f"| tokenizer alone, {label.replace('_', ' ')} (one process) | "
                         f"{_fmt(emb[f'tokenizer_{label}_cells_per_s'])} | |")
    for run in report.get("original", {}).get("runs", []):
        if "skipped" not in run:
            lines.append(f"| original `embed_data`, {run['lengths'].replace('_', ' ')}, batch {run['batch_size']} | "
                         f"{_fmt(run['cells_per_s'])} | model loading excluded"
                         + (f"; cosine to ours {run['cosine_ours_vs_original_mean']:.4f}"
                            if "cosine_ours_vs_original_mean" in run else "") + " |")
    for case in report.get("triton", {}).get("cases", []):
        if "skipped" not in case:
            lines.append(f"| Triton {case['mode'].replace('_', ' ')}, {case['lengths'].replace('_', ' ')}, "
                         f"concurrency {case['concurrency']} | {_fmt(case['cells_per_s'])} | p50 "
                         f"{_fmt(case['p50_ms'])} ms, p99 {_fmt(case['p99_ms'])} ms, errors {case['errors']} |")
    lines += ["", "| check | result |", "|---|---|"]
    for name in ("correctness", "packed", "triton"):
        for key, value in report.get(name, {}).items():
            if key.startswith("cosine") or key in ("generative_sdpa_equals_eager", "forward_sync_free",
                                                   "second_server_refused", "generative_sdpa_vs_eager_max_abs",
                                                   "packed_forward_sync_free", "nested_vs_per_cell_max_abs"):
                lines.append(f"| {key} | {value:.6f} |" if isinstance(value, float) else f"| {key} | {value} |")
    oom = report.get("triton", {}).get("oom", {})
    if oom:
        lines.append(f"| oom_answered_and_kept_serving | {oom.get('oom_answered_and_kept_serving', oom.get('skipped'))} |")
    for name in ("environment", "correctness", "embed", "packed", "original", "triton"):
        if "error" in report.get(name, {}):
            lines.append(f"| {name} FAILED | {report[name]['error'][:200]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pack", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("scgpt_hf").setLevel(logging.ERROR)
    import torch

    from scgpt_hf.inference import autocast_dtype

    device = torch.device("cuda" if torch.cuda.is_available() and not QUICK else "cpu")
    report: dict = {}

    def run(name: str, fn, *fn_args):
        t0 = time.monotonic()
        log(f"{name} ...")
        try:
            report[name] = fn(*fn_args) or {}
        except Exception as err:  # noqa: BLE001 - every section reports its own failure and the others run
            report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            log(f"{name} FAILED: {report[name]['error']}")
        report[name]["seconds"] = round(time.monotonic() - t0, 1)
        (args.out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    run("environment", section_environment, device, args.out)
    with tempfile.TemporaryDirectory(prefix="scgpt_gpu_suite_") as tmp:
        ctx: dict = {"device": device, "dtype": autocast_dtype(device, "auto") or autocast_dtype(device, "bf16"),
                     "matmul_tflops": report["environment"].get("bf16_matmul_tflops")}

        def setup() -> dict:
            ctx["original"] = load_original()
            ctx.update(build_models(Path(tmp), ctx["original"]))
            ctx["real"] = real_cells(args.pack)
            ctx["tiled"] = tiled(ctx["real"], N_CELLS)
            ctx["long"] = long_cells(ctx["vocab"], N_CELLS if QUICK else 2048)
            ctx["n_original"] = 8 if QUICK else 1024
            return {"parameters": ctx["parameters"], "size": ctx["size"], "real_cells": int(ctx["real"].n_obs)}

        run("setup", setup)
        if "error" not in report["setup"]:
            run("correctness", section_correctness, ctx)
            run("embed", section_embed, ctx)
            run("packed", section_packed, ctx)
            run("original", section_original, ctx)
            run("triton", section_triton, ctx)
    report["total_seconds"] = round(time.monotonic() - START, 1)
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    (args.out / "gpu_report.md").write_text(table)
    print(table)
    return 0 if all("error" not in report.get(k, {}) for k in ("environment", "setup", "correctness", "embed",
                                                             "packed", "original", "triton")) else 1


if __name__ == "__main__":
    sys.exit(main())
