"""Encoding one long text on several cores with the same ids as one serial encode.

A byte-level BPE tokenizer encodes each pre-token on its own, so a text cut where its pre-tokenizer cuts encodes, piece
by piece, to the same ids. Finding the pre-tokenizer's cuts costs more than encoding (it is the slow half of it), so
the cuts are taken where the known byte-level split patterns always cut: at a single space between two letters
(" ?\\p{L}+"-style patterns end a letter run at a space, and the space starts the next match; none of them looks
behind or anchors). A cut must also lie away from any added token (matched before pre-tokenizing, and their strip
options eat neighbouring spaces), and the text must be NFC already when the tokenizer normalizes to NFC (composition
then never crosses a space). Tokenizers whose pipeline is not of that known kind always encode serially."""

import json
import os
import unicodedata

from tokenizers import Tokenizer as BackendTokenizer

# The Split patterns known to cut at every letter-space-letter (a letter run ends at the space): Qwen2's (also Qwen3's,
# Qwen3-Next's) and the CJK and digit isolation of this project's DeepSeek-style test tokenizer. Others are unproven.
KNOWN_SPLITS = frozenset({
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}{1,3}",
})  # fmt: skip
MIN_PIECE_CHARS = 4096  # ~2.5K tokens, ~1 ms to encode: shorter texts, or pieces, are not worth a thread


class ParallelEncoder:
    """Cuts long texts at safe spaces and encodes the pieces as one batch (the tokenizers library runs a batch on all
    cores). `for_backend` gives None for a tokenizer whose pipeline is not of the known kind."""

    def __init__(self, backend: BackendTokenizer, nfc: bool, adds_nothing: bool, added: list[str],
                 min_piece_chars: int = MIN_PIECE_CHARS, max_pieces: int | None = None):  # fmt: skip
        # adds_nothing: encoding with special tokens adds none (no post-processor, or a byte-level one: offsets only)
        self.backend, self.nfc, self.adds_nothing, self.min_piece_chars = backend, nfc, adds_nothing, min_piece_chars
        self.max_pieces = max_pieces or os.cpu_count() or 1
        self.added = [token for token in added if token]
        self.reach = max((len(token) for token in self.added), default=0) + 1  # how near a cut an added token matters

    @classmethod
    def for_backend(cls, backend: BackendTokenizer, **kwargs) -> "ParallelEncoder | None":
        if backend.truncation is not None or backend.padding is not None:  # a batch would cut or pad each piece
            return None
        normalizer = _spec(backend.normalizer)
        if normalizer is not None and normalizer.get("type") != "NFC":
            return None
        bpe = type(backend.model).__name__ == "BPE"
        if not bpe or backend.model.dropout or not _known_pre_tokenizer(_spec(backend.pre_tokenizer)):
            return None  # (BPE dropout: a random encoding either way)
        post = _spec(backend.post_processor)
        adds_nothing = post is None or post.get("type") == "ByteLevel"
        added = [token.content for token in backend.get_added_tokens_decoder().values()]
        return cls(backend, normalizer is not None, adds_nothing, added, **kwargs)

    def cuts(self, text: str) -> list[int]:
        """Offsets to cut `text` at (none: encode it whole), about evenly spaced."""
        pieces = min(self.max_pieces, len(text) // self.min_piece_chars)
        if pieces < 2 or (self.nfc and not unicodedata.is_normalized("NFC", text)):
            return []
        cuts, step = [], len(text) // pieces
        for target in range(step, len(text) - self.min_piece_chars // 2, step):
            cut = self._safe_cut(text, max(target, cuts[-1] + 1 if cuts else 1), target + step // 2)
            if cut is not None:
                cuts.append(cut)
        return cuts

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int] | None:
        """The ids of `text`, or None when it is not cut (encode it serially): a long text, and special tokens either
        not asked for or none that the tokenizer would add."""
        cuts = [] if add_special_tokens and not self.adds_nothing else self.cuts(text)
        if not cuts:
            return None
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        encodings = self.backend.encode_batch_fast(pieces, add_special_tokens=False)
        return [i for encoding in encodings for i in encoding.ids]

    def _safe_cut(self, text: str, start: int, stop: int) -> int | None:
        """The first space in text[start:stop] with a letter on each side and no added token within reach."""
        at = text.find(" ", start, stop)
        while at != -1:
            if 0 < at < len(text) - 1 and text[at - 1].isalpha() and text[at + 1].isalpha() and self._clear(text, at):
                return at
            at = text.find(" ", at + 1, stop)
        return None

    def _clear(self, text: str, at: int) -> bool:
        window = text[max(0, at - self.reach) : at + self.reach]
        return not any(token in window for token in self.added)


def _spec(component) -> dict | None:
    """A pipeline component's own JSON (not the whole tokenizer's: its vocabulary is megabytes)."""
    return None if component is None else json.loads(component.__getstate__())


def _known_pre_tokenizer(spec: dict | None) -> bool:
    """A (Sequence of) Split with a known pattern, isolating, and byte-level without a prefix space."""
    if spec is None:
        return False
    if spec.get("type") == "Sequence":
        return all(_known_pre_tokenizer(part) for part in spec.get("pretokenizers", []))
    if spec.get("type") == "Split":
        pattern = spec.get("pattern") or {}
        return spec.get("behavior") == "Isolated" and not spec.get("invert") and pattern.get("Regex") in KNOWN_SPLITS
    if spec.get("type") == "ByteLevel":  # its own regex is GPT-2's, of the same kind
        return not spec.get("add_prefix_space")
    return False
