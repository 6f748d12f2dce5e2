"""Demo: scGPT cell embeddings of real T cells (scirpy's Wu et al. 2020 subset, 200 cells) and their UMAP.

    python scripts/demo.py                      # pretrain a small scGPT here on the bundled data, then embed
    python scripts/demo.py --model PATH_OR_HUB  # a converted checkpoint folder or a Hub id instead
    python scripts/demo.py --retrain            # pretrain again instead of reusing outputs/pretrained_bundled

Without --model the demo first runs `scgpt_hf.pretraining.pretrain` (what `scgpt-hf pretrain` runs) on the
real data bundled with the environment: the wu2020 cells (raw counts) and scanpy's pbmc68k_reduced cells
(their `.raw` log-normalised values; `.X` there is scaled and unusable), streamed from the backed files. The
model (2 layers, width 64, a vocabulary of 2,000 variable wu2020 genes plus the pbmc68k genes) is cached in outputs/pretrained_bundled and
reused by later runs with the same settings. Only 900 cells and a few minutes of CPU: a small demonstration
of pretraining, not a foundation model. At this budget the cell embedding mostly tracks each cell's number of
expressed genes (the silhouettes printed say how much subset structure it holds; compare a converted
checkpoint with --model).

Writes outputs/wu2020_scgpt.h5ad (obsm["X_scGPT"], obs["X_scGPT_n_genes"], uns["X_scGPT_params"],
uns["demo_weights"], uns["demo_silhouette"]) and outputs/wu2020_umap.png, coloured by the original cell subset
labels (obs["cluster_orig"]). The run says which weights were used on stdout, in the h5ad and in the picture's
title, and prints the silhouette of the cluster_orig labels on the embedding next to the same architecture
with random weights and to PCA of log1p counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import textwrap
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LABELS = "cluster_orig"


def wu2020_path() -> Path:
    """scirpy's bundled file, located without importing scirpy (installed with --no-deps)."""
    spec = importlib.util.find_spec("scirpy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "tests" / "data" / "wu2020_200_v0_11.h5ad"
        if path.is_file():
            return path
    raise FileNotFoundError("scirpy's wu2020 file is missing: pip install --no-deps scirpy==0.22.5")


def pbmc68k_path() -> Path:
    """scanpy's bundled pbmc68k_reduced file."""
    spec = importlib.util.find_spec("scanpy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "10x_pbmc68k_reduced.h5ad"
        if path.is_file():
            return path
    raise FileNotFoundError("scanpy's pbmc68k_reduced file is missing: pip install scanpy")


# Small enough to pretrain in about 2-3 minutes on a 2-core CPU.
PRETRAIN = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_length=256, mask_ratio=0.4,
    batch_size=16, learning_rate=1e-3, dropout=0.1,
)


def training_files(folder: Path) -> list[Path]:
    """wu2020 as bundled, and pbmc68k_reduced's log-normalised `.raw` written as an h5ad of its own."""
    import anndata

    folder.mkdir(parents=True, exist_ok=True)
    pbmc = folder / "pbmc68k_reduced_raw.h5ad"
    if not pbmc.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            source = anndata.read_h5ad(pbmc68k_path())
        raw = source.raw.to_adata()
        anndata.AnnData(X=raw.X, obs=source.obs[["bulk_labels"]].copy(), var=raw.var[[]]).write_h5ad(pbmc)
    return [wu2020_path(), pbmc]


def demo_vocab(files: list[Path], n_variable: int = 2000) -> dict[str, int]:
    """The wu2020 genes most variable in log1p counts plus every pbmc68k gene, then <pad>, <cls>, <eoc>.

    Not all 30,727 genes: with so little training most would be seen a handful of times, and a cell's 256
    tokens would be a random draw from ~1,000 mostly housekeeping genes.
    """
    import anndata
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wu, pbmc = anndata.read_h5ad(files[0]), anndata.read_h5ad(files[1], backed="r")
    logged = wu.X.astype(np.float32)
    logged.data = np.log1p(logged.data)
    mean = np.asarray(logged.mean(axis=0)).ravel()
    variance = np.asarray(logged.multiply(logged).mean(axis=0)).ravel() - mean**2
    genes = list(wu.var_names[np.argsort(-variance, kind="stable")[:n_variable]]) + list(pbmc.var_names)
    pbmc.file.close()
    vocab = {g: i for i, g in enumerate(dict.fromkeys(genes))}
    for token in ("<pad>", "<cls>", "<eoc>"):
        vocab[token] = len(vocab)
    return vocab


def pretrained_here(out: Path, steps: int, seed: int, retrain: bool) -> tuple[Path, str]:
    """Pretrain on the bundled data (or reuse the cached result with the same settings); (folder, description)."""
    from scgpt_hf.pretraining import METRICS_FILE, pretrain

    folder = out / "pretrained_bundled"
    settings = {**PRETRAIN, "max_steps": steps, "seed": seed, "vocab": "wu2020 top-2000 variable + pbmc68k genes"}
    stamp = folder / "demo_settings.json"
    cached = (folder / METRICS_FILE).is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings
    if cached and not retrain:
        print(f"Reusing the model pretrained earlier in {folder} (--retrain to pretrain again).")
    else:
        files = training_files(out / "pretrain_data")
        print(f"Pretraining a small scGPT ({PRETRAIN['num_hidden_layers']} layers, width {PRETRAIN['hidden_size']}) "
              f"for {steps} steps on {', '.join(p.name for p in files)} ...", flush=True)
        vocab = demo_vocab(files)
        print(f"  vocabulary: {len(vocab) - 3} genes (2,000 most variable of wu2020 + pbmc68k's)", flush=True)
        pretrain(files, folder, tokenizer=vocab, max_steps=steps, seed=seed, logging_steps=max(1, steps // 10),
                 overwrite=True, **PRETRAIN)  # replaces an older cache whole, only once the new one is complete
        stamp.write_text(json.dumps(settings))
    metrics = json.loads((folder / METRICS_FILE).read_text())
    print(f"  {metrics['global_step']} steps ({metrics['epochs_seen']:.1f} epochs of {metrics['cells_in_files']} cells), "
          f"masked-expression+MVC loss {metrics['first_loss']:.4g} -> {metrics['final_loss']:.4g}, "
          f"trained in {metrics['train_runtime_s']:.0f} s.")
    description = (
        f"pretrained here on the bundled data for {metrics['global_step']} steps "
        f"({PRETRAIN['num_hidden_layers']} layers, width {PRETRAIN['hidden_size']}; {folder.name})"
    )
    return folder, description


def random_twin(folder: Path, seed: int):
    """The same architecture and tokenizer as the model in `folder`, with random weights (the baseline)."""
    import torch

    from scgpt_hf.configuration_scgpt import ScGPTConfig
    from scgpt_hf.modeling_scgpt import ScGPTModel

    torch.manual_seed(seed)
    return ScGPTModel(ScGPTConfig.from_pretrained(folder)).eval()


def silhouettes(adata, labels: str, seed: int) -> dict[str, float]:
    """Silhouette of the `labels` groups on the scGPT embedding and on PCA(50) of log1p-normalised counts."""
    import numpy as np
    import scanpy as sc
    from sklearn.metrics import silhouette_score

    ok = adata.obs["X_scGPT_n_genes"].to_numpy() > 0
    emb = adata.obsm["X_scGPT"][ok]
    lineage = adata.obs[labels].astype(str).str.split(".").str[0][ok]  # CD4 (4.x) / CD8 (8.x) / 3.x
    scores = {"scGPT": float(silhouette_score(emb, adata.obs[labels][ok], metric="cosine")),
              "scGPT_lineage": float(silhouette_score(emb, lineage, metric="cosine"))}
    expr = adata[ok].copy()
    sc.pp.normalize_total(expr, target_sum=1e4)
    sc.pp.log1p(expr)
    pcs = sc.pp.pca(expr.X.toarray() if hasattr(expr.X, "toarray") else expr.X, n_comps=50, random_state=seed)
    scores["pca_log1p"] = float(silhouette_score(pcs, expr.obs[labels], metric="cosine"))
    scores["pca_log1p_lineage"] = float(silhouette_score(pcs, lineage, metric="cosine"))
    return {k: round(v, 4) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="converted scGPT folder or Hub id (default: pretrain a small model here)")
    parser.add_argument("--steps", type=int, default=120, help="pretraining steps without --model (default 120)")
    parser.add_argument("--retrain", action="store_true", help="pretrain again even if outputs/ has the model")
    parser.add_argument("--out-dir", default=str(ROOT / "outputs"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import anndata
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from scgpt_hf.atomic import atomic_output
    from scgpt_hf.embedding import embed

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adata = anndata.read_h5ad(wu2020_path())
    print(f"Data: {adata.n_obs} T cells x {adata.n_vars} genes (raw counts), Wu et al. 2020 via scirpy.")

    if args.model:
        model, max_length = args.model, 1200
        weights = f"given model {args.model}"
    else:
        folder, description = pretrained_here(out, args.steps, args.seed, args.retrain)
        model, max_length = str(folder), PRETRAIN["max_length"]
        weights = description
    print(f"Weights: {weights}.")
    embed(adata, model, seed=args.seed, max_length=max_length, progress=False)
    scores = silhouettes(adata, LABELS, args.seed)
    if not args.model:  # the same architecture with random weights, for comparison
        baseline = adata.copy()
        embed(baseline, random_twin(folder, args.seed), str(folder), seed=args.seed, max_length=max_length,
              progress=False)
        random_scores = silhouettes(baseline, LABELS, args.seed)
        scores["scGPT_random_weights"] = random_scores["scGPT"]
        scores["scGPT_random_weights_lineage"] = random_scores["scGPT_lineage"]
    print(f"Silhouette of obs[{LABELS!r}] (cosine; higher = subsets better separated): "
          + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    adata.uns["demo_weights"] = weights
    adata.uns["demo_silhouette"] = scores

    ok = adata.obs["X_scGPT_n_genes"].to_numpy() > 0
    shown = adata[ok].copy()
    sc.pp.neighbors(shown, use_rep="X_scGPT", random_state=args.seed)
    sc.tl.umap(shown, random_state=args.seed)
    umap = np.full((adata.n_obs, 2), np.nan, dtype=np.float32)  # NaN for cells without an embedding
    umap[ok] = shown.obsm["X_umap"]
    adata.obsm["X_umap"] = umap
    h5ad = out / "wu2020_scgpt.h5ad"
    with atomic_output(h5ad, overwrite=True) as staging:  # a kill never leaves a half-written file
        adata.write_h5ad(staging)

    fig, ax = plt.subplots(figsize=(8, 6))
    sc.pl.umap(shown, color=LABELS, ax=ax, show=False, title=f"wu2020 T cells, scGPT embedding (silhouette {scores['scGPT']:.3f})\n"
              + "\n".join(textwrap.wrap(weights, 60)))
    ax.title.set_fontsize(9)
    fig.tight_layout()
    png = out / "wu2020_umap.png"
    with atomic_output(png, overwrite=True) as staging:
        fig.savefig(staging, dpi=120, format="png")
    print(f"Wrote {h5ad} (obsm['X_scGPT'], obsm['X_umap']) and {png} (coloured by obs[{LABELS!r}]).")


if __name__ == "__main__":
    main()
