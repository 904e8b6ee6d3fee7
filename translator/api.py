"""The user API: load a model folder (or Hub id) and translate sentences, matrices or AnnData.

```python
from translator import CellTranslator
tr = CellTranslator.from_pretrained("outputs/simulated")
tr.translate(["<gene> <gene> ..."], direction="gex2atac")           # list[str]
tr.predict_matrix(sentences, direction="gex2atac")                  # [cells, peaks] probabilities
tr.predict_anndata("cells.h5ad", direction="atac2gex")              # AnnData cells x genes
```
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataset_builder import META_FILE
from tokenizer import (
    DIRECTIONS,
    PREFIX,
    SOURCE_MODALITY,
    TARGET_MODALITY,
    check_same_features,
    encode_names,
    feature_token_ranges,
)

from .data import source_ids
from .decode import bf16_encoder, resolve_precision
from .model import PROFILE_HEAD_FILE, ProfileHead
from .predictor import DirectionBlend, load_blend
from .readout import READOUT_FILE, apply_readout, decode_features, is_profile
from .source_kernel import source_indicator

logger = logging.getLogger(__name__)

ENSEMBLE_REFERENCE, ENSEMBLE_FIX = "the main model's", "ensemble only models of one dataset and tokenizer"
REQUIRED_FILES = ("config.json", "tokenizer.json", META_FILE)


def _resolve(path_or_id: str | os.PathLike) -> Path:
    path = Path(path_or_id)
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"model folder {text} not found; pass a folder written by train.py or a Hub id like user/model")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text))
    except Exception as err:  # offline, unknown repo, no access: one clear line
        raise FileNotFoundError(f"could not fetch the model {text} from the Hub ({type(err).__name__}); pass a local folder") from err


def _folder_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not readable JSON ({err}); the model folder is incomplete or damaged: copy or download it again"
        ) from None


def check_model_folder(folder: Path, allow_pickle: bool = False) -> None:
    """Raise ``FileNotFoundError``/``ValueError`` naming what a model folder lacks or holds unsafely."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).exists()]
    has_safetensors = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if not has_safetensors and pickled and not allow_pickle:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickled)}), which can run code when loaded; "
            "convert them to safetensors, or if you trust the source pass allow_pickle=True (predict.py, eval.py: --allow_pickle)"
        )
    if not has_safetensors and not pickled:
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(f"model folder {folder} lacks {', '.join(missing)}; point at a complete folder written by train.py")


def resolve_device(device: str | None) -> str:
    """``auto`` / None: ``cuda`` when torch sees a GPU, else ``cpu``; any other value is checked and kept."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here; use --device cpu (or auto)")
    try:
        torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device; use auto, cpu or cuda[:N]") from err
    return device


def device_name(device: str) -> str:
    """``cpu`` or ``cuda:N (the GPU's name)``, as recorded in eval_results.json."""
    import torch

    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device


class CellTranslator:
    """A trained translator: model, tokenizer, dataset metadata and readout calibration."""

    def __init__(self, model, tokenizer, meta: dict, readout: dict | None = None, profile_head=None,
                 members: Sequence[CellTranslator] = (), blend: dict[str, DirectionBlend] | None = None):
        self.members = list(members)  # ensemble folders (translator.ensemble): more models whose matrices are averaged with this one's
        self.blend = dict(blend or {})  # translator.predictor: {direction: DirectionBlend} of the transformer, source kernel and mean, applied last
        self.model = model.eval()
        self.profile_head = profile_head.eval() if profile_head is not None else None
        self.tokenizer = tokenizer
        self.meta = meta
        self.readout = readout or {}
        self.ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
        self.max_source_length = int(self.readout.get("max_source_length", 512))
        self.max_target_length = int(self.readout.get("max_target_length", 512))
        self.last_stats: dict[str, int] = {}
        self._encoders: dict[tuple[str, str], object] = {}  # (precision, device) -> a lower-precision copy of the encoder
        self.name_or_path: str | None = None  # the folder or Hub id given to from_pretrained

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, device: str | None = None, allow_pickle: bool = False) -> CellTranslator:
        """Load a folder written by ``train.py`` or a Hub repository id (offline when a folder is given); an ensemble folder
        (``python -m translator.ensemble``) loads its members too, and the blend of the transformer with the source kernel and the
        per-feature mean (``translator.predictor``) its arrays."""
        folder = _resolve(path_or_id)
        translator = cls._load(folder, device, allow_pickle, ensemble=True)
        translator.name_or_path = str(path_or_id)  # recorded in predictions' uns: which model made them
        return translator

    @classmethod
    def _load(cls, folder: Path, device: str | None, allow_pickle: bool, ensemble: bool) -> CellTranslator:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        check_model_folder(folder, allow_pickle)
        model = AutoModelForSeq2SeqLM.from_pretrained(str(folder), use_safetensors=not allow_pickle or None)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        meta = _folder_json(folder / META_FILE)
        readout_path = folder / READOUT_FILE
        readout = _folder_json(readout_path) if readout_path.exists() else None
        head_path = folder / PROFILE_HEAD_FILE
        profile_head = ProfileHead.load(head_path) if head_path.exists() else None
        if device:  # "auto": a GPU when torch sees one
            device = resolve_device(device)
            model.to(device)
            if profile_head is not None:
                profile_head.to(device)
        members = []
        for name in (readout or {}).get("ensemble", []) if ensemble else []:
            member_folder = folder / name
            if not member_folder.is_dir():
                raise FileNotFoundError(f"model folder {folder} names ensemble member {name}, which it lacks; copy the whole folder")
            members.append(cls._load(member_folder, device, allow_pickle, ensemble=False))
            check_same_features(meta, members[-1].meta, f"ensemble member {name} of {folder}", reference=ENSEMBLE_REFERENCE,
                                fix=ENSEMBLE_FIX, tokenizers=(tokenizer, members[-1].tokenizer))
        blend = load_blend(folder, readout) if ensemble else {}
        return cls(model, tokenizer, meta, readout, profile_head, members, blend)

    # -- sentences -> ids ------------------------------------------------------------------
    def _check_direction(self, direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r} is unknown; choose gex2atac or atac2gex")

    def encode_sources(self, sentences: Sequence[str], direction: str, allow_empty: bool = False) -> list[np.ndarray]:
        """Token ids ``<prefix> names </s>`` of each source sentence; unknown names are dropped and counted."""
        self._check_direction(direction)
        if isinstance(sentences, str):
            raise ValueError("pass a list of sentences, not one string")
        start, stop = self.ranges[SOURCE_MODALITY[direction]]
        out, unknown = [], 0
        for i, ids in enumerate(encode_names(self.tokenizer, sentences)):
            if not len(ids) and not allow_empty:
                raise ValueError(f"source sentence {i} is empty; a cell needs at least one detected {SOURCE_MODALITY[direction]} feature")
            known = (ids >= start) & (ids < stop)  # <unk> and the other modality's names fall outside
            unknown += int((~known).sum())
            out.append(source_ids(ids[known], direction, self.tokenizer, self.max_source_length))
        self.last_stats = {"cells": len(out), "unknown_source_names": unknown}
        if unknown:
            logger.warning("%d source names are not %s names of this model and were ignored", unknown, SOURCE_MODALITY[direction])
        return out

    def gene_source_ids(self, offsets: np.ndarray, tokens: np.ndarray, direction: str = "gex2atac") -> list[np.ndarray]:
        """:meth:`encode_sources` of GEX sentences given as their genes' token ids (cell ``i``: ``tokens[offsets[i]:offsets[i + 1]]``,
        every one a gene of the model), vectorized: ``<prefix> top-ranked names </s>``, as :func:`translator.data.source_ids`."""
        offsets = np.asarray(offsets, dtype=np.int64)
        n = np.diff(offsets)
        cap = max(0, self.max_source_length - 2)
        position = np.arange(int(offsets[-1] - offsets[0])) - np.repeat(offsets[:-1] - offsets[0], n)
        lengths = np.minimum(n, cap) + 2
        ends = np.cumsum(lengths)
        flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
        body = np.ones(flat.size, dtype=bool)
        body[ends - lengths] = body[ends - 1] = False
        flat[ends - lengths] = self.tokenizer.convert_tokens_to_ids(PREFIX[direction])
        flat[ends - 1] = self.tokenizer.eos_token_id
        flat[body] = np.asarray(tokens, dtype=np.int64)[offsets[0]:offsets[-1]][position < cap]
        self.last_stats = {"cells": len(n), "unknown_source_names": 0}
        return np.split(flat, ends[:-1])

    # -- prediction ------------------------------------------------------------------------
    def encoder_for(self, precision: str = "auto"):
        """The encoder that prediction runs at ``precision`` (:data:`translator.decode.PRECISIONS`): ``None`` for the model's own
        float32 encoder, or a bf16 copy of it, made once (``auto``: bf16 on a CPU with hardware bf16 products)."""
        device = next(self.model.parameters()).device
        resolved = resolve_precision(precision, device)
        if resolved == "float32":
            return None
        key = (resolved, str(device))
        if key not in self._encoders:
            self._encoders[key] = bf16_encoder(self.model)
        return self._encoders[key]

    def _predict_ids(self, ids: Sequence[np.ndarray], direction: str, batch_size: int, need_sentences: bool = True,
                     precision: str = "auto", profile_out: np.ndarray | None = None):
        blend = self.blend.get(direction)
        if blend is not None and not blend.needs_transformer and not need_sentences:  # the kernel and the mean need no model
            return blend.combine(None, source_indicator(ids, self.ranges[SOURCE_MODALITY[direction]])), []
        target_range = self.ranges[TARGET_MODALITY[direction]]
        params = (self.readout.get("calibration") or {}).get(direction)
        # The profile readout needs one decoder step; greedy decoding only runs when sentences are asked for.
        decode = need_sentences or not is_profile(params)
        features, sequences = decode_features(
            self.model, self.tokenizer, self.meta, ids, direction, target_range, self.max_target_length, batch_size,
            decode=decode, profile_head=self.profile_head, encoder=self.encoder_for(precision), profile_out=profile_out,
        )
        matrix = apply_readout(features, direction, self.meta, params, in_place=True)
        if self.members:  # an ensemble: the mean of every member's calibrated matrix (the sentences are this model's)
            matrix = np.mean([matrix, *(m._predict_ids(ids, direction, batch_size, False, precision)[0] for m in self.members)], axis=0)
        if blend is not None:  # w_t * transformer + w_k * the kernel on the source's names + w_m * the per-feature mean
            matrix = blend.combine(matrix, source_indicator(ids, self.ranges[SOURCE_MODALITY[direction]]), in_place=True)
        sentences = [" ".join(self.tokenizer.convert_ids_to_tokens(seq)) for seq in sequences]
        return matrix, sentences

    def translate(self, sentences: Sequence[str], direction: str, batch_size: int = 64, precision: str = "auto") -> list[str]:
        """Translate source sentences into target sentences (constrained greedy decoding)."""
        return self._predict_ids(self.encode_sources(sentences, direction), direction, batch_size, precision=precision)[1]

    def predict_matrix(self, source_sentences: Sequence[str], direction: str, batch_size: int = 64, return_sentences: bool = False,
                       precision: str = "auto"):
        """Predict every target feature of every cell.

        ``precision``: the encoder's, ``float32``, ``bf16`` or ``auto`` (bf16 on a CPU with hardware bf16 products, AMX or
        AVX512-BF16, float32 elsewhere); the decoder step, the profile head and the readout stay float32.

        Returns
        -------
        ``np.ndarray`` float32 ``[cells, features]``: accessibility probabilities (``gex2atac``) or
        expected log-norm expression (``atac2gex``); with ``return_sentences`` also the translations.
        """
        ids = self.encode_sources(source_sentences, direction, allow_empty=True)
        matrix, sentences = self._predict_ids(ids, direction, batch_size, need_sentences=return_sentences, precision=precision)
        return (matrix, sentences) if return_sentences else matrix

    def predict_anndata(self, adata_or_path, direction: str, batch_size: int = 64, return_sentences: bool = False,
                        gex_modality: str = "rna", atac_modality: str = "atac", counts_layer: str | None = None,
                        precision: str = "auto"):
        """AnnData or MuData in (or a file in any layout ``dataset_builder`` reads), AnnData out: cells x the model's
        target features. ``gex_modality`` / ``atac_modality`` name the modalities of a MuData or ``.h5mu``;
        ``counts_layer`` the layer of raw counts when ``X`` is normalized; ``precision`` as :meth:`predict_matrix`'s."""
        from .anndata_io import prediction_anndata, source_sentences_from_anndata

        self._check_direction(direction)
        sentences, cells, stats = source_sentences_from_anndata(
            adata_or_path, direction, self.meta, gex_modality=gex_modality, atac_modality=atac_modality, counts_layer=counts_layer
        )
        # Sentences only when asked for: with the profile readout the matrix needs one decoder step, not greedy decoding.
        out = self.predict_matrix(sentences, direction, batch_size, return_sentences=return_sentences, precision=precision)
        matrix, translated = out if return_sentences else (out, None)
        stats.update(self.last_stats)
        return prediction_anndata(matrix, cells, direction, self.meta, stats, translated if return_sentences else None, self.name_or_path)

    def predict_h5ad(self, adata_or_path, direction: str, output: str | os.PathLike, batch_size: int = 64, chunk_cells: int = 1024,
                     return_sentences: bool = False, gex_modality: str = "rna", atac_modality: str = "atac",
                     counts_layer: str | None = None, progress: bool = False, precision: str = "auto") -> dict:
        """Like ``predict_anndata(...).write_h5ad(output)``, but ``chunk_cells`` cells at a time.

        Memory holds the source matrix and one chunk of sentences and predictions, not every sentence nor the
        whole ``cells x features`` matrix (69,249 cells x 116,490 peaks would be 32 GB of float32). Returns the ``uns['cell_translation']``
        counts. Writes ``output`` in place: callers wanting all-or-nothing write to a temporary name first.
        ``progress``: a tqdm bar over cells on stderr, shown only when stderr is a terminal; ``precision`` as
        :meth:`predict_matrix`'s.
        """
        from tqdm.auto import tqdm

        from .anndata_io import source_sentence_blocks, write_prediction_h5ad

        self._check_direction(direction)
        if chunk_cells < 1:
            raise ValueError(f"--chunk_cells must be >= 1, got {chunk_cells}")
        self.encoder_for(precision)  # an unknown precision fails before the input is read; the bf16 copy is made once
        # Sentences are made chunk by chunk too: memory holds the source matrix and one chunk, not every sentence. GEX
        # sentences come as their genes' token ids: the same names, without writing and splitting text.
        gene_tokens = self.tokenizer.convert_tokens_to_ids if SOURCE_MODALITY[direction] == "gex" else None
        sentence_blocks, cells, stats, n_cells = source_sentence_blocks(
            adata_or_path, direction, self.meta, block=chunk_cells, gene_tokens=gene_tokens, gex_modality=gex_modality,
            atac_modality=atac_modality, counts_layer=counts_layer,
        )
        unknown = 0
        # Two [chunk, features] arrays take turns (the writer holds one block while the next is predicted): the profile
        # scores, their readout and the blend are written over them in place, instead of over fresh pages every chunk,
        # whose first touch cost about as much as the copy itself.
        n_features = len(self.meta["peaks" if TARGET_MODALITY[direction] == "atac" else "genes"])
        buffers: list[np.ndarray] = []

        def blocks():
            nonlocal unknown
            with tqdm(total=n_cells, unit="cell", desc=f"predicting {direction}", disable=None if progress else True) as bar:
                for index, sentences in enumerate(sentence_blocks):
                    ids = self.gene_source_ids(*sentences, direction) if gene_tokens else self.encode_sources(sentences, direction, allow_empty=True)
                    unknown += self.last_stats["unknown_source_names"]
                    if len(buffers) < 2:
                        buffers.append(np.empty((min(chunk_cells, n_cells), n_features), dtype=np.float32))
                    matrix, translated = self._predict_ids(ids, direction, batch_size, return_sentences, precision, buffers[index % 2])
                    bar.update(len(ids))
                    yield matrix, translated if return_sentences else None

        def final_stats() -> dict:
            return {**stats, "cells": n_cells, "unknown_source_names": unknown}

        write_prediction_h5ad(output, blocks(), n_cells, cells, direction, self.meta, final_stats, self.name_or_path)
        self.last_stats = {"cells": n_cells, "unknown_source_names": unknown}
        return final_stats()


def translate(model: str | os.PathLike | CellTranslator, sentences: Sequence[str], direction: str, batch_size: int = 64) -> list[str]:
    """Translate sentences with a model folder, Hub id or loaded :class:`CellTranslator`."""
    translator = model if isinstance(model, CellTranslator) else CellTranslator.from_pretrained(model)
    return translator.translate(sentences, direction, batch_size)
