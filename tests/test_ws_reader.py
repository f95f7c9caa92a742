"""The bounded WebSocket client-frame reader (blueprints/ws_reader.py).

Client frames are built here byte by byte (masked, as RFC 6455 §5.3 requires of a
client) and fed both from memory (`io.BytesIO.read`) and through a real socket pair read
with a buffered `makefile("rb").read`, as gevent-websocket's `ws.raw_read` reads. The
liveness tests stream 60 MiB through a socket pair, and over a quarter of a second from a
`read` that never blocks, while a ticker greenlet measures how long the event loop is held.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import struct
import time

import gevent
import pytest
from gevent import socket as gsocket

from blueprints import ws_reader
from blueprints.ws_reader import (
    OPCODE_BINARY,
    OPCODE_CLOSE,
    OPCODE_CONTINUATION,
    OPCODE_PING,
    OPCODE_PONG,
    OPCODE_TEXT,
    Close,
    Message,
    MessageTooBig,
    Ping,
    Pong,
    ProtocolError,
    WebSocketReadError,
    read_client_frames,
)

MASK = b"\x37\xfa\x21\x3d"
MIB = 1 << 20
# The liveness tests below print the largest gap a ticker greenlet saw (a figure, measured
# properly by `python -m bench.attacks`); they assert only what does not depend on the
# machine's speed: the results, and that the reader let the ticker run at all.


# ----------------------------------------------------------------------------- helpers


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """Masking as RFC 6455 §5.3 defines it, one byte at a time (the reader does it differently)."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def client_frame(
    opcode: int, payload: bytes = b"", fin: bool = True, mask: bytes | None = MASK, rsv: int = 0
) -> bytes:
    """One frame as a client sends it; `mask=None` leaves it unmasked, `rsv` is 0..7 (RSV1..3)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if mask is None:
        return header + payload
    return header + mask + apply_mask(payload, mask)


def close_body(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class CountingReader:
    """`read` over bytes, remembering every call and how far the reader got."""

    def __init__(self, data: bytes, max_piece: int | None = None):
        self.stream = io.BytesIO(data)
        self.max_piece = max_piece
        self.calls: list[int] = []

    def read(self, n: int) -> bytes:
        self.calls.append(n)
        if self.max_piece is not None:
            n = min(n, self.max_piece)
        return self.stream.read(n)

    @property
    def consumed(self) -> int:
        return self.stream.tell()


def events(data: bytes, max_message_bytes: int = MIB, **kw) -> list:
    return list(read_client_frames(io.BytesIO(data).read, max_message_bytes, **kw))


def socket_events(data: bytes, max_message_bytes: int = MIB, piece: int = 7) -> list:
    """Events read through a socket pair: a greenlet writes `data` in `piece`-byte sends."""
    a, b = gsocket.socketpair()

    def writer():
        try:
            for i in range(0, len(data), piece):
                a.sendall(data[i : i + piece])
                gevent.sleep(0)
        finally:
            a.close()

    w = gevent.spawn(writer)
    rfile = b.makefile("rb")
    try:
        return list(read_client_frames(rfile.read, max_message_bytes))
    finally:
        w.kill()
        rfile.close()
        b.close()


def raises(data: bytes, max_message_bytes: int = MIB) -> WebSocketReadError:
    with pytest.raises(WebSocketReadError) as info:
        events(data, max_message_bytes)
    return info.value


# ----------------------------------------------------------------------------- events and errors


def test_events_are_small_immutable_values():
    assert Ping(b"a") == Ping(b"a")
    assert Ping(b"a") != Pong(b"a")
    for event in (Ping(b"a"), Pong(b""), Close(1000, ""), Message(OPCODE_TEXT, 3)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, dataclasses.fields(event)[0].name, None)
        with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
            event.extra = 1  # type: ignore[attr-defined]
        assert not hasattr(event, "__dict__")


def test_exceptions_carry_code_and_reason():
    too_big = MessageTooBig("too big")
    assert isinstance(too_big, WebSocketReadError) and (too_big.code, too_big.reason) == (1009, "too big")
    assert (ProtocolError("bad").code, ProtocolError("bad", 1007).code) == (1002, 1007)
    assert str(ProtocolError("bad")) == "bad (1002)"
    assert issubclass(WebSocketReadError, Exception) and not issubclass(MessageTooBig, ProtocolError)


# ----------------------------------------------------------------------------- control frames


@pytest.mark.parametrize(
    "mask", [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x03\x04", MASK, os.urandom(4)]
)
def test_ping_and_pong_payloads_are_unmasked(mask):
    payloads = [os.urandom(n) for n in range(126)]
    data = b"".join(
        client_frame(OPCODE_PING, p, mask=mask) + client_frame(OPCODE_PONG, p[::-1], mask=mask)
        for p in payloads
    )
    expected = [e for p in payloads for e in (Ping(p), Pong(p[::-1]))]
    assert events(data) == expected
    assert socket_events(data, piece=997) == expected


def test_unmask_matches_the_reference():
    for n in (1, 2, 3, 4, 5, 124, 125):
        payload = os.urandom(n)
        assert ws_reader._unmask(apply_mask(payload, MASK), MASK) == payload
    assert ws_reader._unmask(b"\x00\x00", b"\x00\xff\x00\xff") == b"\x00\xff"  # leading zero bytes kept


def test_close_without_body():
    assert events(client_frame(OPCODE_CLOSE)) == [Close(None, "")]


def test_close_with_code_only_and_with_reason():
    assert events(client_frame(OPCODE_CLOSE, close_body(1000))) == [Close(1000, "")]
    reason = "bye \u2713 \u00e9t\u00e9"
    assert events(client_frame(OPCODE_CLOSE, close_body(1001, reason.encode()))) == [Close(1001, reason)]
    longest = "r" * 123
    frame = client_frame(OPCODE_CLOSE, close_body(4999, longest.encode()))
    assert socket_events(frame) == [Close(4999, longest)]


VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_valid_close_codes(code):
    assert events(client_frame(OPCODE_CLOSE, close_body(code, b"x"))) == [Close(code, "x")]


def test_the_reader_stops_after_a_close():
    data = client_frame(OPCODE_CLOSE, close_body(1000)) + client_frame(OPCODE_PING, b"late")
    reader = CountingReader(data)
    assert list(read_client_frames(reader.read, MIB)) == [Close(1000, "")]
    assert reader.consumed == len(client_frame(OPCODE_CLOSE, close_body(1000)))


# ----------------------------------------------------------------------------- data messages


def test_text_and_binary_messages():
    data = (
        client_frame(OPCODE_TEXT, "h\u00e9llo".encode())
        + client_frame(OPCODE_BINARY, bytes(range(256)))
        + client_frame(OPCODE_TEXT)
        + client_frame(OPCODE_BINARY, b"\x00")
    )
    expected = [
        Message(OPCODE_TEXT, 6),
        Message(OPCODE_BINARY, 256),
        Message(OPCODE_TEXT, 0),
        Message(OPCODE_BINARY, 1),
    ]
    assert events(data) == expected
    assert socket_events(data) == expected


def test_text_payloads_are_not_decoded():
    assert events(client_frame(OPCODE_TEXT, b"\xff\xfe not utf-8")) == [Message(OPCODE_TEXT, 12)]


def test_fragmented_messages_sum_their_fragments():
    data = (
        client_frame(OPCODE_TEXT, b"abc", fin=False)
        + client_frame(OPCODE_CONTINUATION, b"de", fin=False)
        + client_frame(OPCODE_CONTINUATION, b"", fin=False)
        + client_frame(OPCODE_CONTINUATION, b"f")
        + client_frame(OPCODE_BINARY, b"x" * 300, fin=False)
        + client_frame(OPCODE_CONTINUATION, b"y" * 70000)
    )
    expected = [Message(OPCODE_TEXT, 6), Message(OPCODE_BINARY, 70300)]
    assert events(data) == expected
    assert socket_events(data, piece=4093) == expected


def test_control_frames_between_fragments():
    data = (
        client_frame(OPCODE_TEXT, b"abc", fin=False)
        + client_frame(OPCODE_PING, b"p" * 125)
        + client_frame(OPCODE_CONTINUATION, b"de", fin=False)
        + client_frame(OPCODE_PONG)
        + client_frame(OPCODE_CONTINUATION, b"f")
        + client_frame(OPCODE_PING, b"after")
    )
    expected = [Ping(b"p" * 125), Pong(b""), Message(OPCODE_TEXT, 6), Ping(b"after")]
    assert events(data, max_message_bytes=6) == expected  # control payloads do not count
    assert socket_events(data, max_message_bytes=6) == expected


def test_a_close_inside_a_fragmented_message():
    data = client_frame(OPCODE_BINARY, b"abc", fin=False) + client_frame(OPCODE_CLOSE, close_body(1000))
    assert events(data) == [Close(1000, "")]


@pytest.mark.parametrize("size", [125, 126, 127, 200, 65535, 65536, 70000])
def test_extended_lengths(size):
    frame = client_frame(OPCODE_BINARY, os.urandom(size))
    header = 2 + (0 if size < 126 else 2 if size < 65536 else 8) + 4
    assert len(frame) == header + size
    assert events(frame) == [Message(OPCODE_BINARY, size)]
    assert events(client_frame(OPCODE_PING) + frame + client_frame(OPCODE_PING, b"z")) == [
        Ping(b""),
        Message(OPCODE_BINARY, size),
        Ping(b"z"),
    ]


def test_payloads_are_read_in_chunks_with_a_yield_after_each(monkeypatch):
    trace = []
    reader = CountingReader(client_frame(OPCODE_BINARY, b"q" * 5000) + client_frame(OPCODE_PING, b"hi"))

    def read(n):
        trace.append(("read", n))
        return reader.read(n)

    monkeypatch.setattr(gevent, "sleep", lambda seconds=0: trace.append(("sleep", seconds)))
    assert list(read_client_frames(read, MIB, chunk=1000)) == [Message(OPCODE_BINARY, 5000), Ping(b"hi")]
    pieces = [("read", 1000), ("sleep", 0)] * 5
    assert trace == (
        [("read", 2), ("read", 2), ("read", 4)]
        + pieces
        + [("sleep", 0)]
        + [("read", 2), ("read", 4), ("read", 2), ("sleep", 0)]
        + [("read", 2)]
    )


def test_short_reads_are_read_again():
    data = (
        client_frame(OPCODE_PING, b"ping me")
        + client_frame(OPCODE_TEXT, b"t" * 300, fin=False)
        + client_frame(OPCODE_CONTINUATION, b"u" * 70000)
        + client_frame(OPCODE_CLOSE, close_body(1000, b"ok"))
    )
    expected = [Ping(b"ping me"), Message(OPCODE_TEXT, 70300), Close(1000, "ok")]
    for piece in (1, 3, 4096):
        reader = CountingReader(data, max_piece=piece)
        assert list(read_client_frames(reader.read, MIB)) == expected
        assert reader.consumed == len(data)


# ----------------------------------------------------------------------------- the size limit


@pytest.mark.parametrize("limit", [0, 10, 125, 126, 65535, 65536, 70000])
def test_a_message_of_exactly_the_limit_is_fine(limit):
    assert events(client_frame(OPCODE_BINARY, b"x" * limit), max_message_bytes=limit) == [
        Message(OPCODE_BINARY, limit)
    ]


@pytest.mark.parametrize("limit", [0, 10, 125, 126, 65535, 65536, 70000])
def test_one_byte_over_the_limit_raises_before_the_payload(limit):
    frame = client_frame(OPCODE_TEXT, b"x" * (limit + 1))
    length_bytes = 2 + (0 if limit + 1 < 126 else 2 if limit + 1 < 65536 else 8)
    reader = CountingReader(client_frame(OPCODE_PING, b"first") + frame)
    gen = read_client_frames(reader.read, limit)
    assert next(gen) == Ping(b"first")
    with pytest.raises(MessageTooBig) as info:
        next(gen)
    assert info.value.code == 1009
    # Only the first two bytes and the extended length: not the mask key, not the payload.
    assert reader.consumed == len(client_frame(OPCODE_PING, b"first")) + length_bytes


def test_a_fragmented_message_raises_at_the_crossing_fragment():
    fragments = [
        client_frame(OPCODE_BINARY, b"a" * 40, fin=False),
        client_frame(OPCODE_PING, b"mid"),
        client_frame(OPCODE_CONTINUATION, b"b" * 60, fin=False),  # 100: exactly the limit so far
        client_frame(OPCODE_CONTINUATION, b"", fin=False),
    ]  # still 100
    crossing = client_frame(OPCODE_CONTINUATION, b"c", fin=True)  # 101
    reader = CountingReader(b"".join(fragments) + crossing)
    seen = []
    with pytest.raises(MessageTooBig):
        for event in read_client_frames(reader.read, 100):
            seen.append(event)
    assert seen == [Ping(b"mid")]
    assert reader.consumed == len(b"".join(fragments)) + 2


def test_a_completed_message_resets_the_size():
    data = client_frame(OPCODE_TEXT, b"a" * 60, fin=False) + client_frame(OPCODE_CONTINUATION, b"b" * 40)
    assert events(data * 3, max_message_bytes=100) == [Message(OPCODE_TEXT, 100)] * 3


def test_a_huge_declared_length_raises_without_reading():
    header = struct.pack("!BBQ", 0x82, 0x80 | 127, (1 << 63) - 1) + MASK
    reader = CountingReader(header + b"\x00" * 1000)
    with pytest.raises(MessageTooBig):
        list(read_client_frames(reader.read, MIB))
    assert reader.consumed == 10


# ----------------------------------------------------------------------------- protocol errors


PROTOCOL_ERRORS = {
    "unmasked text": client_frame(OPCODE_TEXT, b"hi", mask=None),
    "unmasked ping": client_frame(OPCODE_PING, b"hi", mask=None),
    "unmasked close": client_frame(OPCODE_CLOSE, close_body(1000), mask=None),
    "rsv1": client_frame(OPCODE_TEXT, b"hi", rsv=4),
    "rsv2": client_frame(OPCODE_BINARY, b"hi", rsv=2),
    "rsv3": client_frame(OPCODE_PING, b"hi", rsv=1),
    "all rsv": client_frame(OPCODE_CONTINUATION, b"hi", rsv=7),
    **{f"opcode {op:#x}": client_frame(op, b"hi") for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)},
    "ping of 126": client_frame(OPCODE_PING, b"p" * 126),
    "pong of 70000": client_frame(OPCODE_PONG, b"p" * 70000),
    "close of 126": client_frame(OPCODE_CLOSE, close_body(1000, b"r" * 124)),
    "fragmented ping": client_frame(OPCODE_PING, b"p", fin=False),
    "fragmented close": client_frame(OPCODE_CLOSE, close_body(1000), fin=False),
    "fragmented pong": client_frame(OPCODE_PONG, fin=False) + client_frame(OPCODE_CONTINUATION, b"x"),
    "continuation first": client_frame(OPCODE_CONTINUATION, b"x"),
    "continuation after a message": client_frame(OPCODE_TEXT, b"x") + client_frame(OPCODE_CONTINUATION, b"y"),
    "text inside a message": client_frame(OPCODE_TEXT, b"x", fin=False) + client_frame(OPCODE_TEXT, b"y"),
    "binary inside a message": client_frame(OPCODE_TEXT, b"x", fin=False) + client_frame(OPCODE_BINARY, b"y"),
    "text after ping inside": (
        client_frame(OPCODE_BINARY, b"x", fin=False)
        + client_frame(OPCODE_PING)
        + client_frame(OPCODE_TEXT, b"y", fin=False)
    ),
    "64-bit top bit": struct.pack("!BBQ", 0x82, 0x80 | 127, 1 << 63) + MASK,
    "64-bit all ones": struct.pack("!BBQ", 0x81, 0x80 | 127, (1 << 64) - 1) + MASK,
    "close of 1 byte": client_frame(OPCODE_CLOSE, b"\x03"),
    **{
        f"close code {code}": client_frame(OPCODE_CLOSE, close_body(code))
        for code in (0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535)
    },
}


@pytest.mark.parametrize("data", PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
def test_protocol_errors(data):
    error = raises(data, max_message_bytes=1 << 62)
    assert isinstance(error, ProtocolError)
    assert error.code == 1002
    assert error.reason and len(error.reason.encode()) <= 123 and error.reason.isascii()


@pytest.mark.parametrize("reason", [b"\xff", b"ok \xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_a_close_reason_that_is_not_utf8(reason):
    error = raises(client_frame(OPCODE_CLOSE, close_body(1000, reason)))
    assert isinstance(error, ProtocolError) and error.code == 1007


def test_protocol_errors_through_a_socket():
    with pytest.raises(ProtocolError):
        socket_events(client_frame(OPCODE_PING, b"ok") + client_frame(OPCODE_TEXT, b"x", mask=None))


def test_events_before_an_error_are_delivered():
    data = client_frame(OPCODE_PING, b"1") + client_frame(OPCODE_PING, b"2", rsv=4)
    gen = read_client_frames(io.BytesIO(data).read, MIB)
    assert next(gen) == Ping(b"1")
    with pytest.raises(ProtocolError):
        next(gen)


# ----------------------------------------------------------------------------- end of file


EOF_FRAMES = {
    "empty ping": client_frame(OPCODE_PING),
    "ping": client_frame(OPCODE_PING, b"hello"),
    "close": client_frame(OPCODE_CLOSE, close_body(1000, b"bye")),
    "text": client_frame(OPCODE_TEXT, b"0123456789"),
    "binary 126": client_frame(OPCODE_BINARY, b"b" * 300),
    "binary 127": client_frame(OPCODE_BINARY, b"c" * 70000),
    "fragmented": (
        client_frame(OPCODE_TEXT, b"abc", fin=False) + client_frame(OPCODE_CONTINUATION, b"d" * 200)
    ),
}


@pytest.mark.parametrize("frame", EOF_FRAMES.values(), ids=EOF_FRAMES.keys())
def test_eof_anywhere_in_a_frame_ends_quietly(frame):
    # Every cut in the header, extended length and mask, and some in the payload.
    cuts = set(range(min(len(frame), 40))) | {len(frame) // 2, len(frame) - 2, len(frame) - 1}
    for cut in sorted(c for c in cuts if 0 <= c < len(frame)):
        assert events(frame[:cut]) == [], cut
        assert events(client_frame(OPCODE_PONG, b"before") + frame[:cut]) == [Pong(b"before")], cut
        assert list(read_client_frames(CountingReader(frame[:cut], max_piece=3).read, MIB)) == [], cut


def test_eof_through_a_socket_mid_payload():
    data = client_frame(OPCODE_PING, b"x") + client_frame(OPCODE_BINARY, b"y" * 100000)[:50000]
    assert socket_events(data, piece=8192) == [Ping(b"x")]
    assert socket_events(b"") == []


# ----------------------------------------------------------------------------- liveness


def with_ticker(work):
    """Run `work()` while a greenlet sleeps 1 ms in a loop.

    Returns work's result, the largest time the ticker could not run (between two of its
    wake-ups, or between the start or end of the work and the nearest wake-up), how long
    the work took, and how many times the ticker woke up during it.
    """
    stamps = []

    def ticker():
        while True:
            gevent.sleep(0.001)
            stamps.append(time.perf_counter())

    tick = gevent.spawn(ticker)
    gevent.sleep(0.005)
    start = time.perf_counter()
    try:
        result = work()
    finally:
        end = time.perf_counter()
        gevent.sleep(0.003)
        tick.kill()
    inside = [t for t in stamps if start < t < end]
    edges = [
        max([t for t in stamps if t <= start], default=start),
        *inside,
        min([t for t in stamps if t >= end], default=end),
    ]
    gap = max(b - a for a, b in itertools.pairwise(edges))
    return result, gap, end - start, len(inside)


def test_the_ticker_sees_a_greenlet_that_does_not_yield():
    def hog():
        deadline = time.perf_counter() + 0.08
        while time.perf_counter() < deadline:
            pass

    _, gap, _, ticks = with_ticker(hog)
    assert gap >= 0.08 and ticks == 0


def stream_through_socketpair(frames, max_message_bytes):
    """A greenlet sends `frames` (an iterable of bytes) as fast as it can; the reader
    collects the events, or the exception it raised."""
    a, b = gsocket.socketpair()

    def writer():
        try:
            for frame in frames:
                a.sendall(frame)
        finally:
            a.close()

    w = gevent.spawn(writer)
    rfile = b.makefile("rb")
    try:
        return list(read_client_frames(rfile.read, max_message_bytes))
    except WebSocketReadError as exc:
        return exc
    finally:
        w.kill()
        rfile.close()
        b.close()


def masked_block(size: int) -> bytes:
    return apply_mask(os.urandom(size), MASK)


def test_liveness_60_mib_in_messages_just_under_the_limit(capsys):
    limit = 64 * 1024
    size = limit - 1  # the largest message allowed below the limit (16-bit extended length)
    count = -(-60 * MIB // size)
    frame = client_frame(OPCODE_BINARY, os.urandom(size))
    ping = client_frame(OPCODE_PING, b"still here")

    def frames():
        for i in range(1, count + 1):
            yield frame
            if i % 100 == 0:
                yield ping

    result, gap, elapsed, ticks = with_ticker(lambda: stream_through_socketpair(frames(), limit))
    assert isinstance(result, list)
    assert result.count(Message(OPCODE_BINARY, size)) == count >= 960
    assert result.count(Ping(b"still here")) == count // 100
    with capsys.disabled():
        print(
            f"\n[ws_reader] 60 MiB in {count} messages of {size} B: {elapsed:.3f} s, largest ticker gap "
            f"{gap * 1000:.2f} ms, {ticks} ticks"
        )


class AlwaysReady:
    """`read` over copies of `frame` that never blocks, for `seconds`: a socket whose buffer
    a fast client keeps full, so reading alone never gives other greenlets a turn."""

    def __init__(self, frame: bytes, seconds: float):
        self.frame = memoryview(frame)
        self.pos = len(frame)
        self.seconds = seconds
        self.deadline = None
        self.frames = 0

    def read(self, n: int) -> bytes:
        if self.deadline is None:
            self.deadline = time.perf_counter() + self.seconds
        if self.pos == len(self.frame):
            if time.perf_counter() > self.deadline:
                return b""
            self.frames += 1
            self.pos = 0
        piece = self.frame[self.pos : self.pos + n]
        self.pos += len(piece)
        return bytes(piece)


def test_liveness_a_client_that_keeps_the_buffer_full(capsys):
    limit = 64 * 1024
    source = AlwaysReady(client_frame(OPCODE_TEXT, os.urandom(limit - 1)), seconds=0.25)
    result, gap, elapsed, ticks = with_ticker(lambda: list(read_client_frames(source.read, limit)))
    assert result == [Message(OPCODE_TEXT, limit - 1)] * source.frames
    mib = source.frames * (limit - 1) / MIB
    with capsys.disabled():
        print(
            f"\n[ws_reader] never-blocking read for {elapsed:.3f} s: {mib:.0f} MiB in {source.frames} "
            f"messages, largest ticker gap {gap * 1000:.2f} ms, {ticks} ticks"
        )
    assert mib >= 60
    assert ticks >= 1  # read() never blocks here: only the reader's own yields let the ticker run


def test_liveness_60_mib_in_1_mib_continuation_frames(capsys):
    block = masked_block(MIB)  # the frame payload as sent, already masked

    def frames():
        yield struct.pack("!BB", OPCODE_BINARY, 0x80 | 4) + MASK + apply_mask(b"head", MASK)
        for i in range(60):
            yield struct.pack("!BBQ", 0x80 if i == 59 else 0, 0x80 | 127, MIB) + MASK
            yield block

    result, gap, elapsed, ticks = with_ticker(lambda: stream_through_socketpair(frames(), 64 * MIB))
    assert result == [Message(OPCODE_BINARY, 60 * MIB + 4)]
    with capsys.disabled():
        print(
            f"\n[ws_reader] 60 MiB in 60 x 1 MiB continuation frames: {elapsed:.3f} s, largest ticker gap "
            f"{gap * 1000:.2f} ms, {ticks} ticks"
        )


def test_liveness_one_60_mib_message_declared_up_front(capsys):
    block = masked_block(64 * 1024)

    def frames():
        yield struct.pack("!BBQ", 0x80 | OPCODE_BINARY, 0x80 | 127, 60 * MIB) + MASK
        for _ in range(60 * 16):
            yield block

    result, gap, elapsed, ticks = with_ticker(lambda: stream_through_socketpair(frames(), 64 * 1024))
    assert isinstance(result, MessageTooBig)
    with capsys.disabled():
        print(
            f"\n[ws_reader] one 60 MiB message declared: refused in {elapsed * 1000:.2f} ms, "
            f"largest ticker gap {gap * 1000:.2f} ms"
        )
    assert elapsed < 0.5
