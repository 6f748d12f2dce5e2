"""Atlas embedding under `accelerate launch` (two processes on CPU over gloo), and what the first process's
progress line costs; the cells, the small random model and the single-process store are test_atlas's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from scgpt_hf.atlas import EmbeddingStore, embed_to_store
from scgpt_hf.atlas import run as run_module
from test_atlas import (  # noqa: F401  (cells, inputs, model, reference_store and work are fixtures)
    N_CELLS,
    ROOT,
    _assert_same_store,
    _embed_argv,
    cells,
    inputs,
    model,
    reference_store,
    work,
)

# ----------------------------------------------------------------------------------------------
# The first process's progress line


@pytest.mark.parametrize("interval, lines", [(0.0, 16), (3600.0, 1)])
def test_progress_line_lists_the_markers_once_per_interval_not_per_chunk(interval, lines, inputs, model, work,
                                                                       monkeypatch, capsys):
    # Counting the markers lists the progress folder: once per chunk, that is quadratic over an atlas.
    listings = []
    real = EmbeddingStore.n_finished
    monkeypatch.setattr(EmbeddingStore, "n_finished", lambda self: listings.append(1) or real(self))
    monkeypatch.setattr(run_module._Progress, "interval", interval)
    embed_to_store([inputs["h5ad"], inputs["zarr"]], work / f"progress_{interval:g}.zarr", model, max_length=64,
                   chunk_size=4, progress=True)  # 16 chunks
    got = [line for line in capsys.readouterr().out.splitlines() if "cells/s" in line]
    assert len(got) == lines and len(listings) == lines + 1, got  # + 1: the cells done before the run
    line = r"(\d+) of 64 cells \(\d+\.\d%\) written, \d+\.\d cells/s over 1 process\(es\), ETA \d+:\d\d:\d\d"
    assert all(re.fullmatch(line, text) for text in got), got
    assert int(re.match(line, got[0])[1]) == 4 and int(re.match(line, got[-1])[1]) == (64 if lines > 1 else 4)


# ----------------------------------------------------------------------------------------------
# accelerate launch: the same command as torchrun's, the same store


def test_accelerate_launch_two_processes_write_the_store_one_process_writes(inputs, model, reference_store, work):
    pytest.importorskip("accelerate", reason="accelerate is not installed (extra 'train')")
    path = work / "accelerate.zarr"
    # On a CPU-only machine accelerate starts several processes only with --multi_gpu (--cpu starts one); it sets
    # torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Port 0: a free one, not a busy 29500.
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes",
               "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", "-m", "scgpt_hf.cli",
               *[arg for arg in _embed_argv([inputs["h5ad"], inputs["zarr"]], path, model) if arg != "--no-progress"]]
    run = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)  # the launcher and its workers
    assert run.returncode == 0, out
    assert "Embedding (process 1)" in out and "over 2 process(es)" in out, out  # two processes ran (round-robin: both had chunks)
    assert out.count(f"Embedded {N_CELLS} cells of 2 input(s)") == 1, out  # the first process reports
    _assert_same_store(path, reference_store)


# ----------------------------------------------------------------------------------------------
# Which GPU each launched process takes


@pytest.mark.parametrize(
    "local_rank, visible, expected",
    [(1, 4, "cuda:1"), (3, 1, "cuda:0"), (0, 2, "cuda:0"), (2, 2, "sees only 2 GPUs")],
    ids=["its-local-rank", "the-only-one-it-sees", "first", "more-processes-than-gpus"],
)
def test_each_launched_process_takes_its_gpu_or_says_there_are_too_few(local_rank, visible, expected, monkeypatch):
    import torch

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if expected.startswith("cuda"):
        assert run_module._process_device(torch.device("cuda")) == torch.device(expected)
    else:
        with pytest.raises(ValueError, match=expected):
            run_module._process_device(torch.device("cuda"))
    assert run_module._process_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # as asked
    assert run_module._process_device(torch.device("cpu")) == torch.device("cpu")
