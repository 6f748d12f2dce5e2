"""Model behaviour that does not need the original code: round trips, attention backends, training hooks, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from scgpt_hf import ScGPTConfig, ScGPTForPreTraining, ScGPTModel

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
