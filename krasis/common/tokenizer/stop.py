"""Cuts streamed text at the first stop string, holding back text that might be the start of one.

Works on text, not tokens, so a stop string may span several tokens or end inside one token's text.
"""


class StopStringMatcher:
    """Feed decoded text chunks; get back the text that is safe to send and whether a stop string hit.

    When several stop strings occur, the one that completes first wins (as if the text arrived one
    character at a time); of two completing at the same character, the one starting earlier wins.
    Output never contains a stop string.
    """

    def __init__(self, stop_strings: list[str] | tuple[str, ...]):
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty strings")
        self.stop_strings = tuple(dict.fromkeys(stop_strings))
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (text safe to emit, whether a stop string was found)."""
        if self.stopped:
            return "", True
        if not self.stop_strings:
            return text, False
        buffer = self._held + text
        match = self._first_match(buffer)
        if match is not None:
            start, self.matched = match
            self.stopped = True
            self._held = ""
            return buffer[:start], True
        keep = self._longest_partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Release held-back text once generation ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best = None  # (end, start, stop)
        for stop in self.stop_strings:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _longest_partial_suffix(self, buffer: str) -> int:
        # Longest tail of buffer that is a proper prefix of some stop string; only that can still
        # turn into a match, so only that is held back.
        longest = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
