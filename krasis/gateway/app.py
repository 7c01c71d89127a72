"""The OpenAI-compatible HTTP API on aiohttp: routes, OpenAI error JSON, API key, SSE streaming."""

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from krasis.common.tokenizer import Tokenizer, TokenizerError
from krasis.gateway.engine_client import EngineBusy, EngineClient, EngineError
from krasis.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from krasis.gateway.openai_schemas import ApiError, GenerationOptions, parse_chat, parse_completion, with_sampling
from krasis.gateway.streaming import SSE_DONE, Choice, ChoiceStream, ResponseBuilder, TokenTexts, run_choices, sse

log = logging.getLogger("krasis.gateway")

MAX_BODY_BYTES = 32 * 1024 * 1024
RETRY_AFTER_S = 1
STARTED = web.RequestKey("started", float)  # perf_counter() when the request came in
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class GatewayConfig:
    model_name: str
    max_context: int  # prompt + generated tokens of one sequence
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


class Gateway:
    """Request handlers; one per server, in front of one EngineClient."""

    def __init__(self, client: EngineClient, tokenizer: Tokenizer, config: GatewayConfig, metrics: GatewayMetrics):
        self.client, self.tokenizer, self.config, self.metrics = client, tokenizer, config, metrics
        self.token_texts = TokenTexts(tokenizer)
        self.created = int(time.time())
        self.shutting_down = False

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        ok, detail = self.client.health()
        if ok and not self.shutting_down:
            return json_response({"status": "ok"})
        return json_response({"status": "unavailable", "detail": detail if not ok else "shutting down"}, 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        text = self.metrics.render(self.client.stats(), self.client.in_flight)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        chat = parse_chat(await read_json(request), self.config.vocab_size)
        self._check_model(chat.options.model)
        prompt = await self._tokenize("messages", lambda: self.tokenizer.encode_chat(
            chat.messages, chat.add_generation_prompt, chat.tools, **chat.template_kwargs))
        return await self._generate(request, True, [prompt], chat.options)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        completion = parse_completion(await read_json(request), self.config.vocab_size)
        self._check_model(completion.options.model)
        prompts = [p if isinstance(p, list) else await self._tokenize("prompt", lambda p=p: self.tokenizer.encode(p))
                   for p in completion.prompts]
        return await self._generate(request, False, prompts, completion.options)

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "krasis",
                "max_model_len": self.config.max_context}

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{self.config.model_name}`",
                           "model", "model_not_found")

    async def _tokenize(self, field: str, encode: Callable[[], list[int]]) -> list[int]:
        # Off the event loop: a long prompt takes tens of ms to encode, and streams must keep flowing.
        try:
            return await asyncio.get_running_loop().run_in_executor(None, encode)
        except TokenizerError as exc:
            raise ApiError(400, f"{field}: {exc}", field) from None

    async def _generate(self, request: web.Request, chat: bool, prompts: list[list[int]],
                        options: GenerationOptions) -> web.StreamResponse:
        jobs = self._plan(prompts, options)
        ok, detail = self.client.health()
        if self.shutting_down or not ok:
            raise ApiError(503, f"the server cannot take requests: {detail if ok else 'shutting down'}",
                           kind="server_error", code="service_unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        prefix = "chatcmpl-" if chat else "cmpl-"
        builder = ResponseBuilder(chat, prefix + uuid.uuid4().hex, self.config.model_name, int(time.time()),
                                  self.token_texts, options.include_usage, options.return_token_ids)
        try:
            with self.client.admit(len(jobs)):
                if options.stream:
                    return await self._stream(request, builder, jobs)
                return await self._collect(request, builder, jobs, options.params.logprobs is not None)
        except EngineBusy as exc:
            raise ApiError(429, f"the server is at capacity ({exc}); retry shortly", kind="rate_limit_exceeded",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def _plan(self, prompts: list[list[int]], options: GenerationOptions) -> list[tuple[ChoiceStream, object]]:
        """One (stream, sampling params) per choice; prompts that cannot fit the context are refused."""
        limit, jobs = self.config.max_context, []
        if len(prompts) * options.n > self.client.capacity:
            raise ApiError(400, f"the request needs {len(prompts) * options.n} sequences; this server holds at "
                                f"most {self.client.capacity}", "n")
        for p, ids in enumerate(prompts):
            if not ids:
                raise ApiError(400, "prompt: is empty after tokenization", "prompt")
            if len(ids) >= limit:
                raise ApiError(413, f"the prompt has {len(ids)} tokens; the context limit is {limit}", "prompt",
                               "context_length_exceeded")
            max_tokens = options.max_tokens or limit - len(ids)
            if len(ids) + max_tokens > limit:
                raise ApiError(413, f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = "
                                    f"{len(ids) + max_tokens} tokens exceeds the context limit of {limit}",
                               "max_tokens", "context_length_exceeded")
            for i in range(options.n):
                choice = Choice(p * options.n + i, p, ids)
                jobs.append((ChoiceStream(choice, self.tokenizer, options.params.stop),
                             with_sampling(options, max_tokens, i)))
        return jobs

    async def _collect(self, request: web.Request, builder: ResponseBuilder, jobs,
                       logprobs_asked: bool) -> web.Response:
        try:
            async with contextlib.aclosing(run_choices(self.client, self.metrics, jobs, request[STARTED])) as pieces:
                async for _ in pieces:
                    pass
        except EngineError as exc:
            raise ApiError(503 if not self.client.health()[0] else 500, str(exc), kind="server_error") from None
        return json_response(builder.final([stream.choice for stream, _ in jobs], logprobs_asked))

    async def _stream(self, request: web.Request, builder: ResponseBuilder, jobs) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            if builder.chat:
                await response.write(b"".join(sse(builder.role_chunk(s.choice.index)) for s, _ in jobs))
            try:
                async with contextlib.aclosing(run_choices(self.client, self.metrics, jobs, request[STARTED])) as pieces:
                    async for piece in pieces:
                        chunk = builder.chunk(piece)
                        if chunk is not None:
                            await response.write(sse(chunk))
                if builder.include_usage:
                    await response.write(sse(builder.usage_chunk([s.choice for s, _ in jobs])))
            except EngineError as exc:
                await response.write(sse(error_body(ApiError(500, str(exc), kind="server_error"))))
            await response.write(SSE_DONE)
            await response.write_eof()
        except ConnectionResetError:  # the client left; _pieces' cleanup has aborted its sequences
            pass
        return response


GATEWAY = web.AppKey("gateway", Gateway)


def create_app(client: EngineClient, tokenizer: Tokenizer, config: GatewayConfig,
               metrics: GatewayMetrics | None = None) -> web.Application:
    gateway = Gateway(client, tokenizer, config, metrics or GatewayMetrics())
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[error_middleware(gateway.metrics, config.max_body_bytes),
                                       auth_middleware(config.api_key)])
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/v1/models/{model:.+}", gateway.model)
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/metrics", gateway.metrics_text)
    app[GATEWAY] = gateway
    return app


async def read_json(request: web.Request) -> dict:
    body = await request.read()  # raises 413 past client_max_size
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return value


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers,
                             dumps=lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")))


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}


def error_middleware(metrics: GatewayMetrics, max_body_bytes: int):
    @web.middleware
    async def errors(request: web.Request, handler):
        request[STARTED] = time.perf_counter()  # time to first token counts from here
        try:
            response = await handler(request)
        except ApiError as exc:
            response = json_response(error_body(exc), exc.status, exc.headers)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
            error = _from_http(request, exc, max_body_bytes)
            response = json_response(error_body(error), error.status, error.headers)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            error = ApiError(500, "internal server error", kind="server_error")
            response = json_response(error_body(error), 500)
        if request.path.startswith("/v1/"):
            metrics.response_sent(response.status)
        return response

    return errors


def _from_http(request: web.Request, exc: web.HTTPException, max_body_bytes: int) -> ApiError:
    if exc.status == 404:
        return ApiError(404, f"no route {request.method} {request.path}", code="not_found")
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return ApiError(405, f"{request.method} is not allowed on {request.path} (allowed: {allow})",
                        code="method_not_allowed", headers={"Allow": allow})
    if exc.status == 413:
        return ApiError(413, f"the request body is larger than the limit of {max_body_bytes} bytes",
                        code="request_too_large")
    return ApiError(exc.status, exc.reason or "error")


def auth_middleware(api_key: str | None):
    """Bearer key on /v1/*; /health and /metrics stay open for probes and scrapers."""

    @web.middleware
    async def auth(request: web.Request, handler):
        if api_key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer <key>)",
                               code="invalid_api_key")
        return await handler(request)

    return auth
