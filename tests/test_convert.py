"""Converter: what it reads from weights vs args.json, its report, and its errors on bad folders."""

from __future__ import annotations

import json

import pytest
import torch

from reference import build_original_model, make_vocab, save_original_checkpoint
from scgpt_hf import ScGPTConfig
from scgpt_hf.convert import convert_original_checkpoint

ARGS = dict(embsize=32, nheads=4, d_hid=48, nlayers=2, dropout=0.1, pad_value=-2, mask_value=-1)


@pytest.fixture
def original_dir(tmp_path, original_scgpt):
    vocab = make_vocab(20, None)
    model = build_original_model(
        flash=True, seed=0, ntoken=len(vocab), vocab=vocab, d_model=32, nhead=4, d_hid=48, nlayers=2,
        do_mvc=True, do_dab=True, use_batch_labels=True, num_batch_labels=2, n_cls=1,
    )
    return save_original_checkpoint(model, tmp_path / "orig", args=ARGS, vocab=vocab, layout="released")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_report_and_loadable_outputs(original_dir, tmp_path, capsys):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    report = convert_original_checkpoint(original_dir, tmp_path / "hf", pre_norm=False, max_seq_len=600)
    printed = capsys.readouterr().out
    assert "grad_reverse_discriminator" in printed and "cls_decoder" in printed
    assert all(k.startswith(("cls_decoder.", "grad_reverse_discriminator.")) for k in report.left_out)
    assert report.config_sources["use_batch_labels"] == "True (weights)"
    assert report.config_sources["num_attention_heads"] == "4 (args.json nheads)"
    assert report.config_sources["max_seq_len"] == "600 (converter option)"
    state = torch.load(original_dir / "best_model.pt", weights_only=True)
    assert set(report.mapped) | set(report.left_out) == set(state)
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert isinstance(config, ScGPTConfig) and config.num_batch_labels == 2 and config.max_seq_len == 600
    assert type(AutoModel.from_pretrained(tmp_path / "hf")).__name__ == "ScGPTModel"
    assert len(AutoTokenizer.from_pretrained(tmp_path / "hf")) == 23
    assert not list((tmp_path / "hf").glob("*.bin")), "weights must be written as safetensors only"


def test_not_a_state_dict(original_dir, tmp_path):
    torch.save({"model_state_dict": torch.load(original_dir / "best_model.pt", weights_only=True)},
               original_dir / "best_model.pt")
    with pytest.raises(ValueError, match="model_state_dict"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")
    torch.save(torch.nn.Linear(2, 2), original_dir / "best_model.pt")
    with pytest.raises(ValueError, match="state_dict"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")


def test_args_disagreeing_with_weights(original_dir, tmp_path):
    _edit_json(original_dir / "args.json", embsize=64)
    with pytest.raises(ValueError, match="embsize=64"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")


def test_heads_must_come_from_somewhere(original_dir, tmp_path):
    _edit_json(original_dir / "args.json", nheads=None)
    with pytest.raises(ValueError, match="nheads"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")
    assert convert_original_checkpoint(original_dir, tmp_path / "hf", nheads=4, verbose=False).mapped


def test_vocab_without_special_tokens(original_dir, tmp_path):
    vocab = json.loads((original_dir / "vocab.json").read_text())
    del vocab["<eoc>"]
    (original_dir / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="<eoc>"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")


def test_vocab_of_other_size(original_dir, tmp_path):
    vocab = json.loads((original_dir / "vocab.json").read_text())
    vocab = {"EXTRA": 0, **{k: v + 1 for k, v in vocab.items()}}
    (original_dir / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="24 tokens but the gene embedding has 23 rows"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")


def test_unknown_key_and_wrong_shape(original_dir, tmp_path):
    state = torch.load(original_dir / "best_model.pt", weights_only=True)
    torch.save({**state, "mystery.weight": torch.zeros(3)}, original_dir / "best_model.pt")
    with pytest.raises(ValueError, match="mystery.weight"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")
    state["decoder.fc.2.weight"] = torch.zeros(32, 31)
    torch.save(state, original_dir / "best_model.pt")
    with pytest.raises(ValueError, match=r"decoder\.fc\.2\.weight.*\(32, 31\)"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists(), "nothing is written when a conversion fails"


def test_missing_file(original_dir, tmp_path):
    (original_dir / "args.json").unlink()
    with pytest.raises(FileNotFoundError, match="args.json"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")
