"""What the journal costs: the same stream consumed with and without ``journal=``, in one run.

A raw WebSocket server (a plain socket that writes pre-built frames, so that the server is not
the bottleneck) sends COUNT messages of SIZE bytes per connection; wspool consumes them with no
handler (the value is the payload), alternately unjournaled and journaled (a fresh file each
time), and the best throughput of each is compared::

    python benches/journal.py                     # 100,000 messages of 120 B, 3 rounds
    python benches/journal.py --sync full --handler

The issue's bar: journaled throughput >= 50 % of unjournaled.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import socket
import struct
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import wspool

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def build_frames(count: int, size: int) -> bytes:
    """`count` unmasked text frames of exactly `size` bytes of JSON each, then a close (1000)."""
    out = bytearray()
    for seq in range(count):
        head = b'{"seq":%d,"pad":"' % seq
        message = head + b"x" * max(0, size - len(head) - 2) + b'"}'
        if len(message) < 126:
            out += bytes((0x81, len(message)))
        else:
            out += bytes((0x81, 126)) + struct.pack("!H", len(message))
        out += message
    out += bytes((0x88, 2)) + struct.pack("!H", 1000)
    return bytes(out)


class RawServer:
    """Answers each WebSocket handshake, then writes the same pre-built frames as fast as the
    client reads them."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"ws://127.0.0.1:{self.sock.getsockname()[1]}/"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            key = b""
            for line in request.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            conn.sendall(self.payload)
            # The client answers our close frame; then we close the TCP connection.
            conn.settimeout(5)
            try:
                conn.recv(4096)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def consume_once(
    url: str, journal: Optional[str], sync: str, handler: Optional[Callable[[Any], Any]]
) -> tuple[float, Any]:
    started = time.perf_counter()
    stats = wspool.run(url, handler, journal=journal, journal_sync=sync)
    return time.perf_counter() - started, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=120, help="bytes per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync", choices=["normal", "full"], default="normal")
    parser.add_argument("--handler", action="store_true", help="a trivial Python handler")
    parser.add_argument("--dir", default=None, help="where the journals go (default: a tmp dir)")
    args = parser.parse_args()

    server = RawServer(build_frames(args.count, args.size))
    handler = (lambda job: job.id) if args.handler else None
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for round_ in range(args.rounds):
            for mode in ("plain", "journal"):
                journal = os.path.join(tmp, f"jobs-{round_}.db") if mode == "journal" else None
                took, stats = consume_once(server.url, journal, args.sync, handler)
                if stats.received != args.count:
                    raise SystemExit(f"{mode}: received {stats.received} of {args.count}")
                rate = args.count / took
                best[mode] = max(best.get(mode, 0.0), rate)
                extra = ""
                if journal:
                    with wspool.Journal(journal) as j:
                        counts = j.counts()
                    if counts["done"] != args.count:
                        raise SystemExit(f"journal: {counts}")
                    extra = f"  ({os.path.getsize(journal) / 2**20:.1f} MiB + WAL)"
                print(f"round {round_ + 1} {mode:<8} {took:6.2f} s  {rate:>9,.0f} msg/s{extra}")
    server.close()
    ratio = best["journal"] / best["plain"]
    print(
        f"\n{args.count:,} messages of {args.size} B, sync={args.sync}, "
        f"handler={'python' if args.handler else 'none'}: best unjournaled "
        f"{best['plain']:,.0f} msg/s, journaled {best['journal']:,.0f} msg/s: "
        f"ratio {ratio:.0%} (bar: 50%)"
    )


if __name__ == "__main__":
    main()
