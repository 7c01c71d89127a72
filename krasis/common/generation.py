"""Offline generation: the engine core plus detokenization and stop strings, in one process."""

from dataclasses import dataclass
from typing import Callable

from krasis.common.engine import EngineConfig, EngineCore
from krasis.common.protocol import FinishReason
from krasis.common.sampling import SamplingParams
from krasis.common.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated, without a final EOS
    text: str
    finish_reason: FinishReason


class TextStream:
    """One request's tokens -> text deltas: whole UTF-8 characters only, stop strings cut out."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = StopStringMatcher(list(stop))
        self.stopped = False

    def add(self, token_id: int) -> str:
        delta, self.stopped = self.stop.feed(self.detokenizer.add(token_id))
        return delta

    def finish(self) -> str:
        if self.stopped:
            return ""
        delta, self.stopped = self.stop.feed(self.detokenizer.flush())
        return delta + ("" if self.stopped else self.stop.flush())


def engine_for(model, tokenizer: Tokenizer, reserve_tokens: int, max_context: int | None = None) -> EngineCore:
    """An engine whose KV pool holds `reserve_tokens` tokens (plus a page per sequence of slack)."""
    max_context = max_context or model.config.max_position_embeddings
    page_size = 16
    config = EngineConfig(max_context=max_context, kv_pages=-(-reserve_tokens // page_size) + 1, page_size=page_size)
    return EngineCore(model, config, tokenizer.eos_token_ids, model.config.vocab_size)


def generate(
    engine: EngineCore,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """Run `prompts` together to completion; `on_text(index, delta)` sees text as it is produced."""
    ids = [f"gen-{n}" for n in range(len(prompts))]
    streams = {rid: TextStream(tokenizer, params.stop) for rid in ids}
    results = {rid: Completion(list(p), [], "", FinishReason.LENGTH) for rid, p in zip(ids, prompts)}
    for rid, prompt in zip(ids, prompts):
        engine.add(rid, prompt, params)
    while engine.has_work:
        for event in engine.step():
            result, stream = results[event.request_id], streams[event.request_id]
            delta = ""
            if event.token_id is not None:
                result.token_ids.append(event.token_id)
                delta = stream.add(event.token_id)
            if stream.stopped:
                engine.abort(event.request_id)
                result.finish_reason = FinishReason.STOP
            elif event.finish_reason is not None:
                delta += stream.finish()
                result.finish_reason = event.finish_reason
            result.text += delta
            if delta and on_text is not None:
                on_text(ids.index(event.request_id), delta)
    return [results[rid] for rid in ids]
