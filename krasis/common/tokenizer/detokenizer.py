"""Streams generated token ids out as text, never splitting a UTF-8 character across chunks.

Decodes only a small window of recent ids per token, as vLLM's incremental detokenizer does: the
window starts at the tokens emitted last time (`prefix_offset`), so decoders that treat the first
token specially (SentencePiece's leading-space strip) treat both decodes the same, and the new text
is the difference.
"""

from .tokenizer import Tokenizer

# U+FFFD at the end of a decode means the last token stopped inside a multi-byte character.
REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as context, so the first generated token decodes as it would mid-text.
PROMPT_CONTEXT_TOKENS = 5
# A valid stream ends a character within a few tokens; more than this pending means invalid bytes,
# and the window is advanced anyway so decode cost stays bounded.
MAX_PENDING_TOKENS = 64


class IncrementalDetokenizer:
    """Turns one request's generated ids into text chunks; `add` per token, `flush` at the end.

    Without `prompt_ids` the chunks join to `tokenizer.decode(generated_ids)`. With them, the text
    continues the prompt (a SentencePiece "▁Paris" after a prompt keeps its leading space). One
    exception: invalid UTF-8 from a byte-fallback model, where decode turns a whole <0xNN> run into
    U+FFFD, including characters already streamed whole.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        # Dropping special ids here and decoding with skip_special_tokens=False is what the backend's
        # own skipping does, and keeps specials from becoming the window's "first token".
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self.ids: list[int] = [i for i in (prompt_ids or [])[-PROMPT_CONTEXT_TOKENS:] if i not in self._skipped_ids]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        # characters of decode(ids[prefix_offset:]) already handed out (or belonging to the prompt)
        self.emitted_chars = len(self._decode(self.prefix_offset).rstrip(REPLACEMENT_CHAR))
        self.finished = False

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it finalizes (possibly empty)."""
        if self.finished:
            raise RuntimeError("IncrementalDetokenizer.add called after flush")
        if token_id in self._skipped_ids:
            return ""
        self.ids.append(token_id)
        text = self._decode(self.prefix_offset)
        pending = len(self.ids) - self.read_offset
        if text.endswith(REPLACEMENT_CHAR) and pending <= MAX_PENDING_TOKENS:
            # Hand out the finished characters now; the incomplete one waits for its other bytes.
            return self._take(text.rstrip(REPLACEMENT_CHAR))
        chunk = self._take(text)
        self._advance()
        return chunk

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD, as in decode)."""
        if self.finished:
            return ""
        self.finished = True
        return self._take(self._decode(self.prefix_offset))

    def _take(self, text: str) -> str:
        if len(text) <= self.emitted_chars:
            return ""
        chunk = text[self.emitted_chars :]
        self.emitted_chars = len(text)
        return chunk

    def _advance(self) -> None:
        # The window now starts at the tokens just emitted, which give the next token its context.
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.emitted_chars = len(self._decode(self.prefix_offset))

    def _decode(self, start: int) -> str:
        return self.tokenizer.decode(self.ids[start:], skip_special_tokens=False)
