"""Perturbation and multi-omic heads: parity with the original `TransformerGenerator` and
`MultiOmicTransformerModel` after conversion, `predict_perturbation` on real cells, and bad input."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import warnings

import numpy as np
import pytest
import torch

from reference import convert_attention_keys, make_vocab, randomize_parameters
from scgpt_hf.configuration_scgpt import ScGPTConfig
from scgpt_hf.convert import convert_original_checkpoint
from scgpt_hf.modeling_scgpt import (
    ScGPTForMultiOmicIntegration,
    ScGPTForPerturbationPrediction,
    elastic_cell_similarity_loss,
)
from scgpt_hf.perturbation import predict_perturbation

N_GENES = 40
D_MODEL = 32
TOL = 1e-5
MOD_VOCAB = {"RNA": 0, "ATAC": 1, "protein": 2, "<pad>": 3, "<cls>": 4, "<eoc>": 5}
BASE = dict(d_model=D_MODEL, nhead=4, d_hid=48, nlayers=2, nlayers_cls=3, n_cls=5, dropout=0.1)


@contextlib.contextmanager
def _plain_attention():
    """No grad, and PyTorch's MHA fast path off (it zeroes padded positions); restored afterwards."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _build(original_scgpt, module: str, cls: str, flash: bool, seed: int, **kwargs):
    mod = importlib.import_module(f"scgpt.model.{module}")
    if flash:
        kwargs.update(use_fast_transformer=True, fast_transformer_backend="flash")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = getattr(mod, cls)(**kwargs)
    return randomize_parameters(model, seed).eval()


def _save(model, folder, args: dict, vocab: dict, layout: str):
    folder.mkdir(parents=True)
    state = convert_attention_keys({k: v.detach().clone() for k, v in model.state_dict().items()}, layout)
    torch.save(state, folder / "best_model.pt")
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "vocab.json").write_text(json.dumps(vocab))


def _args(**extra):
    return dict(embsize=D_MODEL, nheads=4, d_hid=48, nlayers=2, dropout=0.1, n_bins=51, pad_token="<pad>", **extra)


def _cells(vocab, pad_value, lengths, seed=0, cls=False):
    """Random cells with distinct genes and log-normalised-like values (about a third zeros)."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(lengths), max(lengths)
    ids = torch.full((batch, length), vocab["<pad>"], dtype=torch.long)
    values = torch.full((batch, length), float(pad_value))
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randperm(N_GENES, generator=g)[:n]
        expr = torch.rand(n, generator=g) * 4
        expr[torch.rand(n, generator=g) < 0.33] = 0.0
        expr[0] = 1.5  # every cell expresses something
        values[row, :n] = expr
        mask[row, :n] = 1
        if cls:
            ids[row, 0], values[row, 0] = vocab["<cls>"], 0.0
    return ids, values, mask


# ----------------------------------------------------------------------------------------------
# Perturbation


PERTURBATION_CASES = {
    "post-norm released layout": dict(flash=True, layout="released", kwargs={}),
    "pytorch layout, pert_pad_id 0, mvc": dict(flash=False, layout="pytorch", kwargs=dict(pert_pad_id=0, do_mvc=True)),
    "pre-norm, zero prob, ReLU, adaptive bias": dict(
        flash=True,
        layout="compat",
        kwargs=dict(pre_norm=True, explicit_zero_prob=True, decoder_activation="ReLU", decoder_adaptive_bias=True),
    ),
}


@pytest.mark.parametrize("name", list(PERTURBATION_CASES))
def test_perturbation_matches_original(name, tmp_path, original_scgpt):
    case = PERTURBATION_CASES[name]
    vocab = make_vocab(N_GENES)
    kwargs = {**BASE, "pad_value": 0, **case["kwargs"]}
    original = _build(
        original_scgpt, "generation_model", "TransformerGenerator", case["flash"], seed=11,
        ntoken=len(vocab), vocab=vocab, **kwargs,
    )
    args = _args(
        pad_value=0,
        mask_value=-1,
        pre_norm=kwargs.get("pre_norm", False),
        pert_pad_id=kwargs.get("pert_pad_id", 2),
        decoder_activation=kwargs.get("decoder_activation"),
        decoder_adaptive_bias=kwargs.get("decoder_adaptive_bias", False),
    )
    _save(original, tmp_path / "orig", args, vocab, case["layout"])
    report = convert_original_checkpoint(tmp_path / "orig", tmp_path / "hf", task="perturbation", verbose=False)
    assert report.mapped["pert_encoder.weight"] == "scgpt.embeddings.perturbation_embeddings.weight"
    assert all(k.startswith(("cls_decoder.", "mvc_decoder.")) for k in report.left_out)
    assert any(k.startswith("cls_decoder.") for k in report.left_out)

    ours = ScGPTForPerturbationPrediction.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.use_perturbation_flags
    assert ours.config.pert_pad_id == kwargs.get("pert_pad_id", 2)
    assert ours.scgpt.embeddings.perturbation_embeddings.padding_idx == kwargs.get("pert_pad_id", 2)

    pad_flag = kwargs.get("pert_pad_id", 2)
    for lengths in ([12, 12, 12], [12, 7, 10, 4]):
        ids, values, mask = _cells(vocab, 0, lengths, seed=len(lengths))
        g = torch.Generator().manual_seed(5)
        flags = (torch.rand(ids.shape, generator=g) < 0.2).long()
        flags[mask == 0] = pad_flag
        target = values + torch.randn(values.shape, generator=g)
        real = mask.bool()
        with _plain_attention():
            hidden = original._encode(ids, values, flags, ~real)
            ref = original.decoder(hidden, values)
            ref_dict = original(ids, values, flags, ~real)
            out = ours(ids, values, mask, perturbation_flags=flags, labels=target)
        torch.testing.assert_close(out.expression[real], ref["pred"][real], atol=TOL, rtol=0)
        if kwargs.get("explicit_zero_prob"):
            torch.testing.assert_close(out.zero_probs[real], ref["zero_probs"][real], atol=TOL, rtol=0)
        else:  # without zero probabilities the original's forward output is the prediction itself
            torch.testing.assert_close(out.expression[real], ref_dict["mlm_output"][real], atol=TOL, rtol=0)
        # The original fine-tuning loss: masked_mse_loss over every real position.
        expected = original_scgpt.loss.masked_mse_loss(ref["pred"], target, real)
        torch.testing.assert_close(out.loss, expected, atol=TOL, rtol=0)


def test_perturbation_flags_change_the_prediction(tmp_path, original_scgpt):
    """Guards the parity test: the flag embedding is used (flipping one flag moves the output)."""
    config = ScGPTConfig(vocab_size=N_GENES + 3, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, pad_token_id=N_GENES, cls_token_id=N_GENES + 1,
                         eoc_token_id=N_GENES + 2)
    torch.manual_seed(0)
    model = ScGPTForPerturbationPrediction(config).eval()
    torch.nn.init.normal_(model.scgpt.embeddings.perturbation_embeddings.weight)
    ids, values, mask = _cells(make_vocab(N_GENES), 0, [10, 10])
    flags = torch.zeros_like(ids)
    with torch.no_grad():
        base = model(ids, values, mask, perturbation_flags=flags).expression
        flags[:, 3] = 1
        moved = model(ids, values, mask, perturbation_flags=flags).expression
    assert not torch.allclose(base, moved)


def test_pretrained_backbone_loads_into_perturbation_head(tmp_path):
    """The tutorial's route: a foundation checkpoint's encoder, fresh flag embedding and affine decoder."""
    from scgpt_hf import ScGPTForPreTraining

    config = ScGPTConfig(vocab_size=N_GENES + 3, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, pad_token_id=N_GENES, cls_token_id=N_GENES + 1,
                         eoc_token_id=N_GENES + 2)
    ScGPTForPreTraining(config).save_pretrained(tmp_path / "pre")
    pert, info = ScGPTForPerturbationPrediction.from_pretrained(
        tmp_path / "pre", train_new_weights=True, output_loading_info=True
    )
    assert pert.config.use_perturbation_flags
    assert "scgpt.embeddings.perturbation_embeddings.weight" in info["missing_keys"]
    assert any(k.startswith("expression_decoder.coeff_decoder.") for k in info["missing_keys"])
    pre = ScGPTForPreTraining.from_pretrained(tmp_path / "pre")
    torch.testing.assert_close(
        pert.scgpt.encoder.layers[0].linear1.weight, pre.scgpt.encoder.layers[0].linear1.weight, atol=0, rtol=0
    )


# ----------------------------------------------------------------------------------------------
# predict_perturbation on real cells


@pytest.fixture(scope="module")
def wu_small(wu2020_adata):
    """6 real cells x the 50 most expressed genes plus 5 never-expressed ones, log1p-normalised."""
    import scanpy as sc

    adata = wu2020_adata[:6].copy()
    totals = np.asarray(wu2020_adata.X.sum(axis=0)).ravel()
    order = np.argsort(-totals)
    genes = list(order[:50]) + list(np.flatnonzero(totals == 0)[:5])
    adata = adata[:, genes].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def _small_perturbation_model(vocab, seed=0):
    config = ScGPTConfig(vocab_size=len(vocab), hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, pad_token_id=vocab["<pad>"], cls_token_id=vocab["<cls>"],
                         eoc_token_id=vocab["<eoc>"], pad_value=0.0)
    torch.manual_seed(seed)
    model = ScGPTForPerturbationPrediction(config).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.scgpt.embeddings.perturbation_embeddings.weight)
    return model


def test_predict_perturbation_on_real_cells(wu_small):
    genes = list(wu_small.var_names)
    vocab = make_vocab(len(genes), genes)
    model = _small_perturbation_model(vocab)
    target = genes[7]

    control = predict_perturbation(wu_small, model, [], tokenizer=vocab)
    perturbed = predict_perturbation(wu_small, model, [target], tokenizer=vocab, batch_size=4)
    assert control.shape == perturbed.shape == (wu_small.n_obs, wu_small.n_vars)
    assert np.isfinite(perturbed).all()
    assert not np.allclose(control, perturbed)
    # GEARS-style condition strings mean the same perturbation.
    np.testing.assert_allclose(predict_perturbation(wu_small, model, f"{target}+ctrl", tokenizer=vocab), perturbed)
    renamed = predict_perturbation(wu_small, model, f"{target}+control", tokenizer=vocab, control_label="control")
    np.testing.assert_allclose(renamed, perturbed)  # the dataset's control_label, as in training conditions

    # The same numbers as a direct forward with the flag on that gene's token: all genes, dataset order.
    x = torch.tensor(wu_small.X.toarray() if hasattr(wu_small.X, "toarray") else wu_small.X, dtype=torch.float32)
    ids = torch.tensor([vocab[g] for g in genes]).expand(x.shape[0], -1)
    flags = torch.zeros_like(ids)
    flags[:, 7] = 1
    with torch.no_grad():
        direct = model(ids, x, torch.ones_like(ids), perturbation_flags=flags).expression.numpy()
    np.testing.assert_allclose(perturbed, direct, atol=1e-5, rtol=0)


def test_predict_perturbation_unknown_genes(wu_small):
    genes = list(wu_small.var_names)
    vocab = make_vocab(len(genes) - 2, genes[2:])  # the first two genes are unknown to the model
    model = _small_perturbation_model(vocab)

    with pytest.raises(ValueError, match=rf"\['{genes[0]}'\].*not in the model's gene vocabulary"):
        predict_perturbation(wu_small, model, [genes[0], genes[5]], tokenizer=vocab)
    with pytest.raises(ValueError, match=r"\['NOT_A_GENE'\].*not in the model's gene vocabulary"):
        predict_perturbation(wu_small, model, "NOT_A_GENE+ctrl", tokenizer=vocab)
    dropped = predict_perturbation(wu_small, model, [genes[5]], tokenizer=vocab)
    assert np.isnan(dropped[:, :2]).all() and np.isfinite(dropped[:, 2:]).all()
    padded = predict_perturbation(wu_small, model, [genes[5]], tokenizer=vocab, unknown_genes="pad")
    assert np.isfinite(padded).all()

    # A gene the vocabulary knows but the data lacks cannot carry a flag.
    wider = dict(vocab)
    wider = {**{g: i for g, i in vocab.items() if i < len(genes) - 2}, "EXTRA": len(genes) - 2}
    wider.update({"<pad>": len(genes) - 1, "<cls>": len(genes), "<eoc>": len(genes) + 1})
    model2 = _small_perturbation_model(wider)
    with pytest.raises(ValueError, match=r"\['EXTRA'\].*not among adata's genes"):
        predict_perturbation(wu_small, model2, ["EXTRA"], tokenizer=wider)


def test_perturbation_bad_inputs():
    vocab = make_vocab(N_GENES)
    model = _small_perturbation_model(vocab)
    ids, values, mask = _cells(vocab, 0, [6, 6])
    with pytest.raises(ValueError, match="needs perturbation_flags"):
        model(ids, values, mask)
    with pytest.raises(ValueError, match="0 \\(not perturbed\\), 1 \\(perturbed\\) or 2"):
        model(ids, values, mask, perturbation_flags=torch.full_like(ids, 3))
    with pytest.raises(ValueError, match="must match input_ids"):
        model(ids, values, mask, perturbation_flags=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels .* must have the shape of values"):
        model(ids, values, mask, perturbation_flags=torch.zeros_like(ids), labels=values[:, :3])
    with pytest.raises(ValueError, match="pert_pad_id must be one of"):
        ScGPTConfig(pert_pad_id=3)


def test_perturbation_task_needs_a_generator_checkpoint(tmp_path, original_scgpt):
    vocab = make_vocab(N_GENES)
    original = _build(original_scgpt, "model", "TransformerModel", True, seed=4, ntoken=len(vocab), vocab=vocab,
                      **BASE, pad_value=-2)
    _save(original, tmp_path / "orig", _args(pad_value=-2, mask_value=-1), vocab, "released")
    with pytest.raises(ValueError, match="needs a perturbation generator checkpoint"):
        convert_original_checkpoint(tmp_path / "orig", tmp_path / "hf", task="perturbation", verbose=False)


# ----------------------------------------------------------------------------------------------
# Multi-omic


MULTIOMIC_CASES = {
    "batch + modality, dsbn, dab, mvc, zero prob": dict(
        flash=True,
        layout="released",
        kwargs=dict(use_batch_labels=True, num_batch_labels=3, domain_spec_batchnorm=True, do_dab=True,
                    do_mvc=True, explicit_zero_prob=True, ecs_threshold=0.6, use_mod=True),
        pooled=False,
    ),
    "modality only, avg-pool, pytorch layers, mvc": dict(
        flash=False,
        layout="pytorch",
        kwargs=dict(use_mod=True, do_mvc=True, cell_emb_style="avg-pool"),
        pooled=True,
    ),
    "batch only (no modality), mvc": dict(
        flash=True,
        layout="released",
        kwargs=dict(use_batch_labels=True, num_batch_labels=3, do_mvc=True),
        pooled=False,
    ),
}


@pytest.mark.parametrize("name", list(MULTIOMIC_CASES))
def test_multiomic_matches_original(name, tmp_path, original_scgpt):
    case = MULTIOMIC_CASES[name]
    vocab = make_vocab(N_GENES)
    kwargs = {**BASE, "pad_value": -2, **case["kwargs"]}
    use_mod = kwargs.get("use_mod", False)
    if use_mod:
        kwargs.update(ntokens_mod=len(MOD_VOCAB), vocab_mod=MOD_VOCAB)
    original = _build(
        original_scgpt, "multiomic_model", "MultiOmicTransformerModel", case["flash"], seed=21,
        ntoken=len(vocab), vocab=vocab, **kwargs,
    )
    args = _args(pad_value=-2, mask_value=-1, cell_emb_style=kwargs.get("cell_emb_style", "cls"))
    _save(original, tmp_path / "orig", args, vocab, case["layout"])
    report = convert_original_checkpoint(
        tmp_path / "orig", tmp_path / "hf", task="multiomic", modality_vocab=MOD_VOCAB if use_mod else None,
        verbose=False,
    )
    assert all(k.startswith("cls_decoder.") for k in report.left_out)
    if use_mod:
        assert report.mapped["mod_encoder.embedding.weight"] == "modality_encoder.embedding.weight"

    ours = ScGPTForMultiOmicIntegration.from_pretrained(
        tmp_path / "hf", ecs_threshold=kwargs.get("ecs_threshold", 0.3)
    ).eval()
    assert ours.config.use_modality_embeddings == use_mod
    if use_mod:
        assert ours.config.modality_vocab == MOD_VOCAB and ours.config.modality_pad_id == MOD_VOCAB["<pad>"]

    for lengths in ([12, 12, 12, 12], [12, 9, 12, 5]):
        padded = len(set(lengths)) > 1
        ids, values, mask = _cells(vocab, -2, lengths, seed=len(set(lengths)), cls=True)
        real = mask.bool()
        g = torch.Generator().manual_seed(9)
        mod_types = torch.randint(0, 3, ids.shape, generator=g)
        mod_types[:, 0] = MOD_VOCAB["<cls>"]
        mod_types[~real] = MOD_VOCAB["<pad>"]
        use_batch = kwargs.get("use_batch_labels", False)
        batch_labels = torch.full((ids.shape[0],), 2, dtype=torch.long) if use_batch else None
        with _plain_attention():
            ref = original(ids, values, ~real, batch_labels=batch_labels, MVC=True, ECS=True,
                           mod_types=mod_types if use_mod else None)
            out = ours(ids, values, mask, batch_labels=batch_labels, modality_ids=mod_types if use_mod else None)
        torch.testing.assert_close(out.expression[real], ref["mlm_output"][real], atol=TOL, rtol=0)
        if kwargs.get("explicit_zero_prob"):
            torch.testing.assert_close(out.zero_probs[real], ref["mlm_zero_probs"][real], atol=TOL, rtol=0)
        if padded and case["pooled"]:
            continue  # the original pools padded positions into avg-pool: compare pooled outputs unpadded
        torch.testing.assert_close(out.cell_embedding, ref["cell_emb"], atol=TOL, rtol=0)
        torch.testing.assert_close(out.mvc_expression[real], ref["mvc_output"][real], atol=TOL, rtol=0)
        if kwargs.get("explicit_zero_prob"):
            torch.testing.assert_close(out.mvc_zero_probs[real], ref["mvc_zero_probs"][real], atol=TOL, rtol=0)
        assert out.ecs_loss is None, "ECS is a training term: not computed without labels"
        torch.testing.assert_close(
            elastic_cell_similarity_loss(out.cell_embedding, ours.config.ecs_threshold), ref["loss_ecs"], atol=TOL, rtol=0
        )
        if kwargs.get("do_dab"):
            torch.testing.assert_close(out.batch_logits, ref["dab_output"], atol=TOL, rtol=0)


def test_multiomic_modality_ids_matter():
    """Guards the parity test: a token's modality changes its decoded expression."""
    config = ScGPTConfig(vocab_size=N_GENES + 3, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, pad_token_id=N_GENES, cls_token_id=N_GENES + 1,
                         eoc_token_id=N_GENES + 2, use_modality_embeddings=True, modality_vocab=MOD_VOCAB)
    torch.manual_seed(0)
    model = ScGPTForMultiOmicIntegration(config).eval()
    ids, values, mask = _cells(make_vocab(N_GENES), -2, [8, 8], cls=True)
    rna = torch.zeros_like(ids)
    atac = rna.clone()
    atac[:, 4] = 1
    with torch.no_grad():
        a = model(ids, values, mask, modality_ids=rna).expression
        b = model(ids, values, mask, modality_ids=atac).expression
    assert not torch.allclose(a[:, 4], b[:, 4])
    torch.testing.assert_close(a[:, 3], b[:, 3])  # the modality does not enter the transformer


def test_multiomic_bad_inputs(tmp_path, original_scgpt):
    config = ScGPTConfig(vocab_size=N_GENES + 3, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, pad_token_id=N_GENES, cls_token_id=N_GENES + 1,
                         eoc_token_id=N_GENES + 2, use_modality_embeddings=True, modality_vocab=MOD_VOCAB)
    model = ScGPTForMultiOmicIntegration(config).eval()
    ids, values, mask = _cells(make_vocab(N_GENES), -2, [6, 6], cls=True)
    with pytest.raises(ValueError, match="needs modality_ids"):
        model(ids, values, mask)
    with pytest.raises(ValueError, match="modality vocabulary has 6 entries"):
        model(ids, values, mask, modality_ids=torch.full_like(ids, 7))
    with pytest.raises(ValueError, match="Unknown modality 'ADT'"):
        model.encode_modalities(["RNA", "ADT"])
    with pytest.raises(ValueError, match="differs from the model's"):
        model.encode_modalities(["RNA"], modality_vocab={"RNA": 0, "protein": 1, "ATAC": 2, "<pad>": 3,
                                                          "<cls>": 4, "<eoc>": 5})
    assert model.encode_modalities([["<cls>", "RNA", "ATAC"]]).tolist() == [[4, 0, 1]]
    with pytest.raises(ValueError, match="modality_vocab has 3 entries .* modality_vocab_size is 6"):
        ScGPTConfig(use_modality_embeddings=True, modality_vocab_size=6, modality_vocab={"a": 0, "b": 1, "c": 2})
    with pytest.raises(ValueError, match="needs modality_vocab_size"):
        ScGPTConfig(use_modality_embeddings=True)
    with pytest.raises(ValueError, match="use ScGPTForMultiOmicIntegration"):
        from scgpt_hf import ScGPTForPreTraining

        ScGPTForPreTraining(config)

    # Converting with a modality vocabulary of the wrong size stops with an error naming both sizes.
    vocab = make_vocab(N_GENES)
    original = _build(original_scgpt, "multiomic_model", "MultiOmicTransformerModel", True, seed=3,
                      ntoken=len(vocab), vocab=vocab, **BASE, pad_value=-2, use_mod=True,
                      ntokens_mod=len(MOD_VOCAB), vocab_mod=MOD_VOCAB)
    _save(original, tmp_path / "orig", _args(pad_value=-2, mask_value=-1), vocab, "released")
    with pytest.raises(ValueError, match="has 3 entries .* mod_encoder has 6 rows"):
        convert_original_checkpoint(tmp_path / "orig", tmp_path / "hf", task="multiomic",
                                    modality_vocab={"RNA": 0, "ATAC": 1, "<pad>": 2}, verbose=False)
    (tmp_path / "mods.json").write_text(json.dumps(MOD_VOCAB))
    convert_original_checkpoint(tmp_path / "orig", tmp_path / "hf", task="multiomic",
                                modality_vocab=tmp_path / "mods.json", verbose=False)
    assert ScGPTForMultiOmicIntegration.from_pretrained(tmp_path / "hf").config.modality_vocab == MOD_VOCAB
