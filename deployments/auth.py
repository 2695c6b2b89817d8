"""``Auth``: the key store behind a deployment. The ingress calls it only on a key-cache miss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import serve

from serve_app.auth import AuthService
from serve_app.keystore import UNSET, KeyInfo, KeyStore, Unset
from serve_app.schemas import ApiKeyCreate
from serve_app.settings import Settings
from serve_app.usage_store import UsageDelta


@serve.deployment
class Auth:
    def __init__(self, settings: Settings) -> None:
        store = KeyStore(settings.database_url_plain())
        # Every replica may try: the migration lock lets one do the work; a current schema costs two reads.
        store.upgrade()
        self._service = AuthService(store, redis_url=settings.redis_url,
                                    redis_timeout_s=settings.redis_timeout_s)

    async def verify(self, api_key: str) -> KeyInfo | None:
        return await self._service.verify(api_key)

    async def create(self, request: ApiKeyCreate) -> dict[str, Any]:
        return await self._service.create(request)

    async def list(self) -> list[KeyInfo]:
        return await self._service.list()

    async def get(self, key_id: str) -> KeyInfo:
        return await self._service.get(key_id)

    async def revoke(self, key_id: str) -> KeyInfo:
        return await self._service.revoke(key_id)

    async def update(self, key_id: str, *, description: str | Unset = UNSET, priority: int | Unset = UNSET,
                     rate_limit_rpm: int | None | Unset = UNSET,
                     rate_limit_tpm: int | None | Unset = UNSET) -> KeyInfo:
        return await self._service.update(key_id, description=description, priority=priority,
                                          rate_limit_rpm=rate_limit_rpm, rate_limit_tpm=rate_limit_tpm)

    async def usage(self, key_id: str) -> dict[str, Any]:
        return await self._service.usage(key_id)

    async def record_usage(self, batch: Sequence[UsageDelta | tuple[Any, ...]]) -> int:
        """Usage batches from the ingress replicas (``serve_app.usage``)."""
        return await self._service.record_usage(batch)

    async def ping(self) -> None:
        await self._service.ping()
