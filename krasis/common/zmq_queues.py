"""Typed message queues over ZeroMQ: PUSH/PULL and PUB/SUB, blocking and asyncio (for the gateway).

`put` sends a pipeline message as wire frames (large tensors zero-copy); `get` returns the next valid one,
dropping malformed messages (logged once per kind of fault, counted in `dropped`): a bad peer never crashes
the receiver. A socket belongs to one thread (or one event loop) and to one consumer.
"""

import logging
import os
import re
import time

import zmq
import zmq.asyncio

from krasis.common.protocol_pipeline import Message
from krasis.common.wire import DEFAULT_MAX_MESSAGE_BYTES, ProtocolError, decode, encode

log = logging.getLogger("krasis.zmq")

ENDPOINT_SCHEMES = ("ipc://", "tcp://", "inproc://")
MAX_IPC_PATH_BYTES = 107  # sockaddr_un.sun_path (108) less the terminating NUL


def ipc_endpoint(run_dir: str | os.PathLike, name: str) -> str:
    """`ipc://<run_dir>/<name>.sock`; ValueError when the name is odd or the path too long for a unix socket."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"endpoint name {name!r}: use letters, digits, '_', '.' or '-'")
    path = os.path.join(os.path.abspath(run_dir), f"{name}.sock")
    if len(os.fsencode(path)) > MAX_IPC_PATH_BYTES:
        raise ValueError(f"ipc socket path {path} is over {MAX_IPC_PATH_BYTES} bytes: use a shorter run directory")
    return f"ipc://{path}"


class _Queue:
    """One socket, bound or connected to `endpoint`, closed with linger 0. `endpoint` is the resolved address
    after bind (`tcp://127.0.0.1:*` gets its port)."""

    SOCKET_TYPE: int
    CONTEXT: type[zmq.Context] = zmq.Context

    def __init__(self, endpoint: str, bind: bool, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        if not endpoint.startswith(ENDPOINT_SCHEMES):
            raise ValueError(f"endpoint {endpoint!r}: must start with one of {', '.join(ENDPOINT_SCHEMES)}")
        self.max_bytes = max_bytes
        self._zero_copy: list[zmq.MessageTracker] = []  # sends whose frames libzmq may still be reading
        self.socket = self.CONTEXT.instance().socket(self.SOCKET_TYPE)
        self.socket.setsockopt(zmq.LINGER, 0)
        self._configure()
        try:
            (self.socket.bind if bind else self.socket.connect)(endpoint)
        except zmq.ZMQError as e:
            self.socket.close(linger=0)
            raise OSError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {e}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint

    def _configure(self) -> None:
        pass

    def close(self, linger_s: float = 0.0) -> None:
        """Drop unsent messages (a dead peer must not hold up shutdown), or try for `linger_s` seconds. Zero-copy
        sends are waited for within that time, else dropped too: when the process exits, pyzmq lets go of the memory
        they read (its garbage thread's atexit) whether libzmq has sent it or not, and a frame sent from freed memory
        carries what the allocator wrote there (the likely cause of a test's tensor whose first bytes arrived as
        garbage, 3 runs in 37 on a loaded box)."""
        deadline = time.monotonic() + linger_s
        try:
            for tracker in self._zero_copy if linger_s > 0 else ():
                tracker.wait(max(0.0, deadline - time.monotonic()))
        except zmq.NotDone:
            deadline = time.monotonic()
        self.socket.close(linger=round(max(0.0, deadline - time.monotonic()) * 1000))

    def _sends_zero_copy(self, frames: list) -> bool:
        """Whether pyzmq sends `frames` without a copy (it copies frames under zmq.COPY_THRESHOLD bytes)."""
        return any(memoryview(f).nbytes >= zmq.COPY_THRESHOLD for f in frames)

    def _track(self, tracker: "zmq.MessageTracker | None") -> None:
        if tracker is not None:
            self._zero_copy = [t for t in self._zero_copy if not t.done] + [tracker]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Receiver(_Queue):
    """Decodes what arrives; malformed messages are dropped, counted, and logged once per kind of fault."""

    def _configure(self) -> None:
        self.dropped = 0
        self._logged_kinds: set[str] = set()
        # A frame over the limit would be dropped anyway; libzmq then cuts that peer off instead of buffering it.
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)

    def _decode(self, frames: list) -> Message | None:
        # Tensor frames are copied once out of ZeroMQ's receive buffers into memory the tensors own: a tensor wrapping
        # a received frame was seen overwritten by the allocator once its peer had gone and the socket closed (the
        # start of the buffer held free-list pointers), so decoded tensors never borrow ZeroMQ's memory.
        frames = frames[:1] + [bytearray(f.buffer) if isinstance(f, zmq.Frame) else f for f in frames[1:]]
        try:
            return decode(frames, self.max_bytes)
        except ProtocolError as e:
            self.dropped += 1
            if e.kind not in self._logged_kinds:
                self._logged_kinds.add(e.kind)
                log.warning("%s: dropped a malformed message: %s (more like it are only counted)", self.endpoint, e)
            return None


def _poll_ms(deadline: float | None) -> int | None:
    return None if deadline is None else max(0, round((deadline - time.monotonic()) * 1000))


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _full(endpoint: str, timeout: float) -> TimeoutError:
    return TimeoutError(f"{endpoint}: could not send within {timeout} s (no peer, or the peer is not reading)")


class PushQueue(_Queue):
    """Sends messages to PULL peers, round-robin. Tensors go zero-copy: don't change them until sent."""

    SOCKET_TYPE = zmq.PUSH

    def put(self, msg: Message, timeout: float | None = None) -> None:
        """Send `msg`; blocks while no peer can take it, or raises TimeoutError after `timeout` seconds."""
        frames = encode(msg, self.max_bytes)
        if timeout is not None and not self.socket.poll(_poll_ms(_deadline(timeout)), zmq.POLLOUT):
            raise _full(self.endpoint, timeout)
        self._track(self.socket.send_multipart(frames, copy=False, track=self._sends_zero_copy(frames)))


class PullQueue(_Receiver):
    """Receives messages from PUSH peers (fair-queued)."""

    SOCKET_TYPE = zmq.PULL

    def get(self, timeout: float | None = None) -> Message | None:
        """The next valid message, or None after `timeout` seconds (None: wait for ever)."""
        deadline = _deadline(timeout)
        while self.socket.poll(_poll_ms(deadline)):
            msg = self._decode(self.socket.recv_multipart(copy=False))
            if msg is not None:
                return msg
        return None

    def get_nowait(self) -> Message | None:
        return self.get(0)


class PubQueue(PushQueue):
    """Sends every message to every SUB peer; peers that joined late or lag past the high-water mark miss it."""

    SOCKET_TYPE = zmq.PUB


class SubQueue(PullQueue):
    """Receives everything a PUB peer sends."""

    SOCKET_TYPE = zmq.SUB

    def _configure(self) -> None:
        super()._configure()
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")


class AsyncPushQueue(_Queue):
    """PushQueue for an asyncio event loop."""

    SOCKET_TYPE = zmq.PUSH
    CONTEXT = zmq.asyncio.Context

    async def put(self, msg: Message, timeout: float | None = None) -> None:
        frames = encode(msg, self.max_bytes)
        if timeout is not None and not await self.socket.poll(_poll_ms(_deadline(timeout)), zmq.POLLOUT):
            raise _full(self.endpoint, timeout)
        self._track(await self.socket.send_multipart(frames, copy=False, track=self._sends_zero_copy(frames)))


class AsyncPeerPushQueue(AsyncPushQueue):
    """AsyncPushQueue connected to one peer (on another host) that never reconnects: `await disconnected()`
    returns once the connection is lost (the peer exited or closed its socket, or its host reset the link), so
    a message can never reach a later process that bound the same address. At most PEER_SEND_HWM messages queue.
    """

    PEER_SEND_HWM = 16  # large SequenceKV chunks: a slow link holds back the sender, not gigabytes of buffers

    def _configure(self) -> None:
        self.socket.setsockopt(zmq.RECONNECT_IVL, -1)
        self.socket.setsockopt(zmq.SNDHWM, self.PEER_SEND_HWM)
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)

    async def disconnected(self) -> str:
        """Wait for the connection to go; returns the event's name."""
        from zmq.utils.monitor import parse_monitor_message

        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                return zmq.Event(event).name

    def close(self, linger_s: float = 0.0) -> None:
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:
            pass  # already closed
        self._monitor.close(linger=0)
        super().close(linger_s)


class AsyncPullQueue(_Receiver):
    """PullQueue for an asyncio event loop; `await get(0)` does not wait."""

    SOCKET_TYPE = zmq.PULL
    CONTEXT = zmq.asyncio.Context

    async def get(self, timeout: float | None = None) -> Message | None:
        if timeout is None:  # no poll first: recv takes a queued message at once, else waits on the socket's fd
            while (msg := self._decode(await self.socket.recv_multipart(copy=False))) is None:
                pass
            return msg
        deadline = _deadline(timeout)
        while await self.socket.poll(_poll_ms(deadline)):
            msg = self._decode(await self.socket.recv_multipart(copy=False))
            if msg is not None:
                return msg
        return None


class AsyncPubQueue(AsyncPushQueue):
    """PubQueue for an asyncio event loop."""

    SOCKET_TYPE = zmq.PUB


class AsyncSubQueue(AsyncPullQueue):
    """SubQueue for an asyncio event loop."""

    SOCKET_TYPE = zmq.SUB

    def _configure(self) -> None:
        super()._configure()
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
