"""The OpenAI-compatible upstream adapter: pooled keep-alive connections and timeouts.

It only moves bytes and classifies failures; what to do about a failure (try the next
deployment, or give up) is the relay's decision.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import aiohttp

from tokenworks.config import Producer
from tokenworks.wire.headers import passthrough

# Statuses after which the next deployment may be tried: the upstream did no work for us.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
# The upstream refused the gateway's own credentials: another deployment may well serve, and
# if none does, the client is told it was the gateway's fault (never its own key's).
CREDENTIAL_STATUSES = frozenset({401, 403})
MAX_ERROR_BODY_BYTES = 64 * 1024
# The Messages API version a `kind: anthropic` producer is asked for (the one the translations
# in wire/anthropic.py are written against).
ANTHROPIC_VERSION = "2023-06-01"


class UpstreamError(Exception):
    """An upstream attempt that failed before any byte reached the client."""

    def __init__(
        self,
        producer: str,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = True,
        body: bytes = b"",
        retry_after: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.producer = producer
        self.reason = reason
        self.message = message
        self.status = status
        self.retryable = retryable
        self.body = body
        self.retry_after = retry_after
        # The upstream's headers a client may see (`wire.headers.passthrough`).
        self.headers = headers or []
        # How long the upstream asked us to stay away: `retry-after-ms`, else `Retry-After`.
        self.retry_after_s = retry_after_s

    @property
    def credentials_refused(self) -> bool:
        """The upstream refused the gateway's own key (401/403), not the client's request."""
        return self.status in CREDENTIAL_STATUSES


class OpenAIProducer:
    """One upstream speaking the OpenAI wire format, with its own connection pool."""

    def __init__(self, spec: Producer) -> None:
        self.spec = spec
        self.name = spec.name
        self.base_url = spec.base_url.rstrip("/")
        api_key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        self._headers = {"Content-Type": "application/json"}
        if spec.kind == "anthropic":
            self._headers["anthropic-version"] = ANTHROPIC_VERSION
            if api_key:
                self._headers["x-api-key"] = api_key
        elif api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Named in this producer's failures: an unset key is the usual cause of a 401, and of
        # a real provider that cannot be reached from a machine set up for local tests.
        self.missing_key_env = spec.api_key_env if spec.api_key_env and not api_key else None
        self._timeout = aiohttp.ClientTimeout(
            total=spec.timeout_s, sock_connect=spec.connect_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.spec.max_connections,
            keepalive_timeout=60,
            ttl_dns_cache=300,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _hint(self) -> str:
        if self.missing_key_env is None:
            return ""
        return f" (${self.missing_key_env} is unset: set it where the gateway runs, restart)"

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """Send a request; return a 2xx response whose body is still unread. `headers`: the
        client's own that go on (`wire.headers.anthropic_forwarded`), over ours.

        Raises UpstreamError for connect failures, timeouts and non-2xx statuses, marked
        retryable when another deployment could still serve the request.
        """
        return await self.request("POST", path, body, headers)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """`post` for any method (GET and DELETE of a stored response)."""
        assert self._session is not None, "producer not started"
        sent = self._headers if headers is None else {**self._headers, **headers}
        url = self.base_url + path
        try:
            try:
                response = await self._session.request(method, url, data=body, headers=sent)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionResetError):
                # A kept-alive connection the upstream closed as we reused it (its idle
                # timeout, often 5 s, is shorter than ours): nothing was answered, so send
                # once more, on a new connection, rather than fail a request for a race.
                response = await self._session.request(method, url, data=body, headers=sent)
        except TimeoutError as exc:
            raise UpstreamError(self.name, "timeout", "upstream timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                self.name, "connect", f"producer {self.name!r} unreachable{self._hint()}"
            ) from exc
        if response.status < 300:
            return response
        try:
            error_body = await response.content.read(MAX_ERROR_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError):
            error_body = b""
        finally:
            response.release()
        raise UpstreamError(
            self.name,
            f"status_{response.status}",
            f"producer {self.name!r} answered {response.status}{self._hint()}",
            status=response.status,
            retryable=response.status in RETRYABLE_STATUSES
            or response.status in CREDENTIAL_STATUSES,
            body=error_body,
            retry_after=response.headers.get("Retry-After"),
            headers=passthrough(response.raw_headers),
            retry_after_s=retry_after_s(response.headers),
        )


MAX_RETRY_AFTER_S = 86_400.0


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds an upstream asked to wait: `retry-after-ms` (OpenAI, Anthropic SDKs read it
    first), else `Retry-After` in seconds; None when absent or not a number (an HTTP date
    is rare from these APIs and is ignored)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue
            if math.isfinite(seconds) and seconds >= 0:
                return min(seconds, MAX_RETRY_AFTER_S)
    return None
