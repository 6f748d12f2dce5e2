"""End-to-end Hub tests: push with the real huggingface_hub / transformers clients to a local Hub-protocol server
(tests/hub_server.py), pull by id, in a fresh interpreter without scgpt_hf for remote code. CPU, no internet."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import hub_server  # noqa: E402  (tests/ is on sys.path via conftest)

# Before huggingface_hub is imported (when this module is collected first; conftest should call it earlier).
HUB = hub_server.start_session_hub()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import HfApi, ModelCard, hf_hub_download  # noqa: E402
from huggingface_hub.repocard_data import model_index_to_eval_results  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: E402

from reference import make_vocab  # noqa: E402
from scgpt_hf import (  # noqa: E402
    ScGPTConfig,
    ScGPTForCellClassification,
    ScGPTForPreTraining,
    ScGPTForPerturbationPrediction,
    ScGPTModel,
    ScGPTTokenizer,
    hub,
)

WRITE, READ = hub_server.WRITE_TOKEN, hub_server.READ_TOKEN
N_GENES = 400
N_CELLS = 24
MAX_LENGTH = 96


# ------------------------------------------------------------------------------------------------- fixtures/helpers


@pytest.fixture(scope="session")
def local_hub() -> hub_server.LocalHubServer:
    """The session's local Hub (started at import so HF_* are set before huggingface_hub reads them)."""
    server = hub_server.start_session_hub()
    assert os.environ["HF_ENDPOINT"] == server.endpoint
    from huggingface_hub import constants

    assert constants.ENDPOINT == server.endpoint and constants.HF_HUB_DISABLE_XET
    return server


@pytest.fixture(scope="module")
def adata(wu2020_adata):  # type: ignore[no-untyped-def]
    """Real cells: the first N_CELLS of scirpy's wu2020 (raw counts)."""
    return wu2020_adata[:N_CELLS].copy()


@pytest.fixture(scope="module")
def tokenizer(wu2020_adata, tmp_path_factory) -> ScGPTTokenizer:
    """A vocabulary of wu2020's N_GENES most-counted genes (symbols) plus the special tokens."""
    counts = np.asarray(wu2020_adata.X.sum(axis=0)).ravel()
    genes = [str(g) for g in wu2020_adata.var_names[np.argsort(-counts, kind="stable")[:N_GENES]]]
    path = tmp_path_factory.mktemp("vocab") / "vocab.json"
    path.write_text(json.dumps(make_vocab(len(genes), genes)))
    return ScGPTTokenizer(str(path), max_length=MAX_LENGTH)


def small_config(tokenizer: ScGPTTokenizer, **overrides) -> ScGPTConfig:  # type: ignore[no-untyped-def]
    vocab = tokenizer.get_vocab()
    kwargs = dict(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        dropout=0.0, pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"], eoc_token_id=vocab["<eoc>"],
        max_seq_len=MAX_LENGTH,
    )
    kwargs.update(overrides)
    return ScGPTConfig(**kwargs)


def build(cls, config: ScGPTConfig, seed: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    return cls(config).eval()


def save(model, tokenizer: ScGPTTokenizer, path: Path, metrics: dict | None = None,  # type: ignore[no-untyped-def]
         **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return path


def state(model) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


ISOLATED_BOOTSTRAP = """
import sys
sys.path.append({site!r})
if {platsite!r} != {site!r}:
    sys.path.append({platsite!r})
import importlib.util
assert importlib.util.find_spec("scgpt_hf") is None, "scgpt_hf must not be importable here"
try:
    import scgpt_hf  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("scgpt_hf imported in the isolated interpreter")
import pickle
import torch

def _no_unpickling(*args, **kwargs):
    raise AssertionError("something tried to unpickle a file from the Hub")

torch.load = pickle.load = pickle.loads = _no_unpickling
"""


def run_isolated(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh ``python -S`` whose path has the venv's packages but not scgpt_hf (editable
    installs hook in through a .pth file, which -S skips; cwd and PYTHONPATH exclude the repository)."""
    paths = sysconfig.get_paths()
    full = ISOLATED_BOOTSTRAP.format(site=paths["purelib"], platsite=paths["platlib"]) + textwrap.dedent(script)
    path = cwd / "isolated_script.py"
    path.write_text(full)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["HF_HOME"] = str(cwd / "hf_home")  # its own, empty cache
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, "-S", str(path), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"isolated interpreter failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def head(repo_id: str, revision: str = "main") -> str:
    return HfApi(token=WRITE).model_info(repo_id, revision=revision).sha


# ------------------------------------------------------------------------------------------------- tests


PULL_SCRIPT = """
import json, os, re, sys
import numpy as np
import torch
from huggingface_hub import hf_hub_download
from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer

spec = json.load(open(sys.argv[1]))
arrays = np.load(spec["inputs"])
batch = {k: torch.from_numpy(arrays[k]) for k in ("input_ids", "values", "attention_mask")}
out = {}
for repo, auto in spec["loads"]:
    cls = {"AutoModel": AutoModel, "AutoModelForPreTraining": AutoModelForPreTraining}[auto]
    model = cls.from_pretrained(repo, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        o = model(**batch)
    key = repo + "|" + auto
    out[key + "|cell_embedding"] = o.cell_embedding.numpy()
    out[key + "|last_hidden_state"] = o.last_hidden_state.numpy()
    if auto == "AutoModelForPreTraining":
        out[key + "|expression"] = o.expression.numpy()
        out[key + "|mvc_expression"] = o.mvc_expression.numpy()

import anndata
tok = AutoTokenizer.from_pretrained(spec["repo"], trust_remote_code=True)
assert type(tok).__module__.startswith("transformers_modules."), type(tok).__module__
enc = tok(anndata.read_h5ad(spec["h5ad"]), padding=True, return_tensors="np")
out["tok|input_ids"], out["tok|values"] = enc["input_ids"], enc["values"]

readme = open(hf_hub_download(spec["repo"], "README.md")).read()
code = re.search(r"```python\\n(.*?)```", readme, re.S).group(1)
namespace = {}
exec(compile(code, "README.md", "exec"), namespace)
out["card|cell_embeddings"] = namespace["cell_embeddings"].numpy()
np.savez(spec["output"], **out)
print("modules:", sorted(m for m in sys.modules if m.split(".")[0] in ("scgpt_hf", "scanpy")))
"""


def test_push_and_pull_without_package_matches_on_real_cells(local_hub, tokenizer, adata, tmp_path) -> None:
    """hub.push (folder) and model/tokenizer.push_to_hub + push_card; pulled by id with trust_remote_code in a
    fresh interpreter without scgpt_hf: same outputs, same tokens, and the card's code runs."""
    model = build(ScGPTForPreTraining, small_config(tokenizer), seed=0)
    model_dir = save(model, tokenizer, tmp_path / "model")
    info = hub.push(model_dir, "scgpt-org/pretrained", token=WRITE)
    files = {s.rfilename for s in HfApi().model_info("scgpt-org/pretrained").siblings}
    assert {"config.json", "model.safetensors", "vocab.json", "tokenizer_config.json", "README.md",
            "configuration_scgpt.py", "modeling_scgpt.py", "tokenization_scgpt.py"} <= files
    assert not {f for f in files if f.endswith(hub.PICKLE_SUFFIXES)}
    assert info.oid == head("scgpt-org/pretrained")

    # The transformers way: push_to_hub on the objects (code files via register_remote_code), then the card.
    hub.register_remote_code()
    native = build(ScGPTForPreTraining, small_config(tokenizer), seed=1)
    hub.add_auto_map(native.config)
    native.push_to_hub("scgpt-org/pretrained-native", token=WRITE)
    tokenizer.push_to_hub("scgpt-org/pretrained-native", token=WRITE)
    hub.push_card(save(native, tokenizer, tmp_path / "native"), "scgpt-org/pretrained-native", token=WRITE)
    card = ModelCard.load("scgpt-org/pretrained-native")
    assert card.data.library_name == "transformers" and "scgpt" in card.data.tags
    native_files = {s.rfilename for s in HfApi().model_info("scgpt-org/pretrained-native").siblings}
    assert {"modeling_scgpt.py", "tokenization_scgpt.py", "configuration_scgpt.py"} <= native_files

    enc = tokenizer(adata, padding=True, return_tensors="np")
    np.savez(tmp_path / "inputs.npz", **{k: enc[k] for k in ("input_ids", "values", "attention_mask")})
    adata.write_h5ad(tmp_path / "cells.h5ad")
    spec = {
        "inputs": str(tmp_path / "inputs.npz"), "output": str(tmp_path / "outputs.npz"),
        "h5ad": str(tmp_path / "cells.h5ad"), "repo": "scgpt-org/pretrained",
        "loads": [["scgpt-org/pretrained", "AutoModel"], ["scgpt-org/pretrained", "AutoModelForPreTraining"],
                  ["scgpt-org/pretrained-native", "AutoModel"],
                  ["scgpt-org/pretrained-native", "AutoModelForPreTraining"]],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = run_isolated(PULL_SCRIPT, tmp_path, str(tmp_path / "spec.json"))
    assert "modules: []" in proc.stdout
    got = np.load(tmp_path / "outputs.npz")

    mask = enc["attention_mask"].astype(bool)
    batch = {k: torch.from_numpy(enc[k]) for k in ("input_ids", "values", "attention_mask")}
    for repo, ref in (("scgpt-org/pretrained", model), ("scgpt-org/pretrained-native", native)):
        with torch.no_grad():
            want = ref(**batch)
        for auto in ("AutoModel", "AutoModelForPreTraining"):
            key = f"{repo}|{auto}"
            np.testing.assert_allclose(got[key + "|cell_embedding"], want.cell_embedding.numpy(), atol=1e-6)
            np.testing.assert_allclose(got[key + "|last_hidden_state"][mask], want.last_hidden_state.numpy()[mask],
                                       atol=1e-6)
        np.testing.assert_allclose(got[f"{repo}|AutoModelForPreTraining|expression"][mask],
                                   want.expression.numpy()[mask], atol=1e-6)
        np.testing.assert_allclose(got[f"{repo}|AutoModelForPreTraining|mvc_expression"][mask],
                                   want.mvc_expression.numpy()[mask], atol=1e-6)
    # The remote tokenizer tokenises the cells exactly as the local one.
    np.testing.assert_array_equal(got["tok|input_ids"], enc["input_ids"])
    np.testing.assert_array_equal(got["tok|values"], enc["values"])
    # The card's "how to use" code ran there and gave the pushed model's normalised cell embeddings.
    with torch.no_grad():
        want_emb = torch.nn.functional.normalize(model.scgpt(**batch).cell_embedding, dim=1).numpy()
    np.testing.assert_allclose(got["card|cell_embeddings"], want_emb, atol=1e-6)


def test_installed_package_resolves_auto_classes_natively(local_hub, tokenizer, tmp_path) -> None:
    """With scgpt_hf installed, the Hub repo's auto_map is present but local registration wins."""
    model = build(ScGPTForPreTraining, small_config(tokenizer), seed=3)
    hub.push(save(model, tokenizer, tmp_path / "m"), "scgpt-org/native-resolution", token=WRITE)
    config = AutoConfig.from_pretrained("scgpt-org/native-resolution")
    assert type(config) is ScGPTConfig
    assert config.auto_map["AutoModel"] == "modeling_scgpt.ScGPTModel"
    assert config.auto_map["AutoConfig"] == "configuration_scgpt.ScGPTConfig"
    pulled = AutoModel.from_pretrained("scgpt-org/native-resolution")
    assert type(pulled) is ScGPTModel
    assert_same_weights(state(pulled), {k[len("scgpt."):]: v for k, v in state(model).items()
                                        if k.startswith("scgpt.")})
    tok = AutoTokenizer.from_pretrained("scgpt-org/native-resolution")
    assert type(tok) is ScGPTTokenizer and tok.get_vocab() == tokenizer.get_vocab()


def test_revision_pinning_tag_branch_and_commit(local_hub, tokenizer, tmp_path, capsys) -> None:
    repo = "scgpt-org/pinned"
    config = small_config(tokenizer)
    v1, v2, v3 = (build(ScGPTModel, config, seed=s) for s in (11, 12, 13))
    c1 = hub.push(save(v1, tokenizer, tmp_path / "v1"), repo, token=WRITE, commit_message="v1")
    HfApi(token=WRITE).create_tag(repo, tag="v1.0", revision=c1.oid)
    c2 = hub.push(save(v2, tokenizer, tmp_path / "v2"), repo, token=WRITE, commit_message="v2")
    # The branch push goes through the CLI.
    code = hub.main(["push", str(save(v3, tokenizer, tmp_path / "v3")), repo, "--revision", "dev", "--token", WRITE])
    assert code == 0
    assert f"{repo}@" in capsys.readouterr().out
    refs = HfApi(token=WRITE).list_repo_refs(repo)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1.0"]
    assert c1.oid != c2.oid and head(repo) == c2.oid

    for revision, want in (("v1.0", v1), (c1.oid, v1), ("dev", v3), ("main", v2), (c2.oid, v2)):
        pulled = ScGPTModel.from_pretrained(repo, revision=revision)
        assert_same_weights(state(pulled), state(want))
    key = "encoder.layers.0.linear1.weight"
    assert not np.array_equal(state(v1)[key], state(v2)[key])


def test_unchanged_push_makes_no_commit_and_sharded_weights_round_trip(local_hub, tokenizer, tmp_path) -> None:
    repo = "scgpt-org/sharded"
    model = build(ScGPTForPreTraining, small_config(tokenizer), seed=21)
    model_dir = save(model, tokenizer, tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in model_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (model_dir / "model.safetensors.index.json").is_file()

    first = hub.push(model_dir, repo, token=WRITE)
    n_commits = local_hub.state.commit_count(repo)
    again = hub.push(model_dir, repo, token=WRITE)
    assert again.oid == first.oid == head(repo)
    assert local_hub.state.commit_count(repo) == n_commits
    assert len(HfApi().list_repo_commits(repo)) == n_commits

    files = {s.rfilename for s in HfApi().model_info(repo).siblings}
    assert set(shards) | {"model.safetensors.index.json"} <= files and "model.safetensors" not in files
    pulled = ScGPTForPreTraining.from_pretrained(repo)
    assert_same_weights(state(pulled), state(model))

    # Re-saved unsharded: one commit that replaces the shards (no stale shard left behind).
    single_dir = save(model, tokenizer, tmp_path / "single")
    third = hub.push(single_dir, repo, token=WRITE)
    assert third.oid != first.oid
    files = {s.rfilename for s in HfApi().model_info(repo).siblings}
    assert "model.safetensors" in files and not (set(shards) | {"model.safetensors.index.json"}) & files
    assert_same_weights(state(ScGPTForPreTraining.from_pretrained(repo)), state(model))


def _fine_tune(model: ScGPTForCellClassification, batch: dict, labels: torch.Tensor, steps: int) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def test_finetuned_card_names_base_model_and_measured_metrics(local_hub, tokenizer, wu2020_adata, tmp_path) -> None:
    """A cell-type annotation model fine-tuned (briefly) on wu2020 from a pushed backbone: its card names the base
    model, reports exactly the metrics measured on held-out cells, and passes the Hub's metadata validation."""
    base_repo = "scgpt-org/annotation-base"
    base = build(ScGPTForPreTraining, small_config(tokenizer), seed=31)
    hub.push(save(base, tokenizer, tmp_path / "base"), base_repo, token=WRITE)

    cells = wu2020_adata[:160].copy()
    names = sorted(cells.obs["cluster_orig"].astype(str).unique())
    label_ids = torch.tensor([names.index(str(x)) for x in cells.obs["cluster_orig"]])
    config = small_config(tokenizer, num_labels=len(names), id2label=dict(enumerate(names)),
                          label2id={n: i for i, n in enumerate(names)})
    model = ScGPTForCellClassification.from_pretrained(base_repo, config=config, train_new_weights=True).eval()
    enc = tokenizer(cells, padding=True, return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "values", "attention_mask")}
    train, test = slice(0, 120), slice(120, 160)
    _fine_tune(model, {k: v[train] for k, v in batch.items()}, label_ids[train], steps=15)
    with torch.no_grad():
        pred = model(**{k: v[test] for k, v in batch.items()}).logits.argmax(-1)
    truth = label_ids[test]
    accuracy = float((pred == truth).float().mean())
    f1s = []
    for c in truth.unique():
        tp = float(((pred == c) & (truth == c)).sum())
        precision = tp / max(float((pred == c).sum()), 1.0)
        recall = tp / float((truth == c).sum())
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    macro_f1 = float(np.mean(f1s))
    metrics = {
        "base_model": base_repo,
        "model_name": "scGPT T-cell subtype annotation (wu2020, test)",
        "training": {"data": "scirpy's wu2020 T cells: 120 cells, 16 `cluster_orig` subtypes",
                     "procedure": "full fine-tuning with cross-entropy, Adam", "hyperparameters":
                     {"steps": 15, "learning_rate": 3e-3, "batch_size": 120}},
        "evaluations": [{
            "task": {"type": "cell-type-annotation", "name": "Cell-type annotation"},
            "dataset": {"name": "wu2020 T cells (held out)", "type": "scirpy/wu2020", "split": "test", "n_cells": 40},
            "metrics": [{"type": "accuracy", "name": "Accuracy", "value": accuracy},
                        {"type": "f1", "name": "Macro F1", "value": macro_f1, "args": {"average": "macro"}}],
        }],
    }
    repo = "scgpt-org/annotation"
    hub.push(save(model, tokenizer, tmp_path / "annotation", metrics=metrics), repo, token=WRITE)

    card = ModelCard.load(repo)
    card.validate()  # the Hub's metadata validation (POST /api/validate-yaml)
    assert card.data.base_model == base_repo
    assert card.data.pipeline_tag == "tabular-classification" and card.data.license == "mit"
    assert {"single-cell", "scRNA-seq", "scgpt"} <= set(card.data.tags)
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == metrics["model_name"]
    assert {(r.metric_type, r.metric_value) for r in results} == {("accuracy", accuracy), ("f1", macro_f1)}
    assert all(r.dataset_type == "scirpy/wu2020" and r.task_type == "cell-type-annotation" for r in results)
    text = card.text
    for section in ("## Intended use", "## Preprocessing contract", "## How to use", "## Training data and procedure",
                    "## Evaluation results", "## Limitations", "## Citation"):
        assert section in text
    assert f"| Accuracy | {accuracy:.4g} |" in text and f"| Macro F1 | {macro_f1:.4g} |" in text
    assert "AutoModelForSequenceClassification" in text and "Nature Methods" in text
    assert f"{len(tokenizer.get_vocab())} tokens" in text and "gene **symbols**" in text
    assert all(f"`{n}`" in text for n in names)
    # The fine-tuned weights came back.
    pulled = ScGPTForCellClassification.from_pretrained(repo)
    assert_same_weights(state(pulled), state(model))

    # The backbone's card has no model-index (nothing measured) and says so.
    base_card = ModelCard.load(base_repo)
    base_card.validate()
    assert "model-index" not in base_card.data.to_dict() and base_card.data.base_model is None
    assert "No evaluation was recorded" in base_card.text and "Not recorded with this model" in base_card.text
    # A broken model-index fails both the client's parsing and the Hub's validation.
    with pytest.raises(ValueError, match="model_index"):
        ModelCard(str(card).replace("type: accuracy", "typo: accuracy", 1))
    broken = ModelCard(re.sub(r"value: [0-9.e-]+", "value: [0.5, 0.7]", str(card), count=1))
    with pytest.raises(ValueError, match="must be a number"):
        broken.validate()


def test_with_onnx_uploads_export_to_onnx_folder(local_hub, tokenizer, tmp_path) -> None:
    pytest.importorskip("onnxscript")
    from scgpt_hf.export import export_onnx

    model = build(ScGPTModel, small_config(tokenizer), seed=41)
    model_dir = save(model, tokenizer, tmp_path / "m")
    report = export_onnx(model_dir, model_dir / "onnx", task="embedding", verbose=False)
    assert report.passed
    repo = "scgpt-org/with-onnx"
    assert hub.main(["push", str(model_dir), repo, "--with-onnx", "--private", "--token", WRITE]) == 0
    api = HfApi(token=WRITE)
    info = api.model_info(repo)
    assert info.private
    files = {s.rfilename for s in info.siblings}
    assert {"onnx/model.onnx", "onnx/export_report.json", "model.safetensors"} <= files
    local = hashlib.sha256((model_dir / "onnx" / "model.onnx").read_bytes()).hexdigest()
    remote = hashlib.sha256(Path(hf_hub_download(repo, "onnx/model.onnx", token=WRITE)).read_bytes()).hexdigest()
    assert local == remote
    text = ModelCard.load(repo, token=WRITE).text
    assert "### ONNX export" in text and "validation against PyTorch passed" in text
    first_case = report.validation["cases"][0]
    figure = next(iter(first_case["outputs"].values()))["max_abs_diff"]
    assert f"{figure:.2e}" in text
    # A plain push (no --with-onnx) leaves the onnx folder alone and adds nothing new.
    before = head(repo)
    hub.push(model_dir, repo, token=WRITE)
    assert "onnx/model.onnx" in {s.rfilename for s in api.model_info(repo).siblings}
    assert head(repo) != before  # the card without the ONNX section differs


def _push_failure(argv: list[str], capsys) -> str:  # type: ignore[no-untyped-def]
    """`scgpt-hf push` fails the CLI's way: exit code 2 and one line on stderr, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        hub.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("scgpt-hf push: error: "), err
    return err


def test_clear_errors_missing_repo_revision_and_bad_tokens(local_hub, tokenizer, tmp_path, capsys) -> None:
    model_dir = save(build(ScGPTModel, small_config(tokenizer), seed=51), tokenizer, tmp_path / "m")
    hub.push(model_dir, "scgpt-org/errors", token=WRITE)

    with pytest.raises(OSError, match="scgpt-org/no-such-model.*(not a valid model identifier|Repository Not Found)"):
        AutoModel.from_pretrained("scgpt-org/no-such-model")
    with pytest.raises(OSError, match="no-such-branch.*not a valid git identifier"):
        AutoModel.from_pretrained("scgpt-org/errors", revision="no-such-branch")
    with pytest.raises(OSError, match="(?s)401|[Ii]nvalid credentials|token"):
        AutoModel.from_pretrained("scgpt-org/errors", token="hf_not_a_valid_token")

    with pytest.raises(hub.HubPushError, match="rejected the token"):
        hub.push(model_dir, "scgpt-org/errors", token="hf_not_a_valid_token")
    with pytest.raises(hub.HubPushError, match="not allowed to write"):
        hub.push(model_dir, "scgpt-org/errors-readonly", token=READ)
    assert "rejected the token" in _push_failure(
        ["push", str(model_dir), "scgpt-org/errors", "--token", "hf_not_a_valid_token"], capsys)

    # A private repository is invisible without a token.
    hub.push(model_dir, "scgpt-org/private", token=WRITE, private=True)
    with pytest.raises(OSError, match="scgpt-org/private"):
        AutoModel.from_pretrained("scgpt-org/private")
    assert type(AutoModel.from_pretrained("scgpt-org/private", token=READ)) is ScGPTModel

    # Safety and folder checks happen before anything is sent.
    (model_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(hub.HubPushError, match="pickle"):
        hub.push(model_dir, "scgpt-org/errors", token=WRITE)
    (model_dir / "pytorch_model.bin").unlink()
    with pytest.raises(hub.HubPushError, match="ORG/NAME"):
        hub.push(model_dir, "no-namespace", token=WRITE)
    with pytest.raises(hub.HubPushError, match="no .onnx graph"):
        hub.push(model_dir, "scgpt-org/errors", token=WRITE, with_onnx=True)
    (model_dir / "vocab.json").unlink()
    with pytest.raises(hub.HubPushError, match="tokenizer"):
        hub.push(model_dir, "scgpt-org/errors", token=WRITE)
    assert "no config.json" in _push_failure(["push", str(tmp_path), "scgpt-org/errors", "--token", WRITE], capsys)


def test_remote_code_imports_only_allowed_modules(tmp_path) -> None:
    files = hub.remote_code_files()
    assert {f.name for f in files} >= {"configuration_scgpt.py", "modeling_scgpt.py", "tokenization_scgpt.py"}
    hub.check_remote_code(files)
    bad = tmp_path / "modeling_bad.py"
    bad.write_text("import anndata\nimport torch\n")
    with pytest.raises(hub.HubPushError, match="anndata"):
        hub.check_remote_code([*files, bad])


def test_every_card_template_renders_and_validates(local_hub, tokenizer, tmp_path) -> None:
    """Each head's template renders from a saved model (no undefined values, no placeholder numbers)."""
    config = small_config(tokenizer, num_labels=2, id2label={0: "T", 1: "B"}, label2id={"T": 0, "B": 1})
    model_dir = save(build(ScGPTModel, config, seed=61), tokenizer, tmp_path / "m")
    for template in hub.CARD_TEMPLATES:
        card = hub.render_card(model_dir, f"scgpt-org/{template}", template=template,
                               metrics={"example_perturbation": ["CD3E"]})
        card.validate()
        assert "{{" not in card.text and "## Preprocessing contract" in card.text
        assert re.search(r"\bTODO\b|XX\.X|0\.00 M", card.text) is None


PERTURBATION_PULL = """
import json, sys
import numpy as np
import torch
from transformers.dynamic_module_utils import get_class_from_dynamic_module

spec = json.load(open(sys.argv[1]))
try:
    import scgpt_hf  # noqa: F401
    raise SystemExit("scgpt_hf must not be importable here")
except ImportError:
    pass
model_class = get_class_from_dynamic_module("modeling_scgpt.ScGPTForPerturbationPrediction", spec["repo"])
model = model_class.from_pretrained(spec["repo"]).eval()
inputs = {k: torch.from_numpy(v) for k, v in np.load(spec["inputs"]).items()}
with torch.no_grad():
    out = model(**inputs)
np.save(spec["output"], out.expression.numpy())
"""


def test_head_without_auto_class_pulls_through_its_own_code(local_hub, tokenizer, adata, tmp_path) -> None:
    """A perturbation model (no Auto class fits it) loads from its repository's code, as its card shows."""
    model = build(ScGPTForPerturbationPrediction, small_config(tokenizer, use_perturbation_flags=True), seed=7)
    model_dir = save(model, tokenizer, tmp_path / "perturbation", metrics={"example_perturbation": ["CD3E"]})
    hub.push(model_dir, "scgpt-org/perturbation", token=WRITE)
    card = ModelCard.load("scgpt-org/perturbation")
    assert 'get_class_from_dynamic_module("modeling_scgpt.ScGPTForPerturbationPrediction"' in card.text
    assert "perturbation_flags=flags" in card.text
    enc = tokenizer(adata[:6], padding=True, return_tensors="np")
    flags = np.where(enc["attention_mask"] == 1, (np.arange(enc["input_ids"].shape[1]) % 4 == 1), 2).astype(np.int64)
    inputs = {k: enc[k] for k in ("input_ids", "values", "attention_mask")} | {"perturbation_flags": flags}
    np.savez(tmp_path / "inputs.npz", **inputs)
    spec = {"repo": "scgpt-org/perturbation", "inputs": str(tmp_path / "inputs.npz"),
            "output": str(tmp_path / "expression.npy")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_isolated(PERTURBATION_PULL, tmp_path, str(tmp_path / "spec.json"))
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).expression.numpy()
    mask = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.load(tmp_path / "expression.npy")[mask], want[mask], atol=1e-6)
