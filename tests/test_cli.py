"""`scgpt-hf convert` and `scgpt-hf embed` through `scgpt_hf.cli.main`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

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
    out = tmp_path / "emb.h5ad"
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
        (["convert", "{original}", "{tmp}/x", "--labels", "{tmp}/missing.txt"], None,
         "--labels file .*missing.txt does not exist.*one class name per line"),
        (["embed", "{data}", "{tmp}/nodir/sub/o.h5ad", "--model", "{model}"], None,
         "directory .*nodir/sub for output file o.h5ad does not exist: create it first"),
    ],
    ids=["no-gene-embedding", "string-nheads", "truncated-checkpoint", "bad-device", "missing-model-folder",
         "pickled-weights", "usage", "missing-labels", "missing-output-folder"],
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


def test_python_dash_m_reports_a_plugin_commands_user_error_as_one(tmp_path):
    """`python -m scgpt_hf.cli` runs cli.py as __main__, a second copy of the module: a CommandError that a plugin
    command (here `serve`, failing as on a busy port) imports from `scgpt_hf.cli` must still be a user error."""
    import subprocess
    import sys

    script = (
        "import runpy, sys\n"
        "from scgpt_hf.serving import server\n"
        "def busy(args):\n"
        "    from scgpt_hf.cli import CommandError\n"
        "    raise CommandError('127.0.0.1:8000 (the HTTP port) is already in use')\n"
        "server.run_serve = busy\n"
        "sys.argv = ['scgpt-hf', 'serve', 'MODEL']\n"
        "runpy.run_module('scgpt_hf.cli', run_name='__main__', alter_sys=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().endswith("error: 127.0.0.1:8000 (the HTTP port) is already in use"), done.stderr
    assert "unexpected" not in done.stderr and "--debug" not in done.stderr


def test_embed_refuses_an_existing_output_before_any_compute(model, wu2020_adata, tmp_path, monkeypatch, capsys):
    from scgpt_hf import embedding

    data, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    wu2020_adata[:3].copy().write_h5ad(data)
    out.write_bytes(b"earlier results")
    monkeypatch.setattr(embedding, "embed", lambda *a, **k: pytest.fail("computed before refusing"))
    with pytest.raises(SystemExit) as exc:
        main(["embed", str(data), str(out), "--model", str(model)])
    assert exc.value.code == 2 and "already exists: pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier results"


# ----------------------------------------------------------------------------------------------
# A kill at any moment leaves the previous output byte for byte, or the complete new one (issue 11)

MOMENTS = ["checked", "writing", "staged", "committed"]


def _announce_moments(say) -> None:
    """Patch this (forked) process so that it calls `say(moment)` at each moment of writing an output: its
    location checked (before any compute), the write half done, the output staged complete, and moved into place."""
    import h5py

    from scgpt_hf import ScGPTTokenizer, atomic

    def after(fn, moment):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            say(moment)
            return result
        return wrapped

    def before(fn, moment):
        def wrapped(*args, **kwargs):
            say(moment)
            return fn(*args, **kwargs)
        return wrapped

    atomic.recover = after(atomic.recover, "checked")  # check_writable's first step
    atomic._fsync_tree = before(atomic._fsync_tree, "staged")  # the block is done, nothing is in place yet
    atomic._commit = after(atomic._commit, "committed")
    ScGPTTokenizer.save_pretrained = before(ScGPTTokenizer.save_pretrained, "writing")  # weights written, not it
    h5py.Group.create_dataset = before(h5py.Group.create_dataset, "writing")  # an .h5ad being written


def _kill_at(argv: list[str], moment: str) -> bool:
    """Run `main(argv)` in a forked process that stops at each moment of its write until told to go on; SIGKILL
    it at `moment`. Returns whether it was killed there (False: it finished without reaching it)."""
    markers_r, markers_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the command
        code = 1
        try:
            os.close(markers_r)
            os.close(go_w)
            torch.set_num_threads(1)  # the parent's OpenMP threads do not exist here

            def say(word: str) -> None:
                os.write(markers_w, f"{word}\n".encode())
                os.read(go_r, 1)

            _announce_moments(say)
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    os.close(markers_w)
    os.close(go_r)
    killed = False
    with os.fdopen(markers_r) as markers, os.fdopen(go_w, "wb", buffering=0) as go:
        for line in markers:
            if line.strip() == moment:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            go.write(b"g")
    os.waitpid(pid, 0)
    return killed


def _state(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def kill_inputs(original_dir, model, wu2020_adata, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    wu2020_adata[:6].copy().write_h5ad(folder / "cells.h5ad")
    return {"original": original_dir, "model": model, "data": folder / "cells.h5ad"}


COMMANDS_WRITING = {
    "convert": (["convert", "{original}", "{out}", "--quiet"], "folder"),
    "embed": (["embed", "{data}", "{out}", "--model", "{model}", "--no-progress", "--device", "cpu"], "file"),
    "pretrain": (["pretrain", "{out}", "{data}", "--vocab", "{model}", "--hidden-size", "8", "--layers", "1",
                  "--heads", "2", "--max-length", "16", "--max-steps", "1", "--batch-size", "4"], "folder"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS_WRITING))
def test_sigkill_at_any_moment_leaves_the_previous_output(command, kill_inputs, tmp_path):
    argv, kind = COMMANDS_WRITING[command]
    out = tmp_path / ("out.h5ad" if kind == "file" else "out")
    if kind == "file":
        out.write_bytes(b"earlier results " * 1000)
    else:
        out.mkdir()
        (out / "config.json").write_text('{"earlier": true}')
        (out / "model.safetensors").write_bytes(os.urandom(4096))
    previous = _state(out)
    argv = [a.format(out=out, **kill_inputs) for a in argv] + ["--overwrite"]
    from scgpt_hf import atomic

    for moment in MOMENTS:
        assert _kill_at(argv, moment), f"{command} never reached {moment!r}"
        atomic.recover(out)  # what the next run does first
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p != out)
        if moment != "committed":
            assert _state(out) == previous, f"{command} killed at {moment!r} changed its output"
            assert leftovers == [], leftovers
    if kind == "file":  # killed once in place, the new output is whole
        assert anndata.read_h5ad(out).obsm["X_scGPT"].shape[0] == 6
    else:
        assert json.loads((out / "config.json").read_text())["model_type"] == "scgpt" and (out / "vocab.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("backed", [[], ["--backed"]], ids=["auto-backed", "backed"])
def test_embed_float16_sparse_file(model, wu2020_adata, tmp_path, backed):
    """X/data float16 (what other writers leave; scipy holds no float16) is read backed and written as float32,
    exact, so the output opens with anndata.read_h5ad."""
    import h5py

    reference = wu2020_adata[:20].copy()
    reference.X.data = reference.X.data.astype(np.float16).astype(np.float32)
    reference.write_h5ad(tmp_path / "ref.h5ad")
    reference.write_h5ad(tmp_path / "half.h5ad")
    with h5py.File(tmp_path / "half.h5ad", "r+") as f:
        data = f["X/data"][:]
        del f["X/data"]
        f["X/data"] = data.astype(np.float16)
    common = ["--model", str(model), "--batch-size", "8", "--no-progress"]
    assert main(["embed", str(tmp_path / "ref.h5ad"), str(tmp_path / "ref_out.h5ad"), *common]) == 0
    assert main(["embed", str(tmp_path / "half.h5ad"), str(tmp_path / "out.h5ad"), *common, *backed]) == 0
    result, want = anndata.read_h5ad(tmp_path / "out.h5ad"), anndata.read_h5ad(tmp_path / "ref_out.h5ad")
    assert result.X.dtype == np.float32
    np.testing.assert_array_equal(result.X.toarray(), reference.X.toarray())
    np.testing.assert_allclose(result.obsm["X_scGPT"], want.obsm["X_scGPT"], atol=1e-6, rtol=0)
    assert result.obs.equals(want.obs)
