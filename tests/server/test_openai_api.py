"""The OpenAI API of a real `krasis-ctl serve` process, through the official client and raw HTTP."""

import asyncio
import json
import socket
import time

import pytest
import torch
from click.testing import CliRunner
from openai import AsyncOpenAI, NotFoundError, OpenAI

from krasis.common.tokenizer import Tokenizer
from krasis.ctl.main import cli
from tests.models.tiny_checkpoints import load_reference
from tests.server.conftest import ServerProcess, metric, post, request, sse_events

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    args = ["--model", str(tiny_model_dir), "--dtype", "fp32", "--max-concurrency", "8", "--max-queue", "24"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("api-server"))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return tiny_model_dir.name


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def complete(client, model, prompt, **fields):
    """A non-streaming completion; krasis fields (ignore_eos, return_token_ids...) ride in extra_body."""
    extra = {k: fields.pop(k) for k in ("ignore_eos", "top_k", "return_token_ids") if k in fields}
    return client.completions.create(model=model, prompt=prompt, extra_body=extra, **fields)


def generate_cli(model_dir, *args) -> dict:
    result = CliRunner().invoke(cli, ["generate", "--json", "--dtype", "fp32", "--model", str(model_dir), *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_models_lists_the_served_model(client, server, model):
    assert [m.id for m in client.models.list().data] == [model]
    assert client.models.retrieve(model).id == model


def test_greedy_completion_equals_generate_cli(client, model, tiny_model_dir):
    prompt = "def add(a, b):\n    return a + b"
    expected = generate_cli(tiny_model_dir, "--prompt", prompt, "--max-tokens", "12", "--ignore-eos")
    out = complete(client, model, prompt, max_tokens=12, temperature=0, ignore_eos=True, return_token_ids=True)
    choice = out.choices[0].model_dump()
    assert choice["prompt_token_ids"] == expected["prompt_token_ids"]
    assert choice["token_ids"] == expected["token_ids"]
    assert choice["text"] == expected["text"] and choice["finish_reason"] == "length"


def test_greedy_chat_equals_generate_cli(client, model, tiny_model_dir):
    expected = generate_cli(tiny_model_dir, "--system", "Be brief.", "--chat", "Hi 👋", "--max-tokens", "10")
    out = client.chat.completions.create(
        model=model, max_tokens=10, temperature=0, extra_body={"return_token_ids": True},
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}])
    choice = out.choices[0].model_dump()
    assert choice["prompt_token_ids"] == expected["prompt_token_ids"]
    assert choice["token_ids"] == expected["token_ids"]
    assert choice["message"]["content"] == expected["text"]
    assert choice["finish_reason"] == expected["finish_reason"]


def test_streaming_chat_joins_to_the_non_streaming_answer(client, model):
    messages = [{"role": "user", "content": "Tell me about experts."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=16, **_greedy_chat())
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_completion_tokens=16,
                                                 stream=True, **_greedy_chat()))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason] == ["length"]


def _greedy_chat() -> dict:
    return {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_sse_framing_role_first_one_finish_per_choice_usage_then_done(server, model):
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}, **GREEDY}
    status, headers, raw = request(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] for m in mine if m["finish_reason"]] == ["length"]
        assert mine[-1]["finish_reason"] == "length"
    *content, last = chunks
    assert all(c["usage"] is None for c in content)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 12


def test_streaming_completion_equals_non_streaming(client, model):
    whole = complete(client, model, "The quick brown", max_tokens=10, **GREEDY)
    stream = client.completions.create(model=model, prompt="The quick brown", max_tokens=10, stream=True,
                                       stream_options={"include_usage": True}, temperature=0,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_usage_counts_prompt_tokens_and_sampled_tokens(client, model, tokenizer):
    ids = tokenizer.encode("Hello, world! How are you today?")
    out = complete(client, model, ids, max_tokens=5, **GREEDY)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 5, len(ids) + 5)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=3, **_greedy_chat())
    assert chat.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    assert chat.usage.completion_tokens == 3


def test_stop_string_cuts_the_text_and_finishes_with_stop(client, model):
    free = complete(client, model, "hello", max_tokens=24, **GREEDY).choices[0].text
    start = next(i for i in range(2, len(free) - 1) if free[i:i + 2].isascii() and free[i:i + 2].isprintable())
    stop = free[start:start + 2]
    cut = complete(client, model, "hello", max_tokens=24, stop=[stop, "never-there"], **GREEDY)
    assert cut.choices[0].text == free[: free.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 24
    chunks = list(client.completions.create(model=model, prompt="hello", max_tokens=24, stop=stop, stream=True,
                                            temperature=0, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_n_choices_with_a_seed_reproduce_single_requests_seeded_seed_plus_index(client, model):
    fields = dict(max_tokens=10, temperature=1.0, ignore_eos=True, return_token_ids=True)
    both = complete(client, model, "Once upon", n=2, seed=123, **fields)
    assert [c.index for c in both.choices] == [0, 1]
    for index, seed in ((0, 123), (1, 124)):
        alone = complete(client, model, "Once upon", seed=seed, **fields)
        assert both.choices[index].model_dump()["token_ids"] == alone.choices[0].model_dump()["token_ids"]
    assert both.usage.completion_tokens == 20 and both.usage.prompt_tokens == alone.usage.prompt_tokens


def test_prompt_as_texts_token_ids_and_token_id_lists(client, model, tokenizer):
    texts = ["The answer is", "SELECT id FROM"]
    alone = [complete(client, model, t, max_tokens=4, **GREEDY).choices[0].text for t in texts]
    batch = complete(client, model, texts, max_tokens=4, **GREEDY)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == alone
    assert complete(client, model, tokenizer.encode(texts[0]), max_tokens=4, **GREEDY).choices[0].text == alone[0]
    as_ids = complete(client, model, [tokenizer.encode(t) for t in texts], max_tokens=4, **GREEDY)
    assert [c.text for c in sorted(as_ids.choices, key=lambda c: c.index)] == alone
    assert as_ids.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)


def test_chat_logprobs_are_the_models_log_softmax_best_first(client, model, tokenizer, tiny_model_dir):
    messages = [{"role": "user", "content": "Count: one, two,"}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=6, logprobs=True,
                                         top_logprobs=3, temperature=0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    generated = choice.model_dump()["token_ids"]
    ids = tokenizer.encode_chat(messages) + generated
    with torch.no_grad():
        logits = load_reference(tiny_model_dir)(torch.tensor([ids])).logits[0].float()
    reference = logits[len(ids) - len(generated) - 1: -1].log_softmax(-1)  # [6, V]: the step that chose each token
    assert len(choice.logprobs.content) == len(generated) == 6
    for step, (entry, token_id) in enumerate(zip(choice.logprobs.content, generated)):
        assert entry.logprob == pytest.approx(reference[step, token_id].item(), abs=1e-4)
        best = reference[step].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy takes the best
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def test_completion_logprobs_have_the_legacy_shape(client, model):
    out = complete(client, model, "The quick brown", max_tokens=5, logprobs=2, **GREEDY)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 2 and chosen == pytest.approx(max(top.values()))


BAD_INPUTS = [
    ("chat", b"{not json", None),
    ("chat", b"[1, 2]", None),
    ("chat", {}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "9"}, "max_completion_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     "stream_options"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, "presence_penalty"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 10}}, "logit_bias"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, -1]}, "prompt"),
    ("completions", {"prompt": [1, 10**6]}, "prompt"),
    ("completions", {"prompt": [[1, 2], [3, 10**6]]}, "prompt[1]"),
    ("completions", {"prompt": [1.5]}, "prompt"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "hi", "seed": "x"}, "seed"),
    ("completions", {"prompt": "hi", "echo": True}, "echo"),
]


@pytest.mark.parametrize("endpoint, body, param", BAD_INPUTS, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_400_naming_the_field_and_the_next_request_works(server, model, endpoint, body, param):
    if isinstance(body, dict):
        body = {"model": model, **body}
    status, _, raw = request(server, "POST", f"/v1/{endpoint.replace('chat', 'chat/completions')}", body)
    error = json.loads(raw)["error"]
    assert status == 400 and error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param and "code" in error
    status, good = post(server, "/v1/completions", {"model": model, "prompt": "ok", "max_tokens": 1})
    assert status == 200 and good["usage"]["completion_tokens"] == 1


def test_unknown_model_route_and_method(client, server, model):
    with pytest.raises(NotFoundError) as caught:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)
    assert caught.value.body["code"] == "model_not_found"
    status, _, raw = request(server, "GET", "/v1/nothing-here")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, headers, raw = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and "POST" in headers["Allow"] and json.loads(raw)["error"]["message"]


def test_body_over_32_mib_is_413(server, model):
    padding = "x" * (33 * 2**20)
    status, _, raw = request(server, "POST", "/v1/completions", json.dumps({"prompt": padding}).encode())
    assert status == 413 and "bytes" in json.loads(raw)["error"]["message"]


def test_prompt_beyond_the_context_is_413_with_the_numbers(server, model):
    status, body = post(server, "/v1/completions", {"model": model, "prompt": [7] * 300, "max_tokens": 1})
    assert status == 413 and "300" in body["error"]["message"] and "256" in body["error"]["message"]
    status, body = post(server, "/v1/completions", {"model": model, "prompt": [7] * 200, "max_tokens": 100})
    message = body["error"]["message"]
    assert status == 413 and all(n in message for n in ("200", "100", "300", "256"))
    assert body["error"]["code"] == "context_length_exceeded"


def test_sixteen_concurrent_streams_each_match_their_request_alone(client, server, model):
    prompts = [f"step {i}: {i * i}" for i in range(16)]
    alone = [complete(client, model, p, max_tokens=8, **GREEDY).choices[0].text for p in prompts]

    async def stream(async_client, prompt):
        chunks = await async_client.completions.create(model=model, prompt=prompt, max_tokens=8, stream=True,
                                                       temperature=0, extra_body={"ignore_eos": True})
        pieces = [c.choices[0] async for c in chunks]
        assert [p.finish_reason for p in pieces if p.finish_reason] == ["length"]
        return "".join(p.text for p in pieces)

    async def run_all():
        async with AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0) as async_client:
            return await asyncio.wait_for(asyncio.gather(*(stream(async_client, p) for p in prompts)), 60)

    started = time.monotonic()
    assert asyncio.run(run_all()) == alone
    assert time.monotonic() - started < 60  # generous: CI has 2 cores for gateway, workers and client
    assert metric(server, "krasis_kv_pages_in_use") == 0


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_sequence_and_frees_its_kv_pages(server, model, stream):
    aborted = metric(server, 'krasis_sequences_finished_total{reason="abort"}')
    body = json.dumps({"model": model, "prompt": "hello", "max_tokens": 240, "stream": stream, **GREEDY}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    _wait_for(lambda: metric(server, "krasis_kv_pages_in_use") > 0)
    sock.close()
    _wait_for(lambda: metric(server, "krasis_kv_pages_in_use") == 0)
    assert metric(server, 'krasis_sequences_finished_total{reason="abort"}') == aborted + 1
    assert metric(server, "krasis_in_flight_sequences") == 0


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_health_and_metrics(server):
    status, _, raw = request(server, "GET", "/health")
    assert status == 200 and json.loads(raw) == {"status": "ok"}
    status, headers, raw = request(server, "GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for name in ("krasis_queue_depth", "krasis_running_sequences", "krasis_kv_pages_in_use",
                 "krasis_prefill_tokens_per_second", "krasis_decode_tokens_per_second",
                 "krasis_time_to_first_token_seconds_bucket", "krasis_inter_token_latency_seconds_count"):
        assert f"\n{name}" in text, name
    assert metric(server, "krasis_kv_pages_total") == 8 * 256 // 16


def test_streamed_token_ids_add_up_to_the_whole_sequence(client, model):
    # A prompt in CJK and emoji makes pieces that hold back partial characters (no chunk of their own).
    fields = dict(model=model, prompt="汉字 🙂 emoji", max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.completions.create(**fields).choices[0].model_dump()["token_ids"]
    streamed = [c.choices[0].model_dump().get("token_ids") or [] for c in client.completions.create(stream=True, **fields)]
    assert [t for ids in streamed for t in ids] == whole and len(whole) == 24
