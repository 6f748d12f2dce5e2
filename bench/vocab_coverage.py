"""Benchmark: how a cell embedding degrades when part of the cell's expressed genes is missing from the vocabulary.

This is the measurement behind the low-coverage warning of `scgpt_hf.embed` / `annotate` (README, "Results
written into AnnData"). Real cells: scirpy's Wu et al. 2020 T cells (200 cells, raw counts). For each kept
fraction of the model's vocabulary genes (a seeded random subset; the others are renamed so they no longer
match, as genes under another naming would), every cell is embedded again and compared with its embedding
from all genes:

* cosine: each cell's cosine to its own full-gene embedding (mean and 5th percentile over cells), next to
  the mean cosine between two different cells' full-gene embeddings (what "no information" looks like);
  all after subtracting the mean full-gene embedding of the 200 cells: the embeddings of these small models
  share one dominant direction (raw cosine between two different cells is 0.9999), which hides what is
  specific to a cell;
* self-retrieval: the fraction of cells whose nearest full-gene embedding is their own;
* 10-NN overlap: the mean fraction of a cell's 10 nearest neighbours (cosine) that stay its neighbours.

"coverage" is the fraction of the cells' non-zero entries whose gene the model still knows (what the
warning reports), relative to the full-gene run; "all, seed 1" is the noise floor (all genes, another
seed: other tie-breaking in binning, other genes kept past max_length, which is the model's max_seq_len).
Two models: random weights over all wu2020 genes (the architecture's own sensitivity) and the demo's
briefly pretrained model (scripts/demo.py: 2 layers, width 64, 120 steps on the bundled cells, cached in
outputs/pretrained_bundled). The README's table is from `--seeds 2`.

    python bench/vocab_coverage.py [--seeds 3] [--out outputs/vocab_coverage.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

LEVELS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def random_model(genes: list[str], folder: Path):
    """Demo-sized ScGPTModel with random weights over `genes`, saved with its tokenizer; returns the folder."""
    import torch

    from scgpt_hf import ScGPTConfig, ScGPTModel, ScGPTTokenizer

    vocab = {g: i for i, g in enumerate(genes)} | {"<pad>": len(genes), "<cls>": len(genes) + 1,
                                                   "<eoc>": len(genes) + 2}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    ScGPTTokenizer(str(folder / "vocab.json")).save_pretrained(folder)
    torch.manual_seed(0)
    config = ScGPTConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, pad_token_id=len(genes), cls_token_id=len(genes) + 1,
                         eoc_token_id=len(genes) + 2)
    ScGPTModel(config).eval().save_pretrained(folder)
    return folder


def scores(full: np.ndarray, other: np.ndarray, k: int = 10) -> dict[str, float]:
    """Agreement of `other` with `full` (cells x dims), after removing the full embeddings' mean direction."""
    mean = full.mean(axis=0)

    def centred(x: np.ndarray) -> np.ndarray:
        x = x - mean
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    full, other = centred(full), centred(other)
    own = np.sum(full * other, axis=1)
    cross = other @ full.T
    pair = full @ full.T
    n = len(full)
    off = ~np.eye(n, dtype=bool)

    def neighbours(sim: np.ndarray) -> np.ndarray:
        sim = np.where(off, sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    a, b = neighbours(pair), neighbours(other @ other.T)
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])
    return {
        "cosine_mean": float(own.mean()),
        "cosine_p5": float(np.percentile(own, 5)),
        "self_retrieval": float(np.mean(cross.argmax(axis=1) == np.arange(n))),
        "knn10_overlap": float(overlap),
        "cosine_between_cells": float(pair[off].mean()),
    }


def measure(name: str, folder: Path, adata, seeds: int) -> list[dict]:
    from scgpt_hf import ScGPTConfig, ScGPTTokenizer, embed

    tokenizer = ScGPTTokenizer.from_pretrained(str(folder))
    max_length = min(1200, ScGPTConfig.from_pretrained(str(folder)).max_seq_len)  # as the model was trained
    names = np.asarray(adata.var_names.astype(str))
    known = np.flatnonzero(tokenizer.match_genes(list(names)).ids >= 0)
    nnz = np.diff(adata.X.tocsc().indptr)
    full = embed(adata.copy(), str(folder), max_length=max_length, progress=False).obsm["X_scGPT"]
    # The noise floor: all genes, another seed (other tie-breaking in binning, other genes kept past max_length).
    other_seed = embed(adata.copy(), str(folder), max_length=max_length, seed=1, progress=False).obsm["X_scGPT"]
    rows = [{"model": name, "kept_genes": "all, seed 1", "seed": 1, "coverage": 1.0,
             "coverage_of_all_expressed": float(nnz[known].sum() / nnz.sum()), "cells_without_genes": 0,
             **scores(full, other_seed)}]
    print(json.dumps(rows[0]), flush=True)
    for level in LEVELS:
        for seed in range(seeds if level < 1 else 1):
            keep = np.random.default_rng(seed).permutation(known)[: int(round(level * known.size))]
            renamed = names.copy()
            dropped = np.setdiff1d(known, keep)
            renamed[dropped] = [f"unmatched_{i}" for i in range(dropped.size)]
            cells = adata.copy()
            cells.var_names = renamed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                emb = embed(cells, str(folder), max_length=max_length, progress=False).obsm["X_scGPT"]
            ok = ~np.isnan(emb).any(axis=1)
            row = {"model": name, "kept_genes": level, "seed": seed,
                   "coverage": float(nnz[keep].sum() / nnz[known].sum()),
                   "coverage_of_all_expressed": float(nnz[keep].sum() / nnz.sum()),
                   "cells_without_genes": int((~ok).sum()), **scores(full[ok], emb[ok])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="random gene subsets per level")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "vocab_coverage.json"))
    args = parser.parse_args(argv)

    import anndata

    from demo import pretrained_here, wu2020_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adata = anndata.read_h5ad(wu2020_path())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    demo_folder, _ = pretrained_here(ROOT / "outputs", 120, 0, retrain=False)
    random_folder = random_model(list(adata.var_names), out.parent / "random_wu2020")
    rows = measure("random weights, all wu2020 genes", random_folder, adata, args.seeds)
    rows += measure("demo pretrained (120 steps)", demo_folder, adata, args.seeds)
    out.write_text(json.dumps(rows, indent=1))

    print("\n| model | kept genes | coverage (nnz) | cosine to full (mean / 5th pct) | self-retrieval "
          "| 10-NN overlap |")
    print("|---|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in rows):
        for level in ("all, seed 1", *LEVELS):
            group = [r for r in rows if r["model"] == model and r["kept_genes"] == level]
            mean = {k: np.mean([r[k] for r in group]) for k in ("coverage", "cosine_mean", "cosine_p5",
                                                                   "self_retrieval", "knn10_overlap")}
            kept = level if isinstance(level, str) else f"{level:.0%}"
            print(f"| {model} | {kept} | {mean['coverage']:.2f} | {mean['cosine_mean']:.3f} / "
                  f"{mean['cosine_p5']:.3f} | {mean['self_retrieval']:.2f} | {mean['knn10_overlap']:.2f} |")
        between = [r["cosine_between_cells"] for r in rows if r["model"] == model and r["kept_genes"] == 1.0]
        print(f"| {model} | (two different cells, all genes) | | {between[0]:.3f} | | |")
    print(f"\nWrote {out}")


if __name__ == "__main__":
    main()
