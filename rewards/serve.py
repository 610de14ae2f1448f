"""Serve one reward over HTTP so that trainers on other processes or machines can score samples with it.

Run ``python -m rewards.serve --reward colour`` (or ``--config reward.yaml`` holding ``name`` and
``kwargs``); it binds 127.0.0.1:8765 unless told otherwise and prints one line
``gen-rl reward server: <name> on http://host:port`` on stdout once it listens (``--port 0`` picks a free
port: read it from that line). Clients use ``RemoteReward`` (``rewards/remote.py``, registered ``"remote"``).

Endpoints (wire format: ``rewards/wire.py``):

* ``POST /score``: one batch of samples in, JSON scores out.
* ``GET /health``: ``{"reward", "modality", "status": "ok", "max_batch", "max_request_bytes",
  "max_pixels_per_sample", "max_pixels_per_request"}``.

Both need ``Authorization: Bearer <token>`` when the server has a token (``--token-env VAR``, default
``GEN_RL_REWARD_TOKEN`` when that is set, or ``--token-file PATH``); the token is compared in constant time
and never echoed or logged. A token variable that is set but empty is an error (it never turns
authentication off), and an address other than loopback is refused without a token.

Holding under load: the listen backlog is ``LISTEN_BACKLOG`` (connections queue in the kernel while the
server is busy); at most ``max_connections`` connections are handled at once, and one beyond that gets
``503`` with ``Retry-After`` (which ``RemoteReward`` honours). Each connection must deliver its request line
and headers within ``read_timeout_s`` (a deadline, not an idle timeout: a client sending a byte a second is
cut off too, with a 408), and once authenticated its body within ``read_timeout_s`` plus one second per
``MIN_BODY_BYTES_PER_S``; so slow clients cannot hold handler threads. Decoded memory per request is bounded
by ``RequestLimits`` (checked from headers before decoding, ``rewards/wire.py``).

Batching: HTTP handler threads decode and check each request, then queue it. One worker thread owns the
reward and merges queued requests whose samples have the same shape into one reward call of at most
``max_batch`` samples (waiting up to ``--batch-wait-ms`` for more to arrive), then splits the scores back.
When a merged call fails, each request of it is retried alone, so that one bad request (a prompt the
reward rejects) fails only itself with a 500 naming the error, never the requests it was merged with.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import inspect
import ipaddress
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor

from rewards.base import MODALITY_LAYOUTS, MODALITY_RANKS, Reward, RewardOutput, build_reward
from rewards.wire import (
    MIB,
    RequestLimits,
    RequestRejected,
    decode_request,
    encode_error,
    encode_response,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = "GEN_RL_REWARD_TOKEN"
STARTUP_PREFIX = "gen-rl reward server:"
DRAIN_SECONDS = 2.0  # how long a rejected request's unread body is read and discarded before closing
SOCKET_TIMEOUT_S = 120.0  # a client that stalls mid-request for this long is dropped
LISTEN_BACKLOG = 256  # connections the kernel queues until the server accepts them
DEFAULT_MAX_CONNECTIONS = 128  # connections handled at once; one more gets 503 + Retry-After
DEFAULT_READ_TIMEOUT_S = 10.0  # deadline for a request's line and headers (before authentication)
MIN_BODY_BYTES_PER_S = MIB  # an authenticated body must arrive at least this fast (plus read_timeout_s)
BUSY_RETRY_AFTER_S = 1
MAX_LINGERING = 1024  # refused connections drained at once; beyond that they are closed at once
_POLL_S = 0.05


@dataclass
class _Job:
    """One decoded request waiting for the worker; ``done`` is set once ``output`` or ``error`` is."""

    pixels: Tensor
    prompts: list[str]
    metadata: list[dict]
    done: threading.Event = field(default_factory=threading.Event)
    output: RewardOutput | None = None
    error: tuple[int, str] | None = None

    @property
    def size(self) -> int:
        """The number of samples."""
        return self.pixels.shape[0]

    @property
    def key(self) -> tuple[int, ...]:
        """The per-sample shape: only requests with the same key are merged into one reward call."""
        return tuple(self.pixels.shape[1:])


class RewardServer:
    """An HTTP reward server running in background threads (``start`` / ``stop``; a context manager too).

    ``model_calls`` counts reward calls (``failed_calls`` those that raised) and ``requests_scored``
    successful requests, so that callers can see how many requests were merged into each call.
    """

    def __init__(
        self,
        reward: Reward,
        host: str = DEFAULT_HOST,
        port: int = 0,
        token: str | None = None,
        limits: RequestLimits | None = None,
        batch_wait_s: float = 0.005,
        name: str | None = None,
        log_requests: bool = False,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0; got {batch_wait_s}")
        if getattr(reward, "learns", False) or getattr(reward, "uses_group_ids", False):
            raise ValueError(
                f"{type(reward).__name__} learns or compares samples within a group, which a served reward cannot "
                "(each request is scored alone, and nothing updates it); use it as a local reward term instead"
            )
        if token is not None and not token.strip():
            raise ValueError("the token is empty; give a non-empty token or None for no token")
        check_exposure(host, token)
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be a positive integer; got {max_connections!r}")
        if not read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0; got {read_timeout_s}")
        self.max_connections = max_connections
        self.read_timeout_s = float(read_timeout_s)
        self.reward = reward
        self.name = name or type(reward).__name__
        self.host, self.port = host, port
        self.limits = limits or RequestLimits()
        self.batch_wait_s = batch_wait_s
        self.log_requests = log_requests
        self._token = token.encode("utf-8") if token else None
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._backlog: list[_Job] = []  # jobs taken off the queue but not merged yet (worker thread only)
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.model_calls = 0
        self.failed_calls = 0
        self.requests_scored = 0

    # ----- lifecycle -----
    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket (call ``start`` first)."""
        if self._httpd is None:
            raise RuntimeError("the reward server is not started; call start() first")
        host, port = self._httpd.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def bind(self) -> str:
        """Bind and listen without serving yet (clients' connections queue in the kernel); the URL."""
        if self._httpd is None:
            self._httpd = _make_http_server(self.host, self.port, self)
        return self.url

    def start(self) -> str:
        """Bind if not bound, start the HTTP, worker and watch threads and return the URL (``port`` 0: any)."""
        if self._threads:
            raise RuntimeError("the reward server is already started")
        httpd = self._httpd or _make_http_server(self.host, self.port, self)
        self._httpd = httpd
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._work, name="reward-worker", daemon=True),
            threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": _POLL_S}, name="reward-http", daemon=True
            ),
            threading.Thread(
                target=httpd.watch.run, args=(self._stopping,), name="reward-watch", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving, fail queued requests with 503 and join the threads; safe to call twice."""
        if self._httpd is None:
            return
        self._stopping.set()
        if self._threads:
            self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []
        self._fail_pending()
        self._httpd = None

    def __enter__(self) -> RewardServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def requires_token(self) -> bool:
        """Whether requests must carry the bearer token."""
        return self._token is not None

    # ----- used by the request handler -----
    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (always true when there is none)."""
        if self._token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), self._token)

    def health(self) -> dict[str, Any]:
        """The ``GET /health`` body."""
        return {
            "reward": self.name,
            "modality": self.reward.modality,
            "status": "ok",
            "max_batch": self.limits.max_batch,
            "max_request_bytes": self.limits.max_request_bytes,
            "max_pixels_per_sample": self.limits.max_pixels_per_sample,
            "max_pixels_per_request": self.limits.max_pixels_per_request,
        }

    def check_modality(self, pixels: Tensor) -> None:
        """400 unless ``pixels`` has the rank of the reward's modality."""
        modality = self.reward.modality
        if pixels.ndim != MODALITY_RANKS[modality]:
            raise RequestRejected(
                400,
                f"reward {self.name!r} scores {modality}s {MODALITY_LAYOUTS[modality]}; got pixels of shape "
                f"{tuple(pixels.shape)}; send samples of the reward's modality",
            )

    def submit(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Queue one request for the worker and wait for its scores; ``RequestRejected`` (500 / 503) if none."""
        if self._stopping.is_set():
            raise RequestRejected(503, "the reward server is shutting down; retry against a running one")
        job = _Job(pixels, prompts, metadata)
        self._queue.put(job)
        while not job.done.wait(_POLL_S * 4):
            if self._stopping.is_set() and not self._threads[0].is_alive():
                self._fail_pending()  # queued after the worker stopped: nobody else will answer it
        if job.error is not None:
            raise RequestRejected(*job.error)
        assert job.output is not None
        return job.output

    # ----- the worker -----
    def _work(self) -> None:
        """The worker loop: take a merged batch of jobs, score it, hand each job its slice."""
        while not self._stopping.is_set():
            jobs = self._collect()
            if jobs:
                self._run(jobs)

    def _collect(self) -> list[_Job]:
        """The oldest job plus queued jobs of the same sample shape, up to ``max_batch`` samples in all."""
        if not self._backlog:
            try:
                self._backlog.append(self._queue.get(timeout=_POLL_S))
            except queue.Empty:
                return []
        jobs = [self._backlog.pop(0)]
        count = jobs[0].size
        deadline = time.monotonic() + self.batch_wait_s
        while True:
            count = self._absorb(jobs, count)
            remaining = deadline - time.monotonic()
            if count >= self.limits.max_batch or remaining <= 0:
                return jobs
            try:
                self._backlog.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                return jobs

    def _absorb(self, jobs: list[_Job], count: int) -> int:
        """Move backlog jobs with the shape of ``jobs[0]`` that still fit into ``jobs``; the new count."""
        kept = []
        for job in self._backlog:
            if job.key == jobs[0].key and count + job.size <= self.limits.max_batch:
                jobs.append(job)
                count += job.size
            else:
                kept.append(job)
        self._backlog = kept
        return count

    def _run(self, jobs: list[_Job]) -> None:
        """Score ``jobs`` in one reward call; if it fails, score each job alone so only bad ones fail."""
        try:
            outputs = self._score(jobs)
        except Exception as error:  # noqa: BLE001 - any reward failure becomes a 500 for its request(s)
            self.failed_calls += 1
            if len(jobs) > 1:
                for job in jobs:
                    self._run([job])
                return
            traceback.print_exc(file=sys.stderr)
            message = f"reward {self.name!r} failed on this request: {type(error).__name__}: {error}"
            jobs[0].error = (500, message)
            jobs[0].done.set()
            return
        for job, output in zip(jobs, outputs, strict=True):
            job.output = output
            self.requests_scored += 1
            job.done.set()

    def _score(self, jobs: list[_Job]) -> list[RewardOutput]:
        """One reward call on the concatenated jobs, split back into one output per job."""
        pixels = jobs[0].pixels if len(jobs) == 1 else torch.cat([job.pixels for job in jobs])
        prompts = [prompt for job in jobs for prompt in job.prompts]
        metadata = [record for job in jobs for record in job.metadata]
        self.model_calls += 1
        with torch.inference_mode():
            output = self.reward(pixels, prompts, metadata)
        outputs, start = [], 0
        for job in jobs:
            part = slice(start, start + job.size)
            components = {name: values[part] for name, values in output.components.items()}
            outputs.append(RewardOutput(scores=output.scores[part], components=components))
            start += job.size
        return outputs

    def _fail_pending(self) -> None:
        """Fail every job still queued or held with 503 (the server is stopping)."""
        pending = list(self._backlog)
        self._backlog = []
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            job.error = (
                503,
                "the reward server stopped before scoring this request; retry against a running one",
            )
            job.done.set()


# ----- HTTP ----------------------------------------------------------------------------------------------------
def _raw_response(status: str, message: str, extra_headers: str = "") -> bytes:
    """A complete ``Connection: close`` HTTP response with the JSON error body ``message``."""
    body = encode_error(message)
    head = (
        f"HTTP/1.0 {status}\r\nServer: gen-rl-reward\r\nContent-Type: application/json\r\n{extra_headers}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_TIMEOUT_RESPONSE = _raw_response(
    "408 Request Timeout",
    "the request did not arrive within the server's read timeout; send it whole and promptly "
    "(or start the server with a larger --read-timeout-s)",
)


class _ConnectionWatch:
    """One thread enforcing read deadlines and closing refused connections gently.

    ``arm(connection, seconds)``: unless ``disarm`` comes first, answer 408 and shut the connection after
    ``seconds``, which wakes its handler thread (a slow client cannot hold it). ``refuse(connection,
    response)``: send ``response``, stop writing, and drain what the client still sends for up to
    ``DRAIN_SECONDS`` before closing (closing with unread data would reset the connection and the client
    could lose the response); nothing here blocks the accepting thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._lingering: list[tuple[socket.socket, float]] = []

    def arm(self, connection: socket.socket, seconds: float) -> None:
        """(Re)set ``connection``'s deadline to ``seconds`` from now."""
        with self._lock:
            self._deadlines[connection] = time.monotonic() + seconds

    def disarm(self, connection: socket.socket) -> None:
        """Drop ``connection``'s deadline (its request has arrived)."""
        with self._lock:
            self._deadlines.pop(connection, None)

    def refuse(self, connection: socket.socket, response: bytes) -> None:
        """Answer ``response`` on a connection nobody will handle, then drain and close it in the background."""
        try:
            connection.setblocking(False)
            connection.send(response)
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            connection.close()
            return
        with self._lock:
            if len(self._lingering) < MAX_LINGERING:
                self._lingering.append((connection, time.monotonic() + DRAIN_SECONDS))
                return
        connection.close()

    def run(self, stopping: threading.Event) -> None:
        """The watch loop, until ``stopping`` is set; then every lingering connection is closed."""
        while not stopping.wait(_POLL_S):
            self._tick(time.monotonic())
        self._tick(float("inf"))

    def _tick(self, now: float) -> None:
        with self._lock:
            expired = [connection for connection, deadline in self._deadlines.items() if deadline <= now]
            for connection in expired:
                del self._deadlines[connection]
            lingering, self._lingering = self._lingering, []
        for connection in expired:
            _cut_off(connection)
        kept = [
            (connection, until) for connection, until in lingering if not _drained(connection, until, now)
        ]
        with self._lock:
            self._lingering.extend(kept)


def _cut_off(connection: socket.socket) -> None:
    """Answer 408 on a connection whose request is late and shut it (its handler thread then ends)."""
    with contextlib.suppress(OSError):
        connection.send(_TIMEOUT_RESPONSE, getattr(socket, "MSG_DONTWAIT", 0))
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _drained(connection: socket.socket, until: float, now: float) -> bool:
    """Read and drop what a refused client sent; close once it hung up or ``until`` passed (True: closed)."""
    try:
        while now < until and connection.recv(1 << 16):  # b"": the client closed its side
            pass
    except BlockingIOError:
        return False  # nothing more to read yet; look again on the next tick
    except OSError:
        pass
    connection.close()
    return True


class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with a bounded number of handler threads and a ``_ConnectionWatch``."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    app: RewardServer
    watch: _ConnectionWatch
    slots: threading.BoundedSemaphore
    busy_response: bytes

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Handle the connection on a new thread if one of ``max_connections`` slots is free, else 503."""
        if not self.slots.acquire(blocking=False):
            self.watch.refuse(request, self.busy_response)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        """Handle one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that vanish or are cut off are routine; only other errors print a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _make_http_server(host: str, port: int, app: RewardServer) -> _HTTPServer:
    """A bound ``_HTTPServer`` (IPv6 when ``host`` holds a colon); a clear OSError when the port is taken."""
    server_class = _HTTPServer
    if ":" in host:
        server_class = type("_HTTPServer6", (_HTTPServer,), {"address_family": socket.AF_INET6})
    try:
        httpd = server_class((host, port), _Handler)
    except OSError as error:
        raise OSError(
            f"cannot bind the reward server to {host}:{port}: {error}; pick another --port (0 = any free one)"
        ) from error
    httpd.app = app
    httpd.watch = _ConnectionWatch()
    httpd.slots = threading.BoundedSemaphore(app.max_connections)
    httpd.busy_response = _raw_response(
        "503 Service Unavailable",
        f"the reward server is handling its limit of {app.max_connections} connections; retry after "
        f"{BUSY_RETRY_AFTER_S} s (RemoteReward does) or start it with a larger --max-connections",
        f"Retry-After: {BUSY_RETRY_AFTER_S}\r\n",
    )
    return httpd


class _Handler(BaseHTTPRequestHandler):
    """``GET /health`` and ``POST /score``; every error is JSON ``{"error": ...}`` with its status."""

    server: _HTTPServer
    server_version = "gen-rl-reward"
    timeout = SOCKET_TIMEOUT_S

    @property
    def app(self) -> RewardServer:
        """The reward server this handler serves."""
        return self.server.app

    def setup(self) -> None:
        """Start the deadline for the request line and headers (before authentication)."""
        super().setup()
        self.server.watch.arm(self.connection, self.app.read_timeout_s)

    def handle(self) -> None:
        """Serve the connection; a client that vanished or was cut off just ends it."""
        try:
            super().handle()
        except OSError:
            self.close_connection = True

    def finish(self) -> None:
        """Drop the deadline, flush and close."""
        self.server.watch.disarm(self.connection)
        super().finish()

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        """``GET /health``."""
        if urlsplit(self.path).path != "/health":
            self._send_json(
                404, encode_error(f"no such endpoint {self.path!r}; use GET /health or POST /score")
            )
        elif not self.app.authorized(self.headers.get("Authorization")):
            self._send_json(401, encode_error(_UNAUTHORIZED))
        else:
            self._send_json(200, json.dumps(self.app.health()).encode("utf-8"))

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        """``POST /score``: check, read, decode, queue, answer."""
        started = time.perf_counter()
        try:
            self._check_head()
            body = self._read_body()
            pixels, prompts, metadata = self._decode(body)
            self.app.check_modality(pixels)
            output = self.app.submit(pixels, prompts, metadata)
        except RequestRejected as rejected:
            self._send_json(rejected.status, encode_error(rejected.message))
            self._discard_unread_body()
            return
        except Exception as error:  # noqa: BLE001 - a bug must still answer, never drop the connection
            traceback.print_exc(file=sys.stderr)
            self._send_json(500, encode_error(f"internal error in the reward server: {type(error).__name__}"))
            return
        self._send_json(200, encode_response(output, time.perf_counter() - started))

    def _decode(self, body: bytes) -> tuple[Tensor, list[str], list[dict]]:
        """``decode_request``; anything it did not foresee in a payload is still a 400, never a 500."""
        try:
            return decode_request(body, self.headers.get("Content-Type"), self.app.limits)
        except (RequestRejected, MemoryError):
            raise
        except Exception as error:  # noqa: BLE001 - the payload is at fault whatever broke on it
            raise RequestRejected(
                400,
                f"the request does not decode ({type(error).__name__}: {error}); build it with encode_request",
            ) from error

    def _check_head(self) -> None:
        """401 / 404 / 411 / 413 from the request line and headers alone, before any body is read."""
        if urlsplit(self.path).path != "/score":
            raise RequestRejected(404, f"no such endpoint {self.path!r}; use POST /score or GET /health")
        if not self.app.authorized(self.headers.get("Authorization")):
            raise RequestRejected(401, _UNAUTHORIZED)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestRejected(411, "chunked bodies are not accepted; send a Content-Length")
        length = self._content_length()
        if length is None:
            raise RequestRejected(411, "the request has no valid Content-Length; send one with the body")
        self.app.limits.check_body_size(length)
        self.server.watch.arm(self.connection, self.app.read_timeout_s + length / MIN_BODY_BYTES_PER_S)

    def _content_length(self) -> int | None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _read_body(self) -> bytes:
        length = self._content_length() or 0
        body = self.rfile.read(length)
        self._body_read = True
        self.server.watch.disarm(self.connection)  # scoring may take longer than reading did
        if len(body) != length:
            raise RequestRejected(400, f"the body ended after {len(body)} of {length} bytes (Content-Length)")
        return body

    def _discard_unread_body(self) -> None:
        """After a rejection before the body was read: read and drop it (for up to ``DRAIN_SECONDS``).

        Closing a socket with unread data makes the kernel reset the connection, and the client may then
        lose the error response it has not read yet; draining lets it read the JSON error instead.
        """
        if getattr(self, "_body_read", False):
            return
        self.close_connection = True
        remaining = self._content_length() or 0
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            self.connection.settimeout(DRAIN_SECONDS)
            while remaining > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass

    def _send_json(self, status: int, body: bytes) -> None:
        self.server.watch.disarm(self.connection)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away; nothing to tell it

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        """Request lines go to stderr only with ``--log-requests`` (they never hold the token)."""
        if self.app.log_requests:
            super().log_message(format, *args)


_UNAUTHORIZED = (
    "missing or wrong token: send the header 'Authorization: Bearer <token>' with the token the server was "
    f"started with (RemoteReward reads it from ${TOKEN_ENV} by default, or from token_env)"
)


# ----- command line --------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): only this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """ValueError when ``host`` is reachable from other machines and there is no token."""
    if token is None and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host or '(all addresses)'} without a token: any machine that can connect "
            f"could use the reward; set ${TOKEN_ENV} (or --token-env / --token-file) to a non-empty token, or "
            "bind 127.0.0.1"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line arguments of ``python -m rewards.serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m rewards.serve",
        description="Serve one gen-rl reward over HTTP (see rewards/serve.py).",
    )
    parser.add_argument("--reward", help="registered reward name or package.module:Class")
    parser.add_argument("--kwargs", default=None, help="JSON object of the reward's constructor arguments")
    parser.add_argument(
        "--config", default=None, help="YAML file with 'name' and 'kwargs' (like a reward term)"
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: local only)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port (0: any free one; read it on stdout)"
    )
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token-env",
        default=None,
        help=f"env variable holding the bearer token (default: ${TOKEN_ENV} if set)",
    )
    tokens.add_argument("--token-file", default=None, help="file holding the bearer token")
    parser.add_argument(
        "--max-batch", type=int, default=RequestLimits.max_batch, help="samples per request/call"
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=RequestLimits.max_request_bytes / MIB,
        help="body limit in MiB",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=RequestLimits.max_pixels_per_request,
        help="decoded pixel values (C*[T*]H*W summed over samples) per request",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections handled at once (more get 503 + Retry-After)",
    )
    parser.add_argument(
        "--read-timeout-s",
        type=float,
        default=DEFAULT_READ_TIMEOUT_S,
        help="deadline for a request's line and headers",
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long to wait for requests to merge"
    )
    parser.add_argument(
        "--device", default=None, help="device passed to rewards that take a 'device' argument"
    )
    parser.add_argument("--log-requests", action="store_true", help="log each request line on stderr")
    return parser.parse_args(argv)


def reward_spec(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` from ``--config`` then ``--reward`` / ``--kwargs`` (which override it) and ``--device``."""
    from gen_rl.core.config import read_yaml

    config = read_yaml(args.config) if args.config else {}
    unknown = set(config) - {"name", "kwargs"}
    if unknown:
        raise ValueError(f"--config {args.config}: unknown keys {sorted(unknown)}; give 'name' and 'kwargs'")
    name = args.reward or config.get("name")
    if not name:
        raise ValueError("no reward given; pass --reward NAME (e.g. colour) or --config with a 'name'")
    kwargs = dict(config.get("kwargs") or {})
    if args.kwargs:
        extra = json.loads(args.kwargs)
        if not isinstance(extra, dict):
            raise ValueError(f"--kwargs must be a JSON object; got {args.kwargs!r}")
        kwargs.update(extra)
    if args.device is not None:
        kwargs.setdefault("device", args.device)
    return name, kwargs


def read_token(args: argparse.Namespace, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token from ``--token-file``, ``--token-env`` or ``$GEN_RL_REWARD_TOKEN``; None for none.

    An empty token is an error wherever it comes from: it must never silently turn authentication off.
    """
    environ = os.environ if environ is None else environ
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty; write the token into it")
        return token
    if args.token_env and args.token_env not in environ:
        raise ValueError(
            f"--token-env {args.token_env}: ${args.token_env} is not set; export the token first"
        )
    name = args.token_env or TOKEN_ENV
    if name not in environ:
        return None
    token = environ[name].strip()
    if not token:
        raise ValueError(
            f"${name} is set but empty, which would turn authentication off; put the token in it, or unset it "
            "to serve without a token (loopback only)"
        )
    return token


def build_server(args: argparse.Namespace) -> RewardServer:
    """The (unstarted) server the command line describes; its settings are checked before the reward loads."""
    token = read_token(args)
    check_exposure(args.host, token)
    name, kwargs = reward_spec(args)
    if "device" in kwargs and args.device is not None:
        _check_device_argument(name, kwargs)
    limits = RequestLimits(
        max_request_bytes=int(args.max_request_mb * MIB),
        max_batch=args.max_batch,
        max_pixels_per_request=args.max_request_pixels,
    )
    if args.max_connections < 1 or not args.read_timeout_s > 0:
        raise ValueError("--max-connections must be >= 1 and --read-timeout-s > 0")
    return RewardServer(
        build_reward(name, **kwargs),
        host=args.host,
        port=args.port,
        token=token,
        limits=limits,
        batch_wait_s=args.batch_wait_ms / 1000,
        name=name,
        log_requests=args.log_requests,
        max_connections=args.max_connections,
        read_timeout_s=args.read_timeout_s,
    )


def _check_device_argument(name: str, kwargs: dict[str, Any]) -> None:
    from gen_rl.core.registry import resolve
    from rewards.base import REWARDS

    parameters = inspect.signature(resolve(REWARDS, name, "reward").__init__).parameters
    if "device" not in parameters and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        raise ValueError(f"--device: reward {name!r} takes no 'device' argument; leave --device out")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT / SIGTERM; 0 on a clean stop, 2 on a bad command line or reward."""
    import rewards  # noqa: F401 - registers the built-in rewards

    args = parse_args(argv)
    try:
        server = build_server(args)
        url = server.start()
    except (ValueError, TypeError, OSError) as error:
        print(f"{STARTUP_PREFIX} error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"{STARTUP_PREFIX} {server.name} on {url}", flush=True)
    limits = server.limits
    print(
        f"{STARTUP_PREFIX} token {'required' if server.requires_token else 'not required'}; max_batch "
        f"{limits.max_batch}, max request {limits.max_request_bytes / MIB:g} MiB and "
        f"{limits.max_pixels_per_request} pixel values, {server.max_connections} connections, read timeout "
        f"{server.read_timeout_s:g} s; stop with Ctrl-C or SIGTERM",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
