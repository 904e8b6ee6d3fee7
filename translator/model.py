"""The T5 over cell sentences: its configuration and shapes, and the profile head that reads every target feature at once.

The readout's file in the model folder is ``profile_head.safetensors`` (:data:`PROFILE_HEAD_FILE`); the losses that train
both are in :mod:`translator.loss`, decoding in :mod:`translator.decode`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

PAD_ID, EOS_ID = 0, 1

MODEL_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "d_kv": 16},
    "small": {"d_model": 192, "d_ff": 768, "num_layers": 3, "num_decoder_layers": 3, "num_heads": 4, "d_kv": 48},
    "t5-small": {"d_model": 512, "d_ff": 2048, "num_layers": 6, "num_decoder_layers": 6, "num_heads": 8, "d_kv": 64},
}


def make_config(model_size: str, vocab_size: int, dropout_rate: float = 0.1, max_length: int = 512, attn_implementation: str | None = None) -> T5Config:
    """A ``T5Config`` of one of the shapes in :data:`MODEL_SHAPES` over our vocabulary.

    ``pad`` = decoder start = 0 and ``</s>`` = 1, as in the tokenizer. transformers 5 always shares
    the input and output embedding matrix of T5; its ``tie_word_embeddings`` flag only chooses
    whether decoder outputs are scaled by ``d_model ** -0.5``. We keep the scaling: without it the
    randomly initialised output layer (std 1) starts with logits of std ~sqrt(d_model).
    ``attn_implementation`` (``eager``, ``sdpa``, ``flex_attention``; None: transformers' choice, ``sdpa`` where torch
    has it) is how attention is computed; every choice adds T5's relative position bias.
    """
    if model_size not in MODEL_SHAPES:
        raise ValueError(f"--model_size {model_size!r} is unknown; choose one of {', '.join(MODEL_SHAPES)}")
    return T5Config(
        vocab_size=int(vocab_size),
        dropout_rate=float(dropout_rate),
        feed_forward_proj="relu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        n_positions=int(max_length),
        attn_implementation=attn_implementation,
        **MODEL_SHAPES[model_size],
    )


def make_model(config: T5Config, seed: int | None = None) -> T5ForConditionalGeneration:
    """Randomly initialised ``T5ForConditionalGeneration`` (no Hub weights are needed or reachable)."""
    if seed is not None:
        torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def output_weight(model: T5ForConditionalGeneration, ids: torch.Tensor) -> torch.Tensor:
    """Rows of the output layer for ``ids``, with T5's output scaling folded in when the config asks for it."""
    weight = model.lm_head.weight[ids]
    if getattr(model.config, "scale_decoder_outputs", False):
        weight = weight * (model.config.d_model**-0.5)
    return weight


def prepared_mask(model: T5ForConditionalGeneration, mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """A padding mask ``[B, K]`` (1 = a token) in the 4-D form the model's attention takes as it is: ``[B, 1, 1, K]``, or
    ``[B, 1, K, K]`` with ``causal`` (a decoder's self-attention).

    Given a 2-D mask, transformers reads it back from the device to decide whether SDPA may skip it (a wait for the
    device on every call); a prepared mask is used as it is. Boolean for SDPA, additive (0 or the dtype's minimum) for
    eager attention, as transformers prepares them; other implementations get the 2-D mask.
    """
    implementation = model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        return mask
    keep = mask.bool()[:, None, None, :]
    if causal:
        length = mask.shape[1]
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=model.dtype, device=mask.device).masked_fill_(~keep, torch.finfo(model.dtype).min)


def encode(model: T5ForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states ``[B, S, d]`` of a batch of sources."""
    return model.encoder(input_ids=input_ids, attention_mask=prepared_mask(model, attention_mask)).last_hidden_state


def decoder_hidden_states(model: T5ForConditionalGeneration, batch: dict[str, torch.Tensor], encoder_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Run encoder (unless ``encoder_hidden`` is given) and decoder (teacher forcing); return the last decoder hidden states ``[B, T, d]``."""
    labels = batch["labels"]
    decoder_input_ids = model._shift_right(labels)
    if encoder_hidden is None:
        encoder_hidden = encode(model, batch["input_ids"], batch["attention_mask"])
    decoder_out = model.decoder(
        input_ids=decoder_input_ids,
        attention_mask=prepared_mask(model, labels != -100, causal=True),
        encoder_hidden_states=encoder_hidden,
        encoder_attention_mask=prepared_mask(model, batch["attention_mask"]),
        use_cache=False,
    )
    return decoder_out.last_hidden_state


PROFILE_HEAD_FILE = "profile_head.safetensors"


PROFILE_INPUTS = 3  # decoder state after the prefix, mean encoder state, mean input embedding


class ProfileHead(nn.Module):
    """Per-feature weights of the profile readout, ``[vocab_size, 3 * d_model]``, and biases ``[vocab_size]``.

    Its input (:func:`profile_features`) is the decoder's state after the direction prefix, the mean of
    the encoder's states and the mean of the source's input embeddings, scaled by ``d_model ** -0.5``
    (as T5 scales its own output layer: with Adam every weight moves by about the learning rate a
    step, and unscaled a step would move each score by ~``lr * d_model``). The weights start at
    zero, so the readout starts exactly at the per-feature train mean; the bias is a buffer that only
    the closed-form refit after training sets (:mod:`translator.profile_fit`). Kept apart from the T5
    weights (``profile_head.safetensors``) so the folder still loads with ``AutoModelForSeq2SeqLM``.
    """

    def __init__(self, vocab_size: int, n_inputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, n_inputs))
        self.register_buffer("bias", torch.zeros(vocab_size))

    def forward(self, features: torch.Tensor, target_range: tuple[int, int]) -> torch.Tensor:
        start, stop = target_range
        return features @ self.weight[start:stop].T + self.bias[start:stop]

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file({"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}, str(path))

    @classmethod
    def load(cls, path) -> ProfileHead:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        head = cls(*tensors["weight"].shape)
        head.load_state_dict(tensors)
        return head.eval()


def cuda_tf32(enabled: bool):
    """Allow (or forbid) TF32 tensor cores for CUDA fp32 matrix products; CPU products are untouched.

    Returns a function that puts the previous setting back (torch >= 2.9 names it ``fp32_precision``, older ``allow_tf32``).
    """
    matmul = torch.backends.cuda.matmul
    key = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    saved = getattr(matmul, key)
    setattr(matmul, key, ("tf32" if enabled else "ieee") if key == "fp32_precision" else enabled)
    return lambda: setattr(matmul, key, saved)


def profile_features(model: T5ForConditionalGeneration, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """What the profile head reads, ``[B, 3 * d_model]`` scaled by ``d_model ** -0.5``.

    The decoder's last hidden state after one step whose input is the direction prefix (the source's
    first token), the masked mean of the encoder's last hidden states, and the masked mean of the
    source's input embeddings (which start as the train split's LSI vectors, ``--embedding_init lsi``).
    """
    out = model.decoder(
        input_ids=input_ids[:, :1],
        encoder_hidden_states=encoder_hidden,
        encoder_attention_mask=prepared_mask(model, attention_mask),
        use_cache=False,
    )
    mask = attention_mask[..., None].to(encoder_hidden.dtype)
    count = mask.sum(1).clamp(min=1)
    pooled = (encoder_hidden * mask).sum(1) / count
    embedded = (model.get_input_embeddings()(input_ids) * mask).sum(1) / count
    features = torch.cat([out.last_hidden_state[:, 0], pooled, embedded], dim=1)
    return features * model.config.d_model**-0.5


def profile_scores(
    model: T5ForConditionalGeneration,
    encoder_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    target_range: tuple[int, int],
    head: ProfileHead | None = None,
) -> torch.Tensor:
    """The profile readout's scores over every target feature ``[B, n_features]`` (one decoder step, no decoding).

    ``z_k = f . u_k + c_k`` with ``f`` = :func:`profile_features` and ``u_k, c_k`` the
    :class:`ProfileHead` row of feature ``k`` (without a head: ``z_k = h . e_k``, the decoder state
    after the prefix against the tied output embedding). Trained by :func:`profile_loss` as a
    residual over the per-feature train mean (ATAC: ``P = sigmoid(logit(mean_k) + z_k)``; GEX:
    ``value = mean_g + z_g``), so an uninformed model stays at what the mean knows. The sentence's
    own first step (decoder input ``<pad>``) is a different step, so the two objectives do not
    compete for it.
    """
    start, stop = target_range
    if head is not None:
        return head(profile_features(model, encoder_hidden, attention_mask, input_ids), target_range).float()
    out = model.decoder(input_ids=input_ids[:, :1], encoder_hidden_states=encoder_hidden, encoder_attention_mask=prepared_mask(model, attention_mask),
                        use_cache=False)
    weight = output_weight(model, torch.arange(start, stop, device=encoder_hidden.device))
    return (out.last_hidden_state[:, 0] @ weight.T).float()
