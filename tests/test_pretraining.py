"""`scgpt_hf.pretraining`: streaming cells from backed h5ad files and `pretrain` / `scgpt-hf pretrain`.

The files are small h5ad copies of real cells (scirpy's wu2020: raw counts), split in two with different gene
sets and column orders, so per-file gene matching matters.
"""

from __future__ import annotations

import json
from collections import Counter

import anndata
import numpy as np
import pytest
import torch

from reference import make_vocab
from scgpt_hf import ScGPTForPreTraining, ScGPTModel, ScGPTTokenizer
from scgpt_hf import pretraining as pt
from scgpt_hf.atlas import sources
from scgpt_hf.cli import main
from scgpt_hf.pretraining import StreamingCellDataset, build_vocab, pretrain

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def corpus(wu2020_adata, tmp_path_factory):
    """Two backed-readable files (90 + 110 real cells), a vocabulary of 1,200 variable genes and its tokenizer."""
    adata = wu2020_adata
    logged = adata.X.astype(np.float32)
    logged.data = np.log1p(logged.data)
    mean = np.asarray(logged.mean(axis=0)).ravel()
    variance = np.asarray(logged.multiply(logged).mean(axis=0)).ravel() - mean**2
    ranked = list(adata.var_names[np.argsort(-variance)])
    vocab_genes, extra = ranked[:1200], ranked[1200:1400]  # extra: in the files, not in the vocabulary
    folder = tmp_path_factory.mktemp("corpus")
    a = adata[:90, ranked[:1300]].copy()
    b = adata[90:, list(reversed(ranked[:1100])) + extra].copy()
    for part in (a, b):
        part.obs = part.obs[["cluster_orig", "patient"]].copy()
        part.obsm.clear()
    files = [folder / "a.h5ad", folder / "b.h5ad"]
    a.write_h5ad(files[0])
    b.write_h5ad(files[1])
    (folder / "vocab.json").write_text(json.dumps(make_vocab(len(vocab_genes), vocab_genes)))
    tokenizer = ScGPTTokenizer(str(folder / "vocab.json"), max_length=MAX_LENGTH)
    return files, [a, b], tokenizer, folder / "vocab.json"


def _collect(dataset):
    return [(it["file"], int(it["row"]), it["input_ids"], it["values"]) for it in dataset]


def test_streams_every_cell_once_with_the_tokenizers_tokens(corpus):
    files, parts, tokenizer, _ = corpus
    dataset = StreamingCellDataset(
        files, tokenizer, chunk_size=16, shuffle_buffer=20, seed=3, return_index=True, shard_by_process=False
    )
    items = _collect(dataset)
    seen = Counter((f, r) for f, r, _, _ in items)
    expected = {(f, r) for f, part in enumerate(parts) for r in range(part.n_obs)}
    assert set(seen) == expected and max(seen.values()) == 1
    assert [(f, r) for f, r, _, _ in items] != sorted(expected), "cells should come shuffled"
    reference = [tokenizer(part, padding=False, seed=3, max_length=MAX_LENGTH) for part in parts]
    for f, r, ids, values in items:
        np.testing.assert_array_equal(ids, reference[f]["input_ids"][r])
        np.testing.assert_array_equal(values, reference[f]["values"][r])
    assert all(len(ids) <= MAX_LENGTH for _, _, ids, _ in items)


def test_shards_over_processes_and_workers_cover_every_cell_once(corpus, monkeypatch):
    files, parts, tokenizer, _ = corpus
    total = sum(p.n_obs for p in parts)

    def cells(**kwargs):
        ds = StreamingCellDataset(files, tokenizer, chunk_size=16, seed=1, return_index=True, **kwargs)
        return [(f, r) for f, r, _, _ in _collect(ds)]

    by_rank = [cells(process_index=i, num_processes=2) for i in range(2)]
    assert all(0 < len(c) < total for c in by_rank)
    assert sorted(by_rank[0] + by_rank[1]) == sorted({(f, r) for f in range(2) for r in range(parts[f].n_obs)})
    # torchrun / accelerate launch set RANK and WORLD_SIZE: the dataset picks them up.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cells() == by_rank[1]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # DataLoader workers split the units of their process.
    dataset = StreamingCellDataset(files, tokenizer, chunk_size=16, seed=1, return_index=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    rows = Counter((int(it["file"]), int(it["row"])) for it in loader)
    assert len(rows) == total and max(rows.values()) == 1


def test_reads_chunk_by_chunk(corpus, monkeypatch):
    """Rows are read at most chunk_size at a time, and the first cell comes out after the first chunk."""
    files, parts, tokenizer, _ = corpus
    reads = []
    original = sources.row_blocks

    def spy(matrix, start, stop):
        assert not isinstance(matrix, np.ndarray) and not hasattr(matrix, "toarray"), "matrix should be backed"
        reads.append(stop - start)
        yield from original(matrix, start, stop)

    monkeypatch.setattr(sources, "row_blocks", spy)
    dataset = StreamingCellDataset(files, tokenizer, chunk_size=16, shuffle_buffer=8, seed=0)
    stream = iter(dataset)
    next(stream)
    assert len(reads) == 1, "the first cell should be yielded before a second chunk is read"
    rest = list(stream)
    assert len(rest) + 1 == sum(p.n_obs for p in parts)
    assert max(reads) <= 16 and sum(reads) == sum(p.n_obs for p in parts)


def test_shuffling_is_reproducible_and_changes_per_epoch(corpus):
    files, _, tokenizer, _ = corpus

    def order(seed, epochs=1):
        ds = StreamingCellDataset(files, tokenizer, chunk_size=16, shuffle_buffer=32, seed=seed, epochs=epochs,
                                  return_index=True)
        return [(f, r) for f, r, _, _ in _collect(ds)]

    first = order(7)
    assert order(7) == first
    assert order(8) != first
    two = order(7, epochs=2)
    assert two[: len(first)] == first and two[len(first):] != first
    assert sorted(two[len(first):]) == sorted(first)
    unshuffled = StreamingCellDataset(files, tokenizer, shuffle=False, return_index=True)
    assert [(f, r) for f, r, _, _ in _collect(unshuffled)] == sorted(first)


def test_pretrain_learns_and_saves_a_loadable_folder(corpus, tmp_path):
    files, parts, tokenizer, _ = corpus
    out = pretrain(
        files, tmp_path / "model", tokenizer=tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        max_length=MAX_LENGTH, max_steps=40, batch_size=16, learning_rate=3e-3, dropout=0.0, logging_steps=5,
        training_args={"use_cpu": True},
    )
    metrics = json.loads((out / pt.METRICS_FILE).read_text())
    losses = [e["loss"] for e in metrics["loss_history"]]
    assert np.isfinite(losses).all() and len(losses) == 8
    assert metrics["final_loss"] < 0.7 * metrics["first_loss"], losses
    assert metrics["global_step"] == 40 and metrics["cells_seen"] == 640 and metrics["cells_in_files"] == 200
    assert metrics["world_size"] == 1 and metrics["mask_ratio"] == 0.4 and metrics["generative"] is False
    # One process read every cell of the first pass, and more than it trained on.
    (read,) = metrics["data_read_by_process"]
    first_pass = read["first_pass_units"]
    assert sum(stop - start for _, start, stop in first_pass) == 200 and read["cells"] >= 640
    assert read["passes"] >= 640 // 200  # later passes are counted, not listed
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "checkpoints only when asked, nothing else"
    model = ScGPTForPreTraining.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tokenizer)
    saved = ScGPTTokenizer.from_pretrained(out)
    assert saved.get_vocab() == tokenizer.get_vocab() and saved.max_length == MAX_LENGTH
    # The backbone embeds cells (embed() reads the model and tokenizer from the folder).
    from scgpt_hf import embed

    cells = parts[0][:10].copy()
    embed(cells, str(out), max_length=MAX_LENGTH, progress=False)
    assert np.isfinite(cells.obsm["X_scGPT"]).all()
    assert isinstance(ScGPTModel.from_pretrained(out), ScGPTModel)


def test_pretrain_epochs_and_built_vocabulary(corpus, tmp_path):
    files, parts, _, _ = corpus
    vocab = build_vocab(files)
    genes = list(parts[0].var_names) + [g for g in parts[1].var_names if g not in set(parts[0].var_names)]
    assert list(vocab)[: len(genes)] == genes and list(vocab)[len(genes):] == ["<pad>", "<cls>", "<eoc>"]
    assert list(vocab.values()) == list(range(len(vocab)))
    out = pretrain(files, tmp_path / "m", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   max_length=32, num_epochs=0.5, batch_size=25, training_args={"use_cpu": True})
    metrics = json.loads((out / pt.METRICS_FILE).read_text())
    assert metrics["global_step"] == 4  # ceil(200 cells x 0.5 / 25)
    assert ScGPTTokenizer.from_pretrained(out).get_vocab() == vocab


def test_cli_pretrain(corpus, tmp_path, capsys):
    files, _, _, vocab_file = corpus
    out = tmp_path / "cli"
    code = main(["pretrain", str(out), *map(str, files), "--vocab", str(vocab_file), "--hidden-size", "16",
                 "--layers", "1", "--heads", "2", "--max-length", "32", "--max-steps", "3", "--batch-size", "8",
                 "--seed", "1", "--chunk-size", "50"])
    assert code == 0
    assert "Pretrained 3 steps (" in capsys.readouterr().out
    metrics = json.loads((out / pt.METRICS_FILE).read_text())
    assert metrics["global_step"] == 3 and metrics["seed"] == 1 and metrics["max_length"] == 32
    assert metrics["mask_ratio"] == 0.4 and metrics["generative"] is False
    first_pass = sorted(metrics["data_read_by_process"][0]["first_pass_units"])
    assert first_pass == [[0, 0, 50], [0, 50, 90], [1, 0, 50], [1, 50, 100], [1, 100, 110]]  # 90 + 110 cells
    assert ScGPTForPreTraining.from_pretrained(out).config.num_hidden_layers == 1


def test_generative_pretraining_with_mask_ratios_drawn_per_batch(corpus, tmp_path, capsys):
    """The original's generative pretraining settings, through the CLI."""
    files, _, _, vocab_file = corpus
    out = tmp_path / "gen"
    code = main(["pretrain", str(out), *map(str, files), "--vocab", str(vocab_file), "--hidden-size", "16",
                 "--layers", "1", "--heads", "2", "--max-length", "32", "--max-steps", "6", "--batch-size", "8",
                 "--generative", "--mask-ratio", "0.25", "0.5", "0.75"])
    assert code == 0 and "Pretrained 6 steps" in capsys.readouterr().out
    metrics = json.loads((out / pt.METRICS_FILE).read_text())
    assert metrics["mask_ratio"] == [0.25, 0.5, 0.75] and metrics["generative"] is True
    assert np.isfinite(metrics["train_loss"])
    model = ScGPTForPreTraining.from_pretrained(out)
    assert model.config.use_generative_flag
    assert model.scgpt.embeddings.flag_embeddings.weight.shape == (2, 16)


def test_launch_without_distributed_training_is_refused(corpus, tmp_path, monkeypatch):
    """WORLD_SIZE says several processes, but nothing set up distributed training: each would train alone."""
    files, _, tokenizer, _ = corpus
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 makes this one of 2 processes.*training for 1"):
        pretrain(files, tmp_path / "x", tokenizer=tokenizer, max_steps=1, training_args={"use_cpu": False})
    assert not (tmp_path / "x").exists()


def test_errors_name_the_file(corpus, tmp_path, capsys):
    files, parts, tokenizer, vocab_file = corpus
    ensembl = parts[0][:5].copy()
    ensembl.var_names = [f"ENSG{i:011d}" for i in range(ensembl.n_vars)]
    bad = tmp_path / "ensembl.h5ad"
    ensembl.write_h5ad(bad)
    with pytest.raises(ValueError, match=r"ensembl\.h5ad: no gene matches the vocabulary.*Ensembl"):
        StreamingCellDataset([files[0], bad], tokenizer)
    missing = tmp_path / "nope.h5ad"
    with pytest.raises(FileNotFoundError, match="nope.h5ad does not exist"):
        StreamingCellDataset([files[0], missing], tokenizer)
    with pytest.raises(ValueError, match="max_steps or num_epochs"):
        pretrain(files, tmp_path / "x", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="mask_ratio must be above 0"):
        pretrain(files, tmp_path / "x", tokenizer=tokenizer, max_steps=1, mask_ratio=0.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", str(tmp_path / "y"), str(missing), "--vocab", str(vocab_file), "--max-steps", "1"])
    assert exit_info.value.code == 2
    assert "nope.h5ad does not exist" in capsys.readouterr().err


def test_source_options_and_keywords_never_silently_override_each_other(corpus):
    files, parts, tokenizer, _ = corpus
    counts = sources.SourceOptions(layer="counts")
    for call in (lambda **kw: StreamingCellDataset(files, tokenizer, **kw), lambda **kw: build_vocab(files, **kw)):
        with pytest.raises(ValueError, match="layer='X2' contradicts source_options.layer='counts'"):
            call(layer="X2", source_options=counts)
        with pytest.raises(ValueError, match="Layer 'counts' not found"):  # the options' layer is read, not dropped
            call(source_options=counts)


def test_output_folder_is_publishable_replaced_only_with_overwrite_and_resumable(corpus, tmp_path, capsys):
    """The folder holds nothing `push` refuses; an existing one is refused before training unless --overwrite;
    checkpoints (--save-steps) live beside it, and --resume continues from the latest."""
    from scgpt_hf import hub

    files, _, _, vocab_file = corpus
    out = tmp_path / "model"
    argv = ["pretrain", str(out), *map(str, files), "--vocab", str(vocab_file), "--hidden-size", "16", "--layers", "1",
            "--heads", "2", "--max-length", "32", "--batch-size", "8", "--chunk-size", "50"]
    assert main([*argv, "--max-steps", "2", "--save-steps", "1"]) == 0
    assert not [p.name for p in out.iterdir() if p.suffix in hub.PICKLE_SUFFIXES]
    hub.stage(out, tmp_path / "staged", "org/name")  # what push checks and uploads
    checkpoints = out.with_name("model.checkpoints")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    trained = (out / "model.safetensors").read_bytes()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--max-steps", "3"])
    assert exc.value.code == 2 and "already exists: pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == trained

    saved = {p: p.stat().st_mtime_ns for p in checkpoints.rglob("*") if p.is_file()}
    assert main([*argv, "--max-steps", "3", "--save-steps", "1", "--resume", "--overwrite"]) == 0
    metrics = json.loads((out / pt.METRICS_FILE).read_text())
    assert metrics["global_step"] == 3 and metrics["resumed_from"] == str(checkpoints / "checkpoint-2")
    assert {p: p.stat().st_mtime_ns for p in saved} == saved, "steps 1-2 are not trained (and saved) again"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
