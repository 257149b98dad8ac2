"""A mock WebSocket stream server built to never be the bottleneck of a client benchmark.

Every frame of the stream is encoded once, before the first connection, into one contiguous
buffer (unmasked server text frames followed by a close frame with code 1000). A connection gets
the upgrade handshake done by hand and then the buffer in large ``sendall`` calls, so the server
costs one kernel copy per byte and almost no Python per message. One connection is served at a
time; after the close frame the server waits for the client's close frame (or EOF) and prints
one JSON line about the connection on stdout, which lets a driver know the server is ready for
the next client.

Message bodies are JSON text of exactly ``size`` bytes::

    {"seq":17,"v":17,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..."}

With ``rate`` set, the stream is paced at that many messages per second and each body carries a
send time, patched into the frame right before it is written::

    {"seq":17,"t":1732360000123456789,"v":17,"pad":"xxxxxx..."}

``t`` is ``time.time_ns()`` (19 digits) so that a client computes ``time.time_ns() - t``.

A client may ask for a prefix of the stream with ``?count=K`` in the request path (K at most the
stream's count); every other path gets the whole stream.

Standalone use::

    python benches/stream_server.py --count 200000 --size 120
    # prints ws://127.0.0.1:PORT/ and serves one connection at a time until --idle-timeout
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from array import array
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "CLOSE_FRAME",
    "EncodedStream",
    "ServerProcess",
    "StreamConfig",
    "accept_key",
    "encode_stream",
    "message_body",
    "serve",
]

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Close frame from the server: FIN + opcode 8, payload = status code 1000.
CLOSE_FRAME = b"\x88\x02\x03\xe8"
STAMP_DIGITS = 19
_STAMP_PLACEHOLDER = b"1" + b"0" * (STAMP_DIGITS - 1)
_MAX_REQUEST = 16 * 1024


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """What a stream contains and how fast it is sent.

    Attributes:
        count: number of messages.
        size: payload bytes of every message (JSON text, padded to exactly this size).
        rate: messages per second; 0 sends as fast as the client reads.
    """

    count: int
    size: int = 120
    rate: float = 0.0

    @property
    def stamped(self) -> bool:
        """True when each message carries a send time (paced streams)."""
        return self.rate > 0


def message_body(seq: int, size: int, stamp: Optional[bytes] = None) -> bytes:
    """The JSON payload of message ``seq``, exactly ``size`` bytes long.

    Args:
        seq: position of the message in the stream, from 0.
        size: payload length in bytes.
        stamp: when given, a ``"t"`` field with these 19 digits follows ``"seq"``.
    """
    if stamp is None:
        head = b'{"seq":%d,"v":%d,"pad":"' % (seq, seq % 100)
    else:
        head = b'{"seq":%d,"t":%s,"v":%d,"pad":"' % (seq, stamp, seq % 100)
    pad = size - len(head) - 2
    if pad < 0:
        raise ValueError(f"size {size} is too small for message {seq}")
    return head + b"x" * pad + b'"}'


def _frame_header(length: int) -> bytes:
    """Header of an unmasked, final text frame with a payload of ``length`` bytes."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return bytes((0x81, 126)) + length.to_bytes(2, "big")
    return bytes((0x81, 127)) + length.to_bytes(8, "big")


@dataclasses.dataclass
class EncodedStream:
    """A whole stream, encoded once.

    Attributes:
        config: what was encoded.
        frames: every message frame back to back (all frames have the same length).
        frame_len: bytes per frame (header + payload).
        stamp_offsets: for stamped streams, where each frame's 19-digit send time starts.
    """

    config: StreamConfig
    frames: bytearray
    frame_len: int
    stamp_offsets: Optional[array] = None

    def wire_bytes(self, count: int) -> int:
        """Bytes a client reads for the first ``count`` messages, close frame included."""
        return count * self.frame_len + len(CLOSE_FRAME)


def encode_stream(config: StreamConfig) -> EncodedStream:
    """Encodes every frame of ``config`` into one buffer (the payload size is constant)."""
    if config.count < 1:
        raise ValueError("count must be at least 1")
    header = _frame_header(config.size)
    frame_len = len(header) + config.size
    frames = bytearray(frame_len * config.count)
    # The padding and closing quote, shared: a body is a short head plus a tail of this buffer.
    tail_source = memoryview(b"x" * config.size + b'"}')
    stamp = _STAMP_PLACEHOLDER if config.stamped else None
    offsets = array("q", bytes(8 * config.count)) if stamp is not None else None
    pos = 0
    for seq in range(config.count):
        if stamp is None:
            head = b'{"seq":%d,"v":%d,"pad":"' % (seq, seq % 100)
        else:
            prefix = b'{"seq":%d,"t":' % seq
            assert offsets is not None
            offsets[seq] = pos + len(header) + len(prefix)
            head = prefix + stamp + b',"v":%d,"pad":"' % (seq % 100)
        tail_len = config.size - len(head)
        if tail_len < 2:
            raise ValueError(f"size {config.size} is too small for message {seq}")
        end = pos + frame_len
        body_at = pos + len(header)
        frames[pos:body_at] = header
        frames[body_at : body_at + len(head)] = head
        frames[body_at + len(head) : end] = tail_source[len(tail_source) - tail_len :]
        pos = end
    return EncodedStream(config, frames, frame_len, offsets)


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key`` (RFC 6455)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode("ascii")


def _read_request(conn: socket.socket, timeout: float) -> tuple[str, dict[str, str]]:
    """Reads the HTTP upgrade request; returns its path and lower-cased headers."""
    conn.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data:
        if len(data) > _MAX_REQUEST or time.monotonic() > deadline:
            raise ValueError("no complete upgrade request")
        chunk = conn.recv(4096)
        if not chunk:
            raise ValueError("EOF before the end of the upgrade request")
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) < 3 or parts[0] != "GET":
        raise ValueError(f"not a GET request: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return parts[1], headers


def _handshake(conn: socket.socket, timeout: float) -> str:
    """Answers the upgrade with 101; returns the request path."""
    path, headers = _read_request(conn, timeout)
    key = headers.get("sec-websocket-key")
    if not key or headers.get("upgrade", "").lower() != "websocket":
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        raise ValueError("not a WebSocket upgrade")
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key).encode("ascii") + b"\r\n\r\n"
    )
    return path


def _wait_for_close(conn: socket.socket, timeout: float) -> str:
    """After our close frame: reads until the client's close frame or EOF, up to ``timeout``."""
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            return "timeout"
        except OSError as error:
            return f"error: {error}"
        if not chunk:
            return "eof"
        received += chunk
        if len(received) > 1 << 20:
            received = received[-(1 << 16) :]
        if _client_frames_closed(received):
            return "close"


def _client_frames_closed(data: bytes) -> bool:
    """True once ``data`` (client frames, from the start of what it sent) holds a close frame."""
    pos = 0
    end = len(data)
    while end - pos >= 2:
        opcode = data[pos] & 0x0F
        masked = data[pos + 1] & 0x80
        length = data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            length = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif length == 127:
            length = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
        if masked:
            pos += 4
        if opcode == 0x8 and pos <= end:
            return True
        pos += length
    return False


def _send_paced(conn: socket.socket, stream: EncodedStream, count: int, timeout: float) -> None:
    """Sends ``count`` frames at ``stream.config.rate``, stamping each just before it goes."""
    rate = stream.config.rate
    offsets = stream.stamp_offsets
    assert offsets is not None
    frames, flen = stream.frames, stream.frame_len
    view = memoryview(frames)
    start = time.perf_counter()
    deadline = start + count / rate + timeout
    sent = 0
    while sent < count:
        now = time.perf_counter()
        if now > deadline:
            raise TimeoutError("paced send fell behind by more than the send timeout")
        due = min(count, int((now - start) * rate) + 1)
        if due > sent:
            stamp = b"%019d" % time.time_ns()
            for seq in range(sent, due):
                at = offsets[seq]
                frames[at : at + STAMP_DIGITS] = stamp
            conn.sendall(view[sent * flen : due * flen])
            sent = due
        else:
            time.sleep(max(0.0, start + sent / rate - now))


def _requested_count(path: str, full: int) -> int:
    values = parse_qs(urlsplit(path).query).get("count")
    if not values:
        return full
    count = int(values[0])
    if not 0 < count <= full:
        raise ValueError(f"count={count} outside 1..{full}")
    return count


def serve_connection(
    conn: socket.socket, stream: EncodedStream, *, send_timeout: float, close_timeout: float
) -> dict[str, Any]:
    """Serves one client: handshake, frames, close frame, wait for the client's close."""
    report: dict[str, Any] = {"ok": False}
    t_accept = time.perf_counter()
    try:
        path = _handshake(conn, timeout=10.0)
        count = _requested_count(path, stream.config.count)
        report["count"] = count
        conn.settimeout(send_timeout)
        t0 = time.perf_counter()
        if stream.config.stamped:
            _send_paced(conn, stream, count, send_timeout)
        else:
            conn.sendall(memoryview(stream.frames)[: count * stream.frame_len])
        conn.sendall(CLOSE_FRAME)
        report["send_s"] = time.perf_counter() - t0
        report["bytes"] = stream.wire_bytes(count)
        report["close"] = _wait_for_close(conn, close_timeout)
        report["ok"] = True
    except (OSError, ValueError, TimeoutError) as error:
        report["error"] = f"{type(error).__name__}: {error}"
    finally:
        report["total_s"] = time.perf_counter() - t_accept
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
    return report


def _print_json(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _print_human(record: dict[str, Any]) -> None:
    print(record["url"] if "url" in record else json.dumps(record), flush=True)


def serve(
    config: StreamConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_connections: int = 10_000,
    idle_timeout: float = 300.0,
    send_timeout: float = 600.0,
    close_timeout: float = 30.0,
    emit: Callable[[dict[str, Any]], None] = _print_json,
) -> None:
    """Encodes the stream, announces the URL and serves connections one at a time.

    Stops after ``max_connections`` or when no client connects for ``idle_timeout`` seconds.
    ``emit`` gets the start info (``url``, ``frame_len``, ``encode_s``) and then one report per
    connection.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("this benchmark server only listens on the loopback interface")
    t0 = time.perf_counter()
    stream = encode_stream(config)
    encode_s = time.perf_counter() - t0
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(8)
    listener.settimeout(idle_timeout)
    bound = listener.getsockname()[1]
    emit(
        {
            "url": f"ws://{host}:{bound}/",
            "pid": os.getpid(),
            "frame_len": stream.frame_len,
            "encode_s": round(encode_s, 3),
        }
    )
    with listener:
        for number in range(max_connections):
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                break
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            report = serve_connection(
                conn, stream, send_timeout=send_timeout, close_timeout=close_timeout
            )
            report["conn"] = number
            emit(report)


class ServerProcess:
    """``stream_server.py`` running in its own process, driven through its stdout lines.

    Use as a context manager; ``url`` is set once the stream is encoded and the port listens.
    """

    def __init__(self, config: StreamConfig, *, start_timeout: float = 120.0) -> None:
        self.config = config
        args = [
            sys.executable,
            os.path.abspath(__file__),
            "--count",
            str(config.count),
            "--size",
            str(config.size),
            "--rate",
            str(config.rate),
            "--json",
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, bufsize=1)
        info = self._read_line(start_timeout)
        if info is None:
            self.stop()
            raise RuntimeError("the stream server did not start")
        self.url: str = info["url"]
        self.frame_len: int = info["frame_len"]
        self.encode_s: float = info["encode_s"]

    def _read_line(self, timeout: float) -> Optional[dict[str, Any]]:
        stdout = self._proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            return None
        line = stdout.readline()
        return json.loads(line) if line else None

    def wire_bytes(self, count: int) -> int:
        """Bytes a client reads for ``count`` messages, close frame included."""
        return count * self.frame_len + len(CLOSE_FRAME)

    def wait_served(self, timeout: float) -> Optional[dict[str, Any]]:
        """The report of the next finished connection; None if none came within ``timeout``."""
        return self._read_line(timeout)

    def stop(self) -> None:
        """Terminates the server process (killed if it does not stop within 5 s)."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: encode a stream and serve it on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000, help="messages per stream")
    parser.add_argument("--size", type=int, default=120, help="payload bytes per message")
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0 = unpaced")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--max-connections", type=int, default=10_000)
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="exit when idle")
    parser.add_argument("--json", action="store_true", help="print the start info as JSON")
    args = parser.parse_args(argv)
    config = StreamConfig(args.count, args.size, args.rate)
    try:
        serve(
            config,
            port=args.port,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            emit=_print_json if args.json else _print_human,
        )
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
