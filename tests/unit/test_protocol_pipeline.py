"""Pipeline messages on the wire: every type round-trips, tensors survive bit-exactly, bad input is refused."""

import ast
import dataclasses
import inspect
import pickle
import random

import msgpack
import numpy as np
import pytest
import torch

from krasis.common import protocol_pipeline, wire, zmq_queues
from krasis.common.protocol import FinishReason
from krasis.common.protocol_pipeline import (
    MESSAGES,
    AbortRequest,
    AddRequest,
    HandOff,
    Heartbeat,
    JoinReply,
    JoinRequest,
    MessageType,
    RemoteReady,
    RequestFailed,
    SequenceKV,
    Shutdown,
    TokenBatch,
    TokenOut,
    WorkerRole,
)
from krasis.common.sampling import TokenLogprobs
from krasis.common.sampling_params import SamplingParams
from krasis.common.wire import INLINE_TENSOR_BYTES, ProtocolError, decode, encode

SAMPLING = SamplingParams(max_tokens=64, temperature=0.7, top_k=40, seed=2**64 - 1, stop=("\n\n", "END"), logprobs=2)

EXAMPLES = [
    AddRequest("req-1", [151644, 872, 0, 2**31], SAMPLING, [3, 4, 5]),
    AbortRequest("req-1"),
    HandOff("req-1", [1, 2, 3, 9], 3, [7], SamplingParams(seed=-5), []),
    TokenBatch([
        TokenOut("a", 0, 17, None, TokenLogprobs(-0.25, [17, 3], [-0.25, -1.5])),
        TokenOut("b", 5, 42, FinishReason.LENGTH, None),
        TokenOut("c", 2, None, FinishReason.STOP, None),
    ]),
    TokenBatch([]),
    RequestFailed("req-2", "prompt has 9000 tokens; the context limit is 8192"),
    Heartbeat(WorkerRole.CPU_DECODE, 3, 4242, 123456789, 0.25),
    Shutdown(),
    AddRequest("req-3", [5], SAMPLING, [0], state_slot=7),  # a model with per-sequence state
    HandOff("req-3", [5, 6], 1, [0], SamplingParams(seed=1), [], state_slot=0),
    # a decode pool on another host
    JoinRequest(1, "9f1c", "epyc-2", "tcp://10.0.0.2:5556", "sha256:ab", [256, 0], [0, 8192], 2, 30),
    JoinReply("9f1c", False, "another model", False, 0, 0, 0, 0, 0, "", "", "", ""),
    JoinReply("9f1c", True, "", False, 512, 16, 8, 8, 8192, "bfloat16", "bf16", "q4", "bf16"),
    RemoteReady("9f1c", 4242, 2, 30),
    SequenceKV("req-3", [4, 1], 16, [torch.ones(3, 8, dtype=torch.bfloat16), torch.zeros(3, 0)], 2,
               [torch.ones(0), torch.arange(6.0)]),  # fmt: skip
    Heartbeat(WorkerRole.GATEWAY, 0, 7, 0, 0.0),
]


def body_of(msg) -> list:
    return msgpack.unpackb(encode(msg)[0])


def pack(*items) -> list[bytes]:
    return [msgpack.packb(list(items))]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(msg):
    frames = encode(msg)
    assert len(frames) == 1
    assert same(decode(frames), msg)


def same(a, b) -> bool:
    """==, with tensors compared by dtype, shape and values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def test_every_message_type_has_a_unique_tag_and_an_example():
    assert sorted(int(cls.TAG) for cls in MESSAGES) == sorted(int(t) for t in MessageType)
    assert len({cls.TAG for cls in MESSAGES}) == len(MESSAGES)
    assert {type(m) for m in EXAMPLES} == set(MESSAGES)
    assert all(dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen for cls in MESSAGES)


def test_decoded_fields_have_their_declared_types():
    add = decode(encode(AddRequest("r", [1], SamplingParams(temperature=1, stop=("x",)), [])))
    assert type(add.sampling.temperature) is float and add.sampling.stop == ("x",)
    out = decode(encode(EXAMPLES[3])).events
    assert out[1].finish_reason is FinishReason.LENGTH and str(out[1].finish_reason) == "length"
    assert isinstance(out[0].logprobs, TokenLogprobs)
    beat = decode(encode(EXAMPLES[6]))
    assert beat.role is WorkerRole.CPU_DECODE and type(beat.busy_s) is float


def test_encoding_is_compact_positional_msgpack():
    assert body_of(AbortRequest("r")) == [MessageType.ABORT_REQUEST, "r"]
    assert encode(Shutdown()) == [msgpack.packb([int(MessageType.SHUTDOWN)])]
    step = TokenBatch([TokenOut(f"req-{i}", 7, 1000 + i, None, None) for i in range(32)])
    assert len(encode(step)[0]) < 32 * 16  # 32 tokens of a step in one small message


def random_bits(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Every bit pattern allowed, NaNs and negative zeros included."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.float32, torch.int64,
              torch.int8, torch.uint8], ids=str)  # fmt: skip
def test_tensors_survive_bit_exactly_as_zero_copy_frames(dtype):
    kv = [random_bits(dtype, (300, 64)), random_bits(dtype, (2, 150, 32))]
    frames = encode(HandOff("r", [1, 2], 1, [0], SAMPLING, kv))
    assert len(frames) == 3 and all(isinstance(f, memoryview) for f in frames[1:])
    for frame, t in zip(frames[1:], kv):
        assert np.frombuffer(frame, dtype=np.uint8).ctypes.data == t.data_ptr()  # no copy on send
    received = [bytearray(f) for f in frames]  # what arrives: writable buffers
    got = decode(received).kv_layers
    for g, t, buf in zip(got, kv, received[1:]):
        assert g.dtype == dtype and g.shape == t.shape
        assert torch.equal(g.view(torch.uint8), t.view(torch.uint8))
        assert g.data_ptr() == np.frombuffer(buf, dtype=np.uint8).ctypes.data  # no copy on receive


def test_small_and_odd_tensors_travel_inline_and_exactly():
    tensors = [
        torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
        torch.tensor(3.5, dtype=torch.bfloat16),  # 0-d
        torch.empty(0, 7, dtype=torch.float8_e4m3fn),
        torch.ones(INLINE_TENSOR_BYTES // 2, dtype=torch.bfloat16),
    ]
    frames = encode(HandOff("r", [1], 1, [], SAMPLING, tensors))
    assert len(frames) == 1
    for got, want in zip(decode(frames).kv_layers, tensors):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def tampered(msg, path: tuple, value) -> list[bytes]:
    """The valid encoding of `msg` with the element at `path` of its msgpack body replaced."""
    body = body_of(msg)
    node = body
    for i in path[:-1]:
        node = node[i]
    node[path[-1]] = value
    return [msgpack.packb(body)]


def tensor_body(dtype_name, shape, data):
    return msgpack.packb([int(MessageType.HAND_OFF), "r", [1], 1, [], body_of(AddRequest("r", [], SAMPLING, []))[3],
                          [[dtype_name, shape, data]], None])  # fmt: skip


ADD = AddRequest("r", [1, 2, 3], SAMPLING, [0])
BAD_MESSAGES = {
    "unknown tag": (pack(99, "x"), "tag", "unknown message tag 99"),
    "tag not an int": (pack("ADD", "x"), "tag", "unknown message tag 'ADD'"),
    "body not an array": ([msgpack.packb({"tag": 1})], "body", "got dict"),
    "empty body": ([msgpack.packb([])], "body", "non-empty array"),
    "too many fields": (pack(MessageType.ABORT_REQUEST, "a", "b"), "arity", "AbortRequest: expected 1 fields, got 2"),
    "too few fields": (pack(MessageType.HEARTBEAT, 2, 0, 5), "arity", "Heartbeat: expected 5 fields, got 3"),
    "nested arity": (tampered(ADD, (3,), [1, 2, 3]), "arity", "AddRequest.sampling: expected 12 fields, got 3"),
    "string for int": (tampered(ADD, (2, 1), "2"), "field", "AddRequest.prompt_ids[1]: expected int, got str"),
    "float for int": (tampered(ADD, (4, 0), 1.5), "field", "AddRequest.page_table[0]: expected int, got float"),
    "bool for int": (
        pack(MessageType.HEARTBEAT, 2, True, 0, 5, 0.0), "field", "Heartbeat.index: expected int, got bool"),
    "int for str": (pack(MessageType.ABORT_REQUEST, 5), "field", "AbortRequest.request_id: expected str, got int"),
    "nil for str": (pack(MessageType.ABORT_REQUEST, None), "field", "AbortRequest.request_id: expected str, got nil"),
    "nested field": (tampered(ADD, (3, 3), "40"), "field", "AddRequest.sampling.top_k: expected int, got str"),
    "unknown enum value": (
        pack(MessageType.HEARTBEAT, 7, 0, 0, 0, 0.0), "field", "Heartbeat.role: 7 is not a WorkerRole"),
    "bad finish reason": (
        pack(MessageType.TOKEN_BATCH, [["a", 0, 1, 9, None]]), "field",
        "TokenBatch.events[0].finish_reason: 9 is not a FinishReason"),
    "string too long": (
        pack(MessageType.ABORT_REQUEST, "x" * (wire.MAX_STR_CHARS + 1)), "field", "AbortRequest.request_id: string of"),
    "invalid utf-8": ([b"\x92\x02\xa2\xff\xfe"], "msgpack", "invalid msgpack body"),
    "truncated msgpack": ([encode(ADD)[0][:-3]], "msgpack", "invalid msgpack body"),
    "reserved msgpack byte": ([b"\xc1"], "msgpack", "invalid msgpack body: FormatError"),
    "trailing bytes": ([encode(ADD)[0] + b"\x00"], "msgpack", "invalid msgpack body"),
    "no frames": ([], "frames", "no frames"),
    "bad dtype": ([tensor_body("complex64", [2], b"\0" * 16)], "dtype", "dtype 'complex64' is not in the allow-list"),
    "shape/bytes mismatch": (
        [tensor_body("bfloat16", [10], 1), b"\0" * 19], "tensor",
        "HandOff.kv_layers[0]: shape [10] of bfloat16 needs 20 bytes, got 19"),
    "negative dim": ([tensor_body("int8", [-1], b"")], "tensor", "shape must be"),
    "huge dim of an empty tensor": ([tensor_body("int8", [0, 2**63], b"")], "tensor", "shape must be"),
    "too many dims": ([tensor_body("int8", [1] * 9, b"\0")], "tensor", "shape must be at most 8 sizes"),
    "frame missing": ([tensor_body("int8", [4], 2), b"\0" * 4], "frames", "bad frame reference 2"),
    "frame not referenced": (encode(ADD) + [b"stray"], "frames", "1 extra frame(s) not referenced"),
}


@pytest.mark.parametrize("frames, kind, reason", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_malformed_messages_raise_protocol_error_with_a_clear_reason(frames, kind, reason):
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    assert reason in str(err.value) and err.value.kind == kind
    assert "\n" not in str(err.value)


def test_corrupted_bytes_never_raise_anything_but_protocol_error():
    rng = random.Random(0)
    kv = HandOff("r", [1], 1, [], SAMPLING, [torch.ones(3, 5, dtype=torch.bfloat16), torch.zeros(5000).to(torch.int8)])
    for msg in [*EXAMPLES, kv]:
        frames = [bytes(f) for f in encode(msg)]
        for _ in range(500):
            body = bytearray(frames[0])
            body[rng.randrange(len(body))] = rng.randrange(256)
            body = body[: rng.randrange(len(body) // 2, len(body) + 1)]
            try:
                decode([bytes(body), *frames[1:]])
            except ProtocolError:
                pass


def test_oversized_messages_are_refused_on_both_ends():
    big = AddRequest("r", list(range(1000)), SAMPLING, [])
    frames = encode(big)
    with pytest.raises(ProtocolError, match=r"over the 1000-byte limit") as err:
        decode(frames, max_bytes=1000)
    assert err.value.kind == "size"
    with pytest.raises(ProtocolError, match=r"AddRequest is \d+ bytes, over the 1000-byte limit"):
        encode(big, max_bytes=1000)
    tensor = HandOff("r", [1], 1, [], SAMPLING, [torch.zeros(1 << 20, dtype=torch.uint8)])
    with pytest.raises(ProtocolError, match="over the"):
        decode(encode(tensor), max_bytes=1 << 20)


def test_encoding_refuses_what_cannot_travel():
    with pytest.raises(ProtocolError, match="dict is not a pipeline message"):
        encode({"request_id": "r"})
    with pytest.raises(ProtocolError, match="dtype torch.complex64 is not allowed"):
        encode(HandOff("r", [1], 1, [], SAMPLING, [torch.zeros(2, dtype=torch.complex64)]))
    with pytest.raises(ProtocolError, match="AddRequest: cannot encode"):
        encode(AddRequest("r", [2**70], SAMPLING, []))


def test_a_pickle_payload_is_refused_not_unpickled():
    payload = pickle.dumps(AbortRequest("r"))
    with pytest.raises(ProtocolError):
        decode([payload])


@pytest.mark.parametrize("module", [protocol_pipeline, wire, zmq_queues], ids=lambda m: m.__name__)
def test_no_pickle_anywhere_in_the_protocol_code(module):
    tree = ast.parse(inspect.getsource(module))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"pickle", "send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized"}
