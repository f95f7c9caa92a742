"""A bounded reader of the frames a WebSocket client sends (RFC 6455 §5), for a server
that ignores client data. Section numbers (§) below are RFC 6455's.

gevent-websocket's `ws.receive()` reads a whole message of any size into memory and
unmasks it one byte at a time in Python, holding the event loop the whole time: one
client sending large or endless messages stalls every other connection of the worker
and can exhaust its memory. `read_client_frames` instead

* never keeps a data message: its payload is read and dropped in pieces of at most
  `chunk` bytes, without unmasking, and only its size is reported;
* refuses a message that would exceed `max_message_bytes` as soon as a frame header
  says so, before reading that frame's payload;
* yields to other greenlets (`gevent.sleep(0)`) after every piece and every frame, so
  a client that always has data buffered cannot keep the reading greenlet running;
* unmasks only control payloads (at most 125 bytes), with one big-integer XOR.

Whoever iterates the generator answers pings, replies to the close and, on a
`WebSocketReadError`, closes the connection with the error's `code` and `reason`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gevent

OPCODE_CONTINUATION = 0x0
OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
OPCODE_PONG = 0xA

_DATA_OPCODES = frozenset((OPCODE_CONTINUATION, OPCODE_TEXT, OPCODE_BINARY))
_CONTROL_OPCODES = frozenset((OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG))
MAX_CONTROL_PAYLOAD = 125  # RFC 6455 §5.5


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping from the client; the answer is a pong with the same `payload` (§5.5.2)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """A pong from the client (solicited or not, §5.5.3)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The client's close frame (§5.5.1): `code` is None when the frame had no body."""

    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Message:
    """A complete data message whose payload was discarded: `opcode` is OPCODE_TEXT or
    OPCODE_BINARY (that of its first fragment), `size` the sum of its fragments' lengths."""

    opcode: int
    size: int


Event = Ping | Pong | Close | Message


# ----------------------------------------------------------------------------- errors


class WebSocketReadError(Exception):
    """The client broke a rule; close the connection with `code` and `reason`.

    `reason` is short ASCII, so it always fits a close frame's 123 bytes of reason.
    """

    def __init__(self, code: int, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} ({self.code})"


class MessageTooBig(WebSocketReadError):
    """A message would exceed the size limit (close code 1009, §7.4.1)."""

    def __init__(self, reason: str):
        super().__init__(1009, reason)


class ProtocolError(WebSocketReadError):
    """A frame that RFC 6455 forbids: code 1002, or 1007 for a close reason that is not UTF-8."""

    def __init__(self, reason: str, code: int = 1002):
        super().__init__(code, reason)


# ----------------------------------------------------------------------------- reader


def read_client_frames(
    read: Callable[[int], bytes], max_message_bytes: int, chunk: int = 65536
) -> Iterator[Event]:
    """Read client frames from `read` and yield Ping, Pong, Close and Message events.

    `read(n)` blocks and returns up to n bytes, b"" at end of file (gevent-websocket's
    `ws.raw_read`, a buffered `rfile.read`, returns n bytes unless at EOF; shorter reads
    are read again, so a raw `recv`-like callable works too). The generator returns at
    EOF, including in the middle of a frame: a truncated frame is just the end. It also
    returns after yielding a Close, since a client sends nothing after its close (§5.5.1).
    Exceptions from `read` itself (a reset connection) propagate.

    Raises MessageTooBig when a frame header shows that its message would exceed
    `max_message_bytes`, before that frame's mask key or payload is read, and
    ProtocolError for a frame the protocol forbids. Text payloads are not checked for
    UTF-8, because they are never looked at.
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    sleep = gevent.sleep
    message_opcode = None  # opcode of the data message in progress, if any
    message_size = 0

    while True:
        head = _read_exactly(read, 2)
        if head is None:
            return
        first, second = head[0], head[1]
        fin = first & 0x80
        opcode = first & 0x0F
        length = second & 0x7F

        # Everything in the first two bytes is checked before reading any further.
        if first & 0x70:
            raise ProtocolError("reserved bits set without an extension")
        if not second & 0x80:
            raise ProtocolError("client frame not masked")  # §5.1
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise ProtocolError("fragmented control frame")  # §5.5
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolError("control frame longer than 125 bytes")
        elif opcode == OPCODE_CONTINUATION:
            if message_opcode is None:
                raise ProtocolError("continuation frame without a message")  # §5.4
        elif opcode in _DATA_OPCODES:
            if message_opcode is not None:
                raise ProtocolError("new message inside a fragmented message")
        else:
            raise ProtocolError(f"unknown opcode {opcode:#x}")

        if length == 126:
            extended = _read_exactly(read, 2)
            if extended is None:
                return
            (length,) = struct.unpack("!H", extended)
        elif length == 127:
            extended = _read_exactly(read, 8)
            if extended is None:
                return
            (length,) = struct.unpack("!Q", extended)
            if length >> 63:
                raise ProtocolError("64-bit length with the most significant bit set")  # §5.2

        if opcode in _DATA_OPCODES and message_size + length > max_message_bytes:
            raise MessageTooBig(f"message larger than {max_message_bytes} bytes")

        mask = _read_exactly(read, 4)
        if mask is None:
            return

        if opcode in _CONTROL_OPCODES:
            payload = _read_exactly(read, length) if length else b""
            if payload is None:
                return
            payload = _unmask(payload, mask)
            if opcode == OPCODE_PING:
                yield Ping(payload)
            elif opcode == OPCODE_PONG:
                yield Pong(payload)
            else:
                yield _parse_close(payload)
                return
        else:
            remaining = length
            while remaining > 0:
                piece = read(min(chunk, remaining))
                if not piece:
                    return
                remaining -= len(piece)
                del piece
                sleep(0)
            if opcode != OPCODE_CONTINUATION:
                message_opcode = opcode
            message_size += length
            if fin:
                event = Message(message_opcode, message_size)
                message_opcode = None
                message_size = 0
                yield event
        sleep(0)


def _read_exactly(read: Callable[[int], bytes], n: int) -> bytes | None:
    """n bytes from `read` (n <= 125 here, so never a large buffer), or None at EOF."""
    data = read(n)
    if len(data) == n:
        return data
    if not data:
        return None
    parts = [data]
    got = len(data)
    while got < n:
        more = read(n - got)
        if not more:
            return None
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the repeated 4-byte `mask` (§5.3) as one integer operation."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _valid_close_code(code: int) -> bool:
    """Codes a client may send (§7.4.1, §7.4.2): 1004-1006 and 1015 are never sent."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999


def _parse_close(payload: bytes) -> Close:
    """A close body is empty, or a 2-byte code and a UTF-8 reason (§5.5.1)."""
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte body")
    (code,) = struct.unpack("!H", payload[:2])
    if not _valid_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not UTF-8", 1007) from None
    return Close(code, reason)
