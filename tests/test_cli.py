"""`scgpt-hf convert` and `scgpt-hf embed` through `scgpt_hf.cli.main`."""

from __future__ import annotations

import json
import re
import shutil

import anndata
import numpy as np
import pytest
import torch

import reference
from scgpt_hf import cli
from scgpt_hf.cli import main


@pytest.fixture(scope="module")
def original_dir(original_scgpt, wu2020_adata, tmp_path_factory):
    genes = list(wu2020_adata.var_names[::2])
    vocab = reference.make_vocab(len(genes), genes)
    model = reference.build_original_model(
        flash=False, seed=5, ntoken=len(vocab), vocab=vocab, d_model=32, nhead=4, d_hid=32, nlayers=2
    )
    return reference.save_original_checkpoint(
        model, tmp_path_factory.mktemp("cli") / "original", args={}, vocab=vocab, layout="released"
    )


@pytest.fixture(scope="module")
def model(original_dir, tmp_path_factory):
    """The converted model folder (shared: copy it before changing it)."""
    folder = tmp_path_factory.mktemp("cli") / "model"
    assert main(["convert", str(original_dir), str(folder), "--quiet"]) == 0
    return folder


def test_convert_then_embed(original_dir, wu2020_adata, tmp_path, capsys):
    converted = tmp_path / "converted"
    assert main(["convert", str(original_dir), str(converted), "--quiet"]) == 0
    assert (converted / "config.json").is_file() and (converted / "vocab.json").is_file()

    source = tmp_path / "in.h5ad"
    wu2020_adata[:30].copy().write_h5ad(source)
    out = tmp_path / "out" / "emb.h5ad"
    args = ["embed", str(source), str(out), "--model", str(converted), "--batch-size", "8", "--no-progress"]
    assert main(args) == 0
    assert "Embedded 30 cells" in capsys.readouterr().out
    result = anndata.read_h5ad(out)
    emb = result.obsm["X_scGPT"]
    assert emb.shape == (30, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert result.uns["X_scGPT_params"]["model"] == str(converted)

    backed_out = tmp_path / "backed.h5ad"
    assert main(args[:2] + [str(backed_out)] + args[3:] + ["--backed", "--key-added", "X_b"]) == 0
    np.testing.assert_allclose(anndata.read_h5ad(backed_out).obsm["X_b"], emb, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["embed", "{tmp}/missing.h5ad", "{tmp}/o.h5ad", "--model", "{tmp}"], "input file"),
        (["embed", "{data}", "{tmp}/o.h5ad", "--model", "{tmp}/no_model"], "no_model"),
        (["embed", "{data}", "{tmp}/o.h5ad", "--model", "{model}", "--gene-column", "nope"], "gene_column 'nope'"),
        (["embed", "{data}", "{tmp}/o.csv", "--model", "{model}"], "must be an .h5ad"),
        (["convert", "{tmp}/not_there", "{tmp}/x"], "is not a folder"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, model, wu2020_adata, tmp_path, capsys):
    data = tmp_path / "in.h5ad"
    wu2020_adata[:3].copy().write_h5ad(data)
    argv = [a.format(tmp=tmp_path, data=data, model=model) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # the message is one line, and the last
    assert err.startswith(f"scgpt-hf {argv[0]}: error:") and message in err
    assert "Traceback" not in stderr


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["embed", "only_input.h5ad"])
    assert exc.value.code == 2


def _copy_original(original_dir, tmp_path):
    folder = tmp_path / "original"
    shutil.copytree(original_dir, folder)
    return folder


def _drop_embedding(folder):
    state = torch.load(folder / "best_model.pt", weights_only=True)
    del state["encoder.embedding.weight"]
    torch.save(state, folder / "best_model.pt")


def _string_nheads(folder):
    args = json.loads((folder / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, "nheads": "4"}))


def _truncate(folder):
    data = (folder / "best_model.pt").read_bytes()
    (folder / "best_model.pt").write_bytes(data[: len(data) // 2])


def _pickled_weights(model, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(model, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"layer": torch.nn.Linear(2, 2)}, folder / "pytorch_model.bin")  # an object, not plain tensors
    return folder


@pytest.mark.parametrize(
    "argv, prepare, message",
    [
        (["convert", "{original}", "{tmp}/x"], _drop_embedding, "lacks encoder.embedding.weight"),
        (["convert", "{original}", "{tmp}/x"], _string_nheads, "args.json nheads is '4'.*--nheads"),
        (["convert", "{original}", "{tmp}/x"], _truncate, "truncated.*copy it again"),
        (["embed", "{data}", "{tmp}/o.h5ad", "--model", "{model}", "--device", "foo"], None,
         "'foo' is not a torch device.*cpu"),
        (["embed", "{data}", "{tmp}/o.h5ad", "--model", "{tmp}/missing/folder"], None,
         "model folder .*missing/folder does not exist"),
        (["embed", "{data}", "{tmp}/o.h5ad", "--model", "{pickled}"], None,
         "pytorch_model.bin.*not plain tensors.*save_pretrained"),
        (["embed", "{data}"], None, "required: output, --model.*see scgpt-hf embed --help"),
    ],
    ids=["no-gene-embedding", "string-nheads", "truncated-checkpoint", "bad-device", "missing-model-folder",
         "pickled-weights", "usage"],
)
def test_every_failure_is_one_line_naming_the_fix(argv, prepare, message, original_dir, model, wu2020_adata, tmp_path,
                                                  capsys):
    data = tmp_path / "in.h5ad"
    wu2020_adata[:3].copy().write_h5ad(data)
    original = _copy_original(original_dir, tmp_path)
    if prepare is not None:
        prepare(original)
    pickled = _pickled_weights(model, tmp_path)
    argv = [a.format(tmp=tmp_path, data=data, model=model, original=original, pickled=pickled) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert re.search(message, stderr), stderr
    assert "Traceback" not in stderr


def test_unexpected_error_is_one_line_with_the_debug_hint(monkeypatch, capsys):
    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "COMMANDS", [cli.Command("broken", "fails", lambda p: None, broken)])
    with pytest.raises(SystemExit) as exc:
        main(["broken"])
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "unexpected KeyError" in stderr and "--debug" in stderr
    with pytest.raises(KeyError):
        main(["--debug", "broken"])
