"""Atlas scale (`scgpt_hf.atlas`): .h5ad, zarr and TileDB-SOMA sources into a resumable zarr embedding store,
in one process or two (torchrun over gloo), on real wu2020 T cells and a small random model.

Bounded memory and throughput are measured in bench/atlas_embed.py, not here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
import warnings
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

import reference
from scgpt_hf.atlas import (
    EmbeddingStore,
    SettingsMismatchError,
    SourceError,
    SourceOptions,
    StoreBusyError,
    embed_to_store,
    open_source,
    weights_sha256,
)
from scgpt_hf.configuration_scgpt import ScGPTConfig
from scgpt_hf.embedding import embed
from scgpt_hf.modeling_scgpt import ScGPTModel
from scgpt_hf.pretraining import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
N_CELLS = 64
SETTINGS = dict(max_length=64, chunk_size=16, progress=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("atlas")


def _model(folder: Path, genes: list[str], seed: int) -> Path:
    tokenizer = make_tokenizer(reference.make_vocab(len(genes), genes))
    torch.manual_seed(seed)
    config = ScGPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, pad_token_id=tokenizer.pad_token_id,
                         cls_token_id=tokenizer.cls_token_id, eoc_token_id=tokenizer.convert_tokens_to_ids("<eoc>"))
    ScGPTModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(wu2020_adata, work) -> Path:
    """A small random model over wu2020's genes (its first 200 left out of the vocabulary)."""
    return _model(work / "model", list(wu2020_adata.var_names[200:]), seed=0)


@pytest.fixture(scope="module")
def cells(wu2020_adata) -> anndata.AnnData:
    return wu2020_adata[:N_CELLS].copy()


@pytest.fixture(scope="module")
def inputs(cells, work) -> dict[str, Path]:
    """The cells as one .h5ad file (the first 40) and one zarr store (the rest), and all of them as a SOMA
    experiment with a Census-like var column of symbols."""
    paths = {"h5ad": work / "part1.h5ad", "zarr": work / "part2.zarr", "all": work / "all.h5ad"}
    cells[:40].write_h5ad(paths["h5ad"])
    cells[40:].write_zarr(paths["zarr"])
    cells.write_h5ad(paths["all"])
    return paths


@pytest.fixture(scope="module")
def soma(cells, work) -> Path:
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io", reason="tiledbsoma is not installed (extra 'soma')")
    census_like = cells.copy()
    census_like.var["feature_name"] = census_like.var_names
    uri = str(work / "soma")
    tiledbsoma_io.from_anndata(uri, census_like, measurement_name="RNA", X_layer_name="raw")
    return Path(uri)


@pytest.fixture(scope="module")
def reference_store(inputs, model, work) -> Path:
    """One uninterrupted single-process run over the .h5ad file and the zarr store."""
    path = work / "reference.zarr"
    embed_to_store([inputs["h5ad"], inputs["zarr"]], path, model, **SETTINGS)
    return path


def _read(path: Path) -> anndata.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_zarr(path)


def _assert_same_store(path: Path, expected: Path) -> None:
    a, b = _read(path), _read(expected)
    assert a.obs_names.tolist() == b.obs_names.tolist()
    assert a.obs.equals(b.obs)
    assert np.array_equal(a.obsm["X_scGPT"], b.obsm["X_scGPT"], equal_nan=True)
    assert a.uns["X_scGPT_params"].keys() == b.uns["X_scGPT_params"].keys()
    assert not path.with_name(path.name + ".progress").exists()


def test_store_is_read_by_anndata_and_holds_what_embed_computes(reference_store, inputs, cells, model):
    store = _read(reference_store)
    assert store.n_obs == N_CELLS and store.n_vars == 0 and store.X is None
    assert store.obs_names.tolist() == cells.obs_names.tolist()
    assert store.obs["source"].tolist() == [str(inputs["h5ad"])] * 40 + [str(inputs["zarr"])] * (N_CELLS - 40)
    expected = embed(cells.copy(), model, max_length=64, progress=False)
    assert np.array_equal(store.obs["X_scGPT_n_genes"].to_numpy(), expected.obs["X_scGPT_n_genes"].to_numpy())
    # Other batch compositions than embed's: equal up to float rounding.
    np.testing.assert_allclose(store.obsm["X_scGPT"], expected.obsm["X_scGPT"], atol=1e-5)
    params = store.uns["X_scGPT_params"]
    assert params["weights_sha256"] == weights_sha256(ScGPTModel.from_pretrained(model))
    assert (params["seed"], params["max_length"], params["n_bins"], params["chunk_size"]) == (0, 64, 51, 16)
    assert params["sources"]["1"]["kind"] == "zarr" and params["sources"]["0"]["n_cells"] == 40
    # Chunked by the run's chunks, so each process writes whole zarr chunks of its own.
    import zarr

    assert zarr.open_group(str(reference_store), mode="r")["obsm/X_scGPT"].chunks == (16, 32)


def test_soma_experiment_gives_the_same_store_and_filters_cells(soma, reference_store, cells, model, work):
    path = work / "soma.zarr"
    embed_to_store([soma], path, model, **SETTINGS)
    got, expected = _read(path), _read(reference_store)
    assert got.obs_names.tolist() == cells.obs_names.tolist()  # obs_id, as tiledbsoma.io writes it
    assert np.array_equal(got.obsm["X_scGPT"], expected.obsm["X_scGPT"])

    lung = (cells.obs["patient"] == "Lung2").to_numpy()
    filtered = work / "lung.zarr"
    embed_to_store([soma], filtered, model, options=SourceOptions(obs_filter="patient == 'Lung2'"), **SETTINGS)
    subset = _read(filtered)
    assert subset.obs_names.tolist() == cells.obs_names[lung].tolist()
    np.testing.assert_allclose(subset.obsm["X_scGPT"], expected.obsm["X_scGPT"][lung], atol=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        (SourceOptions(obs_filter="patient == 'nobody'"), "selects no cell"),
        (SourceOptions(obs_filter="no_such_column == 1"), "obs columns: ['soma_joinid', 'obs_id'"),
        (SourceOptions(measurement="ATAC"), "has no measurement 'ATAC'; it has ['RNA']"),
        (SourceOptions(x_layer="normalized"), "has no X layer 'normalized'; it has ['raw']"),
        (SourceOptions(var_column="symbol"), "has no column 'symbol'; it has ['var_id'"),
    ],
)
def test_soma_names_that_do_not_exist_list_what_does(soma, model, work, options, message):
    with pytest.raises(ValueError) as err:
        embed_to_store([soma], work / "never.zarr", model, options=options, **SETTINGS)
    assert message in str(err.value)
    assert not (work / "never.zarr").exists()


@pytest.mark.parametrize(
    "kind, options, message",
    [
        ("h5ad", SourceOptions(obs_filter="patient == 'Lung2'"), r"obs_filter \(--obs-filter\): for TileDB-SOMA"),
        ("soma", SourceOptions(gene_column="feature_name"), r"gene_column \(--gene-column\): for AnnData"),
    ],
)
def test_options_for_a_kind_that_no_input_is_are_refused(kind, options, message, inputs, soma, model, work):
    source = soma if kind == "soma" else inputs["h5ad"]
    with pytest.raises(ValueError, match=message):
        embed_to_store([source], work / "never.zarr", model, options=options, **SETTINGS)


def test_anndata_sources_choose_the_matrix_like_embed(inputs, cells, work):
    source = open_source(inputs["zarr"])
    assert source.n_cells == N_CELLS - 40 and source.gene_names == cells.var_names.tolist()
    first = next(source.blocks(0, 5))[1]
    assert (first != cells.X[40:45]).nnz == 0
    with pytest.raises(ValueError, match=r"Layer 'counts' not found; available layers: \[\]"):
        open_source(inputs["h5ad"], SourceOptions(layer="counts"))
    with pytest.raises(ValueError, match="gene_column 'symbol' not in var; available columns"):
        open_source(inputs["h5ad"], SourceOptions(gene_column="symbol"))


def test_finished_store_rerun_is_a_no_op(reference_store, inputs, model, monkeypatch):
    before = {p: p.read_bytes() for p in reference_store.rglob("*") if p.is_file()}
    monkeypatch.setattr("scgpt_hf.atlas.run.run_expressed_cells", _no_compute)  # quick: nothing is computed
    params = embed_to_store([inputs["h5ad"], inputs["zarr"]], reference_store, model, **SETTINGS)
    assert params["n_cells"] == N_CELLS
    assert {p: p.read_bytes() for p in reference_store.rglob("*") if p.is_file()} == before
    assert not reference_store.with_name(reference_store.name + ".progress").exists()


def _no_compute(*args, **kwargs):
    raise AssertionError("a finished or refused store computed cells")


def test_rerun_with_other_settings_refuses_and_says_why(reference_store, inputs, model, wu2020_adata, work,
                                                         monkeypatch):
    monkeypatch.setattr("scgpt_hf.atlas.run.run_expressed_cells", _no_compute)
    files = [inputs["h5ad"], inputs["zarr"]]
    with pytest.raises(SettingsMismatchError, match="seed: 0 in the store, 1 now"):
        embed_to_store(files, reference_store, model, seed=1, **SETTINGS)
    other = _model(work / "other_model", list(wu2020_adata.var_names[200:]), seed=1)
    with pytest.raises(SettingsMismatchError, match="weights_sha256: "):
        embed_to_store(files, reference_store, other, **SETTINGS)
    with pytest.raises(SettingsMismatchError, match="sources: "):
        embed_to_store(files[:1], reference_store, model, **SETTINGS)
    assert not reference_store.with_name(reference_store.name + ".progress").exists()


def test_a_second_writer_refuses(inputs, model, work, monkeypatch):
    path = work / "busy.zarr"
    first = EmbeddingStore(path, "X_scGPT")
    first.claim()  # another run holds the store
    try:
        monkeypatch.setattr("scgpt_hf.atlas.run.run_expressed_cells", _no_compute)
        with pytest.raises(StoreBusyError, match="being written by another run"):
            embed_to_store([inputs["h5ad"]], path, model, **SETTINGS)
    finally:
        first.release()


def _damage_after_first_read(monkeypatch, damage) -> None:
    """Call `damage` once the first chunk is read (it is still written: its cells are in memory)."""
    from scgpt_hf.atlas import run as run_module

    calls = []
    real = run_module.run_expressed_cells

    def run_then_damage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            damage()
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "run_expressed_cells", run_then_damage)


@pytest.mark.parametrize("fault", ["zarr source removed", "h5ad source truncated"])
def test_source_gone_or_corrupt_mid_run_stops_and_keeps_finished_chunks(fault, inputs, cells, model, reference_store,
                                                                         work, monkeypatch):
    kind = fault.split()[0]
    folder = work / fault.replace(" ", "_")
    folder.mkdir()
    h5ad, zarr_path = folder / "part1.h5ad", folder / "part2.zarr"
    shutil.copy(inputs["h5ad"], h5ad)
    shutil.copytree(inputs["zarr"], zarr_path)
    victim = zarr_path if kind == "zarr" else h5ad
    damage = (lambda: shutil.rmtree(zarr_path)) if kind == "zarr" else (lambda: os.truncate(h5ad, 4096))
    path = folder / "out.zarr"
    _damage_after_first_read(monkeypatch, damage)
    with pytest.raises(SourceError, match=f"{victim}: cannot read"):
        embed_to_store([h5ad, zarr_path], path, model, **SETTINGS)
    # Chunks 0-1 hold cells 0-31 of the .h5ad file, chunk 2 the first cells of the zarr store.
    assert set(EmbeddingStore(path, "X_scGPT").finished_chunks()) == ({0, 1} if kind == "zarr" else {0})

    monkeypatch.undo()
    shutil.copy(inputs["h5ad"], h5ad)
    if kind == "zarr":
        shutil.copytree(inputs["zarr"], zarr_path)
    embed_to_store([h5ad, zarr_path], path, model, **SETTINGS)
    got, expected = _read(path), _read(reference_store)
    assert np.array_equal(got.obsm["X_scGPT"], expected.obsm["X_scGPT"])
    assert got.obs_names.tolist() == cells.obs_names.tolist()


# ----------------------------------------------------------------------------------------------
# scgpt-hf embed INPUT [INPUT ...] OUTPUT.zarr


def test_cli_embeds_many_inputs_into_a_store(inputs, model, reference_store, work, capsys):
    from scgpt_hf.cli import main

    path = work / "cli.zarr"
    assert main(_embed_argv([inputs["h5ad"], inputs["zarr"]], path, model)) == 0
    assert f"Embedded 64 cells of 2 input(s) into obsm['X_scGPT'] of {path}" in capsys.readouterr().out
    _assert_same_store(path, reference_store)


def test_cli_reads_soma_with_its_options(soma, cells, model, work):
    from scgpt_hf.cli import main

    path = work / "cli_soma.zarr"
    argv = _embed_argv([soma], path, model) + ["--measurement", "RNA", "--x-layer", "raw", "--var-column",
                                                "feature_name", "--obs-filter", "patient == 'Lung2'"]
    assert main(argv) == 0
    assert _read(path).obs_names.tolist() == cells.obs_names[(cells.obs["patient"] == "Lung2").to_numpy()].tolist()


@pytest.mark.parametrize(
    "extra, output, message",
    [
        (["--obs-filter", "patient == 'Lung2'"], "out.h5ad", "--obs-filter: only for an embedding store"),
        ([], "out.h5ad", "several inputs: only for an embedding store"),
        (["--batch-key", "batch"], "out.zarr", "--batch-key and --batch-as-ids are for an OUTPUT.h5ad"),
        (["--x-layer", "normalized"], "out.zarr", "x_layer (--x-layer): for TileDB-SOMA inputs only"),
    ],
)
def test_cli_store_errors_are_one_line(extra, output, message, inputs, model, work, capsys):
    from scgpt_hf.cli import main

    argv = _embed_argv([inputs["h5ad"], inputs["zarr"]], work / output, model) + extra
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


# ----------------------------------------------------------------------------------------------
# scgpt-hf pretrain streams from the same sources


def test_pretraining_streams_the_same_cells_from_every_source_kind(inputs, soma, model):
    from scgpt_hf.pretraining import StreamingCellDataset
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    tokenizer = ScGPTTokenizer.from_pretrained(model)

    def cells(files, **options):
        dataset = StreamingCellDataset(files, tokenizer, max_length=64, chunk_size=16, shuffle=False,
                                       source_options=SourceOptions(**options))
        return [(c["input_ids"].tolist(), c["values"].tolist()) for c in dataset]

    expected = cells([inputs["all"]])
    assert cells([inputs["h5ad"], inputs["zarr"]]) == expected
    assert cells([soma]) == expected
    assert 0 < len(cells([soma], obs_filter="patient == 'Lung2'")) < len(expected)


def test_cli_pretrains_from_zarr_and_soma_with_an_obs_filter(inputs, soma, cells, work, capsys):
    from scgpt_hf.cli import main

    out = work / "pretrained"
    argv = ["pretrain", str(out), str(inputs["zarr"]), str(soma), "--hidden-size", "16", "--layers", "1", "--heads",
            "2", "--max-length", "32", "--max-steps", "2", "--batch-size", "8", "--obs-filter", "patient == 'Lung2'"]
    assert main(argv) == 0
    metrics = json.loads((out / "training_metrics.json").read_text())
    lung = int((cells.obs["patient"] == "Lung2").sum())
    assert metrics["cells_in_files"] == (N_CELLS - 40) + lung
    assert metrics["files"] == [str(inputs["zarr"]), str(soma)]


# ----------------------------------------------------------------------------------------------
# SIGKILL at each moment of a run (forked: no interpreter start), then a rerun


def _kill_moment(moment: str) -> None:
    """Patch this (forked) process to SIGKILL itself at `moment` of its second chunk or of its end."""
    import zarr

    from scgpt_hf.atlas import store

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "creating the store":  # the staging folder half made, nothing in place
        zarr.Array.resize = lambda self, *a, **k: die()
    elif moment == "writing a chunk":  # its other arrays written, its embeddings garbage, no marker
        real = zarr.Array.__setitem__

        def write_garbage(self, selection, value):
            if self.ndim == 2 and selection == slice(16, 32):
                real(self, selection, np.full_like(value, 7.0))
                die()
            real(self, selection, value)

        zarr.Array.__setitem__ = write_garbage
    elif moment == "writing a marker":  # the chunk's data written, its marker not
        real_json = store._write_json
        store._write_json = lambda path, value: die() if path.name == "chunk-00000001.json" else real_json(path, value)
    elif moment == "finishing":  # the parameters in uns, the progress record still there
        store.EmbeddingStore.tidy = lambda self: die()
    elif moment == "tidying":  # the progress record renamed away, not yet deleted
        store.shutil = types.SimpleNamespace(rmtree=lambda *a, **k: die())  # the store module's only


@pytest.mark.parametrize("moment", ["creating the store", "writing a chunk", "writing a marker", "finishing",
                                    "tidying"])
def test_sigkill_at_any_moment_then_rerun_gives_the_uninterrupted_store(moment, inputs, model, reference_store,
                                                                         work):
    path = work / f"killed_{moment.replace(' ', '_')}.zarr"
    files = [inputs["h5ad"], inputs["zarr"]]
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)  # the parent's OpenMP threads do not exist here
            _kill_moment(moment)
            embed_to_store(files, path, model, **SETTINGS)
        finally:
            os._exit(3)  # not killed: the moment never came
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    embed_to_store(files, path, model, **SETTINGS)
    _assert_same_store(path, reference_store)
    assert not list(work.glob(f".{path.name}.progress.removed-*"))


# ----------------------------------------------------------------------------------------------
# Two processes: torchrun over gloo


WORKER = textwrap.dedent(
    """
    import os, signal, sys, warnings
    import numpy as np
    from scgpt_hf.atlas import store

    warnings.simplefilter("ignore")
    if os.environ.get("KILL_RANK") == os.environ["RANK"]:  # its second chunk: garbage rows, then SIGKILL
        real_write = store.EmbeddingStore.write_chunk
        written = []

        def write_then_die(self, chunk, start, ids, sources, embedding, n_genes, counts):
            if written:
                self._open()[f"obsm/{self.key}"][start : start + len(ids)] = np.full_like(embedding, 7.0)
                os.kill(os.getpid(), signal.SIGKILL)
            written.append(chunk)
            real_write(self, chunk, start, ids, sources, embedding, n_genes, counts)

        store.EmbeddingStore.write_chunk = write_then_die
    from scgpt_hf.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def _embed_argv(inputs: list[Path], path: Path, model: Path) -> list[str]:
    return ["embed", *map(str, inputs), str(path), "--model", str(model), "--max-length", "64", "--chunk-size", "16",
            "--no-progress"]


def _torchrun(work: Path, inputs: dict[str, Path], path: Path, model: Path, **env: str) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m scgpt_hf.cli embed ...`; with KILL_RANK, through a script that makes that
    process write its second chunk's rows as garbage and SIGKILL itself before the chunk's marker."""
    script = work / "worker.py"
    script.write_text(WORKER)
    entry = [str(script)] if "KILL_RANK" in env else ["-m", "scgpt_hf.cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry,
               *_embed_argv([inputs["h5ad"], inputs["zarr"]], path, model)]
    return subprocess.Popen(command, cwd=ROOT, start_new_session=True, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_write_the_store_one_process_writes(inputs, model, reference_store, work):
    path = work / "two.zarr"
    run = _torchrun(work, inputs, path, model)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert out.count("Embedded 64 cells of 2 input(s)") == 1, out  # the first process reports
    _assert_same_store(path, reference_store)


def test_sigkill_of_one_process_then_rerun_gives_the_same_store(inputs, model, reference_store, work):
    path = work / "killed_one.zarr"
    run = _torchrun(work, inputs, path, model, KILL_RANK="1")
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0, out
    finished = EmbeddingStore(path, "X_scGPT").finished_chunks()
    assert 1 in finished and 3 not in finished  # process 1 got chunks 1 and 3, and died writing 3
    embed_to_store([inputs["h5ad"], inputs["zarr"]], path, model, **SETTINGS)  # rerun with another world size
    _assert_same_store(path, reference_store)


def test_sigkill_of_every_process_then_rerun_gives_the_same_store(inputs, model, reference_store, work):
    path = work / "killed_all.zarr"
    run = _torchrun(work, inputs, path, model)
    progress = path.with_name(path.name + ".progress")
    deadline = time.monotonic() + 300
    while not list(progress.glob("chunk-*.json")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # the launcher and both workers, in the middle of the run
    run.communicate()
    assert len(EmbeddingStore(path, "X_scGPT").finished_chunks()) < 4
    embed_to_store([inputs["h5ad"], inputs["zarr"]], path, model, **SETTINGS)
    _assert_same_store(path, reference_store)


# ----------------------------------------------------------------------------------------------
# Inputs that the store must not touch, and inputs that cannot be read right


@pytest.mark.parametrize("where", ["the input", "inside the input"])
def test_an_output_that_is_or_lies_in_an_input_is_refused_before_writing(where, inputs, model, work, capsys):
    from scgpt_hf.cli import main

    source = work / f"kept_{where.replace(' ', '_')}.zarr"
    shutil.copytree(inputs["zarr"], source)
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    output = source if where == "the input" else source / "out.zarr"
    with pytest.raises(SystemExit):
        main(_embed_argv([inputs["h5ad"], source], output, model) + ["--overwrite"])
    assert "is an input or lies inside one" in capsys.readouterr().err
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before
    assert not output.with_name(output.name + ".progress").exists()


def test_an_input_given_twice_is_refused_and_leaves_nothing(inputs, model, work):
    path = work / "dup.zarr"
    with pytest.raises(ValueError, match="given twice"):
        embed_to_store([inputs["h5ad"], inputs["zarr"], inputs["h5ad"]], path, model, **SETTINGS)
    assert not path.exists() and not path.with_name(path.name + ".progress").exists()


def test_a_run_that_failed_to_create_its_store_started_nothing(inputs, model, work, monkeypatch):
    path = work / "not_created.zarr"

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(EmbeddingStore, "_create", disk_full)
    with pytest.raises(OSError, match="No space left"):
        embed_to_store([inputs["h5ad"]], path, model, **SETTINGS)
    assert not path.with_name(path.name + ".progress").exists()
    monkeypatch.undo()
    # A progress record without its store (a run killed before creating it) is no store to mix into.
    progress = path.with_name(path.name + ".progress")
    progress.mkdir()
    (progress / "settings.json").write_text(json.dumps({"seed": 0}))
    assert embed_to_store([inputs["h5ad"]], path, model, seed=1, **SETTINGS)["seed"] == 1


@pytest.mark.parametrize("chunk", ["X/indices/0", "X/data/0", "X/indptr/0", "obs/_index/0"])
def test_a_zarr_input_with_a_missing_chunk_is_refused_not_read_as_fill_values(chunk, inputs, work):
    path = work / f"holed_{chunk.replace('/', '_')}.zarr"
    shutil.copytree(inputs["zarr"], path)
    (path / chunk).unlink()
    with pytest.raises(SourceError, match=f"{chunk.rsplit('/', 1)[0]} lacks 1 of its 1 chunks"):
        open_source(path)


def test_low_vocabulary_coverage_is_warned_once_like_embed(inputs, cells, wu2020_adata, work):
    few = _model(work / "few_genes_model", list(wu2020_adata.var_names[-300:]), seed=0)
    with pytest.warns(UserWarning) as expected:
        embed(cells[:40].copy(), few, max_length=64, progress=False)
    message = next(str(w.message) for w in expected if str(w.message).startswith("Only"))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        embed_to_store([inputs["h5ad"]], work / "few.zarr", few, **SETTINGS)
    assert [str(w.message) for w in got if "Only" in str(w.message)] == [f"{inputs['h5ad']}: {message}"]


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_backed_sparse_sources_read_indptr_by_slice_not_whole(kind, inputs, cells):
    # anndata caches the whole indptr (8 bytes a cell) by default: at atlas scale memory grows with the cells.
    with open_source(inputs[kind]) as source:
        first = next(source.blocks(2, 5))[1]
        assert (first != cells.X[(0 if kind == "h5ad" else 40) + 2:][:3]).nnz == 0
        assert not isinstance(source.matrix._indptr, np.ndarray)


def test_a_zarr_chunk_removed_after_opening_stops_the_read(inputs, work):
    path = work / "holed_later.zarr"
    shutil.copytree(inputs["zarr"], path)
    with open_source(path) as source:
        (path / "X" / "data" / "0").unlink()
        with pytest.raises(SourceError, match=r"cannot read the expression of cells 0-4 \(FileNotFoundError: X/data"):
            list(source.blocks(0, 5))


def test_source_options_combine_a_calls_keywords_and_refuses_a_contradiction():
    soma_options = SourceOptions(obs_filter="patient == 'Lung2'", layer="counts")
    combined = SourceOptions.combine(soma_options, use_raw=True, gene_column="symbol")
    assert combined == SourceOptions(obs_filter="patient == 'Lung2'", layer="counts", use_raw=True,
                                     gene_column="symbol")
    assert SourceOptions.combine(None) == SourceOptions()
    assert SourceOptions.combine(soma_options, layer="counts") == soma_options  # the same value twice is fine
    with pytest.raises(ValueError, match=r"layer='raw_counts' contradicts source_options.layer='counts'"):
        SourceOptions.combine(soma_options, layer="raw_counts")


def test_soma_source_reads_ranges_through_a_sparse_index_of_joinids(soma, cells, monkeypatch):
    # Every selected soma_joinid held in memory is 8 bytes a cell (264 MB for the Census): only every
    # SOMA_INDEX_STEP-th is kept and a range's are re-read, here across many index entries of a
    # non-contiguous selection.
    monkeypatch.setattr("scgpt_hf.atlas.sources.SOMA_INDEX_STEP", 3)
    lung = (cells.obs["patient"] == "Lung2").to_numpy()
    assert not np.all(np.diff(np.flatnonzero(lung)) == 1)
    with open_source(soma, SourceOptions(obs_filter="patient == 'Lung2'")) as source:
        n = int(lung.sum())
        assert source.n_cells == n
        for start, stop in [(0, n), (0, 1), (2, 4), (3, 6), (4, 11), (5, n), (n - 1, n)]:
            assert source.ids(start, stop).tolist() == cells.obs_names[lung][start:stop].tolist()
            (first, block), = source.blocks(start, stop)
            assert first == start and (block != cells.X[lung][start:stop]).nnz == 0
        source.options = SourceOptions(obs_filter="patient == 'Lung6'")  # obs selecting other cells mid-run
        with pytest.raises(SourceError, match=rf"{soma}: obs changed since the run opened it"):
            source.ids(0, 5)

    def held(source) -> int:
        return sum(v.nbytes if isinstance(v, np.ndarray) else sys.getsizeof(v) for v in vars(source).values())

    monkeypatch.undo()
    with open_source(soma, SourceOptions(obs_filter="patient == 'Lung2'")) as few, open_source(soma) as every:
        assert (few.n_cells, every.n_cells) == (n, N_CELLS) and held(few) == held(every)


@pytest.mark.parametrize("pieces", [[2, 0, 5, 1], [1], [7, 7]], ids=["uneven", "single-rows", "even"])
def test_soma_sparse_index_is_the_same_whatever_batches_obs_arrives_in(pieces, soma, cells, monkeypatch):
    """tiledbsoma hands obs over in batches of its choosing: the index's step must carry across them (a
    selected cell's position counts from the first batch, not from the start of its own)."""
    import pyarrow as pa

    from scgpt_hf.atlas.sources import SomaSource

    lung = (cells.obs["patient"] == "Lung2").to_numpy()
    with open_source(soma, SourceOptions(obs_filter="patient == 'Lung2'")) as source:
        every = source._index_selection()[0]
    real = SomaSource._selected

    class Batches(list):
        def concat(self) -> pa.Table:
            return pa.concat_tables(self)

    def in_pieces(self, columns, span=slice(None)):
        table, out, k = real(self, columns, span).concat(), Batches(), 0
        while k < len(table):
            size = pieces[len(out) % len(pieces)]
            out.append(table.slice(k, size))
            k += size
        return out

    monkeypatch.setattr(SomaSource, "_selected", in_pieces)
    monkeypatch.setattr("scgpt_hf.atlas.sources.SOMA_INDEX_STEP", 3)
    with open_source(soma, SourceOptions(obs_filter="patient == 'Lung2'")) as source:
        joinids = np.concatenate([t.column("soma_joinid").to_numpy() for t in in_pieces(source, ["soma_joinid"])])
        n = len(joinids)
        assert source.n_cells == n == int(lung.sum())
        expected = np.unique(np.concatenate([joinids[::3], joinids[-1:]]))
        assert source._index.tolist() == expected.tolist()
        for start, stop in [(0, n), (1, 5), (3, 4), (n - 2, n)]:
            assert source.ids(start, stop).tolist() == cells.obs_names[lung][start:stop].tolist()
    assert every[0] == joinids[0] and every[-1] == joinids[-1]
