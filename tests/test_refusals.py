"""Refusals instead of wrong answers (issue 11): untrained heads, batch values that are not the model's
names, data hidden in padding, obs/obsm keys an .h5ad cannot hold."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from transformers import AutoModelForSequenceClassification

from scgpt_hf import ScGPTConfig, ScGPTForCellClassification, ScGPTForPreTraining, ScGPTModel, ScGPTTokenizer
from scgpt_hf.embedding import annotate

N_GENES = 40
GENES = [f"G{i}" for i in range(N_GENES)]


def _config(**overrides) -> ScGPTConfig:
    values = dict(
        vocab_size=N_GENES + 3, pad_token_id=N_GENES, cls_token_id=N_GENES + 1, eoc_token_id=N_GENES + 2,
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
    )
    return ScGPTConfig(**{**values, **overrides})


@pytest.fixture
def tokenizer(tmp_path) -> ScGPTTokenizer:
    vocab = {g: i for i, g in enumerate(GENES)} | {"<pad>": N_GENES, "<cls>": N_GENES + 1, "<eoc>": N_GENES + 2}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    return ScGPTTokenizer(str(tmp_path / "vocab.json"))


@pytest.fixture
def cells() -> anndata.AnnData:
    counts = np.random.default_rng(0).poisson(1.0, size=(12, N_GENES)).astype(np.float32)
    counts[:, 0] = 1.0  # every cell expresses a vocabulary gene
    return anndata.AnnData(sp.csr_matrix(counts), var={"symbol": GENES}, obs={"n": np.arange(12)}).copy()


def _folder(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# Heads whose weights the folder lacks


def test_head_missing_from_the_folder_is_refused_unless_it_is_to_be_trained(tmp_path, tokenizer, cells):
    pretraining = _folder(ScGPTForPreTraining(_config()), tokenizer, tmp_path / "pretraining")
    for load in (ScGPTForCellClassification.from_pretrained, AutoModelForSequenceClassification.from_pretrained):
        with pytest.raises(ValueError, match=r"no weights for classifier.*train_new_weights=True"):
            load(pretraining, num_labels=3)
    cells.var_names = GENES
    with pytest.raises(ValueError, match=r"no weights for classifier.*fine-tune"):
        annotate(cells, pretraining, progress=False)

    # Fine-tuning says so: the backbone is loaded, the classifier starts fresh and is reported.
    model, info = ScGPTForCellClassification.from_pretrained(
        pretraining, num_labels=3, train_new_weights=True, output_loading_info=True
    )
    assert info["missing_keys"] and all(k.startswith("classifier.") for k in info["missing_keys"])
    trained = ScGPTForPreTraining.from_pretrained(pretraining)
    torch.testing.assert_close(model.scgpt.embeddings.gene_embeddings.weight,
                               trained.scgpt.embeddings.gene_embeddings.weight, atol=0, rtol=0)
    # A folder holding every weight loads as before, without the switch.
    annotated = _folder(model, tokenizer, tmp_path / "annotation")
    assert isinstance(ScGPTForCellClassification.from_pretrained(annotated), ScGPTForCellClassification)
    assert isinstance(ScGPTModel.from_pretrained(annotated), ScGPTModel)

    # Backbone parts the folder lacks (a batch embedding) are refused as well.
    with pytest.raises(ValueError, match=r"no weights for batch_encoder"):
        ScGPTModel.from_pretrained(pretraining, use_batch_labels=True, num_batch_labels=2)


# ----------------------------------------------------------------------------------------------
# Batch values


def test_batch_values_must_be_the_models_names_whatever_their_dtype(tokenizer, cells):
    model = ScGPTModel(_config(use_batch_labels=True, batch2id={"A": 0, "B": 1})).eval()
    # What anndata.concat(..., label="batch") writes: the strings "0" and "1", not the names.
    for values in (["0", "1"], [0, 1], np.array([0, 1]), [0.0, 1.0]):
        with pytest.raises(ValueError, match=r"not among the 2 .*\['A', 'B'\].*as_ids=True"):
            model.encode_batch_labels(values)
    assert model.encode_batch_labels(["B", "A"]).tolist() == [1, 0]
    assert model.encode_batch_labels([1, "0"], as_ids=True).tolist() == [1, 0]  # said explicitly
    with pytest.raises(ValueError, match="not integer ids"):
        model.encode_batch_labels(["A"], as_ids=True)
    # Numeric names stay names, also from a float column (pandas' upcast of integers with NaN).
    donors = ScGPTModel(_config(use_batch_labels=True, batch2id={"3": 0, "4": 1})).eval()
    assert donors.encode_batch_labels([4.0, "3", np.int64(4)]).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="not among the 2"):
        donors.encode_batch_labels([0, 1])
    # Without names, integer ids are the only way.
    plain = ScGPTModel(_config(use_batch_labels=True, num_batch_labels=2)).eval()
    assert plain.encode_batch_labels([1, 0.0, "1"]).tolist() == [1, 0, 1]

    cells.var_names = GENES
    cells.obs["batch"] = np.array(["0", "1"])[np.arange(cells.n_obs) % 2]
    with pytest.raises(ValueError, match=r"obs\['batch'\]: .*not among the 2.*batch_as_ids=True"):
        scgpt_embed(cells, model, tokenizer, batch_key="batch")
    scgpt_embed(cells, model, tokenizer, batch_key="batch", batch_as_ids=True)
    as_ids = cells.obsm["X_scGPT"].copy()
    cells.obs["names"] = np.array(["A", "B"])[np.arange(cells.n_obs) % 2]
    scgpt_embed(cells, model, tokenizer, batch_key="names")
    np.testing.assert_array_equal(cells.obsm["X_scGPT"], as_ids)
    assert cells.uns["X_scGPT_params"]["batch_as_ids"] is False


def scgpt_embed(adata, model, tokenizer, **kwargs):
    from scgpt_hf.embedding import embed

    return embed(adata, model, tokenizer, progress=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# Padding


def _padded_cells():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, N_GENES, (3, 8), generator=g)
    ids[:, 0] = N_GENES + 1
    values = torch.randint(1, 51, (3, 8), generator=g).float()
    values[:, 3] = -1.0  # masked genes, for the pretraining loss
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:], values[1, 5:] = N_GENES, -2.0  # the tokenizer's padding
    return ids, values, mask


@pytest.mark.parametrize("cell_emb_style", ["cls", "avg-pool", "w-pool"])
@pytest.mark.parametrize("head", ["pretraining", "classification", "perturbation"])
def test_nothing_in_the_padding_changes_a_cell(cell_emb_style, head):
    from scgpt_hf import ScGPTForPerturbationPrediction

    torch.manual_seed(0)
    config = _config(cell_emb_style=cell_emb_style, explicit_zero_prob=True, do_mvc=True, num_labels=3)
    model = {"pretraining": ScGPTForPreTraining, "classification": ScGPTForCellClassification,
             "perturbation": ScGPTForPerturbationPrediction}[head](config).eval()
    ids, values, mask = _padded_cells()
    extra = {"labels": values.abs() + 1.0} if head != "classification" else {"labels": torch.tensor([0, 1, 2])}
    if head == "perturbation":
        extra["perturbation_flags"] = torch.where(mask.bool(), 0, config.pert_pad_id)
    with torch.no_grad():
        clean = model(ids, values, mask, **extra)
        dirty_ids, dirty_values, dirty_extra = ids.clone(), values.clone(), dict(extra)
        dirty_ids[1, 5:] = torch.tensor([3, 7, 10 ** 6])  # other genes, even an id outside the vocabulary
        dirty_values[1, 5:] = torch.tensor([float("nan"), -1.0, float("inf")])  # -1.0: the mask value
        if head != "classification":
            dirty_extra["labels"] = extra["labels"].clone()
            dirty_extra["labels"][1, 5:] = float("nan")
        dirty = model(dirty_ids, dirty_values, mask, **dirty_extra)
    for name, value in clean.items():
        if value is not None:
            torch.testing.assert_close(dirty[name], value, atol=0, rtol=0, equal_nan=False, msg=name)


def test_a_cell_without_any_token_is_an_error():
    model = ScGPTModel(_config()).eval()
    ids, values, mask = _padded_cells()
    mask[2] = 0
    with pytest.raises(ValueError, match=r"cell 2 has no token.*attention_mask"):
        model(ids, values, mask)


# ----------------------------------------------------------------------------------------------
# Keys an .h5ad file cannot hold


@pytest.mark.parametrize("key", ["a/b", "", ".", "a\x00b", 3])
def test_keys_an_h5ad_cannot_hold_are_refused_before_compute(key, tmp_path, tokenizer, cells, monkeypatch):
    from scgpt_hf import embedding

    folder = _folder(ScGPTModel(_config()), tokenizer, tmp_path / "model")
    classifier = _folder(ScGPTForCellClassification(_config(num_labels=2)), tokenizer, tmp_path / "classifier")
    cells.var_names = GENES

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before refusing the key")

    monkeypatch.setattr(embedding, "_run_cells", no_compute)
    with pytest.raises(ValueError, match=r"key_added=.*cannot hold.*choose"):
        embedding.embed(cells, folder, key_added=key, progress=False)
    with pytest.raises(ValueError, match=r"key_added=.*cannot hold.*choose"):
        embedding.annotate(cells, classifier, key_added=key, progress=False)
    assert set(cells.obsm) == set() and list(cells.obs.columns) == ["n"] and not cells.uns

    # Keys that look odd but are storable still work, and survive a round trip.
    monkeypatch.undo()
    key = "X_scGPT v2.a-b"
    embedding.embed(cells, folder, key_added=key, progress=False)
    cells.write_h5ad(tmp_path / "out.h5ad")
    back = anndata.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(back.obsm[key], cells.obsm[key])
    assert f"{key}_params" in back.uns and f"{key}_n_genes" in back.obs
