"""The perturbation and multi-omic heads train with `transformers.Trainer` on this package's datasets and
collator, and domain-specific batch norm trains on single-domain batches (`DomainGroupedTrainer`).

No perturbation screen or multi-omic data is bundled, so both are simulated from real cells (wu2020:
200 T cells, raw counts, 14 patients):

* the screen: real cells' log1p-normalised expression of their 120 most expressed genes, in three
  conditions: "ctrl" (unchanged), "<A>+ctrl" (gene A knocked down to zero and 10 target genes shifted up by
  1.5) and "<B>+<C>" (both knocked down, 10 other targets shifted down to zero);
* the second modality: 6 "proteins" whose counts are derived from real genes (CD4, CD8A, CD3E, IL7R, GZMB,
  CCR7: the gene's count scaled down plus a small Poisson background), so their counts are far smaller
  than the RNA counts, as with ADT panels.
"""

from __future__ import annotations

import json
import logging

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from transformers import Trainer

from reference import make_vocab
from scgpt_hf import ScGPTForBatchIntegration, ScGPTTokenizer, predict_perturbation
from scgpt_hf.data import (
    CellDataset,
    DomainGroupedSampler,
    DomainGroupedTrainer,
    MultiOmicCellDataset,
    ScGPTDataCollator,
)
from scgpt_hf.modeling_scgpt import ScGPTForMultiOmicIntegration, ScGPTForPerturbationPrediction
from scgpt_hf.perturbation import PerturbationDataset
from test_training import _config
from trainer_utils import fit

PROTEINS = ["CD4", "CD8A", "CD3E", "IL7R", "GZMB", "CCR7"]
MODALITIES = {"RNA": 0, "protein": 1, "<pad>": 2, "<cls>": 3, "<eoc>": 4}


def _tokenizer(genes, folder, **kwargs) -> ScGPTTokenizer:
    (folder / "vocab.json").write_text(json.dumps(make_vocab(len(genes), list(genes))))
    return ScGPTTokenizer(vocab_file=str(folder / "vocab.json"), **kwargs)


def _assert_reloads(model, batch, folder):
    model.save_pretrained(folder)
    again = type(model).from_pretrained(folder).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).loss, model(**batch).loss)


# ----------------------------------------------------------------------------------------------
# Perturbation


@pytest.fixture(scope="module")
def screen(wu2020_adata):
    """A simulated Perturb-seq screen on real cells (see the module docstring), X sparse CSR."""
    import scanpy as sc

    adata = wu2020_adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata = adata[:, np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:120]].copy()
    genes = list(adata.var_names)
    x = adata.X.toarray()
    rng = np.random.default_rng(0)
    condition = np.array(["ctrl"] * 80 + [f"{genes[5]}+ctrl"] * 60 + [f"{genes[6]}+{genes[7]}"] * 60)[rng.permutation(200)]
    one = condition == f"{genes[5]}+ctrl"
    two = condition == f"{genes[6]}+{genes[7]}"
    x[one, 5] = 0.0
    x[np.ix_(one, np.arange(20, 30))] += 1.5
    x[np.ix_(two, [6, 7, *range(40, 50)])] = 0.0
    adata.X = sp.csr_matrix(x)
    adata.obs["condition"] = pd.Categorical(condition)
    return adata


def test_perturbation_dataset_pairs_controls_like_gears(screen, tmp_path):
    tokenizer = _tokenizer(screen.var_names, tmp_path)
    dataset = PerturbationDataset(screen, tokenizer, seed=0)
    genes = list(screen.var_names)
    x = screen.X.toarray()
    controls = np.flatnonzero(screen.obs["condition"] == "ctrl")
    assert len(dataset) == screen.n_obs  # every perturbed cell once, and each control as itself
    for i in range(len(dataset)):
        item, (control, perturbed) = dataset[i], dataset.pairs[i]
        assert control in controls and dataset.conditions[i] == screen.obs["condition"].iloc[perturbed]
        np.testing.assert_array_equal(item["values"], x[control])
        np.testing.assert_array_equal(item["labels"], x[perturbed])
        flagged = [genes[j] for j in np.flatnonzero(item["perturbation_flags"])]
        assert flagged == [g for g in dataset.conditions[i].split("+") if g != "ctrl"]
    # The input tokens are predict_perturbation's: the vocabulary genes in dataset order, no <cls>.
    np.testing.assert_array_equal(dataset[0]["input_ids"], tokenizer.convert_tokens_to_ids(genes))
    # Controls are drawn at random, seeded: another seed pairs differently, the same seed identically.
    assert len(set(dataset.pairs[dataset.pairs[:, 0] != dataset.pairs[:, 1], 0])) > 20
    np.testing.assert_array_equal(PerturbationDataset(screen, tokenizer, seed=0).pairs, dataset.pairs)
    assert not np.array_equal(PerturbationDataset(screen, tokenizer, seed=1).pairs, dataset.pairs)
    assert len(PerturbationDataset(screen, tokenizer, include_controls=False)) == 120


def test_perturbation_head_trains_with_trainer(screen, tmp_path):
    tokenizer = _tokenizer(screen.var_names, tmp_path)
    dataset = PerturbationDataset(screen, tokenizer, seed=0)
    torch.manual_seed(0)
    model = ScGPTForPerturbationPrediction(_config(tokenizer, pad_value=0.0))
    collator = ScGPTDataCollator.from_config(tokenizer, model.config, max_length=100, seed=0)
    _, losses = fit(model, dataset, collator, tmp_path / "run", steps=30, logging_steps=2)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses

    batch = ScGPTDataCollator.from_config(tokenizer, model.config)([dataset[i] for i in range(8)])
    _assert_reloads(model, batch, tmp_path / "perturbation")
    tokenizer.save_pretrained(tmp_path / "perturbation")
    reloaded = ScGPTForPerturbationPrediction.from_pretrained(tmp_path / "perturbation")
    controls = screen[screen.obs["condition"] == "ctrl"][:8].copy()
    predicted = predict_perturbation(controls, reloaded, dataset.conditions[-1])
    assert predicted.shape == controls.shape and np.isfinite(predicted).all()


def test_collator_pads_and_subsamples_perturbation_inputs(screen, tmp_path):
    tokenizer = _tokenizer(screen.var_names, tmp_path)
    dataset = PerturbationDataset(screen, tokenizer)
    config = _config(tokenizer, use_perturbation_flags=True)
    perturbed = [i for i in range(len(dataset)) if dataset[i]["perturbation_flags"].sum() == 2][:3]
    features = [dataset[i] for i in perturbed]
    features[1] = {k: v[:50] for k, v in features[1].items()}  # a shorter cell: its tail is padding
    batch = ScGPTDataCollator.from_config(tokenizer, config)(features)
    assert batch["perturbation_flags"].dtype == torch.long and batch["labels"].dtype == torch.float32
    assert (batch["perturbation_flags"][1, 50:] == config.pert_pad_id).all()
    assert (batch["attention_mask"][1, 50:] == 0).all() and (batch["input_ids"][1, 50:] == tokenizer.pad_token_id).all()
    torch.testing.assert_close(batch["labels"][0], torch.from_numpy(features[0]["labels"]))

    # Subsampling keeps the perturbed genes and the token order, and is seeded.
    collator = ScGPTDataCollator.from_config(tokenizer, config, max_length=10, seed=0)
    small = collator([dataset[i] for i in perturbed])
    assert small["input_ids"].shape == (3, 10)
    assert (small["perturbation_flags"].sum(1) == 2).all()
    assert (small["input_ids"].diff(dim=1) > 0).all()  # vocabulary ids follow dataset order here
    position = {int(t): j for j, t in enumerate(dataset[0]["input_ids"])}
    for row in range(3):
        columns = [position[int(t)] for t in small["input_ids"][row]]
        np.testing.assert_array_equal(small["labels"][row].numpy(), dataset[perturbed[row]]["labels"][columns])
        np.testing.assert_array_equal(small["values"][row].numpy(), dataset[perturbed[row]]["values"][columns])
    assert not torch.equal(collator([dataset[i] for i in perturbed])["input_ids"], small["input_ids"])
    again = ScGPTDataCollator.from_config(tokenizer, config, max_length=10, seed=0)
    assert torch.equal(again([dataset[i] for i in perturbed])["input_ids"], small["input_ids"])

    with pytest.raises(ValueError, match="must be kept .* more than max_length=1"):
        ScGPTDataCollator.from_config(tokenizer, config, max_length=1)(features)
    with pytest.raises(ValueError, match="'perturbation_flags' holds a sequence.*token_pad_values"):
        ScGPTDataCollator(tokenizer)(features)
    with pytest.raises(ValueError, match="Per-token 'labels'.*mask_ratio=0"):
        ScGPTDataCollator.from_config(tokenizer, config, mask_ratio=0.4)


def test_perturbation_dataset_errors(screen, tmp_path):
    genes = list(screen.var_names)
    tokenizer = _tokenizer(genes, tmp_path)
    bad = screen.copy()
    bad.obs["condition"] = bad.obs["condition"].cat.add_categories(["NOTAGENE+ctrl"])
    bad.obs.iloc[0, bad.obs.columns.get_loc("condition")] = "NOTAGENE+ctrl"
    with pytest.raises(ValueError, match=r"\['NOTAGENE'\] are not in the model's gene vocabulary.*"
                                         r"drop the cells of condition\(s\) \['NOTAGENE\+ctrl'\]"):
        PerturbationDataset(bad, tokenizer)
    narrow = screen[:, [g for g in genes if g != genes[5]]].copy()
    with pytest.raises(ValueError, match=rf"\['{genes[5]}'\] are not among adata's genes.*add these genes"):
        PerturbationDataset(narrow, tokenizer)
    with pytest.raises(ValueError, match="No control cells.*'control'.*control_label="):
        PerturbationDataset(screen, tokenizer, control_label="control")
    with pytest.raises(ValueError, match="obs has no column 'perturbation'"):
        PerturbationDataset(screen, tokenizer, condition_key="perturbation")
    missing = screen.copy()
    missing.obs["condition"] = missing.obs["condition"].astype(object)
    missing.obs.iloc[[3, 4], missing.obs.columns.get_loc("condition")] = None
    with pytest.raises(ValueError, match="2 cells have no condition"):
        PerturbationDataset(missing, tokenizer)
    for value, message in ((np.nan, "NaN or infinite values in cells 0..199"), (-1.0, "negative values")):
        broken = screen.copy()
        x = broken.X.toarray()
        x[7, 3] = value
        broken.X = sp.csr_matrix(x)
        with pytest.raises(ValueError, match=message):
            PerturbationDataset(broken, tokenizer)


# ----------------------------------------------------------------------------------------------
# Multi-omic


@pytest.fixture(scope="module")
def multiome(wu2020_adata):
    """300 RNA genes (raw counts) + 6 simulated proteins derived from real genes, var['modality']."""
    rna = wu2020_adata[:, np.argsort(-np.asarray(wu2020_adata.X.sum(0)).ravel())[:300]]
    source = wu2020_adata[:, PROTEINS].X.toarray()
    rng = np.random.default_rng(0)
    protein = np.round(source / 3) + rng.poisson(0.5, size=source.shape)
    x = sp.hstack([rna.X, sp.csr_matrix(protein)], format="csr").astype(np.float32)
    var = pd.DataFrame(
        {"modality": ["RNA"] * rna.n_vars + ["protein"] * len(PROTEINS)},
        index=list(rna.var_names) + [f"p_{p}" for p in PROTEINS],
    )
    return anndata.AnnData(X=x, obs=wu2020_adata.obs[["patient"]].copy(), var=var)


def _multiomic_config(tokenizer, n_batches, **overrides):
    return _config(
        tokenizer, use_modality_embeddings=True, modality_vocab=MODALITIES, use_batch_labels=True,
        num_batch_labels=n_batches, do_mvc=True, **overrides,
    )


def test_multiomic_dataset_bins_each_modality_per_cell(multiome, tmp_path):
    tokenizer = _tokenizer(multiome.var_names, tmp_path, max_length=1000)
    config = _multiomic_config(tokenizer, 14)
    dataset = MultiOmicCellDataset(tokenizer, multiome, config, batch_key="patient")
    # Each modality is binned within itself: as if tokenised on its own, not jointly with the other.
    alone = {
        m: tokenizer(multiome[:, multiome.var["modality"] == name], padding=False, seed=0)
        for name, m in (("RNA", 0), ("protein", 1))
    }
    jointly = tokenizer(multiome, padding=False, seed=0)
    is_protein = np.isin(np.arange(len(tokenizer)), tokenizer.convert_tokens_to_ids([f"p_{p}" for p in PROTEINS]))
    differs = 0
    for i in range(len(dataset)):
        item = dataset[i]
        ids, values, modality = item["input_ids"], item["values"], item["modality_ids"]
        assert ids[0] == tokenizer.cls_token_id and modality[0] == MODALITIES["<cls>"]
        np.testing.assert_array_equal(modality[1:], np.where(is_protein[ids[1:]], 1, 0))
        for m, encoded in alone.items():
            np.testing.assert_array_equal(ids[modality == m], encoded["input_ids"][i][1:])
            np.testing.assert_array_equal(values[modality == m], encoded["values"][i][1:])
        np.testing.assert_array_equal(ids, jointly["input_ids"][i])
        differs += not np.array_equal(values, jointly["values"][i])
    assert differs > 150, "small protein counts rank low among genes when binned jointly"
    assert dataset[0]["batch_labels"] == dataset.batch2id[multiome.obs["patient"].iloc[0]]

    short = MultiOmicCellDataset(tokenizer, multiome, config, max_length=20)
    assert max(len(short[i]["input_ids"]) for i in range(len(short))) == 20
    assert all(short[i]["input_ids"][0] == tokenizer.cls_token_id for i in range(len(short)))


def test_multiomic_dataset_warns_once_only_for_cells_without_any_feature(multiome, tmp_path, caplog):
    tokenizer = _tokenizer(multiome.var_names, tmp_path, max_length=1000)
    cells = multiome[:4].copy()
    x = cells.X.toarray()
    x[0, cells.var["modality"] == "protein"] = 0  # a cell without protein counts: normal, no warning
    x[1] = 0  # a cell without any feature: reported
    cells.X = sp.csr_matrix(x)
    with caplog.at_level(logging.WARNING):
        MultiOmicCellDataset(tokenizer, cells, _multiomic_config(tokenizer, 14))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == ["1 of 4 cells have no feature of the vocabulary in any modality; each is just <cls>. "
                      "Filter them out before training."], warned


def test_multiomic_head_trains_with_trainer(multiome, tmp_path):
    tokenizer = _tokenizer(multiome.var_names, tmp_path, max_length=128)
    dataset = MultiOmicCellDataset(tokenizer, multiome, _multiomic_config(tokenizer, 14), batch_key="patient")
    torch.manual_seed(0)
    model = ScGPTForMultiOmicIntegration(_multiomic_config(tokenizer, len(dataset.batch2id)))
    collator = ScGPTDataCollator.from_config(tokenizer, model.config, mask_ratio=0.4, seed=0)
    batch = collator([dataset[i] for i in range(4)])
    assert (batch["modality_ids"][batch["attention_mask"] == 0] == model.config.modality_pad_id).all()
    _, losses = fit(model, dataset, collator, tmp_path / "run", steps=30, logging_steps=2)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    _assert_reloads(model, collator([dataset[i] for i in range(8)]), tmp_path / "multiomic")


def test_multiomic_dataset_errors(multiome, tmp_path):
    tokenizer = _tokenizer(multiome.var_names, tmp_path)
    config = _multiomic_config(tokenizer, 14)
    adt = multiome.copy()
    adt.var["modality"] = adt.var["modality"].replace("protein", "ADT")
    with pytest.raises(ValueError, match=r"modalities \['ADT'\] that are not in the model's modality vocabulary "
                                         r"\{'RNA': 0, 'protein': 1"):
        MultiOmicCellDataset(tokenizer, adt, config)
    with pytest.raises(ValueError, match=r"\{'RNA': 0, 'ADT': 1.*differs from the model's \{'RNA': 0, 'protein'"):
        MultiOmicCellDataset(tokenizer, multiome, config, modality_vocab={"RNA": 0, "ADT": 1, "<pad>": 2, "<cls>": 3, "<eoc>": 4})
    with pytest.raises(ValueError, match="var has no column 'feature_type'"):
        MultiOmicCellDataset(tokenizer, multiome, config, modality_key="feature_type")
    with pytest.raises(ValueError, match="no modality vocabulary"):
        MultiOmicCellDataset(tokenizer, multiome, _config(tokenizer))
    (tmp_path / "rna").mkdir()
    rna_only = _tokenizer(multiome.var_names[:300], tmp_path / "rna")
    with pytest.raises(ValueError, match="No protein feature of adata is in the tokenizer's vocabulary.*'p_CD4'"):
        MultiOmicCellDataset(rna_only, multiome, config)


# ----------------------------------------------------------------------------------------------
# Domain-specific batch norm: one domain per step


def test_domain_grouped_sampler_groups_shuffles_and_shards():
    domains = np.repeat(["a", "b", "c"], [10, 7, 3])
    sampler = DomainGroupedSampler(domains, 4, seed=0)
    order = list(sampler)
    groups = np.array(order).reshape(-1, 4)
    assert len(order) == len(sampler) == 4 * (3 + 2 + 1)
    assert all(len(set(domains[g])) == 1 for g in groups)
    assert set(order) == set(range(20))  # every cell each epoch; short groups filled from their own domain
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order
    assert len(list(DomainGroupedSampler(domains, 4, drop_last=True))) == 4 * (2 + 1)  # "c" has no full group
    with pytest.raises(ValueError, match="2 cells have no domain"):
        DomainGroupedSampler([*domains, None, float("nan")], 4)

    ranks = [list(DomainGroupedSampler(domains, 4, seed=0, num_replicas=4, rank=r)) for r in range(4)]
    assert {len(r) for r in ranks} == {8}  # 6 groups padded to 8, two per rank
    shares = [np.array(r).reshape(-1, 4) for r in ranks]
    assert all(len(set(domains[g])) == 1 for share in shares for g in share)
    assert set().union(*map(set, ranks)) == set(range(20))
    with pytest.raises(ValueError, match="rank must lie in"):
        DomainGroupedSampler(domains, 4, num_replicas=2, rank=2)


def test_dsbn_trains_on_one_domain_per_step(wu2020_adata, tmp_path):
    """A real Trainer run: every step's batch_labels are one patient, every cell is seen each epoch."""
    adata = wu2020_adata[:90, np.argsort(-np.asarray(wu2020_adata.X.sum(0)).ravel())[:200]].copy()
    tokenizer = _tokenizer(adata.var_names, tmp_path, max_length=64)
    dataset = CellDataset(tokenizer, adata, batch_key="patient")
    seen = []

    class Recording(ScGPTDataCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            seen.append(batch["batch_labels"].tolist())
            return batch

    torch.manual_seed(0)
    config = _config(tokenizer, domain_spec_batchnorm="dsbn", batch2id=dataset.batch2id)
    model = ScGPTForBatchIntegration(config)
    trainer, losses = fit(model, dataset, Recording(tokenizer, mask_ratio=0.4, seed=0), tmp_path / "run",
                          batch_size=8, logging_steps=2, trainer_cls=DomainGroupedTrainer, epochs=2)
    steps_per_epoch = len(seen) // 2
    assert trainer.state.global_step == len(seen) == 2 * steps_per_epoch
    assert all(len(set(labels)) == 1 for labels in seen), seen
    assert seen[:steps_per_epoch] != seen[steps_per_epoch:]  # reshuffled for the second epoch
    assert np.isfinite(losses).all()
    # The guard can fail: Trainer's default random sampler mixes patients within a batch.
    mixed = []
    plain = Trainer(model=model, args=trainer.args, train_dataset=dataset, data_collator=ScGPTDataCollator(tokenizer))
    for batch in plain.get_train_dataloader():
        mixed.append(len(set(batch["batch_labels"].tolist())))
    assert max(mixed) > 1
