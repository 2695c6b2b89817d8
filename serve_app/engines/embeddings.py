"""Text embeddings on CPU with sentence-transformers (default model: all-MiniLM-L6-v2).

``sentence_transformers`` (and with it torch) is imported when an engine is built, never at module import,
so the gateway's processes that never embed do not pay for torch.
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.engines.base import EngineBase
from serve_app.errors import InvalidRequest, ServiceUnavailable, UnsupportedParameter
from serve_app.fair_queue import NO_TURN, Turn
from serve_app.registry.catalog import ModelSpec, resolve_source
from serve_app.schemas import EmbeddingRequest


class SentenceTransformerEngine(EngineBase):
    name = "sentence_transformers"

    def __init__(self, model_path: Path, *, device: str = "cpu", batch_size: int = 64,
                 truncate: bool = False) -> None:
        # The model is a local folder; offline mode keeps the hub client from trying the network
        # (no hub is reachable from the cluster, and a timeout there would stall replica start).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(model_path), device=device)
        self._model: Any = model
        self.model_name = Path(model_path).name
        self.batch_size = batch_size
        # OpenAI refuses over-long inputs rather than embedding a silently shortened text; ``truncate``
        # opts into sentence-transformers' usual behaviour of cutting at ``max_seq_length``.
        self.truncate = truncate
        # sentence-transformers 6 renamed the method; keep working with both names.
        dimension = getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)
        self.dimension = int(dimension() or 0)
        self.max_tokens = int(model.max_seq_length or 0)
        # The fast tokenizer is not safe to call from two threads at once ("Already borrowed").
        self._lock = asyncio.Lock()

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> SentenceTransformerEngine:
        if not spec.source:
            raise ValueError(f"{spec.id}: a local model needs 'source'")
        engine = cls(resolve_source(spec.source), **spec.engine_options)
        engine.model_name = spec.id
        return engine

    async def embed(self, request: EmbeddingRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        texts = _texts(request)
        dims = self._target_dimensions(request.dimensions)
        async with self._lock:
            if self._model is None:  # checked under the lock: aclose may have run while we waited
                raise ServiceUnavailable("embedding model is closed")
            vectors, tokens = await asyncio.to_thread(self._encode, texts)
        if dims < self.dimension:
            vectors = _truncate(vectors, dims)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode_vector(v, request.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": self.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _target_dimensions(self, requested: int | None) -> int:
        if requested is None:
            return self.dimension
        if requested > self.dimension:
            raise UnsupportedParameter(
                f"dimensions must be at most {self.dimension} for this model", param="dimensions")
        return requested

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Runs in a worker thread: count tokens exactly as the model sees them, then embed in one batch."""
        counts = [len(ids) for ids in self._model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        too_long = [i for i, n in enumerate(counts) if n > self.max_tokens]
        if too_long and not self.truncate:
            raise InvalidRequest(
                f"input {too_long[0]} has {counts[too_long[0]]} tokens; this model accepts at most "
                f"{self.max_tokens}", param="input", code="context_length_exceeded")
        counts = [min(n, self.max_tokens) for n in counts]
        vectors = self._model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
            show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32), sum(counts)

    async def check_health(self) -> None:
        if self._model is None:
            raise ServiceUnavailable("embedding model is closed")

    async def aclose(self) -> None:
        async with self._lock:
            self._model = None


def _texts(request: EmbeddingRequest) -> list[str]:
    try:
        texts = request.texts()
    except ValueError:
        raise InvalidRequest(
            "this model takes text input, not token ids", param="input") from None
    if not texts:
        raise InvalidRequest("input must not be empty", param="input")
    if any(t == "" for t in texts):
        # OpenAI refuses empty strings too; an empty text has no meaningful embedding.
        raise InvalidRequest("input must not contain empty strings", param="input")
    return texts


def _truncate(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Matryoshka-style shortening: keep the first ``dims`` components, back to unit length."""
    cut = vectors[:, :dims]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.where(norms == 0, 1, norms)).astype(np.float32)


def _encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # The openai SDK decodes with ``np.frombuffer(..., dtype="float32")``: little-endian float32.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()  # type: ignore[no-any-return]
