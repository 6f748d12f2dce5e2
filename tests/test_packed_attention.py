"""Packed (padding-free) inference: the cells of a batch concatenated into one row of tokens, attention kept
within each cell. Same numbers as the padded forward on real wu2020 cells, for every cell-embedding style,
with batch labels and batch norms; the CUDA path (nested jagged SDPA) checked against the CPU one; refusals
where packed input means nothing. Speed: bench/packed_attention.py (CPU) and bench/gpu/suite.py (GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference
from scgpt_hf import ScGPTConfig, ScGPTForCellClassification, ScGPTForPreTraining, ScGPTModel
from scgpt_hf.inference import DEFAULT_PACKED, run_cells
from scgpt_hf.modeling_scgpt import ScGPTForPerturbationPrediction, _nested_attention, _per_cell_attention
from scgpt_hf.padding import pad_cells
from scgpt_hf.pretraining import make_tokenizer

N_CELLS = 12
CONFIGS = {
    "cls": dict(cell_emb_style="cls"),
    "avg-pool+batch-labels+dsbn": dict(cell_emb_style="avg-pool", use_batch_labels=True, num_batch_labels=3,
                                       domain_spec_batchnorm="dsbn"),
    "w-pool+batchnorm": dict(cell_emb_style="w-pool", domain_spec_batchnorm="batchnorm"),
}


@pytest.fixture(scope="module")
def real(wu2020_adata):
    """(tokenizer, each cell's ids, values) for wu2020 cells at their real lengths (136 and up, cut to 700)."""
    genes = list(wu2020_adata.var_names)
    tok = make_tokenizer(reference.make_vocab(len(genes), genes))
    enc = tok.encode_with_ids(wu2020_adata.X[:N_CELLS], tok.match_genes(genes).ids, max_length=700,
                              truncation="random", padding=False, return_tensors=None, seed=0, cls_value=-2.0)
    ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
    assert len({len(x) for x in ids}) > 3, "the cells must differ in length"
    return tok, ids, [np.asarray(x, dtype=np.float32) for x in enc["values"]]


def _model(model_class, tok, seed: int = 0, **overrides):
    config = ScGPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                         eoc_token_id=tok.convert_tokens_to_ids("<eoc>"), num_labels=5, **overrides)
    torch.manual_seed(seed)
    model = model_class(config)
    for module in model.modules():  # batch norms with statistics of their own, so that they matter
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _both(ids, values, pad_id: int):
    """The padded inputs (input_ids, values, attention_mask) and the packed ones of the same cells."""
    pid, pval, pmask = (torch.from_numpy(a) for a in pad_cells(list(zip(ids, values)), pad_id, -2.0))
    lengths = [len(x) for x in ids]
    packed = {"input_ids": torch.from_numpy(np.concatenate(ids))[None],
              "values": torch.from_numpy(np.concatenate(values))[None],
              "cu_seq_lens_q": torch.tensor(np.concatenate(([0], np.cumsum(lengths)))),
              "max_length_q": max(lengths)}
    return {"input_ids": pid, "values": pval, "attention_mask": pmask}, packed


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_packed_forward_equals_padded_on_real_cells(real, overrides):
    tok, ids, values = real
    model = _model(ScGPTModel, tok, **overrides)
    padded, packed = _both(ids, values, tok.pad_token_id)
    batches = {"batch_labels": torch.arange(N_CELLS) % 3} if model.config.needs_batch_labels else {}
    with torch.inference_mode():
        want = model(**padded, **batches)
        got = model(**packed, **batches)
    real_tokens = padded["attention_mask"].bool()
    assert got.cell_embedding.shape == (N_CELLS, 32) and got.last_hidden_state.shape == (1, real_tokens.sum(), 32)
    torch.testing.assert_close(got.cell_embedding, want.cell_embedding, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.last_hidden_state[0], want.last_hidden_state[real_tokens], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.gene_embeddings[0], want.gene_embeddings[real_tokens])
    if batches:
        torch.testing.assert_close(got.batch_embedding, want.batch_embedding)


def test_classifier_packed_equals_padded(real):
    tok, ids, values = real
    model = _model(ScGPTForCellClassification, tok, use_batch_labels=True, num_batch_labels=2)
    padded, packed = _both(ids, values, tok.pad_token_id)
    labels = torch.arange(N_CELLS) % 2
    with torch.inference_mode():
        torch.testing.assert_close(model(**packed, batch_labels=labels).logits,
                                   model(**padded, batch_labels=labels).logits, atol=2e-5, rtol=1e-4)


def test_run_cells_packed_equals_padded(real):
    """The inference loop both ways, with batch labels, under a budget that leaves padding in each batch."""
    tok, ids, values = real
    model = _model(ScGPTForCellClassification, tok, use_batch_labels=True, num_batch_labels=2)
    batch_ids = np.arange(N_CELLS) % 2
    run = dict(predict=lambda o: torch.cat([o.logits, o.cell_embedding], 1), batch_size=5, max_tokens=2000,
               pad_id=tok.pad_token_id, pad_value=-2.0, device=torch.device("cpu"), dtype=None, batch_ids=batch_ids)
    padded = run_cells(model, ids, values, packed=False, **run)
    packed = run_cells(model, ids, values, packed=True, **run)
    np.testing.assert_allclose(packed, padded, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(run_cells(model, ids, values, **run),
                                  packed if DEFAULT_PACKED["cpu"] else padded)


def test_nested_attention_equals_per_cell():
    """The accelerator's path (one SDPA call on nested jagged tensors) against the CPU's (one call per cell),
    under inference mode as `run_cells` runs it."""
    torch.manual_seed(0)
    lengths = [5, 17, 1, 30, 9]
    cu = torch.tensor(np.concatenate(([0], np.cumsum(lengths))))
    with torch.inference_mode():
        q, k, v = (torch.randn(1, 4, sum(lengths), 8) for _ in range(3))
        nested = _nested_attention(q, k, v, cu, max(lengths), 0.3)
        per_cell = _per_cell_attention(q, k, v, cu, max(lengths), 0.3)
    assert nested.shape == per_cell.shape == (1, sum(lengths), 4, 8)
    torch.testing.assert_close(nested, per_cell)
    first = torch.nn.functional.scaled_dot_product_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], scale=0.3)
    torch.testing.assert_close(per_cell[:, :5], first.transpose(1, 2))


def test_packed_input_refusals(real):
    tok, ids, values = real
    model = _model(ScGPTModel, tok)
    padded, packed = _both(ids[:3], values[:3], tok.pad_token_id)
    total = packed["input_ids"].shape[1]
    bad = {
        "call model.eval": (dict(packed), lambda m: m.train()),
        "take no attention_mask": ({**packed, "attention_mask": torch.ones(1, total, dtype=torch.long)}, None),
        "take no attention_mask, perturbation_flags or generative_mask":
            ({**packed, "generative_mask": torch.zeros(1, total, dtype=torch.bool)}, None),
        "rise from 0": ({**packed, "cu_seq_lens_q": packed["cu_seq_lens_q"] - 1}, None),
        "at least one token": ({**packed, "cu_seq_lens_q": torch.tensor([0, 0, total])}, None),
        "the longest cell": ({**packed, "max_length_q": None}, None),
        "are one row": ({**packed, "input_ids": padded["input_ids"], "values": padded["values"]}, None),
        "give no attention probabilities": ({**packed, "output_attentions": True}, None),
    }
    for message, (inputs, prepare) in bad.items():
        if prepare:
            prepare(model)
        with pytest.raises(ValueError, match=message):
            model(**inputs)
        model.eval()
    for head in (ScGPTForPreTraining, ScGPTForPerturbationPrediction):
        with pytest.raises(ValueError, match="decodes every token"):
            _model(head, tok)(**packed)
