"""Process settings: one class, read from ``IIR_*`` environment variables (and ``.env``).

Built once by the app builder and handed to every deployment, never read per request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve_app.dataplane import DataPlane

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# RFC 1918 / RFC 4193 private ranges plus loopback: where admin callers are trusted by default.
DEFAULT_TRUSTED_NETWORKS = [
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
]


class NodeShape(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(ge=0)
    num_gpus: float = Field(0, ge=0)
    accelerator_type: str | None = None
    gpu_memory_gb: float | None = Field(None, gt=0, description="default: by accelerator type")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IIR_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    # The embedded default lives in the user's home so every Ray worker finds the same file,
    # whatever its working directory.
    database_url: SecretStr = SecretStr(f"sqlite:///{Path.home() / '.iir' / 'iir.db'}")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(0.25, gt=0)
    rate_limit_key_prefix: str = "iir:rl:"  # per-key rate-limit counters in Redis live under this
    cooldown_key_prefix: str = "iir:cooldown:"  # models cooling down (serve_app/routing/health.py)

    models_config: Path = REPO_CONFIGS / "models.yaml"
    providers_config: Path = REPO_CONFIGS / "providers.yaml"
    routing_config: Path = REPO_CONFIGS / "routing.yaml"
    classifier_head: Path = REPO_CONFIGS / "classifier" / "head.json"
    # Longest wait for a classification before "auto" takes routing.yaml's default
    # (serve_app/routing/router.py).
    # Well above the p99 under load (0.3 s at c=8 here), well below a client's patience.
    classifier_timeout_s: float = Field(1.0, gt=0)
    # Derived files made once per machine (the classifier's ONNX embedding model).
    cache_dir: Path = Path.home() / ".cache" / "iir"
    # Discovery: GGUF files and Hugging Face folders here become local models on refresh.
    models_dir: Path | None = None
    # How often the Registry reads replica states from Serve: fast while a model loads or is at zero
    # replicas, slowly otherwise (each look costs the Serve controller and the Registry CPU).
    registry_poll_s: float = Field(1.0, gt=0)
    registry_idle_poll_s: float = Field(10.0, gt=0)
    model_loading_retry_after_s: int = Field(5, ge=1, description="Retry-After while a replica starts")
    cpu_hour_usd: float = Field(0.04, ge=0, description="price of one vCPU-hour, for local models' cost")
    # Node shapes Ray's autoscaler can add (worker types scaling from zero): the fit check counts them
    # as nodes, so a GPU model is deployed, and Ray launches the node, instead of being "unavailable".
    # JSON, e.g. '[{"num_cpus": 4, "num_gpus": 1, "accelerator_type": "A10G"}]'.
    launchable_nodes: list[NodeShape] = Field(default_factory=list)

    # Response cache (serve_app/cache/exact.py). auto: Redis if it answers at start, else in-process.
    # Longest wait for a full local model before 503 model_busy (serve_app/ingress/admission.py).
    queue_timeout_s: float = Field(30.0, gt=0)
    cache_backend: Literal["auto", "redis", "memory", "off"] = "auto"
    cache_scope: Literal["key", "global"] = "key"  # global shares answers across API keys
    cache_ttl_s: int = Field(3600, ge=0)
    cache_timeout_s: float = Field(0.1, gt=0)
    cache_max_entry_bytes: int = Field(1_000_000, gt=0)
    # Recently used entries kept in each ingress replica, in front of Redis (0: off).
    cache_local_max_bytes: int = Field(32 * 2**20, ge=0)
    cache_local_ttl_s: float = Field(10.0, gt=0)
    # Semantic cache (serve_app/cache/semantic.py), opt-in per model or request. The threshold was
    # chosen on data/semantic_cache/pairs.jsonl (bench/semantic_cache_bench.py).
    semantic_cache_threshold: float = Field(0.87, gt=0, le=1)
    semantic_cache_max_entries: int = Field(100_000, gt=0)
    semantic_cache_timeout_s: float = Field(0.25, gt=0)

    # Stored responses of the Responses API (previous_response_id; GET/DELETE /v1/responses/{id}),
    # visible only to the key that made them. auto: Redis if it answers at start, else in-process.
    responses_backend: Literal["auto", "redis", "memory", "off"] = "auto"
    responses_ttl_s: int = Field(7 * 86_400, gt=0)
    # A longer conversation is answered but not stored (its response says "store": false).
    responses_max_bytes: int = Field(4 * 2**20, gt=0)
    responses_timeout_s: float = Field(0.25, gt=0)

    # What stands in front of the ingress on port 8000 (serve_app/dataplane.py): Ray's HAProxy, or
    # Serve's Python proxy. The proxy token is how HAProxy vouches for the client address it states;
    # every node's `ray start` needs the same one (`iir dataplane env` prints them).
    data_plane: DataPlane = "haproxy"
    proxy_token: SecretStr | None = None

    trusted_networks: list[str] = Field(default_factory=lambda: list(DEFAULT_TRUSTED_NETWORKS))
    # Peers whose X-Forwarded-For we believe; empty means no header is ever believed.
    trusted_proxies: list[str] = Field(default_factory=list)

    key_cache_ttl_s: float = Field(30.0, gt=0, description="backstop when a revocation push is missed")
    key_cache_size: int = Field(100_000, gt=0)
    # Database down: keys verified before the outage keep working this long past their TTL.
    key_stale_if_error_s: float = Field(300.0, ge=0)
    negative_key_cache_ttl_s: float = Field(5.0, ge=0)
    negative_key_cache_size: int = Field(10_000, gt=0)

    usage_flush_interval_s: float = Field(2.0, gt=0, description="how often usage is batched to the DB")
    usage_flush_keys: int = Field(1000, gt=0, description="flush early, and per batch, at this many keys")
    usage_max_keys: int = Field(100_000, gt=0, description="keys held while the DB is down; more are dropped")

    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0)
    upstream_timeout_s: float = Field(120.0, gt=0)
    upstream_connect_timeout_s: float = Field(5.0, gt=0)

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    log_level: str = "INFO"

    def database_url_plain(self) -> str:
        return self.database_url.get_secret_value()
