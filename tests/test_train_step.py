"""The training step: the restricted loss against plain cross-entropy, SDPA against eager attention, fixed shapes and no
wait for the device inside the step, the fused optimizer, and a few steps against a plain reference step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from translator.loop import make_optimizer
from translator.loss import TranslationLoss, restricted_lm_loss, sampled_targets, scored_ids
from translator.model import make_config, make_model

N_SPECIAL, N_GENES, N_PEAKS = 5, 30, 200
VOCAB = N_SPECIAL + N_GENES + N_PEAKS
GEX = (N_SPECIAL, N_SPECIAL + N_GENES)
ATAC = (N_SPECIAL + N_GENES, VOCAB)


def _model(attn: str = "sdpa", dropout: float = 0.0):
    return make_model(make_config("tiny", VOCAB, dropout_rate=dropout, attn_implementation=attn), seed=0)


def _batch(seed: int = 0, rows: int = 4, source: int = 14, target: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(*GEX, (rows, source), generator=g)
    input_ids[:, 0] = 3
    mask = torch.ones(rows, source, dtype=torch.long)
    mask[1, source - 4:] = 0  # a shorter source, padded
    input_ids[1, source - 4:] = 0
    labels = torch.randint(*ATAC, (rows, target), generator=g)
    labels[0, target - 3:] = -100  # a shorter target, padded
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _reference_loss(model, batch, ids, offset, label_smoothing):
    """Plain cross-entropy over the scored ids of the full output layer's logits (the padding dropped by masking)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    keep = batch["labels"] != -100
    if offset is not None:
        ids, offset = ids[torch.isfinite(offset)], offset[torch.isfinite(offset)]
    logits = out.logits[keep][:, ids]
    if offset is not None:
        logits = logits + offset
    position = torch.full((VOCAB,), -100)
    position[ids] = torch.arange(len(ids))
    return F.cross_entropy(logits, position[batch["labels"][keep]], label_smoothing=label_smoothing)


@pytest.mark.parametrize("n_negatives, max_targets, label_smoothing", [(0, 0, 0.0), (20, 0, 0.1), (7, 60, 0.1), (0, 20, 0.2)])
def test_restricted_loss_and_gradients_are_cross_entropy_over_the_scored_ids(n_negatives, max_targets, label_smoothing):
    """Loss and gradients equal plain cross-entropy over the ids the loss scored (negatives, a sampled softmax with its
    offsets, label smoothing, padded positions); with max_targets 20 < the batch's 33 label positions, unused slots take
    no part."""
    model = _model().train()
    batch = _batch(1)
    got = restricted_lm_loss(model, batch, ATAC, n_negatives, label_smoothing, generator=torch.Generator().manual_seed(5),
                             max_targets=max_targets, chunk_elements=3 * 40)
    got.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ids, offset = scored_ids(ATAC, VOCAB, batch["labels"], n_negatives, max_targets, torch.Generator().manual_seed(5))
    assert len(set(ids.tolist())) == len(ids)
    expected = _reference_loss(model, batch, ids, offset, label_smoothing)
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sampled_targets_keep_the_batch_names_and_fill_a_fixed_length():
    labels = _batch(2)["labels"]
    present = labels[labels != -100].unique()
    ids, offset = sampled_targets(ATAC, labels, 20, torch.Generator().manual_seed(0))
    assert len(ids) == labels.numel() == 36  # the batch holds more label positions than max_targets
    assert set(present.tolist()) == set(ids[: len(present)].tolist()) and torch.all(offset[: len(present)] == 0)
    assert torch.all(torch.isinf(offset[len(present):]))  # 33 distinct names > 20: nothing drawn, the rest unused
    ids, offset = sampled_targets(ATAC, labels, 120, torch.Generator().manual_seed(0))
    assert len(ids) == 120 and torch.all(offset[len(present):] == math.log((N_PEAKS - len(present)) / (120 - len(present))))


def test_a_label_outside_the_scored_ids_is_scored_in_its_own_row():
    """An <unk> label (id 2) joins its own row's softmax as one more column; the other rows are untouched."""
    model = _model().eval()
    batch = _batch(3)
    batch["labels"][2, 1] = 2
    with torch.no_grad():
        got = restricted_lm_loss(model, batch, ATAC, n_negatives=0, reduction="sum")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    ids = torch.cat([torch.tensor([1]), torch.arange(*ATAC)])
    expected = 0.0
    for row, label_row in enumerate(batch["labels"]):
        for t, label in enumerate(label_row.tolist()):
            if label == -100:
                continue
            columns = ids if label in ids else torch.cat([ids, torch.tensor([label])])
            expected += float(torch.logsumexp(logits[row, t, columns], 0) - logits[row, t, label])
    assert float(got) == pytest.approx(expected, rel=1e-5)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# Operators whose output shape depends on the data, or that read a value back to the host (a wait on a GPU).
DATA_DEPENDENT = {"aten.nonzero", "aten._local_scalar_dense", "aten.unique", "aten._unique2", "aten.masked_select", "aten.item",
                  "aten.randperm", "aten.is_nonzero"}


def test_the_training_step_has_fixed_shapes_and_never_reads_the_device():
    """Forward and backward of the default recipe's loss (profile readout, negatives, a sampled softmax, label smoothing,
    source dropout) and the optimizer step dispatch no operator that syncs with the device or sizes by the data."""
    model = _model(dropout=0.1)
    offsets = {GEX[0]: (torch.zeros(N_GENES), False), ATAC[0]: (torch.full((N_PEAKS,), -2.0), True)}
    module = TranslationLoss(model, 16, 0.1, 1.0, offsets, 0.1, max_scored_targets=50).train()
    optimizer = make_optimizer(module, 1e-3, 0.01)
    batch = _batch(4)
    profile = (torch.rand(4, N_PEAKS) < 0.1).float()
    with _Recorder() as recorder:
        loss = module(**batch, target_start=ATAC[0], target_stop=ATAC[1], profile_values=profile)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
    assert recorder.ops and not DATA_DEPENDENT & set(recorder.ops), sorted(DATA_DEPENDENT & set(recorder.ops))
    assert optimizer.param_groups[0]["fused"]  # one operator per group, not a dozen per parameter


def test_sdpa_attention_matches_eager_attention_with_the_position_bias():
    """The default attention (SDPA) gives eager attention's loss and gradients at fp32 tolerance, padding included."""
    batch = _batch(5)
    results = []
    for attn in ("eager", "sdpa"):
        model = _model(attn).train()
        loss = restricted_lm_loss(model, batch, ATAC, n_negatives=0, label_smoothing=0.1)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert _model().config._attn_implementation == "sdpa"
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_few_training_steps_match_a_plain_reference_step():
    """Three optimizer steps of the training path (SDPA, the chunked restricted loss, fused AdamW) and of a plain one
    (eager attention, cross-entropy over the full output layer's logits, AdamW's for-loop) give the same losses."""
    batches = [_batch(10 + i) for i in range(3)]
    ids = torch.cat([torch.tensor([1]), torch.arange(*ATAC)])
    losses = {}
    for path in ("training", "reference"):
        model = _model("sdpa" if path == "training" else "eager").train()
        module = TranslationLoss(model, 0, 0.1).train()
        optimizer = make_optimizer(module, 1e-2, 0.01)
        if path == "reference":
            optimizer = torch.optim.AdamW(optimizer.param_groups, lr=1e-2, foreach=False)
        losses[path] = []
        for batch in batches:
            if path == "training":
                loss = module(**batch, target_start=ATAC[0], target_stop=ATAC[1])
            else:
                loss = _reference_loss(model, batch, ids, None, 0.1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses[path].append(float(loss.detach()))
    assert losses["training"][0] != losses["training"][-1]  # the weights moved
    assert losses["training"] == pytest.approx(losses["reference"], rel=1e-5)


def test_gradient_clipping_matches_torch_clip_grad_norm():
    from accelerate import Accelerator

    from translator.loop import clip_gradients

    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(4)]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for scale, (a, b) in zip((3.0, 0.01, 1.0, 2.0), zip(ours, torch_params, strict=True), strict=True):
        a.grad = torch.randn(5, 3, generator=g) * scale
        b.grad = a.grad.clone()
    norm = clip_gradients(Accelerator(cpu=True), ours, 1.0)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(torch_params, 1.0))
    assert float(norm) > 1  # the clip did scale
    for a, b in zip(ours, torch_params, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_a_compiled_step_gives_the_eager_steps_losses():
    """Two steps with --torch_compile (the loss module's forward and backward compiled) give the eager losses; dropout and
    sampling off, so that both draw nothing at random."""
    batches = [_batch(20), _batch(21)]
    losses = {}
    for compiled in (False, True):
        module = TranslationLoss(_model(), 0, 0.1).train()
        if compiled:
            module.compile_step()
        optimizer = make_optimizer(module, 1e-2, 0.01)
        losses[compiled] = []
        for batch in batches:
            loss = module(**batch, target_start=ATAC[0], target_stop=ATAC[1])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[compiled].append(float(loss.detach()))
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    with pytest.raises(ValueError, match="reduce-overhead"):
        module.compile_step("fastest")


def test_linear_layers_reading_one_input_become_one_product():
    """The compile pass joins bias-free linears of one input (a repeated pair shares its slice); outputs stay the same."""
    from translator.compiled import LINEAR_TARGETS, JoinSharedInputLinears

    def layers(x, y, wq, wk, wv, wo):
        q, k, v, k_again = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv), F.linear(x, wk)
        return q.sum(-1) + k.sum(-1) * v.mean(-1) - k_again.sum(-1) + F.linear(y, wo).sum(-1)

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 6, generator=g), torch.randn(4, 8, generator=g),
              torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(7, 6, generator=g)]
    traced = torch.fx.symbolic_trace(layers)
    for node, value in zip([n for n in traced.graph.nodes if n.op == "placeholder"], inputs, strict=True):
        node.meta["val"] = value
    JoinSharedInputLinears()(traced.graph)
    traced.recompile()
    assert sum(n.op == "call_function" and n.target in LINEAR_TARGETS for n in traced.graph.nodes) == 2
    torch.testing.assert_close(traced(*inputs), layers(*inputs))
