"""Token events -> OpenAI output: choices run side by side, per-choice text (TextStream), SSE framing,
chunks and final bodies."""

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from krasis.common.engine import TokenEvent
from krasis.common.generation import TextStream
from krasis.common.sampling_params import SamplingParams
from krasis.common.tokenizer import Tokenizer
from krasis.gateway.engine_client import EngineClient, EngineError
from krasis.gateway.metrics import GatewayMetrics

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class LogprobEntry:
    """One sampled token's logprob and the best alternatives, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Piece:
    """What one token event adds to a choice."""

    index: int
    text: str
    token_ids: list[int]  # [] for an EOS, which ends the sequence unemitted
    logprobs: list[LogprobEntry]
    text_offsets: list[int]  # where each token's text starts in the choice's text
    finish_reason: str | None


@dataclass
class Choice:
    """Everything one choice produced so far."""

    index: int
    prompt_index: int  # n choices share one prompt
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0  # sampled tokens, a final EOS included (what usage counts)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class ChoiceStream:
    """One choice's events -> Pieces: whole UTF-8 characters only, text cut at the first stop string."""

    def __init__(self, choice: Choice, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.choice = choice
        self.text = TextStream(tokenizer, stop)

    def add(self, event: TokenEvent) -> Piece:
        choice = self.choice
        choice.num_tokens += 1
        offset, delta, ids, entries = len(choice.text), "", [], []
        if event.token_id is not None:
            delta, ids = self.text.add(event.token_id), [event.token_id]
            if event.logprobs is not None:
                lp = event.logprobs
                entries = [LogprobEntry(event.token_id, lp.logprob, list(zip(lp.top_ids, lp.top_logprobs)))]
        finish = None
        if self.text.stopped:
            finish = "stop"
        elif event.finish_reason is not None:
            delta += self.text.finish()
            finish = "stop" if self.text.stopped else str(event.finish_reason)
        piece = Piece(choice.index, delta, ids, entries, [offset] * len(entries), finish)
        choice.text += delta
        choice.token_ids += ids
        choice.logprobs += entries
        choice.text_offsets += piece.text_offsets
        choice.finish_reason = finish
        return piece


async def run_choices(client: EngineClient, metrics: GatewayMetrics, jobs: list[tuple[ChoiceStream, SamplingParams]],
                      started: float) -> AsyncIterator[Piece]:
    """Pieces of every choice as they come, until each has finished; EngineError if one fails.
    Closing this early (client gone, error) cancels the choices, which aborts their sequences."""
    out: asyncio.Queue = asyncio.Queue()
    request_id = uuid.uuid4().hex
    tasks = [asyncio.create_task(_run_choice(client, metrics, f"{request_id}-{i}", stream, params, out, started))
             for i, (stream, params) in enumerate(jobs)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await out.get()
            if isinstance(item, EngineError):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _run_choice(client: EngineClient, metrics: GatewayMetrics, request_id: str, stream: ChoiceStream,
                      params: SamplingParams, out: asyncio.Queue, started: float) -> None:
    reason, last = "abort", started
    try:
        events = client.generate(request_id, stream.choice.prompt_ids, params)
        async with contextlib.aclosing(events):
            async for event in events:
                now = time.perf_counter()
                first = stream.choice.num_tokens == 0
                (metrics.time_to_first_token if first else metrics.inter_token_latency).observe(now - last)
                last = now
                piece = stream.add(event)
                out.put_nowait(piece)
                if piece.finish_reason is not None:  # leaving early on a stop string aborts the sequence
                    reason = piece.finish_reason
                    return
    except EngineError as exc:
        reason = "error"
        out.put_nowait(exc)
    finally:
        metrics.sequence_finished(reason)


class TokenTexts:
    """Text and exact UTF-8 bytes of single tokens (a token may hold part of a character)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = type(tokenizer.backend.decoder).__name__ == "ByteLevel"
        self.added = set(tokenizer.backend.get_added_tokens_decoder())
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            raw = self._bytes(token_id)
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.backend.id_to_token(token_id) or ""
        if token_id in self.added:
            return piece.encode()
        if self.byte_level and all(ch in _BYTE_DECODER for ch in piece):
            return bytes(_BYTE_DECODER[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, inverted (as in tokenizers' ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    byte_values = list(printable)
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars)}


_BYTE_DECODER = _byte_level_decoder()


class ResponseBuilder:
    """Chunk and final-response JSON for one request of either endpoint."""

    def __init__(self, chat: bool, response_id: str, model: str, created: int, token_texts: TokenTexts,
                 include_usage: bool, return_token_ids: bool):
        self.chat, self.id, self.model, self.created = chat, response_id, model, created
        self.token_texts, self.include_usage, self.return_token_ids = token_texts, include_usage, return_token_ids
        self._unsent_ids: dict[int, list[int]] = {}  # per choice: tokens of pieces that made no chunk yet

    def role_chunk(self, index: int) -> dict:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def chunk(self, piece: Piece) -> dict | None:
        """The chunk for one piece; None when it adds nothing a client could see (its token ids wait
        for the next chunk of that choice, so the streamed token_ids add up to the whole sequence)."""
        token_ids = self._unsent_ids.setdefault(piece.index, [])
        token_ids += piece.token_ids
        if not piece.text and not piece.logprobs and piece.finish_reason is None:
            return None
        self._unsent_ids[piece.index] = []
        logprobs = self._logprobs(piece.logprobs, piece.text_offsets) if piece.logprobs else None
        if self.chat:
            delta = {"content": piece.text} if piece.text or piece.finish_reason is None else {}
            choice = {"index": piece.index, "delta": delta, "logprobs": logprobs}
        else:
            choice = {"index": piece.index, "text": piece.text, "logprobs": logprobs}
        choice["finish_reason"] = piece.finish_reason
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return self._chunk([choice])

    def usage_chunk(self, choices: list[Choice]) -> dict:
        return {**self._chunk([]), "usage": usage(choices)}

    def final(self, choices: list[Choice], logprobs_asked: bool) -> dict:
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model}
        body["choices"] = [self._final_choice(c, logprobs_asked) for c in choices]
        body["usage"] = usage(choices)
        return body

    def _final_choice(self, choice: Choice, logprobs_asked: bool) -> dict:
        logprobs = self._logprobs(choice.logprobs, choice.text_offsets) if logprobs_asked else None
        if self.chat:
            out = {"index": choice.index, "message": {"role": "assistant", "content": choice.text}}
        else:
            out = {"index": choice.index, "text": choice.text}
        out.update(logprobs=logprobs, finish_reason=choice.finish_reason)
        if self.return_token_ids:
            out.update(prompt_token_ids=choice.prompt_ids, token_ids=choice.token_ids)
        return out

    def _chunk(self, choices: list[dict]) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body

    def _logprobs(self, entries: list[LogprobEntry], offsets: list[int]) -> dict:
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries]}
        text = self.token_texts.get
        return {
            "tokens": [text(e.token_id)[0] for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(t)[0]: lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _chat_entry(self, entry: LogprobEntry) -> dict:
        token, raw = self.token_texts.get(entry.token_id)
        top = [{"token": self.token_texts.get(t)[0], "logprob": lp, "bytes": self.token_texts.get(t)[1]}
               for t, lp in entry.top]
        return {"token": token, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top}


def usage(choices: list[Choice]) -> dict:
    """Prompt tokens once per prompt (n choices of one prompt share it), every sampled token."""
    prompt_lengths = {c.prompt_index: len(c.prompt_ids) for c in choices}
    prompt_tokens = sum(prompt_lengths.values())
    completion_tokens = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
