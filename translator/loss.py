"""The training loss: the restricted-vocabulary sentence loss, the profile readout's loss, and the source augmentations.

The output layer over every gene and peak name (27k names for MOp, ~130k for a full 10x multiome) dominates the cost of a
step. Training therefore scores each target position only against the target modality's names, ``</s>`` and a few hundred
sampled off-modality names (:func:`restricted_lm_loss`), in chunks of positions whose gradients are computed on the spot,
so fp32 logits of ``[batch, length, vocabulary]`` are never held at once and nothing is recomputed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5ForConditionalGeneration

from .compiled import CUDA_GRAPH_MODES, compile_options
from .model import EOS_ID, PROFILE_INPUTS, ProfileHead, decoder_hidden_states, encode, output_weight, profile_scores

DOWNSAMPLE_MIN_RATE = 0.2  # the count down-sampling augmentation keeps each UMI with a rate drawn in [this, 1)


def profile_loss(scores: torch.Tensor, offset: torch.Tensor, values: torch.Tensor, binary: bool) -> torch.Tensor:
    """Summed loss of the profile readout over cells and features.

    Binary targets (ATAC): cross-entropy of ``sigmoid(offset + scores)`` against ``values > 0``
    (``offset`` = logit of the train accessibility rate). Continuous targets (GEX): squared error of
    ``offset + scores`` against the log-norm values (``offset`` = the train mean).
    """
    predicted = scores + offset[None, :]
    if binary:
        return F.binary_cross_entropy_with_logits(predicted, (values > 0).float(), reduction="sum")
    return ((predicted - values) ** 2).sum()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of every position's label against ``hidden @ weight.T`` (+ ``logit_offset``), chunk by chunk,
    gradients included.

    Each chunk's logits live only inside the loop: the forward pass also computes the chunk's gradients with respect to
    ``hidden``, ``weight`` and ``label_weight`` (d loss / d logits = softmax - smoothed one-hot), so backward needs no
    logits and no recomputation. Shapes are fixed by the batch: every position is scored and ``valid`` (0/1) zeroes the
    padding's loss and gradients, so nothing waits for the device. ``targets`` is each label's column among the scored
    ids; a label that is not among them (``outside``) joins its own row's softmax as one more column, its logit
    ``hidden . label_weight`` (``label_weight``: the output row of each position's label). ``logit_offset`` (or None)
    adds to every row's logits; a column whose offset is ``-inf`` takes no part.
    """

    @staticmethod
    def forward(ctx, hidden, weight, label_weight, targets, valid, outside, logit_offset, label_smoothing: float, rows: int):
        needs_grad = any(ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_label_weight = torch.empty_like(label_weight) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        if logit_offset is None:
            columns, n_columns = None, weight.shape[0]
        else:
            columns = torch.isfinite(logit_offset)
            n_columns = columns.sum()
        keep = 1 - label_smoothing
        for begin in range(0, hidden.shape[0], rows):
            end = begin + rows
            h, lw, t, v, out = hidden[begin:end], label_weight[begin:end], targets[begin:end, None], valid[begin:end], outside[begin:end]
            logits = (h @ weight.T).float()
            if logit_offset is not None:
                logits = logits + logit_offset
            own = (h.float() * lw.float()).sum(-1)
            extra = torch.where(out, own, -math.inf)
            lse = torch.logaddexp(torch.logsumexp(logits, dim=-1), extra)
            picked = torch.where(out, own, logits.gather(1, t).squeeze(1))
            loss = lse - keep * picked
            if label_smoothing:
                row_columns = n_columns + out.float()
                logit_sum = logits.sum(-1) if columns is None else torch.where(columns, logits, 0.0).sum(-1)
                loss = loss - label_smoothing * (logit_sum + torch.where(out, own, 0.0)) / row_columns
            total += (loss * v).sum()
            if needs_grad:
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, t, (-keep * ~out)[:, None].to(grad.dtype))
                grad_own = (extra - lse).exp() - keep * out
                if label_smoothing:
                    grad -= (label_smoothing / row_columns)[:, None] * (1.0 if columns is None else columns)
                    grad_own = grad_own - label_smoothing * out / row_columns
                grad *= v[:, None]
                grad_own = grad_own * v
                grad_hidden[begin:end] = (grad.to(weight.dtype) @ weight + grad_own[:, None].to(lw.dtype) * lw).to(hidden.dtype)
                grad_label_weight[begin:end] = (grad_own[:, None] * h.float()).to(label_weight.dtype)
                grad_weight += grad.T @ h.float()
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), grad_label_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_label_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, grad_label_weight * grad_output, None, None, None, None, None, None


CPU_CHUNK_ELEMENTS = 2**23
GPU_CHUNK_ELEMENTS = 2**27


def default_chunk_elements(device: torch.device) -> int:
    """Logits the restricted loss holds at once on ``device``: few large products on a GPU, small ones on a CPU."""
    return GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS


def _uniform(n: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """``n`` uniform draws on ``device`` (from ``generator``, on its own device, when given; else torch's global RNG)."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def negative_ids(target_range: tuple[int, int], vocab_size: int, n_negatives: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``n_negatives`` distinct names drawn uniformly from outside ``target_range``: the other modality's names and the
    direction prefixes (never ``<pad>`` or ``</s>``), so that a plain ``generate`` learns to keep off-modality tokens low.

    Drawn on ``device`` as the smallest of uniform keys: no wait for the device, a shape fixed by the arguments.
    """
    start, stop = target_range
    n_others = (start - 2) + (vocab_size - stop)
    k = min(max(0, n_negatives), n_others)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    pick = _uniform(n_others, generator, device).topk(k, largest=False).indices
    return torch.where(pick < start - 2, pick + 2, pick - (start - 2) + stop)


def sampled_targets(target_range: tuple[int, int], labels: torch.Tensor, max_targets: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Target names scored by a sampled softmax: every name among ``labels`` (``-100`` and names outside the range are
    ignored), and names drawn evenly from the rest of the range up to ``max_targets`` in all.

    Returns ``(ids, logit_offset)``, the batch's names first: each drawn name's logit is raised by ``log(n_rest / n_drawn)``
    (the inverse of its chance to be drawn), so that the drawn names stand for all the names left out and the softmax's
    normaliser stays an unbiased estimate of the whole range's; the names of ``labels`` get 0. The length is fixed by the
    shapes, ``min(range size, max(max_targets, labels.numel()))``, so nothing waits for the device: when the batch holds
    fewer distinct names than that allows beyond ``max_targets``, the surplus ids get an offset of ``-inf`` (not scored).
    """
    start, stop = target_range
    n_range = stop - start
    flat = labels.reshape(-1)
    slot = torch.where((flat >= start) & (flat < stop), flat - start, n_range)
    present = torch.zeros(n_range + 1, dtype=torch.bool, device=labels.device).index_fill_(0, slot, True)[:n_range]
    keys = torch.where(present, -1.0, _uniform(n_range, generator, labels.device))
    k = min(n_range, max(max_targets, flat.numel()))
    ids = keys.topk(k, largest=False).indices + start  # sorted by key: the batch's names first
    n_present = present.sum()
    n_rest = n_range - n_present
    n_drawn = (max_targets - n_present).clamp(min=0).minimum(n_rest)
    order = torch.arange(k, device=labels.device)
    drawn = torch.log(n_rest.clamp(min=1) / n_drawn.clamp(min=1)).float()
    offset = torch.where(order < n_present, 0.0, torch.where(order < n_present + n_drawn, drawn, -math.inf))
    return ids, offset


def scored_ids(target_range: tuple[int, int], vocab_size: int, labels: torch.Tensor, n_negatives: int = 256, max_targets: int = 0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output ids the restricted loss scores for a batch's ``labels`` and their logit offsets (None: all 0).

    ``</s>``, the target range (or, when it holds more than ``max_targets`` > 0 names, :func:`sampled_targets`), and
    ``n_negatives`` off-modality names (:func:`negative_ids`). On the labels' device; shapes fixed by the arguments.
    """
    start, stop = target_range
    device = labels.device
    eos = torch.full((1,), EOS_ID, dtype=torch.long, device=device)
    negatives = negative_ids(target_range, vocab_size, n_negatives, generator, device)
    if 0 < max_targets < stop - start:
        targets, target_offset = sampled_targets(target_range, labels, max_targets, generator)
        offset = torch.cat([torch.zeros(1, device=device), target_offset, torch.zeros(len(negatives), device=device)])
        return torch.cat([eos, targets, negatives]), offset
    return torch.cat([eos, torch.arange(start, stop, device=device), negatives]), None


def restricted_lm_loss(
    model: T5ForConditionalGeneration,
    batch: dict[str, torch.Tensor],
    target_range: tuple[int, int],
    n_negatives: int = 256,
    label_smoothing: float = 0.0,
    chunk_elements: int | None = None,
    generator: torch.Generator | None = None,
    decoder_hidden: torch.Tensor | None = None,
    reduction: str = "mean",
    max_targets: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of the target tokens over a restricted output vocabulary.

    Parameters
    ----------
    model
        The seq2seq model (unwrapped).
    batch
        ``input_ids``, ``attention_mask`` ``[B, S]`` and ``labels`` ``[B, T]`` (``-100`` = padding).
    target_range
        Half-open token-id range of the target modality's names.
    n_negatives
        Off-modality ids sampled at random (torch's global RNG unless ``generator``) and scored too;
        0 gives the deterministic loss over the target range and ``</s>`` used for validation.
    label_smoothing
        As in ``torch.nn.functional.cross_entropy``, spread over the scored ids.
    chunk_elements
        Largest number of logits held at once: positions are scored in chunks of
        ``chunk_elements // n_scored_ids`` rows, each chunk's gradients computed on the spot. None: 2**23
        (32 MB of float32 logits) on CPU, 2**27 (512 MB) on a GPU, where few large matrix products run
        faster than many small ones.
    decoder_hidden
        The decoder's hidden states when the caller already ran the model (:func:`decoder_hidden_states`).
    reduction
        ``mean`` (per target token) or ``sum``.
    max_targets
        When the target range holds more names than this (and > 0), a sampled softmax: the batch's target names and
        names drawn from the rest of the range, ``max_targets`` in all (:func:`sampled_targets`). The output layer's cost
        then no longer grows with the number of peaks. 0: every name of the range (validation uses that).

    Returns
    -------
    A scalar: the mean (or summed) loss per target token. The shapes of the work depend only on the batch's shapes, and
    nothing in it waits for the device. A label outside the scored ids (e.g. ``<unk>``) is scored too, its own logit one
    more column of its row's softmax.
    """
    hidden = decoder_hidden_states(model, batch) if decoder_hidden is None else decoder_hidden
    labels = batch["labels"]
    device = labels.device
    flat_labels = labels.reshape(-1)
    valid = flat_labels != -100
    safe_labels = flat_labels.clamp(min=0)
    vocab_size = model.config.vocab_size
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(device)
    if device.type == "cuda" and n_negatives > 0:
        # A multiple of 8 scored ids keeps the output-layer products on the aligned tensor-core kernels.
        n_scored = 1 + min(target_range[1] - target_range[0], max(max_targets, flat_labels.numel()) if max_targets > 0 else math.inf)
        n_negatives += -(n_scored + n_negatives) % 8
    ids, logit_offset = scored_ids(target_range, vocab_size, labels, n_negatives, max_targets, generator)
    position = torch.full((vocab_size,), -1, dtype=torch.long, device=device).scatter_(0, ids, torch.arange(len(ids), device=device))
    targets = position[safe_labels]
    outside = (targets < 0) & valid
    weight = output_weight(model, ids)
    label_weight = output_weight(model, safe_labels)
    rows = max(1, chunk_elements // max(1, len(ids)))
    total = _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, label_weight, targets.clamp(min=0), valid.to(torch.float32),
                                       outside, logit_offset, float(label_smoothing), rows)
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def full_vocabulary_loss(model: T5ForConditionalGeneration, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """The usual seq2seq loss over the whole vocabulary (for comparison with :func:`restricted_lm_loss`)."""
    hidden = decoder_hidden_states(model, batch)
    weight = output_weight(model, torch.arange(model.config.vocab_size, device=hidden.device))
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, label_smoothing=label_smoothing)


def truncate_sources(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_id: int, probability: float) -> torch.Tensor:
    """Hide, in the rows that start with ``prefix_id`` and with ``probability``, every name after the first ``k``.

    Rows are ``<prefix> names... </s> <pad>...``; ``k = ceil(n ** u)``, ``u ~ U(0, 1)``, for ``n`` names (log-uniform
    in ``[1, n]``). The prefix and ``</s>`` stay visible. Returns the new attention mask (torch's global RNG).
    """
    n_names = (attention_mask.sum(1) - 2).clamp(min=0).to(torch.float32)
    cut = (input_ids[:, 0] == prefix_id) & (torch.rand(len(input_ids), device=input_ids.device) < probability)
    keep = torch.ceil(n_names.clamp(min=1) ** torch.rand(len(input_ids), device=input_ids.device))
    position = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    hide = cut[:, None] & (position > keep[:, None]) & (position <= n_names[:, None])
    return attention_mask * ~hide


def downsample_sources(input_ids: torch.Tensor, attention_mask: torch.Tensor, counts: torch.Tensor, prefix_id: int, probability: float,
                       min_rate: float = DOWNSAMPLE_MIN_RATE) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin the UMI counts of GEX sources and write each again in the new rank order (augmentation).

    In the rows that start with ``prefix_id``, with ``probability``, each name's count (``counts`` ``[B, L]``, 0 off
    the names) is thinned binomially at a keep rate drawn uniformly in ``[min_rate, 1)`` for the row, as if the cell
    had been sequenced less deeply; the names are sorted again by their thinned counts (descending, ties in the old
    rank order) and those left with no count are hidden through the attention mask. The prefix, ``</s>`` and padding
    stay where they are. Returns the new ``(input_ids, attention_mask)`` (torch's global RNG).
    """
    rows = (input_ids[:, 0] == prefix_id) & (torch.rand(len(input_ids), device=input_ids.device) < probability)
    rate = min_rate + (1 - min_rate) * torch.rand(len(input_ids), 1, device=input_ids.device)
    thinned = torch.binomial(counts, rate.expand_as(counts))  # a count of 0 (prefix, </s>, padding) stays 0
    is_name = counts > 0
    # Sort key within each row: the prefix first, then the names by thinned count, then </s> and padding; a
    # stable sort keeps the old order among ties, so the untouched positions stay put.
    key = torch.where(is_name, -thinned, torch.full_like(thinned, 1.0))
    key[:, 0] = -float("inf")
    order = torch.sort(key, dim=1, stable=True).indices
    order = torch.where(rows[:, None], order, torch.arange(input_ids.shape[1], device=input_ids.device)[None, :])
    new_ids = torch.gather(input_ids, 1, order)
    dropped = torch.gather(is_name & (thinned == 0), 1, order) & rows[:, None]
    return new_ids, attention_mask * ~dropped


class TranslationLoss(nn.Module):
    """Wraps the seq2seq model so the losses run inside ``forward`` (what DDP needs to sync gradients).

    The loss of a batch is ``(sentence_nll + profile_weight * profile_loss) / n_target_tokens``:
    the restricted sentence cross-entropy (:func:`restricted_lm_loss`) plus, when ``profile_weight``
    is positive, the profile readout's loss (:func:`profile_loss`) on the batch's ``profile_values``
    ``[B, n_features]`` (every target feature of each cell, not only the capped sentence).
    ``offsets`` maps each target range's start id to its per-feature offset (see :func:`profile_loss`).
    ``source_dropout`` hides each source name (never the prefix or ``</s>``) with that probability
    during training, from torch's global RNG. ``gex_source_truncation`` cuts each GEX source (rows
    starting with ``gex_source_prefix``) with that probability during training to its top-ranked ``k``
    genes, ``k = ceil(n ** u)`` for ``n`` names and ``u ~ U(0, 1)`` (log-uniform in ``[1, n]``, median
    ``sqrt(n)``): short sentences of the most expressed genes, like the paper's binary ones, beside the
    whole ones. ``gex_source_downsample`` thins the counts of a GEX source (with that probability, a keep
    rate uniform in ``[0.2, 1)``) and writes it again in the thinned rank order (:func:`downsample_sources`;
    the batch then carries ``source_counts``). All hide names through the attention mask; evaluation always
    reads whole sources. ``max_scored_targets`` > 0: in training, a target modality with more names than that is
    scored by a sampled softmax (:func:`sampled_targets`); validation scores every name.
    """

    def __init__(
        self,
        model: T5ForConditionalGeneration,
        n_negatives: int = 256,
        label_smoothing: float = 0.0,
        profile_weight: float = 0.0,
        offsets: dict[int, tuple[torch.Tensor, bool]] | None = None,
        source_dropout: float = 0.0,
        gex_source_truncation: float = 0.0,
        gex_source_prefix: int | None = None,
        chunk_elements: int | None = None,
        gex_source_downsample: float = 0.0,
        max_scored_targets: int = 0,
    ):
        super().__init__()
        self.max_scored_targets = int(max_scored_targets)
        self.cuda_graphs = False  # compiled with CUDA graphs (compile_step)
        self.model = model
        self.chunk_elements = chunk_elements  # logits held at once by the restricted loss (None: by device)
        self.n_negatives = n_negatives
        self.label_smoothing = label_smoothing
        self.profile_weight = float(profile_weight)
        self.source_dropout = float(source_dropout)
        self.gex_source_truncation = float(gex_source_truncation)
        self.gex_source_downsample = float(gex_source_downsample)
        if (self.gex_source_truncation > 0 or self.gex_source_downsample > 0) and gex_source_prefix is None:
            raise ValueError("gex_source_truncation and gex_source_downsample need gex_source_prefix, the id of the GEX-source direction prefix")
        self.gex_source_prefix = gex_source_prefix
        self.binary: dict[int, bool] = {}
        for start, (offset, binary) in (offsets or {}).items():
            self.register_buffer(f"offset_{int(start)}", torch.as_tensor(offset, dtype=torch.float32), persistent=False)
            self.binary[int(start)] = bool(binary)
        # Detached 0-d tensors (per target token): reading them with float() waits for the device, so the
        # training loop only does that when it logs.
        self.last_parts: dict[str, torch.Tensor] = {}
        self.profile_head = ProfileHead(model.config.vocab_size, PROFILE_INPUTS * model.config.d_model) if self.profile_weight > 0 else None

    def compile_step(self, mode: str = "default") -> None:
        """Compile this module's forward, and so its backward, with ``torch.compile`` in ``mode`` (one of
        :data:`translator.compiled.COMPILE_MODES`), in place: the state dict keeps its keys. The linear layers that read
        one input become one matrix product (:class:`translator.compiled.JoinSharedInputLinears`). The step's shapes depend
        only on the batch's, so a new batch shape compiles once more and then the sizes are kept symbolic. With CUDA graphs
        (``reduce-overhead``, ``max-autotune``) :attr:`cuda_graphs` is set: a replay overwrites the last one's outputs."""
        self.compile(options=compile_options(mode))
        self.cuda_graphs = mode in CUDA_GRAPH_MODES

    def forward(self, input_ids, attention_mask, labels, target_start, target_stop, profile_values=None, full_vocabulary: bool = False,
                source_counts=None):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if full_vocabulary:
            return full_vocabulary_loss(self.model, batch, self.label_smoothing)
        if self.training and self.gex_source_downsample > 0 and source_counts is not None:
            input_ids, attention_mask = downsample_sources(input_ids, attention_mask, source_counts, self.gex_source_prefix, self.gex_source_downsample)
            batch.update(input_ids=input_ids, attention_mask=attention_mask)
        if self.training and self.gex_source_truncation > 0:
            attention_mask = truncate_sources(input_ids, attention_mask, self.gex_source_prefix, self.gex_source_truncation)
            batch["attention_mask"] = attention_mask
        if self.training and self.source_dropout > 0:
            hide = torch.rand(input_ids.shape, device=input_ids.device) < self.source_dropout
            hide[:, 0] = False
            hide &= input_ids != EOS_ID
            attention_mask = attention_mask * ~hide
            batch["attention_mask"] = attention_mask
        n_negatives = self.n_negatives if self.training else 0
        label_smoothing = self.label_smoothing if self.training else 0.0
        target_range = (int(target_start), int(target_stop))
        encoder_hidden = encode(self.model, input_ids, attention_mask)
        decoder_hidden = decoder_hidden_states(self.model, batch, encoder_hidden)
        n_positions = (labels != -100).sum().clamp(min=1)  # a tensor: no wait for the device here
        sentence = restricted_lm_loss(self.model, batch, target_range, n_negatives, label_smoothing, decoder_hidden=decoder_hidden, reduction="sum",
                                      chunk_elements=self.chunk_elements, max_targets=self.max_scored_targets if self.training else 0)
        total = sentence
        self.last_parts = {"sentence": sentence.detach() / n_positions}
        if self.profile_weight > 0 and profile_values is not None:
            scores = profile_scores(self.model, encoder_hidden, attention_mask, input_ids, target_range, self.profile_head)
            offset = getattr(self, f"offset_{target_range[0]}")
            profile = profile_loss(scores, offset, profile_values, self.binary[target_range[0]])
            total = total + self.profile_weight * profile
            self.last_parts["profile"] = profile.detach() / n_positions
        return total / n_positions
