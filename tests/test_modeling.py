"""Model behaviour that does not need the original code: round trips, attention backends, training hooks, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from scgpt_hf import ScGPTConfig, ScGPTForBatchIntegration, ScGPTForPreTraining, ScGPTModel

VOCAB = 30


def small_config(**overrides) -> ScGPTConfig:
    values = dict(
        vocab_size=VOCAB,
        pad_token_id=VOCAB - 3,
        cls_token_id=VOCAB - 2,
        eoc_token_id=VOCAB - 1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        dropout=0.1,
    )
    values.update(overrides)
    return ScGPTConfig(**values)


def cells(batch: int = 3, length: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 3, (batch, length), generator=g)
    ids[:, 0] = VOCAB - 2
    values = torch.randint(1, 51, (batch, length), generator=g).float()
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = VOCAB - 3
    values[1, 5:] = -2.0
    return ids, values, mask


def test_config_aliases_and_round_trip(tmp_path):
    config = small_config(d_model=64, nlayers=3, pre_norm=True, cell_emb_style="w-pool")
    assert (config.hidden_size, config.num_hidden_layers, config.d_model) == (64, 3, 64)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ScGPTConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(cell_emb_style="max-pool"), "cell_emb_style"),
        (dict(input_emb_style="binned"), "input_emb_style"),
        (dict(use_batch_labels=True), "num_batch_labels"),
        (dict(num_attention_heads=5), "multiple of num_attention_heads"),
    ],
)
def test_config_rejects_bad_options(bad, message):
    with pytest.raises(ValueError, match=message):
        small_config(**bad)


def test_model_round_trip_and_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = ScGPTForPreTraining(small_config(explicit_zero_prob=True)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ScGPTForPreTraining)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(backbone, ScGPTModel)
    ids, values, mask = cells()
    with torch.no_grad():
        a, b = model(ids, values, mask), loaded(ids, values, mask)
        torch.testing.assert_close(a.expression, b.expression, atol=0, rtol=0)
        torch.testing.assert_close(a.zero_probs, b.zero_probs, atol=0, rtol=0)
        torch.testing.assert_close(backbone(ids, values, mask).cell_embedding, a.cell_embedding, atol=0, rtol=0)


def test_attention_backends_agree():
    torch.manual_seed(0)
    ids, values, mask = cells()
    reference = ScGPTModel(small_config()).eval()
    sdpa = ScGPTModel(small_config()).eval()
    sdpa.load_state_dict(reference.state_dict())
    reference.set_attn_implementation("eager")
    sdpa.set_attn_implementation("sdpa")
    with torch.no_grad():
        a = reference(ids, values, mask, output_attentions=True)
        b = sdpa(ids, values, mask)
    real = mask.bool()
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real], atol=1e-5, rtol=0)
    # Padded keys get no attention.
    assert len(a.attentions) == 2 and a.attentions[0].shape == (3, 4, 8, 8)
    assert torch.all(a.attentions[0][1, :, :, 5:] == 0)


def test_padding_does_not_change_a_cell():
    """A cell's outputs do not depend on how much padding its batch adds, for every pooling style."""
    for style in ("cls", "avg-pool", "w-pool"):
        torch.manual_seed(0)
        model = ScGPTModel(small_config(cell_emb_style=style)).eval()
        ids, values, mask = cells()
        with torch.no_grad():
            alone = model(ids[1:2, :5], values[1:2, :5], mask[1:2, :5]).cell_embedding
            batched = model(ids, values, mask).cell_embedding[1:2]
        torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)


def test_hidden_states_and_gradient_checkpointing():
    torch.manual_seed(0)
    model = ScGPTForPreTraining(small_config(dropout=0.0))
    ids, values, mask = cells()
    out = model(ids, values, mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    plain = torch.autograd.grad(out.expression.sum(), model.scgpt.embeddings.gene_embeddings.weight)[0]
    model.activation_checkpointing_enable()
    model.train()
    assert model.scgpt.encoder.layers[0].gradient_checkpointing
    out = model(ids, values, mask)
    ckpt = torch.autograd.grad(out.expression.sum(), model.scgpt.embeddings.gene_embeddings.weight)[0]
    torch.testing.assert_close(plain, ckpt, atol=1e-5, rtol=0)


def test_bad_inputs_get_clear_errors():
    model = ScGPTModel(small_config()).eval()
    ids, values, mask = cells()
    with pytest.raises(ValueError, match="input_ids and values"):
        model(ids, values[:, :4], mask)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, values, mask[:, :4])
    with pytest.raises(ValueError, match="no batch embedding"):
        model(ids, values, mask, batch_labels=torch.zeros(3, dtype=torch.long))
    batched = ScGPTModel(small_config(use_batch_labels=True, num_batch_labels=2, domain_spec_batchnorm="dsbn")).eval()
    with pytest.raises(ValueError, match="needs batch_labels"):
        batched(ids, values, mask)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        batched(ids, values, mask, batch_labels=torch.tensor([0, 1, 2]))


def test_encode_batch_labels_maps_names_and_ids():
    model = ScGPTModel(small_config(use_batch_labels=True, batch2id={"p1": 0, "p10": 1, "p2": 2})).eval()
    assert model.encode_batch_labels(["p2", "p1", "p10"]).tolist() == [2, 0, 1]
    assert model.encode_batch_labels([2, 0, 1.0, "1"], as_ids=True).tolist() == [2, 0, 1, 1]  # ids, said so
    with pytest.raises(ValueError, match=r"Batches 'p3' are not among the 3 .*\['p1', 'p10', 'p2'\].*fine-tune"):
        model.encode_batch_labels(["p1", "p3"])
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\).*config.batch2id names them"):
        model.encode_batch_labels([0, 3], as_ids=True)
    # An integer obs column trained through CellDataset has names "0", "1", "10" in string order: names win.
    numbered = ScGPTModel(small_config(use_batch_labels=True, batch2id={"0": 0, "1": 1, "10": 2})).eval()
    assert numbered.encode_batch_labels([10, 0, 1.0]).tolist() == [2, 0, 1]
    # Donors 3, 4, 5 as names: donor 1 is unknown, not the id of donor "4".
    donors = ScGPTModel(small_config(use_batch_labels=True, batch2id={"3": 0, "4": 1, "5": 2})).eval()
    assert donors.encode_batch_labels([5, "3"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"Batches '1' are not among the 3"):
        donors.encode_batch_labels([1, 4])
    plain = ScGPTModel(small_config(use_batch_labels=True, num_batch_labels=2)).eval()
    with pytest.raises(ValueError, match="not integer ids, and this model has no config.batch2id"):
        plain.encode_batch_labels(["donor_a"])


def test_integration_skips_training_terms_at_inference():
    """ECS and the loss are computed with labels only; a discriminator-only model takes batch labels for its loss."""
    torch.manual_seed(0)
    model = ScGPTForBatchIntegration(small_config(do_dab=True, batch2id={"a": 0, "b": 1}, ecs_threshold=0.6)).eval()
    ids, values, mask = cells()
    masked_values = values.clone()
    masked_values[:, 2] = model.config.mask_value
    batch_labels = model.encode_batch_labels(["a", "b", "a"])
    with torch.no_grad():
        inference = model(ids, masked_values, mask)
        trained = model(ids, masked_values, mask, batch_labels=batch_labels, labels=values)
    assert inference.loss is None and inference.ecs_loss is None and inference.batch_logits is not None
    assert trained.ecs_loss is not None and torch.isfinite(trained.loss)
    torch.testing.assert_close(inference.cell_embedding, trained.cell_embedding, atol=0, rtol=0)
    with pytest.raises(ValueError, match="discriminator needs batch_labels"):
        model(ids, masked_values, mask, labels=values)


def test_dsbn_normalises_each_cell_by_its_own_batch():
    torch.manual_seed(0)
    model = ScGPTModel(small_config(use_batch_labels=True, num_batch_labels=2, domain_spec_batchnorm="dsbn")).eval()
    for bn in model.embeddings.dsbn.bns:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    ids, values, mask = cells()
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        mixed = model(ids, values, mask, batch_labels=labels).cell_embedding
        for row, label in enumerate(labels.tolist()):
            single = model(ids[row : row + 1], values[row : row + 1], mask[row : row + 1], batch_labels=labels[row : row + 1])
            torch.testing.assert_close(mixed[row : row + 1], single.cell_embedding, atol=1e-5, rtol=0)
