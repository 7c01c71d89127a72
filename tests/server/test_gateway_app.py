"""The gateway in-process, in front of scripted engines: failures, stop-string aborts, admission."""

import asyncio
import json

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from krasis.common.engine import EngineConfig, EngineCore, TokenEvent
from krasis.common.model_loader import load_model
from krasis.common.protocol import FinishReason
from krasis.common.sampling_params import SamplingParams
from krasis.common.tokenizer import Tokenizer
from krasis.gateway.app import GatewayConfig, create_app
from krasis.gateway.engine_client import EngineClient, EngineError, EngineStats, InProcessEngineClient
from tests.server.conftest import sse_events


class ScriptedEngine(EngineClient):
    """Answers every request with the same token ids, then `end` (a FinishReason or an exception)."""

    def __init__(self, token_ids: list[int], end, healthy: bool = True):
        super().__init__(max_running=2, max_waiting=0)
        self.token_ids, self.end, self.healthy = token_ids, end, healthy
        self.aborted: list[str] = []

    async def generate(self, request_id, prompt_ids, params):
        finished = False
        try:
            for token_id in self.token_ids:
                await asyncio.sleep(0)
                yield TokenEvent(request_id, token_id)
            if isinstance(self.end, Exception):
                raise self.end
            finished = True
            yield TokenEvent(request_id, None, self.end)
        finally:
            if not finished:  # the interface: closing the iterator early aborts the sequence
                self.abort(request_id)

    def abort(self, request_id):
        self.aborted.append(request_id)

    def health(self):
        return (True, "ok") if self.healthy else (False, "the engine stopped: test")

    def stats(self):
        return EngineStats(0, 0, 0, 1, 0, 0, 0.0, 0.0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def call(engine: EngineClient, tokenizer: Tokenizer, method: str, path: str, body: dict | None = None):
    """(status, raw body) of one request to a fresh in-process gateway."""

    async def run():
        app = create_app(engine, tokenizer, GatewayConfig("m", max_context=64, vocab_size=tokenizer.vocab_size))
        async with TestClient(TestServer(app)) as http:
            response = await http.request(method, path, json=body)
            return response.status, await response.read()

    return asyncio.run(run())


def test_health_is_503_with_the_reason_while_the_engine_is_down(tokenizer):
    engine = ScriptedEngine([], FinishReason.STOP, healthy=False)
    status, raw = call(engine, tokenizer, "GET", "/health")
    assert status == 503 and "engine stopped" in json.loads(raw)["detail"]
    status, raw = call(engine, tokenizer, "POST", "/v1/completions", {"prompt": "hi"})
    assert status == 503 and json.loads(raw)["error"]["type"] == "server_error"


def test_engine_failure_mid_stream_ends_with_an_error_event_then_done(tokenizer):
    engine = ScriptedEngine(tokenizer.encode("hello world"), EngineError("the engine stopped: worker died"))
    status, raw = call(engine, tokenizer, "POST", "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "hi"}], "stream": True})
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "the engine stopped: worker died"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "hello world"


def test_engine_failure_without_streaming_is_a_json_error(tokenizer):
    engine = ScriptedEngine([5], EngineError("the engine failed: boom"))
    status, raw = call(engine, tokenizer, "POST", "/v1/completions", {"prompt": "hi"})
    assert status == 500 and json.loads(raw)["error"]["message"] == "the engine failed: boom"


def test_stop_string_hit_aborts_the_sequence_in_the_engine(tokenizer):
    engine = ScriptedEngine(tokenizer.encode("hello world, and more"), FinishReason.LENGTH)
    status, raw = call(engine, tokenizer, "POST", "/v1/completions", {"prompt": "hi", "stop": " wor"})
    choice = json.loads(raw)["choices"][0]
    assert status == 200 and (choice["text"], choice["finish_reason"]) == ("hello", "stop")
    assert len(engine.aborted) == 1


def test_in_process_client_runs_at_most_max_running_and_frees_every_page(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir, dtype=torch.float32)
    engine = EngineCore(model, EngineConfig(max_context=64, kv_pages=32), tokenizer.eos_token_ids,
                        model.config.vocab_size)
    client = InProcessEngineClient(engine, max_running=2, max_waiting=4)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def run():
        await client.start()
        peak = 0

        async def one(i):
            nonlocal peak
            events = []
            async for event in client.generate(f"r{i}", tokenizer.encode(f"prompt {i}"), params):
                events.append(event)
                peak = max(peak, client.stats().running)
            return events

        results = await asyncio.gather(*(one(i) for i in range(5)))
        await client.close()
        return results, peak

    results, peak = asyncio.run(run())
    assert all(len(events) == 6 and events[-1].finish_reason == FinishReason.LENGTH for events in results)
    assert peak <= 2 and client.stats().kv_pages_in_use == 0
    assert client.stats().decode_tokens == 5 * 5 and client.stats().prefill_tokens > 0
