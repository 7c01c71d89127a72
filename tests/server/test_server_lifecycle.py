"""`krasis-ctl serve` as deployed: the default model, an API key, a full queue, and SIGTERM."""

import http.client
import json
import signal
import time

import pytest
from openai import AuthenticationError, OpenAI, RateLimitError

from tests.server.conftest import ServerProcess, metric, post, request, sse_events

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The embedded default model (no --model), one running sequence and one waiting at most."""
    args = ["--api-key", KEY, "--max-concurrency", "1", "--max-queue", "1"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("lifecycle-server"))
    yield proc
    assert proc.stop() == 0, proc.log()


def test_without_model_it_serves_the_embedded_default_model(server):
    client = OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == ["krasis-tiny-moe-v1"]
    assert f"serving krasis-tiny-moe-v1 on http://127.0.0.1:{server.port}/v1" in server.log()
    out = client.chat.completions.create(model="krasis-tiny-moe-v1", max_tokens=4,
                                         messages=[{"role": "user", "content": "Hello!"}])
    assert out.usage.completion_tokens >= 1


def test_missing_or_wrong_key_is_401_while_health_and_metrics_stay_open(server):
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()
    status, _, raw = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1})
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    assert request(server, "GET", "/health")[0] == 200
    assert request(server, "GET", "/metrics")[0] == 200


def test_full_queue_is_429_with_retry_after_until_a_slot_frees(server):
    holders = [_open_stream(server) for _ in range(2)]  # one running, one waiting: capacity 2
    try:
        status, headers, raw = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}, AUTH)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert json.loads(raw)["error"]["message"]
        with pytest.raises(RateLimitError):
            OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0).completions.create(
                model="krasis-tiny-moe-v1", prompt="hi", max_tokens=1)
    finally:
        for conn in holders:
            conn.close()
    deadline = time.monotonic() + 5
    while metric(server, "krasis_in_flight_sequences") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, body = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, AUTH)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def _open_stream(server) -> http.client.HTTPConnection:
    """A chat stream long enough to outlive the test, read up to its role chunk."""
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {**AUTH, "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert b'"role":"assistant"' in response.readline()
    return conn


def test_sigterm_with_a_stream_open_ends_the_stream_and_exits_zero_promptly(tiny_model_dir, tmp_path):
    proc = ServerProcess(["--model", str(tiny_model_dir)], tmp_path)
    body = {"prompt": "hi", "max_tokens": 250, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    first = response.readline()
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    events = sse_events(first + response.read())
    assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
    assert proc.proc.wait(10) == 0, proc.log()
    assert time.monotonic() - started < 5
    assert "krasis gateway: stopped" in proc.log()
