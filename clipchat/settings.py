"""One settings object for every part, read from ``CLIPCHAT_*`` environment variables."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Self, get_args
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["dev", "test", "production"]
GeneratorName = Literal["local", "http", "replicate", "fal"]
EncoderName = Literal["auto", "libx264", "h264_nvenc"]
# x264's presets from superfast on: ultrafast turns off CABAC and the High profile's tools, and the
# segments of one video must share one encoder configuration to be joined by stream copy.
X264Preset = Literal["superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

# The settings whose values are a closed set, checked with an error that names the setting.
_CLOSED_SETTINGS: dict[str, Any] = {"environment": Environment, "generator": GeneratorName, "log_level": LogLevel}

# The settings that are URLs: the schemes each takes, and an example for the error. An empty value
# means "not set" (the database and storage under data_dir, no LLM, the provider's own API, …).
_URL_SETTINGS: dict[str, tuple[tuple[str, ...], str]] = {
    "database_url": (("postgresql+asyncpg", "sqlite+aiosqlite"),
                     "postgresql+asyncpg://user:password@host:5432/clipchat"),
    "broker_url": (("amqp", "amqps", "memory"), "amqp://user:password@host:5672/vhost or memory://"),
    "storage_url": (("s3", "file"), "s3://bucket/prefix or file:///srv/clipchat"),
    "s3_endpoint_url": (("https", "http"), "https://s3.us-east-1.amazonaws.com"),
    "public_url": (("https", "http"), "https://clipchat.example.com"),
    "llm_base_url": (("https", "http"), "https://api.openai.com/v1"),
    "generator_url": (("https", "http"), "https://api.replicate.com"),
    "otlp_endpoint": (("http", "https"), "http://otel-collector:4317"),
}
# Schemes whose URLs name a host; the others name a path (file, sqlite) or nothing (memory).
_HOST_SCHEMES = frozenset({"postgresql+asyncpg", "amqp", "amqps", "s3", "http", "https"})

DEV_AUTH_TOKENS = "dev-token=demo"
DEV_MEDIA_SIGNING_KEY = "change-me-in-production"
MIN_SIGNING_KEY_BYTES = 32
MIN_TOKEN_CHARS = 24
# "CHANGE_ME", "change-me", "changeme", "REPLACE_ME", … left in from an example file.
_PLACEHOLDER = re.compile(r"(change|replace)[-_ .]?me", re.IGNORECASE)
# A Replicate model: owner/name, owner/name:version_id or a bare 64-hex version id.
_REPLICATE_MODEL = re.compile(r"[\w.-]+/[\w.-]+(:[0-9a-f]{64})?|[0-9a-f]{64}")


class InvalidSettings(Exception):
    """Settings that must not be used; the message is one line naming the setting and the fix.

    Not a ``ValueError`` on purpose: pydantic lets it through unwrapped, so whoever prints it
    (``clipchat serve``) shows this line rather than "1 validation error for Settings".
    """


class Settings(BaseSettings):
    """Configuration of every ClipChat process.

    Embedded defaults (SQLite, in-process broker, local folder storage) need nothing installed
    beyond the Python packages; distributed mode sets the URLs below.
    """

    model_config = SettingsConfigDict(env_prefix="CLIPCHAT_", env_file=None, extra="ignore")

    # "production" refuses the development defaults and placeholders (see _safe_for_production).
    environment: Environment = "dev"
    data_dir: Path = Path(".clipchat")

    # Backends. Empty database_url / storage_url mean "under data_dir".
    database_url: str = ""
    broker_url: str = "memory://"
    # Prefix of every queue and exchange name, to share one RabbitMQ between deployments.
    broker_namespace: str = ""
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    # Addresses of the gRPC services (host:port) as the callers reach them.
    status_addr: str = "127.0.0.1:50051"
    regenerator_addr: str = "127.0.0.1:50052"
    composer_addr: str = "127.0.0.1:50053"
    # Address and port a gRPC server binds when served on its own (port 0 = the port of its *_addr).
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    grpc_deadline_seconds: float = 10.0
    # Every gRPC call between the parts carries this shared token (``authorization: Bearer``) and
    # every server refuses a call without it (UNAUTHENTICATED), health checks excepted: kubelet
    # probes carry no token. A shared token rather than mTLS: mTLS needs a CA and certificate
    # rotation, which a mesh (Linkerd, Istio) adds without code. Empty = no check (dev and
    # embedded mode only; production refuses it).
    service_token: str = ""
    # gRPC server reflection (grpcurl); None = on, but off in production.
    grpc_reflection: bool | None = None
    # TLS for gRPC: a server with a certificate and its key listens on a TLS port; a client with a
    # CA bundle opens TLS channels checked against it (the certificate must name the *_addr host).
    grpc_tls_cert_file: Path | None = None
    grpc_tls_key_file: Path | None = None
    grpc_tls_ca_file: Path | None = None

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    # One line per request on the "uvicorn.access" logger, query values other than paging ones
    # redacted (tickets, media signatures). Off by default: request spans record each request.
    gateway_access_log: bool = False
    public_url: str = ""
    # "token=owner" pairs, comma separated. The embedded page gets page_token.
    auth_tokens: str = DEV_AUTH_TOKENS
    page_token: str = ""
    media_signing_key: str = DEV_MEDIA_SIGNING_KEY
    media_url_ttl_seconds: int = 3600
    sse_heartbeat_seconds: float = 10.0
    # Open event streams one owner may hold on one gateway process (429 past it), the events a
    # watcher may fall behind its job's shared feed before it is dropped (it resumes), and how long
    # an event-stream ticket (the EventSource URL's credential) stays valid.
    sse_max_streams_per_owner: int = Field(default=20, ge=1)
    sse_subscriber_queue: int = Field(default=256, ge=1)
    sse_ticket_ttl_seconds: int = Field(default=60, ge=5, le=3600)
    rate_limit_per_minute: int = 120
    # Failed authentications (401) a client address may make a minute before it gets 429s; the
    # address is the one the peer gives, or X-Forwarded-For from a proxy in forwarded_allow_ips.
    auth_failures_per_minute: int = 20
    forwarded_allow_ips: str = "127.0.0.1"

    # Job state machine.
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    sweep_interval_seconds: float = 2.0

    # Money.
    budget_limit: Decimal = Decimal("50")
    # The most a job's own budget_limit may be (POST /jobs answers 422 above it).
    max_budget_limit: Decimal = Decimal("10000")
    budget_warning_fraction: Decimal = Decimal("0.8")
    generation_price_per_second: Decimal = Decimal("0.05")
    composition_price_per_second: Decimal = Decimal("0.001")

    # Media.
    ffmpeg_path: str = ""
    x264_preset: X264Preset = "veryfast"
    encoder: EncoderName = "auto"
    # Least-recently-used segments are evicted past this size; encodes run this many at once.
    segment_cache_max_bytes: int = 20 * 1024**3
    composer_workers: int = 2
    max_instruction_chars: int = 2000
    max_upload_bytes: int = 512 * 1024 * 1024
    # All the files of one POST /jobs together (413 above it); max_upload_bytes is per file.
    max_request_bytes: int = 2 * 1024**3

    # Prompt rewriting: templates first, then an OpenAI-compatible LLM when llm_base_url is set.
    llm_base_url: str = ""
    llm_model: str = "gpt-4o-mini"
    llm_api_key: str = ""
    llm_timeout_seconds: float = 20.0
    llm_price_per_1k_input: Decimal = Decimal("0.00015")
    llm_price_per_1k_output: Decimal = Decimal("0.0006")
    llm_estimated_cost: Decimal = Decimal("0.0100")
    llm_history_turns: int = 6

    # Video generation: "local" (ffmpeg renderer), "replicate" or "fal" (their APIs), or "http"
    # (ClipChat's generic prediction protocol). generator_url empty = the provider's own API;
    # generator_model is Replicate's owner/name[:version] or fal's model id.
    generator: GeneratorName = "local"
    generator_url: str = ""
    generator_api_token: str = ""
    generator_model: str = "video-gen-1"
    # Hosts generated videos may be downloaded from over HTTPS, comma separated ("*.example.com"
    # for its subdomains); empty = the provider's CDN (replicate.delivery, fal.media).
    generator_output_hosts: str = ""
    # Also allow plain http from a listed loopback host (local fakes); refused in production.
    generator_allow_http_loopback: bool = False
    # Replicate: ask the create call to wait this long for a short job (Prefer: wait=N); 0 = poll.
    generator_prefer_wait_seconds: int = Field(default=0, ge=0, le=60)
    # For models billed by compute time: the provider's price per second of it (Replicate's
    # metrics.predict_time, fal's metrics.inference_time). Empty = priced per second of video.
    generator_price_per_compute_second: Decimal | None = None
    generator_aspect_ratio: str = "16:9"
    generator_timeout_seconds: float = 600.0
    # One HTTP request to the prediction API, and how often a running prediction is polled
    # (the interval doubles from the first value up to the second).
    generator_request_timeout_seconds: float = 30.0
    generator_poll_initial_seconds: float = 0.5
    generator_poll_max_seconds: float = 5.0

    # Workers. A work message gets delivery_limit attempts; each step inside one is retried
    # retry_attempts times, the waits doubling from retry_base_seconds up to retry_max_seconds.
    # A claim on work lapses after three missed heartbeats.
    worker_concurrency: int = 1
    # A change of several clips: at most this many clips, and this many generated at once.
    max_clips_per_change: int = Field(default=100, ge=1)
    change_concurrency: int = Field(default=3, ge=1)
    delivery_limit: int = 5
    retry_attempts: int = 3
    retry_base_seconds: float = 0.5
    retry_max_seconds: float = 8.0
    # On SIGTERM a service stops taking work and lets the work in hand finish for this long; the
    # Kubernetes manifests give the pod a little more (terminationGracePeriodSeconds).
    shutdown_grace_seconds: float = 60.0
    # A work message that failed for a retryable reason (a dependency down) comes back after a
    # wait doubling from redelivery_base_seconds up to redelivery_max_seconds: with the defaults its
    # five attempts span 75 s, longer than a database failover or a service restart.
    redelivery_base_seconds: float = 5.0
    redelivery_max_seconds: float = 60.0
    # gRPC health follows each service's dependencies (database, broker), checked this often.
    health_check_interval_seconds: float = 5.0
    health_check_timeout_seconds: float = 2.0

    # Telemetry: OTLP endpoint (e.g. http://collector:4317); empty = no export.
    otlp_endpoint: str = ""
    log_level: LogLevel = "INFO"
    # Prometheus metrics of `clipchat serve status|regenerator|composer`: GET /metrics on this port
    # of grpc_host (0 = not served). The gateway serves its own at /metrics on its HTTP port; in
    # embedded mode that covers the whole process.
    metrics_port: int = Field(default=0, ge=0, le=65535)

    @field_validator(*_CLOSED_SETTINGS, mode="before")
    @classmethod
    def _one_of_its_values(cls, value: Any, info: ValidationInfo) -> Any:
        """One of the setting's values (the log level in any case), or one line naming it."""
        name = str(info.field_name)
        known = get_args(_CLOSED_SETTINGS[name])
        given = value.upper() if name == "log_level" and isinstance(value, str) else value
        if given not in known:
            raise InvalidSettings(f"CLIPCHAT_{name.upper()}={str(value)[:40]!r} is not one of {', '.join(known)}.")
        return given



    @field_validator(*_URL_SETTINGS, mode="after")
    @classmethod
    def _valid_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A URL of one of the setting's schemes; the value is never echoed (some carry passwords)."""
        name = str(info.field_name)
        schemes, example = _URL_SETTINGS[name]
        problem = url_problem(value, schemes) if value else None
        if problem:
            raise InvalidSettings(f"CLIPCHAT_{name.upper()} {problem}; set a URL such as {example}, or leave "
                                  "it unset.")
        return value

    @model_validator(mode="after")
    def _generator_configured(self) -> Self:
        """A paid generator needs its token and a model id of its provider's form."""
        if self.generator in ("replicate", "fal") and not self.generator_api_token:
            raise InvalidSettings(f"CLIPCHAT_GENERATOR={self.generator} needs CLIPCHAT_GENERATOR_API_TOKEN "
                                  "(the provider's API token).")
        if self.generator == "replicate" and not _REPLICATE_MODEL.fullmatch(self.generator_model):
            raise InvalidSettings(f"CLIPCHAT_GENERATOR_MODEL={self.generator_model[:60]!r} is not a Replicate "
                                  "model; use owner/name, owner/name:version_id or a version id.")
        if self.generator == "fal" and "/" not in self.generator_model.strip("/"):
            raise InvalidSettings(f"CLIPCHAT_GENERATOR_MODEL={self.generator_model[:60]!r} is not a fal model "
                                  "id; use e.g. fal-ai/kling-video/v2.1/standard/text-to-video.")
        return self

    @model_validator(mode="after")
    def _budget_within_maximum(self) -> Self:
        if self.budget_limit > self.max_budget_limit:
            raise InvalidSettings(f"CLIPCHAT_BUDGET_LIMIT ({self.budget_limit}) is above "
                                  f"CLIPCHAT_MAX_BUDGET_LIMIT ({self.max_budget_limit}); lower the one "
                                  "or raise the other.")
        return self

    @model_validator(mode="after")
    def _tls_cert_with_key(self) -> Self:
        if (self.grpc_tls_cert_file is None) != (self.grpc_tls_key_file is None):
            raise InvalidSettings("CLIPCHAT_GRPC_TLS_CERT_FILE and CLIPCHAT_GRPC_TLS_KEY_FILE go together; "
                                  "set both or neither.")
        return self

    @model_validator(mode="after")
    def _safe_for_production(self) -> Self:
        """In production, refuse the development defaults, short secrets and example placeholders."""
        if self.environment != "production":
            return self
        problems: dict[str, str] = {}
        key = self.media_signing_key
        if key == DEV_MEDIA_SIGNING_KEY:
            problems.setdefault("media_signing_key", "is the development default; set a random secret "
                                f"of at least {MIN_SIGNING_KEY_BYTES} bytes (openssl rand -hex 32)")
        elif len(key.encode()) < MIN_SIGNING_KEY_BYTES:
            problems.setdefault("media_signing_key", f"is {len(key.encode())} bytes; set a random secret "
                                f"of at least {MIN_SIGNING_KEY_BYTES} bytes (openssl rand -hex 32)")
        if self.auth_tokens.strip() == DEV_AUTH_TOKENS:
            problems.setdefault("auth_tokens", f"is the development default ({DEV_AUTH_TOKENS}); set "
                                f"token=owner pairs with random tokens of at least {MIN_TOKEN_CHARS} "
                                "characters (openssl rand -hex 16)")
        short = sorted(owner for token, owner in self.token_owners().items()
                       if len(token) < MIN_TOKEN_CHARS)
        if short:
            problems.setdefault("auth_tokens", f"has a token shorter than {MIN_TOKEN_CHARS} characters "
                                f"(owner {', '.join(short)}); use random tokens (openssl rand -hex 16)")
        if len(self.service_token) < MIN_TOKEN_CHARS:
            problems.setdefault("service_token", f"is {'empty' if not self.service_token else 'short'}; "
                                f"set one random token of at least {MIN_TOKEN_CHARS} characters shared by "
                                "every service and the gateway (openssl rand -hex 16)")
        if self.generator_allow_http_loopback:
            problems.setdefault("generator_allow_http_loopback", "is for local fakes only; set it to false")
        if self.page_token and len(self.page_token) < MIN_TOKEN_CHARS:
            problems.setdefault("page_token", f"is shorter than {MIN_TOKEN_CHARS} characters; use a "
                                "random token, or leave it empty")
        # A placeholder anywhere means the deployment was never finished; values are not echoed
        # because some (database and broker URLs) carry passwords.
        for name, value in self:
            if isinstance(value, str) and _PLACEHOLDER.search(value):
                problems.setdefault(name, "holds a placeholder (CHANGE_ME); set the real value")
        if problems:
            raise InvalidSettings("CLIPCHAT_ENVIRONMENT=production refuses unsafe settings: " + "; ".join(
                f"CLIPCHAT_{name.upper()} {problem}" for name, problem in problems.items()) + ".")
        return self

    @property
    def reflection_enabled(self) -> bool:
        return self.grpc_reflection if self.grpc_reflection is not None else self.environment != "production"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{(self.data_dir / 'clipchat.db').resolve()}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'storage').resolve()}"

    def token_owners(self) -> dict[str, str]:
        """The ``auth_tokens`` setting as a token → owner mapping."""
        owners: dict[str, str] = {}
        for pair in self.auth_tokens.split(","):
            token, _, owner = pair.strip().partition("=")
            if token and owner:
                owners[token] = owner
        return owners


def url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """What is wrong with ``value`` as a URL of one of ``schemes`` (``None``: nothing), said so that
    it follows the setting's name."""
    if any(c.isspace() for c in value):
        return "has white space in it"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  # a port that is not a number from 0 to 65535 raises here
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in schemes or not value.startswith(f"{parts.scheme}://"):
        return "must start with " + " or ".join(f"{scheme}://" for scheme in schemes)
    if parts.scheme in _HOST_SCHEMES and not parts.hostname:
        return "names no host" if parts.scheme != "s3" else "names no bucket"
    if parts.scheme == "file" and not value.removeprefix("file://"):
        return "names no folder"
    return None
