"""Types shared by every channel. No logic here (STYLE.md: one place for message types)."""

import enum


class FinishReason(enum.IntEnum):
    """Why a sequence ended; str() is the OpenAI `finish_reason` string."""

    STOP = 1  # an EOS token or a stop string
    LENGTH = 2  # max_tokens or the context limit
    ABORT = 3  # cancelled by the client or the server

    def __str__(self) -> str:
        return {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}[self]
