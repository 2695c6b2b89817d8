"""``Auth``: the key service as a deployment. The ingress calls it on a key-cache miss, for the admin
routes and with usage batches; ``iir keys`` runs the same ``AuthService`` in its own process, so both
doors change keys the same way and announce every change to the ingress caches."""

from __future__ import annotations

from ray import serve

from serve_app.auth.keystore import KeyStore
from serve_app.auth.service import AuthService
from serve_app.settings import Settings


@serve.deployment
class Auth(AuthService):
    def __init__(self, settings: Settings) -> None:
        store = KeyStore(settings.database_url_plain())
        # Every replica may try: the migration lock lets one do the work; a current schema costs two reads.
        store.upgrade()
        super().__init__(store, redis_url=settings.redis_url, redis_timeout_s=settings.redis_timeout_s)
