"""Triton serving (issue 6) against a real Triton server on CPU.

The server is the Triton 2.51 shipped in the nvidia-pytriton wheel, in its own environment
(``.venv-triton``, numpy<2, made by ``scripts/setup_triton_server.sh``), started once per session on
127.0.0.1 free ports on a repository exported from a small cell-classification model (d_model 32,
2 layers, a vocabulary of the 1,000 genes most often expressed in scirpy's wu2020 T cells).  The
same repository is what ``triton_repo/`` in the source tree is: its hand-readable part (model configs and model
card) is committed and kept in sync by a test; ``.venv/bin/python tests/test_triton.py regenerate`` rewrites it
and writes the rest beside it (the version folders and the two reports, which its .gitignore names).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("onnxruntime")

import reference  # noqa: E402
from scgpt_hf.serving import (  # noqa: E402
    TritonClient,
    TritonServer,
    TritonServerError,
    TritonUnavailableError,
    find_server_env,
    free_port,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED_REPO = REPO_ROOT / "triton_repo"
N_GENES = 1000
MAX_LEN = 256
MAX_BATCH = 16
LABELS = ["CD4 T", "CD8 T", "NK", "other"]
ATOL = 1e-4
BATCH_KEY = "patient"
# What triton_repo/ leaves to `regenerate` (its .gitignore, gitignore patterns): every version folder (the ONNX graph
# and its self-check cells, whose bytes change with every export: the torch and onnx versions, the CPU that computed
# the cells, the cells file's own bytes, whose sha256 the graph records; the vocabulary and class names; the python
# backends and their copies of library files), the export report (versions and validation figures of that machine)
# and the repository report (the graph's sha256).
GENERATED = ("/*/1/", "/export_report.json", "/triton_report.json")


# ----------------------------------------------------------------------------------------------
# Building the small model and its repository (also used to regenerate triton_repo/)


def _wu2020():
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_h5ad(reference.wu2020_path())


def _save_small(model_class, out: Path, adata, seed: int, **settings) -> Path:
    """Save a small `model_class` (seeded random weights, d_model 32, 2 layers) and its tokenizer of real genes."""
    from scgpt_hf import ScGPTConfig
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    X = adata.X.tocsc()
    frequent = np.argsort(-np.diff(X.indptr), kind="stable")[:N_GENES]
    vocab = reference.make_vocab(N_GENES, [str(g) for g in adata.var_names[frequent]])
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = ScGPTTokenizer(vocab_file=str(out / "vocab.json"), max_length=MAX_LEN)
    config = ScGPTConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"], eoc_token_id=vocab["<eoc>"], max_seq_len=MAX_LEN,
        **settings,
    )
    model = model_class(config)
    reference.randomize_parameters(model, seed=seed)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_small_model(out: Path, adata) -> Path:
    """A saved small ScGPTForCellClassification and its tokenizer (the model of triton_repo/)."""
    from scgpt_hf import ScGPTForCellClassification

    return _save_small(ScGPTForCellClassification, out, adata, seed=3, num_labels=len(LABELS),
                       id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})


def build_batch_model(out: Path, adata) -> Path:
    """A saved small ScGPTForBatchIntegration with batch embeddings over wu2020's patients (obs 'patient')."""
    from scgpt_hf import ScGPTForBatchIntegration

    patients = sorted(adata.obs[BATCH_KEY].astype(str).unique())
    return _save_small(ScGPTForBatchIntegration, out, adata, seed=4, use_batch_labels=True, do_dab=True,
                       do_mvc=True, batch2id={name: i for i, name in enumerate(patients)})


def build_repository(model_dir: Path, repository: Path, **kwargs):
    """The CPU repository exactly as triton_repo/ holds it."""
    from scgpt_hf.export.triton import export_triton

    return export_triton(model_dir, repository, device="cpu", max_batch_size=MAX_BATCH, overwrite=True, **kwargs)


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def adata(wu2020_adata):
    return wu2020_adata


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, adata) -> Path:
    return build_small_model(tmp_path_factory.mktemp("triton_model") / "model", adata)


@pytest.fixture(scope="session")
def repository(tmp_path_factory, model_dir) -> Path:
    repo = tmp_path_factory.mktemp("triton_build") / "triton_repo"
    build_repository(model_dir, repo)
    return repo


@pytest.fixture(scope="session")
def server_env() -> Path:
    try:
        return find_server_env()
    except FileNotFoundError as err:
        if os.environ.get("SCGPT_HF_REQUIRE_REFERENCE") == "1":
            pytest.fail(str(err))
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def server(repository, server_env):
    srv = TritonServer(repository, server_env=server_env)
    srv.start(timeout=180)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def batch_model_dir(tmp_path_factory, adata) -> Path:
    return build_batch_model(tmp_path_factory.mktemp("triton_batch_model") / "model", adata)


@pytest.fixture(scope="session")
def batch_repository(tmp_path_factory, batch_model_dir) -> Path:
    repo = tmp_path_factory.mktemp("triton_batch_build") / "batch_repo"
    build_repository(batch_model_dir, repo)
    return repo


@pytest.fixture(scope="session")
def batch_server(batch_repository, server_env):
    """A second server, on the batch-label repository (its model names are the same as the first's)."""
    srv = TritonServer(batch_repository, server_env=server_env)
    srv.start(timeout=180)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def torch_model(model_dir):
    from scgpt_hf import ScGPTForCellClassification

    return ScGPTForCellClassification.from_pretrained(model_dir).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    return ScGPTTokenizer.from_pretrained(model_dir)


def _cls_value(repository: Path) -> float:
    """The <cls> value of the repository's preprocessing contract (pad_value for embedding graphs, the
    tokenizer's cls_value, 0 as in the original's fine-tuning, for classifiers)."""
    return float(json.loads((repository / "triton_report.json").read_text())["tokenizer"]["cls_value"])


@pytest.fixture(scope="session")
def expected(adata, torch_model, tokenizer, repository) -> dict[str, np.ndarray]:
    """In-process PyTorch results per cell: raw cell_embedding, logits, n_genes (one cell per forward)."""
    import torch

    enc = tokenizer(adata, padding=False, return_tensors=None, seed=0, max_length=MAX_LEN,
                    cls_value=_cls_value(repository), return_n_genes=True)
    emb, logits = [], []
    with torch.no_grad():
        for ids, vals in zip(enc["input_ids"], enc["values"]):
            out = torch_model(input_ids=torch.from_numpy(ids)[None], values=torch.from_numpy(vals)[None],
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            emb.append(out.cell_embedding[0].numpy())
            logits.append(out.logits[0].numpy())
    return {"cell_embedding": np.stack(emb), "logits": np.stack(logits), "n_genes": np.asarray(enc["n_genes"])}


def _wire(adata, tokenizer, rows) -> tuple[np.ndarray, np.ndarray]:
    """Cells `rows` in the wire format: vocabulary ids in column order, -1 padded."""
    match = tokenizer.match_genes([str(g) for g in adata.var_names])
    X = adata.X[np.asarray(rows)].tocsr()
    X.sort_indices()
    cells = []
    for r in range(X.shape[0]):
        cols = X.indices[X.indptr[r] : X.indptr[r + 1]]
        vals = X.data[X.indptr[r] : X.indptr[r + 1]]
        keep = match.ids[cols] >= 0
        cells.append((match.ids[cols][keep], vals[keep].astype(np.float32)))
    width = max(len(c[0]) for c in cells)
    g = np.full((len(cells), width), -1, dtype=np.int64)
    c = np.zeros((len(cells), width), dtype=np.float32)
    for i, (gi, ci) in enumerate(cells):
        g[i, : len(gi)], c[i, : len(ci)] = gi, ci
    return g, c


# ----------------------------------------------------------------------------------------------
# Repository


def test_repository_layout_and_configs_parse(repository):
    from scgpt_hf.export.triton import validate_repository

    configs = validate_repository(repository)
    assert set(configs) == {"scgpt_vocab", "scgpt_tokenizer", "scgpt_encoder", "scgpt_embed", "scgpt_labels",
                            "scgpt_annotate"}
    enc = configs["scgpt_encoder"]
    assert enc.backend == "python" and enc.max_batch_size == MAX_BATCH
    assert enc.dynamic_batching.max_queue_delay_microseconds > 0 and list(enc.dynamic_batching.preferred_batch_size)
    assert all(i.allow_ragged_batch for i in enc.input)
    assert {o.name: list(o.dims) for o in enc.output} == {"logits": [len(LABELS)], "cell_embedding": [32]}
    tok = configs["scgpt_tokenizer"]
    assert [(i.name, i.data_type) for i in tok.input] == [("gene_ids", 9), ("counts", 11)]  # TYPE_INT64, TYPE_FP32
    assert configs["scgpt_embed"].platform == "ensemble"
    # The tokenizer runs the library's own cell_encoding.py.
    from scgpt_hf import cell_encoding

    assert (repository / "scgpt_tokenizer/1/cell_encoding.py").read_bytes() == Path(cell_encoding.__file__).read_bytes()
    # ... and the encoder checks the graph at load with the library's own selfcheck.py on the export's cells
    from scgpt_hf.export import selfcheck

    assert (repository / "scgpt_encoder/1/selfcheck.py").read_bytes() == Path(selfcheck.__file__).read_bytes()
    assert (repository / "scgpt_encoder/1/selfcheck.npz").is_file()
    assert enc.parameters["self_check"].string_value == "raise"
    report = json.loads((repository / "triton_report.json").read_text())
    assert report["labels"] == LABELS and report["onnx_validation_passed"] is True
    assert "Wire format" in (repository / "README.md").read_text()
    assert json.loads((repository / "export_report.json").read_text())["passed"] is True


def test_gpu_repository_configs_parse(tmp_path, model_dir, repository):
    from scgpt_hf.export.triton import export_triton, validate_repository

    report = export_triton(model_dir, tmp_path / "gpu_repo", device="gpu", instances=2, tensorrt=True, max_batch_size=64)
    assert report.precision == "fp16"
    configs = validate_repository(tmp_path / "gpu_repo")
    enc = configs["scgpt_encoder"]
    assert enc.platform == "onnxruntime_onnx" and enc.backend == "onnxruntime"
    assert [(g.kind, g.count) for g in enc.instance_group] == [(1, 2)]  # KIND_GPU
    assert not any(i.allow_ragged_batch for i in enc.input)  # the native backend batches equal shapes
    assert list(enc.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    accel = enc.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel[0].name == "tensorrt" and accel[0].parameters["precision_mode"] == "FP16"
    assert not (tmp_path / "gpu_repo/scgpt_encoder/1/model.py").exists()
    assert configs["scgpt_tokenizer"].parameters["pad_to_multiple_of"].string_value == "64"
    meta = json.loads((tmp_path / "gpu_repo/export_report.json").read_text())
    assert meta["precision"] == "fp16" and meta["passed"] is True


def _generated(path: str) -> bool:
    """Whether a repository file is one triton_repo/ leaves to `regenerate` (matched by GENERATED)."""
    return any(fnmatch.fnmatch(path, p.strip("/") + ("/*" if p.endswith("/") else "")) for p in GENERATED)


def test_committed_triton_repo_in_sync(repository):
    """triton_repo/ in the source tree commits the hand-readable part of what the builder writes for the small model
    (every model's config.pbtxt and the model card), byte for byte; its .gitignore names the rest."""
    assert COMMITTED_REPO.is_dir(), "triton_repo/ missing: run `.venv/bin/python tests/test_triton.py regenerate`"
    gitignore = COMMITTED_REPO / ".gitignore"
    ignored = [line for line in gitignore.read_text().splitlines() if line[:1] not in ("", "#")] if gitignore.is_file() else []
    assert ignored == list(GENERATED), "triton_repo/.gitignore is stale: run `.venv/bin/python tests/test_triton.py regenerate`"

    def committed(root: Path) -> set[str]:
        files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        return {f for f in files if not _generated(f)} - {".gitignore"}

    built, kept = committed(repository), committed(COMMITTED_REPO)
    assert built == kept, f"file lists differ: only built {built - kept}, only committed {kept - built}"
    assert built == {"README.md"} | {f"{p.parent.name}/config.pbtxt" for p in repository.glob("*/config.pbtxt")}
    stale = [f for f in sorted(built) if (repository / f).read_bytes() != (COMMITTED_REPO / f).read_bytes()]
    assert not stale, f"triton_repo/ is stale in {stale}: run `.venv/bin/python tests/test_triton.py regenerate`"


def test_tokenizer_model_runs_numpy_only_in_server_python(tmp_path, repository, server_env, adata, tokenizer):
    """scgpt_tokenizer/1/model.py in the server's Python (numpy<2, nothing but stdlib + numpy importable by it)
    gives exactly what ScGPTTokenizer gives in the library's Python (numpy 2)."""
    from google.protobuf.json_format import MessageToDict

    from scgpt_hf.export.triton import parse_model_config

    cfg = parse_model_config((repository / "scgpt_tokenizer/config.pbtxt").read_text())
    (tmp_path / "config.json").write_text(json.dumps(MessageToDict(cfg, preserving_proto_field_name=True)))
    rows = [list(range(0, 200, 7)), [3], list(range(1, 200, 3))]
    feeds = {}
    for k, r in enumerate(rows):
        feeds[f"g{k}"], feeds[f"c{k}"] = _wire(adata, tokenizer, r)
    np.savez(tmp_path / "in.npz", **feeds)
    script = tmp_path / "run.py"
    script.write_text(_TOKENIZER_HARNESS)
    proc = subprocess.run([str(server_env / "bin/python"), "-I", str(script), str(repository / "scgpt_tokenizer/1"),
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert int(info["numpy"].split(".")[0]) < 2, info
    assert set(info["third_party_modules"]) <= {"numpy", "triton_python_backend_utils"}, info
    got = np.load(tmp_path / "out.npz")
    pad_value = float(cfg.parameters["cls_value"].string_value)
    for k, r in enumerate(rows):
        match = tokenizer.match_genes([str(g) for g in adata.var_names])
        want = tokenizer.encode_with_ids(adata.X[r], match.ids, max_length=MAX_LEN, truncation="random",
                                         padding=True, pad_to_multiple_of=8, return_tensors="np", seed=0,
                                         cls_value=pad_value, return_n_genes=True)
        for name in ("input_ids", "values", "attention_mask"):
            assert got[f"{name}{k}"].dtype == want[name].dtype
            np.testing.assert_array_equal(got[f"{name}{k}"], want[name], err_msg=f"{name} request {k}")
        np.testing.assert_array_equal(got[f"n_genes{k}"].reshape(-1), want["n_genes"])
    assert "cell 0 expresses no gene" in info["empty_cell_error"]


# What a python-backend model sees of Triton: triton_python_backend_utils' tensors, errors and responses.
_FAKE_PB_UTILS = r'''
import importlib.util, json, sys, types
import numpy as np

class Tensor:
    def __init__(self, name, array): self.name, self._a = name, np.asarray(array)
    def as_numpy(self): return self._a
class TritonError:
    def __init__(self, msg): self.msg = msg
class InferenceResponse:
    def __init__(self, output_tensors=(), error=None): self.outputs, self.error = list(output_tensors), error
class Request:
    def __init__(self, tensors): self.tensors = {t.name: t for t in tensors}
    def requested_output_names(self): return []
pb = types.ModuleType("triton_python_backend_utils")
pb.Tensor, pb.TritonError, pb.InferenceResponse = Tensor, TritonError, InferenceResponse
pb.get_input_tensor_by_name = lambda req, name: req.tensors.get(name)
sys.modules["triton_python_backend_utils"] = pb
'''

_TOKENIZER_HARNESS = _FAKE_PB_UTILS + r'''
model_dir, work = sys.argv[1], sys.argv[2]
before = set(sys.modules)
spec = importlib.util.spec_from_file_location("tokenizer_model", model_dir + "/model.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
model = module.TritonPythonModel()
model.initialize({"model_config": open(work + "/config.json").read(), "model_repository": model_dir,
                  "model_version": "1"})
loaded = {m.split(".")[0] for m in set(sys.modules) - before}
third = sorted(m for m in loaded | {"numpy"} if m not in sys.stdlib_module_names and not m.startswith("_")
               and m not in ("tokenizer_model", "scgpt_cell_encoding"))
feeds = np.load(work + "/in.npz")
n = len(feeds.files) // 2
reqs = [Request([Tensor("gene_ids", feeds[f"g{k}"]), Tensor("counts", feeds[f"c{k}"])]) for k in range(n)]
out = {}
for k, resp in enumerate(model.execute(reqs)):
    assert resp.error is None, resp.error.msg
    for t in resp.outputs: out[f"{t.name}{k}"] = t.as_numpy()
np.savez(work + "/out.npz", **out)
empty = model.execute([Request([Tensor("gene_ids", np.full((1, 3), -1, np.int64)), Tensor("counts", np.ones((1, 3), np.float32))])])
print(json.dumps({"numpy": np.__version__, "third_party_modules": third, "empty_cell_error": empty[0].error.msg}))
'''


def _run_encoder(server_env: Path, model_dir: Path, self_check: str, tmp_path: Path) -> dict:
    """Initialise scgpt_encoder's model.py from `model_dir` (its version folder) in the server's Python, with the
    repository's config and the `self_check` parameter; what happened, as JSON."""
    from google.protobuf.json_format import MessageToDict

    from scgpt_hf.export.triton import parse_model_config

    cfg = MessageToDict(parse_model_config((model_dir.parent / "config.pbtxt").read_text()),
                        preserving_proto_field_name=True)
    cfg["parameters"]["self_check"] = {"string_value": self_check}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    script = tmp_path / "run_encoder.py"
    script.write_text(_ENCODER_HARNESS)
    proc = subprocess.run([str(server_env / "bin/python"), "-I", str(script), str(model_dir), str(tmp_path / "config.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_encoder_model_self_checks_at_load_and_refuses_cells_without_tokens(tmp_path, repository, server_env):
    """scgpt_encoder's initialize runs the export's self-check in the server's Python: a host that computes the
    graph outside its bound does not load it (or, with the self_check parameter "warn", loads it with a warning);
    a cell whose attention_mask is all 0 is refused per request."""
    import onnx

    from scgpt_hf.export import selfcheck

    good = _run_encoder(server_env, repository / "scgpt_encoder/1", "raise", tmp_path)
    assert good["error"] is None and good["warnings"] == [], good
    assert "cell(s) [1] have no unmasked token" in good["empty_cell_error"]

    # Stored outputs that disagree with what the graph computes here: what a host outside the bound sees.
    bad = tmp_path / "scgpt_encoder"
    shutil.copytree(repository / "scgpt_encoder", bad)
    with np.load(bad / "1/selfcheck.npz") as stored:
        arrays = dict(stored)
    sha = selfcheck.save(bad / "1/selfcheck.npz", {k[6:]: v for k, v in arrays.items() if k.startswith("input.")},
                         {k[7:]: -v for k, v in arrays.items() if k.startswith("output.")})
    graph = onnx.load(bad / "1/model.onnx")
    next(p for p in graph.metadata_props if p.key == selfcheck.METADATA_KEY).value = sha
    onnx.save(graph, bad / "1/model.onnx")
    refused = _run_encoder(server_env, bad / "1", "raise", tmp_path)
    assert refused["error"] and "outside its bound" in refused["error"] and "self_check='warn'" in refused["error"]
    warned = _run_encoder(server_env, bad / "1", "warn", tmp_path)
    assert warned["error"] is None and any("outside its bound" in w for w in warned["warnings"]), warned


_ENCODER_HARNESS = _FAKE_PB_UTILS + r'''
import warnings
model_dir, config_path = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("encoder_model", model_dir + "/model.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
model = module.TritonPythonModel()
with open(config_path) as f:
    args = {"model_config": f.read(), "model_repository": model_dir.rsplit("/", 1)[0],
            "model_version": model_dir.rsplit("/", 1)[1]}
info = {"error": None, "warnings": [], "empty_cell_error": None}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        model.initialize(args)
    except Exception as err:
        info["error"] = f"{type(err).__name__}: {err}"
info["warnings"] = [str(w.message) for w in caught]
if info["error"] is None:
    stored = np.load(model_dir + "/selfcheck.npz")
    mask = stored["input.attention_mask"].copy()
    mask[1] = 0
    request = Request([Tensor("input_ids", stored["input.input_ids"]), Tensor("values", stored["input.values"]),
                       Tensor("attention_mask", mask)])
    info["empty_cell_error"] = model.execute([request])[0].error.msg
print(json.dumps(info))
'''


# ----------------------------------------------------------------------------------------------
# Against the real server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_embed_matches_pytorch(server, protocol, adata, model_dir, torch_model, tokenizer, expected):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = TritonClient(url, protocol, timeout=60)
    got = adata.copy()
    client.embed(got, batch_size=MAX_BATCH, concurrency=4)
    client.close()
    a = got.obsm["X_scGPT"]
    done = expected["n_genes"] > 0
    want = expected["cell_embedding"] / np.linalg.norm(expected["cell_embedding"], axis=1, keepdims=True)
    assert a.shape == (adata.n_obs, 32)
    assert np.isnan(a[~done]).all() and np.isfinite(a[done]).all()
    np.testing.assert_allclose(a[done], want[done], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got.obs["X_scGPT_n_genes"].to_numpy(), expected["n_genes"])
    try:  # the library's zero-shot path, when present, writes the same numbers
        from scgpt_hf.embedding import embed
    except ImportError:
        embed = None
    if embed is not None and _cls_value(server.repository) == torch_model.config.pad_value:
        lib = embed(adata.copy(), torch_model, tokenizer, max_length=MAX_LEN, seed=0, progress=False)
        np.testing.assert_allclose(a, lib.obsm["X_scGPT"], atol=ATOL, rtol=0, equal_nan=True)
    # raw (unnormalised) server output against the per-cell PyTorch forward
    raw = adata.copy()
    TritonClient(url, protocol).embed(raw, normalize=False, batch_size=7, concurrency=2)
    np.testing.assert_allclose(raw.obsm["X_scGPT"][done], expected["cell_embedding"][done], atol=ATOL, rtol=0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_annotate_matches_pytorch(server, protocol, adata, expected):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    got = adata.copy()
    TritonClient(url, protocol).annotate(got, batch_size=MAX_BATCH, concurrency=3, embedding_key="X_scGPT")
    logits = expected["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    done = expected["n_genes"] > 0
    np.testing.assert_allclose(got.obsm["scGPT_label_probabilities"][done], probs[done], atol=ATOL, rtol=0)
    labels = np.array(LABELS)[probs.argmax(1)]
    margin = np.sort(probs, 1)[:, -1] - np.sort(probs, 1)[:, -2]
    clear = done & (margin > 1e-3)
    assert (got.obs["scGPT_label"].astype(str).to_numpy()[clear] == labels[clear]).all()
    np.testing.assert_allclose(got.obs["scGPT_label_probability"].to_numpy()[done], probs.max(1)[done], atol=ATOL)
    assert np.isfinite(got.obsm["X_scGPT"][done]).all()


def test_annotate_writes_what_scgpt_hf_annotate_writes(server, adata, model_dir):
    """Same obs / obsm / uns keys, the label as a categorical over every class in the classifier's order, the
    same genes counted per cell."""
    from scgpt_hf import annotate

    cells = adata[:40].copy()
    library = annotate(cells.copy(), model_dir, max_length=MAX_LEN, progress=False)
    client = TritonClient(server.grpc_url, "grpc")
    served = client.annotate(cells.copy())
    for slot in ("obs", "obsm", "uns"):
        assert sorted(getattr(served, slot).keys()) == sorted(getattr(library, slot).keys()), slot
    assert list(served.obs["scGPT_label"].cat.categories) == LABELS == client.labels()
    assert served.uns["scGPT_label_params"]["labels"] == library.uns["scGPT_label_params"]["labels"]
    np.testing.assert_array_equal(served.obs["scGPT_label_n_genes"], library.obs["scGPT_label_n_genes"])
    # keys an .h5ad cannot hold are refused before any request, as scgpt_hf.annotate/embed refuse them
    for call in (lambda: client.annotate(cells.copy(), key_added="a/b"),
                 lambda: client.annotate(cells.copy(), embedding_key="x/y"),
                 lambda: client.embed(cells.copy(), key_added="a/b")):
        with pytest.raises(ValueError, match="an .h5ad file cannot hold"):
            call()


def test_vocab_model_matches_match_genes(server, adata, tokenizer):
    client = TritonClient(server.grpc_url, "grpc")
    names = [str(g) for g in adata.var_names[:3000]] + ["CD3E", "CD3E", "<cls>", "not-a-gene"]
    np.testing.assert_array_equal(client.gene_ids(names), tokenizer.match_genes(names).ids)


def _bad_requests(adata, tokenizer) -> list[tuple[str, dict, str]]:
    g, c = _wire(adata, tokenizer, [0, 1])
    big_g, big_c = _wire(adata, tokenizer, list(range(MAX_BATCH + 1)))
    empty_g = g.copy()
    empty_g[1] = -1
    zero_c = c.copy()
    zero_c[0] = 0
    neg_c = c.copy()
    neg_c[0, 0] = -1
    dup_g = g.copy()
    dup_g[0, 1] = dup_g[0, 0]
    return [
        ("wrong dtype", {"gene_ids": g.astype(np.int32), "counts": c}, "data-type"),
        ("wrong dtype counts", {"gene_ids": g, "counts": c.astype(np.float64)}, "data-type"),
        ("wrong rank", {"gene_ids": g.reshape(-1), "counts": c.reshape(-1)}, ""),
        ("shape mismatch", {"gene_ids": g, "counts": c[:, :-1]}, "same shape"),
        ("unknown genes only", {"gene_ids": np.full_like(g, 10**7), "counts": c}, "not genes of the model"),
        ("special token", {"gene_ids": np.full((1, 1), tokenizer.cls_token_id, np.int64), "counts": c[:1, :1]},
         "not genes of the model"),
        ("empty cell", {"gene_ids": empty_g, "counts": c}, "cell 1 expresses no gene"),
        ("all counts zero", {"gene_ids": g, "counts": zero_c}, "cell 0 expresses no gene"),
        ("negative counts", {"gene_ids": g, "counts": neg_c}, "non-negative"),
        ("repeated gene", {"gene_ids": dup_g, "counts": c}, "more than once"),
        ("batch over the limit", {"gene_ids": big_g, "counts": big_c}, "batch"),
    ]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_get_errors_and_server_keeps_serving(server, protocol, adata, tokenizer, expected):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = TritonClient(url, protocol, retries=0)
    good_g, good_c = _wire(adata, tokenizer, [5, 6])
    for what, feeds, needle in _bad_requests(adata, tokenizer):
        with pytest.raises(TritonServerError) as info:
            client.infer("scgpt_embed", feeds, ["cell_embedding"])
        assert needle.lower() in str(info.value).lower(), f"{what}: {info.value}"
        assert server.process.poll() is None, f"server died after {what}"
        out = client.infer("scgpt_embed", {"gene_ids": good_g, "counts": good_c}, ["cell_embedding"])
        np.testing.assert_allclose(out["cell_embedding"], expected["cell_embedding"][[5, 6]], atol=ATOL, rtol=0)
    client.close()


def test_client_errors_retries_and_timeouts(server, adata, tokenizer):
    # unreachable server: retried, then a clear error
    dead = TritonClient(f"127.0.0.1:{free_port()}", "grpc", retries=2, backoff=0.01, timeout=2)
    start = time.monotonic()
    with pytest.raises(TritonUnavailableError, match="after 3 tries"):
        dead.infer("scgpt_embed", {"gene_ids": np.zeros((1, 1), np.int64), "counts": np.ones((1, 1), np.float32)},
                   ["cell_embedding"])
    assert time.monotonic() - start < 30
    # a server-side error carries the server's message and is not retried
    client = TritonClient(server.http_url, "http", retries=5, backoff=5)
    start = time.monotonic()
    with pytest.raises(TritonServerError, match="expresses no gene"):
        client.infer("scgpt_embed", {"gene_ids": np.full((1, 2), -1, np.int64), "counts": np.ones((1, 2), np.float32)},
                     ["cell_embedding"])
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match="max_batch_size"):
        client.embed(adata.copy(), batch_size=MAX_BATCH * 2)
    with pytest.raises(ValueError, match="takes no batch labels"):
        client.embed(adata.copy(), batch_key=BATCH_KEY)
    with pytest.raises(TritonServerError, match="unknown|not found|not ready|Request for unknown model"):
        client.infer("no_such_model", {"gene_ids": np.zeros((1, 1), np.int64)}, ["cell_embedding"])


def _encoder_stats(client: TritonClient) -> tuple[int, int]:
    stats = client.statistics("scgpt_encoder")["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_load_dynamic_batching(server, adata, tokenizer, expected):
    """8 concurrent clients x 200 requests (1-3 cells each), bounded in time: no errors, every answer right,
    and the encoder ran fewer batches than it served cells (dynamic batching)."""
    n_clients, n_requests, deadline_s = 8, 200, 240.0
    stats_client = TritonClient(server.grpc_url, "grpc")
    inf0, exe0 = _encoder_stats(stats_client)
    usable = np.flatnonzero(expected["n_genes"] > 0)
    errors: list[str] = []
    wrong: list[str] = []
    done = [0] * n_clients
    stop_at = time.monotonic() + deadline_s

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        protocol = "grpc" if k % 2 == 0 else "http"
        client = TritonClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol, retries=0)
        for i in range(n_requests):
            if time.monotonic() > stop_at:
                errors.append(f"client {k}: deadline reached after {i} requests")
                return
            rows = rng.choice(usable, size=int(rng.integers(1, 4)), replace=False)
            g, c = _wire(adata, tokenizer, rows)
            try:
                out = client.infer("scgpt_embed", {"gene_ids": g, "counts": c}, ["cell_embedding"])
            except Exception as err:  # noqa: BLE001
                errors.append(f"client {k} request {i}: {err}")
                continue
            if not np.allclose(out["cell_embedding"], expected["cell_embedding"][rows], atol=ATOL, rtol=0):
                wrong.append(f"client {k} request {i} rows {rows.tolist()}")
            done[k] += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline_s + 30)
    elapsed = time.monotonic() - start
    assert not any(t.is_alive() for t in threads), "load test threads did not finish"
    assert not errors, errors[:5]
    assert not wrong, wrong[:5]
    assert sum(done) == n_clients * n_requests
    inf1, exe1 = _encoder_stats(stats_client)
    inferences, executions = inf1 - inf0, exe1 - exe0
    print(f"\nload: {sum(done)} requests in {elapsed:.1f} s; encoder {inferences} inferences in {executions} executions")
    assert inferences >= n_clients * n_requests
    assert executions < inferences, (inferences, executions)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["terminal-closed", "killed"])
def test_serve_cli_leaves_no_server_or_folder_behind(repository, server_env, tmp_path, sig):
    """`scgpt-hf serve` ended by its terminal closing (SIGHUP), or SIGKILLed: the tritonserver, its stubs and the
    guard between them stop, and the server's temporary folder is removed."""
    from scgpt_hf.serving.server import _alive, _descendants

    ports = [free_port() for _ in range(3)]
    env = dict(os.environ, SCGPT_HF_TRITON_ENV=str(server_env))
    proc = subprocess.Popen(
        [sys.executable, "-m", "scgpt_hf.serving", str(repository), "--http-port", str(ports[0]), "--grpc-port",
         str(ports[1]), "--metrics-port", str(ports[2])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )
    family: list[int] = []
    try:
        line = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "Triton ready" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "Triton ready" in line, line
        assert TritonClient(f"127.0.0.1:{ports[1]}", "grpc").is_ready()
        family = _descendants(proc.pid)  # the guard, tritonserver and its python backend stubs
        (server,) = [p for p in family if Path(f"/proc/{p}/exe").resolve().name == "tritonserver"]
        args = Path(f"/proc/{server}/cmdline").read_bytes().decode().split("\0")
        temp = Path(next(a for a in args if a.startswith("--backend-directory=")).split("=", 1)[1]).parent
        assert temp.is_dir() and len(family) >= 3
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == (0 if sig == signal.SIGHUP else -signal.SIGKILL)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and ([p for p in family if _alive(p)] or temp.exists()):
            time.sleep(0.2)
        assert not [p for p in family if _alive(p)], "processes outlived scgpt-hf serve"
        assert not temp.exists(), "the server's temporary folder outlived it"
    finally:
        for pid in [proc.pid, *family]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)



# ----------------------------------------------------------------------------------------------
# `scgpt-hf serve MODEL`: the PyTorch encoder behind the same models (on the CPU here; bench/gpu/run.sh runs
# it on a GPU), and what the launcher refuses before anything starts


@pytest.fixture(scope="module")
def torch_server(model_dir, server_env):
    srv = TritonServer.for_model(model_dir, device="cpu", server_env=server_env, max_batch_size=MAX_BATCH)
    srv.start(timeout=300)
    yield srv
    srv.stop()


def test_torch_encoder_matches_pytorch(torch_server, adata, expected):
    """Same ensembles, wire format and client as the ONNX repository; the answers are the PyTorch model's."""
    client = TritonClient(torch_server.grpc_url, "grpc", retries=0)
    done = expected["n_genes"] > 0
    raw = client.embed(adata.copy(), normalize=False, batch_size=7, concurrency=4).obsm["X_scGPT"]
    np.testing.assert_allclose(raw[done], expected["cell_embedding"][done], atol=ATOL, rtol=0)
    assert np.isnan(raw[~done]).all()
    got = client.annotate(adata.copy(), batch_size=MAX_BATCH, concurrency=3)
    key = next(k for k in got.obsm if k.endswith("_probabilities"))
    logits = expected["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(got.obsm[key][done], probs[done], atol=ATOL, rtol=0)
    config = client.model_config("scgpt_encoder")
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert (params["device"], params["precision"], params["attn_implementation"]) == ("cpu", "auto", "sdpa")
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8, 16]


def test_torch_encoder_bad_requests_get_errors(torch_server, adata, tokenizer, expected):
    """Values are checked on the host before anything runs; each bad request gets its error and the server
    keeps serving (a dynamic batch too large for the GPU's memory likewise: bench/gpu/run.sh checks that)."""
    _encoder_refuses_bad_requests(torch_server, adata, tokenizer, expected)


def test_onnx_encoder_bad_requests_get_errors(server, adata, tokenizer, expected):
    """The ONNX Runtime encoder checks requests as the PyTorch one does (triton_backend_common.encoder_cells): padding
    inside a cell and NaN values are refused too, where they used to be computed."""
    _encoder_refuses_bad_requests(server, adata, tokenizer, expected)


def _encoder_refuses_bad_requests(encoder_server, adata, tokenizer, expected):
    client = TritonClient(encoder_server.grpc_url, "grpc", retries=0)
    n_genes = np.where(expected["n_genes"] > 0, expected["n_genes"], 10**9)
    rows = [int(np.argmin(n_genes)), int(np.argmax(expected["n_genes"]))]  # the shortest cell is padded
    enc = tokenizer(adata[rows], max_length=MAX_LEN, padding=True, return_tensors="np", seed=0,
                    cls_value=_cls_value(encoder_server.repository))
    good = {"input_ids": enc["input_ids"].astype(np.int64), "values": enc["values"].astype(np.float32),
            "attention_mask": enc["attention_mask"].astype(np.int64)}
    assert (good["attention_mask"] == 0).any()

    def bad(**changes):
        feeds = {k: v.copy() for k, v in good.items()}
        for name, edit in changes.items():
            feeds[name] = edit(feeds[name])
        return feeds

    def hole(m):
        m[0, 1] = 0
        return m

    def no_token(m):
        m[1] = 0
        return m

    def nan(v):
        v[0, 1] = np.nan
        return v

    cases = [
        ("id outside the vocabulary", bad(input_ids=lambda a: a + 10**6), "must lie in [0,"),
        ("mask of 2s", bad(attention_mask=lambda m: m * 2), "only 0 and 1"),
        ("padding inside a cell", bad(attention_mask=hole), "1s, then 0s"),
        ("cell without tokens", bad(attention_mask=no_token), "has no token"),
        ("NaN value", bad(values=nan), "NaN"),
        ("shape mismatch", bad(values=lambda v: v[:, :-1]), "must have the shape"),
    ]
    for what, feeds, needle in cases:
        with pytest.raises(TritonServerError) as info:
            client.infer("scgpt_encoder", feeds, ["cell_embedding"])
        assert needle.lower() in str(info.value).lower(), f"{what}: {info.value}"
        assert encoder_server.process.poll() is None, f"server died after {what}"
        out = client.infer("scgpt_encoder", good, ["cell_embedding"])["cell_embedding"]
        np.testing.assert_allclose(out, expected["cell_embedding"][rows], atol=ATOL, rtol=0)


def test_second_server_on_a_used_port_is_refused(server, repository, server_env, model_dir):
    """A second server on ports another one holds fails before it starts, in every serve mode (it used to wait
    for readiness and get the other server's answer)."""
    for ports in ({"http_port": server.http_port}, {"grpc_port": server.grpc_port},
                  {"metrics_port": server.metrics_port}):
        second = TritonServer(repository, server_env=server_env, **ports)
        with pytest.raises(RuntimeError, match="already in use"):
            second.start(timeout=60)
        assert second.process is None
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{server.grpc_port} .*already in use"):
        TritonServer.for_model(model_dir, device="cpu", server_env=server_env, grpc_port=server.grpc_port)
    assert server.process.poll() is None


def test_serve_refuses_before_starting(model_dir, repository, server_env, tmp_path):
    """`scgpt-hf serve` exits 2 with one clear line, before any server starts: --device cuda without CUDA, an
    attention implementation that cannot run on the device, model options given for an exported repository."""
    import torch

    env = dict(os.environ, SCGPT_HF_TRITON_ENV=str(server_env))

    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scgpt_hf.serving", *args, "--grpc-port", str(free_port()),
                               "--http-port", str(free_port()), "--metrics-port", str(free_port())],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    cases = [((str(model_dir), "--device", "cpu", "--attn-implementation", "flash_attention_2"),
              "cannot run on cpu"),
             ((str(repository), "--device", "cuda"), "exported repository"),
             ((str(tmp_path / "missing"),), "missing")]
    if not torch.cuda.is_available():
        cases.insert(0, ((str(model_dir), "--device", "cuda"), "sees no CUDA GPU"))
    for args, needle in cases:
        done = serve(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert needle in done.stderr, (args, done.stderr)
        assert "Triton ready" not in done.stdout


def test_server_env_is_found_without_the_source_tree(tmp_path, monkeypatch, server_env):
    """The server's environment is looked for in the current folder (.venv-triton), never beside the source tree;
    one named by --server-env or $SCGPT_HF_TRITON_ENV that holds no Triton server is an error, not passed over."""
    monkeypatch.delenv("SCGPT_HF_TRITON_ENV", raising=False)
    monkeypatch.chdir(tmp_path)
    if not any(Path(sys.prefix).glob("lib/python3*/site-packages/pytriton/tritonserver")):
        with pytest.raises(FileNotFoundError, match="setup_triton_server.sh"):
            find_server_env()
    (tmp_path / ".venv-triton").symlink_to(server_env)
    assert find_server_env() == tmp_path / ".venv-triton"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="--server-env .* holds no Triton server"):
        find_server_env(empty)
    monkeypatch.setenv("SCGPT_HF_TRITON_ENV", str(empty))
    with pytest.raises(FileNotFoundError, match="SCGPT_HF_TRITON_ENV .* holds no Triton server"):
        find_server_env()


def test_stop_leaves_nothing_running(server):
    """Last test of the session's server: stop it, and no server or stub process remains, ports are free."""
    pids = server.pids()
    assert len(pids) >= 5  # tritonserver + one stub per python-backend model instance
    server.stop()
    from scgpt_hf.serving.server import _alive

    assert not [p for p in pids if _alive(p)]
    import socket

    for port in (server.http_port, server.grpc_port, server.metrics_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_cli_parsers():
    import argparse

    from scgpt_hf.export import triton as triton_export
    from scgpt_hf import serving

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    export = sub.add_parser("export").add_subparsers(dest="export_format")
    triton_export.add_parser(export)
    serving.add_parser(sub)
    args = parser.parse_args(["export", "triton", "m", "r", "--device", "gpu", "--max-batch-size", "32",
                              "--instances", "2", "--precision", "fp16", "--tensorrt"])
    assert (args.device, args.max_batch_size, args.instances, args.precision, args.tensorrt) == ("gpu", 32, 2, "fp16", True)
    assert args.func is triton_export.run_export_triton
    args = parser.parse_args(["serve", "repo", "--grpc-port", "9001"])
    assert args.func is serving.run_serve and args.grpc_port == 9001


# ----------------------------------------------------------------------------------------------
# Batch-label models (a fine-tuned ScGPTForBatchIntegration: batch embeddings over wu2020's patients)


def test_batch_repository_configs(tmp_path, batch_repository, batch_model_dir, adata):
    """CPU and GPU encoders declare batch_labels INT64 [1] reshaped to the graph's [cells]; the ensemble takes it
    and routes it straight to the encoder; its parameters name the model's batches."""
    from scgpt_hf.export.triton import export_triton, validate_repository

    export_triton(batch_model_dir, tmp_path / "gpu", device="gpu", validate=False)
    patients = sorted(adata.obs[BATCH_KEY].astype(str).unique())
    for repo in (batch_repository, tmp_path / "gpu"):
        configs = validate_repository(repo)
        assert set(configs) == {"scgpt_vocab", "scgpt_tokenizer", "scgpt_encoder", "scgpt_embed"}
        labels = {i.name: i for i in configs["scgpt_encoder"].input}["batch_labels"]
        assert (labels.data_type, list(labels.dims), labels.HasField("reshape"), list(labels.reshape.shape)) == \
            (9, [1], True, [])  # TYPE_INT64
        assert configs["scgpt_encoder"].parameters["num_batch_labels"].string_value == str(len(patients))
        embed_cfg = configs["scgpt_embed"]
        assert [(i.name, i.data_type, list(i.dims)) for i in embed_cfg.input][-1] == ("batch_labels", 9, [1])
        tok_step, enc_step = embed_cfg.ensemble_scheduling.step
        assert "batch_labels" not in tok_step.input_map and enc_step.input_map["batch_labels"] == "batch_labels"
        assert json.loads(embed_cfg.parameters["batch2id"].string_value) == {p: i for i, p in enumerate(patients)}
        assert "`batch_labels` | INT64 | [cells, 1]" in (repo / "README.md").read_text()


@pytest.fixture(scope="session")
def batch_expected(adata, batch_model_dir) -> np.ndarray:
    from scgpt_hf import ScGPTForBatchIntegration, embed

    model = ScGPTForBatchIntegration.from_pretrained(batch_model_dir).eval()
    return embed(adata.copy(), model, max_length=MAX_LEN, seed=0, progress=False, batch_key=BATCH_KEY).obsm["X_scGPT"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_batch_embed_matches_embed(batch_server, protocol, adata, batch_expected):
    url = batch_server.grpc_url if protocol == "grpc" else batch_server.http_url
    client = TritonClient(url, protocol, retries=0)
    got = client.embed(adata.copy(), batch_key=BATCH_KEY, batch_size=MAX_BATCH, concurrency=2).obsm["X_scGPT"]
    np.testing.assert_allclose(got, batch_expected, atol=ATOL, rtol=0, equal_nan=True)
    ids = adata.copy()  # the model names its batches, so integer ids are refused as embed refuses them
    patients = sorted(adata.obs[BATCH_KEY].astype(str).unique())
    ids.obs["patient_id"] = [patients.index(name) for name in ids.obs[BATCH_KEY].astype(str)]
    with pytest.raises(ValueError, match=r"not among the 14 .*batch_as_ids=True"):
        client.embed(ids, batch_key="patient_id", batch_size=5)
    got = client.embed(ids, batch_key="patient_id", batch_as_ids=True, batch_size=MAX_BATCH).obsm["X_scGPT"]
    np.testing.assert_allclose(got, batch_expected, atol=ATOL, rtol=0, equal_nan=True)  # said explicitly
    assert ids.uns["X_scGPT_params"]["batch_as_ids"] is True
    client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_batch_bad_inputs_get_errors(batch_server, protocol, adata, tokenizer):
    """Out-of-range, missing or mistyped batch ids come back as errors and the server keeps serving; the client
    refuses unknown batches and a missing batch_key before sending."""
    url = batch_server.grpc_url if protocol == "grpc" else batch_server.http_url
    client = TritonClient(url, protocol, retries=0)
    g, c = _wire(adata, tokenizer, [0, 1])
    n_batches = len(adata.obs[BATCH_KEY].unique())
    good = {"gene_ids": g, "counts": c, "batch_labels": np.array([[0], [n_batches - 1]], np.int64)}
    want = client.infer("scgpt_embed", good, ["cell_embedding"])["cell_embedding"]
    for what, labels, needle in [
        ("id too large", np.array([[0], [n_batches]], np.int64), f"must lie in [0, {n_batches})"),
        ("negative id", np.array([[-1], [0]], np.int64), f"must lie in [0, {n_batches})"),
        ("wrong dtype", np.array([[0], [1]], np.int32), "data-type"),
        ("one id for two cells", np.array([[0]], np.int64), "batch size"),
        ("missing", None, "batch_labels"),
    ]:
        feeds = {"gene_ids": g, "counts": c, **({} if labels is None else {"batch_labels": labels})}
        with pytest.raises(TritonServerError) as info:
            client.infer("scgpt_embed", feeds, ["cell_embedding"])
        assert needle.lower() in str(info.value).lower(), f"{what}: {info.value}"
        assert batch_server.process.poll() is None, f"server died after {what}"
        np.testing.assert_array_equal(client.infer("scgpt_embed", good, ["cell_embedding"])["cell_embedding"], want)
    unknown = adata.copy()
    unknown.obs[BATCH_KEY] = unknown.obs[BATCH_KEY].astype(str)
    unknown.obs.iloc[:2, unknown.obs.columns.get_loc(BATCH_KEY)] = "Lung99"
    with pytest.raises(ValueError, match="'Lung99' are not among the 14"):
        client.embed(unknown, batch_key=BATCH_KEY)
    with pytest.raises(ValueError, match="needs batch labels"):
        client.embed(adata.copy())
    client.close()


def test_dsbn_models_refused(tmp_path):
    """Domain-specific batch norm has no static ONNX graph: refused with the reason and the way out, before the
    repository folder is touched."""
    from scgpt_hf import ScGPTConfig, ScGPTForBatchIntegration
    from scgpt_hf.export.triton import export_triton

    model = ScGPTForBatchIntegration(ScGPTConfig(
        vocab_size=13, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        pad_token_id=10, cls_token_id=11, eoc_token_id=12, domain_spec_batchnorm="dsbn", num_batch_labels=2))
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "keep.txt").write_text("x")
    with pytest.raises(NotImplementedError, match=r"domain-specific batch norm.*static ONNX graph.*batch_key=.*"
                                                  r"use_batch_labels=True"):
        export_triton(model, tmp_path / "repo", overwrite=True)
    assert (tmp_path / "repo" / "keep.txt").read_text() == "x"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_repository_is_written_whole_or_not_at_all(tmp_path, repository, model_dir, monkeypatch, capsys):
    """An existing repository is refused without --overwrite before any work (one CLI line, exit 2); a build
    that fails its final check leaves the previous repository byte for byte; a good one replaces it."""
    from scgpt_hf.cli import main
    from scgpt_hf.export import triton as triton_export

    target = tmp_path / "repo"
    shutil.copytree(repository, target)
    before = _snapshot(target)
    with pytest.raises(FileExistsError, match="already exists: pass --overwrite"):
        triton_export.export_triton(tmp_path / "no_such_model", target)  # the model is never looked at
    with pytest.raises(SystemExit) as exit:
        main(["export", "triton", str(model_dir), str(target)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "already exists: pass --overwrite" in err, err

    def broken(repo):
        raise ValueError(f"{repo} is broken")

    monkeypatch.setattr(triton_export, "validate_repository", broken)
    onnx_dir = repository / "scgpt_encoder/1"  # reuse the graph: no export needed
    with pytest.raises(ValueError, match="is broken"):
        triton_export.export_triton(model_dir, target, onnx_dir=onnx_dir, overwrite=True, max_batch_size=8)
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]
    monkeypatch.undo()
    triton_export.export_triton(model_dir, target, onnx_dir=onnx_dir, overwrite=True, max_batch_size=8)
    assert json.loads((target / "triton_report.json").read_text())["max_batch_size"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


def test_torch_repository_is_written_whole_or_not_at_all(tmp_path, model_dir, monkeypatch):
    """`serve MODEL`'s repository writer (public) builds beside its target: a failing build leaves nothing, an
    existing folder is refused."""
    from scgpt_hf.export import triton as triton_export

    def broken(repo):
        raise ValueError(f"{repo} is broken")

    monkeypatch.setattr(triton_export, "validate_repository", broken)
    with pytest.raises(ValueError, match="is broken"):
        triton_export.write_torch_repository(model_dir, tmp_path / "repo", device="cpu")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    triton_export.write_torch_repository(model_dir, tmp_path / "repo", device="cpu")
    assert (tmp_path / "repo" / "scgpt_encoder" / "1" / "model.py").is_file()
    with pytest.raises(FileExistsError, match="already exists"):
        triton_export.write_torch_repository(model_dir, tmp_path / "repo", device="cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


# ----------------------------------------------------------------------------------------------


def _regenerate() -> None:
    """Rewrite triton_repo/ in the source tree from the small model: a complete, servable repository, of which git
    keeps the hand-readable part (its .gitignore names the rest)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = build_small_model(Path(tmp) / "model", _wu2020())
        build_repository(model, Path(tmp) / "triton_repo")
        if COMMITTED_REPO.exists():
            shutil.rmtree(COMMITTED_REPO)
        shutil.copytree(Path(tmp) / "triton_repo", COMMITTED_REPO)
    (COMMITTED_REPO / ".gitignore").write_text(
        "# Written by `.venv/bin/python tests/test_triton.py regenerate`, not committed (README, Layout).\n"
        + "".join(f"{pattern}\n" for pattern in GENERATED))
    print(f"wrote {COMMITTED_REPO}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sys.argv[1:] == ["regenerate"]:
        _regenerate()
    else:
        sys.exit("usage: python tests/test_triton.py regenerate")
