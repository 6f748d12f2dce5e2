"""Parity with the original scGPT: random original weights -> converter -> our model, same numbers.

Every configuration axis the original has is covered: post-norm and pre-norm layers, continuous and
category value encoders, cls / avg-pool / w-pool cell embeddings, batch labels with domain-specific batch
norm, explicit zero probabilities, MVC, and the three attention key layouts of saved checkpoints.
"""

from __future__ import annotations

import pytest
import torch

from reference import build_original_model, make_vocab, original_forward, save_original_checkpoint
from scgpt_hf import ScGPTForPreTraining, ScGPTModel
from scgpt_hf.convert import convert_original_checkpoint

N_GENES = 40
D_MODEL = 32
TOL = 1e-5

BASE = dict(d_model=D_MODEL, nhead=4, d_hid=48, nlayers=2, nlayers_cls=3, n_cls=1, dropout=0.1, pad_value=-2)

CONFIGS = {
    "post-norm released layout": dict(flash=True, layout="released", kwargs=dict(do_mvc=True)),
    "post-norm pytorch layout": dict(flash=False, layout="pytorch", kwargs=dict(do_mvc=True)),
    "post-norm compat layout": dict(flash=True, layout="compat", kwargs=dict(do_mvc=True)),
    "pre-norm avg-pool": dict(flash=True, layout="released", kwargs=dict(pre_norm=True, cell_emb_style="avg-pool")),
    "category w-pool zero-prob": dict(
        flash=True,
        layout="released",
        kwargs=dict(
            input_emb_style="category",
            n_input_bins=53,
            pad_value=51,
            cell_emb_style="w-pool",
            explicit_zero_prob=True,
            do_mvc=True,
        ),
        args=dict(mask_value=52),
    ),
    "batch labels dsbn zero-prob mvc": dict(
        flash=True,
        layout="released",
        kwargs=dict(
            use_batch_labels=True,
            num_batch_labels=3,
            domain_spec_batchnorm=True,
            explicit_zero_prob=True,
            do_mvc=True,
        ),
    ),
}


def _inputs(vocab: dict, category: bool, pad_value: float, padded: bool, seed: int = 0):
    """Random cells: `<cls>` first, distinct genes, bins 1..50; the padded batch has ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    batch, length = 4, 12
    lengths = [12, 9, 12, 5] if padded else [length] * batch
    ids = torch.full((batch, length), vocab["<pad>"], dtype=torch.long)
    values = torch.full((batch, length), float(pad_value))
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = vocab["<cls>"]
        ids[row, 1:n] = torch.randperm(N_GENES, generator=g)[: n - 1]
        bins = torch.randint(1, 51, (n - 1,), generator=g).float()
        values[row, 0] = 0.0 if category else float(pad_value)
        values[row, 1:n] = bins
        mask[row, :n] = 1
    return ids, values, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_model_matches_original(name, tmp_path, original_scgpt):
    spec = CONFIGS[name]
    vocab = make_vocab(N_GENES, None)
    kwargs = {**BASE, **spec["kwargs"]}
    original = build_original_model(flash=spec["flash"], seed=1, ntoken=len(vocab), vocab=vocab, **kwargs)
    args = dict(
        embsize=D_MODEL,
        nheads=kwargs["nhead"],
        d_hid=kwargs["d_hid"],
        nlayers=kwargs["nlayers"],
        dropout=kwargs["dropout"],
        n_bins=51,
        max_seq_len=1200,
        input_emb_style=kwargs.get("input_emb_style", "continuous"),
        pad_token="<pad>",
        pad_value=kwargs["pad_value"],
        mask_value=-1,
        pre_norm=kwargs.get("pre_norm", False),
        cell_emb_style=kwargs.get("cell_emb_style", "cls"),
    )
    args.update(spec.get("args", {}))
    save_original_checkpoint(original, tmp_path / "orig", args=args, vocab=vocab, layout=spec["layout"])
    report = convert_original_checkpoint(tmp_path / "orig", tmp_path / "hf", verbose=False)
    assert set(report.left_out) == {k for k in original.state_dict() if k.startswith("cls_decoder.")}

    ours = ScGPTForPreTraining.from_pretrained(tmp_path / "hf").eval()
    category = kwargs.get("input_emb_style") == "category"
    use_batch = kwargs.get("use_batch_labels", False)
    pooled = kwargs.get("cell_emb_style", "cls") != "cls"
    for padded in (False, True):
        ids, values, mask = _inputs(vocab, category, kwargs["pad_value"], padded)
        batch_labels = torch.full((ids.shape[0],), 2, dtype=torch.long) if use_batch else None
        ref = original_forward(original, ids, values, mask, batch_labels=batch_labels, MVC=kwargs.get("do_mvc", False))
        with torch.no_grad():
            out = ours(ids, values, attention_mask=mask, batch_labels=batch_labels)
        real = mask.bool()
        torch.testing.assert_close(out.expression[real], ref["mlm_output"][real], atol=TOL, rtol=0)
        if kwargs.get("explicit_zero_prob"):
            torch.testing.assert_close(out.zero_probs[real], ref["mlm_zero_probs"][real], atol=TOL, rtol=0)
        # The original pools padded positions into avg-pool / w-pool; compare those only unpadded.
        if padded and pooled:
            continue
        torch.testing.assert_close(out.cell_embedding, ref["cell_emb"], atol=TOL, rtol=0)
        if kwargs.get("do_mvc"):
            torch.testing.assert_close(out.mvc_expression[real], ref["mvc_output"][real], atol=TOL, rtol=0)
            if kwargs.get("explicit_zero_prob"):
                torch.testing.assert_close(out.mvc_zero_probs[real], ref["mvc_zero_probs"][real], atol=TOL, rtol=0)

    # The backbone alone loads from the same folder and gives the same cell embedding.
    backbone = ScGPTModel.from_pretrained(tmp_path / "hf").eval()
    ids, values, mask = _inputs(vocab, category, kwargs["pad_value"], padded=False)
    batch_labels = torch.full((ids.shape[0],), 2, dtype=torch.long) if use_batch else None
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(ids, values, mask, batch_labels=batch_labels).cell_embedding,
            ours(ids, values, mask, batch_labels=batch_labels).cell_embedding,
            atol=0,
            rtol=0,
        )


def test_flag_encoder_is_kept(tmp_path, original_scgpt):
    """Released checkpoints carry `flag_encoder` (generative training); the original loader drops it."""
    vocab = make_vocab(N_GENES, None)
    original = build_original_model(flash=True, seed=2, ntoken=len(vocab), vocab=vocab, **BASE)
    state = original.state_dict()
    flag = torch.randn(2, D_MODEL)
    state["flag_encoder.weight"] = flag
    original.flag_encoder = torch.nn.Embedding(2, D_MODEL)
    original.flag_encoder.weight.data.copy_(flag)
    args = dict(embsize=D_MODEL, nheads=4, d_hid=48, nlayers=2, pad_value=-2, mask_value=-1, n_bins=51)
    save_original_checkpoint(original, tmp_path / "orig", args=args, vocab=vocab, layout="released")
    report = convert_original_checkpoint(tmp_path / "orig", tmp_path / "hf", verbose=False)
    assert report.mapped["flag_encoder.weight"] == "scgpt.embeddings.flag_embeddings.weight"
    ours = ScGPTForPreTraining.from_pretrained(tmp_path / "hf")
    assert ours.config.use_generative_flag
    torch.testing.assert_close(ours.scgpt.embeddings.flag_embeddings.weight.detach(), flag, atol=0, rtol=0)


def _converted_pair(tmp_path, task, seed=3, **kwargs):
    vocab = make_vocab(N_GENES, None)
    kwargs = {**BASE, **kwargs}
    original = build_original_model(flash=True, seed=seed, ntoken=len(vocab), vocab=vocab, **kwargs)
    args = dict(embsize=D_MODEL, nheads=4, d_hid=48, nlayers=2, pad_value=-2, mask_value=-1, n_bins=51)
    save_original_checkpoint(original, tmp_path / "orig", args=args, vocab=vocab, layout="released")
    report = convert_original_checkpoint(tmp_path / "orig", tmp_path / task, task=task, verbose=False)
    return original, vocab, report


def test_annotation_head_matches_original(tmp_path, original_scgpt):
    from scgpt_hf import ScGPTForCellClassification

    original, vocab, report = _converted_pair(tmp_path, "annotation", n_cls=7, nlayers_cls=3, do_mvc=True)
    assert all(k.startswith(("decoder.", "mvc_decoder.")) for k in report.left_out)
    ours = ScGPTForCellClassification.from_pretrained(tmp_path / "annotation").eval()
    assert ours.config.num_labels == 7 and ours.config.nlayers_cls == 3
    ids, values, mask = _inputs(vocab, False, -2, padded=True)
    ref = original_forward(original, ids, values, mask, CLS=True)
    with torch.no_grad():
        out = ours(ids, values, mask, labels=torch.tensor([0, 3, 6, 2]))
    torch.testing.assert_close(out.logits, ref["cls_output"], atol=TOL, rtol=0)
    expected = torch.nn.functional.cross_entropy(ref["cls_output"], torch.tensor([0, 3, 6, 2]))
    torch.testing.assert_close(out.loss, expected, atol=TOL, rtol=0)


def test_integration_head_matches_original(tmp_path, original_scgpt):
    """Outputs, the ECS term and the whole training loss equal the original's on the same masked cells;
    without labels (inference) the training-only ECS is skipped and the outputs are unchanged."""
    from scgpt_hf import ScGPTForBatchIntegration

    original, vocab, _ = _converted_pair(
        tmp_path, "integration", use_batch_labels=True, num_batch_labels=3, domain_spec_batchnorm=True,
        do_dab=True, do_mvc=True, ecs_threshold=0.6, explicit_zero_prob=True,
    )
    ours = ScGPTForBatchIntegration.from_pretrained(tmp_path / "integration", ecs_threshold=0.6).eval()
    ids, values, mask = _inputs(vocab, False, -2, padded=True)
    labels, masked_values, masked = _masked(values, mask)
    batch_labels = torch.full((4,), 1, dtype=torch.long)
    ref = original_forward(original, ids, masked_values, mask, batch_labels=batch_labels, MVC=True, ECS=True)
    with torch.no_grad():
        out = ours(ids, masked_values, mask, batch_labels=batch_labels, labels=labels)
        inference = ours(ids, masked_values, mask, batch_labels=batch_labels)
    real = mask.bool()
    torch.testing.assert_close(out.batch_logits, ref["dab_output"], atol=TOL, rtol=0)
    torch.testing.assert_close(out.ecs_loss, ref["loss_ecs"], atol=TOL, rtol=0)
    torch.testing.assert_close(out.mvc_expression[real], ref["mvc_output"][real], atol=TOL, rtol=0)
    torch.testing.assert_close(out.expression[real], ref["mlm_output"][real], atol=TOL, rtol=0)
    loss_fns = original_scgpt.loss
    expected = (
        _original_expression_loss(loss_fns, ref, labels, masked)
        + ours.config.ecs_weight * ref["loss_ecs"]
        + ours.config.dab_weight * torch.nn.functional.cross_entropy(ref["dab_output"], batch_labels)
    )
    torch.testing.assert_close(out.loss, expected, atol=TOL, rtol=0)
    assert inference.loss is None and inference.ecs_loss is None
    torch.testing.assert_close(inference.cell_embedding, out.cell_embedding, atol=0, rtol=0)
    torch.testing.assert_close(inference.batch_logits, out.batch_logits, atol=0, rtol=0)


def _masked(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, values with genes 2..4 of each cell at mask_value -1, the masked positions)."""
    masked = torch.zeros_like(mask, dtype=torch.bool)
    masked[:, 2:5] = True
    masked &= mask.bool()
    masked_values = values.clone()
    masked_values[masked] = -1.0
    return values.clone(), masked_values, masked


def _original_expression_loss(loss_fns, ref: dict, labels: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The original's masked expression, MVC and zero-probability losses on its outputs."""
    return (
        loss_fns.masked_mse_loss(ref["mlm_output"], labels, masked)
        + loss_fns.criterion_neg_log_bernoulli(ref["mlm_zero_probs"], labels, masked)
        + loss_fns.masked_mse_loss(ref["mvc_output"], labels, masked)
        + loss_fns.criterion_neg_log_bernoulli(ref["mvc_zero_probs"], labels, masked)
    )


def test_training_losses_match_original_loss_functions(tmp_path, original_scgpt):
    """Masked MSE and zero-probability NLL equal scgpt.loss on the same outputs and masks."""
    from scgpt_hf import ScGPTForPreTraining

    original, vocab, _ = _converted_pair(tmp_path, "pretraining", explicit_zero_prob=True, do_mvc=True)
    ours = ScGPTForPreTraining.from_pretrained(tmp_path / "pretraining").eval()
    ids, values, mask = _inputs(vocab, False, -2, padded=True)
    labels, masked_values, masked = _masked(values, mask)
    ref = original_forward(original, ids, masked_values, mask, MVC=True)
    expected = _original_expression_loss(original_scgpt.loss, ref, labels, masked)
    with torch.no_grad():
        out = ours(ids, masked_values, mask, labels=labels)
    torch.testing.assert_close(out.loss, expected, atol=TOL, rtol=0)
