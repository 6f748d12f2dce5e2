"""Generative pretraining: genes to generate see the known genes and themselves only; generation in rounds."""

from __future__ import annotations

import pytest
import torch

from scgpt_hf import ScGPTConfig, ScGPTForPreTraining, ScGPTModel

VOCAB = 40
PAD, CLS = VOCAB - 3, VOCAB - 2


def config(**overrides) -> ScGPTConfig:
    values = dict(
        vocab_size=VOCAB, pad_token_id=PAD, cls_token_id=CLS, eoc_token_id=VOCAB - 1, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, dropout=0.0, use_generative_flag=True,
    )
    values.update(overrides)
    return ScGPTConfig(**values)


def cells(seed: int = 0):
    """Two cells: <cls>, 5 known genes, 4 genes to generate, the second cell padded by 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.cat([torch.tensor([CLS]), torch.randperm(PAD, generator=g)[:9]]) for _ in range(2)])
    values = torch.randint(1, 51, ids.shape, generator=g).float()
    values[:, 0] = 0.0
    gen = torch.zeros_like(ids, dtype=torch.bool)
    gen[:, 6:] = True
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = PAD
    values[1, 8:] = -2.0
    gen[1, 8:] = False
    return ids, values, mask, gen


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_known_genes_ignore_generated_ones_and_each_generated_gene_sees_only_known_ones(impl):
    torch.manual_seed(0)
    model = ScGPTModel(config()).eval()
    model.set_attn_implementation(impl)
    ids, values, mask, gen = cells()
    with torch.no_grad():
        full = model(ids, values, mask, generative_mask=gen)
        # Known genes alone, no generated gene in the sequence: same states and cell embedding.
        known = model(ids[:, :6], values[:, :6], mask[:, :6])
        torch.testing.assert_close(full.last_hidden_state[:, :6], known.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(full.cell_embedding, known.cell_embedding, atol=1e-5, rtol=0)
        # One generated gene with the known genes: the same state as among all generated genes.
        for position in (6, 7):
            keep = list(range(6)) + [position]
            alone = model(ids[:, keep], values[:, keep], mask[:, keep], generative_mask=gen[:, keep])
            torch.testing.assert_close(
                alone.last_hidden_state[:, -1], full.last_hidden_state[:, position], atol=1e-5, rtol=0
            )


def test_generated_genes_use_the_flag_not_their_values():
    torch.manual_seed(0)
    model = ScGPTModel(config()).eval()
    ids, values, mask, gen = cells()
    with torch.no_grad():
        base = model(ids, values, mask, generative_mask=gen).last_hidden_state
        other_values = values.clone()
        other_values[gen] = 7.0
        torch.testing.assert_close(model(ids, other_values, mask, generative_mask=gen).last_hidden_state, base)
        model.embeddings.flag_embeddings.weight[1] += 1.0
        changed = model(ids, values, mask, generative_mask=gen).last_hidden_state
    assert not torch.allclose(changed[gen], base[gen])
    torch.testing.assert_close(changed[~gen & mask.bool()], base[~gen & mask.bool()])


def test_generative_loss_scores_generated_genes():
    torch.manual_seed(0)
    model = ScGPTForPreTraining(config(explicit_zero_prob=True)).eval()
    ids, values, mask, gen = cells()
    with torch.no_grad():
        out = model(ids, values, mask, labels=values, generative_mask=gen)
        shifted = values.clone()
        shifted[~gen] += 5.0  # labels of known genes do not count
        again = model(ids, values, mask, labels=shifted, generative_mask=gen)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, again.loss)


def test_generation_in_rounds():
    torch.manual_seed(0)
    model = ScGPTForPreTraining(config(explicit_zero_prob=True)).eval()
    ids, values, mask, gen = cells()
    one = model.generate_expression(ids, values, gen, attention_mask=mask, rounds=1)
    with torch.no_grad():
        out = model(ids, values, mask, generative_mask=gen)
    expected = torch.where(out.zero_probs >= 0.5, out.expression, torch.zeros_like(out.expression))
    torch.testing.assert_close(one[gen], expected[gen])
    torch.testing.assert_close(one[~gen], values[~gen])
    two = model.generate_expression(ids, values, gen, attention_mask=mask, rounds=2)
    # The first round fixes the most confident half, exactly as a single round predicts them.
    confidence = (out.zero_probs - 0.5).abs()
    for row in range(2):
        candidates = gen[row].nonzero().squeeze(1)
        first = candidates[confidence[row, candidates].argsort(descending=True)[: -(-len(candidates) // 2)]]
        torch.testing.assert_close(two[row, first], one[row, first])
    assert not torch.allclose(two[gen], one[gen]), "the second round conditions on the first round's genes"


def test_generative_errors():
    ids, values, mask, gen = cells()
    with pytest.raises(ValueError, match="use_generative_flag"):
        ScGPTModel(config(use_generative_flag=False))(ids, values, mask, generative_mask=gen)
    with pytest.raises(ValueError, match="bool tensor"):
        ScGPTModel(config())(ids, values, mask, generative_mask=gen.long())
    with pytest.raises(ValueError, match="rounds ranks genes by confidence"):
        ScGPTForPreTraining(config(do_mvc=False)).generate_expression(ids, values, gen, mask, rounds=2)
