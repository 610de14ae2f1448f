"""Serve one reward over HTTP so that trainers on other processes or machines can score samples with it.

Run ``python -m rewards.serve --reward colour`` (or ``--config reward.yaml`` holding ``name`` and
``kwargs``); it binds 127.0.0.1:8765 unless told otherwise and prints one line
``gen-rl reward server: <name> on http://host:port`` on stdout once it listens (``--port 0`` picks a free
port: read it from that line). Clients use ``RemoteReward`` (``rewards/remote.py``, registered ``"remote"``).

Endpoints (wire format: ``rewards/wire.py``):

* ``POST /score``: one batch of samples in, JSON scores out.
* ``GET /health``: ``{"reward", "modality", "status": "ok", "max_batch", "max_request_bytes",
  "max_pixels_per_sample"}``.

Both need ``Authorization: Bearer <token>`` when the server has a token (``--token-env VAR``, default
``GEN_RL_REWARD_TOKEN`` when that is set, or ``--token-file PATH``); the token is compared in constant time
and never echoed or logged.

Batching: HTTP handler threads decode and check each request, then queue it. One worker thread owns the
reward and merges queued requests whose samples have the same shape into one reward call of at most
``max_batch`` samples (waiting up to ``--batch-wait-ms`` for more to arrive), then splits the scores back.
When a merged call fails, each request of it is retried alone, so that one bad request (a prompt the
reward rejects) fails only itself with a 500 naming the error, never the requests it was merged with.
"""

from __future__ import annotations

import argparse
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
    ) -> None:
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0; got {batch_wait_s}")
        if token is not None and not token:
            raise ValueError("the token is empty; give a non-empty token or None for no token")
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

    def start(self) -> str:
        """Bind, start the HTTP and worker threads and return the URL (the bound port when ``port`` is 0)."""
        if self._httpd is not None:
            raise RuntimeError("the reward server is already started")
        self._httpd = _make_http_server(self.host, self.port, self)
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._work, name="reward-worker", daemon=True),
            threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": _POLL_S},
                name="reward-http",
                daemon=True,
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
        self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
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
class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its ``RewardServer`` (``app``)."""

    daemon_threads = True
    allow_reuse_address = True
    app: RewardServer


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
            pixels, prompts, metadata = decode_request(
                body, self.headers.get("Content-Type"), self.app.limits
            )
            self.app.check_modality(pixels)
            output = self.app.submit(pixels, prompts, metadata)
        except RequestRejected as rejected:
            self._send_json(rejected.status, encode_error(rejected.message))
            self._discard_unread_body()
            return
        self._send_json(200, encode_response(output, time.perf_counter() - started))

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


def exposure_warning(host: str, requires_token: bool) -> str | None:
    """A warning when the server listens beyond this machine without a token, else None."""
    if not requires_token and not is_loopback(host):
        return (
            f"warning: serving on {host}, reachable from other machines, without a token: anyone who can "
            f"connect can use this reward; set ${TOKEN_ENV} (or --token-env / --token-file) to require one"
        )
    return None


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
        "--batch-wait-ms", type=float, default=5.0, help="how long to wait for requests to merge"
    )
    parser.add_argument(
        "--device", default=None, help="device passed to rewards that take a 'device' argument"
    )
    parser.add_argument("--log-requests", action="store_true", help="log each request line on stderr")
    return parser.parse_args(argv)


def reward_spec(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` from ``--config`` then ``--reward`` / ``--kwargs`` (which override it) and ``--device``."""
    from gen_rl.config import read_yaml

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
    """The bearer token from ``--token-file``, ``--token-env`` or ``$GEN_RL_REWARD_TOKEN``; None for none."""
    environ = os.environ if environ is None else environ
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty; write the token into it")
        return token
    if args.token_env:
        token = environ.get(args.token_env, "").strip()
        if not token:
            raise ValueError(
                f"--token-env {args.token_env}: ${args.token_env} is not set; export the token first"
            )
        return token
    return environ.get(TOKEN_ENV, "").strip() or None


def build_server(args: argparse.Namespace) -> RewardServer:
    """The (unstarted) server described by the command-line arguments."""
    name, kwargs = reward_spec(args)
    if "device" in kwargs and args.device is not None:
        _check_device_argument(name, kwargs)
    limits = RequestLimits(max_request_bytes=int(args.max_request_mb * MIB), max_batch=args.max_batch)
    return RewardServer(
        build_reward(name, **kwargs),
        host=args.host,
        port=args.port,
        token=read_token(args),
        limits=limits,
        batch_wait_s=args.batch_wait_ms / 1000,
        name=name,
        log_requests=args.log_requests,
    )


def _check_device_argument(name: str, kwargs: dict[str, Any]) -> None:
    from gen_rl.registry import resolve
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
    warning = exposure_warning(args.host, server.requires_token)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"{STARTUP_PREFIX} {server.name} on {url}", flush=True)
    limits = server.limits
    print(
        f"{STARTUP_PREFIX} token {'required' if server.requires_token else 'not required'}; max_batch "
        f"{limits.max_batch}, max request {limits.max_request_bytes / MIB:g} MiB; stop with Ctrl-C or SIGTERM",
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
