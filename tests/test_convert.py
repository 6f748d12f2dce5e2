"""Converter: what it reads from weights vs args.json, its report, and its errors on bad folders."""

from __future__ import annotations

import json

import pytest
import torch

from reference import build_original_model, make_vocab, save_original_checkpoint
from scgpt_hf import ScGPTConfig
from scgpt_hf.cli import main
from scgpt_hf.convert import convert_original_checkpoint, infer_task

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

    report = convert_original_checkpoint(original_dir, tmp_path / "hf", task="pretraining", pre_norm=False,
                                         max_seq_len=600)
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


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_conversion_leaves_the_existing_folder_as_it_was(original_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    convert_original_checkpoint(original_dir, out, verbose=False)
    before = _snapshot(out)
    _edit_json(original_dir / "args.json", n_bins=1)  # fails validation only once the config is built
    with pytest.raises(ValueError, match="n_bins must be at least 2.*args.json n_bins.*--n-bins"):
        convert_original_checkpoint(original_dir, out, overwrite=True, verbose=False)
    assert _snapshot(out) == before
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(original_dir), str(out), "--overwrite", "--quiet"])
    assert exc.value.code == 2 and "n_bins" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "orig"], "no staging folder is left behind"


def test_existing_output_is_replaced_only_with_overwrite(original_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(original_dir), str(out), "--quiet"])
    assert exc.value.code == 2 and "already exists: pass --overwrite" in capsys.readouterr().err
    assert _snapshot(out) == {"notes.txt": b"mine"}
    assert main(["convert", str(original_dir), str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists(), "the folder is replaced whole"


@pytest.mark.parametrize("bad", ["nan", "inf", "int64"])
def test_non_finite_and_non_float_weights_are_refused_by_name(original_dir, tmp_path, bad):
    state = torch.load(original_dir / "best_model.pt", weights_only=True)
    key = "transformer_encoder.layers.1.linear2.weight"
    if bad == "int64":
        state[key] = state[key].to(torch.int64)
        match = rf"{key}.*torch.int64.*floating point"
    else:
        state[key][3, 4] = float(bad)
        match = rf"{key}.*NaN or infinite"
    torch.save(state, original_dir / "best_model.pt")
    with pytest.raises(ValueError, match=match):
        convert_original_checkpoint(original_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_task_is_inferred_from_the_weights_and_reported(original_dir, tmp_path, capsys):
    """The fixture has a batch encoder and a batch discriminator (and the one-class classifier every original
    model builds): an integration model; --task overrides."""
    report = convert_original_checkpoint(original_dir, tmp_path / "hf")
    printed = capsys.readouterr().out
    assert report.task == "integration" and "inferred from the weights" in report.task_source
    assert "Task: integration (inferred from the weights: batch discriminator and batch encoder" in printed
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ScGPTForBatchIntegration"]
    report = convert_original_checkpoint(original_dir, tmp_path / "pre", task="pretraining", verbose=False)
    assert report.task == "pretraining" and report.task_source == "task option"


def _keys(*names, classes=1):
    state = {name: torch.zeros(2, 2) for name in names}
    state["cls_decoder.out_layer.weight"] = torch.zeros(classes, 2)
    return state


@pytest.mark.parametrize("state, task", [
    (_keys("encoder.embedding.weight"), "pretraining"),
    (_keys("encoder.embedding.weight", classes=5), "annotation"),
    (_keys("batch_encoder.embedding.weight"), "integration"),
    (_keys("grad_reverse_discriminator.out_layer.weight"), "integration"),
    (_keys("dsbn.bns.0.running_mean"), "integration"),
    (_keys("batch_encoder.embedding.weight", classes=5), "annotation"),  # annotation fine-tuned with batch labels
    (_keys("pert_encoder.weight", classes=5), "perturbation"),
    (_keys("mod_encoder.embedding.weight", "batch_encoder.embedding.weight"), "multiomic"),
])
def test_task_inference_rules(state, task):
    assert infer_task(state)[0] == task


def test_classifier_and_discriminator_together_need_a_task():
    with pytest.raises(ValueError, match="--task annotation.*--task integration"):
        infer_task(_keys("grad_reverse_discriminator.out_layer.weight", classes=5))


@pytest.mark.parametrize("kept", [100, 0.5, 0.98])
def test_truncated_checkpoint_says_so(original_dir, tmp_path, kept):
    data = (original_dir / "best_model.pt").read_bytes()
    (original_dir / "best_model.pt").write_bytes(data[: kept if isinstance(kept, int) else int(len(data) * kept)])
    with pytest.raises(ValueError, match="best_model.pt is truncated .*copy it again"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")


@pytest.mark.parametrize("content", [b"hello world" * 10, bytes(range(256)) * 4, b"\x00" * 100],
                         ids=["text", "bytes", "zeros"])
def test_arbitrary_bytes_are_not_a_checkpoint(original_dir, tmp_path, content):
    (original_dir / "best_model.pt").write_bytes(content)
    with pytest.raises(ValueError, match=r"best_model.pt is not a PyTorch checkpoint \(damaged or another format\)"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")


def test_pickled_checkpoint_message_is_ours_alone(original_dir, tmp_path):
    torch.save(torch.nn.Linear(2, 2), original_dir / "best_model.pt")
    with pytest.raises(ValueError) as exc:
        convert_original_checkpoint(original_dir, tmp_path / "hf")
    message = str(exc.value)
    assert "torch.save(model.state_dict(), path)" in message
    assert "\x1b" not in message and "weights_only=False" not in message and "Weights only load failed" not in message


@pytest.mark.parametrize("name", ["args.json", "vocab.json"])
def test_invalid_json_names_the_file(original_dir, tmp_path, name):
    (original_dir / name).write_text('{"nheads": 4,')
    with pytest.raises(ValueError, match=rf"{name} is not valid JSON"):
        convert_original_checkpoint(original_dir, tmp_path / "hf")


def test_annotation_needs_a_trained_classifier(original_dir, tmp_path):
    """Every original model carries a one-class cls_decoder, untrained in foundation checkpoints."""
    with pytest.raises(ValueError, match=r"1 class.*train_new_weights=True"):
        convert_original_checkpoint(original_dir, tmp_path / "hf", task="annotation")
    assert not (tmp_path / "hf").exists()
