"""ScGPTConfig: derived values follow their sources, batch2id, checks after from_pretrained kwargs."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from scgpt_hf import ScGPTConfig

MODALITIES = {"RNA": 0, "ATAC": 1, "<pad>": 2}


def _saved(tmp_path, **kwargs) -> ScGPTConfig:
    config = ScGPTConfig(**kwargs)
    config.save_pretrained(tmp_path)
    return config


def test_derived_values_are_written_and_round_trip(tmp_path):
    config = _saved(tmp_path, use_modality_embeddings=True, modality_vocab=MODALITIES, batch2id={"p1": 0, "p2": 1},
                    use_batch_labels=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    # config.json keeps every value, derived ones included, under its own name (no private keys).
    assert {k: saved[k] for k in ("n_input_bins", "modality_vocab_size", "modality_pad_id", "num_batch_labels")} == {
        "n_input_bins": 53, "modality_vocab_size": 3, "modality_pad_id": 2, "num_batch_labels": 2
    }
    assert not [k for k in saved if k.startswith("_")]
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.batch2id == {"p1": 0, "p2": 1}


def test_from_pretrained_kwargs_re_derive(tmp_path):
    """kwargs of from_pretrained are set after __init__: values derived from them must follow."""
    _saved(tmp_path, use_modality_embeddings=True, modality_vocab=MODALITIES)
    vocab = {"RNA": 0, "ATAC": 1, "protein": 2, "<pad>": 3, "<cls>": 4}
    config = ScGPTConfig.from_pretrained(tmp_path, modality_vocab=vocab, n_bins=101)
    assert (config.modality_vocab_size, config.modality_pad_id, config.n_input_bins) == (5, 3, 103)
    config = ScGPTConfig.from_dict(ScGPTConfig().to_dict(), batch2id={"a": 0, "b": 1, "c": 2}, use_batch_labels=True)
    assert config.num_batch_labels == 3
    config.n_bins = 11  # plain assignment re-derives too
    assert config.n_input_bins == 13


def test_explicit_values_are_kept(tmp_path):
    _saved(tmp_path, input_emb_style="category", n_input_bins=60, pad_value=51, use_modality_embeddings=True,
           modality_vocab_size=4)
    config = ScGPTConfig.from_pretrained(tmp_path, n_bins=101)
    assert config.n_input_bins == 60 and config.modality_vocab_size == 4 and config.modality_pad_id is None


def test_kwargs_are_checked(tmp_path):
    _saved(tmp_path, batch2id={"a": 0, "b": 1}, use_batch_labels=True)
    with pytest.raises(ValueError, match=r"batch2id has 2 entries \(\['a', 'b'\]\) but num_batch_labels is 5"):
        ScGPTConfig.from_pretrained(tmp_path, num_batch_labels=5)
    with pytest.raises(ValueError, match="cell_emb_style"):
        ScGPTConfig.from_pretrained(tmp_path, cell_emb_style="max-pool")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch2id={"a": 0, "b": 2}), r"batch2id ids must be the distinct integers 0\.\.1"),
        (dict(batch2id={"a": 0}, num_batch_labels=3), "batch2id has 1 entries"),
        (dict(batch2id={}), "non-empty mapping"),
        (dict(do_dab=True), "num_batch_labels is required"),
    ],
)
def test_bad_batch_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScGPTConfig(**kwargs)


def test_equality_compares_scgpt_settings():
    assert ScGPTConfig(n_bins=11) != ScGPTConfig()
    assert ScGPTConfig(batch2id={1: 0}) == ScGPTConfig(batch2id={"1": 0})  # names are strings, as in JSON


def test_batch2id_assigned_later_is_saved_as_names_and_checked_before_writing(tmp_path):
    config = ScGPTConfig(use_batch_labels=True, batch2id={"a": 0, "b": 1})
    config.batch2id = {0: 0, 1: 1}  # e.g. ids of an integer obs column
    config.save_pretrained(tmp_path / "ok")
    assert ScGPTConfig.from_pretrained(tmp_path / "ok").batch2id == {"0": 0, "1": 1}
    config = ScGPTConfig(use_batch_labels=True, num_batch_labels=2)
    config.batch2id = {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError, match=r"batch2id has 3 entries .* but num_batch_labels is 2"):
        config.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()
