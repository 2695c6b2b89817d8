"""Engine construction by name; each engine's heavy imports happen only when it is chosen."""

from __future__ import annotations

from serve_app.engines.base import InferenceEngine
from serve_app.registry.catalog import Catalog, ModelSpec
from serve_app.settings import Settings


def build_local_engine(spec: ModelSpec) -> InferenceEngine:
    if spec.engine == "llama_cpp":
        from serve_app.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine.from_spec(spec)
    if spec.engine == "sentence_transformers":
        from serve_app.engines.embeddings import SentenceTransformerEngine

        return SentenceTransformerEngine.from_spec(spec)
    if spec.engine == "vllm":
        from serve_app.engines.vllm_engine import VLLMEngine

        return VLLMEngine.from_spec(spec)
    raise ValueError(f"{spec.id}: engine {spec.engine!r} is not a local engine")


def engine_concurrency(spec: ModelSpec) -> int:
    """Requests one replica of a local model really runs at once (the ingress admits that many per
    replica; serve_app/ingress/admission.py)."""
    if spec.engine == "llama_cpp":
        return 1  # one Llama, one generation at a time (serve_app/engines/slots.py)
    if spec.engine == "vllm":
        from serve_app.engines.vllm_engine import concurrency  # vllm itself is not imported

        return concurrency(spec.engine_options)
    return spec.max_ongoing_requests  # embeddings: short calls, no queue of their own


class RemoteEngines:
    """The ingress's remote models: one pooled HTTP client per provider, shared by its models."""

    def __init__(self, catalog: Catalog, settings: Settings) -> None:
        from serve_app.engines.remote import RemoteEngine, make_http_client

        self._clients = {
            p.name: make_http_client(p.timeout_s or settings.upstream_timeout_s,
                                     settings.upstream_connect_timeout_s)
            for p in catalog.providers
        }
        default_connect_s = catalog.resilience.timeouts.connect_s
        self.engines: dict[str, InferenceEngine] = {
            m.id: RemoteEngine.from_spec(m, catalog.provider(str(m.provider)), self._clients[str(m.provider)],
                                         connect_timeout_s=m.timeouts.connect_s or default_connect_s)
            for m in catalog.models if not m.is_local
        }

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
