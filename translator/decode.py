"""Constrained greedy decoding: a batched loop with a key/value cache that only ever proposes names of the target
modality, never repeats one, and for ATAC keeps the genomic order (increasing token id)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Stack

from .model import EOS_ID, PAD_ID, output_weight

# transformers 5.24 renamed the decoder's ``past_key_values`` argument to ``cache`` (the old name goes in 5.40; before
# 5.24 an unknown ``cache`` was silently ignored, which would decode without history). The cache object is filled in
# place, so we pass it under the installed version's name and never read it back from the output.
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(T5Stack.forward).parameters else "past_key_values"


PRECISIONS = ("auto", "float32", "bf16")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles or AVX512-BF16), where oneDNN runs bf16 products
    several times faster than float32 ones; elsewhere bf16 on a CPU is emulated and slower."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``float32`` or ``bf16``: the encoder's precision for prediction on ``device``.

    ``auto`` is ``bf16`` on a CPU with hardware bf16 products (:func:`cpu_has_fast_bf16`) and ``float32`` anywhere else.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cpu" and cpu_has_fast_bf16() else "float32"
    return precision


def bf16_encoder(model: T5ForConditionalGeneration) -> T5Stack:
    """A bfloat16 copy of ``model``'s encoder (its own copy of the token embedding, so the decoder and the output layer keep
    float32 weights). T5's layer norms compute their variance in float32; the hidden states it returns are bf16."""
    encoder = copy.deepcopy(model.encoder).to(torch.bfloat16).eval()
    encoder.requires_grad_(False)
    return encoder


@dataclass
class DecodeResult:
    """Output of :func:`constrained_decode`: generated ids and the per-feature aggregates of step probabilities."""

    sequences: list[list[int]]
    aggregates: dict[str, torch.Tensor]


@torch.no_grad()
def constrained_decode(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_range: tuple[int, int],
    ordered: bool,
    max_new_tokens: int,
    step_weight: Callable[[int], float] | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    encoder_hidden: torch.Tensor | None = None,
) -> DecodeResult:
    """Greedy (or sampled) decoding restricted to the target modality's names, with a key/value cache.

    Each step names the most likely allowed name, or ends the sentence when ``</s>`` has probability
    at least 0.5. With ``generator``, each step instead draws its name or ``</s>`` from the allowed
    names' distribution at ``temperature`` (one sampled sentence per source; the aggregates are those
    of the drawn path's steps). Allowed names are those of ``target_range`` not generated yet; with ``ordered``
    (ATAC targets, written in genomic order = increasing id) only names after the previous one.
    The step's distribution over the allowed names is aggregated per feature while decoding, so
    nothing of size ``[steps, cells, features]`` is kept:

    - ``noisy_or``: ``1 - prod_t (1 - p_t(k))`` (probability that feature k is named at some step);
    - ``sum``: ``sum_t p_t(k)`` (expected number of times k is named);
    - ``weighted``: ``sum_t p_t(k) * step_weight(t)`` (e.g. the mean value of the gene at rank t).

    ``encoder_hidden``: the encoder's states of ``input_ids`` when the caller has them (they are not computed again).

    Returns
    -------
    :class:`DecodeResult` with the generated ids (without ``</s>``) and the aggregates ``[B, n_features]``.
    """
    model.eval()
    start, stop = target_range
    n_features = stop - start
    batch_size = input_ids.shape[0]
    device = input_ids.device
    if encoder_hidden is None:
        encoder_hidden = model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    ids = torch.cat([torch.tensor([EOS_ID], device=device), torch.arange(start, stop, device=device)])
    weight = output_weight(model, ids)
    banned = torch.zeros(batch_size, n_features + 1, dtype=torch.bool, device=device)
    last = torch.full((batch_size,), -1, dtype=torch.long, device=device)
    active = torch.ones(batch_size, dtype=torch.bool, device=device)
    log_none = torch.zeros(batch_size, n_features, device=device)
    total = torch.zeros(batch_size, n_features, device=device)
    weighted = torch.zeros(batch_size, n_features, device=device)
    sequences: list[list[int]] = [[] for _ in range(batch_size)]
    step_input = torch.full((batch_size, 1), PAD_ID, dtype=torch.long, device=device)
    column = torch.arange(n_features + 1, device=device)
    for step in range(max_new_tokens):
        out = model.decoder(
            input_ids=step_input,
            encoder_hidden_states=encoder_hidden,
            encoder_attention_mask=attention_mask,
            use_cache=True,
            **{_CACHE_ARGUMENT: cache},
        )
        logits = (out.last_hidden_state[:, -1] @ weight.T).float()
        allowed = ~banned
        if ordered:
            allowed &= (column[None, :] > last[:, None] + 1) | (column[None, :] == 0)
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        feature_probs = probs[:, 1:] * active[:, None]
        log_none += torch.log1p(-feature_probs.clamp(max=1 - 1e-6))
        total += feature_probs
        if step_weight is not None:
            weighted += feature_probs * step_weight(step)
        # Stop only when </s> holds most of the mass. A plain argmax lets </s> win as the single most
        # likely token while continuing is far more likely overall (the mass is spread over thousands of
        # names), and an undertrained model then emits nothing at all.
        if generator is None:
            choice = torch.where(probs[:, 0] >= 0.5, torch.zeros_like(last), probs[:, 1:].argmax(dim=-1) + 1)
        else:
            draw = probs if temperature == 1.0 else torch.softmax(logits / temperature, dim=-1)
            choice = torch.multinomial(draw, 1, generator=generator).squeeze(1)
        finished = (choice == 0) | ~active
        for row in torch.nonzero(~finished).flatten().tolist():
            sequences[row].append(start + int(choice[row]) - 1)
        banned[torch.arange(batch_size, device=device), choice] |= ~finished
        banned[:, 0] = False
        last = torch.where(finished, last, choice - 1)
        active &= ~finished
        if not active.any():
            break
        step_input = torch.where(active, start + choice - 1, torch.full_like(choice, PAD_ID))[:, None]
    aggregates = {"noisy_or": 1 - torch.exp(log_none), "sum": total}
    if step_weight is not None:
        aggregates["weighted"] = weighted
    return DecodeResult(sequences=sequences, aggregates=aggregates)
