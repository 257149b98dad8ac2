"""A raw-socket WebSocket server for the hardening tests: it does the HTTP upgrade by hand, then
writes hand-made frames (protocol violations the `websockets` package would never send), and
records what the client sends back, above all its close code.

    with EvilServer([frame(b"ok"), frame(b"\\xff", opcode=TEXT)]) as server:
        ... consume(server.url) ...
    assert server.close_codes == [1007]

A script is an iterable of bytes (written as they are) and numbers (seconds to sleep); it may
be a generator, consumed lazily, so a "100 MB" script costs nothing until it is sent. Writing
stops as soon as the client's close frame arrives.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable
from typing import Callable, Optional, Union

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

Script = Iterable[Union[bytes, float, int]]


def frame(
    payload: bytes = b"",
    opcode: int = TEXT,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = False,
    length: Optional[int] = None,
) -> bytes:
    """One frame as a server would write it (`length` overrides the announced payload length,
    `rsv` sets RSV1-3 as bits 4-6 of the first byte, `mask` masks it as only a client may)."""
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode
    n = len(payload) if length is None else length
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        header += key
    return header + payload


def close_frame(code: Optional[int] = 1000, reason: bytes = b"") -> bytes:
    return frame(b"" if code is None else struct.pack("!H", code) + reason, CLOSE)


class ClientFrames:
    """Reads the client's (masked) frames from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def next(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        key = self._read(4) if b1 & 0x80 else b"\0\0\0\0"
        data = self._read(n)
        return b0 & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(data))


class EvilServer:
    """Serves each connection with `script` (or `script_for(n)` for connection n), in a thread.

    Records, per connection: `close_codes` (the client's close code; None when it sent no close
    frame, -1 for a close frame without a code), `frames` (opcode, payload) the client sent,
    and `handshakes` (request heads). `handshake=False` accepts TCP and never answers.
    """

    def __init__(
        self,
        script: Union[Script, Callable[[int], Script]] = (),
        *,
        handshake: bool = True,
        tls: Optional[ssl.SSLContext] = None,
        wait: float = 10.0,
    ) -> None:
        self.script = script
        self.handshake = handshake
        self.tls = tls
        self.wait = wait
        self.close_codes: list[Optional[int]] = []
        self.frames: list[tuple[int, bytes]] = []
        self.handshakes: list[bytes] = []
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        # accept() in slices, so that stop() is noticed (closing does not wake accept()).
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/"

    def __enter__(self) -> EvilServer:
        self._accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._accepter.is_alive():
            self._accepter.join(10)
        self._listener.close()
        for t in self._threads:
            if t.is_alive():
                t.join(10)

    def wait_done(self, timeout: float = 10.0) -> bool:
        """Waits until the first connection has been served (its close code recorded)."""
        return self.done.wait(timeout)

    def _accept(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            t = threading.Thread(target=self._serve, args=(sock, n), daemon=True)
            self._threads.append(t)
            t.start()
            n += 1

    def _serve(self, sock: socket.socket, n: int) -> None:
        try:
            with sock:
                if self.tls is not None:
                    sock.settimeout(self.wait)
                    try:
                        sock = self.tls.wrap_socket(sock, server_side=True)
                    except (ssl.SSLError, OSError) as e:
                        self.errors.append(e)
                        return
                self._serve_ws(sock, n)
        except Exception as e:
            self.errors.append(e)
        finally:
            self.done.set()

    def _serve_ws(self, sock: socket.socket, n: int) -> None:
        sock.settimeout(self.wait)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
            if not head.startswith(b"GET "[: len(head)]):
                # Not HTTP (a TLS ClientHello...): answer as an HTTP server would.
                sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
        self.handshakes.append(head)
        if not self.handshake:
            self._stop.wait(self.wait)
            return
        key = b""
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        closed = threading.Event()
        code: list[Optional[int]] = [None]

        def read_client() -> None:
            frames = ClientFrames(sock)
            try:
                while True:
                    opcode, data = frames.next()
                    self.frames.append((opcode, data))
                    if opcode == CLOSE:
                        code[0] = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else -1
                        closed.set()
                        return
            except (EOFError, OSError):
                closed.set()

        reader = threading.Thread(target=read_client, daemon=True)
        reader.start()
        script = self.script(n) if callable(self.script) else self.script
        try:
            for item in script:
                if closed.is_set():
                    break
                if isinstance(item, (int, float)):
                    closed.wait(item)
                else:
                    sock.sendall(item)
        except OSError:
            pass
        closed.wait(self.wait)
        reader.join(self.wait)
        self.close_codes.append(code[0])
        if code[0] is not None:
            # Complete the closing handshake, then hang up.
            try:
                sock.sendall(close_frame(code[0] if code[0] > 0 else None))
            except OSError:
                pass


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
