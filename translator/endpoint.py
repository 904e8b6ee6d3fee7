"""Hugging Face Inference Endpoints handler of a cell translator (shipped as ``handler.py`` in every model folder).

The endpoint runtime imports ``handler.py`` from the repository, makes ``EndpointHandler(path)`` with the
repository's local path, and calls it with the request's JSON body. The endpoint image needs this project's
package (``translator``) installed, e.g. through a ``requirements.txt`` beside the handler.

Request::

    {"inputs": "CD74 HLA-DRA ..." or ["...", "..."],
     "parameters": {"direction": "gex2atac", "top_k": 10, "values": true}}

``direction`` may be left out when every sentence starts with its prefix (``<gex2atac>`` / ``<atac2gex>``).
Answer: one dict per sentence, ``{"translation": "<target names>"}``, with ``top_features`` (the ``top_k``
target features of highest predicted value, ``[{"feature": name, "value": v}]``) when ``top_k`` > 0, and
``values`` (every target feature's value, in the order of ``cell_sentences.json``'s ``peaks`` or ``genes``)
when ``values`` is true. Values are accessibility probabilities (``gex2atac``) or expected log-normalized
expression (``atac2gex``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

PREFIXES = {"<gex2atac>": "gex2atac", "<atac2gex>": "atac2gex"}
VALUE_KINDS = {"gex2atac": "accessibility probability", "atac2gex": "expected log-normalized expression"}


class EndpointHandler:
    """Translate cell sentences and predict every target feature's value with the model in ``path``."""

    def __init__(self, path: str = ""):
        from translator import CellTranslator

        self.translator = CellTranslator.from_pretrained(path or ".", device="auto")

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Answer one request (see the module docstring); bad input raises ``ValueError`` with what to send instead."""
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('send {"inputs": sentence or list of sentences, "parameters": {"direction": "gex2atac" | "atac2gex"}}')
        inputs = data["inputs"]
        sentences = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
            raise ValueError('"inputs" must be a sentence of feature names or a non-empty list of them')
        params = data.get("parameters") or {}
        unknown = sorted(set(params) - {"direction", "top_k", "values", "batch_size"})
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; use direction, top_k, values, batch_size")
        direction, sentences = self._direction(sentences, params.get("direction"))
        top_k = params.get("top_k", 0)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f'"top_k" must be a whole number >= 0, got {top_k!r}')
        batch_size = params.get("batch_size", 64)
        matrix, translations = self.translator.predict_matrix(sentences, direction, batch_size=batch_size, return_sentences=True)
        names = self.translator.meta["peaks" if direction == "gex2atac" else "genes"]
        top_k = min(top_k, len(names))
        answers = []
        for i, translation in enumerate(translations):
            answer: dict[str, Any] = {"translation": translation}
            if top_k:
                row = matrix[i]
                best = np.argpartition(-row, top_k - 1)[:top_k]
                best = best[np.lexsort((best, -row[best]))]
                answer["top_features"] = [{"feature": names[j], "value": float(row[j])} for j in best]
            if params.get("values"):
                answer["values"] = matrix[i].tolist()
                answer["value_kind"] = VALUE_KINDS[direction]
            answers.append(answer)
        return answers

    @staticmethod
    def _direction(sentences: list[str], direction: str | None) -> tuple[str, list[str]]:
        """The direction (given, or read from the sentences' prefixes) and the sentences without their prefixes."""
        prefixes, stripped = [], []
        for sentence in sentences:
            first, _, rest = sentence.strip().partition(" ")
            prefixes.append(PREFIXES.get(first))
            stripped.append(rest if first in PREFIXES else sentence)
        found = set(prefixes) - {None}
        if direction is None:
            if len(found) != 1 or None in prefixes:
                raise ValueError('give "parameters": {"direction": "gex2atac" | "atac2gex"}, or start every sentence with the same prefix')
            direction = found.pop()
        elif direction not in PREFIXES.values():
            raise ValueError(f'"direction" must be gex2atac or atac2gex, got {direction!r}')
        elif found - {direction}:
            raise ValueError(f'"direction" is {direction} but a sentence starts with another prefix; send one direction per request')
        return direction, stripped
