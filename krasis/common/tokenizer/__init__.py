"""Tokenizer and chat layer: ids and chat prompts identical to transformers, streaming text and stop strings.

`Tokenizer.from_dir` loads a model directory; `IncrementalDetokenizer` streams generated ids as whole
characters; `StopStringMatcher` cuts the stream at stop strings; `write_tokenizer_files` builds the
small deterministic tokenizer used by tiny test checkpoints and the embedded default model.
"""

from .builder import write_tokenizer_files
from .detokenizer import IncrementalDetokenizer
from .errors import TokenizerError
from .stop import StopStringMatcher
from .tokenizer import Tokenizer

__all__ = [
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "Tokenizer",
    "TokenizerError",
    "write_tokenizer_files",
]
