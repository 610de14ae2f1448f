"""The reward service: a real HTTP server on loopback (in-process or a subprocess), real clients, no mocks."""

from __future__ import annotations

import base64
import http.client
import json
import os
import pickle
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from contextlib import contextmanager
from email.utils import formatdate
from urllib.parse import urlsplit

import pytest
import torch

import rewards.remote  # noqa: F401 - registers "remote"
from rewards import build_reward
from rewards.base import Reward, RewardOutput
from rewards.colour import ColourReward
from rewards.remote import FAILED_COMPONENT, RemoteReward, RemoteRewardError, retry_after_seconds
from rewards.serve import (
    STARTUP_PREFIX,
    RewardServer,
    main,
    parse_args,
    read_token,
    reward_spec,
)
from rewards.wire import (
    MAX_JSON_DEPTH,
    MIB,
    RequestLimits,
    RequestRejected,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    png_header_size,
)

PROMPTS = ["a red apple", "blue sky", "green grass", "no colour named here", "a white wall", "yellow"]
FAST = {"timeout_s": 5.0, "retries": 0, "backoff_s": 0.01}  # client settings that keep failing tests short
# Rounding to uint8 moves each value by at most 0.5/255, so an RGB distance moves by at most sqrt(3)*0.5/255
# and the colour score (1 - mean distance / sqrt(3)) by at most 0.5/255; 1e-6 covers float32 arithmetic.
UINT8_BOUND = 0.5 / 255 + 1e-6
# float16 keeps 11 significant bits: a value in [0, 1] moves by at most 2**-12 (the brief's bound is 1e-3).
FLOAT16_BOUND = 1e-3


def pixels_for(batch: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Random images [batch, 3, size, size] in [0, 1]."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompts_for(batch: int, offset: int = 0) -> list[str]:
    """``batch`` prompts cycling through ``PROMPTS`` (one names no colour: NaN)."""
    return [PROMPTS[(offset + index) % len(PROMPTS)] for index in range(batch)]


@contextmanager
def serving(reward: Reward, **kwargs):
    """A started in-process ``RewardServer`` on 127.0.0.1, stopped afterwards."""
    server = RewardServer(reward, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def raw_request(
    url: str,
    body: bytes | None,
    content_type: str | None,
    token: str | None = None,
    method: str = "POST",
    path: str = "/score",
    timeout_s: float = 10,
) -> tuple[int, dict]:
    """Send one request with http.client; ``(status, JSON body)``."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    headers = {"Content-Type": content_type} if content_type else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def free_port() -> int:
    """A loopback port nobody listens on (right now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_same_scores(remote: RewardOutput, local: RewardOutput, bound: float) -> None:
    """Same NaN positions, finite scores and shared components within ``bound``."""
    assert torch.equal(remote.scores.isnan(), local.scores.isnan())
    finite = ~local.scores.isnan()
    assert (remote.scores[finite] - local.scores[finite]).abs().max().item() <= bound
    for name, values in local.components.items():
        both = ~values.isnan()
        assert torch.equal(remote.components[name].isnan(), values.isnan())
        assert (remote.components[name][both] - values[both]).abs().max().item() <= bound * 2


class PromptFailingReward(ColourReward):
    """The colour reward, but it raises on any batch holding a prompt with "boom"."""

    def score(self, pixels, prompts, metadata):
        """Raise on "boom", else score colour."""
        if any("boom" in prompt for prompt in prompts):
            raise ValueError("cannot score the prompt 'boom'")
        return super().score(pixels, prompts, metadata)


class MeanReward(Reward):
    """The mean pixel value: cheap to score on large images."""

    def score(self, pixels, prompts, metadata):
        """Mean over channels and pixels."""
        return RewardOutput(scores=pixels.mean(dim=(1, 2, 3)))


class FailsFirstCallsReward(ColourReward):
    """The colour reward, failing its first ``failures`` calls (a server that answers 500 at first)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures_left = failures

    def score(self, pixels, prompts, metadata):
        """Raise while failures are left, else score colour."""
        if self.failures_left > 0:
            self.failures_left -= 1
            raise RuntimeError("warming up")
        return super().score(pixels, prompts, metadata)


# ----- the wire format -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "bound"),
    [
        ("safetensors", FLOAT16_BOUND),
        ("safetensors_uint8", UINT8_BOUND),
        ("png", UINT8_BOUND),
        ("safetensors_float32", 0),
    ],
)
def test_remote_colour_scores_equal_local(fmt: str, bound: float) -> None:
    local = ColourReward()
    pixels = pixels_for(6, size=16)
    with serving(local) as server:
        remote = RemoteReward(server.url, fmt=fmt, **FAST)
        output = remote(pixels, PROMPTS)
    assert_same_scores(output, local(pixels, PROMPTS), bound)
    assert output.scores.isnan().sum() == 1  # the prompt naming no colour stays unscored
    assert output.components[FAILED_COMPONENT].tolist() == [0.0] * 6
    if fmt == "safetensors_uint8":  # the bound is not vacuous: uint8 moves scores, by less than the bound
        assert (output.scores - local(pixels, PROMPTS).scores).nan_to_num().abs().max() > 1e-6


@pytest.mark.parametrize("fmt", ["safetensors_uint8", "png", "safetensors_float32"])
def test_remote_jpeg_scores_are_exact(fmt: str) -> None:
    """The JPEG reward rounds to uint8 itself: uint8 and PNG transport lose nothing it sees."""
    local = build_reward("jpeg_compressibility")
    pixels = pixels_for(4, size=24)
    with serving(local) as server:
        output = RemoteReward(server.url, fmt=fmt, **FAST)(pixels, prompts_for(4))
    expected = local(pixels, prompts_for(4))
    assert torch.equal(output.scores, expected.scores)
    assert torch.equal(output.components["jpeg_kb"], expected.components["jpeg_kb"])


def test_wire_round_trips_videos_metadata_and_nan() -> None:
    video = torch.rand(2, 3, 4, 5, 6)
    body, kind = encode_request(
        video, ["a", "b"], [{"colour": "red"}, {"k": [1, 2]}], fmt="safetensors_uint8"
    )
    pixels, prompts, metadata = decode_request(body, kind)
    assert pixels.shape == video.shape and pixels.dtype == torch.float32
    assert (pixels - video).abs().max() <= 0.5 / 255 + 1e-6
    assert prompts == ["a", "b"] and metadata == [{"colour": "red"}, {"k": [1, 2]}]
    _, _, empty = decode_request(*encode_request(video, ["a", "b"], None))
    assert empty == [{}, {}]
    with pytest.raises(ValueError, match="png wire format carries images"):
        encode_request(video, ["a", "b"], fmt="png")
    scores = torch.tensor([0.5, float("nan"), float("inf")])
    answer = decode_response(encode_response(RewardOutput(scores, {"c": scores}), 0.1), batch=3)
    assert answer.scores[0] == 0.5 and answer.scores[1].isnan() and answer.scores[2] == float("inf")
    assert json.loads(encode_response(RewardOutput(scores), 0.1))["scores"][1] is None
    with pytest.raises(ValueError, match="list of 4"):
        decode_response(encode_response(RewardOutput(scores), 0.1), batch=4)


# ----- batching ------------------------------------------------------------------------------------------------
def test_concurrent_requests_get_their_own_scores_and_are_coalesced() -> None:
    local = ColourReward()
    threads, per_thread = 16, 4
    barrier = threading.Barrier(threads)
    errors: list[str] = []
    with serving(local, batch_wait_s=0.02, limits=RequestLimits(max_batch=64)) as server:
        remote = RemoteReward(server.url, **FAST)

        def client(index: int) -> None:
            barrier.wait()
            for request in range(per_thread):
                batch = 1 + (index + request) % 4
                size = 8 if index % 2 else 12  # two sample shapes: only equal shapes may be merged
                pixels = pixels_for(batch, size, seed=100 * index + request)
                prompts = prompts_for(batch, offset=index + request)
                try:
                    assert_same_scores(remote(pixels, prompts), local(pixels, prompts), FLOAT16_BOUND)
                except Exception as error:  # noqa: BLE001 - reported below with the thread's index
                    errors.append(f"thread {index} request {request}: {error!r}")

        workers = [threading.Thread(target=client, args=(index,)) for index in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
    assert errors == []
    assert server.requests_scored == threads * per_thread
    assert server.failed_calls == 0  # no merged call failed (e.g. mixing shapes) and was split up again
    assert server.model_calls < threads * per_thread


# ----- authentication ------------------------------------------------------------------------------------------
def test_token_is_required_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cret-token-value"
    body, kind = encode_request(pixels_for(2), prompts_for(2))
    with serving(ColourReward(), token=secret) as server:
        started = time.monotonic()
        with pytest.raises(RemoteRewardError) as caught:
            RemoteReward(server.url, token="wrong-token-value", timeout_s=5, retries=3, backoff_s=1.0)
        assert time.monotonic() - started < 0.9  # a 401 is not retried (it would wait 1 s first)
        message = str(caught.value)
        assert "401" in message and "token" in message and server.url in message
        assert secret not in message and "wrong-token-value" not in message
        status, answer = raw_request(server.url, body, kind)
        assert status == 401 and "token" in answer["error"] and secret not in answer["error"]
        assert raw_request(server.url, None, None, method="GET", path="/health")[0] == 401
        assert raw_request(server.url, body, kind, token="wrong")[0] == 401
        monkeypatch.setenv("GEN_RL_TEST_REWARD_TOKEN", secret)
        remote = RemoteReward(server.url, token_env="GEN_RL_TEST_REWARD_TOKEN", **FAST)
        assert remote(pixels_for(2), prompts_for(2)).scores.isfinite().all()
        assert raw_request(server.url, body, kind, token=secret)[0] == 200
        assert secret not in repr(remote)


# ----- limits and content types --------------------------------------------------------------------------------
def test_oversized_requests_get_413_naming_the_limit() -> None:
    limits = RequestLimits(max_request_bytes=MIB, max_batch=4)
    with serving(ColourReward(), limits=limits) as server:
        big, kind = encode_request(pixels_for(4, size=300), prompts_for(4), fmt="safetensors_float32")
        assert len(big) > 2 * MIB
        status, answer = raw_request(server.url, big, kind)
        assert status == 413 and "--max-request-mb" in answer["error"]
        status, answer = raw_request(server.url, *encode_request(pixels_for(5), prompts_for(5)))
        assert status == 413 and "max_batch of 4" in answer["error"]
        status, answer = raw_request(server.url, *encode_request(pixels_for(5), prompts_for(5), fmt="png"))
        assert status == 413 and "max_batch of 4" in answer["error"]
        remote = RemoteReward(
            server.url, on_failure="drop", fmt="safetensors_float32", retries=3, backoff_s=1.0
        )
        assert remote.max_batch_per_request == 4  # capped by the server's max_batch from /health
        started = time.monotonic()
        output = remote(pixels_for(6, size=180), prompts_for(6))
        assert time.monotonic() - started < 0.9  # a 413 is not retried
        assert (
            output.scores[:4].isnan().all()
            and output.components[FAILED_COMPONENT].tolist() == [1] * 4 + [0] * 2
        )
        assert output.scores[4:].isfinite().all()  # the 2-sample request fits in 1 MiB
        assert remote.dropped_samples == 4 and "max_batch_per_request" in remote.failures[0]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (pickle.dumps({"pixels": [1, 2]}), "application/python-pickle", 415, "pickle is never accepted"),
        (pickle.dumps({"pixels": [1, 2]}), "application/octet-stream", 415, "unsupported Content-Type"),
        (pickle.dumps({"pixels": [1, 2]}), "application/x-safetensors", 415, "looks like a pickle"),
        (b"hello", "text/plain", 415, "application/x-safetensors"),
        (b"hello", None, 415, "(none)"),
        (
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......",
            "application/x-safetensors",
            400,
            "not a safetensors",
        ),
        (b"{not json", "application/json", 400, "does not parse"),
        (
            json.dumps({"images_png": ["notbase64!"], "prompts": ["a"]}).encode(),
            "application/json",
            400,
            "base64",
        ),
    ],
)
def test_bad_payloads_are_refused(body: bytes, content_type: str | None, status: int, words: str) -> None:
    with serving(ColourReward()) as server:
        got, answer = raw_request(server.url, body, content_type)
    assert got == status and words in answer["error"]


def test_bad_requests_are_refused_before_the_model_runs() -> None:
    with serving(ColourReward()) as server:
        video = torch.rand(2, 3, 2, 4, 4)
        status, answer = raw_request(server.url, *encode_request(video, prompts_for(2)))
        assert status == 400 and "scores images" in answer["error"]
        out_of_range, kind = encode_request(pixels_for(2) * 2, prompts_for(2), fmt="safetensors_float32")
        status, answer = raw_request(server.url, out_of_range, kind)
        assert status == 400 and "[0, 1]" in answer["error"]
        body, kind = encode_request(pixels_for(2), prompts_for(2))
        status, answer = raw_request(server.url, body, kind, path="/nope")
        assert status == 404 and "POST /score" in answer["error"]
        assert server.model_calls == 0
        with pytest.raises(RemoteRewardError, match="modality 'video' was configured"):
            RemoteReward(server.url, modality="video", **FAST)
    with pytest.raises(RequestRejected) as caught:
        decode_request(body, "application/x-safetensors", RequestLimits(max_request_bytes=len(body) - 1))
    assert caught.value.status == 413


# ----- failures ------------------------------------------------------------------------------------------------
def start_server_process(*args: str) -> tuple[subprocess.Popen, str]:
    """``python -m rewards.serve ARGS`` as a subprocess and the URL from its startup line."""
    env = {key: value for key, value in os.environ.items() if key != "GEN_RL_REWARD_TOKEN"}
    env["OMP_NUM_THREADS"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-m", "rewards.serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=60)
    if not lines or not lines[0].startswith(STARTUP_PREFIX):
        process.kill()
        raise AssertionError(f"the server printed no startup line: {lines} {process.stderr.read()}")
    return process, lines[0].split(" on ")[-1].strip()


def test_killed_server_aborts_or_drops_every_unscored_sample() -> None:
    process, url = start_server_process("--reward", "colour", "--port", "0")
    try:
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        client = {"timeout_s": 5.0, "retries": 1, "backoff_s": 0.01, "max_batch_per_request": 2}
        abort = RemoteReward(url, on_failure="abort", **client)
        drop = RemoteReward(url, on_failure="drop", **client)
        assert abort(pixels_for(5), prompts_for(5)).scores[:3].isfinite().all()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()
    with pytest.raises(RemoteRewardError) as caught:
        abort(pixels_for(5), prompts_for(5))
    assert url in str(caught.value) and "connection refused" in str(caught.value)
    assert "python -m rewards.serve" in str(caught.value)
    output = drop(pixels_for(5), prompts_for(5))
    assert output.scores.isnan().all()
    assert output.components[FAILED_COMPONENT].tolist() == [1.0] * 5
    assert drop.dropped_samples == 5 and len(drop.failures) == 3  # 3 requests of at most 2 samples
    assert all("connection refused" in reason and "2 attempt(s)" in reason for reason in drop.failures)


def test_one_failing_request_drops_only_its_samples() -> None:
    prompts = prompts_for(6)
    prompts[3] = "red boom"
    pixels = pixels_for(6)
    with serving(PromptFailingReward(), batch_wait_s=0.05) as server:
        drop = RemoteReward(server.url, on_failure="drop", max_batch_per_request=2, **FAST)
        output = drop(pixels, prompts)
        with pytest.raises(
            RemoteRewardError, match=r"samples 2-3 .*HTTP 500.*cannot score the prompt 'boom'"
        ):
            RemoteReward(server.url, on_failure="abort", max_batch_per_request=2, **FAST)(pixels, prompts)
    expected = ColourReward()(pixels, prompts).scores
    assert output.components[FAILED_COMPONENT].tolist() == [0, 0, 1, 1, 0, 0]
    assert output.scores[2:4].isnan().all()
    assert torch.allclose(output.scores[[0, 1, 4, 5]], expected[[0, 1, 4, 5]], atol=FLOAT16_BOUND)
    assert output.components["colour_distance"][2:4].isnan().all()
    assert drop.dropped_samples == 2 and len(drop.failures) == 1 and "HTTP 500" in drop.failures[0]


def test_server_errors_are_retried_with_backoff() -> None:
    with serving(FailsFirstCallsReward(failures=2)) as server:
        remote = RemoteReward(server.url, timeout_s=5, retries=2, backoff_s=0.05)
        started = time.monotonic()
        output = remote(pixels_for(2), prompts_for(2))
        assert time.monotonic() - started >= 0.05 + 0.1  # two waits: backoff_s, then 2 * backoff_s
        assert output.scores.isfinite().all() and server.model_calls == 3
        server.reward.failures_left = 1
        with pytest.raises(RemoteRewardError, match="1 attempt"):
            RemoteReward(server.url, **FAST)(pixels_for(2), prompts_for(2))


def test_a_server_that_starts_late_is_retried() -> None:
    port = free_port()
    server = RewardServer(ColourReward(), port=port)
    timer = threading.Timer(0.3, server.start)
    timer.start()
    try:
        remote = RemoteReward(f"http://127.0.0.1:{port}", timeout_s=5, retries=5, backoff_s=0.1)
        assert remote(pixels_for(2), prompts_for(2)).scores.isfinite().all()
    finally:
        timer.join()
        server.stop()


def test_unreachable_server_at_init_says_how_to_start_one() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RemoteRewardError) as caught:
        RemoteReward(url, **FAST)
    assert url in str(caught.value) and "python -m rewards.serve" in str(caught.value)
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        RemoteReward("localhost:8765")


# ----- server settings -----------------------------------------------------------------------------------------
def test_server_binds_loopback_by_default_and_refuses_to_expose_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    with serving(ColourReward()) as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, health = raw_request(server.url, None, None, method="GET", path="/health")
    assert status == 200 and health["modality"] == "image" and health["status"] == "ok"
    assert parse_args([]).host == "127.0.0.1"
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "example.org"):
        with pytest.raises(ValueError, match="without a token"):
            RewardServer(ColourReward(), host=host)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        RewardServer(ColourReward(), host=host)  # loopback: no token needed
    with pytest.raises(ValueError, match="token is empty"):
        RewardServer(ColourReward(), host="0.0.0.0", token="  ")
    with RewardServer(ColourReward(), host="0.0.0.0", token="t0ken", port=0) as exposed:
        port = urlsplit(exposed.url).port
        assert raw_request(f"http://127.0.0.1:{port}", None, None, "t0ken", "GET", "/health")[0] == 200
        assert raw_request(f"http://127.0.0.1:{port}", None, None, None, "GET", "/health")[0] == 401

    # The command line exits non-zero with one line, before the reward is built (an unknown reward name
    # would otherwise be the error) and without binding the port.
    monkeypatch.delenv("GEN_RL_REWARD_TOKEN", raising=False)
    port = free_port()
    assert main(["--reward", "no_such_reward", "--host", "0.0.0.0", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "refusing to serve on 0.0.0.0 without a token" in err
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", port))  # nothing was left bound
    monkeypatch.setenv("GEN_RL_REWARD_TOKEN", "")  # an empty variable is an error, not "no token"
    for host in ("0.0.0.0", "127.0.0.1"):
        assert main(["--reward", "no_such_reward", "--host", host, "--port", str(port)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and "$GEN_RL_REWARD_TOKEN is set but empty" in err


def test_cli_reward_spec_and_token(tmp_path) -> None:
    config = tmp_path / "reward.yaml"
    config.write_text("name: jpeg_compressibility\nkwargs: {quality: 80}\n")
    args = parse_args(["--config", str(config), "--kwargs", '{"quality": 90}'])
    assert reward_spec(args) == ("jpeg_compressibility", {"quality": 90})
    with pytest.raises(ValueError, match="no reward given"):
        reward_spec(parse_args([]))
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    assert read_token(parse_args(["--token-file", str(token_file)]), environ={}) == "abc"
    assert read_token(parse_args([]), environ={"GEN_RL_REWARD_TOKEN": "xyz"}) == "xyz"
    assert read_token(parse_args([]), environ={}) is None
    with pytest.raises(ValueError, match=r"\$MY_TOKEN is not set"):
        read_token(parse_args(["--token-env", "MY_TOKEN"]), environ={})
    assert read_token(parse_args(["--token-env", "MY_TOKEN"]), environ={"MY_TOKEN": " k "}) == "k"
    for name, args in (("MY_TOKEN", ["--token-env", "MY_TOKEN"]), ("GEN_RL_REWARD_TOKEN", [])):
        with pytest.raises(ValueError, match=rf"\${name} is set but empty"):
            read_token(parse_args(args), environ={name: " \n"})
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(parse_args(["--token-file", str(token_file)]), environ={})


def test_trainer_scores_through_a_remote_reward(tmp_path):
    """The generation trainer with ``name: remote`` gets the served reward's scores for its own samples."""
    from trainer_helpers import small_config

    from gen_rl.trainer import GenerationTrainer

    with RewardServer(ColourReward(), port=0) as server:
        terms = f"reward.terms=[{{name: remote, kwargs: {{url: '{server.url}', on_failure: abort}}}}]"
        trainer = GenerationTrainer(small_config(tmp_path, terms, "train.num_steps=1", "eval.every_steps=0"))
        batch = trainer.sample(0)
        remote_scores = trainer.score_rollout(batch.rollout, trainer.reward_models, batch.group_ids)["remote"]
        local = ColourReward()(batch.rollout.pixels, batch.rollout.prompts).scores
        assert torch.allclose(remote_scores, local, atol=1e-3)  # float16 pixels on the wire
        assert remote_scores.std() > 0
        record = trainer.run_step(0)
        assert record["reward/remote/nan"] == 0 and record["reward/dropped_samples"] == 0
        assert server.requests_scored >= 2


# ----- holding under load: pixel budget, backlog, connection pool, slow clients, bad payloads ------------------
def png_claiming(width: int, height: int, rows: int, grey: int = 0) -> bytes:
    """An RGB PNG whose IHDR says ``width x height`` but whose data holds only ``rows`` rows of ``grey``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" + bytes([grey]) * (3 * width)  # filter byte 0, then grey RGB pixels
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def png_request(pngs: list[bytes]) -> bytes:
    """A JSON ``POST /score`` body carrying ``pngs``."""
    images = [base64.b64encode(png).decode("ascii") for png in pngs]
    return json.dumps({"images_png": images, "prompts": ["a red apple"] * len(pngs)}).encode()


def traced_peak_growth(action) -> tuple[object, int]:
    """``(action(), peak traced bytes above the start)``: numpy's arrays (PNG decoding) are traced, so a
    decoded 4096 x 4096 RGB image shows as >= 48 MiB."""
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - start


def test_pixel_budget_refuses_huge_pngs_with_413_before_decoding() -> None:
    bomb = png_claiming(20000, 20000, rows=1)  # a tiny file that would decode to 1.2 GB
    assert len(bomb) < 200 and png_header_size(bomb) == (20000, 20000, 3)
    full = png_claiming(4096, 4096, rows=4096)  # a complete black 4096 x 4096 image, about 50 KB
    many = png_request([full] * 6)  # 6 x 50 M values: 1.2 GB as float32, in a 0.4 MB request
    assert len(many) < MIB
    with serving(MeanReward()) as server:  # the default limits
        (status, answer), growth = traced_peak_growth(
            lambda: raw_request(server.url, png_request([bomb]), "application/json")
        )
        assert status == 413 and "per sample" in answer["error"] and growth < 2 * MIB
        (status, answer), growth = traced_peak_growth(
            lambda: raw_request(server.url, many, "application/json")
        )
        assert status == 413 and growth < 4 * MIB  # about the body: 0.4 MB of JSON, 0.3 MB of PNG bytes
        assert f"decodes to {6 * 3 * 4096 * 4096} pixel values" in answer["error"]
        assert "--max-request-pixels" in answer["error"]
        assert server.model_calls == 0
    # The instrument sees decoding: a 2048 x 2048 image (a quarter of one above) within the budget is decoded
    # (two uint8 copies of 12 MiB are traced) and scored.
    grey = png_claiming(2048, 2048, rows=2048, grey=51)
    with serving(MeanReward()) as server:
        (status, answer), growth = traced_peak_growth(
            lambda: raw_request(server.url, png_request([grey]), "application/json", timeout_s=60)
        )
    assert status == 200 and answer["scores"][0] == pytest.approx(51 / 255, abs=1e-6)
    assert growth > 20 * MIB


def test_pixel_budget_counts_all_samples_of_a_request_exactly() -> None:
    """The budget is inclusive and per request, for both wire formats; the client sizes its requests by it."""
    per_sample = 3 * 8 * 8
    limits = RequestLimits(max_pixels_per_request=5 * per_sample)
    for fmt in ("safetensors", "png"):
        decode_request(
            *encode_request(pixels_for(5), prompts_for(5), fmt=fmt), limits
        )  # exactly at the budget
        with pytest.raises(RequestRejected) as caught:
            decode_request(*encode_request(pixels_for(6), prompts_for(6), fmt=fmt), limits)
        assert (
            caught.value.status == 413 and f"decodes to {6 * per_sample} pixel values" in caught.value.message
        )
    # A safetensors header claiming [4, 3, 4096, 4096] over 8 bytes of data: refused from the header alone.
    header = json.dumps({"pixels": {"dtype": "U8", "shape": [4, 3, 4096, 4096], "data_offsets": [0, 8]}})
    claim = struct.pack("<Q", len(header)) + header.encode() + bytes(8)
    with pytest.raises(RequestRejected) as caught:
        decode_request(claim, "application/x-safetensors")
    assert caught.value.status == 413 and f"decodes to {4 * 3 * 4096 * 4096}" in caught.value.message
    local = ColourReward()
    with serving(local, limits=limits) as server:
        remote = RemoteReward(server.url, **FAST)
        assert remote.max_pixels_per_request == 5 * per_sample and remote.samples_per_request((3, 8, 8)) == 5
        pixels = pixels_for(12)
        assert_same_scores(remote(pixels, prompts_for(12)), local(pixels, prompts_for(12)), FLOAT16_BOUND)
        assert server.requests_scored == 3  # 5 + 5 + 2 samples


def http_request_bytes(body: bytes, content_type: str) -> bytes:
    """A raw ``POST /score`` request."""
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("ascii") + body


def read_response(connection: socket.socket) -> tuple[int, dict]:
    """``(status, JSON body)`` of the response on a raw socket."""
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, json.loads(response.read())


def test_listen_backlog_holds_128_clients_that_are_all_answered() -> None:
    """128 clients connect and send while the server is not accepting yet: the kernel must queue all of
    them (a backlog of 5 holds 6), and once it serves, each gets its own correct scores."""
    clients = 128
    local = ColourReward()
    server = RewardServer(local, limits=RequestLimits(max_batch=512))
    url = server.bind()
    address = (urlsplit(url).hostname, urlsplit(url).port)
    sockets = [socket.socket() for _ in range(clients)]
    try:
        for connection in sockets:
            connection.setblocking(False)
            assert connection.connect_ex(address) in (0, 115)  # 115: EINPROGRESS
        pending, deadline = set(sockets), time.monotonic() + 3.0
        while pending and time.monotonic() < deadline:  # a handshake the kernel completed shows as writable
            _, writable, _ = select.select([], list(pending), [], 0.1)
            pending -= {c for c in writable if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0}
        assert not pending, f"{len(pending)} of {clients} connections were not queued by the listen backlog"
        inputs = [(pixels_for(2, seed=index), prompts_for(2, offset=index)) for index in range(clients)]
        for connection, (pixels, prompts) in zip(sockets, inputs, strict=True):
            connection.setblocking(True)
            connection.sendall(
                http_request_bytes(*encode_request(pixels, prompts, fmt="safetensors_float32"))
            )
        server.start()
        for connection, (pixels, prompts) in zip(sockets, inputs, strict=True):
            connection.settimeout(30)
            status, answer = read_response(connection)
            assert status == 200, answer
            assert_same_scores(decode_response(json.dumps(answer).encode(), 2), local(pixels, prompts), 1e-6)
    finally:
        for connection in sockets:
            connection.close()
        server.stop()
    assert server.requests_scored == clients


def test_full_server_answers_503_with_retry_after_and_the_client_waits_for_it() -> None:
    local = ColourReward()
    with serving(local, max_connections=2) as server:
        remote = RemoteReward(server.url, timeout_s=5.0, retries=3, backoff_s=0.01)
        address = (urlsplit(server.url).hostname, urlsplit(server.url).port)
        idle = [socket.create_connection(address) for _ in range(2)]  # accepted first: they hold both slots
        try:
            connection = http.client.HTTPConnection(*address, timeout=10)
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 503 and response.getheader("Retry-After") == "1"
            assert "--max-connections" in json.loads(response.read())["error"]
            connection.close()
            # A client still sending a large body reads the 503 too (its connection is drained, not reset).
            body, kind = encode_request(pixels_for(8, size=160), prompts_for(8), fmt="safetensors_float32")
            assert len(body) > 2 * MIB
            assert raw_request(server.url, body, kind)[0] == 503
            threading.Timer(0.3, lambda: [client.close() for client in idle]).start()  # slots free at 0.3 s
            started = time.monotonic()
            output = remote(pixels_for(3), prompts_for(3))
            waited = time.monotonic() - started
        finally:
            for client in idle:
                client.close()
    # Backoff alone (0.01 s, 0.02 s, 0.04 s) would have given up within 0.1 s; Retry-After made it wait 1 s.
    assert waited >= 1.0
    assert_same_scores(output, local(pixels_for(3), prompts_for(3)), FLOAT16_BOUND)
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(formatdate(time.time() + 30, usegmt=True)) == pytest.approx(30, abs=2)


def test_slow_clients_are_cut_off_and_do_not_block_others() -> None:
    """Silent clients, clients sending their headers a byte every 0.2 s (an idle timeout never fires on
    them) and one sending its body that way all get a 408 and are closed at the read deadline, while normal
    clients are answered in the meantime."""
    read_timeout_s = 2.0  # long enough for the normal requests on a busy machine
    local = ColourReward()
    with serving(local, max_connections=16, read_timeout_s=read_timeout_s) as server:
        address = (urlsplit(server.url).hostname, urlsplit(server.url).port)
        remote = RemoteReward(server.url, **FAST)
        results: dict[str, tuple[float, bytes]] = {}

        def slow_client(name: str, head: bytes, trickle: bytes) -> None:
            with socket.create_connection(address) as connection:
                started, received = time.monotonic(), b""
                connection.sendall(head)
                for byte in trickle:  # one byte every 0.2 s until the server answers
                    if select.select([connection], [], [], 0.2)[0]:
                        break
                    try:
                        connection.send(bytes([byte]))
                    except OSError:
                        break
                connection.settimeout(read_timeout_s + 10)
                while chunk := connection.recv(4096):
                    received += chunk
                results[name] = (time.monotonic() - started, received)

        trickled = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n" * 10
        head = http_request_bytes(b"x" * 1000, "application/json")[:-1000]
        clients = [threading.Thread(target=slow_client, args=(f"silent{i}", b"", b"")) for i in range(4)]
        clients += [
            threading.Thread(target=slow_client, args=(f"trickle{i}", b"", trickled)) for i in range(2)
        ]
        clients += [threading.Thread(target=slow_client, args=("body", head, b"x" * 1000))]
        for client in clients:
            client.start()
        time.sleep(0.1)  # the slow clients are connected and hold 7 of the 16 slots
        for request in range(3):  # meanwhile normal clients are answered
            pixels = pixels_for(2, seed=request)
            assert_same_scores(remote(pixels, prompts_for(2)), local(pixels, prompts_for(2)), FLOAT16_BOUND)
        answered_while_slow_clients_held_on = not results
        for client in clients:
            client.join(timeout=read_timeout_s + 15)
    assert answered_while_slow_clients_held_on
    assert sorted(results) == ["body"] + [f"silent{i}" for i in range(4)] + ["trickle0", "trickle1"]
    for name, (elapsed, received) in results.items():
        assert received.startswith(b"HTTP/1.0 408"), (name, received[:80])
        assert read_timeout_s - 0.1 <= elapsed < read_timeout_s + 3.0, (name, elapsed)


class SlowReward(ColourReward):
    """The colour reward, taking ``seconds`` per call."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def score(self, pixels, prompts, metadata):
        """Sleep, then score colour."""
        time.sleep(self.seconds)
        return super().score(pixels, prompts, metadata)


def test_the_read_deadline_does_not_cut_off_a_slow_reward() -> None:
    """The deadline covers reading the request only: scoring that outlasts it is still answered."""
    with serving(SlowReward(0.8), read_timeout_s=0.3) as server:
        pixels = pixels_for(2)
        output = RemoteReward(server.url, **FAST)(pixels, prompts_for(2))
    assert_same_scores(output, ColourReward()(pixels, prompts_for(2)), FLOAT16_BOUND)


@pytest.mark.parametrize(
    ("body", "content_type", "words"),
    [
        (json.dumps({"images_png": [], "prompts": []}).encode(), "application/json", "non-empty"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", "nests JSON deeper"),
        (
            json.dumps(
                {"images_png": ["x"], "prompts": ["a"], "metadata": [{"k": [[[[[[[[[[[[[]]]]]]]]]]]] * 3]}]}
            )
            .replace("[]", "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
            .encode(),
            "application/json",
            "nests JSON deeper",
        ),
        (
            json.dumps({"images_png": [base64.b64encode(b"GIF89a....").decode()], "prompts": ["a"]}).encode(),
            "application/json",
            "not a PNG",
        ),
        (json.dumps([1, 2]).encode(), "application/json", "must be an object"),
    ],
)
def test_empty_malformed_and_deeply_nested_json_get_400(body: bytes, content_type: str, words: str) -> None:
    with serving(ColourReward()) as server:
        status, answer = raw_request(server.url, body, content_type)
        assert status == 400 and words in answer["error"]
        assert server.model_calls == 0


def safetensors_body(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file with this exact header and data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def one_pixel_with_metadata(metadata: dict) -> bytes:
    """A safetensors body of one 1 x 1 grey sample with this ``__metadata__``."""
    entry = {"dtype": "U8", "shape": [1, 1, 1, 1], "data_offsets": [0, 1]}
    return safetensors_body({"__metadata__": metadata, "pixels": entry}, b"\x00")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            safetensors_body({"pixels": {"dtype": "U8", "shape": [0, 3, 8, 8], "data_offsets": [0, 0]}}),
            "no samples",
        ),
        (
            safetensors_body({"pixels": {"dtype": "U8", "shape": [2, 3, 0, 8], "data_offsets": [0, 0]}}),
            "no samples",
        ),
        (safetensors_body({"pixels": [1, 2]}), "not an object"),
        (
            one_pixel_with_metadata({"prompts": 5}),
            "map names to strings",
        ),
        (
            one_pixel_with_metadata({"prompts": '["a", '}),
            "does not parse",
        ),
        (
            one_pixel_with_metadata({"prompts": "[" * 50_000 + "]" * 50_000}),
            "nests JSON deeper",
        ),
        (b"[" * 100_000, "not a safetensors file"),
    ],
)
def test_empty_and_malformed_safetensors_get_400(body: bytes, words: str) -> None:
    with serving(ColourReward()) as server:
        status, answer = raw_request(server.url, body, "application/x-safetensors")
        assert status == 400 and words in answer["error"]
        assert server.model_calls == 0


def test_corrupted_payloads_are_refused_with_a_4xx_never_a_crash() -> None:
    """Random truncations and byte flips of valid bodies: decode_request answers or raises RequestRejected 4xx."""
    rng = random.Random(0)
    bodies = [
        encode_request(pixels_for(2), prompts_for(2), [{"k": 1}, {}], fmt=fmt)
        for fmt in ("safetensors", "safetensors_uint8", "png")
    ]
    statuses = set()
    for body, kind in bodies:
        for _ in range(300):
            corrupted = bytearray(body[: rng.randrange(len(body) + 1)] if rng.random() < 0.3 else body)
            for _ in range(rng.randrange(1, 4)):
                if corrupted:
                    position = rng.randrange(min(len(corrupted), 400))  # mostly headers and JSON
                    corrupted[position] = rng.randrange(256)
            try:
                decode_request(bytes(corrupted), kind)
                statuses.add(200)
            except RequestRejected as rejected:
                assert 400 <= rejected.status < 500, rejected.message
                statuses.add(rejected.status)
    assert {200, 400} <= statuses


def test_a_learning_reward_is_refused_by_the_server() -> None:
    """A served reward scores each request alone and is never updated: learning rewards stay local."""
    from rewards.running_reference import RunningReferenceReward

    with pytest.raises(ValueError, match="learns or compares samples within a group"):
        RewardServer(RunningReferenceReward())
