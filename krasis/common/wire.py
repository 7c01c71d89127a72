"""msgpack codec for the pipeline's messages: typed, validated, size-bounded; never pickle.

A message is one msgpack frame `[tag, field, ...]` (fields by position, nested dataclasses as arrays) plus
one extra frame per tensor larger than INLINE_TENSOR_BYTES, handed to ZeroMQ without a copy. A tensor
field is `[dtype name, shape, frame index or inline bytes]`; its bytes go through a uint8 view so bf16 and
fp8 survive. `decode` checks everything against the annotations in protocol_pipeline.py and raises
ProtocolError with a one-line reason; the receiver logs it and drops the message.
"""

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import torch

from krasis.common.protocol_pipeline import MESSAGES, Message

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # all frames together
MAX_STR_CHARS = 1 << 16
MAX_TENSOR_DIMS = 8
MAX_TENSOR_DIM = 1 << 32  # torch sizes are int64; a zero-size tensor could otherwise claim any other size
INLINE_TENSOR_BYTES = 4096  # below this a copy into the msgpack frame costs less than a frame of its own

_ALLOWED_DTYPES = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
)  # fmt: skip
DTYPES = {str(d).removeprefix("torch."): d for d in _ALLOWED_DTYPES}
_DTYPE_NAMES = {d: name for name, d in DTYPES.items()}

Frame = bytes | memoryview


class ProtocolError(ValueError):
    """A message that cannot be encoded, or arrived malformed. `kind` groups reasons (one log line per kind)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def encode(msg: Message, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[Frame]:
    """Frames of `msg`: the msgpack body, then one memoryview per large tensor (zero-copy; keep it unchanged
    until sent)."""
    struct = _STRUCTS.get(type(msg))
    if struct is None:
        raise ProtocolError("encode", f"{type(msg).__name__} is not a pipeline message")
    extra: list[memoryview] = []
    try:
        body = msgpack.packb([int(msg.TAG), *struct.encode_fields(msg, extra)])
    except (TypeError, ValueError, OverflowError, AttributeError) as e:
        raise ProtocolError("encode", f"{type(msg).__name__}: cannot encode: {e}") from None
    size = len(body) + sum(f.nbytes for f in extra)
    if size > max_bytes:
        raise ProtocolError("size", f"{type(msg).__name__} is {size} bytes, over the {max_bytes}-byte limit")
    return [body, *extra]


def decode(frames: Sequence[Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """The message in `frames` (bytes, memoryviews or zmq.Frames), or ProtocolError saying what is wrong."""
    views = [memoryview(f) for f in frames]
    if not views:
        raise ProtocolError("frames", "no frames")
    size = sum(v.nbytes for v in views)
    if size > max_bytes:
        raise ProtocolError("size", f"message is {size} bytes, over the {max_bytes}-byte limit")
    try:
        body = msgpack.unpackb(views[0], raw=False, strict_map_key=True)
    except Exception as e:  # untrusted bytes: msgpack raises ValueError, FormatError, StackError, ...
        raise ProtocolError("msgpack", f"invalid msgpack body: {str(e) or type(e).__name__}") from None
    if type(body) is not list or not body:
        raise ProtocolError("body", f"body must be a non-empty array [tag, field...], got {_kind(body)}")
    cls = _BY_TAG.get(body[0]) if type(body[0]) is int else None
    if cls is None:
        raise ProtocolError("tag", f"unknown message tag {body[0]!r}")
    extra = _ExtraFrames(views[1:])
    try:
        msg = _STRUCTS[cls].decode(body[1:], extra)
    except _Invalid as e:
        raise ProtocolError(e.kind, f"{cls.__name__}{''.join(reversed(e.path))}: {e}") from None
    extra.check_all_taken()
    return msg


class _Invalid(Exception):
    """A bad value deep in a message; `path` gathers where (innermost first) as it propagates."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.path = kind, []


class _ExtraFrames:
    """The frames after the body; each must be referenced by exactly one tensor field."""

    def __init__(self, views: list[memoryview]):
        self.views, self.taken = views, set()

    def take(self, index: int) -> memoryview:
        if not 1 <= index <= len(self.views) or index in self.taken:
            raise _Invalid("frames", f"bad frame reference {index} ({len(self.views)} extra frames)")
        self.taken.add(index)
        return self.views[index - 1]

    def check_all_taken(self) -> None:
        if len(self.taken) != len(self.views):
            raise ProtocolError("frames", f"{len(self.views) - len(self.taken)} extra frame(s) not referenced")


Encoder = Callable[[Any, list], Any]
Decoder = Callable[[Any, _ExtraFrames], Any]


class _Struct:
    """Positional codec of one dataclass, built once from its annotations."""

    def __init__(self, cls: type):
        hints = typing.get_type_hints(cls)
        self.cls = cls
        self.names = [f.name for f in dataclasses.fields(cls)]
        codecs = [_codec(hints[name]) for name in self.names]
        self.encoders = [enc for enc, _ in codecs]
        self.decoders = [dec for _, dec in codecs]

    def encode_fields(self, value, extra: list) -> list:
        return [enc(getattr(value, name), extra) for name, enc in zip(self.names, self.encoders)]

    def decode(self, obj, extra: _ExtraFrames):
        if type(obj) is not list:
            raise _wrong_type("an array of fields", obj)
        if len(obj) != len(self.names):
            raise _Invalid("arity", f"expected {len(self.names)} fields, got {len(obj)}")
        values = []
        try:
            for dec, v in zip(self.decoders, obj):
                values.append(dec(v, extra))
        except _Invalid as e:
            e.path.append(f".{self.names[len(values)]}")
            raise
        return self.cls(*values)


def _codec(tp) -> tuple[Encoder, Decoder]:
    """Encoder and validating decoder for one annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"only `X | None` unions travel, not {tp}")
        return _optional(*_codec(inner[0]))
    if origin in (list, tuple):
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
            raise TypeError(f"only tuple[X, ...] travels, not {tp}")
        return _sequence(args[0], origin)
    if tp is torch.Tensor:
        return _encode_tensor, _decode_tensor
    if dataclasses.is_dataclass(tp):
        struct = _Struct(tp)
        return struct.encode_fields, struct.decode
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        return _enum(tp)
    if tp in _SCALARS:
        return _same, _SCALARS[tp]
    raise TypeError(f"no wire codec for {tp}")


def _same(value, extra: list):
    return value


def _optional(enc: Encoder, dec: Decoder) -> tuple[Encoder, Decoder]:
    def encode(value, extra):
        return None if value is None else enc(value, extra)

    def decode(obj, extra):
        return None if obj is None else dec(obj, extra)

    return encode, decode


def _sequence(elem_type, container: type) -> tuple[Encoder, Decoder]:
    enc, dec = _codec(elem_type)
    fast_types = {int: frozenset([int]), float: frozenset([float, int])}.get(elem_type)

    def encode(value, extra):
        return value if enc is _same else [enc(v, extra) for v in value]

    def decode(obj, extra):
        if type(obj) is not list:
            raise _wrong_type("an array", obj)
        if fast_types is not None and set(map(type, obj)) <= fast_types:  # token ids, page tables: ~20 ns each
            return obj if elem_type is int and container is list else container(map(elem_type, obj))
        out = []
        try:
            for v in obj:
                out.append(dec(v, extra))
        except _Invalid as e:
            e.path.append(f"[{len(out)}]")
            raise
        return out if container is list else container(out)

    return encode, decode


def _enum(enum_type: type[enum.IntEnum]) -> tuple[Encoder, Decoder]:
    values = {int(m): m for m in enum_type}

    def decode(obj, extra):
        member = values.get(obj) if type(obj) is int else None
        if member is None:
            raise _Invalid("field", f"{obj!r} is not a {enum_type.__name__}")
        return member

    return (lambda value, extra: int(value)), decode


def _decode_int(obj, extra):
    if type(obj) is not int:  # bool is not an int here
        raise _wrong_type("int", obj)
    return obj


def _decode_float(obj, extra):
    if type(obj) is float:
        return obj
    if type(obj) is int:  # a JSON `1` for a float field is fine
        return float(obj)
    raise _wrong_type("float", obj)


def _decode_bool(obj, extra):
    if type(obj) is not bool:
        raise _wrong_type("bool", obj)
    return obj


def _decode_str(obj, extra):
    if type(obj) is not str:
        raise _wrong_type("str", obj)
    if len(obj) > MAX_STR_CHARS:
        raise _Invalid("field", f"string of {len(obj)} chars, over {MAX_STR_CHARS}")
    return obj


_SCALARS: dict[type, Decoder] = {int: _decode_int, float: _decode_float, bool: _decode_bool, str: _decode_str}


def _encode_tensor(t: torch.Tensor, extra: list) -> list:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ProtocolError("dtype", f"dtype {t.dtype} is not allowed on the wire")
    if t.device.type != "cpu":
        raise ProtocolError("encode", f"tensors travel from CPU memory, this one is on {t.device}")
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # [numel * itemsize], no copy
    if raw.nbytes <= INLINE_TENSOR_BYTES:
        return [name, list(t.shape), raw.tobytes()]
    extra.append(memoryview(raw))
    return [name, list(t.shape), len(extra)]


def _decode_tensor(obj, extra: _ExtraFrames) -> torch.Tensor:
    if type(obj) is not list or len(obj) != 3:
        raise _wrong_type("a tensor [dtype, shape, data]", obj)
    name, shape, data = obj
    dtype = DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise _Invalid("dtype", f"dtype {name!r} is not in the allow-list {sorted(DTYPES)}")
    if type(shape) is not list or len(shape) > MAX_TENSOR_DIMS or not all(map(_is_dim, shape)):
        raise _Invalid("tensor", f"shape must be at most {MAX_TENSOR_DIMS} sizes in [0, 2^32], got {shape!r}")
    if type(data) is int:
        buf = extra.take(data)
    elif type(data) is bytes:
        buf = memoryview(bytearray(data))  # torch wants writable memory; inline tensors are small
    else:
        raise _wrong_type("tensor data (frame index or bytes)", data)
    expected = math.prod(shape) * dtype.itemsize
    if buf.nbytes != expected:
        raise _Invalid("tensor", f"shape {shape} of {name} needs {expected} bytes, got {buf.nbytes}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if buf.readonly:
        buf = memoryview(bytearray(buf))
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


def _is_dim(d) -> bool:
    return type(d) is int and 0 <= d <= MAX_TENSOR_DIM


def _wrong_type(expected: str, obj) -> _Invalid:
    return _Invalid("field", f"expected {expected}, got {_kind(obj)}")


def _kind(obj) -> str:
    return "nil" if obj is None else type(obj).__name__


_STRUCTS = {cls: _Struct(cls) for cls in MESSAGES}
_BY_TAG = {int(cls.TAG): cls for cls in MESSAGES}
