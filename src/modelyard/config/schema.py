"""The configuration file's shape, validated by pydantic.

Every setting a user may write lives here, so `modelyard check` can reject a bad file before
anything starts. Cross-field rules (name clashes, routes, groups) are checked in
`GatewayConfig._check_cross_references`.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from modelyard.config.state_home import default_state_dir
from modelyard.config.units import ByteSize, Duration

EngineKindName = Literal["vllm", "command", "diffusion", "remote"]
Capability = Literal[
    "chat", "completion", "embedding", "rerank", "audio", "image", "tools", "vision"
]
# Engine kinds the gateway starts and stops itself (a remote one runs elsewhere).
STARTED_KINDS = ("vllm", "command", "diffusion")

# Names travel in URLs, file names and log lines: keep them to a safe alphabet. A leading '/'
# is allowed because vLLM names a model after its weights path when no served name is given
# (the seed 003's clients send "/models/medium/coding/qwen2.5-coder-7b-gptq").
_NAME_RE = re.compile(r"^/?[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
_URL_RE = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
_ROUTE_RE = re.compile(r"^/[A-Za-z0-9._-]+$")


def check_model_name(name: str) -> str:
    if not _NAME_RE.match(name) or ".." in name or "//" in name or name.endswith("/"):
        raise ValueError(
            f"{name!r} is not a valid model name (letters, digits and . _ : @ / -, "
            "starting with a letter or digit, no '..')"
        )
    return name


def url_credentials(url: str | None) -> set[str]:
    """The secrets a URL carries (`http://svc:PASSWORD@host`): its password as written and
    decoded, and its whole user-info, so none is shown wherever the URL would be."""
    if not url:
        return set()
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    if not userinfo:
        return set()
    password = userinfo.partition(":")[2]
    found = {userinfo, unquote(userinfo)}
    if password:
        found |= {password, unquote(password)}
    return found


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(StrictModel):
    """LoRA adapters served on top of one base vLLM engine."""

    max_loras: int = Field(
        default=4, ge=1, description="adapters active in one batch (--max-loras)"
    )
    max_rank: int = Field(default=16, ge=1, description="largest adapter rank (--max-lora-rank)")
    max_cpu_loras: int | None = Field(default=None, ge=1, description="adapters kept loaded")
    adapters: dict[str, str] = Field(default_factory=dict, description="name -> adapter folder")
    adapter_dirs: list[str] = Field(
        default_factory=list, description="folders scanned for adapters"
    )
    scan_interval: Duration = Field(
        default=2.0, description="how often `adapter_dirs` are scanned for new or removed adapters"
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            check_model_name(name)
            if "/" in name:
                raise ValueError(f"adapter name {name!r} may not contain '/'")
        return adapters


# Fields no request policy may touch: they pick the engine, the stream's shape or the key.
_POLICY_FORBIDDEN = frozenset({"model", "stream", "keep_alive"})


class ParamsConfig(StrictModel):
    """A model's request policy, applied to every JSON request body it serves."""

    set: dict[str, object] = Field(
        default_factory=dict, description="fields forced on every request (the client's replaced)"
    )
    default: dict[str, object] = Field(
        default_factory=dict, description="fields used when the client sends none of its own"
    )
    strip: list[str] = Field(
        default_factory=list, description="fields removed from every request before the engine"
    )

    @model_validator(mode="after")
    def _no_routing_fields(self) -> ParamsConfig:
        named = {*self.set, *self.default, *self.strip}
        touched = sorted(named & _POLICY_FORBIDDEN)
        if touched:
            raise ValueError(f"params may not set, default or strip {', '.join(touched)}")
        return self


# A bound on `replicas.max` that no real deployment nears (one engine per GPU of a large
# cluster): it turns a typo such as 1000000 into a config error instead of a planning loop
# over a million engine slots.
MAX_REPLICAS = 64


class ReplicasConfig(StrictModel):
    """How many engines of one model may run at once, and when another is added."""

    min: int = Field(
        default=0,
        ge=0,
        le=MAX_REPLICAS,
        description="engines the idle timer never stops once started; 0 scales to zero",
    )
    max: int = Field(
        default=1,
        ge=1,
        le=MAX_REPLICAS,
        description="most engines of this model at once; 1 is one engine, as without replicas",
    )
    target_in_flight: int = Field(
        default=8,
        ge=1,
        le=100_000,
        description="requests in flight (and waiting) per engine the scheduler aims for: "
        "above it for a second, another engine is added",
    )

    @model_validator(mode="after")
    def _min_within_max(self) -> ReplicasConfig:
        if self.min > self.max:
            raise ValueError(f"replicas: min ({self.min}) is larger than max ({self.max})")
        return self


class ModelConfig(StrictModel):
    """One model the gateway can start on demand."""

    engine: EngineKindName = Field(
        default="vllm",
        description="vllm, command (any OpenAI-compatible server), diffusion (the built-in image "
        "server) or remote (a server that runs elsewhere)",
    )
    model: str | None = Field(default=None, description="weights path or name (vllm, diffusion)")
    url: str | None = Field(default=None, description="engine: remote: the server's base URL")
    api_key: str | None = Field(
        default=None, description="engine: remote: key sent upstream as Authorization: Bearer"
    )
    engine_api_key: str | None = Field(
        default=None, description="key the started engine requires (vLLM's --api-key)"
    )
    preload: bool = Field(default=False, description="start when the gateway starts")
    open_route: bool = Field(
        default=False, description="serve this model's route without an API key"
    )
    served_name: str | None = Field(
        default=None, description="name the engine uses; default the key"
    )
    aliases: list[str] = Field(
        default_factory=list, description="other names clients may use; rewritten both ways"
    )
    route: str | None = Field(default=None, description="path prefix such as /coder")
    command: list[str] | None = Field(default=None, description="argv for engine: command; {port}")
    executable: list[str] | None = Field(default=None, description="vllm: argv that starts vLLM")
    args: list[str] = Field(default_factory=list, description="extra engine arguments, last")
    env: dict[str, str] = Field(
        default_factory=dict, description="engine environment (wins over defaults.env)"
    )
    health_path: str | None = Field(
        default=None, description="readiness check path; default /health (vllm, command)"
    )
    idle_timeout: Duration | None = Field(
        default=None,
        description="stop (or sleep) after this long unused; 0 = never (with prewarm: auto, "
        "kept while pre-warming would start it again at once)",
    )
    start_timeout: Duration | None = Field(
        default=None,
        description="a start that shows no progress (log lines, weights downloaded) for this "
        "long is killed as hung (503 to the waiters)",
    )
    start_timeout_max: Duration | None = Field(
        default=None,
        description="a start is killed after this long even while it shows progress",
    )
    fallbacks: list[str] = Field(
        default_factory=list,
        description="models that answer instead, first one able to serve now, when this one "
        "is refused (cannot fit, start timeout, crash loop, remote down)",
    )
    fallback_may_evict: bool = Field(
        default=False,
        description="a fallback may evict other models to start; by default only a fallback "
        "that is ready, or fits in free memory, serves",
    )
    loading_content: bool = Field(
        default=False,
        description="during a start, streamed chat answers also carry the loading progress as "
        "text a person sees (SSE comments are always sent)",
    )
    stop_grace: Duration | None = Field(
        default=None, description="SIGTERM, then SIGKILL after this long"
    )
    first_byte_timeout: Duration | None = Field(
        default=None,
        gt=0,
        description="this model's limits.upstream_first_byte_timeout (a model with long "
        "prompts on a slow GPU prefills longer than most)",
    )
    max_model_len: int | None = Field(
        default=None, ge=1, description="vLLM's --max-model-len (wins over defaults)"
    )
    # Placement (GPU memory).
    gpus: list[int] | None = Field(default=None, description="GPU indexes this model may use")
    tensor_parallel: int = Field(
        default=1, ge=1, description="GPUs one engine spans (vLLM's --tensor-parallel-size)"
    )
    memory: ByteSize | None = Field(default=None, description="footprint hint before measuring")
    pinned: bool = Field(default=False, description="never evicted to make room for another model")
    replicas: ReplicasConfig = Field(
        default_factory=ReplicasConfig,
        description="engines of this model at once, added under load (docs/replicas.md)",
    )
    sleep: Literal[0, 1, 2] = Field(default=0, description="vLLM sleep level when idle; 0 = never")
    prewarm: Literal["auto", "off"] | None = Field(
        default=None,
        description="start it before it is asked for when learned habits say so (defaults')",
    )
    # Back-pressure.
    max_queue: int | None = Field(
        default=None,
        ge=0,
        description="requests waiting for a start, and for a turn at max_in_flight (503 beyond)",
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="most requests sent to the engine at once; more wait at the gateway, "
        "served fairly across keys",
    )
    # Sharing: request policy, variants, metadata.
    params: ParamsConfig = Field(
        default_factory=ParamsConfig, description="request fields set, defaulted or stripped"
    )
    variants: dict[str, ParamsConfig] = Field(
        default_factory=dict,
        description="other names for this engine, each with its own params on top of the "
        "model's (e.g. coder-precise with temperature 0)",
    )
    max_keep_alive: Duration | None = Field(
        default=None,
        description="largest keep_alive a request may ask for (longer ones are capped); "
        "unset: requests may not extend the idle timeout",
    )
    display_name: str | None = Field(
        default=None, max_length=200, description="a human name shown in /v1/models"
    )
    description: str | None = Field(
        default=None, max_length=2000, description="shown in /v1/models"
    )
    context_length: int | None = Field(
        default=None, ge=1, description="shown in /v1/models; default max_model_len"
    )
    capabilities: list[Capability] | None = Field(
        default=None, description="shown in /v1/models; default from the engine kind"
    )
    unlisted: bool = Field(default=False, description="left out of /v1/models, though still usable")
    lora: LoraConfig | None = Field(default=None, description="LoRA adapters on this base model")
    # Keys with a token budget or tpm (docs/keys-and-budgets.md).
    reserve_tokens: int = Field(
        default=512,
        ge=1,
        description="answer tokens held at admission for a request with no max_tokens",
    )
    upstream_paths: list[str] = Field(
        default_factory=list,
        description="engine: remote: paths /upstream/ may reach besides the OpenAI routes",
    )

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            check_model_name(alias)
        return aliases

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: dict[str, ParamsConfig]) -> dict[str, ParamsConfig]:
        for name in variants:
            check_model_name(name)
        return variants

    @field_validator("route")
    @classmethod
    def _route_shape(cls, route: str | None) -> str | None:
        if route is not None and not _ROUTE_RE.match(route):
            raise ValueError(f"{route!r} is not a route: use one path segment such as '/coder'")
        return route

    @field_validator("health_path")
    @classmethod
    def _health_path_shape(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith("/"):
            raise ValueError("health_path must start with '/'")
        return path

    @field_validator("served_name")
    @classmethod
    def _served_name_shape(cls, name: str | None) -> str | None:
        return None if name is None else check_model_name(name)

    @field_validator("url")
    @classmethod
    def _url_shape(cls, url: str | None) -> str | None:
        if url is not None and not _URL_RE.match(url):
            raise ValueError(f"{url!r} is not an http(s) URL such as 'http://gpu-host:8001'")
        return None if url is None else url.rstrip("/")

    @model_validator(mode="after")
    def _engine_fields(self) -> ModelConfig:
        if self.engine == "remote":
            self._check_remote()
        elif self.url is not None or self.api_key is not None:
            raise ValueError(
                "'url' and 'api_key' are only for engine 'remote' (a started engine's key is "
                "'engine_api_key')"
            )
        if self.open_route and self.route is None:
            raise ValueError("'open_route' needs a 'route:' (only that route is left open)")
        if self.engine == "command":
            if not self.command:
                raise ValueError("engine 'command' needs 'command:', an argv list using {port}")
            if not any("{port}" in part for part in self.command):
                raise ValueError("'command' must contain {port} so the gateway can pick the port")
        elif self.command is not None:
            raise ValueError(f"'command' is only for engine 'command', not {self.engine!r}")
        if self.engine in ("vllm", "diffusion") and not self.model:
            raise ValueError(f"engine {self.engine!r} needs 'model:' (a weights path or name)")
        if self.lora is not None and self.engine != "vllm":
            raise ValueError("'lora' is only supported for engine 'vllm'")
        if self.sleep and self.engine != "vllm":
            raise ValueError("'sleep' is only supported for engine 'vllm'")
        if self.replicas.max > 1 and self.engine == "remote":
            raise ValueError(
                "replicas: engine 'remote' is one server we only connect to; max must be 1"
            )
        if self.gpus is not None and len(self.gpus) < self.tensor_parallel:
            raise ValueError(
                f"tensor_parallel is {self.tensor_parallel} but only "
                f"{len(self.gpus)} gpus are allowed"
            )
        return self

    def _check_remote(self) -> None:
        if self.url is None:
            raise ValueError("engine 'remote' needs 'url:', the base URL of a running server")
        started_only = {
            "model": self.model,
            "command": self.command,
            "executable": self.executable,
            "args": self.args or None,
            "env": self.env or None,
            "engine_api_key": self.engine_api_key,
            "max_model_len": self.max_model_len,
            "gpus": self.gpus,
            "memory": self.memory,
            "lora": self.lora,
            "sleep": self.sleep or None,
            "preload": self.preload or None,
        }
        wrong = [key for key, value in started_only.items() if value is not None]
        if self.tensor_parallel != 1:
            wrong.append("tensor_parallel")
        if wrong:
            raise ValueError(
                f"engine 'remote' runs elsewhere: {', '.join(wrong)} cannot be set "
                "(use 'api_key' for the key the remote server wants)"
            )


class GpuConfig(StrictModel):
    """A GPU declared by hand, for machines without NVML and for tests."""

    index: int = Field(ge=0, description="the GPU's index, as CUDA_VISIBLE_DEVICES numbers it")
    memory: ByteSize = Field(description="its memory, such as 24GiB")
    name: str | None = Field(default=None, description="a label shown in status and metrics")


class GroupConfig(StrictModel):
    """Models that share a constraint (today: at most one of them runs)."""

    members: list[str] = Field(description="model names")
    exclusive: bool = Field(default=False, description="at most one member runs at a time")


class ApiKeyConfig(StrictModel):
    """One API key, stored as its SHA-256 (`modelyard keys create NAME` prints the entry)."""

    name: str = Field(description="shown in logs, events and metrics")
    sha256: str = Field(description="hex SHA-256 of the key; the key itself is never stored")
    models: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns")
    rpm: int | None = Field(default=None, ge=1, description="requests per minute")
    tpm: int | None = Field(default=None, ge=1, description="tokens per minute")
    token_budget: int | None = Field(default=None, ge=1, description="tokens per budget_period")
    budget_period: Literal["day", "month", "total"] = Field(
        default="total", description="when token_budget starts again (UTC days and months)"
    )
    admin: bool = Field(default=False, description="may use /admin routes and manage keys")
    metrics: bool = Field(default=False, description="may read /metrics and /metrics/engines")
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="share of a busy model's slots against other keys at the same priority",
    )
    priority: int = Field(
        default=0,
        ge=-1000,
        le=1000,
        description="lower is served first (vLLM's order); passed to engines started with "
        "--scheduling-policy priority",
    )
    max_in_flight: int | None = Field(
        default=None, ge=1, description="most of this key's requests in flight at once"
    )
    keep_alive: bool = Field(
        default=True, description="may send keep_alive to keep an engine loaded or stop it"
    )

    @model_validator(mode="after")
    def _metrics_keys_read_only(self) -> ApiKeyConfig:
        # A scraper's key sits in a file on the Prometheus host: unless `models:` is written
        # out, it may read metrics and use no model. (After validation, so `metrics: yes` and
        # any other spelling pydantic accepts as true count too.)
        if self.metrics and "models" not in self.model_fields_set:
            object.__setattr__(self, "models", [])  # frozen model: set once, here
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        # The name is what logs, events and metric labels show for this key.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name):
            raise ValueError(
                f"{name!r} is not a valid key name (letters, digits and . _ @ -, up to 64)"
            )
        return name

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, digest: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ValueError("sha256 must be 64 hex digits (see `modelyard keys create NAME`)")
        return digest.lower()


class AuthConfig(StrictModel):
    """API keys. With none, the gateway serves loopback only (see allow_unauthenticated)."""

    keys: list[ApiKeyConfig] = Field(default_factory=list, description="the config's API keys")
    allow_unauthenticated: bool = Field(
        default=False, description="allow a non-loopback listen address with no keys"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> AuthConfig:
        names = [key.name for key in self.keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate key names: {', '.join(duplicates)}")
        return self


class LimitsConfig(StrictModel):
    """Back-pressure, timeouts and health checks."""

    max_body_bytes: ByteSize = Field(
        default=4 * 1024 * 1024, description="request body limit (413 beyond)"
    )
    max_upload_bytes: ByteSize = Field(
        default=25 * 1024 * 1024,
        description="body limit of audio uploads (multipart, as OpenAI's 25 MB; 413 beyond)",
    )
    # aiohttp's keep-alive timer does this (api/http_layer.py): bytes that trickle in do not
    # push it back, so a head sent a line at a time is cut off too.
    head_timeout: Duration = Field(
        default=15.0,
        gt=0,
        description="a connection's time to send a whole request head, from its opening or "
        "from the end of its previous answer; an idle keep-alive connection is closed after it",
    )
    body_timeout: Duration = Field(
        default=60.0, gt=0, description="a request's time to send its whole body: a 408 after it"
    )
    max_queue: int = Field(default=512, ge=0, description="requests waiting across all models")
    max_queue_per_model: int = Field(
        default=128, ge=0, description="requests waiting for one model's start (503 beyond)"
    )
    upstream_connect_timeout: Duration = Field(default=10.0, description="connecting to an engine")
    upstream_read_timeout: Duration = Field(
        default=600.0, description="longest silence from an engine within one answer"
    )
    # Above a long prefill (a 100k-token prompt takes tens of seconds) plus vLLM's own queue:
    # passing it costs a health check, and only an engine that fails that check loses the
    # request, so a slow but live engine (an answer that is not streamed) is never cut.
    upstream_first_byte_timeout: Duration = Field(
        default=60.0,
        gt=0,
        description="wait for an engine's first byte (the answer's headers, a stream's first "
        "chunk, and any later silence of a stream as long); past it the engine's health is "
        "checked, and a request on an engine that does not answer the check ends (504, or an "
        "error event in a stream already begun): a frozen engine or node; a live engine keeps "
        "it, up to upstream_read_timeout",
    )
    shutdown_grace: Duration = Field(
        default=30.0, description="on SIGTERM, how long requests in flight may finish"
    )
    # Hung engines (scheduler/watchdog.py): a ready engine whose health check fails or whose
    # requests time out this many times in a row is stopped and marked failed.
    health_check_interval: Duration = Field(
        default=10.0, description="how often ready engines are checked; 0 turns checks off"
    )
    health_check_timeout: Duration = Field(
        default=5.0, description="a health check slower than this fails"
    )
    health_check_failures: int = Field(
        default=3, ge=1, description="failures in a row after which an engine is stopped as hung"
    )


class DefaultsConfig(StrictModel):
    """Settings every model gets unless it sets its own."""

    idle_timeout: Duration = Field(
        default=600.0,
        description="stop (or sleep) an engine after this long unused; 0 = never (with "
        "prewarm: auto, one that pre-warming would start again at once is kept)",
    )
    start_timeout: Duration = Field(
        default=300.0, description="kill a start that shows no progress for this long"
    )
    start_timeout_max: Duration = Field(
        default=3600.0,
        description="kill a start after this long even while it shows progress (a download "
        "that never ends, a log that lies)",
    )
    prewarm: Literal["auto", "off"] = Field(
        default="off",
        description="auto: start a model before it is asked for when learned habits say so",
    )
    stop_grace: Duration = Field(default=10.0, description="SIGTERM, then SIGKILL after this")
    crash_backoff_max: Duration = Field(
        default=60.0,
        description="from the second crash in a row, restarts wait 1, 2, 4 ... s, up to this",
    )
    crash_stable_after: Duration = Field(
        default=30.0,
        description="an engine that served this long before a crash starts a new count",
    )
    # Shared by every model (a model's own setting wins): env for every started engine,
    # args and max_model_len for vLLM engines (a launcher's VLLM_MAX_MODEL_LEN_GLOBAL).
    env: dict[str, str] = Field(
        default_factory=dict, description="environment for every started engine"
    )
    args: list[str] = Field(default_factory=list, description="vLLM arguments, before a model's")
    max_model_len: int | None = Field(default=None, ge=1, description="vLLM's --max-model-len")


class VllmConfig(StrictModel):
    """How to run vLLM: the argv that starts it, so it can live in its own venv."""

    executable: list[str] = Field(
        default_factory=lambda: ["vllm", "serve"], description="argv that starts vLLM"
    )


class DiffusionConfig(StrictModel):
    """How to run the built-in diffusion server: a Python that has diffusers and torch."""

    executable: list[str] = Field(
        default_factory=lambda: ["python3"], description="a Python with torch and diffusers"
    )


class RayConfig(StrictModel):
    """Where the Ray cluster is (`runtime: ray`): Ray places engines on nodes, never proxies."""

    address: str = Field(default="auto", description="the cluster: HOST:PORT of the head, or auto")
    namespace: str = Field(
        default="modelyard", description="Ray namespace; one gateway per namespace"
    )
    node_address: str | None = Field(
        default=None, description="this machine's address in the cluster, when not detectable"
    )
    node_check_interval: Duration = Field(
        default=0.5, description="how often each node agent reports its GPUs"
    )
    warm_actors: bool = Field(
        default=True, description="keep one idle engine actor per node: starts skip a worker start"
    )

    @field_validator("namespace")
    @classmethod
    def _namespace_shape(cls, namespace: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", namespace):
            raise ValueError(f"{namespace!r} is not a valid namespace (letters, digits, . _ -)")
        return namespace


class TlsConfig(StrictModel):
    """HTTPS on `listen`: PEM files, read again on SIGHUP (new certificates, no restart)."""

    cert: str = Field(description="certificate chain (PEM), leaf first")
    key: str = Field(description="private key (PEM)")


class CorsConfig(StrictModel):
    """Browsers on other origins (Open WebUI's direct connections) that may call the gateway."""

    allowed_origins: list[str] = Field(
        default_factory=list, description="exact origins such as https://chat.example.org"
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origin_shape(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            # A wildcard would let any page use the gateway with the user's key.
            if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
                raise ValueError(
                    f"{origin!r} is not an origin (scheme://host[:port], no path, no wildcard)"
                )
        return [origin.lower() for origin in origins]


class GatewayConfig(StrictModel):
    """The whole file."""

    listen: str = Field(default="127.0.0.1:8000", description="HOST:PORT the gateway serves on")
    tls: TlsConfig | None = Field(default=None, description="serve HTTPS on listen")
    state_dir: str = Field(
        default_factory=default_state_dir,
        description="where logs, the engine registry, events, learned footprints, runtime keys "
        "and budgets are kept",
    )
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    runtime: Literal["process", "ray"] = Field(
        default="process", description="process: engines on this machine; ray: on a Ray cluster"
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    gpus: list[GpuConfig] | None = Field(default=None, description="declared GPU inventory")
    host_ram_for_sleep: ByteSize | None = Field(
        default=None, description="host RAM that level-1 sleeping engines may hold"
    )
    groups: dict[str, GroupConfig] = Field(
        default_factory=dict, description="named groups of models"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="the gateway's log lines: text, or one JSON object a line"
    )
    proxy_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="extra processes serving requests on the same port (0: the gateway's "
        "process alone). The gateway's process still decides every request (keys, budgets, "
        "queues, engines) and keeps the metrics and logs; the workers relay to the engines "
        "(docs/front-door.md says how, and what it measured)",
    )
    cors: CorsConfig = Field(default_factory=CorsConfig)
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="host names this gateway answers to besides loopback names and addresses",
    )
    models: dict[str, ModelConfig] = Field(
        default_factory=dict, description="the models, by the name clients send"
    )
    # Values the loader took from the environment (`${env:...}`): possibly secrets.
    _env_values: frozenset[str] = PrivateAttr(default=frozenset())

    def remember_env_values(self, values: set[str]) -> None:
        self._env_values = frozenset(values)

    def secret_values(self) -> set[str]:
        """Every value the gateway must never show: `${env:...}` values and models' `env:`."""
        values = set(self._env_values)
        values.update(self.defaults.env.values())
        for model in self.models.values():
            values.update(model.env.values())
            # The keys engines want are secrets even when written in the file itself.
            values.update(key for key in (model.engine_api_key, model.api_key) if key)
            values.update(url_credentials(model.url))
        return values

    @field_validator("listen")
    @classmethod
    def _listen_shape(cls, listen: str) -> str:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{listen!r} is not HOST:PORT")
        return listen

    @field_validator("models")
    @classmethod
    def _model_keys(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in models:
            check_model_name(name)
        return models

    @model_validator(mode="after")
    def _check_cross_references(self) -> GatewayConfig:
        owners: dict[str, str] = {}

        def claim(public_name: str, owner: str) -> None:
            if public_name in owners and owners[public_name] != owner:
                raise ValueError(
                    f"name {public_name!r} is used by both {owners[public_name]!r} and {owner!r}"
                )
            owners[public_name] = owner

        for name in self.models:
            claim(name, name)
        for name, model in self.models.items():
            for alias in model.aliases:
                claim(alias, name)
        for name, model in self.models.items():
            for variant in model.variants:
                claim(variant, f"{name} (variant)")
        for name, model in self.models.items():
            # Clients of the seeds 002 and 004 send the engine's own name.
            if model.served_name is not None and model.served_name not in owners:
                claim(model.served_name, name)
        for name, model in self.models.items():
            for adapter in model.lora.adapters if model.lora else {}:
                claim(adapter, f"{name} (adapter)")
        routes: dict[str, str] = {}
        for name, model in self.models.items():
            if model.route is None:
                continue
            if model.route in routes:
                raise ValueError(
                    f"route {model.route!r} is used by both {routes[model.route]!r} and {name!r}"
                )
            if model.route in _RESERVED_ROUTES:
                raise ValueError(f"route {model.route!r} is reserved by the gateway")
            routes[model.route] = name
        if self.runtime == "ray":
            self._check_ray_placement()
        declared = {gpu.index for gpu in self.gpus or []}
        if self.gpus is not None and len(declared) != len(self.gpus):
            raise ValueError("gpus: each index may be declared once")
        for name, model in self.models.items():
            for index in model.gpus or []:
                if self.gpus is not None and index not in declared:
                    raise ValueError(f"model {name!r} asks for gpu {index}, which is not declared")
        for name, model in self.models.items():
            for fallback in model.fallbacks:
                if fallback == name:
                    raise ValueError(f"model {name!r} names itself as a fallback")
                if fallback not in self.models:
                    raise ValueError(
                        f"model {name!r} names unknown model {fallback!r} as a fallback"
                    )
        grouped: dict[str, str] = {}
        for group_name, group in self.groups.items():
            for member in group.members:
                if member not in self.models:
                    raise ValueError(f"group {group_name!r} names unknown model {member!r}")
                if group.exclusive and member in grouped:
                    raise ValueError(
                        f"model {member!r} is in two exclusive groups: {grouped[member]!r}"
                        f" and {group_name!r}"
                    )
                if group.exclusive:
                    grouped[member] = group_name
                if group.exclusive and self.models[member].replicas.max > 1:
                    # One member at a time is the group's point; several engines of one
                    # member would need a second meaning of "running".
                    raise ValueError(
                        f"model {member!r} is in exclusive group {group_name!r}: "
                        "replicas.max must be 1"
                    )
        return self

    def _check_ray_placement(self) -> None:
        # On a cluster each node agent reads its own GPUs, and GPU numbers name a GPU only on
        # its node: a declared inventory or fixed indexes would say nothing about which node.
        if self.gpus is not None:
            raise ValueError("gpus: with runtime: ray each node's agent reads its GPUs (NVML)")
        for name, model in self.models.items():
            if model.gpus is not None:
                raise ValueError(
                    f"models.{name}.gpus: with runtime: ray placement chooses the node and GPU"
                )

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def exclusive_group_of(self, model: str) -> str | None:
        """The exclusive group `model` belongs to (a model is in at most one)."""
        for group_name, group in self.groups.items():
            if group.exclusive and model in group.members:
                return group_name
        return None


_RESERVED_ROUTES = {"/v1", "/admin", "/gateway", "/upstream", "/ui", "/metrics", "/health"}
