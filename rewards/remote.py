"""A reward scored by a reward server (``python -m rewards.serve``) over HTTP: registered ``"remote"``.

Config example (a reward term)::

    {name: remote, kwargs: {url: "http://10.0.0.5:8765", on_failure: drop, max_batch_per_request: 32}}

The token, when the server has one, comes from the environment variable ``token_env`` (default
``GEN_RL_REWARD_TOKEN``; unset means no token). A literal ``token`` is accepted but discouraged: it ends
up in config files, logs and checkpoints.

At construction the reward asks ``GET /health`` for the server's modality and limits (retrying like any
request), and fails with a message naming the url and how to start a server when it cannot reach it.
``score`` splits the batch into requests of at most ``max_batch_per_request`` samples (also capped by the
server's ``max_batch`` and so that a request stays within its ``max_pixels_per_request``) sent concurrently.
A request that fails is retried ``retries`` times with exponential backoff (``backoff_s``, 2x, 4x, ...; at
least the ``Retry-After`` a busy server answers with, up to ``MAX_RETRY_AFTER_S``) unless the failure cannot
improve (a 4xx other than 408 / 429: wrong token, too large, bad payload). A request that still fails then
either:

* ``on_failure: "abort"``: raises ``RemoteRewardError`` naming the url, the failure and the fix; or
* ``on_failure: "drop"``: scores exactly that request's samples NaN (no score; the trainer drops them),
  adds ``len`` to ``dropped_samples``, records the reason in ``failures``, and marks them 1.0 in the
  component ``remote_failed`` (0.0 elsewhere), so that no unscored sample ever gets a finite score.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from urllib.parse import urlsplit

import torch
from torch import Tensor

from rewards.base import MODALITY_RANKS, Reward, RewardOutput, register_reward
from rewards.wire import WIRE_FORMATS, decode_response, encode_request, error_message

FAILED_COMPONENT = "remote_failed"
ON_FAILURE = ("abort", "drop")
RETRYABLE_4XX = (408, 429)
MAX_FAILURES_KEPT = 1000  # ``failures`` keeps the most recent reasons only
MAX_RETRY_AFTER_S = 60.0  # a server's Retry-After is honoured up to this many seconds
_START_HINT = (
    "start one with `python -m rewards.serve --reward NAME --port {port}` and point url at the URL it prints"
)


class RemoteRewardError(RuntimeError):
    """A remote reward request that failed for good; the message names the url, the failure and the fix."""


class _RequestError(Exception):
    """One failed HTTP exchange: ``reason`` for people, ``retryable`` whether trying again can help."""

    def __init__(self, reason: str, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s  # the server's Retry-After, when it sent one
        self.attempts = 1


@register_reward("remote")
class RemoteReward(Reward):
    """Scores from a reward server at ``url`` (see the module doc for the failure policy)."""

    def __init__(
        self,
        url: str,
        token_env: str | None = "GEN_RL_REWARD_TOKEN",
        token: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        on_failure: str = "abort",
        modality: str | None = None,
        fmt: str = "safetensors",
        max_batch_per_request: int = 64,
        max_concurrent_requests: int = 4,
    ) -> None:
        _check_settings(
            on_failure, fmt, timeout_s, retries, backoff_s, max_batch_per_request, max_concurrent_requests
        )
        self.url = url.rstrip("/")
        self._scheme, self._host, self._port, self._base_path = _parse_url(self.url)
        self.token_env = token_env
        self._token = token or (os.environ.get(token_env, "").strip() if token_env else "") or None
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.on_failure, self.fmt = on_failure, fmt
        self.max_batch_per_request = max_batch_per_request
        self.max_concurrent_requests = max_concurrent_requests
        self.max_pixels_per_request: int | None = None  # the server's budget, from /health
        self.dropped_samples = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._configure_from_health(modality)

    def __repr__(self) -> str:
        return (
            f"RemoteReward(url={self.url!r}, reward={self.server_reward!r}, modality={self.modality!r}, "
            f"on_failure={self.on_failure!r})"
        )

    # ----- construction -----
    def _configure_from_health(self, modality: str | None) -> None:
        """Modality, reward name and batch cap from ``GET /health``; a clear error when unreachable."""
        try:
            health = json.loads(self._call_with_retries("GET", "/health"))
        except _RequestError as failure:
            raise RemoteRewardError(self._health_message(failure)) from None
        except json.JSONDecodeError as error:
            raise RemoteRewardError(
                f"{self.url}/health did not answer JSON ({error}); is url a reward server?"
            ) from None
        served = health.get("modality") if isinstance(health, dict) else None
        if served not in MODALITY_RANKS:
            raise RemoteRewardError(
                f"{self.url}/health names modality {served!r}; is url a gen-rl reward server?"
            )
        if modality is not None and modality != served:
            raise RemoteRewardError(
                f"remote reward: modality {modality!r} was configured but the server at {self.url} scores "
                f"{served!r}; fix the config's modality (or leave it out to take the server's)"
            )
        self.modality = served
        self.server_reward = health.get("reward")
        server_max = health.get("max_batch")
        if isinstance(server_max, int) and server_max > 0:
            self.max_batch_per_request = min(self.max_batch_per_request, server_max)
        budget = health.get("max_pixels_per_request")
        if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
            self.max_pixels_per_request = budget

    def _health_message(self, failure: _RequestError) -> str:
        if failure.retryable:
            return (
                f"cannot reach the reward server at {self.url} (GET /health failed after {failure.attempts} "
                f"attempt(s): {failure.reason}); {_START_HINT.format(port=self._port)}"
            )
        return f"remote reward at {self.url}: GET /health was refused: {failure.reason}"

    # ----- scoring -----
    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Scores from the server, ``max_batch_per_request`` samples per request, requests sent concurrently."""
        batch = pixels.shape[0]
        pixels = pixels.detach().to("cpu")
        size = self.samples_per_request(pixels.shape[1:])
        chunks = [range(start, min(start + size, batch)) for start in range(0, batch, size)]
        bodies = [
            encode_request(
                pixels[c.start : c.stop], prompts[c.start : c.stop], metadata[c.start : c.stop], self.fmt
            )
            for c in chunks
        ]
        results = self._send_all(bodies, [len(chunk) for chunk in chunks])
        failed = [
            (chunk, result)
            for chunk, result in zip(chunks, results, strict=True)
            if isinstance(result, _RequestError)
        ]
        if failed and self.on_failure == "abort":
            chunk, failure = failed[0]
            raise RemoteRewardError(self._abort_message(chunk, failure, len(failed), len(chunks)))
        self._record_drops(failed)
        return _merge(results, chunks, batch)

    def samples_per_request(self, sample_shape: tuple[int, ...]) -> int:
        """``max_batch_per_request``, lowered so that a request fits the server's ``max_pixels_per_request``."""
        if self.max_pixels_per_request is None:
            return self.max_batch_per_request
        fitting = self.max_pixels_per_request // max(math.prod(sample_shape), 1)
        return max(1, min(self.max_batch_per_request, fitting))

    def _send_all(
        self, bodies: list[tuple[bytes, str]], sizes: list[int]
    ) -> list[RewardOutput | _RequestError]:
        """One scored request per body, concurrently when there are several; failures as values."""
        if len(bodies) == 1:
            return [self._score_request(*bodies[0], sizes[0])]
        with ThreadPoolExecutor(max_workers=min(len(bodies), self.max_concurrent_requests)) as pool:
            futures = [
                pool.submit(self._score_request, body, kind, size)
                for (body, kind), size in zip(bodies, sizes, strict=True)
            ]
            return [future.result() for future in futures]

    def _score_request(self, body: bytes, content_type: str, size: int) -> RewardOutput | _RequestError:
        try:
            answer = self._call_with_retries("POST", "/score", body, content_type)
        except _RequestError as failure:
            return failure
        try:
            return decode_response(answer, size)
        except ValueError as error:
            return _RequestError(f"the server's answer is malformed: {error}", retryable=False)

    def _abort_message(self, chunk: range, failure: _RequestError, failed: int, requests: int) -> str:
        return (
            f"remote reward at {self.url} failed on samples {chunk.start}-{chunk.stop - 1} ({failed} of "
            f"{requests} request(s) failed) after {failure.attempts} attempt(s): {failure.reason}. To score "
            "the other samples and drop these as NaN instead, set on_failure: drop"
        )

    def _record_drops(self, failed: list[tuple[range, _RequestError]]) -> None:
        with self._lock:
            for chunk, failure in failed:
                self.dropped_samples += len(chunk)
                self.failures.append(
                    f"{self.url}: samples {chunk.start}-{chunk.stop - 1} dropped after {failure.attempts} "
                    f"attempt(s): {failure.reason}"
                )
            del self.failures[:-MAX_FAILURES_KEPT]

    # ----- HTTP -----
    def _call_with_retries(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> bytes:
        """The 200 body of the request, retried with exponential backoff; ``_RequestError`` otherwise."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return self._call_once(method, path, body, content_type)
            except _RequestError as failure:
                failure.attempts = attempt + 1
                if not failure.retryable or attempt + 1 == attempts:
                    raise
                wait_s = self.backoff_s * 2**attempt
                if failure.retry_after_s is not None:
                    wait_s = max(wait_s, min(failure.retry_after_s, MAX_RETRY_AFTER_S))
            time.sleep(wait_s)
        raise AssertionError("unreachable")

    def _call_once(self, method: str, path: str, body: bytes | None, content_type: str | None) -> bytes:
        headers = {"Content-Type": content_type} if content_type else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        connection_class = (
            http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        )
        connection = connection_class(self._host, self._port, timeout=self.timeout_s)
        try:
            connection.request(method, self._base_path + path, body=body, headers=headers)
            response = connection.getresponse()
            status, answer = response.status, response.read()
            retry_after_s = retry_after_seconds(response.getheader("Retry-After"))
        except TimeoutError:
            raise _RequestError(
                f"no answer within timeout_s={self.timeout_s:g} s; raise timeout_s or lower max_batch_per_request "
                "(or check that the server is not stuck)",
                retryable=True,
            ) from None
        except ConnectionRefusedError:
            raise _RequestError(
                f"connection refused: nothing listens at {self._host}:{self._port}; is the reward server "
                f"running? {_START_HINT.format(port=self._port)}",
                retryable=True,
            ) from None
        except (OSError, http.client.HTTPException) as error:
            raise _RequestError(
                f"connection failed ({type(error).__name__}: {error}); check that the reward server is up",
                retryable=True,
            ) from None
        finally:
            connection.close()
        if status != 200:
            reason = self._status_reason(status, error_message(answer))
            raise _RequestError(reason, _retryable_status(status), retry_after_s)
        return answer

    def _status_reason(self, status: int, message: str) -> str:
        """What an HTTP error status means for this client and how to fix it."""
        if status == 401:
            where = f"${self.token_env}" if self.token_env else "token_env"
            return (
                f"HTTP 401, the token is wrong or missing ({message}); set {where} to the token the server "
                "was started with"
            )
        if status == 413:
            return f"HTTP 413, request too large ({message}); max_batch_per_request is {self.max_batch_per_request}"
        return f"HTTP {status}: {message}"


def retry_after_seconds(header: str | None) -> float | None:
    """The wait a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None if absent or unreadable."""
    text = (header or "").strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _retryable_status(status: int) -> bool:
    """5xx, 408 and 429 may pass on a later try; other 4xx will not."""
    return status >= 500 or status in RETRYABLE_4XX


def _check_settings(
    on_failure: str,
    fmt: str,
    timeout_s: float,
    retries: int,
    backoff_s: float,
    max_batch: int,
    concurrent: int,
) -> None:
    """ValueError naming the setting and its valid values."""
    if on_failure not in ON_FAILURE:
        raise ValueError(f"remote reward on_failure must be one of {ON_FAILURE}; got {on_failure!r}")
    if fmt not in WIRE_FORMATS:
        raise ValueError(f"remote reward fmt must be one of {WIRE_FORMATS}; got {fmt!r}")
    if not timeout_s > 0 or backoff_s < 0 or retries < 0:
        raise ValueError(
            f"remote reward needs timeout_s > 0, retries >= 0 and backoff_s >= 0; got {timeout_s}, {retries}, "
            f"{backoff_s}"
        )
    if max_batch < 1 or concurrent < 1:
        raise ValueError(
            f"remote reward max_batch_per_request and max_concurrent_requests must be >= 1; got {max_batch}, "
            f"{concurrent}"
        )


def _parse_url(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path prefix)`` of a reward server URL, or ValueError with an example."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(
            f"remote reward url must look like http://HOST:PORT (e.g. http://127.0.0.1:8765); got {url!r}"
        )
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def _merge(results: list[RewardOutput | _RequestError], chunks: list[range], batch: int) -> RewardOutput:
    """The full-batch output: NaN scores and components for failed chunks; ``remote_failed`` marks them."""
    scores = torch.full((batch,), math.nan)
    failed = torch.zeros(batch)
    names = {name for result in results if isinstance(result, RewardOutput) for name in result.components}
    components: dict[str, Tensor] = {name: torch.full((batch,), math.nan) for name in sorted(names)}
    for chunk, result in zip(chunks, results, strict=True):
        part = slice(chunk.start, chunk.stop)
        if isinstance(result, _RequestError):
            failed[part] = 1.0
            continue
        scores[part] = result.scores
        for name, values in result.components.items():
            components[name][part] = values
    components[FAILED_COMPONENT] = failed
    return RewardOutput(scores=scores, components=components)
