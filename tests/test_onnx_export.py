"""ONNX export (issue 4): every task exports, ONNX Runtime matches PyTorch, precisions stay in bounds,
metadata is present, and bad files or bad inputs give errors that say what is wrong and how to fix it.

Small models (d_model 32, 2 layers) on real wu2020 cells tokenised with a vocabulary of their most
frequently expressed genes, so everything runs in seconds on CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import reference  # noqa: E402
import scgpt_hf  # noqa: E402
from scgpt_hf import ScGPTConfig, ScGPTForPreTraining, ScGPTModel  # noqa: E402
from scgpt_hf.export import (  # noqa: E402
    ExportValidationError,
    OnnxInputError,
    OnnxModelError,
    OnnxScGPT,
    SelfCheckError,
    export_onnx,
    read_onnx_metadata,
    vocab_sha256,
)
from scgpt_hf.export import onnx_export, selfcheck  # noqa: E402
from scgpt_hf.tokenization_scgpt import ScGPTTokenizer  # noqa: E402

N_GENES = 600
MAX_LEN = 128  # config.max_seq_len: export validation never goes beyond this
EXPECTED_OUTPUTS = {
    "embedding": ["cell_embedding", "last_hidden_state"],
    "expression": ["expression", "zero_probs", "mvc_expression", "mvc_zero_probs", "cell_embedding"],
}


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, wu2020_adata):
    """A saved small ScGPTForPreTraining (random non-trivial weights) with a tokenizer of real gene symbols."""
    X = wu2020_adata.X.tocsc()
    frequent = np.argsort(-np.diff(X.indptr), kind="stable")[:N_GENES]
    vocab = reference.make_vocab(N_GENES, [str(g) for g in wu2020_adata.var_names[frequent]])
    out = tmp_path_factory.mktemp("small_model")
    (out / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = ScGPTTokenizer(vocab_file=str(out / "vocab.json"), max_length=MAX_LEN)
    config = ScGPTConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"], eoc_token_id=vocab["<eoc>"],
        max_seq_len=MAX_LEN, explicit_zero_prob=True, do_mvc=True,
    )
    model = ScGPTForPreTraining(config)
    reference.randomize_parameters(model, seed=3)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pretraining_model(model_dir):
    return ScGPTForPreTraining.from_pretrained(model_dir, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return ScGPTTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory):
    """Lazily exported graphs, one per (task, precision), from the saved folder (as the CLI does)."""
    cache: dict = {}

    def get(task: str, precision: str = "fp32"):
        if (task, precision) not in cache:
            out = tmp_path_factory.mktemp(f"onnx_{task}_{precision}") / "onnx"
            report = export_onnx(model_dir, out, task=task, precision=precision, verbose=False)
            cache[task, precision] = (out, report)
        return cache[task, precision]

    return get


@pytest.fixture(scope="module")
def long_cells(wu2020_adata, tokenizer):
    """Real cells tokenised without the export's length cap (up to N_GENES + 1 tokens)."""
    enc = tokenizer(wu2020_adata[:40], padding=False, return_tensors=None, max_length=N_GENES + 1, seed=0,
                    cls_value=-2.0)
    cells = [(np.asarray(i, np.int64), np.asarray(v, np.float32)) for i, v in zip(enc["input_ids"], enc["values"])]
    return sorted(cells, key=lambda c: len(c[0]))


def _torch_outputs(model, task, feed):
    target = model.scgpt if task == "embedding" else model
    with torch.no_grad():
        out = target(**{k: torch.from_numpy(v) for k, v in feed.items()}, return_dict=True)
    return {name: getattr(out, name).numpy() for name in EXPECTED_OUTPUTS[task]}


def _max_diff_real_tokens(name, a, b, mask):
    if name == "cell_embedding":
        return float(np.abs(a - b).max())
    keep = mask.astype(bool)
    return float(np.abs(a[keep] - b[keep]).max())


def _cosine_rows(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ----------------------------------------------------------------------------------------------
# Export of each task


@pytest.mark.parametrize("task", ["embedding", "expression"])
def test_each_task_exports_with_dynamic_axes_and_fusions(exports, task):
    out, report = exports(task)
    assert report.passed is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["onnx"]  # staged beside, renamed into place
    assert {"model.onnx", "selfcheck.npz", "export_report.json", "config.json", "vocab.json"} <= {
        p.name for p in out.iterdir()}
    model = onnx.load(out / "model.onnx")
    inputs = {vi.name: vi for vi in model.graph.input}
    assert list(inputs) == ["input_ids", "values", "attention_mask"]
    dtypes = {n: vi.type.tensor_type.elem_type for n, vi in inputs.items()}
    assert dtypes == {"input_ids": onnx.TensorProto.INT64, "values": onnx.TensorProto.FLOAT,
                      "attention_mask": onnx.TensorProto.INT64}
    for vi in model.graph.input:
        assert [d.dim_param for d in vi.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [vi.name for vi in model.graph.output] == EXPECTED_OUTPUTS[task]
    for vi in model.graph.output:
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        if vi.name != "cell_embedding":
            assert dims[1].dim_param == "sequence"
    # fused attention and layer norms: one MultiHeadAttention per layer, two SkipLayerNormalization per layer
    assert report.fused_ops.get("MultiHeadAttention") == 2
    assert report.fused_ops.get("SkipLayerNormalization") == 4
    assert "Softmax" not in report.op_counts  # no decomposed attention left
    # attention takes the 2-D padding mask, not the (batch, 1, L, L) bias the fusion builds from it
    assert report.attention_inputs == {"query, key, value, key_padding_mask": 2}
    assert {"GatherND", "Expand"}.isdisjoint(report.op_counts)
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["passed"] is True and saved["sha256"] == report.sha256
    assert saved["attention_inputs"] == report.attention_inputs
    cases = saved["validation"]["cases"]
    assert len(cases) >= 2 and len({(c["batch"], c["length"]) for c in cases}) >= 2
    assert any(c["padded_tokens"] > 0 for c in cases)
    assert saved["validation"]["data"].startswith("scirpy wu2020")
    for case in cases:
        for figures in case["outputs"].values():
            assert figures["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("task", ["embedding", "expression"])
def test_ort_matches_pytorch_at_many_shapes(exports, pretraining_model, long_cells, task):
    out, _ = exports(task)
    session = OnnxScGPT(out)
    pad_id, pad_value = session.preprocessing["pad_token_id"], session.preprocessing["pad_value"]
    longest = long_cells[-1]
    assert len(longest[0]) > MAX_LEN + 100, "need a cell longer than anything seen during export and validation"
    mixed = [long_cells[0], long_cells[len(long_cells) // 2], longest, long_cells[3], long_cells[-5]]
    batches = {
        "batch 1, short": [long_cells[0]],
        "batch 1, longer than export": [longest],
        "padded batch of 5": mixed,
        "batch 2, truncated to 7": long_cells[10:12],
    }
    for label, cells in batches.items():
        feed = onnx_export.graph_feed(cells, pad_id, pad_value, max_length=7 if "truncated" in label else None)
        got = session(feed)
        ref = _torch_outputs(pretraining_model, task, feed)
        for name in EXPECTED_OUTPUTS[task]:
            assert got[name].shape == ref[name].shape, (label, name)
            diff = _max_diff_real_tokens(name, got[name], ref[name], feed["attention_mask"])
            assert diff <= 1e-4, f"{label}: {name} differs by {diff}"
    # padding invariance inside the graph: a padded row equals the cell run alone
    feed = onnx_export.graph_feed(mixed, pad_id, pad_value)
    assert (feed["attention_mask"] == 0).any()
    together = session(feed)
    alone = session(onnx_export.graph_feed([mixed[0]], pad_id, pad_value))
    np.testing.assert_allclose(together["cell_embedding"][0], alone["cell_embedding"][0], atol=1e-5)


@pytest.mark.parametrize("precision,bound", [("fp16", 0.999), ("int8", 0.99)])
@pytest.mark.parametrize("task", ["embedding", "expression"])
def test_reduced_precision_within_bounds(exports, pretraining_model, long_cells, task, precision, bound):
    out, report = exports(task, precision)
    fp32_out, fp32_report = exports(task, "fp32")
    assert report.passed is True
    for case in report.validation["cases"]:
        assert case["outputs"]["cell_embedding"]["min_cosine"] >= bound
    model = onnx.load(out / "model.onnx")
    if precision == "int8":
        ops = {n.op_type for n in model.graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
        assert report.file_size < fp32_report.file_size
        assert "DynamicQuantizeMatMul" in report.ort_session_ops or "MatMulIntegerToFloat" in report.ort_session_ops
        assert report.attention_inputs == {"query, key, value, key_padding_mask": 2}
        # 7-bit weights (|w| <= 64, one scale per output channel): a pair of uint8 x int8 products never leaves
        # 16 bits (2 x 255 x 64 < 32,767), so AVX2's saturating kernel computes what VNNI computes
        init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        matmuls = [n for n in model.graph.node if n.op_type == "MatMulInteger"]  # inputs A, B, A zero, B zero
        assert matmuls and all(init[n.input[1]].dtype == np.int8 for n in matmuls)
        assert max(int(np.abs(init[n.input[1]].astype(np.int32)).max()) for n in matmuls) <= 64
        assert all(init[n.input[3]].shape == init[n.input[1]].shape[1:] for n in matmuls)  # per output channel
    else:
        assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
        # CUDA's memory-efficient attention takes a bias but not a 2-D key padding mask
        assert report.attention_inputs == {"query, key, value, attention_bias": 2}
        # inputs and outputs stay float32 so clients feed the same arrays as for fp32
        assert [vi.type.tensor_type.elem_type for vi in model.graph.output] == [onnx.TensorProto.FLOAT] * len(
            EXPECTED_OUTPUTS[task])
    session = OnnxScGPT(out)
    assert session.precision == precision
    feed = onnx_export.graph_feed(long_cells[-8:], session.preprocessing["pad_token_id"],
                                 session.preprocessing["pad_value"])
    got = session(feed)["cell_embedding"]
    ref = _torch_outputs(pretraining_model, task, feed)["cell_embedding"]
    assert _cosine_rows(got, ref).min() >= bound
    assert np.abs(got - ref).max() > 1e-6  # it really is a different precision


def test_metadata_records_config_vocab_version_and_contract(exports, pretraining_model, tokenizer):
    out, report = exports("expression")
    meta = read_onnx_metadata(out / "model.onnx")
    config = pretraining_model.config
    assert meta["task"] == "expression" and meta["precision"] == "fp32"
    assert meta["version"] == scgpt_hf.__version__
    assert meta["opset"] == "18"
    model = onnx.load(out / "model.onnx", load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "n_bins", "pad_token_id", "cell_emb_style"):
        assert meta["config"][key] == getattr(config, key), key
    assert meta["vocab_sha256"] == vocab_sha256(tokenizer.get_vocab()) == report.vocab_sha256
    assert meta["vocab_sha256"] != vocab_sha256({**tokenizer.get_vocab(), "EXTRA": 10**6})
    contract = meta["preprocessing"]
    assert contract["n_bins"] == config.n_bins
    assert contract["pad_value"] == config.pad_value
    assert contract["pad_token_id"] == config.pad_token_id
    assert contract["cls_token_id"] == config.cls_token_id
    assert contract["max_length"] == MAX_LEN
    assert "cls_value" in contract
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "values", "attention_mask"]
    assert [o["name"] for o in meta["outputs"]] == EXPECTED_OUTPUTS["expression"]
    # the session wrapper exposes the same and checks a tokenizer's vocabulary against the hash
    session = OnnxScGPT(out)
    session.check_vocab(tokenizer.get_vocab())
    with pytest.raises(OnnxInputError, match="not the one this graph was exported with"):
        session.check_vocab({**tokenizer.get_vocab(), "EXTRA": 10**6})


# ----------------------------------------------------------------------------------------------
# Bad files


def test_truncated_and_corrupted_files_give_clear_errors(exports, tmp_path):
    out, _ = exports("embedding")
    data = (out / "model.onnx").read_bytes()

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxModelError, match="truncated or corrupted"):
        OnnxScGPT(alone / "model.onnx")
    with pytest.raises(OnnxModelError, match="truncated or corrupted"):
        read_onnx_metadata(alone / "model.onnx")
    (alone / "model.onnx").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(OnnxModelError, match="truncated or corrupted"):
        OnnxScGPT(alone)

    # beside its export report, a short file is named as truncated with the expected size
    beside = tmp_path / "beside"
    shutil.copytree(out, beside)
    (beside / "model.onnx").write_bytes(data[:-1000])
    with pytest.raises(OnnxModelError, match=f"export wrote {len(data)}"):
        OnnxScGPT(beside)
    # same size but altered bytes: the checksum catches it
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (beside / "model.onnx").write_bytes(bytes(flipped))
    with pytest.raises(OnnxModelError, match="sha256"):
        OnnxScGPT(beside)

    with pytest.raises(OnnxModelError, match="does not exist"):
        OnnxScGPT(tmp_path / "nowhere.onnx")
    with pytest.raises(OnnxModelError, match="holds no model.onnx"):
        OnnxScGPT(tmp_path)
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])), plain)
    with pytest.raises(OnnxModelError, match="not an scgpt-hf export"):
        OnnxScGPT(plain)


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_wrong_dtypes_and_shapes_give_clear_errors(exports, long_cells):
    out, _ = exports("embedding")
    session = OnnxScGPT(out)
    good = onnx_export.graph_feed(long_cells[:3], session.preprocessing["pad_token_id"],
                                 session.preprocessing["pad_value"])
    session(good)  # sanity: the good feed runs
    session(**{k: torch.from_numpy(v) for k, v in good.items()})  # torch tensors are accepted

    cases = [
        ({**good, "input_ids": good["input_ids"].astype(np.float32)}, r"'input_ids' must be int64, got float32"),
        ({**good, "input_ids": good["input_ids"].astype(np.int32)}, r"'input_ids' must be int64, got int32"),
        ({**good, "values": good["values"].astype(np.float64)}, r"'values' must be float32, got float64"),
        ({**good, "attention_mask": good["attention_mask"].astype(bool)}, r"'attention_mask' must be int64"),
        ({**good, "input_ids": good["input_ids"][0]}, r"must be 2-D"),
        ({**good, "values": good["values"][:, :-1]}, r"values must have the shape of input_ids"),
        ({**good, "attention_mask": good["attention_mask"][:2]}, r"attention_mask must have the shape"),
        ({k: v for k, v in good.items() if k != "attention_mask"}, r"Missing input\(s\) \['attention_mask'\]"),
        ({**good, "input_ids": good["input_ids"] + 10**6}, r"must lie in \[0, 603\)"),
        ({**good, "attention_mask": good["attention_mask"] * 2}, r"only 0 \(padding\) and 1"),
        ({k: v[:, :0] for k, v in good.items()}, r"Empty batch"),
    ]
    for feed, message in cases:
        with pytest.raises(OnnxInputError, match=message):
            session(feed)
    with pytest.raises(OnnxInputError, match=r"Unexpected input\(s\) \['batch_labels'\]"):
        session(good, batch_labels=np.zeros(3, np.int64))


def test_batch_label_models_take_batch_labels(tmp_path):
    vocab = reference.make_vocab(40)
    config = ScGPTConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, pad_token_id=40, cls_token_id=41, eoc_token_id=42, max_seq_len=32,
                         use_batch_labels=True, num_batch_labels=3)
    model = ScGPTForPreTraining(config)
    reference.randomize_parameters(model, seed=1)
    model.eval()
    report = export_onnx(model, tmp_path / "onnx", task="expression", vocab=vocab, verbose=False)
    assert report.passed and report.validation["data"] == "synthetic cells"
    assert [i["name"] for i in report.inputs] == ["input_ids", "values", "attention_mask", "batch_labels"]
    session = OnnxScGPT(tmp_path / "onnx")
    assert session.self_check_result["passed"] is True  # its stored cells carry batch labels too
    cells = onnx_export._synthetic_cells(config, 3, seed=5)
    feed = onnx_export.graph_feed(cells, config.pad_token_id, config.pad_value)
    labels = np.array([0, 2, 1], np.int64)
    got = session(feed, batch_labels=labels)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}, batch_labels=torch.from_numpy(labels))
    keep = feed["attention_mask"].astype(bool)
    assert np.abs(got["expression"][keep] - ref.expression.numpy()[keep]).max() <= 1e-4
    # batch labels change the output (the input is really used)
    other = session(feed, batch_labels=np.array([1, 0, 2], np.int64))
    assert np.abs(other["expression"][keep] - got["expression"][keep]).max() > 1e-3
    with pytest.raises(OnnxInputError, match="Missing input.*batch_labels.*one integer batch id per cell"):
        session(feed)
    with pytest.raises(OnnxInputError, match=r"batch_labels must have shape \(3,\)"):
        session(feed, batch_labels=np.zeros((3, 1), np.int64))
    with pytest.raises(OnnxInputError, match=r"batch_labels must lie in \[0, 3\)"):
        session(feed, batch_labels=np.array([0, 1, 3], np.int64))
    # the model object is left as it was (its range check still works in PyTorch)
    with pytest.raises(ValueError, match="batch_labels must lie"):
        model(**{k: torch.from_numpy(v) for k, v in feed.items()}, batch_labels=torch.tensor([0, 1, 5]))


# ----------------------------------------------------------------------------------------------
# Failure of validation, argument errors, CLI


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_validation_leaves_the_previous_export_as_it_was(exports, pretraining_model, tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    shutil.copytree(exports("embedding")[0], out)
    before = _snapshot(out)
    monkeypatch.setattr(selfcheck, "FP32_MAX_ABS", -1.0)  # no graph can meet this
    with pytest.raises(ExportValidationError, match="beyond the fp32 bound") as info:
        export_onnx(pretraining_model, out, task="embedding", overwrite=True, verbose=False)
    assert "\n" not in str(info.value) and "nothing was written" in str(info.value)
    assert info.value.report.passed is False and info.value.report.validation["cases"]
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]


def test_existing_output_refused_before_any_work(tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists: pass --overwrite"):
        export_onnx(tmp_path / "no_such_model", out)  # the model is never looked at
    assert _snapshot(out) == {"keep.txt": b"mine"}


def test_bad_arguments(pretraining_model, tmp_path):
    tmp_path = tmp_path / "out"
    with pytest.raises(ValueError, match="Unknown task 'annotationx'"):
        export_onnx(pretraining_model, tmp_path, task="annotationx")
    with pytest.raises(ValueError, match="Unknown precision 'int4'"):
        export_onnx(pretraining_model, tmp_path, precision="int4")
    with pytest.raises(ValueError, match="opset 17 is too old"):
        export_onnx(pretraining_model, tmp_path, opset=17)
    with pytest.raises(TypeError, match="exports ScGPTForPreTraining; got ScGPTModel"):
        export_onnx(pretraining_model.scgpt, tmp_path, task="expression")
    bare = ScGPTModel(ScGPTConfig(vocab_size=43, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=32, pad_token_id=40, cls_token_id=41, eoc_token_id=42))
    with pytest.raises(ValueError, match="No gene vocabulary found"):
        export_onnx(bare, tmp_path, task="embedding")
    dsbn = ScGPTConfig(vocab_size=43, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=32, pad_token_id=40, cls_token_id=41, eoc_token_id=42,
                       domain_spec_batchnorm="dsbn", num_batch_labels=2)
    with pytest.raises(NotImplementedError, match="domain-specific batch norm"):
        export_onnx(ScGPTModel(dsbn), tmp_path, vocab=reference.make_vocab(40))


def test_key_padding_mask_replaces_only_biases_built_from_attention_mask():
    """A bias that depends on another input (not provably key padding) is left to MultiHeadAttention as is."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    def graph(scale):  # bias (batch, 1, 1, S) = (attention_mask - 1) * scale
        nodes = [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
                 helper.make_node("Unsqueeze", ["m", "axes"], ["m4"]),
                 helper.make_node("Sub", ["m4", "one"], ["padded"]),
                 helper.make_node("Mul", ["padded", scale], ["bias"]),
                 helper.make_node("MultiHeadAttention", ["q", "q", "q", "", "", "bias"], ["out"], num_heads=2,
                                  domain="com.microsoft")]
        inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "S", 4]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"]),
                  helper.make_tensor_value_info("other", TensorProto.FLOAT, ["B", 1, 1, "S"])]
        axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
        constants = [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
                     helper.make_tensor("big", TensorProto.FLOAT, [], [1e4])]
        g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=[axes, *constants])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
        return ir.serde.deserialize_model(model)

    padding_only = graph("big")
    assert onnx_export._use_key_padding_mask(padding_only) == 1
    assert onnx_export._attention_inputs(ir.serde.serialize_model(padding_only)) == {
        "query, key, value, key_padding_mask": 1}
    other = graph("other")
    assert onnx_export._use_key_padding_mask(other) == 0
    assert onnx_export._attention_inputs(ir.serde.serialize_model(other)) == {"query, key, value, attention_bias": 1}


def _cli(argv: list[str]) -> int:
    """`scgpt-hf ARGV` in this process; its exit code."""
    from scgpt_hf.cli import main

    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_cli_exports_and_reports(model_dir, tmp_path, capsys):
    out = tmp_path / "cli_out"
    rc = _cli(["export", "onnx", str(model_dir), str(out), "--task", "expression", "--precision", "int8",
               "--validation-shape", "2x0", "--validation-shape", "3x20"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MultiHeadAttention x2" in printed and "SkipLayerNormalization x4" in printed
    assert "MultiHeadAttention(query, key, value, key_padding_mask) x2" in printed  # kept through int8
    assert "validation PASSED" in printed
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["precision"] == "int8" and saved["task"] == "expression"
    assert [(c["batch"], c["length"] <= 20) for c in saved["validation"]["cases"]][1] == (3, True)
    assert (out / "config.json").is_file() and (out / "vocab.json").is_file()


def test_cli_failures_are_one_line_with_exit_code_2(model_dir, exports, tmp_path, capsys, monkeypatch):
    """Every failure of `scgpt-hf export onnx` is exit code 2 and one line naming the problem and the fix."""
    existing = tmp_path / "existing"
    shutil.copytree(exports("embedding")[0], existing)
    before = _snapshot(existing)
    dsbn = tmp_path / "dsbn"
    ScGPTModel(ScGPTConfig(vocab_size=43, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=8, pad_token_id=40, cls_token_id=41, eoc_token_id=42,
                           domain_spec_batchnorm="dsbn", num_batch_labels=2)).save_pretrained(dsbn)
    cases = [
        ([str(model_dir), str(existing)], "already exists: pass --overwrite"),
        ([str(model_dir), str(tmp_path / "a"), "--validation-shape", "abc"], "must look like 4x128 (BATCHxLEN)"),
        ([str(model_dir), str(tmp_path / "a"), "--task", "nope"], "invalid choice: 'nope'"),
        ([str(tmp_path / "no" / "model"), str(tmp_path / "a")], "does not exist"),
        ([str(dsbn), str(tmp_path / "a")], "domain-specific batch norm"),
    ]
    for args, message in cases:
        assert _cli(["export", "onnx", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    # validation failing: one line, and the previous export is left as it was
    monkeypatch.setattr(selfcheck, "FP32_MAX_ABS", -1.0)
    assert _cli(["export", "onnx", str(model_dir), str(existing), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scgpt-hf export onnx: error: ONNX Runtime disagrees with PyTorch beyond the fp32 bound")
    assert err.count("\n") == 1
    assert _snapshot(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dsbn", "existing"]


def _export_head(model_dir, tmp_path, head_class, task, seed, **config_changes):
    """A head with random weights over the small model's config and tokenizer, exported for `task`."""
    model = head_class(ScGPTConfig.from_pretrained(model_dir, **config_changes))
    reference.randomize_parameters(model, seed=seed)
    model.eval().save_pretrained(tmp_path / "head")
    for name in ("vocab.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / "head" / name)
    report = export_onnx(tmp_path / "head", tmp_path / "onnx", task=task, verbose=False)
    assert report.passed is True
    return model, OnnxScGPT(tmp_path / "onnx")


@pytest.mark.parametrize("task", ["annotation", "integration"])
def test_head_tasks_export_and_match_pytorch(model_dir, long_cells, tmp_path, task):
    """The fine-tuning heads export too: classifier logits; integrated embedding and discriminator logits."""
    head_class = scgpt_hf.ScGPTForCellClassification if task == "annotation" else scgpt_hf.ScGPTForBatchIntegration
    extra = dict(num_labels=5) if task == "annotation" else dict(use_batch_labels=True, num_batch_labels=3, do_dab=True)
    model, session = _export_head(model_dir, tmp_path, head_class, task, seed=5, **extra)
    feed = onnx_export.graph_feed(long_cells[:4], session.preprocessing["pad_token_id"], session.preprocessing["pad_value"])
    if task == "integration":
        feed["batch_labels"] = np.array([0, 2, 1, 2], dtype=np.int64)
    got = session(feed)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    names = ["logits", "cell_embedding"] if task == "annotation" else ["cell_embedding", "batch_logits"]
    for name in names:
        np.testing.assert_allclose(got[name], getattr(ref, name).numpy(), atol=1e-4)


@pytest.mark.parametrize("task", ["perturbation", "multiomic"])
def test_token_input_heads_export_and_match_pytorch(model_dir, long_cells, tmp_path, task):
    """Heads with a per-token integer input (perturbation flags, modality ids) export and match PyTorch."""
    if task == "perturbation":
        head_class, extra = scgpt_hf.ScGPTForPerturbationPrediction, dict(use_perturbation_flags=True)
    else:
        head_class = scgpt_hf.ScGPTForMultiOmicIntegration
        extra = dict(use_modality_embeddings=True, modality_vocab={"RNA": 0, "ATAC": 1, "<pad>": 2},
                     use_batch_labels=True, num_batch_labels=2, do_dab=True)
    model, session = _export_head(model_dir, tmp_path, head_class, task, seed=6, **extra)
    feed = onnx_export.graph_feed(long_cells[:3], session.preprocessing["pad_token_id"], session.preprocessing["pad_value"])
    for name in onnx_export.PER_TOKEN_INPUTS:
        if name in session.input_names:
            feed[name] = onnx_export._token_ids_for(name, feed["attention_mask"], model.config)
    if "batch_labels" in session.input_names:
        feed["batch_labels"] = np.array([0, 1, 1], dtype=np.int64)
    got = session(feed)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    real = feed["attention_mask"].astype(bool)
    for name in session.output_names:
        expected = getattr(ref, name).numpy()
        if expected.ndim == 2 and expected.shape == real.shape:
            np.testing.assert_allclose(got[name][real], expected[real], atol=1e-4)
        else:
            np.testing.assert_allclose(got[name], expected, atol=1e-4)
    with pytest.raises(OnnxInputError, match="must have the shape of input_ids"):
        bad = dict(feed)
        bad[onnx_export.PER_TOKEN_INPUTS[0] if task == "perturbation" else "modality_ids"] = \
            np.zeros((3, 2), dtype=np.int64)
        session(bad)


# ----------------------------------------------------------------------------------------------
# Self-check at load, padding, atomic output


def test_every_load_runs_the_self_check(exports, tmp_path, monkeypatch):
    """The export stores a few real cells and PyTorch's outputs for them; every load holds the graph to its bound
    on them and refuses a host that computes outside it (or, when asked, warns)."""
    out, _ = exports("embedding", "int8")
    result = OnnxScGPT(out).self_check_result
    assert result["passed"] is True and result["outputs"]["cell_embedding"]["min_cosine"] >= 0.99
    with np.load(out / "selfcheck.npz", allow_pickle=False) as stored:
        assert set(stored.files) == {"input.input_ids", "input.values", "input.attention_mask",
                                     "output.cell_embedding", "output.last_hidden_state"}
        mask = stored["input.attention_mask"]
    assert mask.shape == (4, 32) and mask.sum(1).tolist() == [32, 24, 16, 8]  # real cells, padded
    assert read_onnx_metadata(out)["selfcheck_sha256"] == selfcheck.sha256(out / "selfcheck.npz")

    monkeypatch.setitem(selfcheck.MIN_COSINE, "int8", 1.01)  # as a host computing outside the bound looks
    with pytest.raises(SelfCheckError, match=r"computes the int8 graph outside its bound.*CPU features.*"
                                             r"self_check='warn'"):
        OnnxScGPT(out)
    with pytest.warns(UserWarning, match="outside its bound"):
        assert OnnxScGPT(out, self_check="warn").self_check_result["passed"] is False
    monkeypatch.undo()

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "selfcheck.npz").unlink()
    with pytest.raises(SelfCheckError, match="selfcheck.npz is missing.*Copy it together with model.onnx"):
        OnnxScGPT(copy)
    shutil.copy(exports("expression")[0] / "selfcheck.npz", copy / "selfcheck.npz")
    with pytest.raises(SelfCheckError, match="not the self-check reference this graph was exported with"):
        OnnxScGPT(copy)
    graph = onnx.load(copy / "model.onnx")  # as exported before the self-check existed
    graph.metadata_props.remove(next(p for p in graph.metadata_props if p.key == selfcheck.METADATA_KEY))
    onnx.save(graph, copy / "model.onnx")
    with pytest.raises(SelfCheckError, match="exported without a self-check reference.*Re-export it"):
        OnnxScGPT(copy, verify_checksum=False)
    with pytest.warns(UserWarning, match="exported without a self-check reference"):
        OnnxScGPT(copy, verify_checksum=False, self_check="warn")


def test_padding_never_reaches_the_graph_and_empty_cells_are_refused(exports, long_cells):
    """A cell's outputs do not depend on what sits in its padding (NaN values, other ids); a cell without an
    unmasked token has no output and is refused."""
    out, _ = exports("expression")
    session = OnnxScGPT(out)
    pp = session.preprocessing
    feed = onnx_export.graph_feed([long_cells[0], long_cells[20], long_cells[5]], pp["pad_token_id"],
                                 pp["pad_value"], max_length=MAX_LEN)
    pad = feed["attention_mask"] == 0
    assert pad.sum(1).min() == 0 and pad.any()
    clean = session(feed)
    dirty = session({**feed, "values": np.where(pad, np.nan, feed["values"]).astype(np.float32),
                     "input_ids": np.where(pad, 7, feed["input_ids"])})
    for name, want in clean.items():
        keep = slice(None) if name in selfcheck.PER_CELL_OUTPUTS else ~pad
        np.testing.assert_allclose(dirty[name][keep], want[keep], atol=1e-6, err_msg=name)
    empty = {**feed, "attention_mask": feed["attention_mask"].copy()}
    empty["attention_mask"][1] = 0
    with pytest.raises(OnnxInputError, match=r"Cell\(s\) \[1\] have no unmasked token.*at least its <cls> token"):
        session(empty)


def test_kill_during_export_leaves_previous_output_or_the_new_one_whole(tmp_path):
    """SIGKILL `scgpt-hf export onnx --overwrite` (a forked real process, the CLI's kill harness) when its location
    is checked (before any work), halfway through its write and once the new folder is in place: the previous
    output stays byte for byte until the new one is complete, and nothing half-written is left beside it."""
    from test_cli import _kill_at, _state

    from scgpt_hf import atomic

    vocab = reference.make_vocab(20)  # a tiny model on synthetic cells: each kill exports again
    ScGPTModel(ScGPTConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=8, pad_token_id=20, cls_token_id=21, eoc_token_id=22,
                           max_seq_len=16)).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "vocab.json").write_text(json.dumps(vocab))
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export" * 1000)
    (out / "export_report.json").write_text('{"earlier": true}')
    previous = _state(out)
    argv = ["export", "onnx", str(tmp_path / "model"), str(out), "--no-validate", "--no-optimize", "--overwrite",
            "--quiet"]
    for moment in ("checked", "writing", "committed"):
        assert _kill_at(argv, moment), f"export never reached {moment!r}"
        atomic.recover(out)  # what the next run does first
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "onnx"], f"leftovers after {moment!r}"
        if moment != "committed":
            assert _state(out) == previous, f"killed at {moment!r}, the previous export changed"
    report = json.loads((out / "export_report.json").read_text())  # killed once in place: the new one, whole
    assert report["sha256"] == selfcheck.sha256(out / "model.onnx")
    assert OnnxScGPT(out).self_check_result["passed"] is True
