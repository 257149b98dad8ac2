"""Bounded memory under a slow handler, at full size.

A MockServer in its own process pushes ``--count`` messages of ``--size`` bytes as fast as it
can; this process consumes them with ``--workers`` workers whose handler sleeps ``--sleep``
seconds. It prints the consumer's peak RSS growth next to the documented bound, and how often
the server's writes had to wait for the client (TCP backpressure).

    python benches/backpressure.py                      # 1,000,000 x 120 B, ~9 minutes
    python benches/backpressure.py --count 50000        # a quick look

The pytest suite checks the same at a reduced size (tests/test_feeds.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from typing import Any

import wspool
from wspool.testing import MockServer


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _serve(count: int, size: int, conn: Any) -> None:
    payload = "x" * size
    server = MockServer(lambda: (payload for _ in range(count)))
    server.start()
    conn.send(server.url)
    # Wait for the consumer's close, then report what the server saw.
    conn.recv()
    conn.send({"sent": server.sent, "stalls": server.stalls, "stalled": server.stalled_seconds})
    server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=120, help="message size in bytes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--sleep", type=float, default=0.001, help="handler seconds per job")
    args = parser.parse_args(argv)

    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(args.count, args.size, child))
    server.start()
    url = parent.recv()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.1):
            peak = max(peak, _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def handler(job: wspool.Job) -> None:
        time.sleep(args.sleep)

    started = time.monotonic()
    last = started
    with wspool.consume(url, handler, workers=args.workers, queue_size=args.queue_size) as stream:
        for i, _ in enumerate(stream, 1):
            now = time.monotonic()
            if now - last >= 5:
                last = now
                print(
                    f"  {i:,} / {args.count:,} messages, peak RSS +{(peak - base) / 2**20:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    done.set()
    sampler.join()
    elapsed = time.monotonic() - started
    parent.send("done")
    seen = parent.recv()
    server.join(10)

    bound = (3 * args.queue_size + args.workers) * (args.size + 400) + 8 * 2**20
    stats = stream.stats
    print(f"messages: {stats.received:,} received, {stats.processed:,} processed", end="")
    print(f" in {elapsed:.1f} s")
    print(f"peak RSS growth: {(peak - base) / 2**20:.1f} MiB (bound {bound / 2**20:.1f} MiB)")
    print(
        f"server: {seen['stalls']:,} writes waited for the client, {seen['stalled']:.1f} s in all"
    )
    ok = peak - base <= bound and seen["stalls"] > 0 and stats.received == args.count
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
