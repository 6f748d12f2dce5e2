"""`scgpt-hf convert` and `scgpt-hf embed` through `scgpt_hf.cli.main`."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

import reference
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
def test_user_errors_exit_2_with_one_line(argv, message, original_dir, wu2020_adata, tmp_path, capsys):
    data = tmp_path / "in.h5ad"
    wu2020_adata[:3].copy().write_h5ad(data)
    model = tmp_path / "model"
    main(["convert", str(original_dir), str(model), "--quiet"])
    capsys.readouterr()
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
