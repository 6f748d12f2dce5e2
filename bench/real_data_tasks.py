"""Real-data figures for the task heads: cell-type annotation (pbmc68k_reduced) and batch integration (wu2020).

    python bench/real_data_tasks.py                         # pretrain a small model here, then both tasks
    python bench/real_data_tasks.py --model-dir DIR         # reuse a model pretrained by scgpt_hf.pretrain
    python bench/real_data_tasks.py --json results.json     # also write every figure as JSON

One run, on CPU, in a few minutes on 2 cores. Stages (each timed):

0. Pretraining. `scgpt_hf.pretrain` (what `scgpt-hf pretrain` runs) on the real data bundled with the
   environment, as the demo does (`scripts/demo.py`): scirpy's wu2020 cells (raw counts) and scanpy's
   pbmc68k_reduced cells (`.raw`, log-normalised), streamed from backed files; vocabulary = the 2,000 most
   variable wu2020 genes + pbmc68k's 765 genes. The pretraining is unsupervised but sees every cell of both
   tasks (the annotation test cells included, without their labels): a transductive setting, said so here.
1. Annotation on pbmc68k_reduced (`.raw` values, labels `obs["bulk_labels"]`, 10 types, 700 cells), split
   70/30 stratified with the seed. `ScGPTForCellClassification.from_pretrained(pretrained)` is fine-tuned with
   `transformers.Trainer` on the 70 %, and `scgpt_hf.annotate` labels the 30 %. Reported: accuracy and macro-F1
   on the test cells, beside a scikit-learn LogisticRegression on the same 765 genes (the log-normalised
   values) and split, the majority class (chance), and two controls: the same fine-tuning from random
   weights (does the pretraining help?) and a LogisticRegression on the frozen pretrained embedding.
2. Integration on wu2020 (200 T cells, 14 patients as batches, `obs["cluster_orig"]` subsets).
   `ScGPTForBatchIntegration.from_pretrained(pretrained)` with batch labels, elastic cell similarity and the
   adversarial batch discriminator (no domain-specific batch norm) is fine-tuned with `Trainer`. Reported:
   cosine silhouette of the cell embedding on `cluster_orig` (and on the CD4/CD8 lineage read off it;
   higher = cell types better separated) and on `patient` (lower = batches better mixed), for: PCA(50) of
   log1p-normalised counts, the pretrained embedding (`scgpt_hf.embed`), the integration model after
   fine-tuning (cell embeddings computed with batch labels, model run in eval mode through the training
   collator like the control; `embed(..., batch_key=)` differs only in the `<cls>` value) and, as a control, the same steps of masked-expression + MVC
   training without any batch term (`ScGPTForPreTraining`), to separate the effect of the integration
   objective from that of more training on these cells.

The models are small (default 2 layers, width 128) and briefly trained: the figures show the heads and the
training loop work on real cells; they are not the original scGPT's numbers.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import demo  # noqa: E402  (the demo's data locations, training files and vocabulary)

LABELS = "bulk_labels"
SUBSETS = "cluster_orig"
BATCH = "patient"


class Stages:
    """Wall time per stage, printed as it goes."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n== {name} ==", flush=True)
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - started, 1)
        print(f"-- {name}: {self.times[name]:.1f} s wall", flush=True)
        return result

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self._start, 1)


def environment() -> dict[str, str]:
    import anndata
    import scanpy
    import sklearn
    import torch
    import transformers

    import scgpt_hf

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        commit += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "usable_cpus": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "cuda": str(torch.cuda.is_available()),
        "transformers": transformers.__version__,
        "scanpy": scanpy.__version__,
        "anndata": anndata.__version__,
        "scikit-learn": sklearn.__version__,
        "scgpt_hf": scgpt_hf.__version__,
        "git_commit": commit,
    }


# ----------------------------------------------------------------------------------------------
# Shared pieces


def trainer_fit(model, dataset, collator, *, steps: int, lr: float, batch_size: int, seed: int) -> dict:
    """Train with transformers.Trainer on CPU; returns first/last logged losses and the step count."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    with tempfile.TemporaryDirectory(prefix="scgpt_bench_") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            warmup_steps=max(1, steps // 20),
            lr_scheduler_type="linear",
            weight_decay=0.0,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.remove_callback(PrinterCallback)
        result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    summary = {
        "steps": int(trainer.state.global_step),
        "epochs": round(trainer.state.global_step * batch_size / len(dataset), 1),
        "first_loss": round(float(losses[0]), 4) if losses else None,
        "last_loss": round(float(losses[-1]), 4) if losses else None,
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 1),
    }
    print(f"  Trainer: {summary['steps']} steps ({summary['epochs']} epochs of {len(dataset)} cells), "
          f"logged loss {summary['first_loss']} -> {summary['last_loss']}", flush=True)
    return summary


def quiet():
    """Silence FutureWarnings from old h5ad layouts and transformers' per-load chatter."""
    warnings.simplefilter("ignore", FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------------
# Stage 0: pretraining


PRETRAIN = dict(demo.PRETRAIN)  # 4 heads, 256 tokens, mask 0.4, batch 16, lr 1e-3, dropout 0.1 (size from the options)


def pretrain_stage(args) -> tuple[Path, dict]:
    from scgpt_hf.pretraining import METRICS_FILE, pretrain

    if args.model_dir:
        folder = Path(args.model_dir)
        print(f"Reusing the pretrained model in {folder} (read-only).")
    else:
        out = Path(args.out_dir)
        folder = out / "pretrained"
        files = demo.training_files(out / "pretrain_data")
        vocab = demo.demo_vocab(files)
        settings = {**PRETRAIN, "hidden_size": args.hidden_size, "num_hidden_layers": args.layers}
        print(f"Pretraining ({settings['num_hidden_layers']} layers, width {settings['hidden_size']}, "
              f"{args.pretrain_steps} steps, batch {settings['batch_size']}) on {', '.join(p.name for p in files)}; "
              f"vocabulary {len(vocab) - 3} genes.", flush=True)
        pretrain(files, folder, tokenizer=vocab, max_steps=args.pretrain_steps, seed=args.seed,
                 logging_steps=max(1, args.pretrain_steps // 10), **settings)
    metrics = json.loads((folder / METRICS_FILE).read_text()) if (folder / METRICS_FILE).is_file() else {}
    info = {
        "folder": str(folder),
        "steps": metrics.get("global_step"),
        "epochs_seen": round(metrics["epochs_seen"], 2) if "epochs_seen" in metrics else None,
        "cells_in_files": metrics.get("cells_in_files"),
        "first_loss": metrics.get("first_loss"),
        "final_loss": metrics.get("final_loss"),
        "model": metrics.get("model"),
    }
    if metrics:
        print(f"  {info['steps']} steps ({info['epochs_seen']} epochs of {info['cells_in_files']} cells); "
              f"masked-expression+MVC loss {info['first_loss']:.4g} -> {info['final_loss']:.4g}; model {info['model']}")
    return folder, info


# ----------------------------------------------------------------------------------------------
# Stage 1: annotation


def pbmc_cells():
    """pbmc68k_reduced's log-normalised `.raw` as the matrix, with `bulk_labels`."""
    import anndata
    import scanpy as sc

    source = sc.datasets.pbmc68k_reduced()
    raw = source.raw.to_adata()
    return anndata.AnnData(X=raw.X.copy(), obs=source.obs[[LABELS]].copy(), var=raw.var[[]].copy())


def scores(truth, predicted, labels) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": round(float(accuracy_score(truth, predicted)), 4),
        "macro_f1": round(float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)), 4),
    }


def annotation_stage(folder: Path, args) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from transformers import set_seed

    from scgpt_hf import ScGPTConfig, ScGPTForCellClassification, ScGPTTokenizer, annotate, embed
    from scgpt_hf.data import CellDataset, ScGPTDataCollator

    adata = pbmc_cells()
    y = adata.obs[LABELS].astype(str).to_numpy()
    classes = sorted(set(y))
    train_idx, test_idx = train_test_split(
        np.arange(adata.n_obs), test_size=0.3, stratify=y, random_state=args.seed
    )
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    print(f"pbmc68k_reduced: {adata.n_obs} cells x {adata.n_vars} genes (.raw, log-normalised), "
          f"{len(classes)} {LABELS}; train {train.n_obs}, test {test.n_obs} (stratified, seed {args.seed}).")

    tokenizer = ScGPTTokenizer.from_pretrained(str(folder))
    max_length = int(ScGPTConfig.from_pretrained(str(folder)).max_seq_len)
    dataset = CellDataset(tokenizer, train, label_key=LABELS, seed=args.seed, max_length=max_length)
    id2label = {i: name for name, i in dataset.label2id.items()}
    collator = ScGPTDataCollator(tokenizer)
    results: dict = {"n_train": int(train.n_obs), "n_test": int(test.n_obs), "n_classes": len(classes),
                     "max_length": max_length}

    def fine_tune(pretrained: bool) -> dict:
        set_seed(args.seed)
        if pretrained:
            model = ScGPTForCellClassification.from_pretrained(
                str(folder), num_labels=len(id2label), id2label=id2label, label2id=dataset.label2id,
                train_new_weights=True,
            )
        else:
            config = ScGPTConfig.from_pretrained(
                str(folder), num_labels=len(id2label), id2label=id2label, label2id=dataset.label2id
            )
            model = ScGPTForCellClassification(config)
        training = trainer_fit(model, dataset, collator, steps=args.cls_steps, lr=args.cls_lr,
                               batch_size=args.batch_size, seed=args.seed)
        cells = test.copy()
        annotate(cells, model, tokenizer, max_length=max_length, seed=args.seed, progress=False)
        predicted = cells.obs["scGPT_label"].astype(str).to_numpy()
        return {**scores(test.obs[LABELS].astype(str), predicted, classes), "training": training}

    print("Fine-tuning ScGPTForCellClassification from the pretrained model:")
    results["scgpt_finetuned"] = fine_tune(pretrained=True)
    if not args.skip_controls:
        print("Control: the same fine-tuning from random weights:")
        results["scgpt_random_init"] = fine_tune(pretrained=False)

    dense = lambda m: m.toarray() if sp.issparse(m) else np.asarray(m)  # noqa: E731
    logreg = LogisticRegression(max_iter=5000)
    logreg.fit(dense(train.X), train.obs[LABELS].astype(str))
    results["logistic_regression_genes"] = scores(test.obs[LABELS].astype(str), logreg.predict(dense(test.X)), classes)

    if not args.skip_controls:
        both = adata.copy()
        embed(both, str(folder), max_length=max_length, seed=args.seed, progress=False)
        emb = np.nan_to_num(both.obsm["X_scGPT"])
        frozen = LogisticRegression(max_iter=5000).fit(emb[train_idx], y[train_idx])
        results["logistic_regression_frozen_embedding"] = scores(y[test_idx], frozen.predict(emb[test_idx]), classes)

    values, counts = np.unique(train.obs[LABELS].astype(str), return_counts=True)
    majority = values[np.argmax(counts)]
    results["chance_majority_class"] = {
        **scores(test.obs[LABELS].astype(str), np.full(test.n_obs, majority), classes), "class": str(majority)
    }
    return results


# ----------------------------------------------------------------------------------------------
# Stage 2: integration


KNN = 10


def knn_agreement(emb, labels) -> float:
    """Fraction of each cell's 10 nearest neighbours (cosine, itself excluded) sharing its label, averaged."""
    import numpy as np
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels)
    _, idx = NearestNeighbors(n_neighbors=KNN + 1, metric="cosine").fit(emb).kneighbors(emb)
    return float((labels[idx[:, 1:]] == labels[:, None]).mean())


def random_agreement(labels) -> float:
    """`knn_agreement` expected when neighbours are drawn at random (no structure, perfect mixing)."""
    import numpy as np

    _, counts = np.unique(np.asarray(labels), return_counts=True)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def lineage_of(obs):
    return obs[SUBSETS].astype(str).str.split(".").str[0]  # CD4 (4.x) / CD8 (8.x) / 3.x


def silhouettes(emb, obs, seed: int) -> dict[str, float]:
    """Cosine silhouettes on subsets, lineage and patients, and the 10-NN label agreement beside them."""
    import numpy as np
    from sklearn.metrics import silhouette_score

    ok = np.isfinite(emb).all(axis=1)
    groups = {SUBSETS: obs[SUBSETS].astype(str), "lineage": lineage_of(obs), BATCH: obs[BATCH].astype(str)}
    result: dict[str, float] = {}
    for name, labels in groups.items():
        labels = labels.to_numpy()[ok]
        result[f"silhouette_{name}"] = round(float(silhouette_score(emb[ok], labels, metric="cosine")), 4)
        result[f"knn{KNN}_agreement_{name}"] = round(knn_agreement(emb[ok], labels), 4)
    result["n_cells"] = int(ok.sum())
    return result


def model_embeddings(model, dataset, collator, batch_size: int = 64):
    """Cell embeddings (L2-normalised) of `model` in eval mode, batch labels included, via the collator."""
    import numpy as np
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
            out.append(model(**batch).cell_embedding.float().numpy())
    emb = np.concatenate(out)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def integration_stage(folder: Path, args) -> dict:
    import anndata
    import numpy as np
    import scanpy as sc
    from transformers import set_seed

    from scgpt_hf import ScGPTConfig, ScGPTForBatchIntegration, ScGPTForPreTraining, ScGPTTokenizer, embed
    from scgpt_hf.data import CellDataset, ScGPTDataCollator

    wu = anndata.read_h5ad(demo.wu2020_path())
    n_batches = wu.obs[BATCH].nunique()
    print(f"wu2020: {wu.n_obs} T cells x {wu.n_vars} genes (raw counts), {n_batches} {BATCH}s as batches, "
          f"{wu.obs[SUBSETS].nunique()} {SUBSETS} subsets.")
    tokenizer = ScGPTTokenizer.from_pretrained(str(folder))
    max_length = int(ScGPTConfig.from_pretrained(str(folder)).max_seq_len)
    results: dict = {"n_cells": int(wu.n_obs), "n_batches": int(n_batches), "max_length": max_length}

    expr = wu.copy()
    sc.pp.normalize_total(expr, target_sum=1e4)
    sc.pp.log1p(expr)
    pcs = sc.pp.pca(expr.X.toarray() if hasattr(expr.X, "toarray") else expr.X, n_comps=50, random_state=args.seed)
    results["pca_log1p"] = silhouettes(pcs, wu.obs, args.seed)

    before = wu.copy()
    embed(before, str(folder), max_length=max_length, seed=args.seed, progress=False)
    results["scgpt_pretrained_embed"] = silhouettes(before.obsm["X_scGPT"], wu.obs, args.seed)

    results["random_neighbours"] = {
        f"knn{KNN}_agreement_{name}": round(random_agreement(labels), 4)
        for name, labels in {SUBSETS: wu.obs[SUBSETS].astype(str), "lineage": lineage_of(wu.obs),
                             BATCH: wu.obs[BATCH].astype(str)}.items()
    }
    plain = CellDataset(tokenizer, wu, seed=args.seed, max_length=max_length)
    # The same pretrained weights run as the fine-tuned models are below (<cls> value from the tokenizer,
    # as in training; `embed` puts pad_value there, as the original's embedding path does).
    pretrained = ScGPTForPreTraining.from_pretrained(str(folder))
    results["scgpt_pretrained_collator"] = silhouettes(
        model_embeddings(pretrained, plain, ScGPTDataCollator(tokenizer)), wu.obs, args.seed
    )

    dataset = CellDataset(tokenizer, wu, batch_key=BATCH, seed=args.seed, max_length=max_length)
    overrides = dict(use_batch_labels=True, batch2id=dataset.batch2id, do_dab=True,
                     ecs_threshold=args.ecs_threshold, ecs_weight=args.ecs_weight, dab_weight=args.dab_weight)
    print(f"Fine-tuning ScGPTForBatchIntegration ({', '.join(f'{k}={v}' for k, v in overrides.items())}; "
          "no domain-specific batch norm; mask ratio 0.4):")
    set_seed(args.seed)
    # Batch labels widen the expression and MVC decoders' input (hidden + batch embedding): those two
    # layers start fresh, as do the batch embedding and the discriminator.
    model, info = ScGPTForBatchIntegration.from_pretrained(
        str(folder), ignore_mismatched_sizes=True, train_new_weights=True, output_loading_info=True, **overrides
    )
    missing = sorted(str(k) for k in info.get("missing_keys", []))
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys", []))
    fresh = missing + mismatched
    print(f"  freshly initialised: {missing} (new); {mismatched} (reshaped)")
    training = trainer_fit(model, dataset, ScGPTDataCollator(tokenizer, mask_ratio=0.4, seed=args.seed),
                           steps=args.int_steps, lr=args.int_lr, batch_size=args.batch_size, seed=args.seed)
    after = model_embeddings(model, dataset, ScGPTDataCollator(tokenizer))
    results["scgpt_integration_finetuned"] = {**silhouettes(after, wu.obs, args.seed), "training": training,
                                              "fresh_modules": fresh, "settings": overrides}

    if not args.skip_controls:
        print("Control: the same steps of masked-expression + MVC training, no batch terms (ScGPTForPreTraining):")
        set_seed(args.seed)
        control = ScGPTForPreTraining.from_pretrained(str(folder))
        training = trainer_fit(control, plain, ScGPTDataCollator(tokenizer, mask_ratio=0.4, seed=args.seed),
                               steps=args.int_steps, lr=args.int_lr, batch_size=args.batch_size, seed=args.seed)
        emb = model_embeddings(control, plain, ScGPTDataCollator(tokenizer))
        results["scgpt_control_no_batch_terms"] = {**silhouettes(emb, wu.obs, args.seed), "training": training}
    return results


# ----------------------------------------------------------------------------------------------
# Report


def report(pre: dict, ann: dict, integ: dict, stages: Stages) -> None:
    print("\n================ Results ================")
    if pre.get("steps"):
        print(f"Pretrained model: {pre['folder']} - {pre['steps']} steps, {pre['epochs_seen']} epochs of "
              f"{pre['cells_in_files']} cells, loss {pre['first_loss']:.4g} -> {pre['final_loss']:.4g}, "
              f"{pre['model']['num_hidden_layers']} layers, width {pre['model']['hidden_size']}, "
              f"{pre['model']['parameters']:,} parameters.")
    print(f"\nAnnotation, pbmc68k_reduced {LABELS} ({ann['n_classes']} classes), test split of {ann['n_test']} cells "
          f"(train {ann['n_train']}):")
    print(f"  {'method':<48} {'accuracy':>9} {'macro-F1':>9}")
    rows = [
        ("scGPT fine-tuned from pretrained (annotate)", "scgpt_finetuned"),
        ("scGPT same fine-tuning from random weights", "scgpt_random_init"),
        ("LogisticRegression, 765 genes (log-norm values)", "logistic_regression_genes"),
        ("LogisticRegression, frozen pretrained embedding", "logistic_regression_frozen_embedding"),
        ("chance: majority class", "chance_majority_class"),
    ]
    for name, key in rows:
        if key in ann:
            print(f"  {name:<48} {ann[key]['accuracy']:>9.3f} {ann[key]['macro_f1']:>9.3f}")
    print(f"\nIntegration, wu2020 ({integ['n_cells']} cells, {integ['n_batches']} patients as batches):")
    rows = [
        ("PCA(50) of log1p-normalised counts", "pca_log1p"),
        ("scGPT pretrained, before (embed)", "scgpt_pretrained_embed"),
        ("scGPT pretrained, before (as 'after' is run)", "scgpt_pretrained_collator"),
        ("scGPT integration fine-tuned, after", "scgpt_integration_finetuned"),
        ("control: same steps, no batch terms", "scgpt_control_no_batch_terms"),
        ("random neighbours (no structure)", "random_neighbours"),
    ]
    for metric, title in (("silhouette", "cosine silhouette"), (f"knn{KNN}_agreement", f"{KNN}-NN label agreement")):
        print(f"  {title:<48} {SUBSETS + ' ^':>14} {'lineage ^':>10} {BATCH + ' v':>10}")
        for name, key in rows:
            r = integ.get(key, {})
            if f"{metric}_{SUBSETS}" in r:
                print(f"    {name:<46} {r[f'{metric}_{SUBSETS}']:>14.3f} {r[f'{metric}_lineage']:>10.3f} "
                      f"{r[f'{metric}_{BATCH}']:>10.3f}")
    print("  (^ higher = cell types better separated; v lower = patients better mixed; a low patient score means "
          "mixing only where the cell-type scores stay up)")
    print("\nWall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.times.items())
          + f"; total {stages.total:.0f} s.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="a folder written by scgpt_hf.pretrain to reuse (default: pretrain here)")
    parser.add_argument("--out-dir", default=str(ROOT / "outputs" / "real_data_tasks"),
                        help="where the pretrained model and its training files go (default outputs/real_data_tasks)")
    parser.add_argument("--pretrain-steps", type=int, default=500, help="pretraining steps (default 500)")
    parser.add_argument("--hidden-size", type=int, default=128, help="pretrained model width (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="pretrained model layers (default 2)")
    parser.add_argument("--cls-steps", type=int, default=300, help="annotation fine-tuning steps (default 300)")
    parser.add_argument("--cls-lr", type=float, default=1e-3)
    parser.add_argument("--int-steps", type=int, default=200, help="integration fine-tuning steps (default 200)")
    parser.add_argument("--int-lr", type=float, default=5e-4)
    parser.add_argument("--ecs-threshold", type=float, default=0.8, help="as the original's integration tutorial")
    parser.add_argument("--ecs-weight", type=float, default=10.0)
    parser.add_argument("--dab-weight", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning cells per step (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-controls", action="store_true", help="leave out the random-init and no-batch controls")
    parser.add_argument("--json", help="also write all figures, settings and the environment to this file")
    args = parser.parse_args(argv)

    quiet()
    env = environment()
    print("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print("Command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    stages = Stages()
    folder, pre = stages.run("pretraining", pretrain_stage, args)
    ann = stages.run("annotation (pbmc68k_reduced)", annotation_stage, folder, args)
    integ = stages.run("integration (wu2020)", integration_stage, folder, args)
    report(pre, ann, integ, stages)
    results = {"environment": env, "arguments": vars(args), "pretraining": pre, "annotation": ann,
               "integration": integ, "wall_time_s": {**stages.times, "total": stages.total}}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"Wrote {args.json}.")
    return results


if __name__ == "__main__":
    main()
