"""The config file: its schema, loading it, and errors that name the line.

The file is YAML. It is decoded into typed msgspec structs with unknown fields forbidden, so a
misspelled key fails at start instead of being silently ignored. A validation error carries a
JSON path (`$.producers[0].kind`); we walk the YAML node tree along that path to report the
line and column a person has to fix.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from tokenworks.pricing.spec import CostSpec, PricingSpec

ADMIN_KEY_ENV = "TOKENWORKS_ADMIN_KEY"
CONFIG_ENV = "TOKENWORKS_CONFIG"


class ConfigError(Exception):
    """A config file that cannot be used; the message names the place and what is wrong."""


# Every float in the schema has both bounds: a bound is what rejects NaN (it compares false
# with everything) and infinity, which YAML spells `.nan` and `.inf`.
TimeoutS = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
RatePerS = Annotated[float, msgspec.Meta(gt=0, le=1_000_000)]


WireFormat = Literal["chat", "responses", "messages"]


def default_formats(kind: str, base_url: str) -> tuple[WireFormat, ...]:
    """What a producer speaks when its config does not say: Anthropic speaks Messages; an
    OpenAI-compatible server speaks chat completions, and OpenAI itself Responses too."""
    if kind == "anthropic":
        return ("messages",)
    if re.match(r"^https://api\.openai\.com(/|$)", base_url):
        return ("chat", "responses")
    return ("chat",)


class Producer(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An upstream that produces tokens."""

    name: str
    # The upstream's protocol: "openai" (Bearer auth) or "anthropic" (x-api-key and
    # anthropic-version headers; speaks Messages).
    kind: Literal["openai", "anthropic"] = "openai"
    base_url: str
    api_key_env: str | None = None
    timeout_s: TimeoutS = 600.0
    connect_timeout_s: TimeoutS = 10.0
    max_connections: int = 1024
    # The producer's billing currency (for cost overrides), and its genai-prices provider id
    # (openai, anthropic, google, deepseek, zhipuai, ...) for published prices; when unset the
    # provider is matched by base_url, never guessed from a model name.
    currency: str | None = None
    provider: str | None = None
    # The wire formats the producer speaks natively; a route in one of them passes through,
    # any other is translated to one it speaks. Unset: `default_formats` (by kind and URL).
    formats: tuple[WireFormat, ...] | None = None
    # What the producer can take (dispatch/capacity.py): concurrent requests, requests and
    # tokens per minute. Unset: not limited by us; the concurrency is then learned (AIMD).
    # Work beyond them waits in the scheduler rather than being sent to be refused.
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    rpm: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] | None = None
    tpm: Annotated[int, msgspec.Meta(ge=1, le=10_000_000_000)] | None = None

    @property
    def wire_formats(self) -> tuple[WireFormat, ...]:
        return self.formats or default_formats(self.kind, self.base_url)

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.base_url):
            raise ValueError("base_url must start with http:// or https://")
        if self.formats is not None and not self.formats:
            raise ValueError("formats must name at least one wire format")
        if not 1 <= self.max_connections <= 100_000:
            raise ValueError("max_connections must be within 1..100000")


class Deployment(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One place a public model can be served: a producer and its name for the model."""

    producer: str
    model: str
    cost: CostSpec | None = None
    # Share of first picks under `routing: weighted` (relative to the other deployments'
    # weights); 0: only ever a fallback.
    weight: Annotated[float, msgspec.Meta(ge=0, le=1_000_000)] = 1.0


class Model(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A public model name and the deployments that serve it, tried in order."""

    name: str
    deployments: list[Deployment]
    # tiktoken encoding used when the upstream reports no usage; guessed from the name if unset.
    tokenizer: str | None = None
    # The most output one choice may produce: what a request without max_tokens is held for,
    # and the most max_tokens may ask (more is a 400). Unset: the context window, at most
    # 131,072 tokens (dispatch/billing.py DEFAULT_MAX_OUTPUT_TOKENS).
    max_output_tokens: int | None = None
    # Tokens one choice can use, input and output each; usage reported beyond it (times the
    # request's prompts and choices) is an upstream error, not a bill. Unset: the price book's
    # window of every deployment, else 10,485,760 (billing.DEFAULT_CONTEXT_WINDOW_TOKENS).
    context_window_tokens: int | None = None
    # The order deployments are tried in (dispatch/router.py): as configured, cheapest for
    # the request first (its price now: time of day, tier, tariff), fastest first (learned
    # time to first token and output rate), or a random order weighted by `weight`.
    routing: Literal["ordered", "cheapest", "fastest", "weighted"] = "ordered"

    def __post_init__(self) -> None:
        if not self.deployments:
            raise ValueError("a model needs at least one deployment")
        if self.max_output_tokens is not None and not 1 <= self.max_output_tokens <= 10_000_000:
            raise ValueError("max_output_tokens must be within 1..10000000")
        if self.context_window_tokens is not None and not (
            1 <= self.context_window_tokens <= 100_000_000
        ):
            raise ValueError("context_window_tokens must be within 1..100000000")


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Bounds on what one request may take."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_attempts: int = 3
    # A stream whose client has not taken a write for this long is cut (and charged for what
    # was produced): a client that stops reading must not hold an answer, its credit and an
    # upstream slot open.
    client_stall_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.client_stall_timeout_s <= 3600:  # also false for NaN
            raise ValueError("client_stall_timeout_s must be within (0, 3600] seconds")
        if not 1024 <= self.max_body_bytes <= 256 * 1024 * 1024:
            raise ValueError("max_body_bytes must be within 1 KiB..256 MiB")
        if not 1 <= self.max_attempts <= 10:
            raise ValueError("max_attempts must be within 1..10")


class KeyLimits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Bounds on the sub-agent keys a key may mint (`POST /v1/keys`): everything a client can
    make the gateway keep is bounded in count and in rate."""

    # Live (unrevoked, unexpired) children of one key.
    max_children_per_key: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1000
    # Live keys under one admin-made key, at every depth: per-key caps alone multiply.
    max_keys_per_tree: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 10_000
    # A token bucket per key tree: `mint_burst` at once, then `mint_rate_per_s`; beyond, 429.
    mint_rate_per_s: RatePerS = 10.0
    mint_burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1000


class Http(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Bounds on a request's head, enforced by the HTTP server before the app sees it."""

    # The request line and all headers together; more is a 431.
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024)] = 16 * 1024
    # From a connection's first byte (or a kept-alive connection's next request's first byte)
    # to the end of its headers; a slower client is disconnected (slowloris).
    header_timeout_s: TimeoutS = 10.0


class MetricsAccess(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Who may read `/metrics`: anyone (the default, as before), or whoever presents the
    bearer token held in the environment variable `bearer_token_env`."""

    bearer_token_env: str | None = None

    def resolved_token(self) -> str | None:
        """The token to require, or None when open. Raises ConfigError if the variable named
        is unset or empty: a protection asked for is never silently off."""
        if self.bearer_token_env is None:
            return None
        token = os.environ.get(self.bearer_token_env)
        if not token:
            raise ConfigError(
                f"metrics.bearer_token_env: the environment variable "
                f"{self.bearer_token_env} is unset or empty"
            )
        return token


class Retention(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How long history is kept (docs/retention.md). Unset: forever (the default, as before);
    daily roll-ups of usage are kept regardless and made either way."""

    # Raw usage rows (one per request) of UTC days older than this are deleted once their day
    # is rolled up; reports of whole days keep reading the roll-up. On a partitioned
    # PostgreSQL table a month goes as one partition, once all of it is past the limit.
    usage_rows_days: Annotated[int, msgspec.Meta(ge=1, le=36_500)] | None = None
    # Closed holds older than this are compacted into per-day sums. At least 35 days: a
    # monthly budget's check reads the holds of its current period.
    holds_days: Annotated[int, msgspec.Meta(ge=35, le=36_500)] | None = None
    # Ledger transfers of weeks older than this are deleted, their sums kept (statements
    # start at the horizon at the earliest). At least holds_days, which must be set: a hold
    # row still kept keeps its spend transfers and its own check.
    transfers_days: Annotated[int, msgspec.Meta(ge=35, le=36_500)] | None = None
    # How often the job runs (roll-ups, deletions, compaction), and the rows one of its
    # transactions may delete: the writers wait at most that one batch.
    interval_s: Annotated[float, msgspec.Meta(ge=1, le=86_400)] = 300.0
    batch_rows: Annotated[int, msgspec.Meta(ge=100, le=100_000)] = 5_000


QueueWaitMs = Annotated[int, msgspec.Meta(ge=1, le=86_400_000)]


class TierDeadlines(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How long a request of each service tier may wait for a producer, in ms from arrival,
    when it sends no `X-Tokenworks-Deadline-Ms`. One that cannot start in time is shed with
    429 and a Retry-After, at once when the queue ahead already says so."""

    priority: QueueWaitMs = 30_000
    standard: QueueWaitMs = 120_000
    flex: QueueWaitMs = 900_000


class Breaker(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The circuit breaker of each deployment (dispatch/capacity.py `CircuitBreaker`)."""

    consecutive_failures: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 5
    error_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    window: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    min_volume: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    open_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    max_open_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0
    probes: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class Dispatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The fair scheduler in front of the producers (dispatch/scheduler.py)."""

    deadline_ms: TierDeadlines = msgspec.field(default_factory=TierDeadlines)
    # Queued requests: per tenant (account) per producer, per producer, and in all.
    tenant_queue_cap: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1_000
    pool_queue_cap: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000
    total_queue_cap: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 200_000
    # Anti-starvation: while standard work waits, at most this many priority requests start
    # before the next standard one; while flex waits, at most flex_burst + 1 others.
    priority_burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 8
    flex_burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 32
    # An unconfigured producer's adaptive concurrency limit starts here.
    initial_concurrency: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 16
    breaker: Breaker = msgspec.field(default_factory=Breaker)


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole file."""

    database: str = "sqlite:///tokenworks.db"
    admin_key: str | None = None
    producers: list[Producer] = msgspec.field(default_factory=list)
    models: list[Model] = msgspec.field(default_factory=list)
    limits: Limits = msgspec.field(default_factory=Limits)
    pricing: PricingSpec = msgspec.field(default_factory=PricingSpec)
    keys: KeyLimits = msgspec.field(default_factory=KeyLimits)
    http: Http = msgspec.field(default_factory=Http)
    metrics: MetricsAccess = msgspec.field(default_factory=MetricsAccess)
    retention: Retention = msgspec.field(default_factory=Retention)
    # Send `X-Tokenworks-Cost` (the operator's own cost) to clients: off, since a reseller
    # or a company charging its teams a markup does not show its margin to those it bills.
    expose_cost_header: bool = False
    dispatch: Dispatch = msgspec.field(default_factory=Dispatch)

    def resolved_admin_key(self) -> str | None:
        return os.environ.get(ADMIN_KEY_ENV) or self.admin_key


def load(path: str | Path) -> Config:
    """Read and check a config file; raise ConfigError naming the line on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    config = loads(text, source=str(path))
    config.database = anchored_database(config.database, path.parent)
    return config


def anchored_database(url: str, base: Path) -> str:
    """A relative `sqlite:///file.db` made absolute against `base` (the config file's folder):
    where the ledger lives must not depend on the directory `serve` was started from, or a
    gateway started elsewhere silently opens an empty ledger."""
    rest = url.removeprefix("sqlite:///")
    if rest == url or rest.startswith("/") or rest in ("", ":memory:"):
        return url
    return "sqlite:///" + str((base / rest).resolve())


def loads(text: str, source: str = "<config>", *, check_prices: bool = True) -> Config:
    """Parse and check a config; `check_prices=False` skips building the price book, for
    callers that build their own from parts (the pricing tests)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}:1: the config must be a mapping of settings")
    bad = _non_finite_path(raw, "$")
    if bad is not None:
        line = _line_of(node, bad)
        where = f"{source}:{line}" if line else source
        raise ConfigError(f"{where}: {bad.removeprefix('$.')}: must be a finite number")
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        message, path = _split_msgspec_error(str(exc))
        unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
        if unknown:
            path = f"{path}.{unknown.group(1)}"
            message = "unknown field (not part of the config schema)"
        line = _line_of(node, path)
        where = f"{source}:{line}" if line else source
        field = path.removeprefix("$").lstrip(".") or "(top level)"
        raise ConfigError(f"{where}: {field}: {message}") from exc
    _check_references(config, node, source)
    _check_retention(config, node, source)
    if check_prices:
        _check_prices(config, node, source)
    return config


def _check_prices(config: Config, node: yaml.Node | None, source: str) -> None:
    """Every deployment must have a known cost: an unpriced model is an error, not free."""
    from tokenworks.pricing.quote import Pricer, PricingConfigError

    try:
        Pricer.from_config(config)
    except PricingConfigError as exc:
        path = "$.models"
        match = re.search(r"models\[(\d+)\]\.deployments\[(\d+)\]", str(exc))
        if match:
            path = f"$.models[{match.group(1)}].deployments[{match.group(2)}]"
        line = _line_of(node, path)
        where = f"{source}:{line}" if line else source
        raise ConfigError(f"{where}: {exc}") from exc


def _non_finite_path(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinity (YAML's `.nan`, `.inf`) in the raw config."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items: Any = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_path, sub in items:
        found = _non_finite_path(sub, sub_path)
        if found is not None:
            return found
    return None


def _split_msgspec_error(text: str) -> tuple[str, str]:
    match = re.match(r"^(.*) - at `(\$[^`]*)`$", text, re.S)
    if not match:
        return text, "$"
    return match.group(1), match.group(2)


def _line_of(node: yaml.Node | None, path: str) -> int | None:
    """The 1-based line of the YAML node at a msgspec path like `$.models[0].name`."""
    if node is None:
        return None
    best = node
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        key, index = part
        nxt: yaml.Node | None = None
        if key and isinstance(best, yaml.MappingNode):
            for k, v in best.value:
                if getattr(k, "value", None) == key:
                    nxt = v
                    break
        elif index and isinstance(best, yaml.SequenceNode):
            i = int(index)
            if i < len(best.value):
                nxt = best.value[i]
        if nxt is None:
            break
        best = nxt
    return best.start_mark.line + 1


def _check_retention(config: Config, node: yaml.Node | None, source: str) -> None:
    """Fields of `retention:` that bound each other."""
    policy = config.retention
    if policy.transfers_days is None:
        return
    if policy.holds_days is None or policy.transfers_days < policy.holds_days:
        line = _line_of(node, "$.retention.transfers_days")
        where = f"{source}:{line}" if line else source
        holds = "unset" if policy.holds_days is None else str(policy.holds_days)
        raise ConfigError(
            f"{where}: retention.transfers_days: must be >= retention.holds_days (now {holds}):"
            " a hold row still kept needs its transfers"
        )


def _check_references(config: Config, node: yaml.Node | None, source: str) -> None:
    def fail(path: str, message: str) -> None:
        line = _line_of(node, path)
        where = f"{source}:{line}" if line else source
        raise ConfigError(f"{where}: {path.removeprefix('$.')}: {message}")

    producers: dict[str, Producer] = {}
    for i, producer in enumerate(config.producers):
        if producer.name in producers:
            fail(f"$.producers[{i}].name", f"duplicate producer name {producer.name!r}")
        producers[producer.name] = producer
    seen: set[str] = set()
    for i, model in enumerate(config.models):
        if model.name in seen:
            fail(f"$.models[{i}].name", f"duplicate model name {model.name!r}")
        seen.add(model.name)
        for j, deployment in enumerate(model.deployments):
            if deployment.producer not in producers:
                known = ", ".join(sorted(producers)) or "none defined"
                fail(
                    f"$.models[{i}].deployments[{j}].producer",
                    f"unknown producer {deployment.producer!r} (known: {known})",
                )
    if not config.database.startswith(("sqlite://", "postgresql://", "postgres://")):
        fail("$.database", "must be a sqlite:/// or postgresql:// URL")


def to_builtins(config: Config) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(config)
    return data
