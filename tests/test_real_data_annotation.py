"""Cell-type annotation on real cells, the issue's protocol at test size.

A small model is pretrained with `scgpt_hf.pretrain` (what `scgpt-hf pretrain` runs) on the bundled real
cells (wu2020 raw counts and pbmc68k_reduced's log-normalised `.raw`), then `ScGPTForCellClassification`
is fine-tuned from it with `transformers.Trainer` on 70 % of pbmc68k_reduced (`bulk_labels`, 10 types,
stratified split, fixed seed) and `scgpt_hf.annotate` labels the other 30 %. The test asserts that the
model learns, well above the majority class; the tuned figures (and a logistic regression beside them)
come from `bench/real_data_tasks.py` and live in the README.
"""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from transformers import Trainer, TrainingArguments, set_seed

from scgpt_hf import CellDataset, ScGPTDataCollator, ScGPTForCellClassification, ScGPTTokenizer, annotate, pretrain

LABELS = "bulk_labels"
SEED = 0
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def pbmc_log_normalised(pbmc68k_adata):
    """pbmc68k_reduced's `.raw` (log-normalised; `.X` is scaled) with its cell-type labels."""
    raw = pbmc68k_adata.raw.to_adata()
    return anndata.AnnData(X=raw.X.copy(), obs=pbmc68k_adata.obs[[LABELS]].copy(), var=raw.var[[]].copy())


@pytest.fixture(scope="module")
def pretrained(wu2020_adata, pbmc_log_normalised, tmp_path_factory):
    """A 2-layer width-32 model pretrained for 60 steps on both bundled datasets, streamed from files."""
    folder = tmp_path_factory.mktemp("pretrain_real")
    pbmc_file = folder / "pbmc68k_raw.h5ad"
    pbmc_log_normalised.write_h5ad(pbmc_file)
    wu_file = folder / "wu2020.h5ad"
    wu2020_adata.write_h5ad(wu_file)
    # Vocabulary: pbmc68k's genes plus the wu2020 genes expressed in at least 20 cells.
    wu_genes = wu2020_adata.var_names[np.asarray((wu2020_adata.X > 0).sum(axis=0)).ravel() >= 20]
    genes = list(dict.fromkeys([*pbmc_log_normalised.var_names, *wu_genes]))
    vocab = {g: i for i, g in enumerate([*genes, "<pad>", "<cls>", "<eoc>"])}
    return pretrain(
        [wu_file, pbmc_file], folder / "model", tokenizer=vocab, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, max_length=MAX_LENGTH, max_steps=60, batch_size=16, learning_rate=1e-3,
        seed=SEED, logging_steps=20,
    )


def test_fine_tuned_from_pretraining_annotates_pbmc_well_above_chance(pretrained, pbmc_log_normalised, tmp_path):
    adata = pbmc_log_normalised
    y = adata.obs[LABELS].astype(str).to_numpy()
    train_idx, test_idx = train_test_split(np.arange(adata.n_obs), test_size=0.3, stratify=y, random_state=SEED)
    train, test = adata[train_idx].copy(), adata[test_idx].copy()

    tokenizer = ScGPTTokenizer.from_pretrained(str(pretrained))
    dataset = CellDataset(tokenizer, train, label_key=LABELS, seed=SEED, max_length=MAX_LENGTH)
    id2label = {i: name for name, i in dataset.label2id.items()}
    set_seed(SEED)
    model = ScGPTForCellClassification.from_pretrained(
        str(pretrained), num_labels=len(id2label), id2label=id2label, label2id=dataset.label2id,
        train_new_weights=True,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=300, per_device_train_batch_size=16, learning_rate=1e-3,
        warmup_steps=10, logging_steps=50, save_strategy="no", report_to=[], seed=SEED, use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=ScGPTDataCollator(tokenizer)).train()

    annotate(test, model.eval(), tokenizer, max_length=MAX_LENGTH, seed=SEED, progress=False)
    predicted = test.obs["scGPT_label"].astype(str).to_numpy()
    truth = y[test_idx]
    values, counts = np.unique(y[train_idx], return_counts=True)
    majority = values[np.argmax(counts)]
    accuracy = accuracy_score(truth, predicted)
    macro_f1 = f1_score(truth, predicted, average="macro", zero_division=0)
    chance = accuracy_score(truth, np.full(len(truth), majority))
    chance_f1 = f1_score(truth, np.full(len(truth), majority), average="macro", zero_division=0)
    print(f"pbmc68k bulk_labels, {len(truth)} test cells: accuracy {accuracy:.3f} (majority {chance:.3f}), "
          f"macro-F1 {macro_f1:.3f} (majority {chance_f1:.3f})")
    assert accuracy > chance + 0.12
    assert macro_f1 > 2.5 * chance_f1
    assert set(predicted) <= set(id2label.values()) and len(set(predicted)) >= 4, "predicts several cell types"
    assert torch.isfinite(torch.as_tensor(test.obs["scGPT_label_probability"].to_numpy())).all()
