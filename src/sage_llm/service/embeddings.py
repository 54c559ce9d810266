"""The ``embed`` task: inputs, options, and the VLLMService result shape.

SAGE's VLLMService answers ``embed`` with ``{"model_id", "vectors", "dimension"}``, the
vectors L2-normalised unless ``options.normalize`` is false; the services here keep that
shape whatever the engine (an OpenAI-compatible ``/v1/embeddings`` endpoint, or the
deterministic :func:`sim_embedding` of a simulated engine).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sage_llm import tokens
from sage_llm.errors import EngineStreamError, InvalidRequestError
from sage_llm.service.payloads import reject_unknown

__all__ = [
    "EMBED_OPTIONS",
    "EmbedRequest",
    "embed_result",
    "parse_embed",
    "sim_embedding",
    "vectors_from_openai",
]

EMBED_OPTIONS = ("normalize", "batch_size", "model", "model_name", "timeout")


@dataclass(frozen=True)
class EmbedRequest:
    """Texts to embed and how."""

    texts: list[str]
    normalize: bool = True
    model: str | None = None
    timeout_s: float | None = None


def parse_embed(
    inputs: object, options: Mapping[str, Any], default_timeout_s: float | None = None
) -> EmbedRequest:
    """Inputs: a string or a non-empty list of strings, none of them blank. Options:
    ``normalize`` (default true), ``model``, ``timeout`` (default ``default_timeout_s``,
    the service's ``request_timeout_s``); ``batch_size`` is accepted and ignored (the
    engine batches)."""
    reject_unknown(options, EMBED_OPTIONS, "options")
    if isinstance(inputs, str):
        texts = [inputs]
    elif isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs):
        texts = list(inputs)
    else:
        raise InvalidRequestError(
            "embed needs inputs: a string or a non-empty list of strings", param="inputs"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            where = "inputs" if isinstance(inputs, str) else f"inputs[{i}]"
            raise InvalidRequestError("embed needs text, not a blank string", param=where)
    normalize = options.get("normalize", True)
    if not isinstance(normalize, bool):
        raise InvalidRequestError("normalize must be true or false", param="options.normalize")
    model = options.get("model", options.get("model_name"))
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequestError("model must be a non-empty string", param="options.model")
    timeout = options.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise InvalidRequestError("timeout must be a positive number", param="options.timeout")
    if timeout is None:
        return EmbedRequest(texts, normalize, model, default_timeout_s)
    return EmbedRequest(texts, normalize, model, float(timeout))


def vectors_from_openai(obj: Mapping[str, Any], expected: int) -> list[list[float]]:
    """The vectors of an OpenAI ``/v1/embeddings`` answer, in input order."""
    data = obj.get("data")
    if not isinstance(data, list) or len(data) != expected:
        raise EngineStreamError(
            f"embeddings answer has {len(data) if isinstance(data, list) else 'no'} vectors "
            f"for {expected} inputs"
        )
    items = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, Mapping) else 0)
    vectors: list[list[float]] = []
    for item in items:
        vec = item.get("embedding") if isinstance(item, Mapping) else None
        if not isinstance(vec, list) or not all(isinstance(x, int | float) for x in vec):
            raise EngineStreamError("embeddings answer holds a vector that is not a number list")
        vectors.append([float(x) for x in vec])
    return vectors


def embed_result(
    model_id: str, vectors: Sequence[Sequence[float]], normalize: bool
) -> dict[str, Any]:
    """``{"model_id", "vectors", "dimension"}``, vectors L2-normalised when asked."""
    out = [_unit(v) if normalize else [float(x) for x in v] for v in vectors]
    return {"model_id": model_id, "vectors": out, "dimension": len(out[0]) if out else 0}


def _unit(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0:
        return [float(x) for x in vector]
    return [x / norm for x in vector]


def sim_embedding(text: str, dimension: int = 64) -> list[float]:
    """A deterministic embedding for simulated engines: signed feature hashing of the text's
    tokens and token bigrams (texts sharing words point the same way). Not normalised."""
    if dimension < 1:
        raise ValueError("dimension must be positive")
    ids = tokens.tokenize(text.lower())
    vector = [0.0] * dimension
    features = [(t,) for t in ids] + list(itertools.pairwise(ids))
    for feature in features:
        h = zlib.crc32(repr(feature).encode())
        vector[h % dimension] += 1.0 if (h >> 16) & 1 else -1.0
    return vector
