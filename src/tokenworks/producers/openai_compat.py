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

# Statuses after which the next deployment may be tried: the upstream did no work for us.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
MAX_ERROR_BODY_BYTES = 64 * 1024


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
        # How long the upstream asked us to stay away: `retry-after-ms`, else `Retry-After`.
        self.retry_after_s = retry_after_s


class OpenAIProducer:
    """One upstream speaking the OpenAI wire format, with its own connection pool."""

    def __init__(self, spec: Producer) -> None:
        self.spec = spec
        self.name = spec.name
        self.base_url = spec.base_url.rstrip("/")
        api_key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
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

    async def post(self, path: str, body: bytes) -> aiohttp.ClientResponse:
        """Send a request; return a 2xx response whose body is still unread.

        Raises UpstreamError for connect failures, timeouts and non-2xx statuses, marked
        retryable when another deployment could still serve the request.
        """
        assert self._session is not None, "producer not started"
        try:
            response = await self._session.post(
                self.base_url + path, data=body, headers=self._headers
            )
        except TimeoutError as exc:
            raise UpstreamError(self.name, "timeout", "upstream timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(self.name, "connect", f"upstream unreachable: {exc}") from exc
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
            f"upstream answered {response.status}",
            status=response.status,
            retryable=response.status in RETRYABLE_STATUSES,
            body=error_body,
            retry_after=response.headers.get("Retry-After"),
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
