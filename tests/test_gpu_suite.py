"""The GPU suite's plumbing, proven on this CPU in quick mode (bench/gpu/run.sh with SCGPT_GPU_SUITE_QUICK=1).

`bash bench/gpu/quick.sh OUT` builds a virtual environment holding only what the lent GPU machine's image
holds (bench/gpu/lent_image.txt; cached in .venv-gpu-quick), packs for this Python with bench/gpu/pack.sh
(cached in .gpu-pack-quick while pack.sh is unchanged) and runs the very run.sh the GPU machine runs,
installing from the pack alone: a tiny model, a few real cells, the CPU, every section. A clean clone builds
the environment and the pack once (README, "GPU"), later runs only the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("environment", "setup", "correctness", "embed", "original", "triton")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_suite")
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "quick.sh"), str(out)], capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    return {"report": json.loads((out / "gpu_report.json").read_text()), "table": (out / "gpu_report.md").read_text(),
            "log": done.stdout, "out": out}


def test_quick_environment_lacks_what_the_pack_brings(quick):
    """The pack, not the environment, supplies anndata, tritonclient, the original scgpt, the Triton server."""
    python = REPO / ".venv-gpu-quick" / "bin" / "python"
    probe = ("import importlib.util as u; print([m for m in ('anndata', 'tritonclient', 'scgpt', 'scanpy', "
             "'scirpy', 'pytriton', 'scgpt_hf') if u.find_spec(m)])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd="/", env=env)
    assert found.stdout.strip() == "[]"


def test_quick_mode_runs_every_section(quick):
    report, log = quick["report"], quick["log"]
    assert "libpython" in (quick["out"] / "environment.txt").read_text()  # recorded first, before anything else
    assert log.index("libpython") < log.index("installing the pack's wheels")
    failed = {name: report.get(name, {}).get("error") for name in SECTIONS if "error" in report.get(name, {"error": 1})}
    assert not failed, failed
    assert report["environment"]["quick"] is True and report["environment"]["device"] == "cpu"
    assert report["environment"]["cpu_features"]  # AVX2 at least, on x86-64


def test_quick_mode_checks_hold(quick):
    correctness, triton = quick["report"]["correctness"], quick["report"]["triton"]
    assert correctness["cosine_bf16_vs_cpu_fp32_min"] > 0.99
    assert correctness["cosine_fp16_vs_cpu_fp32_min"] > 0.99
    assert correctness["generative_sdpa_equals_eager"] is True
    assert triton["second_server_refused"] is True, triton["second_server_message"]
    assert triton["cosine_triton_vs_embed_min"] > 0.9999
    assert "skipped" in triton["oom"]  # needs CUDA


def test_quick_mode_measures_every_figure(quick):
    report = quick["report"]
    runs = [r for r in report["embed"]["runs"] if "skipped" not in r]
    assert {(r["lengths"], r["batch_size"]) for r in runs} == {(k, b) for k in ("1200_tokens", "real_lengths")
                                                              for b in report["embed"]["batch_sizes"]}
    assert all(r["embed_cells_per_s"] > 0 and r["forward_auto_cells_per_s"] > 0 for r in runs)
    assert report["embed"]["1200_tokens_tokens_per_cell_median"] == 1200
    original = [r for r in report["original"]["runs"] if "skipped" not in r]
    assert {r["lengths"] for r in original} == {"1200_tokens", "real_lengths"}
    assert all(r["cells_per_s"] > 0 for r in original)
    cases = [c for c in report["triton"]["cases"] if "skipped" not in c]
    assert {(c["mode"], c["concurrency"]) for c in cases} == {
        (m, n) for m in ("tokenizer_in_server", "tokenized_by_client") for n in (1, 8, 32, 64)}
    assert all(c["errors"] == 0 and c["cells_per_s"] > 0 and c["p99_ms"] >= c["p50_ms"] for c in cases), cases
    table = quick["table"]
    assert "| Triton tokenizer in server" in table and "| `scgpt_hf.embed`" in table and "| original" in table
