"""``Auth``: the key store behind a deployment. The ingress calls it only on a key-cache miss."""

from __future__ import annotations

from typing import Any

from ray import serve

from serve_app.auth import AuthService
from serve_app.keystore import KeyInfo, KeyStore
from serve_app.schemas import ApiKeyCreate
from serve_app.settings import Settings


@serve.deployment
class Auth:
    def __init__(self, settings: Settings) -> None:
        store = KeyStore(settings.database_url_plain())
        store.create_schema()
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

    async def ping(self) -> None:
        await self._service.ping()
