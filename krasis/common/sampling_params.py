"""What a request asks of sampling (OpenAI fields plus repetition_penalty), and its validation."""

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_ABS_PENALTY = 2.0
# Temperatures below this are greedy: dividing logits by them overflows fp32.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens (OpenAI request fields plus HF repetition_penalty)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy (argmax after penalties)
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 => off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    repetition_penalty: float = 1.0  # HF/CTRL semantics, over prompt + generated tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N >= 0: chosen token's logprob and the top N

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError("<field>: <reason>") for the first bad field."""
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_real("temperature", self.temperature, low=0.0)
        _check_real("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=-1, high=vocab_size)
        _check_real("min_p", self.min_p, low=0.0, high=1.0)
        _check_real("presence_penalty", self.presence_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        _check_real("frequency_penalty", self.frequency_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        _check_real("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.seed is not None:
            _check_int("seed", self.seed)
        self._validate_stop()
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            high = MAX_LOGPROBS if vocab_size is None else min(MAX_LOGPROBS, vocab_size)
            _check_int("logprobs", self.logprobs, low=0, high=high)

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, tuple):
            raise ValueError(f"stop: must be a tuple of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: each entry must be a non-empty string, got {s!r}")


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    _check_bounds(name, value, low, high, low_open=False)


def _check_real(
    name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    _check_bounds(name, value, low, high, low_open)


def _check_bounds(name: str, value, low, high, low_open: bool) -> None:
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")
