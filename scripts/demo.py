"""Demo: scGPT cell embeddings of real T cells (scirpy's Wu et al. 2020 subset, 200 cells) and their UMAP.

    python scripts/demo.py                      # small model with RANDOM weights (no download needed)
    python scripts/demo.py --model PATH_OR_HUB  # a converted checkpoint folder or a Hub id

Writes outputs/wu2020_scgpt.h5ad (obsm["X_scGPT"], obs["X_scGPT_n_genes"], uns["X_scGPT_params"],
uns["demo_weights"]) and outputs/wu2020_umap.png, coloured by the original cell subset labels
(obs["cluster_orig"]). Without --model the weights are random: any structure in the picture comes from the
cells' binned expression passed through an untrained network, not from learned biology. The run says which
weights were used on stdout, in the h5ad and in the picture's title.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
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


def random_small_model(gene_names: list[str], folder: Path, seed: int):
    """A 2-layer, 64-wide scGPT with random weights over this dataset's genes, and its tokenizer."""
    import torch

    from scgpt_hf.configuration_scgpt import ScGPTConfig
    from scgpt_hf.modeling_scgpt import ScGPTModel
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    vocab = {g: i for i, g in enumerate(dict.fromkeys(gene_names))}
    for token in ("<pad>", "<cls>", "<eoc>"):
        vocab[token] = len(vocab)
    vocab_file = folder / "vocab.json"
    vocab_file.write_text(json.dumps(vocab))
    config = ScGPTConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"], eoc_token_id=vocab["<eoc>"],
    )
    torch.manual_seed(seed)
    return ScGPTModel(config).eval(), ScGPTTokenizer(str(vocab_file))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="converted scGPT folder or Hub id (default: small model, random weights)")
    parser.add_argument("--out-dir", default=str(ROOT / "outputs"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import anndata
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from scgpt_hf.embedding import embed

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adata = anndata.read_h5ad(wu2020_path())
    print(f"Data: {adata.n_obs} T cells x {adata.n_vars} genes (raw counts), Wu et al. 2020 via scirpy.")

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            weights = f"pretrained weights from {args.model}"
            print(f"Weights: {weights}.")
            embed(adata, args.model, seed=args.seed)
        else:
            weights = "RANDOM weights (small untrained model: 2 layers, width 64) - not a trained scGPT"
            print(f"Weights: {weights}. Pass --model PATH_OR_HUB_ID for real embeddings.")
            model, tokenizer = random_small_model(list(adata.var_names), Path(tmp), args.seed)
            embed(adata, model, tokenizer, seed=args.seed)
    adata.uns["demo_weights"] = weights

    ok = adata.obs["X_scGPT_n_genes"].to_numpy() > 0
    shown = adata[ok].copy()
    sc.pp.neighbors(shown, use_rep="X_scGPT", random_state=args.seed)
    sc.tl.umap(shown, random_state=args.seed)
    umap = np.full((adata.n_obs, 2), np.nan, dtype=np.float32)  # NaN for cells without an embedding
    umap[ok] = shown.obsm["X_umap"]
    adata.obsm["X_umap"] = umap
    h5ad = out / "wu2020_scgpt.h5ad"
    adata.write_h5ad(h5ad)

    fig, ax = plt.subplots(figsize=(8, 6))
    sc.pl.umap(shown, color=LABELS, ax=ax, show=False, title=f"wu2020 T cells, scGPT embedding\n{weights}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    png = out / "wu2020_umap.png"
    fig.savefig(png, dpi=120)
    print(f"Wrote {h5ad} (obsm['X_scGPT'], obsm['X_umap']) and {png} (coloured by obs[{LABELS!r}]).")


if __name__ == "__main__":
    main()
