"""The device loop shared by `embed`, `annotate` and the served PyTorch encoder (scgpt_hf.inference), on CPU.

What a GPU adds (bf16 speed, no host-device synchronisation) is measured by bench/gpu/run.sh; here: the
forward never reads a tensor's values off the CPU (checked on the meta device, where any read raises),
batches keep their cells' results and order, and the precision choices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scgpt_hf import ScGPTConfig, ScGPTForCellClassification, ScGPTModel, embed
from scgpt_hf.inference import autocast_dtype, length_groups, precision_name, run_cells

VOCAB = 40


def _config(**overrides) -> ScGPTConfig:
    values = dict(vocab_size=VOCAB, pad_token_id=VOCAB - 3, cls_token_id=VOCAB - 2, eoc_token_id=VOCAB - 1,
                  hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    values.update(overrides)
    return ScGPTConfig(**values)


def _cells(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids, vals = [], []
    for _ in range(n):
        k = int(rng.integers(1, 12))
        ids.append(np.concatenate(([VOCAB - 2], rng.choice(VOCAB - 3, k, replace=False))).astype(np.int64))
        vals.append(np.concatenate(([-2.0], rng.integers(1, 51, k))).astype(np.float32))
    return ids, vals


@pytest.mark.parametrize("model_class", [ScGPTModel, ScGPTForCellClassification])
@pytest.mark.parametrize("with_batches", [False, True], ids=["plain", "batch-labels"])
def test_forward_never_reads_tensors_off_the_cpu(model_class, with_batches):
    """On an accelerator, any value read (`.item()`, `bool(t)`, `.all()` in an `if`) makes the host wait for the
    device; on the meta device the same read raises, so a forward that completes there reads nothing."""
    extra = dict(use_batch_labels=True, batch2id={"a": 0, "b": 1}) if with_batches else {}
    model = model_class(_config(num_labels=3, **extra)).eval().to("meta")
    ids, vals = _cells(3)
    ids[2], vals[2] = ids[2][:1], vals[2][:1]  # <cls> alone: padded
    width = max(map(len, ids))
    pid = torch.full((3, width), VOCAB - 3)
    pval = torch.full((3, width), -2.0)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, (a, b) in enumerate(zip(ids, vals)):
        pid[i, : len(a)], pval[i, : len(b)], mask[i, : len(a)] = torch.from_numpy(a), torch.from_numpy(b), 1
    assert (mask == 0).any(), "the batch must hold padding"
    with torch.inference_mode():
        batches = {"batch_labels": torch.tensor([0, 1, 0], device="meta")} if with_batches else {}
        out = model(input_ids=pid.to("meta"), values=pval.to("meta"), attention_mask=mask.to("meta"), **batches)
    assert out.cell_embedding.shape == (3, 32)


def test_run_cells_matches_one_cell_at_a_time():
    torch.manual_seed(0)
    model = ScGPTModel(_config()).eval()
    ids, vals = _cells(23)
    got = run_cells(model, ids, vals, predict=lambda o: o.cell_embedding, batch_size=5, max_tokens=24,
                    pad_id=VOCAB - 3, pad_value=-2.0, device=torch.device("cpu"), dtype=None)
    with torch.inference_mode():
        want = np.stack([model(input_ids=torch.from_numpy(i)[None], values=torch.from_numpy(v)[None])
                         .cell_embedding[0].numpy() for i, v in zip(ids, vals)])
    assert got.shape == (23, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_length_groups_respect_cells_and_tokens():
    lengths = np.array([3, 10, 7, 10, 1, 2, 9, 4])
    groups = length_groups(lengths, batch_size=3, max_tokens=20)
    assert sorted(np.concatenate(groups).tolist()) == list(range(8))
    for g in groups:
        assert 1 <= len(g) <= 3 and len(g) * lengths[g].max() <= max(20, lengths[g].max())
    assert lengths[groups[0]].max() == 10  # longest first
    assert [len(g) for g in length_groups(np.array([50, 50]), batch_size=8, max_tokens=10)] == [1, 1]


def test_precision_choices():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16 and autocast_dtype(cpu, "fp16") is torch.float16
    assert precision_name(torch.bfloat16) == "bf16-autocast" and precision_name(None) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype(cpu, "int8")


def test_embed_precision_is_recorded_and_close_to_fp32(tmp_path, wu2020_adata):
    import json

    from scgpt_hf.tokenization_scgpt import ScGPTTokenizer

    genes = [str(g) for g in wu2020_adata.var_names[:2000]]
    vocab = {g: i for i, g in enumerate(genes + ["<pad>", "<cls>", "<eoc>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = ScGPTTokenizer(vocab_file=str(tmp_path / "vocab.json"))
    torch.manual_seed(0)
    model = ScGPTModel(_config(vocab_size=len(vocab), pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"],
                               eoc_token_id=vocab["<eoc>"])).eval()
    cells = wu2020_adata[:16].copy()
    fp32 = embed(cells.copy(), model, tok, device="cpu", progress=False)
    bf16 = embed(cells.copy(), model, tok, device="cpu", precision="bf16", progress=False)
    assert fp32.uns["X_scGPT_params"]["precision"] == "fp32"
    assert bf16.uns["X_scGPT_params"]["precision"] == "bf16-autocast"
    a, b = fp32.obsm["X_scGPT"], bf16.obsm["X_scGPT"]
    done = np.isfinite(a).all(1)
    assert done.sum() > 8
    assert (np.sum(a[done] * b[done], 1) > 0.99).all()
    with pytest.raises(ValueError, match="precision must be one of"):
        embed(cells.copy(), model, tok, device="cpu", precision="half", progress=False)
