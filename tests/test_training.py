"""Training with transformers.Trainer on real cells (wu2020: raw counts, cell subsets, 14 patients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import make_vocab
from scgpt_hf import (
    ScGPTConfig,
    ScGPTForBatchIntegration,
    ScGPTForCellClassification,
    ScGPTForPreTraining,
    ScGPTTokenizer,
    annotate,
)
from scgpt_hf.data import CellDataset, ScGPTDataCollator
from trainer_utils import fit

SUBSET_KEY = "cluster_orig"


@pytest.fixture(scope="module")
def cells(wu2020_adata, tmp_path_factory):
    """The 2,000 most variable genes (log1p counts) of the real cells, a vocabulary over them, a tokenizer.

    Variable genes, not the most expressed: those are expressed in nearly every cell at saturated bins,
    so a model trained from scratch on 200 cells has little to tell cells apart by.
    """
    adata = wu2020_adata
    logged = adata.X.astype(np.float32)
    logged.data = np.log1p(logged.data)
    mean = np.asarray(logged.mean(axis=0)).ravel()
    variance = np.asarray(logged.multiply(logged).mean(axis=0)).ravel() - mean**2
    genes = adata.var_names[np.argsort(-variance)[:2000]]
    adata = adata[:, genes].copy()
    folder = tmp_path_factory.mktemp("tok")
    vocab = make_vocab(len(genes), list(genes))
    (folder / "vocab.json").write_text(__import__("json").dumps(vocab))
    tokenizer = ScGPTTokenizer(vocab_file=str(folder / "vocab.json"), max_length=256)
    return adata, tokenizer


def _config(tokenizer, **overrides) -> ScGPTConfig:
    values = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        eoc_token_id=tokenizer.convert_tokens_to_ids("<eoc>"),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        dropout=0.0,
    )
    values.update(overrides)
    return ScGPTConfig(**values)


def test_collator_masks_genes_only(cells):
    adata, tokenizer = cells
    dataset = CellDataset(tokenizer, adata[:8])
    collator = ScGPTDataCollator(tokenizer, mask_ratio=0.4, seed=0)
    batch = collator([dataset[i] for i in range(8)])
    masked = batch["values"] == -1.0
    real = batch["attention_mask"].bool()
    assert not masked[:, 0].any(), "<cls> is never masked"
    assert not (masked & ~real).any(), "padding is never masked"
    genes = (real & (batch["input_ids"] != tokenizer.cls_token_id)).sum(1)
    assert torch.equal(masked.sum(1), torch.clamp((genes * 0.4).long(), min=1))
    torch.testing.assert_close(batch["labels"][~masked], batch["values"][~masked])
    again = ScGPTDataCollator(tokenizer, mask_ratio=0.4, seed=0)([dataset[i] for i in range(8)])
    assert torch.equal(again["values"], batch["values"])


def test_collator_draws_one_ratio_per_batch(cells):
    adata, tokenizer = cells
    dataset = CellDataset(tokenizer, adata[:8])
    features = [dataset[i] for i in range(8)]
    collator = ScGPTDataCollator(tokenizer, mask_ratio=[0.25, 0.5, 0.75], seed=0)
    seen = set()
    for _ in range(30):
        batch = collator(features)
        genes = (batch["attention_mask"].bool() & (batch["input_ids"] != tokenizer.cls_token_id)).sum(1)
        masked = (batch["values"] == -1.0).sum(1)
        ratio = [r for r in (0.25, 0.5, 0.75) if torch.equal(masked, torch.clamp((genes * r).long(), min=1))]
        assert len(ratio) == 1, "every cell of a batch is masked at the same one of the ratios"
        seen.add(ratio[0])
    assert seen == {0.25, 0.5, 0.75}
    for bad in ([], [0.0, 0.5], [0.5, 1.0]):
        with pytest.raises(ValueError, match="mask_ratio|mask ratios"):
            ScGPTDataCollator(tokenizer, mask_ratio=bad)


def test_dataloader_workers_mask_differently_and_reproducibly(cells):
    """Each worker holds a copy of the collator; copies must not mask the same cells' genes alike."""
    adata, tokenizer = cells
    dataset = CellDataset(tokenizer, adata[:4])
    same_cells = torch.utils.data.Subset(dataset, [0, 1, 2, 3] * 2)  # worker 0 and worker 1 get the same cells

    def masks(seed):
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            same_cells, batch_size=4, num_workers=2, collate_fn=ScGPTDataCollator(tokenizer, mask_ratio=0.4, seed=0)
        )
        return [batch["values"] == -1.0 for batch in loader]

    first, second = masks(0)
    assert not torch.equal(first, second), "the two workers drew the same masks"
    assert all(torch.equal(a, b) for a, b in zip(masks(0), (first, second))), "same torch seed, same masks"


def test_collator_ids_are_long_and_numpy_ratios_work(cells):
    adata, tokenizer = cells
    dataset = CellDataset(tokenizer, adata[:4])
    features = [{**dataset[i], "labels": np.int8(i % 2), "batch_labels": np.uint8(1)} for i in range(4)]
    batch = ScGPTDataCollator(tokenizer)(features)  # e.g. int8 categorical codes
    assert batch["labels"].dtype == batch["batch_labels"].dtype == torch.long
    masked = ScGPTDataCollator(tokenizer, mask_ratio=np.float32(0.4), seed=0)([dataset[i] for i in range(4)])
    assert (masked["values"] == -1.0).any()


def test_worker_streams_differ_across_ranks(cells, monkeypatch):
    """pretrain seeds each rank's collator with seed + rank; worker w of rank r must not share a stream with
    worker w + 1 of rank r - 1 (all ranks draw the same worker base seed)."""
    adata, tokenizer = cells
    features = [CellDataset(tokenizer, adata[:4])[i] for i in range(4)]

    def masks(rank, worker):
        info = type("Info", (), {"seed": 1234 + worker, "id": worker})
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
        return ScGPTDataCollator(tokenizer, mask_ratio=0.4, seed=rank)(features)["values"] == -1.0

    assert not torch.equal(masks(rank=0, worker=1), masks(rank=1, worker=0))


def test_pretraining_learns_masked_expression(cells, tmp_path):
    adata, tokenizer = cells
    torch.manual_seed(0)
    model = ScGPTForPreTraining(_config(tokenizer))
    _, losses = fit(model, CellDataset(tokenizer, adata), ScGPTDataCollator(tokenizer, mask_ratio=0.4, seed=0), tmp_path)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses


def test_classification_learns_t_cell_lineage(cells, tmp_path):
    """CD4 vs CD8 (vs the small '3.x' group), read off the study's subset names, from expression alone."""
    adata, tokenizer = cells
    adata = adata.copy()
    adata.obs["lineage"] = adata.obs[SUBSET_KEY].astype(str).str.split(".").str[0]
    dataset = CellDataset(tokenizer, adata, label_key="lineage")
    torch.manual_seed(0)
    config = _config(
        tokenizer,
        num_labels=len(dataset.label2id),
        id2label={i: name for name, i in dataset.label2id.items()},
        label2id=dataset.label2id,
    )
    model = ScGPTForCellClassification(config)
    _, losses = fit(model, dataset, ScGPTDataCollator(tokenizer), tmp_path, steps=120, lr=3e-3, batch_size=32)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    model.eval()
    batch = ScGPTDataCollator(tokenizer)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    accuracy = (predicted == batch["labels"]).float().mean().item()
    chance = np.bincount(batch["labels"].numpy()).max() / len(dataset)
    assert accuracy > chance + 0.1, (accuracy, chance)

    # annotate() on the saved model writes the same predictions into obs.
    model.save_pretrained(tmp_path / "annotator")
    tokenizer.save_pretrained(tmp_path / "annotator")
    annotate(adata, str(tmp_path / "annotator"), max_length=256, progress=False)
    expected = [config.id2label[i] for i in predicted.tolist()]
    assert adata.obs["scGPT_label"].astype(str).tolist() == expected
    probabilities = adata.obsm["scGPT_label_probabilities"]
    assert probabilities.shape == (adata.n_obs, 3)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(adata.obs["scGPT_label_probability"], probabilities.max(1), atol=1e-6)


def test_integration_trains_with_batch_labels(cells, tmp_path):
    adata, tokenizer = cells
    dataset = CellDataset(tokenizer, adata, batch_key="patient")
    torch.manual_seed(0)
    config = _config(
        tokenizer, use_batch_labels=True, batch2id=dataset.batch2id, do_dab=True, ecs_threshold=0.8
    )
    model = ScGPTForBatchIntegration(config)
    _, losses = fit(model, dataset, ScGPTDataCollator(tokenizer, mask_ratio=0.4, seed=0), tmp_path, steps=20)
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_dataset_errors_name_the_problem(cells):
    adata, tokenizer = cells
    adata = adata[:20].copy()
    with pytest.raises(ValueError, match="obs has no column 'celltype'"):
        CellDataset(tokenizer, adata, label_key="celltype")
    with pytest.raises(ValueError, match="not trained on"):
        CellDataset(tokenizer, adata, label_key=SUBSET_KEY, label2id={"only-this": 0})
    adata.obs[SUBSET_KEY] = adata.obs[SUBSET_KEY].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc(SUBSET_KEY)] = None
    with pytest.raises(ValueError, match="1 cells have no label"):
        CellDataset(tokenizer, adata, label_key=SUBSET_KEY)
    with pytest.raises(ValueError, match="mask_ratio=0 for classification"):
        ScGPTDataCollator(tokenizer, mask_ratio=0.3)([{"input_ids": [1], "values": [1.0], "labels": 0}])


def test_generative_pretraining_with_trainer(cells, tmp_path):
    """The collator marks genes to generate; Trainer pretrains with the generative attention mask."""
    adata, tokenizer = cells
    dataset = CellDataset(tokenizer, adata)
    collator = ScGPTDataCollator(tokenizer, mask_ratio=0.3, generative=True, seed=0)
    batch = collator([dataset[i] for i in range(4)])
    assert torch.equal(batch["generative_mask"], batch["values"] == -1.0)
    assert not batch["generative_mask"][:, 0].any()
    torch.manual_seed(0)
    model = ScGPTForPreTraining(_config(tokenizer, use_generative_flag=True))
    _, losses = fit(model, dataset, collator, tmp_path, steps=20)
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
