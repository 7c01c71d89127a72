"""The tokenizer package's error type."""


class TokenizerError(ValueError):
    """A tokenizer directory, chat or template input that cannot be used; the message is one line."""


def one_line(error: Exception) -> str:
    """An exception's text on one line (jinja and the Rust loader put newlines in theirs)."""
    return " ".join(str(error).split()) or type(error).__name__
