"""`scgpt_hf.embed` given paths: many inputs of every kind into an embedding store (the same store that
`scgpt_hf.atlas.embed_to_store` writes), one .h5ad file opened backed, and the errors for what fits neither.

Real wu2020 T cells and the small random model of tests/test_atlas.py (its fixtures are shared here).
"""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest

from scgpt_hf import embed
from scgpt_hf.atlas import SourceOptions
from test_atlas import (  # noqa: F401 - fixtures
    N_CELLS,
    SETTINGS,
    _assert_same_store,
    _read,
    cells,
    inputs,
    model,
    reference_store,
    soma,
    work,
)


def test_paths_with_an_output_give_the_store_embed_to_store_writes(inputs, model, reference_store, work):
    path = work / "via_embed.zarr"
    result = embed([inputs["h5ad"], str(inputs["zarr"])], model, output=path, **SETTINGS)
    assert result == Path(path)
    _assert_same_store(path, reference_store)
    assert embed([inputs["h5ad"], inputs["zarr"]], model, output=path, **SETTINGS) == Path(path)  # finished: a no-op


def test_soma_options_reach_the_store(soma, model, work):
    path = work / "via_embed_soma.zarr"
    embed(soma, model, output=path, source_options=SourceOptions(obs_filter="patient == 'Lung3'"), **SETTINGS)
    store = _read(path)
    assert 0 < store.n_obs < N_CELLS
    assert store.uns["X_scGPT_params"]["sources"]["0"]["obs_filter"] == "patient == 'Lung3'"


def test_one_h5ad_path_is_embedded_backed_like_its_anndata(inputs, cells, model):
    got = embed(str(inputs["all"]), model, max_length=64, progress=False)
    try:
        assert got.isbacked and got.n_obs == N_CELLS
        expected = embed(cells.copy(), model, max_length=64, progress=False)
        assert np.array_equal(got.obsm["X_scGPT"], expected.obsm["X_scGPT"], equal_nan=True)
        assert got.uns["X_scGPT_params"]["n_cells_empty"] == expected.uns["X_scGPT_params"]["n_cells_empty"]
    finally:
        got.file.close()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda i, c, w: embed(c, "m", output=w / "x.zarr"), ValueError, "output, source_options and overwrite are "
                                                                         "for inputs given as paths"),
        (lambda i, c, w: embed(i["zarr"], "m"), ValueError, r"part2\.zarr: give output='cells\.zarr'"),
        (lambda i, c, w: embed([i["h5ad"], i["all"]], "m"), ValueError, r"2 inputs: give output='cells\.zarr'"),
        (lambda i, c, w: embed(i["all"], "m", source_options=SourceOptions(obs_filter="a == 1")), ValueError,
         r"source options \['obs_filter'\]: give output="),
        (lambda i, c, w: embed(i["all"], "m", output=w / "x.h5ad"), ValueError, "output must be a .zarr folder"),
        (lambda i, c, w: embed(i["all"], "m", output=w / "x.zarr", batch_key="patient"), ValueError,
         "batch_key and batch_as_ids are not for an embedding store"),
        (lambda i, c, w: embed(i["all"], "m", layer="a", source_options=SourceOptions(layer="b")), ValueError,
         "layer='a' contradicts source_options.layer='b'"),
        (lambda i, c, w: embed(c.X, "m"), TypeError, "adata must be an AnnData, a path or a list of paths"),
        (lambda i, c, w: embed(w / "typo.h5ad", "m"), FileNotFoundError, r"input .*typo\.h5ad does not exist"),
        (lambda i, c, w: embed(i["all"], "m", overwrite=True), ValueError, "overwrite is for an embedding store"),
        (lambda i, c, w: embed([], "m"), ValueError, "No input given"),
    ],
    ids=["anndata-with-output", "zarr-without-output", "many-without-output", "soma-options-without-output",
         "output-not-zarr", "batch-key-into-store", "contradicting-options", "matrix", "missing-file",
         "overwrite-without-output", "nothing"],
)
def test_what_fits_neither_an_anndata_nor_a_store_is_refused_before_loading_a_model(call, error, message, inputs,
                                                                                   cells, work):
    with pytest.raises(error, match=message):
        call(inputs, cells, work)  # "m" is no model: the check comes first
    assert not (work / "x.zarr").exists()


@pytest.mark.parametrize("output", ["cli_bf16.zarr", "cli_bf16.h5ad"])
def test_cli_precision_reaches_both_outputs(output, inputs, model, work, capsys):
    from scgpt_hf.cli import main

    path = work / output
    main(["embed", str(inputs["all"]), str(path), "--model", str(model), "--max-length", "64", "--no-progress",
          "--precision", "bf16"])
    got = _read(path) if path.suffix == ".zarr" else anndata.read_h5ad(path)
    assert got.uns["X_scGPT_params"]["precision"] == "bf16-autocast"  # the default on a CPU is fp32
    assert np.isfinite(got.obsm["X_scGPT"]).all()
