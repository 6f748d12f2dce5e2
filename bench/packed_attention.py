"""Benchmark: padded vs packed (padding-free) inference on real cell lengths, CPU.

`scgpt_hf.inference.run_cells(..., packed=False)` right-pads each length-grouped batch and masks attention;
`packed=True` concatenates the batch's cells into one row of tokens, so embeddings, feed-forward blocks and
norms see real tokens only and attention stays within each cell (`modeling_scgpt.packed_attention_forward`).
Model: whole-human width (d_model 512, 8 heads, d_hid 512; `--layers`, default 4, since every layer costs
the same and only the ratio matters) with random weights; cells: scirpy's wu2020 T cells (raw counts,
136-3,057 expressed genes, cut to 1,200 tokens as `embed` does).

Cases:
* attention alone on a few cells: padded SDPA with a mask, one SDPA per cell (packed, CPU), SDPA on nested
  jagged tensors (packed, CUDA's path; a slow reference on CPU) and flex_attention with a per-cell block mask
  (eager: compiling it costs minutes on this CPU and again for every new total length);
* serving: a dynamic batch of N random cells as the served encoder runs it, at the CPU token budget (4,096:
  length-grouped sub-batches of a few cells) and without a budget (one batch, as on a GPU);
* embed: a chunk of cells at the CPU token budget.
Each case prints the padded share of tokens, wall and CPU seconds (min of `--repeats`), cells per CPU-second,
the packed/padded speed ratio and the largest difference between the two embeddings.

    .venv/bin/python bench/packed_attention.py [--layers 4] [--repeats 2] [--batch-sizes 8,32,64] [--chunk 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MAX_LENGTH = 1200


def environment() -> dict:
    import torch

    from scgpt_hf.export.selfcheck import cpu_features

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "usable_cpus": len(os.sched_getaffinity(0)), "cpu_features": cpu_features(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_at_start": os.getloadavg()}


def setup(layers: int):
    """(model, each cell's token ids, values) for wu2020's cells, whole-human width, random weights."""
    import anndata
    import torch

    import reference
    from scgpt_hf import ScGPTConfig, ScGPTModel
    from scgpt_hf.pretraining import make_tokenizer

    adata = anndata.read_h5ad(reference.wu2020_path())
    genes = list(adata.var_names)
    tok = make_tokenizer(reference.make_vocab(len(genes), genes))
    config = ScGPTConfig(vocab_size=len(tok), hidden_size=512, num_attention_heads=8, intermediate_size=512,
                         num_hidden_layers=layers, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                         eoc_token_id=tok.convert_tokens_to_ids("<eoc>"))
    torch.manual_seed(0)
    model = ScGPTModel(config).eval()
    enc = tok.encode_with_ids(adata.X, tok.match_genes(genes).ids, max_length=MAX_LENGTH, truncation="random",
                              padding=False, return_tensors=None, seed=0, cls_value=float(config.pad_value))
    return model, [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]], \
        [np.asarray(x, dtype=np.float32) for x in enc["values"]]


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(min wall s, min CPU s, last result) over `repeats` calls."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), result


def attention_kernels(lengths: list[int], repeats: int) -> None:
    """Attention alone (8 heads x 64) over cells of `lengths`: padded+mask, per cell, nested jagged, flex."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from scgpt_hf.modeling_scgpt import _nested_attention, _per_cell_attention

    torch.manual_seed(0)
    total, longest = sum(lengths), max(lengths)
    q, k, v = (torch.randn(1, 8, total, 64) for _ in range(3))
    cu = torch.tensor(np.concatenate(([0], np.cumsum(lengths))))
    cells = torch.repeat_interleave(torch.arange(len(lengths)), cu.diff())
    padded = [torch.zeros(len(lengths), 8, longest, 64) for _ in range(3)]
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        for p, t in zip(padded, (q, k, v)):
            p[i, :, : b - a] = t[0, :, a:b]
    real = torch.arange(longest)[None] < torch.tensor(lengths)[:, None]
    block_mask = create_block_mask(lambda b, h, qi, ki: cells[qi] == cells[ki], None, None, total, total,
                                   device="cpu")
    scale = 64**-0.5
    cases = {  # each returns (total, heads, head_dim)
        "padded SDPA + mask": lambda: F.scaled_dot_product_attention(
            *padded, attn_mask=real[:, None, None, :]).transpose(1, 2)[real],
        "per cell SDPA (packed, CPU)": lambda: _per_cell_attention(q, k, v, cu, longest, scale)[0],
        "nested jagged SDPA (packed, CUDA path)": lambda: _nested_attention(q, k, v, cu, longest, scale)[0],
        "flex_attention, block mask, eager": lambda: flex_attention(
            q, k, v, block_mask=block_mask, scale=scale)[0].transpose(0, 1),
    }
    print(f"\nattention alone, {len(lengths)} cells, {total} tokens (longest {longest}), 8 heads x 64:")
    want = None
    with torch.inference_mode():
        for name, fn in cases.items():
            wall, cpu, out = timed(fn, repeats if name.startswith(("padded", "per cell")) else 1)
            want = out if want is None else want
            print(f"  {name:40s} {wall:7.3f} s wall {cpu:7.3f} s CPU  max |diff| to padded "
                  f"{float((out - want).abs().max()):.1e}", flush=True)


def compare(model, ids, vals, members: np.ndarray, max_tokens: int | None, repeats: int, label: str) -> dict:
    import torch

    from scgpt_hf.inference import length_groups, run_cells

    cell_ids, cell_vals = [ids[m] for m in members], [vals[m] for m in members]
    lengths = np.array([len(x) for x in cell_ids])
    padded_tokens = sum(len(g) * int(lengths[g].max()) for g in length_groups(lengths, len(lengths), max_tokens))
    run = dict(predict=lambda o: o.cell_embedding, batch_size=len(members), max_tokens=max_tokens,
               pad_id=model.config.pad_token_id, pad_value=float(model.config.pad_value),
               device=torch.device("cpu"), dtype=None)
    wall_pad, cpu_pad, emb_pad = timed(lambda: run_cells(model, cell_ids, cell_vals, packed=False, **run), repeats)
    wall_pk, cpu_pk, emb_pk = timed(lambda: run_cells(model, cell_ids, cell_vals, packed=True, **run), repeats)
    row = {"case": label, "cells": len(members), "budget": max_tokens or "none",
           "padding_share": 1 - lengths.sum() / padded_tokens, "padded_wall_s": wall_pad, "packed_wall_s": wall_pk,
           "padded_cells_per_cpu_s": len(members) / cpu_pad, "packed_cells_per_cpu_s": len(members) / cpu_pk,
           "max_abs_diff": float(np.abs(emb_pad - emb_pk).max())}
    row["speedup_wall"] = wall_pad / wall_pk
    row["speedup_cpu"] = cpu_pad / cpu_pk
    print(f"  {label:8s} {len(members):4d} cells budget {str(row['budget']):>5s}: padding {row['padding_share']:5.1%}  "
          f"padded {wall_pad:6.2f} s ({row['padded_cells_per_cpu_s']:5.2f} cells/CPU-s)  packed {wall_pk:6.2f} s "
          f"({row['packed_cells_per_cpu_s']:5.2f})  packed/padded speed x{row['speedup_wall']:.2f} wall, "
          f"x{row['speedup_cpu']:.2f} CPU  max |diff| {row['max_abs_diff']:.1e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-sizes", default="8,32,64", help="serving: cells per dynamic batch")
    parser.add_argument("--chunk", type=int, default=128, help="embed: cells per chunk")
    parser.add_argument("--attention-cells", type=int, default=4, help="attention alone: cells (0: skip)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # nested SDPA logs why each kernel is skipped
    print(environment())
    model, ids, vals = setup(args.layers)
    lengths = np.array([len(x) for x in ids])
    print(f"wu2020: {len(ids)} cells, tokens per cell (cut to {MAX_LENGTH}) min {lengths.min()} median "
          f"{int(np.median(lengths))} max {lengths.max()}; model d_model 512, 8 heads, {args.layers} layers")
    rng = np.random.default_rng(0)
    if args.attention_cells:
        attention_kernels(lengths[rng.choice(len(ids), args.attention_cells, replace=False)].tolist(), args.repeats)
    print("\nwhole forward, run_cells (padded vs packed):")
    for max_tokens in (4096, None):
        for n in (int(x) for x in args.batch_sizes.split(",")):
            compare(model, ids, vals, rng.choice(len(ids), n, replace=False), max_tokens, args.repeats, "serving")
    compare(model, ids, vals, rng.choice(len(ids), args.chunk, replace=False), 4096, args.repeats, "embed")


if __name__ == "__main__":
    main()
