"""`torchrun --nproc_per_node 2 -m scgpt_hf.cli pretrain` really trains as one job of two CPU processes (gloo).

Two small real files: 64 wu2020 T cells (raw counts) and 80 pbmc68k_reduced cells (their `.raw` log-normalised
values), with different gene sets. The run uses the original's generative settings. CUDA is hidden so the test
behaves the same on GPU machines (two processes cannot share one GPU with NCCL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata
import numpy as np
import psutil
import pytest

from scgpt_hf import ScGPTForPreTraining, embed
from scgpt_hf.pretraining import METRICS_FILE

CHUNK = 16
TIMEOUT_S = 80


@pytest.fixture(scope="module")
def files(wu2020_adata, pbmc68k_adata, tmp_path_factory):
    """(paths, cells per file): wu2020 on the pbmc68k genes it has plus its 300 highest-count others."""
    folder = tmp_path_factory.mktemp("distributed")
    pbmc = pbmc68k_adata.raw.to_adata()
    shared = [g for g in pbmc.var_names if g in set(wu2020_adata.var_names)]
    totals = np.asarray(wu2020_adata.X.sum(axis=0)).ravel()
    others = [g for g in wu2020_adata.var_names[np.argsort(-totals)] if g not in set(shared)][:300]
    genes = shared + others
    parts = [
        anndata.AnnData(X=wu2020_adata[:64, genes].X.copy(), var=wu2020_adata.var.loc[genes, []]),
        anndata.AnnData(X=pbmc.X[:80].copy(), var=pbmc.var[[]]),
    ]
    paths = [folder / "wu2020.h5ad", folder / "pbmc68k_raw.h5ad"]
    for part, path in zip(parts, paths):
        part.write_h5ad(path)
    return paths, [part.n_obs for part in parts]


def _run_bounded(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run `command`; past `timeout`, stop it and every process it started (torchrun's workers run in
    sessions of their own, so killing torchrun's process group would leave them behind)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for member in family:
            member.terminate()
        _, alive = psutil.wait_procs(family, timeout=10)
        for member in alive:
            member.kill()
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output)


def test_torchrun_two_processes_share_the_data_and_write_one_model(files, tmp_path):
    paths, n_cells = files
    out = tmp_path / "model"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "scgpt_hf.cli", "pretrain", str(out), *map(str, paths), "--hidden-size", "16", "--layers", "1",
        "--heads", "2", "--max-length", "64", "--max-steps", "3", "--batch-size", "8", "--chunk-size", str(CHUNK),
        "--generative", "--mask-ratio", "0.25", "0.5", "0.75",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = _run_bounded(command, env, TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:]
    assert result.stdout.count("Pretrained 3 steps") == 1, result.stdout[-4000:]  # the main process reports
    assert "2 processes" in result.stdout

    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3 and metrics["cells_seen"] == 3 * 8 * 2
    assert metrics["mask_ratio"] == [0.25, 0.5, 0.75] and metrics["generative"] is True
    # Each rank read its own (file, chunk) units of the first pass; together every unit, once.
    units = {(f, start, min(n, start + CHUNK)) for f, n in enumerate(n_cells) for start in range(0, n, CHUNK)}
    read = metrics["data_read_by_process"]
    assert len(read) == 2
    shares = [{tuple(u) for u in rank["first_pass_units"]} for rank in read]
    assert all(shares) and not shares[0] & shares[1] and shares[0] | shares[1] == units
    for rank, share in zip(read, shares):
        assert rank["cells"] >= sum(stop - start for _, start, stop in share)

    # One model, written once by the main process; it loads and embeds.
    assert not [p for p in out.iterdir() if p.is_dir()], "no per-process or checkpoint folders"
    model = ScGPTForPreTraining.from_pretrained(out)
    assert model.config.use_generative_flag and model.config.hidden_size == 16
    cells = anndata.read_h5ad(paths[1])[:10].copy()
    embed(cells, str(out), max_length=64, progress=False)
    assert np.isfinite(cells.obsm["X_scGPT"]).all()
