"""The Responses API's stored responses: what ``previous_response_id`` continues and
``GET``/``DELETE /v1/responses/{id}`` read.

Kept in Redis (or, without Redis at start, an in-process LRU per ingress replica: the cache's two stores,
serve_app/cache/exact.py) for ``IIR_RESPONSES_TTL_S``, and visible only to the API key that made them: any
other key is told the id does not exist. Each entry holds the response and its whole conversation as
Responses items (every turn's input, then the output), so continuing it is one read, on any model.

Failing open: a response that cannot be stored (Redis away, or a conversation past
``IIR_RESPONSES_MAX_BYTES``) is still answered, and says ``"store": false``; continuing a conversation
while Redis is away is a 503 (the answer would silently lose its context otherwise).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from serve_app import metrics
from serve_app.cache.exact import ResponseStore
from serve_app.errors import InvalidRequest, NotFound, ServiceUnavailable

logger = logging.getLogger(__name__)
Item = dict[str, Any]
PREFIX = "iir:response:"


class StoredResponses:
    def __init__(self, store: ResponseStore, *, ttl_s: int, max_bytes: int) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes

    async def keep(self, key_id: str, response: dict[str, Any], conversation: list[Item]) -> bool:
        """Store a response with its conversation; False when it could not be."""
        raw = json.dumps({"key": key_id, "items": [*conversation, *(response.get("output") or [])],
                          "response": response},
                         separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) > self._max_bytes:
            logger.info("response %s not stored: %d bytes, over IIR_RESPONSES_MAX_BYTES", response["id"],
                        len(raw))
            metrics.STORED_RESPONSES.inc(outcome="too_large")
            return False
        if self._store.available:
            await self._store.set(PREFIX + response["id"], raw, self._ttl_s)
        stored = self._store.available  # a failed write has marked the store unavailable
        metrics.STORED_RESPONSES.inc(outcome="stored" if stored else "unavailable")
        return stored

    async def conversation(self, key_id: str, response_id: str) -> list[Item]:
        """The items a new turn continues from; 400 for an id this key does not have."""
        entry = await self._read(key_id, response_id)
        if entry is None:
            raise InvalidRequest(f"Previous response with id '{response_id}' not found.",
                                 param="previous_response_id", code="previous_response_not_found")
        items: list[Item] = entry.get("items") or []
        return items

    async def response(self, key_id: str, response_id: str) -> dict[str, Any]:
        entry = await self._read(key_id, response_id)
        if entry is None:
            raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
        response: dict[str, Any] = entry["response"]
        return response

    async def input_items(self, key_id: str, response_id: str) -> list[Item]:
        """The items the response answered: the conversation it continued and its own input."""
        entry = await self._read(key_id, response_id)
        if entry is None:
            raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
        items: list[Item] = entry.get("items") or []
        return items[:len(items) - len(entry["response"].get("output") or [])]

    async def delete(self, key_id: str, response_id: str) -> None:
        if await self._read(key_id, response_id) is None:
            raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
        await self._store.delete(PREFIX + response_id)
        self._check_available()

    async def _read(self, key_id: str, response_id: str) -> dict[str, Any] | None:
        self._check_available()
        raw = await self._store.get(PREFIX + response_id)
        if raw is None:
            self._check_available()  # None from a failing store is not "no such response"
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        # Another key's response does not exist for this one (saying otherwise would confirm the id).
        return entry if isinstance(entry, dict) and entry.get("key") == key_id else None

    def _check_available(self) -> None:
        if not self._store.available:
            raise ServiceUnavailable("stored responses are unavailable (Redis is away); retry shortly, or "
                                     "send the whole conversation as input",
                                     code="response_store_unavailable", headers={"Retry-After": "5"})

    async def aclose(self) -> None:
        await self._store.aclose()

